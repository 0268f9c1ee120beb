"""One-shot pruning with recomputations, and sparsity sweeps.

``prune_oneshot`` reaches the target in ``recompute`` steps that each prune the same fraction of the
remaining weights ([M-FAC, App. D.4.2], :func:`~hf_mfac.core.schedules.equal_fraction_schedule`), collecting
fresh gradients at the current (already pruned and updated) weights before each step: the quadratic
model behind OBS only holds near the point where the Fisher was taken ([WoodFisher, §5.1] "recompute",
[M-FAC, App. D.2.6]). For N:M the steps add zeros per group (e.g. 4:4 -> 3:4 -> 2:4).

All or nothing: a run that raises (KeyboardInterrupt included) copies the target weights back from a host copy
taken before the first update (:func:`restore_on_error`), so the model is as it was before the call.
Inside an initialised process group of several ranks, ``prune_oneshot`` runs
:func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed`, so the ranks never diverge.
"""
from __future__ import annotations

import contextlib
import copy
import functools
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

from ..comm import Comm
from ..core._checks import check_positive_int, check_sparsity
from ..core.schedules import equal_fraction_schedule
from .config import PruningConfig
from .grads import check_dataloader, check_fisher_batch_size, check_trainable, collect_grads
from .pruners import Pruner, _check_memory, make_pruner
from .targets import DEFAULT_EXCLUDE, DEFAULT_TYPES, Layout, find_prunable

__all__ = ["prune_oneshot", "prune_sweep", "PruneReport", "PruneResult", "FisherCache", "apply_masks",
           "masks_from_zeros", "restore_on_error"]

logger = logging.getLogger("hf_mfac")


@dataclass
class PruneReport:
    """What a one-shot run did. ``layers``: ``{name: {"numel", "sparsity", "loss_increase"}}``;
    ``loss_increase`` is the OBS estimate of the increase of the loss, summed over steps (the pruned units'
    saliencies ``rho = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` [WoodFisher, eq. 10], [oBERT, eq. 5], or CAP's
    recorded greedy losses; None for magnitude). Each gradient of the Fisher averages a mini-batch of b
    samples, which shrinks that Fisher by about b near a minimum: the saliencies are multiplied by b (the mean
    number of samples per gradient) so that it is on the scale of the per-sample loss. Even so it is a relative
    score, not a loss change: the empirical Fisher underestimates the curvature of a well-fit model (on the
    fine-tuned all-MiniLM-L6-v2 at 50 %, 0.0015 against a measured increase of the training loss of 0.024), so
    compare layers, methods and steps of one run with it, and measure the loss. Times in seconds; ``grad_share`` = share
    of the time spent collecting gradients."""
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

    @property
    def grad_share(self) -> float:
        return self.time_grads / self.time_total if self.time_total > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grad_share"] = self.grad_share
        return d

    def to_markdown(self) -> str:
        """Per-layer table plus a summary line."""
        lines = ["| layer | weights | sparsity | OBS saliency (relative score) |", "|---|---:|---:|---:|"]
        for name, r in self.layers.items():
            li = "-" if r["loss_increase"] is None else f"{r['loss_increase']:.4g}"
            lines.append(f"| {name} | {r['numel']} | {r['sparsity']:.4f} | {li} |")
        total = "-" if self.loss_increase is None else f"{self.loss_increase:.4g}"
        lines.append(f"\n{self.method} ({self.pattern}, {self.scope}): sparsity {self.sparsity:.4f} "
                     f"(target {self.target_sparsity:.4f}), OBS saliency {total} (a relative score), "
                     f"{len(self.steps)} step(s), "
                     f"{self.time_total:.2f}s ({100 * self.grad_share:.0f}% collecting gradients"
                     f"{'; first Fisher reused from the cache' if self.fisher_reused else ''})")
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


