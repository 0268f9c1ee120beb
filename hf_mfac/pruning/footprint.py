"""The bytes per coordinate that a pruning call holds besides the Fisher and the gradient chunk,
phase by phase: one table, read by the memory estimate (:mod:`hf_mfac.pruning.memory`) and by the
Fisher placement plan (:mod:`hf_mfac.pruning.placement`), so that both count alike."""
from __future__ import annotations

from ..core.cap import order_dtype
from .pruners import MFACPruner

__all__ = ["coordinate_bytes", "grad_phase_bytes", "step_bytes"]

# bytes per padded coordinate D of the vectors alive in each phase (besides the Fisher and the
# chunk): gradient phase: the keep mask (bool, what the rows are masked with, used in place); the
# targets' gradients are streamed into the chunk one target at a time as the backward pass makes
# them (not held together)
_GRAD_PHASE = 1
# what the driver holds through every step: the flat weights (fp32) and the keep mask (bool)
_DRIVER = 4 + 1
# OBS step with the joint update (the default; unstructured): the scores are computed a page at a
# time while the selection reads them, the new weights written over the driver's flat weights, so
# the step holds the selected mask and a negated mask at either point
_OBS_STEP = _DRIVER + 1 + 1
# OBS step with the summed update (and the groups and N:M): the fp32 scores, the selected mask and
# a negated keep mask at the selection; the mask, ``z`` and the new weights at the update
_OBS_SUMMED_STEP = _DRIVER + 4 + 1 + 1
# CAP step: the valid and forced masks (bool) and a mask temporary, the elimination orders (1 byte
# a weight up to B = 256: :func:`~hf_mfac.core.cap.order_dtype`, counted apart), the cumulative
# losses (stored in fp32 in one process: ``_CAP_LOSSES``) and the merge's mask; then, the losses
# freed, the chosen mask and the new weights (as much)
_CAP_LOSSES = 4
_CAP_STEP = _DRIVER + 1 + 1 + 1 + _CAP_LOSSES + 1
# over several ranks CAP's merge reads fp64 losses of all blocks
_CAP_LOSSES_RANKS = 8
# the write-back of a step: the new weights (fp32) and the two masks, beside the restore copy
# (taken then) and, when a cache keeps it, the inverse
_UPDATE = 4 + 1 + 1
# static M-FAC, besides its m x D gradients: the scores (fp32), the masks (bool, one temporary),
# diag(F^{-1}) (fp32), the summed update's z and the product F^{-1} z with its scaled copy (fp32)
_MFAC_STEP = _DRIVER + 4 + 1 + 1 + 4 + 4 + 4 + 4
# WoodTaylor: the fp64 running sum of the gradients in the gradient phase; the mean gradient and
# F^{-1} grad (fp32) through the step
_WOODTAYLOR_GRADS = 8
_WOODTAYLOR_STEP = 4 + 4


def grad_phase_bytes(pruner) -> int:
    """Bytes per coordinate the gradient phase holds besides the Fisher and the gradient chunk, on
    each device that holds a part of the Fisher (the keep mask; WoodTaylor's fp64 running sum)."""
    return _GRAD_PHASE + (_WOODTAYLOR_GRADS if getattr(pruner, "woodtaylor", False) else 0)


def step_bytes(pruner, method: str | None = None) -> int:
    """Bytes per coordinate the pruning step holds on the work device besides the inverse, for
    ``pruner`` (or, with ``method``, as ``"obert"`` or ``"cap"`` at the pruner's block size): the
    flat weights and masks, oBERT's scores, CAP's elimination orders and losses (fp32 in one
    process, fp64 over several ranks), WoodTaylor's mean gradient and ``F^{-1} grad``."""
    method = method or pruner.name
    if isinstance(pruner, MFACPruner) and method == pruner.name:
        base = _MFAC_STEP
    elif method == "cap":
        over_ranks = getattr(pruner, "runs_over_ranks", False)
        losses = (_CAP_LOSSES_RANKS - _CAP_LOSSES) if over_ranks else 0
        return _CAP_STEP + losses + order_dtype(pruner.block_size or 1).itemsize
    elif getattr(pruner, "update", "joint") == "joint" and pruner.pattern.kind == "unstructured":
        # over several ranks the update is not written over the flat weights (no ``out=``)
        base = _OBS_STEP + (4 if getattr(pruner, "runs_over_ranks", False) else 0)
    else:
        base = _OBS_SUMMED_STEP
    return base + (_WOODTAYLOR_STEP if getattr(pruner, "woodtaylor", False) else 0)


def coordinate_bytes(pruner) -> tuple[int, int]:
    """``(gradient phase, step)`` bytes per coordinate of a block-Fisher run besides the Fisher and
    the chunk, as :func:`estimate_pruner` counts them: each part's device holds its share of the
    first, the work device the second, taken as the larger of oBERT's and CAP's step so that both
    plan alike (and can share one cached Fisher). The one table a placement plan should read."""
    return grad_phase_bytes(pruner), max(step_bytes(pruner, "obert"), step_bytes(pruner, "cap"))
