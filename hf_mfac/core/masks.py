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
    "lowest_k_masks",
    "ComputedScores",
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


class ComputedScores:
    """Scores that are computed a page at a time, never held whole: ``fn(start, stop)`` gives the
    scores [start, stop) (a 1-D tensor of ``dtype`` on ``device``; the same values whatever the
    page boundaries, e.g. an elementwise formula). :func:`lowest_k_masks` (and so
    :func:`threshold_masks`) read such scores page by page in its radix selection (three passes),
    where a tensor of scores would cost ``numel`` values of memory; slicing (``s[a:b]``) gives the
    scores of a range."""

    def __init__(self, n: int, fn, dtype: torch.dtype, device, offset: int = 0):
        self.n, self.fn, self.dtype, self.offset = int(n), fn, dtype, int(offset)
        self.device = torch.device(device)

    def numel(self) -> int:
        return self.n

    def page(self, s: int, e: int) -> torch.Tensor:
        return self.fn(self.offset + s, self.offset + e)

    def __getitem__(self, sl: slice) -> "ComputedScores":
        a, b, step = sl.indices(self.n)
        if step != 1:
            raise ValueError("computed scores take contiguous slices only")
        return ComputedScores(max(0, b - a), self.fn, self.dtype, self.device, self.offset + a)

    def materialize(self) -> torch.Tensor:
        if not self.n:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        return torch.cat([self.page(s, min(self.n, s + _RADIX_PAGE))
                          for s in range(0, self.n, _RADIX_PAGE)])


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor like ``scores`` with the ``k`` lowest entries True (ties: lower position first).
    NaN scores raise. Forced entries can be passed as ``-inf``.

    No sort: the k-th smallest value ``t`` comes from one selection, every entry below ``t`` is
    taken, and the remaining ``k - #{s < t}`` come from the entries equal to ``t`` in position
    order. The result is the one a stable sort gives (its first k indices), at the cost of a
    selection and two comparisons instead of an O(n log n) sort and its (n,) index tensor. Below
    :data:`RADIX_MIN` entries the selection is ``torch.kthvalue`` (expected O(n), but it copies the
    scores and allocates an int64 index of them); from there on it is :func:`lowest_k_masks`'s
    paged radix selection, whose memory is one page besides the result.
    """
    return lowest_k_masks([scores], k)[0]


# from this many entries on, the selection is a paged radix selection (no copy of the scores, no
# int64 index: torch.kthvalue's 12 bytes an fp32 score would be 1 GiB at BERT-base's 85M weights)
RADIX_MIN = 1 << 22
# entries per page of the radix passes
_RADIX_PAGE = 1 << 20


def lowest_k_masks(
    scores: Sequence[torch.Tensor], k: int, out: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """:func:`lowest_k_mask` over several tensors taken as one, in their order (ties: the earlier
    tensor, then the lower position, first): the same masks as ``lowest_k_mask(torch.cat(...))``
    split back, without the concatenation. ``out``: bool tensors shaped like the scores to write
    the masks into (e.g. views of one flat mask), else new ones. Tensors of different dtypes are
    compared in their promoted dtype (exact). From :data:`RADIX_MIN` entries in all, the k-th
    smallest is found by a radix selection over the scores' order-preserving integer keys, 16 bits
    per pass (two passes for fp32, four for fp64), reading the scores in pages of
    :data:`_RADIX_PAGE` entries: the memory is the masks plus a page."""
    tensors = [t if isinstance(t, ComputedScores) else t.reshape(-1) for t in scores]
    n = sum(t.numel() for t in tensors)
    if n < RADIX_MIN:  # computed scores are small here: held whole
        tensors = [t.materialize() if isinstance(t, ComputedScores) else t for t in tensors]
    for t in tensors:
        if not isinstance(t, ComputedScores):  # (computed ones: checked per page below)
            _check_no_nan(t)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} entries")
    out_given = out
    if out is None:
        out = [torch.empty((t.numel(),) if isinstance(t, ComputedScores) else t.shape,
                           dtype=torch.bool, device=t.device) for t in scores]
    flat_out = [o.view(-1) for o in out]
    if k == 0 or k == n:
        for o in flat_out:
            o.fill_(k == n)
        return list(out)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if n < RADIX_MIN:
        flat = torch.cat([t.to(dtype) for t in tensors]) if len(tensors) > 1 else tensors[0]
        if flat.dtype in (torch.float16, torch.bfloat16) and flat.device.type == "cpu":
            flat = flat.float()  # exact; the CPU selection kernels are fastest in fp32/64
        sel = _lowest_k_kthvalue(flat, k)
        if out_given is None and len(tensors) == 1:
            return [sel if isinstance(scores[0], ComputedScores) else sel.view_as(scores[0])]
        for o, part in zip(flat_out, torch.split(sel, [t.numel() for t in tensors])):
            o.copy_(part)
        return list(out)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # exact
    if not dtype.is_floating_point:
        dtype = torch.float64 if dtype == torch.int64 else torch.float32
    nbits = 64 if dtype == torch.float64 else 32

    def pages():
        for t in tensors:
            for s in range(0, t.numel(), _RADIX_PAGE):
                yield t, s, min(t.numel(), s + _RADIX_PAGE)

    def keys(t, s, e):
        if isinstance(t, ComputedScores):
            page = t.page(s, e)
            _check_no_nan(page)
            return _order_keys(page.to(dtype))
        return _order_keys(t[s:e].to(dtype))

    # the k-th smallest key, 16 bits at a time from the top: after each pass ``hi`` holds its
    # leading bits (key >> shift) and ``rank`` its rank among the keys that share them
    hi, rank = None, k
    for shift in range(nbits - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=tensors[0].device)
        for t, s, e in pages():
            key = keys(t, s, e)
            if hi is not None:
                key = key[(key >> (shift + 16)) == hi]
            top = key >> shift
            digit = top + (1 << 15) if hi is None else top & 0xFFFF
            hist += torch.bincount(digit, minlength=1 << 16)
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([rank], device=cum.device))[0])
        rank -= int(cum[b - 1]) if b else 0
        hi = b - (1 << 15) if hi is None else (hi << 16) | b
    # below the k-th key: taken; equal to it: the first ``rank`` of them in position order
    left = rank
    for (t, s, e), o in zip(pages(), _page_views(flat_out)):
        key = keys(t, s, e)
        torch.lt(key, hi, out=o)
        if left:
            ties = (key == hi).nonzero().view(-1)[:left]
            o[ties] = True
            left -= ties.numel()
    return list(out)


def _page_views(flat_out):
    """The page slices of ``flat_out`` in the order of ``lowest_k_masks``'s pages."""
    for o in flat_out:
        for s in range(0, o.numel(), _RADIX_PAGE):
            yield o[s : s + _RADIX_PAGE]


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float values ``x`` (fp32 or fp64): the bit pattern, with the
    magnitude bits of negative values flipped; -0.0 and +0.0 get one key (they compare equal)."""
    x = x + 0.0  # -0.0 -> +0.0
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFF_FFFF_FFFF_FFFF, bits)
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFF_FFFF, bits)


def _lowest_k_kthvalue(flat: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`lowest_k_mask` of a flat tensor through ``torch.kthvalue`` (0 < k < n)."""
    # a Python number: comparisons with it run twice as fast
    t = torch.kthvalue(flat, k).values.item()
    out = flat <= t
    # no ties at t past the k-th (always so for distinct scores): one pass
    if int(out.count_nonzero()) == k:
        return out
    out = flat < t
    rest = k - int(out.count_nonzero())  # >= 1: t itself is among the k smallest
    ties = (flat == t).nonzero().view(-1)  # in position order
    out[ties[:rest]] = True
    return out