@contextlib.contextmanager
def restore_on_error(tensors: Mapping[str, torch.Tensor]):
    """Copy ``tensors`` back to their values on entry if the block raises anything (KeyboardInterrupt included),
    then re-raise. Memory: one host (CPU) copy of the tensors for the duration of the block; tensors an
    enclosing ``restore_on_error`` already guards are not copied again (the outer block restores them).
    Yields ``commit()``, which makes the current values the ones to restore."""
    outer = _GUARDED.get()
    own = {name: t for name, t in tensors.items() if id(t) not in outer}
    saved = {name: t.detach().to("cpu", copy=True) for name, t in own.items()}

    def commit() -> None:
        for name, t in own.items():
            saved[name].copy_(t.detach())

    token = _GUARDED.set(outer | {id(t) for t in own.values()})
    try:
        yield commit
    except BaseException:
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(saved[name])
        raise
    finally:
        _GUARDED.reset(token)


def _resolve_targets(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` of :func:`prune_oneshot` with the targets resolved once (``targets=``, in place of
    ``include``/``exclude``/``types``), for the callers that guard them across several runs."""
    kwargs = dict(kwargs)
    select = {k: kwargs.pop(k) for k in ("include", "exclude", "types") if k in kwargs}
    if kwargs.get("targets") is None:
        kwargs["targets"] = find_prunable(model, **select)
    return kwargs


def _pruner_from(method, *, device=None, **settings) -> Pruner:
    """The pruner of a run: :func:`make_pruner` with the ``settings`` (pattern, scope, block_size, damp, ...), or
    ``method`` itself when it is a :class:`Pruner`, which holds its own settings (then they must be left out)."""
    if not isinstance(method, Pruner):
        return make_pruner(method, device=device, **settings)
    given = sorted(k for k, v in settings.items() if v not in (None, False) and not (k == "scope" and v == "global"))
    if given:
        raise ValueError(f"{given} are set on the Pruner instance; do not pass them to prune_oneshot")
    return method


def _fit_block_size(pruner: Pruner, targets: Mapping[str, torch.Tensor]) -> Pruner:
    """``pruner``, or a copy with its block size lowered to the largest target's size (rounded up to the pattern's
    unit) when the block size exceeds every target. Each target is padded to a whole number of blocks, so a larger
    block only adds padding: the same inverse on the weights (padding carries no gradient) at a Fisher of up to
    (B / largest target) times the memory and (B / largest target)^2 the time. Logged on logger "hf_mfac"."""
    B = pruner.block_size
    if not (pruner.uses_fisher and B and pruner.pad == B):  # static M-FAC: blocks span targets, no padding
        return pruner
    g = pruner.pattern.group
    fit = -(-max(t.numel() for t in targets.values()) // g) * g
    if fit >= B:
        return pruner
    logger.info("block_size=%d is larger than every pruning target (the largest has %d weights); using "
                "block_size=%d, which gives the same Fisher inverse on the weights without the padding", B,
                max(t.numel() for t in targets.values()), fit)
    pruner = copy.copy(pruner)
    inner = pruner.__dict__.get("inner")  # a DistributedPruner forwards its block size to the wrapped pruner
    if inner is not None:
        pruner.inner = inner = copy.copy(inner)
    (inner or pruner).block_size = fit
    return pruner


def accepts_config(fn):
    """Give ``fn`` a ``config: PruningConfig | None`` keyword whose settings fill the keywords the caller did not
    pass (the keywords given override them; a None field leaves the function's own default)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="PruningConfig | None")

    @functools.wraps(fn)
    def call(*args, config: PruningConfig | None = None, **kwargs):
        if config is not None:
            kwargs = {**_config_kwargs(config), **kwargs}
        return fn(*args, **kwargs)

    call.__signature__ = sig.replace(parameters=[*params[:at], config, *params[at:]])
    return call


def _config_kwargs(config: PruningConfig) -> dict:
    if not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a hf_mfac.pruning.PruningConfig; got {type(config).__name__}")
    if config.method is None:
        raise ValueError("config.method is None (no pruning); set a method or leave config out")
    if config.sparsities is not None:
        raise ValueError(f"config.sparsities={config.sparsities} is a sweep: call prune_sweep(model, dataloader, "
                         "config.sparsities, **config.oneshot_kwargs())")
    return config.oneshot_kwargs()


# prune_oneshot_distributed, which builds on this module: it registers itself here when hf_mfac.pruning.distributed
# is imported (hf_mfac.pruning imports it), so that this module never imports it back.
_DISTRIBUTED_ENTRY: Callable | None = None


def _several_ranks(method) -> bool:
    """True inside an initialised process group of more than one rank, unless ``method`` is already distributed
    (a :class:`~hf_mfac.pruning.distributed.DistributedPruner`, which brings its own group)."""
    return not getattr(method, "runs_over_ranks", False) and Comm().distributed


def _initial_keep(layout: Layout, masks, device) -> torch.Tensor:
    if masks is None:
        return layout.valid(device)
    unknown = set(masks) - set(layout.names)
    if unknown:
        raise ValueError(f"masks given for tensors that are not pruning targets: {sorted(unknown)[:5]}")
    full = {}
    for name, p in layout.params.items():
        m = masks.get(name)
        if m is None:
            m = torch.ones(p.shape, dtype=torch.bool)
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask for {name} has shape {tuple(m.shape)}; the weight has {tuple(p.shape)}")
        full[name] = m.bool()
    return layout.flatten(full, dtype=torch.bool, device=device, fill=False)


def _schedule(pruner: Pruner, layout: Layout, keep: torch.Tensor, sparsity, recompute: int):
    """[(sparsity, zeros-per-group)] for each recomputation step."""
    pat = pruner.pattern
    if pat.kind == "nm":
        if sparsity is not None and not math.isclose(float(sparsity), pat.sparsity, abs_tol=1e-9):
            raise ValueError(f"sparsity={sparsity} contradicts the {pat} pattern (which gives {pat.sparsity:g}); "
                             "leave sparsity out for N:M")
        have = int((~keep.view(-1, pat.m)).sum(1).max()) if keep.numel() else 0
        total = pat.m - pat.n
        if have > total:
            raise ValueError(f"the masks already prune {have} of {pat.m} weights in some group; {pat} allows {total}")
        zs = sorted({have + math.ceil((total - have) * i / recompute) for i in range(1, recompute + 1)} - {have})
        return [(1.0 - (pat.m - z) / pat.m, z) for z in zs] or [(pat.sparsity, total)]
    if sparsity is None:
        raise ValueError("give the target sparsity (a fraction in [0, 1))")
    sparsity = check_sparsity(sparsity)
    current = 1.0 - float(keep.sum()) / layout.numel
    if sparsity < current - 0.5 / layout.numel:
        raise ValueError(f"target sparsity {sparsity} is below the current sparsity {current:.4f} of the masks; "
                         "masks never regrow")
    return [(s, None) for s in equal_fraction_schedule(sparsity, recompute, initial=min(current, sparsity))]


class FisherCache:
    """Keeps the Fisher inverse of a one-shot run's first step for the next runs from the same model state.

    A comparison of methods and targets from one dense model (``prune_oneshot(copy.deepcopy(dense), ...)`` for
    each) would otherwise collect the same gradients and build the same inverse every time. Pass one cache as
    ``prune_oneshot(..., fisher_cache=cache)`` to every run: the first step of a run reuses an entry when
    everything its Fisher depends on is equal:

    * the pruner's :meth:`~hf_mfac.pruning.Pruner.fisher_key` (oBERT and CAP share the block Fisher at equal
      block size, damp and dtype; static M-FAC has its own),
    * the targets (names, shapes) and current masks,
    * the model's parameters and buffers, bit for bit (a SHA-256 over all of them, computed per run),
    * the dataloader and ``loss_fn`` objects, ``num_grads``, ``fisher_batch_size``, ``per_sample``, device.

    Later steps of a run with ``recompute > 1`` start from pruned weights and always collect fresh gradients.
    The pruners only read the inverse, so one entry serves any number of runs. Each entry holds a whole Fisher
    inverse (``Pruner.fisher_bytes``) until it is evicted (``max_entries``, least recently used first) or
    :meth:`clear` is called. ``hits`` / ``misses`` count the lookups.
    """

    def __init__(self, max_entries: int = 1):
        self.max_entries = check_positive_int("max_entries", max_entries)
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def key(model: nn.Module, pruner: Pruner, layout: Layout, keep: torch.Tensor, dataloader, extra: tuple) -> tuple:
        h = hashlib.sha256()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
        h.update(keep.to(torch.uint8).cpu().numpy().tobytes())
        return (pruner.fisher_key(), tuple(layout.names), tuple(layout.shapes), id(dataloader), *extra, h.hexdigest())

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


@accepts_config
def prune_oneshot(model: nn.Module, dataloader=None, *, method: str | Pruner = "obert", sparsity: float | None = None,
                  num_grads: int | None = None, block_size: int | None = None, damp: float | None = None,
                  rel_damp: float | None = None, recompute: int = 1, scope: str = "global", pattern=None,
                  woodtaylor: bool = False,
                  include=None, exclude=DEFAULT_EXCLUDE, types: Sequence[type] = DEFAULT_TYPES,
                  targets: Mapping[str, torch.Tensor] | None = None, masks: Mapping[str, torch.Tensor] | None = None,
                  fisher_batch_size: int | None = None, per_sample: bool = False, loss_fn: Callable | None = None,
                  device=None, page_bytes: int | None = None, chunk_size: int | None = None,
                  fisher_cache: FisherCache | None = None, progress: bool = True) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` with ``method`` and return ``(masks, report)``.

    Args:
        model: any ``nn.Module``; the dataloader's batches must give ``model(**batch).loss`` (or pass
            ``loss_fn(model, batch) -> loss``).
        dataloader: batches for the gradients (Fisher methods); each batch (or each ``fisher_batch_size``
            slice of it, ``per_sample=True`` for single samples) gives one gradient. Re-iterated for each
            recomputation.
        method: "magnitude", "obert" (WoodFisher/oBERT), "mfac" (static M-FAC) or "cap", or a
            :class:`~hf_mfac.pruning.Pruner`; ``block_size``/``rel_damp``/``num_grads`` default to the method's.
        rel_damp, damp: the Fisher's damping, by default ``rel_damp`` (a fraction of the mean diagonal of each
            Fisher block: the masks do not depend on the scale of the loss); ``damp`` is an absolute λ instead
            (the papers' setting, ``F = damp*I + G^T G / m``). Give at most one.
        sparsity: fraction of the target weights to prune, exactly (rounded to whole units); implied by N:M.
        recompute: number of steps, each on fresh gradients, pruning the same fraction of what remains.
        scope: "global" (one threshold) or "layer" (uniform per target).
        pattern: None/"unstructured", "N:M" (e.g. "2:4"), or "G-block" (e.g. "4-block").
        woodtaylor: add the first-order term ([WoodFisher, §6.2]) for "obert"/"mfac".
        include, exclude, types: target selection (:func:`find_prunable`), or ``targets={name: param}``.
        masks: existing masks ``{name: bool}`` (True = kept); those weights stay pruned.
        device: where the Fisher and the solves live (default: the model's device); ``page_bytes`` pages the
            static M-FAC gradients through it.
        chunk_size: gradients handed to the Fisher at a time (default: up to 32 within 256 MiB of fp32
            gradients). Each chunk costs one pass over the block-Fisher accumulator, so a larger chunk makes the
            build faster for ``chunk_size * D * 4`` bytes on ``device``.
        fisher_cache: a :class:`FisherCache` shared by several runs from the same model state (a comparison of
            methods and sparsities): the first step reuses its Fisher inverse instead of recollecting the
            gradients when nothing it depends on changed (``report.fisher_reused``).
        config: a :class:`~hf_mfac.pruning.PruningConfig` holding the settings (method, sparsity, num_grads, ...);
            a keyword given to the call overrides its field, a None field leaves the default. Settings that do
            not apply to the method (``block_size``/``damp``/``num_grads`` for magnitude) are ignored with a note
            on logger "hf_mfac", so one config can serve a comparison of methods.

    Everything is validated (pattern vs shapes, block size vs pattern, sparsity, data size, frozen targets,
    memory) before any work. ``num_grads`` must be a positive integer (None: the method's default). A
    ``block_size`` larger than every target is lowered to the largest target's size (rounded up to the pattern's
    unit; logged on logger "hf_mfac"): each target is padded to whole blocks, so the larger block would give the
    same inverse at many times the memory and time.

    All or nothing: if anything raises, KeyboardInterrupt included (a failed or interrupted recomputation step,
    a non-finite result), the target weights are copied back exactly and the exception propagates. This costs
    one host (CPU) copy of the target weights for the duration of the call.

    Inside an initialised ``torch.distributed`` process group of more than one rank this is
    :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed` (call it on every rank; ``num_grads`` counts the
    gradients of all ranks, each rank takes its shard of the dataloader), so that every rank ends with the same
    model. To prune each rank's model on its own, give a group of one rank:
    ``prune_oneshot_distributed(..., group=torch.distributed.new_subgroups(group_size=1)[0])``.
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "dataloader")}
    t_start = time.perf_counter()
    if _several_ranks(method):  # every rank must end with the same model: prune over all of them
        if _DISTRIBUTED_ENTRY is None:
            raise RuntimeError("inside a process group of several ranks prune_oneshot runs "
                               "hf_mfac.pruning.prune_oneshot_distributed: import hf_mfac.pruning first")
        return _DISTRIBUTED_ENTRY(model, dataloader, **settings)
    recompute = check_positive_int("recompute", recompute)
    if num_grads is not None:
        num_grads = check_positive_int("num_grads", num_grads)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    fisher_batch_size = check_fisher_batch_size(fisher_batch_size, per_sample)
    pruner = _pruner_from(method, pattern=pattern, scope=scope, block_size=block_size, damp=damp, rel_damp=rel_damp,
                          woodtaylor=woodtaylor, device=device, page_bytes=page_bytes)
    if targets is None:
        targets = find_prunable(model, include=include, exclude=exclude, types=types)
    pruner = _fit_block_size(pruner, targets)
    if pruner.uses_fisher:
        check_trainable(targets)
    layout = Layout(targets, pad=pruner.pad)
    pruner.check(layout)
    dev = pruner.device or next(iter(targets.values())).device  # gradients and the Fisher's factorisations
    wdev = pruner.work_device(dev)  # weights, masks, scores (static M-FAC: where its m x D matrix lives)
    keep = _initial_keep(layout, masks, wdev)
    steps = _schedule(pruner, layout, keep, sparsity, recompute)
    num_grads = _check_grads(pruner, layout, dataloader, num_grads, fisher_batch_size, len(steps), wdev)
    report = _new_report(pruner, steps[-1][0], num_grads)
    gather = dict(num_grads=num_grads, fisher_batch_size=fisher_batch_size, per_sample=per_sample,
                  chunk_size=chunk_size, loss_fn=loss_fn, progress=progress)
    with restore_on_error(targets):  # all or nothing: the weights come back on any exception
        keep, loss_total = _run_steps(model, dataloader, pruner, layout, targets, keep, steps, dev, wdev,
                                      fisher_cache, report, gather)
        out_masks = _finish_report(report, layout, keep, targets, loss_total)
        report.time_total = time.perf_counter() - t_start
    return PruneResult(out_masks, report)


def _run_steps(model: nn.Module, dataloader, pruner: Pruner, layout: Layout, targets, keep: torch.Tensor, steps,
               dev, wdev, fisher_cache: FisherCache | None, report: PruneReport, gather: dict):
    """Run the pruning steps in place on ``targets``; return the final keep mask and the summed saliencies."""
    loss_total = None
    for i_step, (step_sparsity, zeros) in enumerate(steps):
        t0 = time.perf_counter()
        fisher = _StepFisher()
        if pruner.uses_fisher:
            cache = fisher_cache if i_step == 0 else None  # later steps start from pruned weights
            fisher = _step_fisher(model, dataloader, pruner, layout, keep, dev, wdev, cache, report, **gather)
        w = layout.flatten(targets, dtype=torch.float32, device=wdev)
        res = pruner.prune(layout, w, keep, sparsity=step_sparsity, zeros=zeros, finv=fisher.finv, grad=fisher.grad)
        if not bool(torch.isfinite(res.weights).all()):
            raise FloatingPointError(f"{pruner.name}: the pruned weights are not finite; increase damp")
        keep = res.keep
        _write_back(targets, layout, res.weights)
        loss = None
        if res.loss is not None:
            # The Fisher of gradients averaged over b samples is about 1/b of the per-sample Fisher that the
            # quadratic model needs (near a minimum the mean gradient is small): scale the saliencies by b.
            loss = res.loss * fisher.samples_per_grad
            loss_total = loss if loss_total is None else loss_total + loss
        _record_step(report, layout, keep, loss, fisher.seconds, time.perf_counter() - t0)
        del fisher
    return keep, loss_total


def _check_grads(pruner: Pruner, layout: Layout, dataloader, num_grads, fisher_batch_size, num_steps: int,
                 wdev) -> int | None:
    """The run's number of gradients per step (None for a method without a Fisher), checked against the data
    and the memory before any work."""
    if not pruner.uses_fisher:
        unused = [k for k, v in dict(num_grads=num_grads, fisher_batch_size=fisher_batch_size).items() if v is not None]
        if unused:  # one sweep may pass the same settings to every method
            logger.info("%s pruning uses no gradients: ignoring %s", pruner.name, ", ".join(unused))
        return None
    num_grads = num_grads or pruner.default_num_grads
    check_dataloader(dataloader, num_grads, fisher_batch_size, repeats=num_steps)
    _check_memory(pruner.fisher_bytes(layout.dim, num_grads), wdev, f"the {pruner.name} Fisher",
                  "lower num_grads or block_size, prune fewer layers, or use another device")
    return num_grads


def _new_report(pruner: Pruner, target_sparsity: float, num_grads: int | None) -> PruneReport:
    cfg = pruner.config()
    return PruneReport(method=cfg["method"], pattern=cfg["pattern"], scope=cfg["scope"],
                       target_sparsity=target_sparsity, num_grads=num_grads, block_size=cfg["block_size"],
                       damp=cfg["damp"], rel_damp=cfg["rel_damp"], woodtaylor=cfg["woodtaylor"])


@dataclass
class _StepFisher:
    """What one pruning step needs from its gradients: the Fisher inverse, the mean gradient (WoodTaylor), the
    seconds spent collecting them, and the mean number of samples behind each gradient."""
    finv: object = None
    grad: torch.Tensor | None = None
    seconds: float = 0.0
    samples_per_grad: float = 1.0


def _step_fisher(model: nn.Module, dataloader, pruner: Pruner, layout: Layout, keep: torch.Tensor, dev, wdev,
                 fisher_cache: FisherCache | None, report: PruneReport, *, num_grads: int, fisher_batch_size,
                 per_sample: bool, chunk_size, loss_fn, progress: bool) -> _StepFisher:
    """The Fisher inverse at the current weights: from ``fisher_cache`` when it holds this state's, else from
    ``num_grads`` fresh gradients (then stored in the cache)."""
    key = None
    if fisher_cache is not None and pruner.fisher_key() is not None:
        key = fisher_cache.key(model, pruner, layout, keep, dataloader, (
            id(loss_fn), num_grads, fisher_batch_size, per_sample, str(dev), str(wdev)))
        cached = fisher_cache.get(key)
        if cached is not None:
            report.fisher_reused = True
            finv, grad, samples_per_grad = cached
            return _StepFisher(finv, grad, 0.0, samples_per_grad)
    fisher = pruner.new_fisher(layout.dim, num_grads, dev, groups=layout.layer_index())
    stats = collect_grads(model, dataloader, num_grads, params=layout, keep=keep.to(dev), sink=fisher.add_grads,
                          fisher_batch_size=fisher_batch_size, per_sample=per_sample, chunk_size=chunk_size,
                          loss_fn=loss_fn, device=dev, progress=progress)
    out = _StepFisher(fisher.finish(), stats.mean.to(wdev), stats.seconds,
                      stats.num_samples / max(1, stats.num_grads))
    if key is not None:
        fisher_cache.put(key, (out.finv, out.grad, out.samples_per_grad))
    return out


def _write_back(targets: Mapping[str, torch.Tensor], layout: Layout, weights: torch.Tensor) -> None:
    with torch.no_grad():
        for name, v in layout.unflatten(weights).items():
            targets[name].copy_(v)


def _record_step(report: PruneReport, layout: Layout, keep: torch.Tensor, loss, t_grads: float, dt: float) -> None:
    report.time_grads += t_grads
    report.time_prune += dt - t_grads
    report.steps.append({"sparsity": 1.0 - float(keep.sum()) / layout.numel,
                         "loss_increase": None if loss is None else float(loss.sum()),
                         "time_grads": t_grads, "time_prune": dt - t_grads})


def _finish_report(report: PruneReport, layout: Layout, keep: torch.Tensor, targets, loss_total) -> dict:
    """Fill the report's totals and per-layer rows; return the masks ``{name: bool}`` on the targets' devices."""
    out_masks = {name: m.to(targets[name].device).clone() for name, m in layout.unflatten(keep).items()}
    report.sparsity = 1.0 - float(keep.sum()) / layout.numel
    report.loss_increase = None if loss_total is None else float(loss_total.sum())
    for i, name in enumerate(layout.names):
        n = layout.numels[i]
        report.layers[name] = {"numel": n, "sparsity": 1.0 - float(out_masks[name].sum()) / n,
                               "loss_increase": None if loss_total is None else float(loss_total[i])}
    return out_masks


def prune_sweep(model: nn.Module, dataloader=None, sparsities: Sequence[float] = (), *,
                save_fn: Callable[[float, nn.Module, dict, PruneReport], None] | None = None,
                **kwargs) -> list[PruneResult]:
    """Several targets in one run ([CAP, §3.2]): prune to each sparsity in increasing order, starting from
    the previous masks, and call ``save_fn(sparsity, model, masks, report)`` after each (e.g. to write a
    checkpoint per target). ``kwargs`` go to :func:`prune_oneshot` (``recompute`` applies per target).

    All or nothing, as :func:`prune_oneshot`: if a target fails (or the run is interrupted), the target weights
    are copied back to what they were before the call, unless ``save_fn`` already returned for some targets:
    then to what they were when the last ``save_fn`` returned, so the model agrees with the last checkpoint
    written (the exception carries a note naming the targets that were saved). Memory: one host copy of the
    target weights for the whole sweep."""
    if not sparsities:
        raise ValueError("give at least one target sparsity")
    targets = [check_sparsity(s) for s in sparsities]
    if any(b <= a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"sparsities must increase strictly (masks never regrow); got {list(sparsities)}")
    kwargs = _resolve_targets(model, kwargs)
    masks = kwargs.pop("masks", None)
    results, saved = [], []
    try:
        with restore_on_error(kwargs["targets"]) as commit:
            for s in targets:
                res = prune_oneshot(model, dataloader, sparsity=s, masks=masks, **kwargs)
                masks = res.masks
                results.append(res)
                if save_fn is not None:
                    save_fn(s, model, res.masks, res.report)
                    commit()
                    saved.append(s)
    except BaseException as e:
        if saved:
            e.add_note(f"prune_sweep: sparsities {saved} were saved by save_fn; the model is left as at the last "
                       f"({saved[-1]})")
        raise
    return results
