"""CAP: correlation-aware greedy pruning with block-Fisher inverses [CAP, §3.1, App. A].

Inside each block of B weights, repeatedly remove the weight with the smallest current OBS score
``w_j^2 / (2 [H^{-1}]_jj)``, apply its OBS update to the rest of the block and downdate the block
inverse by the rank-1 Schur complement ``H^{-1} <- H^{-1} - H^{-1}_{:,j} H^{-1}_{j,:} / H^{-1}_jj`` (the OBC
step). The running sum of the step scores is the joint group saliency ``rho_Q`` [CAP, eqs. 5, 7] of
the set removed so far. Then merge globally: prune the k smallest recorded losses (one k-th value
selection, no sort), and give each block the prefix of its elimination order that falls under the threshold.

Memory: the reference code saves the block's weights after every step ((B+1) d values). Here only the
elimination order and the losses are kept (O(d)); the chosen prefix is applied with the joint OBS
solve ``w - H^{-1}_{:,P} (H^{-1}_{PP})^{-1} w_P``, which equals the sequential OBS/downdate replay
exactly (the sequential eliminations solve the same constrained quadratic). The elimination runs on
pages of blocks so the working copy of the inverses is bounded too.
"""
from __future__ import annotations

import torch

from ._checks import check_positive_int
from .masks import lowest_k_mask
from .obs import block_obs_update

__all__ = ["cap_eliminate", "cap_select", "cap_apply", "cap_prune"]

_PAGE_BYTES = 8 << 20  # fp64 working set of one page of blocks: small enough to stay in cache (CPU)
_LAZY = 8  # rank-1 downdates delayed and folded into the inverses with one GEMM (see _eliminate_page)


