"""The one-shot driver: pruning with recomputations, in this process.

``prune_oneshot`` reaches the target in ``recompute`` steps that each prune the same fraction of the
remaining weights ([M-FAC, App. D.4.2], :func:`~hf_mfac.core.schedules.equal_fraction_schedule`),
collecting fresh gradients at the current (already pruned and updated) weights before each step: the
quadratic model behind OBS only holds near the point where the Fisher was taken ([WoodFisher, §5.1]
"recompute", [M-FAC, App. D.2.6]). For N:M the steps add zeros per group (e.g. 4:4 -> 3:4 -> 2:4).

All or nothing: a run that raises (KeyboardInterrupt included) copies the target weights back from a
host copy taken before the first update (:func:`restore_on_error`), so the model is as it was before
the call. The public entry points, :func:`~hf_mfac.pruning.prune_oneshot` and
:func:`~hf_mfac.pruning.prune_sweep`, resolve the settings and call :func:`run_oneshot` here, or,
inside an initialised process group of several ranks,
:func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed`, which builds on this module.

The settings are a :class:`~hf_mfac.pruning.PruningConfig` value; the keywords of ``prune_oneshot``
named after its fields override them (:func:`~hf_mfac.pruning.config.oneshot_config`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import math
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..core._checks import check_positive_int, check_sparsity
from ..core.schedules import equal_fraction_schedule
from .config import PruningConfig
from .grads import check_dataloader, check_fisher_batch_size, check_trainable, collect_grads
from .memory import check_estimate, estimate_pruner
from .placement import (Placement, PlacedFisher, check_device, check_placed, check_resident,
                        describe_plan, parse_fisher_device, place_fisher)
from .pruners import Pruner
from .targets import DEFAULT_TYPES, Layout, keep_modes

__all__ = ["run_oneshot", "PruneReport", "PruneResult", "FisherCache", "apply_masks",
           "masks_from_zeros", "restore_on_error", "before_update"]

logger = logging.getLogger("hf_mfac")


@dataclass
class PruneReport:
    """What a one-shot run did. ``layers``: ``{name: {"numel", "sparsity", "loss_increase"}}``;
    ``loss_increase`` is the OBS estimate of the increase of the loss, summed over steps (the pruned
    units' saliencies ``rho = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` [WoodFisher, eq. 10], [oBERT, eq.
    5], or CAP's recorded greedy losses; None for magnitude). Each gradient of the Fisher averages a
    mini-batch of b samples, which shrinks that Fisher by about b near a minimum: the saliencies are
    multiplied by b (the mean number of samples per gradient) so that it is on the scale of the
    per-sample loss. Even so it is a relative score, not a loss change: the empirical Fisher
    underestimates the curvature of a well-fit model (by about 16x on the fine-tuned
    all-MiniLM-L6-v2, benchmarks/RESULTS.md), so compare layers, methods and steps of one run with
    it, and measure the loss. Times in seconds; ``grad_share`` = share of
    the time spent collecting gradients. ``time_grads`` splits into ``time_forward_backward`` (the
    model's passes) and ``time_accumulate`` (the Fisher's build from the gradient chunks),
    ``time_prune`` into ``time_invert`` (forming the Fisher inverse) and ``time_select_update``
    (scores, selection and the update of the weights). ``memory_estimate``: the estimated peak bytes
    per device (:func:`~hf_mfac.pruning.estimate_memory`), checked before the work. ``placement``:
    where the Fisher lived, ``[{"device", "blocks": [first, stop]}]`` in block order (one entry
    for a Fisher on one device; None without a Fisher), and ``work_device``, where the selection
    and the update ran (:mod:`~hf_mfac.pruning.placement`)."""
    method: str
    pattern: str
    scope: str
    target_sparsity: float
    sparsity: float = 0.0
    loss_increase: float | None = None
    num_grads: int | None = None
    block_size: int | None = None
    damp: float | None = None
    rel_damp: float | None = None
    woodtaylor: bool = False
    fisher_reused: bool = False
    layers: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    time_grads: float = 0.0
    time_prune: float = 0.0
    time_total: float = 0.0
    time_forward_backward: float = 0.0
    time_accumulate: float = 0.0
    time_invert: float = 0.0
    time_select_update: float = 0.0
    memory_estimate: dict | None = None
    placement: list | None = None
    work_device: str | None = None

    @property
    def grad_share(self) -> float:
        return self.time_grads / self.time_total if self.time_total > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grad_share"] = self.grad_share
        return d

    def to_markdown(self) -> str:
        """Per-layer table plus a summary line."""
        lines = ["| layer | weights | sparsity | OBS saliency (relative score) |",
                 "|---|---:|---:|---:|"]
        for name, r in self.layers.items():
            li = "-" if r["loss_increase"] is None else f"{r['loss_increase']:.4g}"
            lines.append(f"| {name} | {r['numel']} | {r['sparsity']:.4f} | {li} |")
        total = "-" if self.loss_increase is None else f"{self.loss_increase:.4g}"
        lines.append(f"\n{self.method} ({self.pattern}, {self.scope}): sparsity "
                     f"{self.sparsity:.4f} "
                     f"(target {self.target_sparsity:.4f}), OBS saliency {total} (a relative "
                     "score), "
                     f"{len(self.steps)} step(s), "
                     f"{self.time_total:.2f}s ({100 * self.grad_share:.0f}% collecting gradients: "
                     f"forward/backward {self.time_forward_backward:.2f}s, accumulation "
                     f"{self.time_accumulate:.2f}s; inversion {self.time_invert:.2f}s, "
                     "selection and "
                     f"update {self.time_select_update:.2f}s"
                     f"{'; first Fisher reused from the cache' if self.fisher_reused else ''})")
        if self.placement and len(self.placement) > 1:
            parts = "; ".join(f"{p['device']}: blocks {p['blocks'][0]}-{p['blocks'][1] - 1}"
                              for p in self.placement)
            lines.append(f"Fisher placed over {len(self.placement)} parts ({parts}); selection "
                         f"and update on {self.work_device}")
        return "\n".join(lines)


class PruneResult(NamedTuple):
    masks: dict  # {parameter name: bool mask, True = kept}
    report: PruneReport


def apply_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (``params`` and ``masks`` keyed by the same names)."""
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


