"""The memory a :func:`~hf_mfac.pruning.prune_oneshot` call will take, told before the work.

:func:`estimate_memory` adds up what one call holds beyond the model itself, on each device, at its
peak: the Fisher (the block Fisher's accumulator, fp32 or fp64 by the error bound, over which its
packed fp32 inverse is then written; static M-FAC's m x D gradients), the gradient chunk and the
vectors of the gradient phase, the per-target work of the pruning step (weights, masks, scores;
CAP's elimination orders and losses), and the host copy of the targets kept to restore them on
error. It reads only the targets' shapes, so the model may be built on the meta device (nothing
allocated): a BERT-large config is estimated in milliseconds. The model's own activations and
gradients outside the targets are not counted (they depend on the batch).

The constants per coordinate below are the tensors of the call, counted in the code; how the
estimate compares with measured peaks is in benchmarks/RESULTS.md (benchmarks/bench_memory.py).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..core._checks import free_bytes
from .config import oneshot_config
from .grads import default_chunk_size
from .placement import plan_fisher_placement  # noqa: F401 - its former home
from .footprint import (  # noqa: F401 - the per-coordinate table, read here and by placement
    _CAP_LOSSES,
    _CAP_LOSSES_RANKS,
    _CAP_STEP,
    _DRIVER,
    _GRAD_PHASE,
    _MFAC_STEP,
    _OBS_STEP,
    _OBS_SUMMED_STEP,
    _UPDATE,
    _WOODTAYLOR_GRADS,
    _WOODTAYLOR_STEP,
    coordinate_bytes,
    grad_phase_bytes,
    step_bytes,
)
from .pruners import MFACPruner
from .targets import DEFAULT_TYPES, Layout

__all__ = [
    "estimate_memory",
    "estimate_pruner",
    "MemoryEstimate",
    "plan_fisher_placement",
    "check_estimate",
    "coordinate_bytes",
    "step_bytes",
    "grad_phase_bytes",
]



def human(nbytes: float) -> str:
    """``nbytes`` in GiB (from 0.25 GiB) or MiB, for messages."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 1 << 28 else f"{nbytes / 2**20:.1f} MiB"


class MemoryEstimate(dict):
    """``{device: bytes}`` (the peak on each device) with ``parts``: ``{device: {what: bytes}}``,
    the terms of each peak, and ``settings``, the resolved settings they were computed for."""

    def __init__(self, peaks: Mapping[str, int], parts: Mapping[str, dict], settings: dict):
        super().__init__(peaks)
        self.parts = dict(parts)
        self.settings = dict(settings)

    def describe(self) -> str:
        """One line per device: its peak and the terms."""
        rows = []
        for dev, total in self.items():
            terms = ", ".join(f"{k} {human(v)}" for k, v in self.parts[dev].items() if v)
            rows.append(f"{dev}: {human(total)} ({terms})")
        return "; ".join(rows)


