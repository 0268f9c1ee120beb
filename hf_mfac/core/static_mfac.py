"""Static M-FAC: the pruner's inverse empirical Fisher over a fixed set of m gradients, full or
block-wise [M-FAC, App. C].

Convention ([M-FAC, Theorem 1]): ``F = damp * I + (1/m) * sum_i g_i g_i^T``. With ``G`` the (m, d)
matrix of gradients, :class:`StaticMFAC` factors ``K = m * damp * I + G G^T = L L^T`` once and keeps
``W = L^{-1} G`` in the memory of G, so that ``F^{-1} = (I - W^T W) / damp``: products, the
diagonal, single elements and small submatrices of ``F^{-1}`` are then O(dm) or O(m) queries. The
sliding window of the optimizer is :class:`hf_mfac.core.ihvp.DynamicMFAC`.
"""
from __future__ import annotations

import torch

from ._checks import (
    check_finite,
    check_float_tensor,
    check_positive_int,
    damped_cholesky,
    page_bytes,
)
from .fisher import check_damping, relative_damp

__all__ = ["StaticMFAC"]


def _default_page_columns(m: int, element_size: int, page_bytes: int | None) -> int | None:
    if page_bytes is None:
        return None
    return max(1, int(page_bytes) // max(1, m * element_size))


class StaticMFAC:
    """Static M-FAC inverse [M-FAC, "static algorithm", App. C], full or block-wise.

    ``grads`` (m, d) holds m gradients. The precomputation factors ``K = m*damp*I + G G^T = L L^T``
    and replaces G, in its own memory as in appendix C, by ``W = L^{-1} G``, which plays the role of
    the paper's ``V / sqrt(q)`` (eq. 24): ``F^{-1} x = (x - W^T W x) / damp`` (eq. 24, O(dm)),
    ``diag(F^{-1}) = (1 - sum_i W_i^2) / damp`` (eq. 25, O(dm)), and one element ``[F^{-1}]_ij =
    (delta_ij - W[:, i] . W[:, j]) / damp`` in O(m). Precomputation: O(dm^2) as two GEMM-shaped
    passes (``G G^T`` and the triangular solve) plus O(m^3), instead of the m sequential
    matrix-vector steps of Algorithm 3.

    ``block_size=B`` applies the same per block of B consecutive coordinates (the last block may be
    shorter), many blocks at once with batched matmuls and batched Cholesky; memory m*d values plus
    m^2 per block of the current page.

    Paging (appendix C.1): ``grads`` may stay in host memory while ``device`` (e.g. "cuda") does the
    work; pages of columns (whole blocks in block-wise mode) of at most ``page_bytes`` are moved to
    ``device``, processed and written back. Because every column of W depends only on its own column
    of G and the m x m factor, two passes over the pages suffice (the paper's swap scheme needs
    O(k^2) page swaps). With ``page_bytes=None`` nothing is paged out, but the work still runs in
    pages of at most ``work_bytes`` of fp64 temporaries (8 MiB on CPU): the build needs W's own
    memory plus O(page), not several copies of G.

    Damping: ``damp`` (one absolute λ) or ``rel_damp`` (λ_b a fraction of the mean Fisher diagonal
    ``|G_:,j|^2 / m`` over the live columns of each group of blocks, ``damp_groups`` (n_blocks,)
    int, default each block alone; :func:`hf_mfac.core.fisher.relative_damp`: unchanged in relative
    terms when the gradients are scaled). ``block_damp`` (n_blocks,) holds the λ_b used.

    ``grads`` is overwritten with W unless ``copy=True``. Precision: W is kept in the dtype of
    ``grads``; the m x m factorisations run in fp64. The diagonal suffers cancellation when ``1 -
    sum W^2`` is tiny (tiny damp): pass fp64 grads where that matters.
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float | None = None,
        block_size: int | None = None,
        *,
        rel_damp: float | None = None,
        damp_groups: torch.Tensor | None = None,
        device=None,
        page_bytes: int | None = None,
        copy: bool = False,
    ):
        check_float_tensor("grads", grads, ndim=2)
        if grads.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"grads must be float32 or float64 for StaticMFAC; got {grads.dtype}")
        if grads.shape[0] == 0 or grads.shape[1] == 0:
            raise ValueError(
                "grads must hold at least one gradient of at least one coordinate; "
                "got shape "
                f"{tuple(grads.shape)} (m gradients x d coordinates)"
            )
        check_finite("grads", grads)
        self.damp, self.rel_damp = check_damping(damp, rel_damp)
        self.num_grads, self.dim = grads.shape
        if block_size is not None:
            block_size = check_positive_int("block_size", block_size)
        self.block_size = self.dim if block_size is None else min(block_size, self.dim)
        self.device = torch.device(device) if device is not None else grads.device
        self.W = grads.clone() if copy else grads  # (m, d), becomes W = L^{-1} G
        self.page_bytes = page_bytes
        self.block_damp = self._block_damps(damp_groups)  # (n_blocks,) fp64
        # 1/λ per coordinate for the queries (d,), or one number when all blocks share one λ
        self._inv_damp = (
            1.0 / float(self.block_damp[0])
            if self.rel_damp is None or len(self.block_damp) == 1
            else (1.0 / self.block_damp).repeat_interleave(self._block_widths()).to(self.W.device)
        )
        if self.block_size >= self.dim:
            self._precompute_full()
        else:
            self._precompute_blocks()

    # -- precomputation
    # -------------------------------------------------------------------------------- fp64 bytes of
    # one working page of the precomputation (its temporaries are a few times this): with or without
    # ``page_bytes`` the pages never exceed it, so the build needs O(page) memory besides W
    # (measured on CPU: 8 MiB pages keep the GEMMs and triangular solves as fast as one big page).
    work_bytes = {"cpu": 8 << 20}
    default_work_bytes = 256 << 20  # accelerators

    def _pages(self, width: int):
        """Column ranges (start, stop) of at most ``page_bytes`` and of at most ``work_bytes`` of
        fp64 temporaries, each a multiple of ``width`` columns (one block at least)."""
        cols = _default_page_columns(self.num_grads, self.W.element_size(), self.page_bytes)
        work = max(
            1,
            page_bytes(self.device, self.work_bytes, self.default_work_bytes)
            // (8 * self.num_grads),
        )
        cols = work if cols is None else min(cols, work)
        step = max(width, cols // width * width)
        return [(s, min(s + step, self.dim)) for s in range(0, self.dim, step)]

    def _load(self, s: int, e: int) -> torch.Tensor:
        return self.W[:, s:e].to(self.device, non_blocking=True)

    def _store(self, s: int, e: int, page: torch.Tensor) -> None:
        """Write ``page`` ((m, e - s), or (m, n, B) for n blocks of B) over columns [s, e) of W, in
        one copy."""
        self.W[:, s:e].view(page.shape).copy_(page)

    def _block_widths(self) -> torch.Tensor:
        return torch.tensor(
            [B for _, nb, B in self._segments() for _ in range(nb)], device=self.W.device
        )

    def _block_damps(self, groups) -> torch.Tensor:
        """λ_b (n_blocks,): ``damp``, or ``rel_damp`` times the mean of diag(G^T G / m) over each
        group of blocks (``groups`` (n_blocks,) int, e.g. the target tensor of each block; None:
        each block alone). One O(dm) pass over G for the column norms."""
        widths = self._block_widths()
        if self.rel_damp is None:
            return torch.full((len(widths),), self.damp, dtype=torch.float64, device=self.W.device)
        sq = torch.empty(self.dim, dtype=torch.float64, device=self.W.device)
        # 4 MiB of fp64 per chunk, squared in place
        step = max(1, (4 << 20) // (8 * self.num_grads))
        for s in range(0, self.dim, step):
            torch.sum(
                self.W[:, s : s + step].to(torch.float64, copy=True).square_(),
                0,
                out=sq[s : s + step],
            )
        sq /= self.num_grads
        # (d,) block of each column
        block = torch.arange(len(widths), device=sq.device).repeat_interleave(widths)
        sums = torch.zeros(len(widths), dtype=torch.float64, device=sq.device).index_add_(
            0, block, sq
        )
        counts = torch.zeros(len(widths), dtype=torch.float64, device=sq.device).index_add_(
            0, block, (sq > 0).double()
        )
        if groups is not None:
            groups = torch.as_tensor(groups, device=sq.device).long()
            if groups.shape != (len(widths),):
                raise ValueError(
                    f"damp_groups must have one entry per block ({len(widths)},); got "
                    f"{tuple(groups.shape)}"
                )
        return relative_damp(sums, counts, self.rel_damp, groups)

    def _precompute_full(self) -> None:
        m = self.num_grads
        GGt = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        pages = self._pages(1)
        for s, e in pages:  # pass 1: K = m*damp*I + G G^T
            page = self._load(s, e)
            GGt += (page @ page.T).to(torch.float64)
        shift = m * float(self.block_damp[0])
        K = GGt + shift * torch.eye(m, dtype=torch.float64, device=self.device)
        L, _ = damped_cholesky(K, shift, "StaticMFAC")
        for s, e in pages:  # pass 2: W = L^{-1} G, page by page
            page = self._load(s, e)
            W = torch.linalg.solve_triangular(L, page.to(torch.float64), upper=False)
            self._store(s, e, W.to(self.W.dtype))

    def _segments(self):
        """(start, n_blocks, block) triples covering [0, d): the full blocks, then the shorter last
        one."""
        B, d = self.block_size, self.dim
        nfull, rest = divmod(d, B)
        segs = [(0, nfull, B)] if nfull else []
        if rest:
            segs.append((nfull * B, 1, rest))
        return segs

    def _precompute_blocks(self) -> None:
        m = self.num_grads
        first = 0  # index of the first block of the current segment
        for start, nb, B in self._segments():
            s0, e0 = self._pages(B)[0]
            per_page = max(1, (e0 - s0) // B)
            for b0 in range(0, nb, per_page):
                b1 = min(nb, b0 + per_page)
                s, e = start + b0 * B, start + b1 * B
                # (nb, m, B)
                Gb = self._load(s, e).reshape(m, b1 - b0, B).permute(1, 0, 2).to(torch.float64)
                K = Gb @ Gb.mT  # (nb, m, m)
                shift = m * self.block_damp[first + b0 : first + b1].to(Gb.device)  # (nb,)
                K.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
                L, _ = damped_cholesky(K, shift, "StaticMFAC(block)")
                Wb = torch.linalg.solve_triangular(L, Gb, upper=False)  # (nb, m, B)
                # (m, nb, B): reordered and cast by the copy itself
                self._store(s, e, Wb.permute(1, 0, 2))
            first += nb

    # -- queries
    # ---------------------------------------------------------------------------------------
    def _blocks_view(self, v: torch.Tensor, start: int, nb: int, B: int):
        return v[..., start : start + nb * B].unflatten(-1, (nb, B))

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^{-1} x`` for x (d,) (eq. 24), O(dm); returned on x's device in W's dtype."""
        check_float_tensor("x", x)
        if x.numel() != self.dim:
            raise ValueError(f"x has {x.numel()} elements; expected dim={self.dim}")
        xw = x.reshape(-1).to(device=self.W.device, dtype=self.W.dtype)
        if self.block_size >= self.dim:
            y = xw - (self.W @ xw) @ self.W
        else:
            y = torch.empty_like(xw)
            for start, nb, B in self._segments():
                Wb = self._blocks_view(self.W, start, nb, B)  # (m, nb, B)
                xb = xw[start : start + nb * B].view(nb, B)
                t = torch.einsum("mnb,nb->mn", Wb, xb)
                y[start : start + nb * B] = (xb - torch.einsum("mnb,mn->nb", Wb, t)).reshape(-1)
        return (y * self._inv_damp_as(y)).to(x.device)

    def _inv_damp_as(self, like: torch.Tensor, index=None):
        """1/λ of each coordinate (a number when it is the same for all) in ``like``'s dtype and
        device."""
        inv = self._inv_damp
        if isinstance(inv, float):
            return inv
        inv = inv if index is None else inv[index]
        return inv.to(device=like.device, dtype=like.dtype)

    # Columns of the fp64 accumulator of diag(), per device type: 512 KiB on the CPU, so that it and
    # one row's slice stay in L2. Device types not listed (accelerators) reduce whole chunks
    # instead.
    diag_columns = {"cpu": 1 << 16}

    def diag(self) -> torch.Tensor:
        """``diag(F^{-1})`` (d,) (eq. 25), O(dm), in W's dtype; ``sum_i W_i^2`` is accumulated in
        fp64 (the squares of fp32 values are exact there), over column chunks (bounded temporaries).

        CPU: row by row into an fp64 accumulator of ``diag_columns`` columns that stays in cache (m
        fused multiply-adds per chunk instead of an fp64 copy of the whole chunk and a reduction
        over its rows); other devices: one fp64 reduction per chunk of 4 MiB. ``(1 - sum) / λ`` is
        formed in place."""
        W, inv = self.W, self._inv_damp
        m, d = W.shape
        out = torch.empty(d, dtype=W.dtype, device=W.device)
        cols = self.diag_columns.get(W.device.type)
        step = min(d, cols) if cols else max(1, (4 << 20) // (8 * m))
        if cols:
            acc = torch.empty(step, dtype=torch.float64, device=W.device)
            row = None if W.dtype == torch.float64 else torch.empty_like(acc)
        for s in range(0, d, step):
            e = min(d, s + step)
            if cols:
                sq = acc[: e - s]
                sq.copy_(W[0, s:e]).square_()
                for i in range(1, m):
                    r = W[i, s:e] if row is None else row[: e - s].copy_(W[i, s:e])
                    sq.addcmul_(r, r)
            else:
                sq = W[:, s:e].to(torch.float64, copy=True).square_().sum(0)
            out[s:e] = sq.neg_().add_(1.0).mul_(inv if isinstance(inv, float) else inv[s:e])
        return out

    def _block_of(self, i: torch.Tensor) -> torch.Tensor:
        return torch.div(i, self.block_size, rounding_mode="floor")

    def element(self, i, j) -> torch.Tensor:
        """``[F^{-1}]_ij`` for index tensors (or ints) i, j of the same shape; O(m) each."""
        i = torch.as_tensor(i, device=self.W.device)
        j = torch.as_tensor(j, device=self.W.device)
        if bool(((i < 0) | (i >= self.dim) | (j < 0) | (j >= self.dim)).any()):
            raise IndexError(f"indices must lie in [0, {self.dim})")
        dot = (self.W[:, i].to(torch.float64) * self.W[:, j].to(torch.float64)).sum(0)
        val = ((i == j).to(torch.float64) - dot) * self._inv_damp_as(dot, i)
        same = self._block_of(i) == self._block_of(j)
        return torch.where(same, val, torch.zeros_like(val)).to(self.W.dtype)

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``[F^{-1}]_QQ`` for index sets ``idx`` (n, g) -> (n, g, g), O(n g^2 m)."""
        idx = torch.as_tensor(idx, device=self.W.device)
        return self.element(
            idx[:, :, None].expand(-1, -1, idx.shape[1]),
            idx[:, None, :].expand(-1, idx.shape[1], -1),
        )

    def column(self, j: int) -> torch.Tensor:
        """``F^{-1} e_j`` (d,), O(dm) (zero outside j's block in block-wise mode)."""
        e = torch.zeros(self.dim, dtype=self.W.dtype, device=self.W.device)
        e[j] = 1
        return self.mul(e)