def masks_from_zeros(params: Mapping[str, torch.Tensor]) -> dict:
    """Masks that keep every non-zero weight (to resume from a pruned model without its masks)."""
    return {name: p.detach() != 0 for name, p in params.items()}


_GUARDED: ContextVar[frozenset] = ContextVar("hf_mfac_guarded_tensors", default=frozenset())
# the restore_on_error blocks open in this context, innermost last (what before_update() arms)
_GUARDS: ContextVar[tuple] = ContextVar("hf_mfac_restore_guards", default=())


class _Guard:
    """The host copy of one :func:`restore_on_error` block: taken on entry, or, for a lazy block,
    by :meth:`take` (:func:`before_update`) just before the tensors are first written."""

    def __init__(self, own: Mapping[str, torch.Tensor], lazy: bool):
        self.own, self.saved = own, None
        if not lazy:
            self.take()

    def take(self) -> None:
        if self.saved is None:  # set only once every copy is made (an interrupted copy: no copy)
            self.saved = {name: t.detach().to("cpu", copy=True) for name, t in self.own.items()}

    def commit(self) -> None:
        if self.saved is None:
            self.take()
        else:
            for name, t in self.own.items():
                self.saved[name].copy_(t.detach())

    def restore(self) -> None:
        if self.saved is None:  # never written: nothing to put back
            return
        with torch.no_grad():
            for name, t in self.own.items():
                t.copy_(self.saved[name])


def before_update() -> None:
    """Take the host copies of the lazy :func:`restore_on_error` blocks open in this context (a
    no-op for those that have theirs): call it before the guarded tensors are first written."""
    for guard in _GUARDS.get():
        guard.take()