def _page(B: int) -> int:
    """Blocks per page: 8 MiB of fp64 inverses (256 blocks at B = 64, 4096 at B = 16). On CPU this ran 3x
    faster than 2048 blocks of 64 (a memory-bound rank-1 downdate per step)."""
    return max(1, _PAGE_BYTES // (8 * B * B))


def _nm_groups(B: int, nm: tuple[int, int] | None):
    if nm is None:
        return None
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M; got {n}:{m}")
    if B % m:
        raise ValueError(f"block size {B} must be a multiple of M={m} for N:M pruning")
    return n, m


def cap_eliminate(w: torch.Tensor, hinv: torch.Tensor, *, valid: torch.Tensor | None = None,
                  forced: torch.Tensor | None = None, nm: tuple[int, int] | None = None):
    """Greedy per-block elimination, vectorised over blocks.

    w (nb, B) weights; hinv (nb, B, B) block inverses (not modified); valid (nb, B) bool, False for
    padding (never eliminated); forced (nb, B) bool, weights already pruned (eliminated first, at zero
    loss, so the inverses are downdated for them); nm=(N, M): never eliminate a weight whose group of M
    already has M - N zeros. Returns (order (nb, B) long, losses (nb, B) fp64): ``order[:, t]`` is the
    weight removed at step t and ``losses[:, t]`` the cumulative saliency after it (inf, and an
    arbitrary order entry, where no weight could be removed). Cost O(nb B^3) = O(d B^2).
    """
    nb, B = w.shape
    nm = _nm_groups(B, nm)
    order = torch.zeros(nb, B, dtype=torch.long, device=w.device)
    losses = torch.full((nb, B), float("inf"), dtype=torch.float64, device=w.device)
    page = _page(B)
    for s in range(0, nb, page):
        e = min(nb, s + page)
        page_order, page_losses = _eliminate_page(
            w[s:e], hinv[s:e],
            None if valid is None else valid[s:e], None if forced is None else forced[s:e], nm)
        order[s:e], losses[s:e] = page_order, page_losses
    return order, losses


def _eliminate_page(w, hinv, valid, forced, nm):
    """The greedy elimination of one page of blocks, with the rank-1 downdates of the inverses delayed.

    After t steps the inverse is ``H_t = H_0 - U U^T`` with ``U = [u_1 ... u_t]``, ``u_s = col_s / sqrt(d_s)``.
    The greedy step needs only ``diag(H_t)`` (kept as a vector, ``-= u^2`` per step) and column ``j`` of ``H_t``
    (``H[:, j] - U U[j]^T``, O(B k) for the k delayed vectors); every ``_LAZY`` steps the delayed vectors are
    folded into H with one batched GEMM (``baddbmm``). Same arithmetic as the step-by-step downdate
    ``H -= col col^T / d``, with about ``2 B / _LAZY`` times less memory traffic per step.
    """
    nb, B = w.shape
    dev = w.device
    W = w.to(torch.float64).clone()
    H = hinv.to(torch.float64).clone()
    diag = H.diagonal(dim1=-2, dim2=-1).clone()  # (nb, B) diag(H_t)
    K = min(_LAZY, B)
    U = torch.empty(nb, B, K, dtype=torch.float64, device=dev)  # delayed downdate vectors
    k = 0
    cand = torch.ones(nb, B, dtype=torch.bool, device=dev) if valid is None else valid.clone()
    force = torch.zeros_like(cand) if forced is None else (forced & cand)
    forced_left = bool(force.any())
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    zero = torch.tensor(0.0, dtype=torch.float64, device=dev)
    minus_one = torch.tensor(-1.0, dtype=torch.float64, device=dev)
    bias = torch.where(cand, zero, inf)  # (nb, B) added to the scores: +inf where no longer a candidate
    zeros_in_group = None
    if nm is not None:
        n, m = nm
        zeros_in_group = torch.zeros(nb, B // m, dtype=torch.long, device=dev)
    rows = torch.arange(nb, device=dev)
    order = torch.zeros(nb, B, dtype=torch.long, device=dev)
    losses = torch.full((nb, B), float("inf"), dtype=torch.float64, device=dev)
    cum = torch.zeros(nb, dtype=torch.float64, device=dev)
    for t in range(B):
        score = torch.addcdiv(bias, W.square(), diag.clamp_min(1e-300), value=0.5)  # w^2 / (2 d) or inf
        if forced_left:  # already pruned weights go first, at zero loss, in index order
            score = torch.where(force, minus_one, score)
        step, j = score.min(1)  # (nb,): the first minimum, as argmin (and faster than argmin on CPU)
        ok = step < inf  # False where the block has no candidate left
        cum = torch.where(ok, cum + step.clamp_min(0), cum)
        order[:, t] = j
        losses[:, t] = torch.where(ok, cum, inf)
        col = H[rows, :, j]  # (nb, B) column j of H_0 minus the downdates folded so far
        if k:
            col = col - torch.bmm(U[:, :, :k], U[rows, j, :k].unsqueeze(-1)).squeeze(-1)
        dj = col[rows, j].clamp_min(1e-300)
        coef = torch.where(ok, W[rows, j] / dj, zero)
        W.addcmul_(coef[:, None], col, value=-1.0)  # OBS update of the remaining weights
        W[rows, j] = 0.0  # (where not ok, j is no candidate: its value is never read again)
        u = col * torch.where(ok, dj.rsqrt(), zero)[:, None]
        diag.addcmul_(u, u, value=-1.0)
        U[:, :, k] = u
        k += 1
        if k == K and t + 1 < B:
            H.baddbmm_(U, U.transpose(1, 2), alpha=-1.0)  # fold the delayed rank-1 downdates
            k = 0
        bias[rows, j] = inf
        if forced_left:
            force[rows, j] = False
            forced_left = bool(force.any())
        if nm is not None:
            g = torch.div(j, m, rounding_mode="floor")
            zeros_in_group[rows, g] += ok.long()
            full = (zeros_in_group >= m - n).repeat_interleave(m, dim=1)
            bias.masked_fill_(full, float("inf"))
            if forced_left:  # a forced weight in a group that has its zeros is no candidate either
                force &= ~full
                forced_left = bool(force.any())
    return order, losses


def cap_select(losses: torch.Tensor, k: int, block_groups: torch.Tensor | None = None,
               k_per_group: dict | list | None = None) -> torch.Tensor:
    """Global merge: prune the ``k`` smallest recorded losses; returns per-block counts (nb,).

    The losses are non-decreasing along each block's order, and ties go by position (as in a stable sort), so
    each block's selection is a prefix of its elimination order. With ``block_groups`` (nb,) and
    ``k_per_group`` (one count per group id), the merge is done within each group instead (uniform
    per-layer sparsity).
    """
    nb, B = losses.shape
    if block_groups is None:
        return _k_smallest(losses, k)
    counts = torch.zeros(nb, dtype=torch.long, device=losses.device)
    for gid in torch.unique(block_groups).tolist():
        sel = block_groups == gid
        counts[sel] = _k_smallest(losses[sel], int(k_per_group[gid]))
    return counts


def _k_smallest(losses: torch.Tensor, k: int) -> torch.Tensor:
    nb, B = losses.shape
    finite = int(torch.isfinite(losses).sum())
    if not 0 <= k <= finite:
        raise ValueError(f"cannot prune {k} weights: only {finite} are prunable under the constraints")
    # the k smallest with ties by position (what a stable sort's first k are), from one selection: no sort
    return lowest_k_mask(losses, k).count_nonzero(1)


def cap_apply(w: torch.Tensor, hinv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor):
    """Weights after removing the first ``counts[b]`` weights of each block's ``order``: the joint OBS
    update ``w - H^{-1}_{:,P} (H^{-1}_{PP})^{-1} w_P`` with ``w_P`` set exactly to 0.
    Returns (new weights (nb, B) in w's dtype, pruned mask (nb, B) bool). Cost O(d B^2)."""
    nb, B = w.shape
    steps = torch.arange(B, device=w.device)[None, :] < counts[:, None]  # (nb, B) prefix of the order
    # scatter_add: after the last possible elimination the order repeats index 0 (steps past counts)
    pruned = torch.zeros(nb, B, dtype=torch.long, device=w.device).scatter_add_(1, order, steps.long()) > 0
    return block_obs_update(w, hinv, pruned)[0], pruned


def cap_prune(w: torch.Tensor, hinv: torch.Tensor, k: int, *, valid=None, forced=None, nm=None,
              block_groups=None, k_per_group=None):
    """Eliminate, merge and apply in one call. ``k`` is the total number of weights to prune (counting
    the ``forced`` ones); with ``nm`` every group gets exactly M - N zeros and ``k`` is ignored.
    Returns (new weights (nb, B), pruned mask (nb, B), losses (nb, B))."""
    check_positive_int("block size", w.shape[1])
    order, losses = cap_eliminate(w, hinv, valid=valid, forced=forced, nm=nm)
    if nm is not None:
        counts = torch.isfinite(losses).sum(1)
    else:
        counts = cap_select(losses, k, block_groups, k_per_group)
    new, pruned = cap_apply(w, hinv, order, counts)
    return new, pruned, losses
