"""Pruner classes: magnitude, OBS with block-Fisher (WoodFisher/oBERT), static M-FAC, and CAP.

All work on the flat padded vector of a :class:`~hf_mfac.pruning.targets.Layout` (D coordinates):
``w`` (D,) weights, ``keep`` (D,) bool (True = kept). One pruning step is

1. (Fisher methods) ``fisher = pruner.new_fisher(D, m, device)``; gradients are streamed into
   ``fisher.add_grads(G)``; ``finv = fisher.finish()`` gives the inverse
   (``diag``/``mul``/``submatrix``).
2. ``pruner.prune(layout, w, keep, sparsity=..., zeros=..., finv=finv, grad=mean_grad)`` selects the
   weights to remove, updates the rest, and returns the new weights, mask and OBS saliency (a
   relative score of the loss increase).

Gradient collection (step 1) and the per-block work (step 2) are separate so that a distributed
driver can shard either. Selections are exact: ``round(sparsity * n / unit)`` units (globally or per
layer), or exactly ``zeros`` per N:M group. Weights already pruned stay pruned (their score is
``-inf``, their gradient is masked so the Fisher inverse never moves them).

Patterns: ``"unstructured"`` (None), ``"N:M"`` (e.g. ``"2:4"``: at most N of every M consecutive
weights along the last dimension are kept) and ``"G-block"`` (e.g. ``"4-block"``: groups of G
consecutive weights pruned together, oBERT's block pruning)."""
from __future__ import annotations

import abc

import itertools
import re
from dataclasses import dataclass

import logging

import torch

from ..core import BlockFisherInverse, StaticMFAC
from ..core.fisher import block_fisher_bytes, block_shape
from ..core._checks import check_damp, check_positive_int, trim_host_heap
from ..core.cap import cap_apply, cap_block_losses, cap_eliminate, cap_select
from ..core.masks import ComputedScores, num_to_prune, threshold_masks
from ..core.obs import (
    block_obs_update,
    group_scores,
    obs_scores,
    obs_update,
    obs_update_masked,
)

logger = logging.getLogger(__name__)

__all__ = ["Pattern", "Pruner", "MagnitudePruner", "OBSPruner", "MFACPruner", "CAPPruner",
           "PRUNERS",
           "make_pruner", "StepResult"]


# -- patterns
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern: ``kind`` in {"unstructured", "nm", "group"}; ``n``:``m`` for N:M, ``m`` =
    group size."""
    kind: str = "unstructured"
    n: int = 0
    m: int = 1

    @classmethod
    def parse(cls, spec) -> "Pattern":
        if isinstance(spec, Pattern):
            return spec
        if spec is None or (
            isinstance(spec, str) and spec.strip().lower() in ("", "unstructured", "none")
        ):
            return cls()
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            spec = f"{spec[0]}:{spec[1]}"
        s = str(spec).strip().lower()
        if mo := re.fullmatch(r"(\d+)\s*:\s*(\d+)", s):
            n, m = int(mo[1]), int(mo[2])
            if not 0 < n < m:
                raise ValueError(f"N:M pattern needs 0 < N < M; got {spec!r}")
            return cls("nm", n, m)
        if mo := re.fullmatch(r"(\d+)-?blocks?|blocks?-?(\d+)|1x(\d+)|groups?[:-]?(\d+)", s):
            g = int(next(x for x in mo.groups() if x))
            if g < 1:
                raise ValueError(f"group size must be >= 1; got {spec!r}")
            return cls() if g == 1 else cls("group", 0, g)
        raise ValueError(
            f"unknown sparsity pattern {spec!r}: use 'unstructured', 'N:M' (e.g. "
            "'2:4') or "
            "'G-block' (e.g. '4-block')"
        )

    @property
    def group(self) -> int:
        """Weights per selection unit (M for N:M, G for groups, 1 unstructured)."""
        return 1 if self.kind == "unstructured" else self.m

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def check_shape(self, name: str, shape) -> None:
        if self.kind != "unstructured" and shape[-1] % self.m:
            what = f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.m}-block"
            raise ValueError(
                f"pattern {what} needs the last dimension of every target to be "
                f"divisible by {self.m}; "
                f"{name} has shape {tuple(shape)}. Exclude it (exclude=...) or pick "
                "another pattern."
            )

    def __str__(self) -> str:
        return {
            "unstructured": "unstructured",
            "nm": f"{self.n}:{self.m}",
            "group": f"{self.m}-block",
        }[self.kind]


@dataclass
class StepResult:
    """One pruning step: new weights (D,), new mask (D,) and OBS saliency per target (L,) or
    None."""

    weights: torch.Tensor
    keep: torch.Tensor
    loss: torch.Tensor | None


# -- helpers
# ----------------------------------------------------------------------------------------------
def _reads_pages(finv) -> bool:
    """Whether ``finv`` reads its blocks and diagonal a page at a time (``unpack(s, e, out=)``,
    ``diag(start, stop)``): a :class:`BlockFisherInverse`, or an object that answers like one (an
    inverse placed over several devices)."""
    return isinstance(finv, BlockFisherInverse) or (
        hasattr(finv, "unpack") and hasattr(finv, "num_blocks")
    )


def _block_source(finv):
    """What the per-block steps read the inverse blocks from: a :class:`BlockFisherInverse` (or any
    object with ``num_blocks``, ``block_size`` and ``unpack(s, e, out=)``) itself, its blocks
    unpacked a page at a time, never all at once; else the object's ``blocks()``."""
    return finv if _reads_pages(finv) else finv.blocks()