@contextlib.contextmanager
def restore_on_error(tensors: Mapping[str, torch.Tensor], *, lazy: bool = False):
    """Copy ``tensors`` back to their values on entry if the block raises anything
    (KeyboardInterrupt included), then re-raise. Memory: one host (CPU) copy of the tensors for the
    duration of the block; tensors an enclosing ``restore_on_error`` already guards are not copied
    again (the outer block restores them). Yields ``commit()``, which makes the current values the
    ones to restore.

    ``lazy=True``: the copy is taken only when :func:`before_update` is called inside the block
    (the writer calls it before its first write), so the memory is not held through the work
    before that, e.g. the gradient phase and the inversion of a pruning step; a block that raises
    before it has nothing to put back. Every writer of the tensors inside a lazy block must call
    :func:`before_update` first."""
    outer = _GUARDED.get()
    own = {name: t for name, t in tensors.items() if id(t) not in outer}
    guard = _Guard(own, lazy)
    token = _GUARDED.set(outer | {id(t) for t in own.values()})
    guards = _GUARDS.set((*_GUARDS.get(), guard))
    try:
        yield guard.commit
    except BaseException:
        guard.restore()
        raise
    finally:
        _GUARDS.reset(guards)
        _GUARDED.reset(token)


def _fit_block_size(pruner: Pruner, targets: Mapping[str, torch.Tensor]) -> Pruner:
    """``pruner``, or a copy with its block size lowered to the largest target's size (rounded up to
    the pattern's unit) when the block size exceeds every target. Each target is padded to a whole
    number of blocks, so a larger block only adds padding: the same inverse on the weights (padding
    carries no gradient) at a Fisher of up to (B / largest target) times the memory and (B / largest
    target)^2 the time. Logged on logger "hf_mfac"."""
    B = pruner.block_size
    # static M-FAC: blocks span targets, no padding
    if not (pruner.uses_fisher and B and pruner.pad == B):
        return pruner
    g = pruner.pattern.group
    fit = -(-max(t.numel() for t in targets.values()) // g) * g
    if fit >= B:
        return pruner
    logger.info("block_size=%d is larger than every pruning target (the largest has %d weights); "
                "using "
                "block_size=%d, which gives the same Fisher inverse on the weights without the "
                "padding", B,
                max(t.numel() for t in targets.values()), fit)
    pruner = copy.copy(pruner)
    # a DistributedPruner forwards its block size to the wrapped pruner
    inner = pruner.__dict__.get("inner")
    if inner is not None:
        pruner.inner = inner = copy.copy(inner)
    (inner or pruner).block_size = fit
    return pruner


def _initial_keep(layout: Layout, masks, device) -> torch.Tensor:
    if masks is None:
        return layout.valid(device)
    unknown = set(masks) - set(layout.names)
    if unknown:
        raise ValueError("masks given for tensors that are not pruning targets: "
                         f"{sorted(unknown)[:5]}")
    full = {}
    for name, p in layout.params.items():
        m = masks.get(name)
        if m is None:
            m = torch.ones(p.shape, dtype=torch.bool)
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask for {name} has shape {tuple(m.shape)}; the weight has "
                             f"{tuple(p.shape)}")
        full[name] = m.bool()
    return layout.flatten(full, dtype=torch.bool, device=device, fill=False)


def _schedule(pruner: Pruner, layout: Layout, keep: torch.Tensor, sparsity, recompute: int):
    """[(sparsity, zeros-per-group)] for each recomputation step."""
    pat = pruner.pattern
    if pat.kind == "nm":
        if sparsity is not None and not math.isclose(float(sparsity), pat.sparsity, abs_tol=1e-9):
            raise ValueError(f"sparsity={sparsity} contradicts the {pat} pattern (which gives "
                             f"{pat.sparsity:g}); "
                             "leave sparsity out for N:M")
        have = int((~keep.view(-1, pat.m)).sum(1).max()) if keep.numel() else 0
        total = pat.m - pat.n
        if have > total:
            raise ValueError(f"the masks already prune {have} of {pat.m} weights in some group; "
                             f"{pat} allows {total}")
        zs = sorted(
            {have + math.ceil((total - have) * i / recompute) for i in range(1, recompute + 1)}
            - {have}
        )
        return [(1.0 - (pat.m - z) / pat.m, z) for z in zs] or [(pat.sparsity, total)]
    if sparsity is None:
        raise ValueError("give the target sparsity (a fraction in [0, 1))")
    sparsity = check_sparsity(sparsity)
    current = 1.0 - float(keep.sum()) / layout.numel
    if sparsity < current - 0.5 / layout.numel:
        raise ValueError(
            f"target sparsity {sparsity} is below the current sparsity {current:.4f} "
            "of the masks; "
            "masks never regrow"
        )
    return [
        (s, None)
        for s in equal_fraction_schedule(sparsity, recompute, initial=min(current, sparsity))
    ]


