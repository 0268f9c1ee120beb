"""Selecting which weights to prune from scores: global or per-layer thresholds, N:M and group masks.

Convention: a *mask* is a bool tensor shaped like its weight with ``True`` = kept, ``False`` = pruned.
Selections are exact: ties are broken by position, so exactly the requested number is pruned.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ._checks import check_positive_int, check_sparsity

__all__ = [
    "num_to_prune",
    "lowest_k_mask",
    "threshold_masks",
    "nm_groups",
    "nm_mask",
    "group_mask",
    "sparsity",
]


def num_to_prune(numel: int, sparsity: float, unit: int = 1) -> int:
    """Number of units of ``unit`` weights to prune so that ``sparsity`` of ``numel`` weights is reached
    (rounded to the nearest unit)."""
    check_sparsity(sparsity)
    return int(round(sparsity * numel / unit))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor like ``scores`` with the ``k`` lowest entries True (ties: lower position first).
    NaN scores raise. Forced entries can be passed as ``-inf``."""
    flat = scores.reshape(-1)
    if bool(torch.isnan(flat).any()):
        raise FloatingPointError("pruning scores contain NaN; check the gradients and damp")
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot select {k} of {flat.numel()} entries")
    order = torch.sort(flat, stable=True).indices
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[order[:k]] = True
    return out.view_as(scores)


def threshold_masks(scores: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], sparsity: float, *,
                    scope: str = "global", unit: int = 1, prune_mask_only: bool = False):
    """Prune the lowest-scoring ``sparsity`` fraction of weights, across all tensors (``scope="global"``)
    or in each tensor separately (``scope="layer"``, uniform sparsity).

    ``scores``: per-tensor scores, one per unit of ``unit`` weights (so a tensor of ``n`` scores stands for
    ``n * unit`` weights). Already-pruned units should carry ``-inf`` so they stay pruned. Returns
    the same structure of bool tensors, True = kept (or True = pruned with ``prune_mask_only``).
    """
    check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer'; got {scope!r}")
    named = isinstance(scores, Mapping)
    keys = list(scores.keys()) if named else list(range(len(scores)))
    tensors = [scores[k] for k in keys]
    if not tensors:
        raise ValueError("no scores given: nothing to prune")
    if scope == "layer":
        pruned = [lowest_k_mask(t, num_to_prune(t.numel() * unit, sparsity, unit)) for t in tensors]
    else:
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        sel = lowest_k_mask(flat, num_to_prune(flat.numel() * unit, sparsity, unit))
        pruned = list(torch.split(sel, [t.numel() for t in tensors]))
        pruned = [p.view_as(t) for p, t in zip(pruned, tensors)]
    out = [p if prune_mask_only else ~p for p in pruned]
    return dict(zip(keys, out)) if named else out


def nm_groups(numel_or_shape, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive weights (along the last dimension) for an N:M pattern,
    checking the pattern is possible for the shape."""
    n, m = check_positive_int("n", n), check_positive_int("m", m)
    if n >= m:
        raise ValueError(f"N:M pattern needs N < M; got {n}:{m}")
    shape = tuple(numel_or_shape) if not isinstance(numel_or_shape, int) else (numel_or_shape,)
    if shape[-1] % m:
        raise ValueError(f"N:M={n}:{m} is impossible for a tensor of shape {shape}: the last dimension must be divisible by {m}")
    return math.prod(shape) // m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive weights along the last dimension."""
    nm_groups(scores.shape, n, m)
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.view(scores.shape)


def group_mask(scores: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Mask over ``scores.numel() * group`` weights pruning the ``k`` lowest-scoring groups of ``group``
    consecutive weights; True = kept."""
    pruned = lowest_k_mask(scores.reshape(-1), k)
    return ~pruned.repeat_interleave(group)


def sparsity(masks) -> float:
    """Fraction of pruned entries over a mask, a list or a dict of masks."""
    ts = list(masks.values()) if isinstance(masks, Mapping) else (masks if isinstance(masks, (list, tuple)) else [masks])
    total = sum(t.numel() for t in ts)
    return float(sum((~t.bool()).sum().item() for t in ts)) / max(total, 1)