def estimate_memory(
    model: nn.Module,
    method="obert",
    *,
    targets: Mapping[str, torch.Tensor] | None = None,
    types=DEFAULT_TYPES,
    device=None,
    chunk_size: int | None = None,
    page_bytes: int | None = None,
    placement=None,
    **settings,
) -> MemoryEstimate:
    """The peak memory of ``prune_oneshot(model, ..., method=method, **settings)`` per device, in
    bytes.

    ``settings`` are :func:`~hf_mfac.pruning.prune_oneshot`'s (``sparsity``, ``num_grads``,
    ``block_size``, ``pattern``, ``include``/``exclude``, ...) and the pruner's ``fisher_dtype``;
    ``targets``, ``types``, ``device``, ``chunk_size`` and ``page_bytes`` as there; ``placement``
    as in :func:`estimate_pruner` (the blocks of a block Fisher over several devices). Works on a
    model on the meta device. Returns a :class:`MemoryEstimate` (a dict ``{device: bytes}`` with
    the terms in ``.parts``). The peak of the block Fisher methods is the larger of the gradient
    phase (accumulator + chunk + vectors) and the step (packed inverse + the step's vectors); the
    host copy that restores the targets on error is taken only when the first step writes its
    result (held through the later steps with ``recompute`` > 1); static M-FAC holds its m x D
    gradients throughout.

    ``device`` may also name several devices, ``{device: bytes}`` or ``"auto"`` (as
    ``prune_oneshot``: the devices must exist here, their capacities are what they have available);
    the estimate is then that of the placement ``prune_oneshot`` would plan. For a what-if over
    devices this machine lacks, give ``placement`` instead."""
    settings.setdefault("sparsity", 0.5)
    spec = None
    if isinstance(device, (list, tuple, Mapping)) or (
        isinstance(device, str) and device.strip().lower() == "auto"
    ):
        from .placement import parse_fisher_device

        spec, device = parse_fisher_device(device), None
        if not isinstance(spec, list):
            spec, device = None, spec
    runtime = {"device": device, "page_bytes": page_bytes}
    if settings.get("fisher_dtype") is not None:
        runtime["fisher_dtype"] = settings.pop("fisher_dtype")
    settings.pop("fisher_dtype", None)
    config = oneshot_config(None, method=method, **settings)
    pruner = config.pruner(**runtime)
    if targets is None:
        targets = config.find_targets(model, types)
    if not targets:
        raise ValueError("the settings select no pruning target in this model")
    B = pruner.block_size
    if (
        pruner.uses_fisher and B and pruner.pad == B
    ):  # as prune_oneshot: blocks no larger than the largest target
        g = pruner.pattern.group
        pruner.block_size = min(B, -(-max(t.numel() for t in targets.values()) // g) * g)
    m = (config.num_grads or pruner.default_num_grads) if pruner.uses_fisher else 0
    work_device = None
    if placement is None and spec is not None:  # the plan prune_oneshot would make
        from .placement import place_fisher

        plan = place_fisher(pruner, Layout(targets, pad=pruner.pad), targets, spec, m,
                            chunk_size=chunk_size)
        if plan is not None and len(plan.plan) == 1:
            pruner.device = torch.device(plan.plan[0].device)
        elif plan is not None:
            placement, work_device = plan.plan, plan.work_device
    return estimate_pruner(pruner, targets, m, chunk_size=chunk_size, placement=placement,
                           work_device=work_device, steps=config.recompute or 1)


def estimate_pruner(
    pruner,
    targets: Mapping[str, torch.Tensor],
    num_grads: int,
    *,
    chunk_size: int | None = None,
    placement=None,
    work_device=None,
    steps: int = 1,
) -> MemoryEstimate:
    """:func:`estimate_memory` for a resolved ``pruner`` (its block size already fitted to the
    targets), its ``targets`` and ``num_grads`` gradients per step: what
    :func:`~hf_mfac.pruning.prune_oneshot` checks.

    ``placement``: where a block Fisher's blocks live, ``[(device, first_block, stop_block)]``
    (contiguous ranges; a device may appear more than once): each range's accumulator and inverse,
    its columns of the gradient chunk and its share of the gradient phase's vectors count on its
    device; the step's vectors on the work device (``work_device``, default the pruner's), the
    restore copy on the host. Default: all blocks on the pruner's device.

    Each device's peak is the largest of its phases: the gradients (the Fisher's accumulator, the
    chunk, the gradient phase's vectors), the step (the inverse, written over the accumulator, and
    the step's vectors) and the write-back of the step's result (the new weights and masks, the
    inverse when a cache keeps it, and the host copy that restores the targets on error, taken
    then). With ``steps`` > 1 (recomputations) the restore copy is held through the later steps'
    phases too."""
    layout = Layout(targets, pad=pruner.pad)
    D, B, m = layout.dim, pruner.block_size, num_grads
    first = next(iter(targets.values()))
    dev = pruner.device or first.device
    dev = torch.device("cpu") if dev.type == "meta" else dev
    wdev = pruner.work_device(dev) if work_device is None else torch.device(work_device)
    host = torch.device("cpu")
    grad_phase: dict[str, dict] = {}
    step_phase: dict[str, dict] = {}
    update_phase: dict[str, dict] = {}

    def add(phase, where, what: str, nbytes: int) -> None:
        terms = phase.setdefault(str(torch.device(where)), {})
        terms[what] = terms.get(what, 0) + int(nbytes)

    restore = sum(t.numel() * t.element_size() for t in targets.values())
    for phase in (grad_phase, step_phase) if steps > 1 else ():
        add(phase, host, "restore copy", restore)
    add(update_phase, host, "restore copy", restore)
    add(update_phase, wdev, "step result", D * _UPDATE)
    phases = (grad_phase, step_phase, update_phase)
    if not pruner.uses_fisher:
        add(step_phase, wdev, "step", D * (4 + 8 + 1 + 1 + 4))
        return _peaks(phases, _settings(pruner, D, 0, None))
    fisher = pruner.fisher_bytes(D, m)
    woodtaylor = bool(getattr(pruner, "woodtaylor", False))
    wt_grads = _WOODTAYLOR_GRADS if woodtaylor else 0
    wt = _WOODTAYLOR_STEP if woodtaylor else 0
    if isinstance(pruner, MFACPruner):
        k = chunk_size or default_chunk_size(D, m, device=dev)
        for phase in phases:
            add(phase, pruner.grads_device or host, "gradients G", fisher)
        add(grad_phase, dev, "gradient chunk", k * D * 4)
        add(grad_phase, dev, "gradient phase", D * (_GRAD_PHASE + wt_grads))
        add(step_phase, wdev, "step", D * (_MFAC_STEP + wt))
        return _peaks(phases, _settings(pruner, D, m, k))
    k = chunk_size or default_chunk_size(D, m, fisher_bytes=fisher, device=dev)
    nb = -(-D // B)
    for where, lo, hi in placement or [(dev, 0, nb)]:
        width = min(D, hi * B) - lo * B
        if width <= 0:
            continue
        acc = pruner.fisher_bytes(width, m)
        inv = pruner.inverse_bytes(width, m)
        add(grad_phase, where, "fisher accumulator", acc)
        add(grad_phase, where, "gradient chunk", k * width * 4)
        add(grad_phase, where, "gradient phase", width * grad_phase_bytes(pruner))
        add(step_phase, where, "fisher inverse", inv)
        add(update_phase, where, "fisher inverse", inv)
    add(step_phase, wdev, "step", D * step_bytes(pruner))
    return _peaks(phases, _settings(pruner, D, m, k))


def _peaks(phases, settings: dict) -> MemoryEstimate:
    """Each device's peak: the largest sum of its terms over the ``phases`` (a device missing from
    a phase holds nothing then); ``parts`` gives the terms of the largest (the first of equals)."""
    peaks, out_parts = {}, {}
    for dev in dict.fromkeys(d for phase in phases for d in phase):
        terms = max((phase.get(dev, {}) for phase in phases), key=lambda t: sum(t.values()))
        peaks[dev], out_parts[dev] = sum(terms.values()), dict(terms)
    return MemoryEstimate(peaks, out_parts, settings)


def _settings(pruner, D: int, m: int, k: int | None) -> dict:
    return {
        "method": pruner.name,
        "dim": D,
        "block_size": pruner.block_size if pruner.uses_fisher else None,
        "num_grads": m or None,
        "chunk_size": k,
        "fisher_dtype": str(pruner.fisher_dtype).replace("torch.", ""),
        "pattern": str(pruner.pattern),
    }


def check_estimate(
    est: MemoryEstimate,
    pruner,
    targets: Mapping[str, torch.Tensor],
    num_grads: int,
    *,
    available: Mapping[str, int | None] | None = None,
) -> None:
    """Refuse, before any work, a call whose estimated peak exceeds what a device has available.

    ``available``: ``{device: bytes}`` (default: :func:`~hf_mfac.core._checks.free_bytes` of each
    device; None where it cannot be told, which passes). The ``MemoryError`` names the need, what is
    available, and the settings that would fit (a smaller ``block_size``, fewer ``num_grads`` for
    static M-FAC) with their peaks."""
    short = []
    for dev, need in est.items():
        have = available.get(dev) if available is not None else free_bytes(torch.device(dev))
        if have is not None and need > have:
            short.append((dev, need, have))
    if not short:
        return
    dev, need, have = short[0]
    fits = []
    for option in _smaller_settings(pruner, num_grads):
        alt_pruner, m = option
        alt = estimate_pruner(alt_pruner, targets, m)
        if all(
            alt.get(d, 0)
            <= (
                available.get(d)
                if available is not None
                else free_bytes(torch.device(d)) or float("inf")
            )
            for d, _, _ in short
        ):
            label = (
                f"block_size={alt_pruner.block_size}"
                if alt_pruner.block_size != pruner.block_size
                else f"num_grads={m}"
            )
            fits.append(f"{label} ({human(alt[dev])})")
    advice = (
        ("settings that fit: " + ", ".join(fits[:3]))
        if fits
        else "no smaller block size fits either"
    )
    raise MemoryError(
        f"{pruner.name} pruning needs an estimated {human(need)} on {dev} "
        f"({est.describe()}), but only {human(have)} is available there; {advice}; or prune fewer "
        "layers (include=/exclude=), or put the Fisher on another device or spread it over "
        "several (device=[...] or device='auto')"
    )


def _smaller_settings(pruner, num_grads: int):
    """(pruner, num_grads) variants that need less memory: halved block sizes (multiples of the
    pattern's group), or halved numbers of gradients for static M-FAC (its memory is m x D)."""
    import copy

    if isinstance(pruner, MFACPruner):
        m = num_grads // 2
        while m >= 8:
            yield pruner, m
            m //= 2
        return
    B, g = pruner.block_size, pruner.pattern.group
    b = B // 2
    while b >= max(g, 4):
        if b % g == 0:
            alt = copy.copy(pruner)
            alt.block_size = b
            yield alt, num_grads
        b //= 2