class FisherCache:
    """Keeps the Fisher inverse of a one-shot run's first step for the next runs from the same model
    state.

    A comparison of methods and targets from one dense model (``prune_oneshot(copy.deepcopy(dense),
    ...)`` for each) would otherwise collect the same gradients and build the same inverse every
    time. Pass one cache as ``prune_oneshot(..., fisher_cache=cache)`` to every run: the first step
    of a run reuses an entry when everything its Fisher depends on is equal:

    * the pruner's :meth:`~hf_mfac.pruning.Pruner.fisher_key` (oBERT and CAP share the block Fisher
      at equal block size, damp and dtype; static M-FAC has its own),
    * the targets (names, shapes) and current masks,
    * the model's parameters and buffers, bit for bit (a SHA-256 over all of them, computed per
      run),
    * the dataloader and ``loss_fn`` objects, ``num_grads``, ``fisher_batch_size``, ``per_sample``,
      device.

    Later steps of a run with ``recompute > 1`` start from pruned weights and always collect fresh
    gradients. The pruners only read the inverse, so one entry serves any number of runs. Each entry
    holds one Fisher inverse as the run left it (``Pruner.inverse_bytes``: a block Fisher's packed
    fp32 inverse, on one device or over the devices of its placement, which is part of the key;
    static M-FAC's m x D ``W = L^{-1} G``), and the mean gradient for WoodTaylor runs, until it is
    evicted (``max_entries``, least recently used first) or :meth:`clear` is called;
    :meth:`storage_bytes` says how much that is. ``hits`` / ``misses`` count the lookups.
    """

    def __init__(self, max_entries: int = 1):
        self.max_entries = check_positive_int("max_entries", max_entries)
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def storage_bytes(self) -> int:
        """Bytes the entries hold now: each inverse's storage (its ``storage_bytes()``, else its
        tensors) and mean gradient, every storage counted once."""
        seen, total = set(), 0

        def count(t) -> None:
            nonlocal total
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()

        for finv, grad, _ in self._entries.values():
            size = getattr(finv, "storage_bytes", None)
            if callable(size):
                total += int(size())
            else:
                for t in vars(finv).values():
                    count(t)
            count(grad)
        return total

    @staticmethod
    def key(
        model: nn.Module,
        pruner: Pruner,
        layout: Layout,
        keep: torch.Tensor,
        dataloader,
        extra: tuple,
    ) -> tuple:
        h = hashlib.sha256()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(
                t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
                if t.numel()
                else b""
            )
        h.update(keep.to(torch.uint8).cpu().numpy().tobytes())
        return (
            pruner.fisher_key(),
            tuple(layout.names),
            tuple(layout.shapes),
            id(dataloader),
            *extra,
            h.hexdigest(),
        )

    def get(self, key):
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return hit

    def put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _check_autograd(what: str) -> None:
    """Refuse to collect gradients inside ``torch.inference_mode()``, which turns autograd off for
    the whole block (``torch.enable_grad()`` cannot turn it back on), saying so; ``what`` names the
    method."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} pruning needs the loss gradients, but it was called inside "
            "torch.inference_mode(), where autograd is off: call it outside the "
            "inference_mode block (torch.no_grad() around it is fine), or use "
            "method='magnitude'"
        )


@dataclass
class _Run:
    """What the steps of one :func:`prune_oneshot` call share: the model and data, the resolved
    settings (``config.num_grads`` and ``fisher_batch_size`` filled in), the pruner, its targets and
    devices."""

    model: nn.Module
    dataloader: object
    config: PruningConfig
    pruner: Pruner
    layout: Layout
    targets: Mapping[str, torch.Tensor]
    dev: torch.device
    wdev: torch.device
    report: PruneReport
    loss_fn: Callable | None
    chunk_size: int | None
    progress: bool
    placement: Placement | None = None  # the Fisher over several devices (None: on ``dev``)


def _run_steps(run: _Run, keep: torch.Tensor, steps, fisher_cache: FisherCache | None):
    """Run the pruning steps in place on the targets; return the final keep mask and the summed
    saliencies."""
    loss_total = None
    pruner, layout = run.pruner, run.layout
    for i_step, (step_sparsity, zeros) in enumerate(steps):
        t0 = time.perf_counter()
        fisher = _StepFisher()
        if pruner.uses_fisher:  # later steps start from pruned weights: no cache
            fisher = _step_fisher(run, keep, fisher_cache if i_step == 0 else None)
        w = layout.flatten(run.targets, dtype=torch.float32, device=run.wdev)
        clock = getattr(fisher.finv, "seconds", None)  # the block Fisher's own clocks
        inv0 = clock["invert"] if clock else 0.0
        # the new weights may go over w, which the driver no longer needs
        into = {"out": w} if _takes_out(pruner) else {}
        res = pruner.prune(
            layout, w, keep, sparsity=step_sparsity, zeros=zeros, finv=fisher.finv,
            grad=fisher.grad, **into
        )
        fisher.invert_seconds += (clock["invert"] - inv0) if clock else 0.0
        if not bool(torch.isfinite(res.weights).all()):
            raise FloatingPointError(
                f"{pruner.name}: the pruned weights are not finite; increase damp"
            )
        keep = res.keep
        # the step's inputs are no longer needed: the inverse (unless a cache keeps it) and the
        # flat weights are freed before the restore copy is taken, just before the first write
        fisher.finv = w = None
        before_update()
        _write_back(run.targets, layout, res.weights)
        loss = None
        if res.loss is not None:
            # The Fisher of gradients averaged over b samples is about 1/b of the per-sample Fisher
            # that the quadratic model needs (near a minimum the mean gradient is small): scale the
            # saliencies by b.
            loss = res.loss * fisher.samples_per_grad
            loss_total = loss if loss_total is None else loss_total + loss
        _record_step(run.report, layout, keep, loss, fisher, time.perf_counter() - t0)
        del fisher
    return keep, loss_total


def _takes_out(pruner) -> bool:
    """Whether ``pruner.prune`` takes ``out=`` (the library's pruners do; a wrapper may not)."""
    try:
        return "out" in inspect.signature(pruner.prune).parameters
    except (TypeError, ValueError):
        return False


def _check_grads(
    pruner: Pruner, layout: Layout, dataloader, num_grads, fisher_batch_size, num_steps: int, wdev
) -> int | None:
    """The run's number of gradients per step (None for a method without a Fisher), checked against
    the data before any work (the memory: :func:`~hf_mfac.pruning.memory.check_estimate`)."""
    if not pruner.uses_fisher:
        given = dict(num_grads=num_grads, fisher_batch_size=fisher_batch_size)
        unused = [k for k, v in given.items() if v is not None]
        if unused:  # one sweep may pass the same settings to every method
            logger.info("%s pruning uses no gradients: ignoring %s", pruner.name, ", ".join(unused))
        return None
    num_grads = num_grads or pruner.default_num_grads
    check_dataloader(dataloader, num_grads, fisher_batch_size, repeats=num_steps)
    return num_grads


def _new_report(pruner: Pruner, target_sparsity: float, num_grads: int | None) -> PruneReport:
    cfg = pruner.config()
    return PruneReport(
        method=cfg["method"],
        pattern=cfg["pattern"],
        scope=cfg["scope"],
        target_sparsity=target_sparsity,
        num_grads=num_grads,
        block_size=cfg["block_size"],
        damp=cfg["damp"],
        rel_damp=cfg["rel_damp"],
        woodtaylor=cfg["woodtaylor"],
    )


@dataclass
class _StepFisher:
    """What one pruning step needs from its gradients: the Fisher inverse, the mean gradient
    (WoodTaylor), the seconds spent collecting them, and the mean number of samples behind each
    gradient."""

    finv: object = None
    grad: torch.Tensor | None = None
    seconds: float = 0.0
    samples_per_grad: float = 1.0
    model_seconds: float = 0.0  # of ``seconds``: the forward and backward passes
    sink_seconds: float = 0.0  # of ``seconds``: the Fisher's accumulation
    invert_seconds: float = 0.0  # forming the inverse (during the step)


def _step_fisher(run: _Run, keep: torch.Tensor, fisher_cache: FisherCache | None) -> _StepFisher:
    """The Fisher inverse at the current weights: from ``fisher_cache`` when it holds this state's,
    else from ``config.num_grads`` fresh gradients (then stored in the cache)."""
    c, pruner, layout = run.config, run.pruner, run.layout
    key = None
    if fisher_cache is not None and pruner.fisher_key() is not None:
        key = fisher_cache.key(
            run.model,
            pruner,
            layout,
            keep,
            run.dataloader,
            (
                id(run.loss_fn),
                c.num_grads,
                c.fisher_batch_size,
                c.per_sample,
                str(run.dev),
                str(run.wdev),
                None if run.placement is None else tuple(run.placement.plan),
                bool(pruner.woodtaylor),  # the entry holds the mean gradient only then
            ),
        )
        cached = fisher_cache.get(key)
        if cached is not None:
            run.report.fisher_reused = True
            finv, grad, samples_per_grad = cached
            return _StepFisher(finv, grad, 0.0, samples_per_grad)
    parts = None
    if run.placement is not None:  # one block Fisher per part, on its device
        fisher = PlacedFisher(pruner, run.placement.plan, layout.dim, c.num_grads, run.wdev,
                              groups=layout.layer_index())
        parts = run.placement.coordinate_parts()
    else:
        fisher = pruner.new_fisher(layout.dim, c.num_grads, run.dev, groups=layout.layer_index())
    stats = collect_grads(
        run.model,
        run.dataloader,
        c.num_grads,
        params=layout,
        keep=keep.to(run.dev),
        sink=fisher.add_grads,
        fisher_batch_size=c.fisher_batch_size,
        per_sample=c.per_sample,
        chunk_size=run.chunk_size,
        loss_fn=run.loss_fn,
        device=run.dev,
        progress=run.progress,
        parts=parts,
        mean=bool(pruner.woodtaylor),  # only WoodTaylor reads the mean gradient
    )
    # static M-FAC's precomputation (a block Fisher inverts on first use, in the step)
    t_finish = time.perf_counter()
    finv = fisher.finish()
    out = _StepFisher(
        finv,
        None if stats.mean is None else stats.mean.to(run.wdev),
        stats.seconds,
        stats.num_samples / max(1, stats.num_grads),
        stats.seconds_model,
        stats.seconds_sink,
        time.perf_counter() - t_finish,
    )
    if key is not None:
        fisher_cache.put(key, (out.finv, out.grad, out.samples_per_grad))
    return out


def _write_back(targets: Mapping[str, torch.Tensor], layout: Layout, weights: torch.Tensor) -> None:
    with torch.no_grad():
        for name, v in layout.unflatten(weights).items():
            targets[name].copy_(v)


def _record_step(
    report: PruneReport, layout: Layout, keep: torch.Tensor, loss, fisher: "_StepFisher", dt: float
) -> None:
    t_grads = fisher.seconds
    split = {
        "time_forward_backward": fisher.model_seconds,
        "time_accumulate": fisher.sink_seconds,
        "time_invert": fisher.invert_seconds,
        "time_select_update": dt - t_grads - fisher.invert_seconds,
    }
    report.time_grads += t_grads
    report.time_prune += dt - t_grads
    for k, v in split.items():
        setattr(report, k, getattr(report, k) + v)
    report.steps.append(
        {
            "sparsity": 1.0 - float(keep.sum()) / layout.numel,
            "loss_increase": None if loss is None else float(loss.sum()),
            "time_grads": t_grads,
            "time_prune": dt - t_grads,
            **split,
        }
    )


def _finish_report(
    report: PruneReport, layout: Layout, keep: torch.Tensor, targets, loss_total
) -> dict:
    """Fill the report's totals and per-layer rows; return the masks ``{name: bool}`` on the
    targets' devices."""
    out_masks = {
        name: m.to(targets[name].device).clone() for name, m in layout.unflatten(keep).items()
    }
    report.sparsity = 1.0 - float(keep.sum()) / layout.numel
    report.loss_increase = None if loss_total is None else float(loss_total.sum())
    for i, name in enumerate(layout.names):
        n = layout.numels[i]
        report.layers[name] = {
            "numel": n,
            "sparsity": 1.0 - float(out_masks[name].sum()) / n,
            "loss_increase": None if loss_total is None else float(loss_total[i]),
        }
    return out_masks


def run_oneshot(
    model: nn.Module,
    dataloader,
    config: PruningConfig,
    *,
    types: Sequence[type] = DEFAULT_TYPES,
    targets: Mapping[str, torch.Tensor] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    loss_fn: Callable | None = None,
    device=None,
    page_bytes: int | None = None,
    chunk_size: int | None = None,
    fisher_cache: FisherCache | None = None,
    progress: bool = True,
) -> PruneResult:
    """The one-shot driver in this process: :func:`~hf_mfac.pruning.prune_oneshot` once its
    settings are resolved to ``config`` (and, over several ranks,
    :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed` with its pruner distributed).
    Arguments and result as there."""
    t_start = time.perf_counter()
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    spec = parse_fisher_device(device)  # every device named must exist here
    pruner = config.pruner(device=spec if isinstance(spec, torch.device) else None,
                           page_bytes=page_bytes)
    if pruner.device is not None:
        check_device(pruner.device, "the pruner's device")
        if isinstance(spec, list):
            raise ValueError(f"the pruner has its own device ({pruner.device}); do not pass "
                             f"device={device!r} beside it")
    if pruner.uses_fisher:
        _check_autograd(pruner.name)
    targets = config.find_targets(model, types) if targets is None else targets
    check_resident(model, targets)  # no target offloaded by accelerate (meta weights)
    pruner = _fit_block_size(pruner, targets)
    if pruner.uses_fisher:
        check_trainable(targets)
    layout = Layout(targets, pad=pruner.pad)
    pruner.check(layout)
    placement = place_fisher(pruner, layout, targets, spec,
                             config.num_grads or pruner.default_num_grads, chunk_size=chunk_size)
    if placement is not None and len(placement.plan) == 1:  # one device after all
        pruner = copy.copy(pruner)
        inner = pruner.__dict__.get("inner")  # a DistributedPruner forwards its device
        if inner is not None:
            pruner.inner = inner = copy.copy(inner)
        (inner or pruner).device, placement = torch.device(placement.plan[0].device), None
    # gradients and the Fisher's factorisations (placed: each part on its device)
    dev = (placement.work_device if placement
           else pruner.device or next(iter(targets.values())).device)
    # weights, masks, scores (static M-FAC: where its m x D matrix lives)
    wdev = placement.work_device if placement else pruner.work_device(dev)
    keep = _initial_keep(layout, masks, wdev)
    steps = _schedule(pruner, layout, keep, config.sparsity, config.recompute)
    batch = check_fisher_batch_size(config.fisher_batch_size, config.per_sample)
    num_grads = _check_grads(pruner, layout, dataloader, config.num_grads, batch, len(steps), wdev)
    if placement is None:
        estimate = estimate_pruner(pruner, targets, num_grads or 0, chunk_size=chunk_size,
                                   steps=len(steps))
        logger.info("%s pruning: estimated peak memory %s", pruner.name, estimate.describe())
        check_estimate(estimate, pruner, targets, num_grads or 0)  # refused before any work
    else:
        estimate = estimate_pruner(pruner, targets, num_grads, chunk_size=chunk_size,
                                   placement=placement.plan, work_device=placement.work_device,
                                   steps=len(steps))
        logger.info("%s pruning: the Fisher placed over %d parts (%s), selection and update on %s; "
                    "estimated peak memory %s", pruner.name, len(placement.plan),
                    describe_plan(placement.plan), placement.work_device, estimate.describe())
        check_placed(estimate)  # refused before any work
    config = config.replace(num_grads=num_grads, fisher_batch_size=batch)
    run = _Run(
        model,
        dataloader,
        config,
        pruner,
        layout,
        targets,
        dev,
        wdev,
        _new_report(pruner, steps[-1][0], config.num_grads),
        loss_fn,
        chunk_size,
        progress,
        placement,
    )
    run.report.memory_estimate = dict(estimate)
    run.report.work_device = str(wdev)
    if placement is not None:
        run.report.placement = placement.to_list()
    elif pruner.uses_fisher:
        nb = -(-layout.dim // (pruner.block_size or layout.dim))
        run.report.placement = [{"device": str(dev), "blocks": [0, nb]}]
    # all or nothing, the modes too; the restore copy is taken just before the first write-back
    with restore_on_error(targets, lazy=True), keep_modes(model):
        keep, loss_total = _run_steps(run, keep, steps, fisher_cache)
        out_masks = _finish_report(run.report, layout, keep, targets, loss_total)
        run.report.time_total = time.perf_counter() - t_start
    return PruneResult(out_masks, run.report)
