"""Selecting which weights to prune from scores: global or per-layer thresholds, N:M and group
masks.

Convention: a *mask* is a bool tensor shaped like its weight with ``True`` = kept, ``False`` =
pruned. Selections are exact: ties are broken by position, so exactly the requested number is
pruned.
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
    """Number of units of ``unit`` weights to prune so that ``sparsity`` of ``numel`` weights is
    reached (rounded to the nearest unit)."""
    check_sparsity(sparsity)
    return int(round(sparsity * numel / unit))


def _check_no_nan(flat: torch.Tensor) -> None:
    # a sum is one cheap pass; only a NaN sum (a NaN inside, or +inf and -inf together) is checked
    # element-wise
    if flat.numel() and bool(torch.isnan(flat.sum())) and bool(torch.isnan(flat).any()):
        raise FloatingPointError("pruning scores contain NaN; check the gradients and damp")


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor like ``scores`` with the ``k`` lowest entries True (ties: lower position first).
    NaN scores raise. Forced entries can be passed as ``-inf``.

    No sort: the k-th smallest value ``t`` comes from one selection (``torch.kthvalue``, expected
    O(n)), every entry below ``t`` is taken, and the remaining ``k - #{s < t}`` come from the
    entries equal to ``t`` in position order. The result is the one a stable sort gives (its first k
    indices), at the cost of a selection and two comparisons instead of an O(n log n) sort and its
    (n,) index tensor.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    _check_no_nan(flat)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    if k == 0 or k == n:
        return torch.full_like(flat, k == n, dtype=torch.bool).view_as(scores)
    if flat.dtype in (torch.float16, torch.bfloat16) and flat.device.type == "cpu":
        flat = flat.float()  # exact; CPU selection kernels are fastest (and complete) in fp32/fp64
    # a Python number: comparisons with it run twice as fast
    t = torch.kthvalue(flat, k).values.item()
    out = flat <= t
    # no ties at t past the k-th (always so for distinct scores): one pass
    if int(out.count_nonzero()) == k:
        return out.view_as(scores)
    out = flat < t
    rest = k - int(out.count_nonzero())  # >= 1: t itself is among the k smallest
    ties = (flat == t).nonzero().view(-1)  # in position order
    out[ties[:rest]] = True
    return out.view_as(scores)


def threshold_masks(scores: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], sparsity: float, *,
                    scope: str = "global", unit: int = 1, prune_mask_only: bool = False):
    """Prune the lowest-scoring ``sparsity`` fraction of weights, across all tensors
    (``scope="global"``) or in each tensor separately (``scope="layer"``, uniform sparsity).

    ``scores``: per-tensor scores, one per unit of ``unit`` weights (so a tensor of ``n`` scores
    stands for ``n * unit`` weights). Already-pruned units should carry ``-inf`` so they stay
    pruned. Returns the same structure of bool tensors, True = kept (or True = pruned with
    ``prune_mask_only``).
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
        # one common dtype (fp64 only where the tensors differ): the comparisons are exact either
        # way
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
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
        raise ValueError(f"N:M={n}:{m} is impossible for a tensor of shape {shape}: the last "
                         "dimension must be "
                         f"divisible by {m}")
    return math.prod(shape) // m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive weights along the last
    dimension."""
    nm_groups(scores.shape, n, m)
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.view(scores.shape)


def group_mask(scores: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Mask over ``scores.numel() * group`` weights pruning the ``k`` lowest-scoring groups of
    ``group`` consecutive weights; True = kept."""
    pruned = lowest_k_mask(scores.reshape(-1), k)
    return ~pruned.repeat_interleave(group)


def sparsity(masks) -> float:
    """Fraction of pruned entries over a mask, a list or a dict of masks."""
    if isinstance(masks, Mapping):
        ts = list(masks.values())
    else:
        ts = masks if isinstance(masks, (list, tuple)) else [masks]
    total = sum(t.numel() for t in ts)
    return float(sum((~t.bool()).sum().item() for t in ts)) / max(total, 1)
