"""CAP: correlation-aware greedy pruning with block-Fisher inverses [CAP, §3.1, App. A].

Inside each block of B weights, repeatedly remove the weight with the smallest current OBS score
``w_j^2 / (2 [H^{-1}]_jj)``, apply its OBS update to the rest of the block and downdate the block
inverse by the rank-1 Schur complement ``H^{-1} <- H^{-1} - H^{-1}_{:,j} H^{-1}_{j,:} / H^{-1}_jj``
(the OBC step). The running sum of the step scores is the joint group saliency ``rho_Q`` [CAP, eqs.
5, 7] of the set removed so far. Then merge globally: prune the k smallest recorded losses (one k-th
value selection, no sort), and give each block the prefix of its elimination order that falls under
the threshold.

Memory: the reference code saves the block's weights after every step ((B+1) d values). Here only
the elimination order (1 byte a weight up to B = 256) and the losses (fp64, or fp32 with the ties
at the merge's threshold broken in fp64, :func:`cap_select`'s ``exact``) are kept; the chosen
prefix is applied with the joint OBS solve ``w - H^{-1}_{:,P} (H^{-1}_{PP})^{-1} w_P``, which equals
the sequential OBS/downdate replay exactly (the sequential eliminations solve the same constrained
quadratic). The elimination, the masks of the chosen prefixes and the update run on pages of
blocks, so the working copy of the inverses is bounded too, and the merge is one paged selection
over the losses (:func:`~hf_mfac.core.masks.lowest_k_mask`).
"""
from __future__ import annotations

import torch

from ._checks import check_positive_int, page_bytes
from .masks import lowest_k_mask
from .fisher import block_shape, read_blocks
from .obs import block_obs_update

__all__ = ["cap_eliminate", "cap_select", "cap_apply", "cap_prune", "order_dtype", "prefix_mask",
           "cap_block_losses", "stored_losses"]

# fp64 inverses of one page of blocks, per device type: small enough to stay in cache on a CPU;
# other devices (accelerators, where each of the B steps of a page costs kernel launches) use
# _ACCEL_PAGE_BYTES
_PAGE_BYTES = {"cpu": 8 << 20}
_ACCEL_PAGE_BYTES = 128 << 20
# rank-1 downdates delayed and folded into the inverses with one GEMM (see _eliminate_page)
_LAZY = 8