def _unit_slices(layout, g: int):
    return [(off // g, n // g) for off, n in zip(layout.offsets, layout.numels)]


def _select_units(
    layout, scores_u: torch.Tensor, sparsity: float, scope: str, g: int
) -> torch.Tensor:
    """Units (D/g,) to prune: the ``sparsity`` fraction of lowest scores, globally or per target
    (exact). The selection reads the targets' slices of ``scores_u`` in place and writes into one
    (D/g,) mask (:func:`~hf_mfac.core.masks.lowest_k_masks`): no copy of the scores."""
    sl = _unit_slices(layout, g)
    out = torch.zeros(scores_u.numel(), dtype=torch.bool, device=scores_u.device)
    threshold_masks(
        [scores_u[o : o + c] for o, c in sl],
        sparsity,
        scope=scope,
        unit=g,
        prune_mask_only=True,
        out=[out[o : o + c] for o, c in sl],
    )
    return out


# coordinates per page of the scores and of the summed update
_SCORE_PAGE = 1 << 20


def _diag_pages(finv, dim: int):
    """``(a, b, diag(F^{-1})[a:b])`` over pages of coordinates: a
    :class:`~hf_mfac.core.BlockFisherInverse` (:func:`_reads_pages`) reads each page from its
    packed blocks (no (D,) copy); other inverses give their ``diag()`` once, sliced."""
    whole = None if _reads_pages(finv) else finv.diag()
    for a in range(0, dim, _SCORE_PAGE):
        b = min(dim, a + _SCORE_PAGE)
        yield a, b, (finv.diag(a, b) if whole is None else whole[a:b])


def _obs_scores(finv, w: torch.Tensor, keep: torch.Tensor, u: torch.Tensor | None):
    """Single-weight OBS scores (D,) ``(w - u)^2 / (2 [F^{-1}]_qq)`` (:func:`obs_scores`), ``-inf``
    where already pruned; computed a page at a time (the diagonal is read per page), in the dtype
    :func:`obs_scores` gives (fp32 for an fp32 inverse): the selection compares them exactly."""
    sc = None
    for a, b, d in _diag_pages(finv, w.numel()):
        page = obs_scores(w[a:b], d.to(w.device), None if u is None else u[a:b])
        if sc is None:
            sc = torch.empty(w.numel(), dtype=page.dtype, device=w.device)
        sc[a:b] = page.masked_fill_(~keep[a:b], -float("inf"))
    return sc


def _obs_score_pages(finv, w: torch.Tensor, keep: torch.Tensor, u: torch.Tensor | None):
    """:func:`_obs_scores` as :class:`~hf_mfac.core.masks.ComputedScores`: the same values,
    computed a page at a time when the selection reads them (the diagonal read per page), so the
    (D,) scores are never held (4 bytes a weight at the step's peak)."""

    def scores(a: int, b: int) -> torch.Tensor:
        d = finv.diag(a, b).to(w.device)
        page = obs_scores(w[a:b], d, None if u is None else u[a:b])
        return page.masked_fill_(~keep[a:b], -float("inf"))

    dtype = scores(0, min(1, w.numel())).dtype
    return ComputedScores(w.numel(), scores, dtype, w.device)


def _block_groups(
    groups: torch.Tensor | None, B: int, scope: str = "global"
) -> torch.Tensor | None:
    """The damping group of each block of B consecutive coordinates: one group for all
    (``scope="global"``), or the target of the block's first coordinate (``"layer"``)."""
    if groups is None:
        return None
    groups = groups[::B].cpu().clone()  # not a view: the (D,) tensor is freed
    return torch.zeros_like(groups) if scope == "global" else groups


def _block_layers(layout, B: int, device=None) -> torch.Tensor:
    """(D/B,) long: the target each block of B coordinates belongs to (each target starts a block:
    the layout is padded to B), without the (D,) ``layout.layer_index()``."""
    ids = torch.empty(layout.dim // B, dtype=torch.long, device=device)
    ends = layout.offsets[1:] + [layout.dim]
    for i, (off, end) in enumerate(zip(layout.offsets, ends)):
        ids[off // B : end // B] = i
    return ids


def _per_layer(layout, values: torch.Tensor, g: int = 1) -> torch.Tensor:
    """Sum a per-unit quantity (D/g,) over each target -> (L,) fp64."""
    out = torch.zeros(len(layout.names), dtype=torch.float64, device=values.device)
    for i, (o, c) in enumerate(_unit_slices(layout, g)):
        out[i] = values[o : o + c].to(torch.float64).sum()
    return out


def _submatrix(finv, idx: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
    """``[F^{-1}]_QQ`` (n, g, g) in row chunks (static M-FAC gathers m*g*g values per group)."""
    g = idx.shape[1]
    m = finv.num_grads if isinstance(finv, StaticMFAC) else 1
    rows = max(1, budget // (m * g * g))
    if idx.shape[0] <= rows:
        return finv.submatrix(idx)
    return torch.cat([finv.submatrix(idx[s : s + rows]) for s in range(0, idx.shape[0], rows)])


def _nm_select(
    w: torch.Tensor,
    sub: torch.Tensor,
    idx: torch.Tensor,
    zeros: int,
    forced: torch.Tensor,
    u: torch.Tensor | None = None,
    budget: int = 1 << 22,
):
    """Best ``zeros`` weights to prune in each N:M group that include the ``forced`` (already
    pruned) ones.

    Exact joint OBS saliency ``1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` [oBERT, eq. 5] over all C(M,
    zeros) subsets, as :func:`hf_mfac.core.obs.nm_select` but with forced members. ``sub`` (n, M,
    M); ``forced`` (n, M). Returns (pruned (n, M) bool, score (n,) fp64). Cost O(n C zeros^3)."""
    n, M = idx.shape
    # (C, z)
    combos = torch.tensor(list(itertools.combinations(range(M), zeros)), device=idx.device)
    member = torch.zeros(combos.shape[0], M, dtype=torch.bool, device=idx.device)
    member.scatter_(1, combos, True)
    ws_all = (w if u is None else w - u.to(w.dtype))[idx].to(torch.float64)  # (n, M)
    pruned = torch.zeros(n, M, dtype=torch.bool, device=idx.device)
    score = torch.zeros(n, dtype=torch.float64, device=idx.device)
    rows = max(1, budget // (combos.numel() * zeros))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        ws = ws_all[s:e][:, combos]  # (r, C, z)
        S = sub[s:e].to(torch.float64)[:, combos[:, :, None], combos[:, None, :]]  # (r, C, z, z)
        sc = 0.5 * (ws * torch.linalg.solve(S, ws[..., None])[..., 0]).sum(-1)  # (r, C)
        ok = ~(forced[s:e, None, :] & ~member[None]).any(-1)
        sc = torch.where(ok, sc, torch.full_like(sc, float("inf")))
        best = sc.argmin(1)
        pruned[s:e] = member[best]
        score[s:e] = sc.gather(1, best[:, None])[:, 0]
    if not bool(torch.isfinite(score).all()):
        raise ValueError(
            f"an N:M group already has more than {zeros} pruned weights; masks never regrow"
        )
    return pruned, score


# -- pruners
# ----------------------------------------------------------------------------------------------
class Pruner(abc.ABC):
    """Abstract base class. ``scope``: "global" (one threshold over all targets) or "layer" (uniform
    sparsity).

    Damping: by default ``rel_damp`` (``default_rel_damp``), λ a fraction of the mean Fisher
    diagonal over all target weights (one λ for every block; ``rel_damp_scope = "layer"``: the mean
    over each target), so that the masks do not depend on the scale of the loss; ``damp`` gives the
    papers' absolute λ instead (``F = damp*I + G^T G / m``) and turns the relative one off.

    Subclasses set the defaults (one place for each: ``default_block_size``, ``default_rel_damp``,
    ``default_num_grads``) and implement :meth:`prune` (and :meth:`new_fisher` when
    ``uses_fisher``)."""

    name = "base"
    uses_fisher = True
    patterns = ("unstructured", "nm", "group")
    supports_woodtaylor = True
    # Defaults chosen on all-MiniLM-L6-v2 (tweets) and a small ViT (Fashion-MNIST):
    # benchmarks/RESULTS.md, "Pruning defaults". Blocks of 32 weights and 128 gradients give the
    # second-order gain and fit a CPU: on the MiniLM, oBERT and CAP at 64, 128 and 256 gradients are
    # within a point of each other, 32 costs oBERT 2-3 points (the m table there). Larger models may
    # want more (the papers use 1024 and up on GPUs).
    default_block_size: int | None = 32
    default_rel_damp = 1e-2
    # how the remaining weights are updated (OBS pruners), the first the default
    updates = ("joint", "summed")
    # the mean diagonal is taken over all targets ("layer": over each target)
    rel_damp_scope = "global"
    default_num_grads = 128

    def __init__(
        self,
        *,
        pattern=None,
        scope: str = "global",
        block_size: int | None = None,
        damp: float | None = None,
        rel_damp: float | None = None,
        woodtaylor: bool = False,
        device=None,
        page_bytes: int | None = None,
        fisher_dtype: torch.dtype = torch.float32,
        update: str | None = None,
    ):
        self.pattern = Pattern.parse(pattern)
        if self.pattern.kind not in self.patterns:
            raise ValueError(
                f"method {self.name!r} does not support the {self.pattern} pattern "
                f"(supported: {', '.join(self.patterns)})"
            )
        if scope not in ("global", "layer"):
            raise ValueError(
                f"scope must be 'global' or 'layer' (uniform per-layer sparsity); got {scope!r}"
            )
        self.scope = scope
        if woodtaylor and not self.supports_woodtaylor:
            raise ValueError(f"method {self.name!r} does not support woodtaylor=True")
        self.woodtaylor = bool(woodtaylor)
        if update is not None and update not in self.updates:
            raise ValueError(
                f"update={update!r} is not available for method {self.name!r}; choose "
                "one of "
                f"{', '.join(self.updates)}"
            )
        self.update = update or self.updates[0]
        self.block_size = (
            self.default_block_size
            if block_size is None
            else check_positive_int("block_size", block_size)
        )
        if damp is not None and rel_damp is not None:
            raise ValueError(
                "give damp (absolute) or rel_damp (relative to the Fisher's scale), "
                "not both; got "
                f"damp={damp!r}, rel_damp={rel_damp!r}"
            )
        # Default: relative damping (scale-free); an absolute damp replaces it when given.
        self.damp = None if damp is None else check_damp(damp)
        self.rel_damp = (
            check_damp(self.default_rel_damp if rel_damp is None else rel_damp, "rel_damp")
            if damp is None
            else None
        )
        self.device = None if device is None else torch.device(device)
        self.page_bytes = page_bytes
        if fisher_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                "fisher_dtype must be torch.float32 (the packed fp32 inverse, the "
                "default) or "
                f"torch.float64 (whole fp64 blocks); got {fisher_dtype!r}"
            )
        self.fisher_dtype = fisher_dtype
        g = self.pattern.group
        if self.uses_fisher and self.block_size is not None and self.block_size % g:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of {g} for the "
                f"{self.pattern} "
                "pattern (groups must not straddle Fisher blocks)"
            )

    @property
    def pad(self) -> int:
        """Alignment of each target in the flat layout (Fisher blocks never straddle two
        targets)."""
        return self.block_size if (self.uses_fisher and self.block_size) else 1

    def check(self, layout) -> None:
        """Raise ``ValueError`` for targets the pattern cannot cover (before any weight is
        touched)."""
        for name, shape in zip(layout.names, layout.shapes):
            self.pattern.check_shape(name, shape)

    def fisher_bytes(self, dim: int, num_grads: int) -> int:
        """Peak bytes of the block Fisher: its accumulator (packed triangles for an fp32 inverse,
        summed in fp32 or fp64 by the error bound; whole fp64 blocks for an fp64 inverse), over
        which the inverse is written."""
        return block_fisher_bytes(
            dim, self.block_size, self.fisher_dtype, num_grads=num_grads, rel_damp=self.rel_damp
        )[0]

    def inverse_bytes(self, dim: int, num_grads: int) -> int:
        """Bytes of the formed inverse (what a :class:`~hf_mfac.pruning.FisherCache` entry holds):
        the packed fp32 inverse (half the fp64 accumulator when the sum was fp64, the same bytes
        when it was fp32), whole fp64 blocks for an fp64 inverse."""
        return block_fisher_bytes(
            dim, self.block_size, self.fisher_dtype, num_grads=num_grads, rel_damp=self.rel_damp
        )[1]

    def work_device(self, device: torch.device) -> torch.device:
        """Where the weights, masks and scores live during :meth:`prune` (with the inverse)."""
        return device

    def config(self) -> dict:
        return {
            "method": self.name,
            "pattern": str(self.pattern),
            "scope": self.scope,
            "block_size": self.block_size if self.uses_fisher else None,
            "damp": self.damp if self.uses_fisher else None,
            "rel_damp": self.rel_damp if self.uses_fisher else None,
            "woodtaylor": self.woodtaylor,
            "update": self.update if self.uses_fisher else None,
        }

    def damping(self) -> dict:
        """The keyword arguments of the damping for the core inverses (``damp`` or ``rel_damp``)."""
        return {"damp": self.damp, "rel_damp": self.rel_damp}

    def fisher_key(self) -> tuple | None:
        """What the Fisher inverse this pruner builds depends on, besides the gradients: pruners
        with equal keys can share one (``prune_oneshot(fisher_cache=...)``; oBERT and CAP at the
        same block size and damp do). None for pruners without a Fisher."""
        if not self.uses_fisher:
            return None
        return ("block", self.block_size, self.damp, self.rel_damp, self.fisher_dtype, self.pad)

    def new_fisher(self, dim: int, num_grads: int, device, groups: torch.Tensor | None = None):
        """The gradient sink for Fisher methods (subclasses that set ``uses_fisher``). ``groups``
        (dim,) int: the target tensor of each coordinate (``Layout.layer_index``), over which the
        relative damping averages."""
        raise TypeError(f"{type(self).__name__} does not use a Fisher")

    @abc.abstractmethod
    def prune(
        self, layout, w, keep, *, sparsity=None, zeros=None, finv=None, grad=None, out=None
    ) -> StepResult:
        """Selection and update of one pruning step; every concrete pruner defines it.

        ``out`` (D,): where the step may write its new weights (``w`` itself when the caller no
        longer needs it: the exact per-block updates then need no second (D,) vector); the
        returned ``weights`` are ``out`` or a new tensor. ``w`` is read before it is written."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


class MagnitudePruner(Pruner):
    """Magnitude pruning: score ``w^2`` (group: sum over the group); ``scope="global"`` is global
    magnitude, ``scope="layer"`` uniform magnitude. No Fisher, no update, no loss estimate."""

    name = "magnitude"
    uses_fisher = False
    supports_woodtaylor = False
    default_block_size = None

    def prune(
        self, layout, w, keep, *, sparsity=None, zeros=None, finv=None, grad=None, out=None
    ) -> StepResult:
        g = self.pattern.group
        sq = (w.to(torch.float64) ** 2).view(-1, g)
        prev = ~keep.view(-1, g).any(1)
        if self.pattern.kind == "nm":
            sc = torch.where(keep.view(-1, g), sq, torch.full_like(sq, -float("inf")))
            if bool(((~keep.view(-1, g)).sum(1) > zeros).any()):
                raise ValueError(
                    f"an N:M group already has more than {zeros} pruned weights; masks never regrow"
                )
            order = torch.sort(sc, dim=1, stable=True).indices[:, :zeros]
            pruned = torch.zeros_like(sq, dtype=torch.bool).scatter_(1, order, True).view(-1)
            pruned &= layout.valid(w.device)
        else:
            sc = torch.where(
                prev, torch.full_like(prev, -float("inf"), dtype=torch.float64), sq.sum(1)
            )
            pruned = _select_units(layout, sc, sparsity, self.scope, g).repeat_interleave(g)
        new_keep = keep & ~pruned
        return StepResult(w * new_keep, new_keep, None)


def _block_fisher(pruner: Pruner, dim: int, num_grads: int, device, groups) -> BlockFisherInverse:
    """The block-diagonal Fisher inverse of OBS and CAP: blocks of ``pruner.block_size``, its
    damping, precision and damping groups."""
    groups = _block_groups(groups, pruner.block_size, pruner.rel_damp_scope)
    return BlockFisherInverse(dim, pruner.block_size, **pruner.damping(), damp_groups=groups,
                              device=device, dtype=pruner.fisher_dtype, num_grads=num_grads)


class _OBSPruner(Pruner):
    """OBS selection ([WoodFisher, eqs. 10-11]; groups and N:M: [oBERT, eq. 5]) for any inverse with
    ``diag``/``mul``/``submatrix``, and the update of the remaining weights: ``"joint"``, the exact
    OBS solve of each Fisher block for all the weights it loses
    (:func:`~hf_mfac.core.obs.block_obs_update`), or ``"summed"``, the sum of the single-weight (or
    single-group) updates, the papers' approximation, which ignores the correlations between the
    removed weights and overshoots when the damping is small."""

    def _joint(self, layout, w, keep, pruned, finv, u, out=None) -> StepResult:
        """Apply the joint per-block update for the mask ``pruned`` (D,) (previously pruned weights
        included, they are zero and stay zero; ``pruned`` is overwritten with the new mask); the
        loss is the quadratic model's increase of each block. The update runs a page of blocks at a
        time (:func:`~hf_mfac.core.obs.block_obs_update`)."""
        B = self.block_size
        nb = layout.dim // B
        if hasattr(finv, "block_range"):  # a sharded inverse: this rank's blocks, then one gather
            hinv, lo, gather = finv.block_range(B)
        else:
            hinv, lo, gather = _block_source(finv), 0, (lambda t: t)
        hi = lo + block_shape(hinv)[0]
        ub = None if u is None else u.to(w.dtype).view(nb, B)[lo:hi]
        # (n, B), (n,)
        into = None if out is None or lo or hi != nb else out.view(nb, B)  # in one process
        new, block_loss = block_obs_update(
            w.view(nb, B)[lo:hi], hinv, pruned.view(nb, B)[lo:hi], ub, out=into
        )
        # (nb, B), (nb,); WoodTaylor: w - u where nothing is pruned
        new, block_loss = gather(new), gather(block_loss)
        loss = torch.zeros(len(layout.names), dtype=torch.float64, device=w.device)
        loss.index_add_(0, _block_layers(layout, B, w.device), block_loss)
        new_keep = pruned.logical_not_().logical_and_(keep)  # keep & ~pruned, in place
        # zero what is not kept (already zero: the update zeroes the pruned weights) with a bool
        # mask; ``mul_`` by the bool mask would convert it to a (D,) float temporary first
        return StepResult(new.view(-1).masked_fill_(~new_keep, 0), new_keep, loss)

    def _finish(self, layout, w, keep, pruned, finv, u, summed, out=None):
        """The step's result: the joint update where the inverse has blocks, else the summed one
        (``summed()``)."""
        if self.update == "joint":
            return self._joint(layout, w, keep, pruned | ~keep, finv, u, out)
        return summed()

    def prune(
        self, layout, w, keep, *, sparsity=None, zeros=None, finv=None, grad=None, out=None
    ) -> StepResult:
        if finv is None:
            raise ValueError(f"method {self.name!r} needs the Fisher inverse (finv)")
        u = None
        if self.woodtaylor:
            if grad is None:
                raise ValueError("woodtaylor=True needs the mean gradient")
            # WoodTaylor's F^{-1} grad [WoodFisher, §6.2]
            u = finv.mul(grad.to(w.dtype)).to(w.dtype)
        g, kind = self.pattern.group, self.pattern.kind
        if kind == "unstructured":
            # (D,) w^2 / (2 [F^{-1}]_qq), -inf where already pruned; for the joint update of a
            # paged inverse computed a page at a time by the selection, never held whole
            if self.update == "joint" and _reads_pages(finv):
                sc = _obs_score_pages(finv, w, keep, u)
            else:
                sc = _obs_scores(finv, w, keep, u)
            # the weights to remove, the already pruned ones with them (and the padding, which is
            # never kept): what the per-block update sets to zero
            pruned = _select_units(layout, sc, sparsity, self.scope, 1).logical_or_(~keep)
            if self.update == "joint":
                del sc
                return self._joint(layout, w, keep, pruned, finv, u, out)
            pruned.logical_and_(layout.valid(w.device))
            new = obs_update_masked(finv, w, pruned, u=u, page=_SCORE_PAGE)
            loss = sc.masked_fill_(~(pruned & keep), 0)  # the scores of the weights pruned now
            new_keep = pruned.logical_not_().logical_and_(keep)
            return StepResult(new, new_keep, _per_layer(layout, loss))
        units = torch.arange(layout.dim, device=w.device).view(-1, g)  # (D/g, g)
        uvalid = layout.valid(w.device).view(-1, g).all(1)
        idx = units[uvalid]
        sub = _submatrix(finv, idx).to(w.device)  # (n, g, g)
        if kind == "nm":
            forced = ~keep.view(-1, g)[uvalid]
            sel, score = _nm_select(w, sub, idx, zeros, forced, u)  # (n, M), (n,)
            pruned = torch.zeros(layout.dim // g, g, dtype=torch.bool, device=w.device)
            pruned[uvalid] = sel

            def summed():
                pos = sel.nonzero()[:, 1].view(-1, zeros)  # (n, z) positions inside each group
                r = torch.arange(idx.shape[0], device=w.device)[:, None, None]
                new = obs_update(
                    finv, w, idx.gather(1, pos), u=u, sub=sub[r, pos[:, :, None], pos[:, None, :]]
                )
                loss_u = torch.zeros(layout.dim // g, dtype=torch.float64, device=w.device)
                loss_u[uvalid] = score
                return StepResult(new, keep & ~pruned.view(-1), _per_layer(layout, loss_u, g))

            return self._finish(layout, w, keep, pruned.view(-1), finv, u, summed, out)
        # groups of g weights (oBERT "4-block")
        prev = ~keep.view(-1, g).any(1)
        sc_valid = group_scores(w, sub, idx, u)  # (n,)
        sc = torch.full((layout.dim // g,), float("inf"), dtype=torch.float64, device=w.device)
        sc[uvalid] = sc_valid
        sc = torch.where(prev, torch.full_like(sc, -float("inf")), sc)
        pruned_u = (_select_units(layout, sc, sparsity, self.scope, g) | prev) & uvalid

        def summed():
            sel_rows = pruned_u[uvalid]
            new = obs_update(finv, w, idx[sel_rows], u=u, sub=sub[sel_rows])
            loss_u = torch.where(pruned_u & ~prev, sc, torch.zeros_like(sc))
            return StepResult(
                new, keep & ~pruned_u.repeat_interleave(g), _per_layer(layout, loss_u, g)
            )

        return self._finish(layout, w, keep, pruned_u.repeat_interleave(g), finv, u, summed,
                            out)


class OBSPruner(_OBSPruner):
    """WoodFisher / oBERT: OBS with a block-diagonal empirical-Fisher inverse ([WoodFisher, eqs.
    10-11]; groups and N:M with the oBERT group formula, [oBERT, eq. 5]). Blocks of ``block_size``
    weights inside each target; Fisher memory D*B values, gradients streamed (never all held). Cost
    per step: O(m D B) to accumulate, O(D B^2) to invert, O(D B) to score and update. WoodTaylor
    [WoodFisher, §6.2] with ``woodtaylor=True``."""

    name = "obert"

    def new_fisher(self, dim: int, num_grads: int, device, groups: torch.Tensor | None = None):
        return _block_fisher(self, dim, num_grads, device, groups)


class _GradBuffer:
    """Holds the m gradients (host memory by default) for the static M-FAC inverse."""

    def __init__(self, pruner, dim: int, num_grads: int, device, groups=None):
        self.pruner, self.n, self.groups = pruner, 0, groups
        self.G = torch.empty(
            num_grads, dim, dtype=torch.float32, device=pruner.grads_device or "cpu"
        )
        self.device = device

    def add_grads(self, chunk: torch.Tensor) -> None:
        self.G[self.n : self.n + chunk.shape[0]] = chunk.to(self.G.device)
        self.n += chunk.shape[0]

    def finish(self) -> StaticMFAC:
        if self.G.device.type == "cpu":  # the gradient phase's freed activations back to the system
            trim_host_heap()
        p = self.pruner
        page = p.page_bytes
        # bound the fp64 temporaries of the precomputation (about 6x the page) on any device
        if page is None:
            page = MFACPruner.default_page_bytes
        B = min(p.block_size or self.G.shape[1], self.G.shape[1])
        return StaticMFAC(
            self.G[: self.n],
            block_size=p.block_size,
            **p.damping(),
            damp_groups=_block_groups(self.groups, B, p.rel_damp_scope),
            device=self.device,
            page_bytes=page,
        )


class MFACPruner(_OBSPruner):
    """OBS with the static M-FAC inverse ([M-FAC, "static algorithm", App. C]): the m gradients (m x
    D fp32, host memory; ``page_bytes`` pages them through the device) give ``diag(F^{-1})`` (eq.
    25) and ``F^{-1} x`` (eq. 24) in O(D m) after an O(D m^2) precomputation, for blocks of
    ``block_size`` (None = one block over all targets, the "full" M-FAC); the precomputation runs in
    pages of ``page_bytes`` (default 256 MiB of G) to bound its temporaries. Blocks are consecutive
    coordinates of the flat vector and may span two targets, as in the M-FAC code; the relative
    damping is per block. Default B=256: with the default 64 gradients, the paper's 2048 left a
    rank-64 Fisher per block and pruned no better than magnitude on all-MiniLM-L6-v2 at 80 % (0.556
    against 0.555; 256: 0.582)."""

    name = "mfac"
    default_block_size = 256
    default_num_grads = 64  # it holds all m gradients (m x D fp32: 2.7 GiB at MiniLM size)
    # its blocks are queried element by element: no joint solve over B weights
    updates = ("summed",)
    default_page_bytes = 1 << 28  # precompute in pages of 256 MiB of G (``page_bytes`` overrides)

    def __init__(self, *args, grads_device=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads_device = grads_device

    @property
    def pad(self) -> int:
        return 1

    def fisher_bytes(self, dim: int, num_grads: int) -> int:
        return dim * num_grads * 4

    def inverse_bytes(self, dim: int, num_grads: int) -> int:
        return dim * num_grads * 4  # W = L^{-1} G in G's memory

    def fisher_key(self) -> tuple:
        return (
            "static-mfac",
            self.block_size,
            self.damp,
            self.rel_damp,
            self.page_bytes,
            str(self.grads_device or "cpu"),
        )

    def work_device(self, device: torch.device) -> torch.device:
        # W = L^{-1} G stays where G is; queries run there
        return torch.device(self.grads_device or "cpu")

    def new_fisher(self, dim: int, num_grads: int, device, groups: torch.Tensor | None = None):
        return _GradBuffer(self, dim, num_grads, device, groups)


class CAPPruner(Pruner):
    """CAP, the correlation-aware pruner ([CAP, §3.1, App. A]) on block-Fisher inverses: greedy OBC
    elimination inside every block, then one global (or per-layer) merge of the recorded losses; the
    chosen prefix of each block's order is applied with the joint OBS solve (O(D) extra memory
    instead of the reference's (B+1) D: in one process 1 byte of order and 4 of fp32 loss a weight,
    the merge's ties at its threshold broken by the fp64 losses of the tied blocks, so the masks
    are those of fp64 losses). N:M: no weight is eliminated from a group that already has its
    zeros. Cost O(D B^2)."""

    name = "cap"
    patterns = ("unstructured", "nm")
    supports_woodtaylor = False
    # the chosen prefix of each block's elimination is applied with the joint solve
    updates = ("joint",)

    def new_fisher(self, dim: int, num_grads: int, device, groups: torch.Tensor | None = None):
        return _block_fisher(self, dim, num_grads, device, groups)

    def prune(
        self, layout, w, keep, *, sparsity=None, zeros=None, finv=None, grad=None, out=None
    ) -> StepResult:
        if finv is None:
            raise ValueError("method 'cap' needs the Fisher inverse (finv)")
        return self.prune_blocks(
            layout, w, keep, _block_source(finv), 0, sparsity=sparsity, zeros=zeros, out=out
        )

    def prune_blocks(
        self, layout, w, keep, hinv, first: int = 0, *, sparsity=None, zeros=None, gather=None,
        out=None,
    ) -> StepResult:
        """One CAP step as one rank of a distributed run sees it (in one process: all blocks,
        ``gather`` None). ``hinv`` (n, B, B) (or a :class:`~hf_mfac.core.BlockFisherInverse`, read a
        page at a time) are the inverses of the layout's blocks ``first .. first + n - 1``:
        eliminate inside them, merge the losses of all blocks (global or per target), apply the
        chosen prefixes. ``gather(t)`` concatenates a per-block tensor (n, ...) over the ranks into
        (nb, ...), in block order. ``out``: as in :meth:`Pruner.prune` (in one process)."""
        local = gather is None  # all blocks in this process
        gather = gather or (lambda t: t)
        B = self.block_size
        nb = layout.dim // B
        lo, hi = first, first + block_shape(hinv)[0]  # this rank's blocks
        W = w.view(nb, B)[lo:hi]
        valid = layout.valid(w.device).view(nb, B)[lo:hi]
        forced = ~keep.view(nb, B)[lo:hi] & valid
        block_layer = _block_layers(layout, B, w.device)  # (nb,) target of every block
        # in one process the losses are stored in fp32 (4 bytes a weight, not 8) and the ties of
        # the merge broken in fp64 (exact); over several ranks the merge sees fp64 losses
        loss_dtype = torch.float32 if local else torch.float64
        if self.pattern.kind == "nm":
            M = self.pattern.m
            order, losses = cap_eliminate(W, hinv, valid=valid, forced=forced, nm=(M - zeros, M),
                                          loss_dtype=loss_dtype)
            counts = torch.isfinite(losses).sum(1)
        else:
            order, losses = cap_eliminate(W, hinv, valid=valid, forced=forced,
                                          loss_dtype=loss_dtype)
            # the forced weights come first, at loss -1 (always taken); in place
            steps = torch.arange(B, device=w.device)[None, :]
            n_forced = forced.sum(1, keepdim=True)
            losses.masked_fill_(steps < n_forced, -1.0)

            def exact(blocks):  # the fp64 losses of these blocks, as the merge would see them
                rows = cap_block_losses(W, hinv, blocks, valid=valid, forced=forced)
                return rows.masked_fill_(steps < n_forced[blocks], -1.0)

            exact = exact if local else None
            all_losses = gather(losses)  # (nb, B): the merge sees every block
            if self.scope == "global":
                counts = cap_select(all_losses, num_to_prune(layout.numel, sparsity),
                                    exact=exact)[lo:hi]
            else:
                k = {i: num_to_prune(n, sparsity) for i, n in enumerate(layout.numels)}
                counts = cap_select(all_losses, 0, block_layer, k, exact=exact)[lo:hi]
            all_losses = None
        # the loss of each block's chosen prefix, then the losses are freed before the update
        last = losses.gather(1, (counts - 1).clamp_min(0)[:, None])[:, 0].clamp_min(0)
        block_loss = torch.where(counts > 0, last, torch.zeros_like(last)).to(torch.float64)
        del losses, last
        into = out.view(nb, B) if out is not None and local else None
        new, pruned = cap_apply(W, hinv, order, counts, out=into)
        del order
        pruned.logical_and_(valid).logical_or_(forced)
        # (nb, B), (nb, B), (nb,)
        new, pruned, block_loss = gather(new), gather(pruned), gather(block_loss)
        loss = torch.zeros(len(layout.names), dtype=torch.float64, device=w.device)
        loss.index_add_(0, block_layer, block_loss)
        new_keep = pruned.view(-1).logical_not_().logical_and_(keep)  # keep & ~pruned, in place
        # zero what is not kept (already zero: the update zeroes the pruned weights) with a bool
        # mask; ``mul_`` by the bool mask would convert it to a (D,) float temporary first
        return StepResult(new.view(-1).masked_fill_(~new_keep, 0), new_keep, loss)


PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "mfac": MFACPruner,
    "obert": OBSPruner,
    "cap": CAPPruner,
}


def make_pruner(method: str | Pruner, **kwargs) -> Pruner:
    """A pruner from its name in :data:`PRUNERS` (or an instance, returned as it is)."""
    if isinstance(method, Pruner):
        return method
    cls = PRUNERS.get(str(method).lower())
    if cls is None:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {sorted(PRUNERS)}")
    if cls is MagnitudePruner:  # one sweep may pass the same settings to every method
        unused = [
            k
            for k in ("block_size", "damp", "rel_damp", "woodtaylor", "update")
            if kwargs.pop(k, None) not in (None, False)
        ]
        if unused:
            logger.info("magnitude pruning uses no Fisher: ignoring %s", ", ".join(unused))
    return cls(**kwargs)