def threshold_masks(scores: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], sparsity: float, *,
                    scope: str = "global", unit: int = 1, prune_mask_only: bool = False,
                    out: Sequence[torch.Tensor] | None = None):
    """Prune the lowest-scoring ``sparsity`` fraction of weights, across all tensors
    (``scope="global"``) or in each tensor separately (``scope="layer"``, uniform sparsity).

    ``scores``: per-tensor scores, one per unit of ``unit`` weights (so a tensor of ``n`` scores
    stands for ``n * unit`` weights). Already-pruned units should carry ``-inf`` so they stay
    pruned. Returns the same structure of bool tensors, True = kept (or True = pruned with
    ``prune_mask_only``). ``out`` (with ``prune_mask_only``): bool tensors, one per score tensor, in
    order, that receive the masks (e.g. views of one flat mask: no other copy is made).
    """
    check_sparsity(sparsity)
    if out is not None and not prune_mask_only:
        raise ValueError("out= receives the pruned masks: pass prune_mask_only=True with it")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer'; got {scope!r}")
    named = isinstance(scores, Mapping)
    keys = list(scores.keys()) if named else list(range(len(scores)))
    tensors = [scores[k] for k in keys]
    if not tensors:
        raise ValueError("no scores given: nothing to prune")
    if scope == "layer":
        pruned = [
            lowest_k_masks([t], num_to_prune(t.numel() * unit, sparsity, unit),
                           None if out is None else [out[i]])[0]
            for i, t in enumerate(tensors)
        ]
    else:
        # one selection over all tensors (compared in their promoted dtype: exact either way)
        total = sum(t.numel() for t in tensors)
        pruned = lowest_k_masks(tensors, num_to_prune(total * unit, sparsity, unit), out=out)
    res = [p if prune_mask_only else ~p for p in pruned]
    return dict(zip(keys, res)) if named else res


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