def _page(B: int, device) -> int:
    """Blocks per page: on a CPU 8 MiB of fp64 inverses (256 blocks at B = 64, 4096 at B = 16),
    small enough for the memory-bound rank-1 downdate of each step to stay in cache; 128 MiB on an
    accelerator."""
    return max(1, page_bytes(device, _PAGE_BYTES, _ACCEL_PAGE_BYTES) // (8 * B * B))


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
                  forced: torch.Tensor | None = None, nm: tuple[int, int] | None = None,
                  loss_dtype: torch.dtype = torch.float64):
    """Greedy per-block elimination, vectorised over blocks.

    w (nb, B) weights; hinv (nb, B, B) block inverses (not modified; a tensor or a
    :class:`~hf_mfac.core.BlockFisherInverse`, unpacked a page at a time); valid (nb, B) bool, False
    for padding (never eliminated); forced (nb, B) bool, weights already pruned (eliminated first,
    at zero loss, so the inverses are downdated for them); nm=(N, M): never eliminate a weight whose
    group of M already has M - N zeros. Returns (order (nb, B), losses (nb, B) fp64):
    ``order[:, t]`` is the weight removed at step t and ``losses[:, t]`` the cumulative saliency
    after it (inf, and an arbitrary order entry, where no weight could be removed). ``order`` holds
    positions inside a block, in the smallest integer dtype that holds them (uint8 up to B = 256,
    int16 up to 32768, else int64: 1 byte a weight at the usual sizes instead of 8). Cost O(nb B^3)
    = O(d B^2).

    The losses are computed in fp64 and stored in ``loss_dtype``: fp64 (default), or fp32, half the
    memory, rounded to nearest (:func:`stored_losses`: finite values stay finite, the order is kept
    up to ties); :func:`cap_select` with ``exact=`` (:func:`cap_block_losses`) then resolves the
    ties at the threshold in fp64, so the selection is that of the fp64 losses.
    """
    if w.dim() != 2:
        raise ValueError(f"w must be (blocks, block size); got shape {tuple(w.shape)}")
    nb, B = w.shape
    check_positive_int("block size", B)
    if block_shape(hinv) != (nb, B, B):
        raise ValueError(f"hinv must hold one ({B}, {B}) inverse per block of w, shape ({nb}, {B}, "
                         f"{B}); "
                         f"got {block_shape(hinv)}")
    for name, mask in (("valid", valid), ("forced", forced)):
        if mask is not None and tuple(mask.shape) != (nb, B):
            raise ValueError(f"{name} must have w's shape {(nb, B)}; got {tuple(mask.shape)}")
    nm = _nm_groups(B, nm)
    if loss_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"loss_dtype must be torch.float64 or torch.float32; got {loss_dtype!r}")
    order = torch.zeros(nb, B, dtype=order_dtype(B), device=w.device)
    losses = torch.full((nb, B), float("inf"), dtype=loss_dtype, device=w.device)
    page = min(nb, _page(B, w.device))
    work = _Work(page, B, w.device)
    for s in range(0, nb, page):
        e = min(nb, s + page)
        page_order, page_losses = _eliminate_page(
            work, w[s:e], read_blocks(hinv, s, e, work.H[: e - s]),
            None if valid is None else valid[s:e], None if forced is None else forced[s:e], nm)
        order[s:e], losses[s:e] = page_order.t(), stored_losses(page_losses.t(), loss_dtype)
    return order, losses


_F32_MAX = torch.finfo(torch.float32).max


