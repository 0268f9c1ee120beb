"""One-shot pruning with recomputations, and sparsity sweeps.

``prune_oneshot`` reaches the target in ``recompute`` steps that each prune the same fraction of the
remaining weights (seed 000 D.4.2, :func:`~hf_mfac.core.schedules.equal_fraction_schedule`), collecting
fresh gradients at the current (already pruned and updated) weights before each step: the quadratic
model behind OBS only holds near the point where the Fisher was taken (seed 001 §5.1 "recompute",
seed 000 D.2.6). For N:M the steps add zeros per group (e.g. 4:4 -> 3:4 -> 2:4).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..core._checks import check_positive_int, check_sparsity
from ..core.schedules import equal_fraction_schedule
from .grads import check_dataloader, collect_grads
from .pruners import Pruner, _check_memory, make_pruner
from .targets import DEFAULT_EXCLUDE, DEFAULT_TYPES, Layout, find_prunable

__all__ = ["prune_oneshot", "prune_sweep", "PruneReport", "PruneResult", "FisherCache", "apply_masks",
           "masks_from_zeros"]


@dataclass
class PruneReport:
    """What a one-shot run did. ``layers``: ``{name: {"numel", "sparsity", "loss_increase"}}``;
    ``loss_increase`` is the OBS estimate summed over steps (sum of the pruned units' saliencies
    ``rho = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q``, seed 001 eq. 10 / seed 004 eq. 5, or CAP's recorded greedy
    losses; None for magnitude). It is measured with the empirical Fisher of the gradients used: averaging
    each gradient over a Fisher mini-batch of b samples shrinks that Fisher by about b near a minimum, and
    the empirical Fisher underestimates the curvature of a well-fit model, so read it as a relative score
    (layers, methods, steps of one run), not as the loss change. Times in seconds; ``grad_share`` = share
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
        lines = ["| layer | weights | sparsity | est. loss increase |", "|---|---:|---:|---:|"]
        for name, r in self.layers.items():
            li = "-" if r["loss_increase"] is None else f"{r['loss_increase']:.4g}"
            lines.append(f"| {name} | {r['numel']} | {r['sparsity']:.4f} | {li} |")
        total = "-" if self.loss_increase is None else f"{self.loss_increase:.4g}"
        lines.append(f"\n{self.method} ({self.pattern}, {self.scope}): sparsity {self.sparsity:.4f} "
                     f"(target {self.target_sparsity:.4f}), est. loss increase {total}, {len(self.steps)} step(s), "
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


def prune_oneshot(model: nn.Module, dataloader=None, *, method: str | Pruner = "obert", sparsity: float | None = None,
                  num_grads: int | None = None, block_size: int | None = None, damp: float | None = None,
                  recompute: int = 1, scope: str = "global", pattern=None, woodtaylor: bool = False,
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
            :class:`~hf_mfac.pruning.Pruner`; ``block_size``/``damp``/``num_grads`` default to the method's.
        sparsity: fraction of the target weights to prune, exactly (rounded to whole units); implied by N:M.
        recompute: number of steps, each on fresh gradients, pruning the same fraction of what remains.
        scope: "global" (one threshold) or "layer" (uniform per target).
        pattern: None/"unstructured", "N:M" (e.g. "2:4"), or "G-block" (e.g. "4-block").
        woodtaylor: add the first-order term (seed 001 §6.2) for "obert"/"mfac".
        include, exclude, types: target selection (:func:`find_prunable`), or ``targets={name: param}``.
        masks: existing masks ``{name: bool}`` (True = kept); those weights stay pruned.
        device: where the Fisher and the solves live (default: the model's device); ``page_bytes`` pages the
            static M-FAC gradients through it.
        fisher_cache: a :class:`FisherCache` shared by several runs from the same model state (a comparison of
            methods and sparsities): the first step reuses its Fisher inverse instead of recollecting the
            gradients when nothing it depends on changed (``report.fisher_reused``).

    Everything is validated (pattern vs shapes, block size vs pattern, sparsity, data size, memory) before
    any weight is touched; gradient collection fails before the first update too.
    """
    t_start = time.perf_counter()
    recompute = check_positive_int("recompute", recompute)
    if isinstance(method, Pruner):
        given = {k: v for k, v in dict(pattern=pattern, block_size=block_size, damp=damp, woodtaylor=woodtaylor or None,
                                       page_bytes=page_bytes, scope=None if scope == "global" else scope).items()
                 if v is not None}
        if given:
            raise ValueError(f"{sorted(given)} are set on the Pruner instance; do not pass them to prune_oneshot")
        pruner = method
    else:
        pruner = make_pruner(method, pattern=pattern, scope=scope, block_size=block_size, damp=damp,
                             woodtaylor=woodtaylor, device=device, page_bytes=page_bytes)
    if targets is None:
        targets = find_prunable(model, include=include, exclude=exclude, types=types)
    layout = Layout(targets, pad=pruner.pad)
    pruner.check(layout)
    dev = pruner.device or next(iter(targets.values())).device  # gradients and the Fisher's factorisations
    wdev = pruner.work_device(dev)  # weights, masks, scores (static M-FAC: where its m x D matrix lives)
    keep = _initial_keep(layout, masks, wdev)
    steps = _schedule(pruner, layout, keep, sparsity, recompute)
    if pruner.uses_fisher:
        num_grads = check_positive_int("num_grads", num_grads or pruner.default_num_grads)
        check_dataloader(dataloader, num_grads, 1 if per_sample else fisher_batch_size, repeats=len(steps))
        _check_memory(pruner.fisher_bytes(layout.dim, num_grads), wdev, f"the {pruner.name} Fisher",
                      "lower num_grads or block_size, prune fewer layers, or use another device")
    else:
        num_grads = None
    cfg = pruner.config()
    report = PruneReport(method=cfg["method"], pattern=cfg["pattern"], scope=cfg["scope"],
                         target_sparsity=steps[-1][0], num_grads=num_grads, block_size=cfg["block_size"],
                         damp=cfg["damp"], woodtaylor=cfg["woodtaylor"])
    loss_total = None
    for i_step, (step_sparsity, zeros) in enumerate(steps):
        t0 = time.perf_counter()
        finv, grad, t_grads = None, None, 0.0
        if pruner.uses_fisher:
            cache_key = cached = None
            if fisher_cache is not None and i_step == 0 and pruner.fisher_key() is not None:
                cache_key = fisher_cache.key(model, pruner, layout, keep, dataloader, (
                    id(loss_fn), num_grads, fisher_batch_size, per_sample, str(dev), str(wdev)))
                cached = fisher_cache.get(cache_key)
            if cached is not None:
                finv, grad = cached
                report.fisher_reused = True
            else:
                fisher = pruner.new_fisher(layout.dim, num_grads, dev)
                stats = collect_grads(model, dataloader, num_grads, params=layout, keep=keep.to(dev),
                                      sink=fisher.add_grads, fisher_batch_size=fisher_batch_size,
                                      per_sample=per_sample, chunk_size=chunk_size, loss_fn=loss_fn, device=dev,
                                      progress=progress)
                t_grads = stats.seconds
                grad = stats.mean.to(wdev)
                finv = fisher.finish()
                if cache_key is not None:
                    fisher_cache.put(cache_key, (finv, grad))
        w = layout.flatten(targets, dtype=torch.float32, device=wdev)
        res = pruner.prune(layout, w, keep, sparsity=step_sparsity, zeros=zeros, finv=finv, grad=grad)
        if not bool(torch.isfinite(res.weights).all()):
            raise FloatingPointError(f"{pruner.name}: the pruned weights are not finite; increase damp")
        keep = res.keep
        with torch.no_grad():
            for name, v in layout.unflatten(res.weights).items():
                targets[name].copy_(v)
        if res.loss is not None:
            loss_total = res.loss if loss_total is None else loss_total + res.loss
        dt = time.perf_counter() - t0
        report.time_grads += t_grads
        report.time_prune += dt - t_grads
        report.steps.append({"sparsity": 1.0 - float(keep.sum()) / layout.numel,
                             "loss_increase": None if res.loss is None else float(res.loss.sum()),
                             "time_grads": t_grads, "time_prune": dt - t_grads})
        del finv
    out_masks = {name: m.to(targets[name].device).clone() for name, m in layout.unflatten(keep).items()}
    report.sparsity = 1.0 - float(keep.sum()) / layout.numel
    report.loss_increase = None if loss_total is None else float(loss_total.sum())
    for i, name in enumerate(layout.names):
        n = layout.numels[i]
        report.layers[name] = {"numel": n, "sparsity": 1.0 - float(out_masks[name].sum()) / n,
                               "loss_increase": None if loss_total is None else float(loss_total[i])}
    report.time_total = time.perf_counter() - t_start
    return PruneResult(out_masks, report)


def prune_sweep(model: nn.Module, dataloader=None, sparsities: Sequence[float] = (), *,
                save_fn: Callable[[float, nn.Module, dict, PruneReport], None] | None = None,
                **kwargs) -> list[PruneResult]:
    """Several targets in one run (seed 004 §3.2): prune to each sparsity in increasing order, starting from
    the previous masks, and call ``save_fn(sparsity, model, masks, report)`` after each (e.g. to write a
    checkpoint per target). ``kwargs`` go to :func:`prune_oneshot` (``recompute`` applies per target)."""
    if not sparsities:
        raise ValueError("give at least one target sparsity")
    targets = [check_sparsity(s) for s in sparsities]
    if any(b <= a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"sparsities must increase strictly (masks never regrow); got {list(sparsities)}")
    masks = kwargs.pop("masks", None)
    results = []
    for s in targets:
        res = prune_oneshot(model, dataloader, sparsity=s, masks=masks, **kwargs)
        masks = res.masks
        results.append(res)
        if save_fn is not None:
            save_fn(s, model, res.masks, res.report)
    return results