def stored_losses(losses: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 ``losses`` in ``dtype``: fp32 rounded to nearest, with the finite values beyond fp32's
    range clamped to its largest finite value (so a loss that could be pruned stays finite: the
    counts of prunable weights do not change). Rounding to nearest is monotone, so a < b in fp32
    implies a < b in fp64: the stored order is the fp64 order up to ties."""
    if dtype == torch.float64 or losses.dtype == dtype:
        return losses
    big = losses.abs() > _F32_MAX
    if bool(big.any()):
        losses = torch.where(big & torch.isfinite(losses), losses.clamp(-_F32_MAX, _F32_MAX),
                             losses)
    return losses.to(dtype)


def cap_block_losses(w: torch.Tensor, hinv, blocks: torch.Tensor, *,
                     valid: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
    """The fp64 losses (n, B) of the blocks ``blocks`` (n,) long, bit for bit those
    :func:`cap_eliminate` computes (``w``, ``hinv``, ``valid``, ``forced`` and ``nm`` as there): the
    pages that hold them are eliminated again, with the same page boundaries and buffers. What
    :func:`cap_select` reads to break the ties of fp32-stored losses; cost: one page of
    eliminations per page involved."""
    nb, B = w.shape
    nm = _nm_groups(B, nm)
    out = torch.empty(blocks.numel(), B, dtype=torch.float64, device=w.device)
    if not blocks.numel():
        return out
    page = min(nb, _page(B, w.device))
    work = _Work(page, B, w.device)
    blocks = blocks.to(w.device)
    for p in torch.unique(torch.div(blocks, page, rounding_mode="floor")).tolist():
        s, e = p * page, min(nb, (p + 1) * page)
        _, page_losses = _eliminate_page(
            work, w[s:e], read_blocks(hinv, s, e, work.H[: e - s]),
            None if valid is None else valid[s:e], None if forced is None else forced[s:e], nm)
        here = (blocks >= s) & (blocks < e)
        out[here] = page_losses.t()[blocks[here] - s]
    return out


def order_dtype(B: int) -> torch.dtype:
    """The smallest integer dtype of the positions 0 .. B - 1 of a block (what
    :func:`cap_eliminate`'s elimination order is stored in)."""
    return torch.uint8 if B <= 256 else torch.int16 if B <= 1 << 15 else torch.long


class _Work:
    """Working buffers of one page, allocated once per call and reused by every page (a fresh 8 MiB
    allocation per page would pay its page faults again)."""

    def __init__(self, page: int, B: int, device):
        f64 = torch.float64
        self.H = torch.empty(page, B, B, dtype=f64, device=device)
        self.U = torch.empty(min(_LAZY, B), page, B, dtype=f64, device=device)
        self.W = torch.empty(page, B, dtype=f64, device=device)
        self.score = torch.empty(page, B, dtype=f64, device=device)
        self.bias = torch.empty(page, B, dtype=f64, device=device)
        # step-major: one row per step
        self.order = torch.empty(B, page, dtype=torch.long, device=device)
        self.losses = torch.empty(B, page, dtype=f64, device=device)
        self.base = torch.arange(0, page * B, B, device=device)  # offset of each block's first row


def _eliminate_page(work, w, hinv, valid, forced, nm):
    """The greedy elimination of one page of blocks, with the rank-1 downdates of the inverses
    delayed.

    After t steps the inverse is ``H_t = H_0 - U U^T`` with ``U = [u_1 ... u_t]``, ``u_s = col_s /
    sqrt(d_s)``. The greedy step needs only ``diag(H_t)`` (kept as a vector, ``-= u^2`` per step)
    and column ``j`` of ``H_t`` (row ``j`` of ``H`` minus ``sum_s u_s u_s[j]`` over the k delayed
    vectors, ``H`` being symmetric); every ``_LAZY`` steps the delayed vectors are folded into H
    with one batched GEMM (``baddbmm``). Same arithmetic as the step-by-step downdate ``H -= col
    col^T / d``, with about ``2 B / _LAZY`` times less memory traffic per step. Rows and entries are
    read through flat indices (``index_select``/``index_fill_`` on contiguous rows), not ``H[rows,
    :, j]`` gathers, and the delayed vectors are stored one contiguous (nb, B) slab each. Returns
    (order, losses) step-major, (B, nb).
    """
    nb, B = w.shape
    dev = w.device
    W = work.W[:nb]
    W.copy_(w)
    # the page's inverses, unpacked into the working buffer work.H by the caller (overwritten here)
    H = hinv
    Hf = H.view(nb * B, B)  # row b * B + i: row i (= column i) of block b
    diag = H.diagonal(dim1=-2, dim2=-1).clone()  # (nb, B) diag(H_t)
    Wf = W.view(-1)
    U = work.U[:, :nb]  # (K, nb, B) delayed downdate vectors
    K = U.shape[0]
    k = 0
    cand = torch.ones(nb, B, dtype=torch.bool, device=dev) if valid is None else valid.clone()
    force = torch.zeros_like(cand) if forced is None else (forced & cand)
    forced_left = bool(force.any())
    inf = float("inf")
    bias = work.bias[:nb]  # added to the scores: +inf where no longer a candidate
    bias.zero_().masked_fill_(~cand, inf)
    zeros_in_group = None
    if nm is not None:
        n, m = nm
        zeros_in_group = torch.zeros(nb, B // m, dtype=torch.long, device=dev)
    base = work.base[:nb]
    order, losses = work.order[:, :nb], work.losses[:, :nb]
    score = work.score[:nb]
    cum = torch.zeros(nb, dtype=torch.float64, device=dev)
    for t in range(B):
        # w^2 / (2 d) or inf
        torch.addcdiv(bias, W.square(), diag.clamp_min(1e-300), value=0.5, out=score)
        if forced_left:  # already pruned weights go first, at zero loss, in index order
            score.masked_fill_(force, -1.0)
        # (nb,): the first minimum, as argmin (and faster than argmin on CPU)
        step, j = score.min(1)
        flat = base + j
        ok = step < inf  # False where the block has no candidate left
        cum = torch.where(ok, cum + step.clamp_min(0), cum)
        order[t] = j
        losses[t] = torch.where(ok, cum, inf)
        col = Hf.index_select(0, flat)  # (nb, B) column j of H_0 minus the downdates folded so far
        if k:
            a = U[:k].reshape(k, nb * B).index_select(1, flat)  # (k, nb): u_s[j]
            for i in range(k):
                col.addcmul_(U[i], a[i, :, None], value=-1.0)
        dj = col.gather(1, j[:, None]).clamp_min_(1e-300)  # (nb, 1)
        coef = torch.where(ok[:, None], Wf.index_select(0, flat)[:, None] / dj, 0.0)
        W.addcmul_(coef, col, value=-1.0)  # OBS update of the remaining weights
        # (where not ok, j is no candidate: its value is never read again)
        Wf.index_fill_(0, flat, 0.0)
        u = torch.mul(col, torch.where(ok[:, None], dj.rsqrt(), 0.0), out=U[k])
        diag.addcmul_(u, u, value=-1.0)
        k += 1
        if k == K and t + 1 < B:
            # fold the delayed downdates
            H.baddbmm_(U.permute(1, 2, 0), U.permute(1, 0, 2), alpha=-1.0)
            k = 0
        bias.view(-1).index_fill_(0, flat, inf)
        if forced_left:
            force.view(-1).index_fill_(0, flat, False)
            forced_left = bool(force.any())
        if nm is not None:
            zeros_in_group.view(-1).index_add_(0, torch.div(flat, m, rounding_mode="floor"),
                                               ok.long())
            full = (zeros_in_group >= m - n).repeat_interleave(m, dim=1)
            bias.masked_fill_(full, inf)
            if forced_left:  # a forced weight in a group that has its zeros is no candidate either
                force &= ~full
                forced_left = bool(force.any())
    return order, losses


def cap_select(losses: torch.Tensor, k: int, block_groups: torch.Tensor | None = None,
               k_per_group: dict | list | None = None, exact=None) -> torch.Tensor:
    """Global merge: prune the ``k`` smallest recorded losses; returns per-block counts (nb,).

    The losses are non-decreasing along each block's order, and ties go by position (as in a stable
    sort), so each block's selection is a prefix of its elimination order. With ``block_groups``
    (nb,) and ``k_per_group`` (one count per group id), the merge is done within each group instead
    (uniform per-layer sparsity).

    ``exact(blocks) -> (n, B) fp64``: for losses stored in fp32 (rounded to nearest from fp64, e.g.
    by :func:`cap_block_losses`), the fp64 losses of the given blocks (of ``losses``' rows). The
    entries whose fp32 value is the threshold's are then ordered by their fp64 values (ties by
    position), so the counts are those of the selection over the fp64 losses, bit for bit: a
    value below the threshold in fp32 is below it in fp64 (rounding is monotone), and only the
    entries equal to it in fp32 can be in either order.
    """
    nb, B = losses.shape
    if block_groups is None:
        return _k_smallest(losses, k, exact)
    counts = torch.zeros(nb, dtype=torch.long, device=losses.device)
    for gid in torch.unique(block_groups).tolist():
        sel = block_groups == gid
        ids = sel.nonzero()[:, 0]
        sub = None if exact is None else (lambda b, ids=ids: exact(ids[b]))
        counts[sel] = _k_smallest(losses[sel], int(k_per_group[gid]), sub)
    return counts


def _k_smallest(losses: torch.Tensor, k: int, exact=None) -> torch.Tensor:
    nb, B = losses.shape
    finite = int(torch.isfinite(losses).sum())
    if not 0 <= k <= finite:
        raise ValueError(f"cannot prune {k} weights: only {finite} are prunable under the "
                         "constraints")
    # the k smallest with ties by position (what a stable sort's first k are), from one selection:
    # no sort
    counts = lowest_k_mask(losses, k).count_nonzero(1)
    if exact is None or losses.dtype == torch.float64 or k == 0:
        return counts
    return _exact_ties(losses, k, counts, exact)


def _exact_ties(losses: torch.Tensor, k: int, counts: torch.Tensor, exact) -> torch.Tensor:
    """The counts of the selection over the fp64 losses, from the counts over their fp32 values:
    only the entries equal to the threshold t (the k-th smallest fp32 value) can change; they are
    taken in the order of their fp64 values, then of their positions."""
    nb, B = losses.shape
    last = losses.gather(1, (counts - 1).clamp_min(0)[:, None])[:, 0]
    t = last[counts > 0].max()
    # each block's entries equal to t: the run [lo, hi) of its sorted row
    tt = t.expand(nb, 1).contiguous()
    lo = torch.searchsorted(losses, tt)[:, 0]
    hi = torch.searchsorted(losses, tt, right=True)[:, 0]
    rank = k - int(lo.sum())  # how many of the tied entries the fp64 selection takes
    tied = (hi > lo).nonzero()[:, 0]
    n_tied = int((hi - lo).sum())
    if rank == n_tied:  # every tied entry is taken: nothing to order
        return counts
    exact_rows = exact(tied)  # (n, B) fp64
    vals, blk = [], []
    for i, b in enumerate(tied.tolist()):
        a, z = int(lo[b]), int(hi[b])
        vals.append(exact_rows[i, a:z])
        blk.append(torch.full((z - a,), b, dtype=torch.long, device=losses.device))
    vals, blk = torch.cat(vals), torch.cat(blk)  # in position order
    taken = blk[torch.sort(vals, stable=True).indices[:rank]]
    return lo + torch.bincount(taken, minlength=nb)


def cap_apply(w: torch.Tensor, hinv: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
              out: torch.Tensor | None = None):
    """Weights after removing the first ``counts[b]`` weights of each block's ``order``: the joint
    OBS update ``w - H^{-1}_{:,P} (H^{-1}_{PP})^{-1} w_P`` with ``w_P`` set exactly to 0. Returns
    (new weights (nb, B) in w's dtype, pruned mask (nb, B) bool). Cost O(d B^2); the mask is built
    a page of blocks at a time (no (nb, B) int64 temporaries). ``out``: where the new weights go
    (may be ``w``), as in :func:`~hf_mfac.core.obs.block_obs_update`."""
    pruned = prefix_mask(order, counts)
    return block_obs_update(w, hinv, pruned, out=out)[0], pruned


def prefix_mask(order: torch.Tensor, counts: torch.Tensor, page: int = 1 << 14) -> torch.Tensor:
    """(nb, B) bool: True at the first ``counts[b]`` entries of each block's ``order`` (nb, B),
    built ``page`` blocks at a time."""
    nb, B = order.shape
    out = torch.empty(nb, B, dtype=torch.bool, device=order.device)
    steps = torch.arange(B, device=order.device)[None, :]
    for s in range(0, nb, page):
        e = min(nb, s + page)
        # (n, B) prefix of the order; scatter_add: after the last possible elimination the order
        # repeats index 0 (steps past counts)
        taken = (steps < counts[s:e, None]).long()
        hit = torch.zeros(e - s, B, dtype=torch.long, device=order.device)
        out[s:e] = hit.scatter_add_(1, order[s:e].long(), taken) > 0
    return out


def cap_prune(w: torch.Tensor, hinv: torch.Tensor, k: int, *, valid=None, forced=None, nm=None,
              block_groups=None, k_per_group=None):
    """Eliminate, merge and apply in one call. ``k`` is the total number of weights to prune
    (counting the ``forced`` ones); with ``nm`` every group gets exactly M - N zeros and ``k`` is
    ignored. Returns (new weights (nb, B), pruned mask (nb, B), losses (nb, B))."""
    check_positive_int("block size", w.shape[1])
    order, losses = cap_eliminate(w, hinv, valid=valid, forced=forced, nm=nm)
    if nm is not None:
        counts = torch.isfinite(losses).sum(1)
    else:
        counts = cap_select(losses, k, block_groups, k_per_group)
    new, pruned = cap_apply(w, hinv, order, counts)
    return new, pruned, losses
