"""Inverse-Hessian-vector products with the empirical Fisher: M-FAC dynamic and static algorithms.

Convention (seed 000 Theorem 1, seed 002): ``F = damp * I + (1/m) * sum_i g_i g_i^T``; ``mul(x)`` returns
``F^{-1} x`` and ``diag()`` returns ``diag(F^{-1})``. With ``G`` the (m, d) matrix of gradients and
``K = m * damp * I + G G^T`` the Woodbury identity gives

    F^{-1} x = (x - G^T K^{-1} G x) / damp.

The dynamic algorithm (:class:`DynamicMFAC`) keeps G as a ring buffer with ``G G^T`` up to date; the
static algorithm (:class:`StaticMFAC`) factors ``K = L L^T`` once and keeps ``W = L^{-1} G`` in the memory
of G, so that ``F^{-1} = (I - W^T W) / damp``.
"""
from __future__ import annotations


import torch

from .. import kernels
from .fisher import check_damping, relative_damp
from ._checks import (
    check_damp,
    check_finite,
    check_float_tensor,
    check_positive_int,
    damped_cholesky,
)

__all__ = ["DynamicMFAC", "StaticMFAC"]


def _storage_dtype(grad_dtype, dtype: torch.dtype) -> torch.dtype:
    if grad_dtype is None:
        return dtype
    if isinstance(grad_dtype, str):
        grad_dtype = getattr(torch, grad_dtype.replace("torch.", ""), None)
    if grad_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"grad_dtype must be float16, bfloat16, float32 or float64; got {grad_dtype!r}")
    return grad_dtype


class DynamicMFAC:
    """Sliding-window inverse empirical Fisher (seed 002 "dynamic algorithm", seed 000 appendix B).

    Holds the last ``num_grads`` (m) gradients of dimension ``dim`` (d) in a ring buffer ``G`` (m, d)
    together with ``GGt = G G^T`` (m, m, fp64). ``update(g)`` replaces the oldest gradient,
    ``mul(x)`` returns ``F^{-1} x`` for the current window and ``update_mul(g)`` does both with a single
    product ``p = G g`` (appendix B: the new row of ``G G^T`` is also the right-hand side of the solve).

    Cost per call: two passes over G (``G x`` and ``G^T c``, each O(dm)), one O(m^3/3) fp64 Cholesky of the
    m x m system after each update (cached until the next one) and O(m^2) for the solves. Memory: m*d
    values of ``grad_dtype`` plus 8*m^2 bytes. Storing G in bf16/fp16 halves memory and the O(dm) time;
    products are always accumulated in fp32 (fp64 if ``dtype`` is fp64). With low-precision storage
    ``update_mul`` multiplies the stored (rounded) gradient, so that the in-span part cancels exactly.

    The Woodbury system ``K = s*damp*I + G G^T`` is solved by Cholesky instead of the paper's D/B
    recursion: the two are the same LDL^T factorisation of ``G G^T / damp + s I`` (seed 000 appendix B;
    :func:`hf_mfac.kernels.mfac_coefficients` gives D and B explicitly), and cuSOLVER/LAPACK Cholesky is
    the strong baseline the tiled B kernel has to beat.

    Numerics: the m x m system is factorised in fp64, but ``G G^T`` is only as exact as the products
    over G (fp32 accumulation: error ~ eps32 * |g|^2). A ``damp`` far below that level makes the
    system numerically indefinite; the factorisation then retries with 10x, 100x, ... more damping,
    warns once and counts the occurrences in ``fallbacks``; results are never silently non-finite.

    Sharding (DESIGN.md §1.3): with ``allreduce`` given, this object holds only a shard of the
    coordinates (``dim`` is the shard's size) and ``allreduce(p)`` sums the partial products ``p = G_r x_r``
    over all shards in place (e.g. ``torch.distributed.all_reduce``). Everything m x m is then identical
    on every shard, and ``mul``/``update_mul`` return this shard's part of ``F^{-1} x`` for the Fisher over
    all coordinates. Communication: one m-vector per call.

    Before the window is full: by default (``normalize_by_seen=False``) the Fisher is divided by m as in
    the paper, i.e. the missing gradients count as zeros. With ``normalize_by_seen=True`` it is divided by
    the number n of gradients held, ``F = damp*I + (1/n) sum_i g_i g_i^T``. Both agree once the window is
    full.
    """

    def __init__(self, dim: int, num_grads: int, damp: float, device=None, dtype: torch.dtype = torch.float32,
                 grad_dtype=None, normalize_by_seen: bool = False, allreduce=None):
        self.dim = check_positive_int("dim", dim)
        self.num_grads = check_positive_int("num_grads", num_grads)
        self.damp = check_damp(damp)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype (the compute dtype) must be torch.float32 or torch.float64; got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalize_by_seen = bool(normalize_by_seen)
        self.allreduce = allreduce  # sums an m-vector across coordinate shards in place (None: unsharded)
        storage = _storage_dtype(grad_dtype, dtype)
        self.G = torch.zeros(self.num_grads, self.dim, dtype=storage, device=self.device)  # (m, d)
        self.GGt = torch.zeros(self.num_grads, self.num_grads, dtype=torch.float64, device=self.device)  # (m, m)
        self.ptr = 0  # next slot to overwrite
        self.count = 0  # slots in use; they are always G[:count]
        self._chol = None  # Cholesky factor of K for the current window (fp64), None when stale
        self.fallbacks = 0  # factorisations that needed extra damping (warned about once)

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def grad_dtype(self) -> torch.dtype:
        return self.G.dtype

    def _scale(self, n: int) -> float:
        return float(n if self.normalize_by_seen else self.num_grads)

    def _vector(self, name: str, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(name, x)
        if x.numel() != self.dim:
            raise ValueError(f"{name} has {x.numel()} elements; this DynamicMFAC was built for dim={self.dim}")
        x = x.reshape(-1).to(device=self.device)
        check_finite(name, x)
        return x

    def _reduce(self, p: torch.Tensor) -> torch.Tensor:
        if self.allreduce is not None:
            self.allreduce(p)
        return p

    def _factor(self) -> torch.Tensor:
        if self._chol is None:
            n = self.count
            shift = self._scale(n) * self.damp
            K = self.GGt[:n, :n] + shift * torch.eye(n, dtype=torch.float64, device=self.device)
            self._chol, extra = damped_cholesky(K, shift, "DynamicMFAC", warn=self.fallbacks == 0)
            if float(extra.max()) > 0:
                self.fallbacks += 1
        return self._chol

    def _solve(self, p: torch.Tensor) -> torch.Tensor:
        """c = K^{-1} p, (n,) in fp64."""
        return torch.cholesky_solve(p.to(torch.float64)[:, None], self._factor())[:, 0]

    def _insert(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write g into the ring buffer; return (p = G_new g_stored, g_stored) in the compute dtype."""
        slot = self.ptr
        self.G[slot] = g  # casts to the storage dtype
        n = min(self.count + 1, self.num_grads)
        g_stored = self.G[slot].to(self.dtype)
        p = self._reduce(kernels.window_matvec(self.G[:n], g_stored, self.dtype))  # (n,) one pass over G
        p64 = p.to(torch.float64)
        self.GGt[slot, :n] = p64
        self.GGt[:n, slot] = p64
        self.count = n
        self.ptr = (slot + 1) % self.num_grads
        self._chol = None
        return p, g_stored

    def _finish(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(x - G^T K^{-1} p) / damp with p = G x."""
        c = self._solve(p).to(self.dtype)  # (n,)
        return (x - kernels.window_rmatvec(self.G[: self.count], c, self.dtype)) / self.damp  # (d,)

    # -- public interface ------------------------------------------------------------------------------
    def update(self, g: torch.Tensor) -> None:
        """Add gradient ``g`` (d,), replacing the oldest once m are held. Raises on NaN/inf (window unchanged)."""
        self._insert(self._vector("g", g))

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``F^{-1} x`` (d,) in the compute dtype on the window's device. O(dm + m^2)."""
        x = self._vector("x", x).to(self.dtype)
        if self.count == 0:
            return x / self.damp
        return self._finish(x, self._reduce(kernels.window_matvec(self.G[: self.count], x, self.dtype)))

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``update(g)`` then ``mul(g)``, reusing ``p = G g``: two passes over G instead of three."""
        p, g_stored = self._insert(self._vector("g", g))
        return self._finish(g_stored, p)

    def reset(self) -> None:
        """Forget all gradients."""
        self.G.zero_()
        self.GGt.zero_()
        self.ptr = self.count = 0
        self._chol = None

    def state_dict(self) -> dict:
        """Tensors and plain types only (loadable with ``torch.load(weights_only=True)``)."""
        return {"G": self.G, "GGt": self.GGt, "ptr": self.ptr, "count": self.count,
                "num_grads": self.num_grads, "dim": self.dim, "damp": self.damp,
                "normalize_by_seen": self.normalize_by_seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore a window saved by :meth:`state_dict` (dtype of G is kept as saved)."""
        G, GGt = state["G"], state["GGt"]
        if tuple(G.shape) != (self.num_grads, self.dim) or tuple(GGt.shape) != (self.num_grads, self.num_grads):
            raise ValueError(
                f"saved window has shape {tuple(G.shape)}; this DynamicMFAC holds ({self.num_grads}, {self.dim}). "
                "num_grads and the set of trained parameters must match the checkpoint."
            )
        self.G = G.to(self.device).clone()
        self.GGt = GGt.to(device=self.device, dtype=torch.float64).clone()
        self.ptr, self.count = int(state["ptr"]), int(state["count"])
        self._chol = None


def _default_page_columns(m: int, element_size: int, page_bytes: int | None) -> int | None:
    if page_bytes is None:
        return None
    return max(1, int(page_bytes) // max(1, m * element_size))


class StaticMFAC:
    """Static M-FAC inverse (seed 002 "static algorithm", seed 000 appendix C), full or block-wise.

    ``grads`` (m, d) holds m gradients. The precomputation factors ``K = m*damp*I + G G^T = L L^T`` and
    replaces G, in its own memory as in appendix C, by ``W = L^{-1} G``, which plays the role of the
    paper's ``V / sqrt(q)`` (eq. 24): ``F^{-1} x = (x - W^T W x) / damp`` (eq. 24, O(dm)),
    ``diag(F^{-1}) = (1 - sum_i W_i^2) / damp`` (eq. 25, O(dm)), and one element
    ``[F^{-1}]_ij = (delta_ij - W[:, i] . W[:, j]) / damp`` in O(m). Precomputation: O(dm^2) as two
    GEMM-shaped passes (``G G^T`` and the triangular solve) plus O(m^3), instead of the m sequential
    matrix-vector steps of Algorithm 3.

    ``block_size=B`` applies the same per block of B consecutive coordinates (the last block may be
    shorter), many blocks at once with batched matmuls and batched Cholesky; memory m*d values plus
    m^2 per block of the current page.

    Paging (appendix C.1): ``grads`` may stay in host memory while ``device`` (e.g. "cuda") does the work;
    pages of columns (whole blocks in block-wise mode) of at most ``page_bytes`` are moved to ``device``,
    processed and written back. Because every column of W depends only on its own column of G and the
    m x m factor, two passes over the pages suffice (the paper's swap scheme needs O(k^2) page swaps).
    With ``page_bytes=None`` everything is processed in one go on ``device``.

    Damping: ``damp`` (one absolute λ) or ``rel_damp`` (λ_b a fraction of the mean Fisher diagonal
    ``|G_:,j|^2 / m`` over the live columns of each group of blocks, ``damp_groups`` (n_blocks,) int, default each
    block alone; :func:`hf_mfac.core.fisher.relative_damp`: unchanged in relative terms when the gradients are
    scaled). ``block_damp`` (n_blocks,) holds the λ_b used.

    ``grads`` is overwritten with W unless ``copy=True``. Precision: W is kept in the dtype of ``grads``;
    the m x m factorisations run in fp64. The diagonal suffers cancellation when ``1 - sum W^2`` is tiny
    (tiny damp): pass fp64 grads where that matters.
    """

    def __init__(self, grads: torch.Tensor, damp: float | None = None, block_size: int | None = None, *,
                 rel_damp: float | None = None, damp_groups: torch.Tensor | None = None, device=None,
                 page_bytes: int | None = None, copy: bool = False):
        check_float_tensor("grads", grads, ndim=2)
        if grads.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"grads must be float32 or float64 for StaticMFAC; got {grads.dtype}")
        if grads.shape[0] == 0 or grads.shape[1] == 0:
            raise ValueError(f"grads must hold at least one gradient of at least one coordinate; got shape "
                             f"{tuple(grads.shape)} (m gradients x d coordinates)")
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
        self._inv_damp = (1.0 / float(self.block_damp[0]) if self.rel_damp is None or len(self.block_damp) == 1 else
                          (1.0 / self.block_damp).repeat_interleave(self._block_widths()).to(self.W.device))
        if self.block_size >= self.dim:
            self._precompute_full()
        else:
            self._precompute_blocks()

    # -- precomputation --------------------------------------------------------------------------------
    def _pages(self, width: int):
        """Column ranges (start, stop) of at most ``page_bytes``, each a multiple of ``width`` columns."""
        cols = _default_page_columns(self.num_grads, self.W.element_size(), self.page_bytes)
        step = self.dim if cols is None else max(width, cols // width * width)
        return [(s, min(s + step, self.dim)) for s in range(0, self.dim, step)]

    def _load(self, s: int, e: int) -> torch.Tensor:
        return self.W[:, s:e].to(self.device, non_blocking=True)

    def _store(self, s: int, e: int, page: torch.Tensor) -> None:
        self.W[:, s:e].copy_(page)

    def _block_widths(self) -> torch.Tensor:
        return torch.tensor([B for _, nb, B in self._segments() for _ in range(nb)], device=self.W.device)

    def _block_damps(self, groups) -> torch.Tensor:
        """λ_b (n_blocks,): ``damp``, or ``rel_damp`` times the mean of diag(G^T G / m) over each group of blocks
        (``groups`` (n_blocks,) int, e.g. the target tensor of each block; None: each block alone). One O(dm)
        pass over G for the column norms."""
        widths = self._block_widths()
        if self.rel_damp is None:
            return torch.full((len(widths),), self.damp, dtype=torch.float64, device=self.W.device)
        sq = torch.empty(self.dim, dtype=torch.float64, device=self.W.device)
        step = max(1, (32 << 20) // (8 * self.num_grads))
        for s in range(0, self.dim, step):
            sq[s : s + step] = (self.W[:, s : s + step].to(torch.float64) ** 2).sum(0) / self.num_grads
        block = torch.arange(len(widths), device=sq.device).repeat_interleave(widths)  # (d,) block of each column
        sums = torch.zeros(len(widths), dtype=torch.float64, device=sq.device).index_add_(0, block, sq)
        counts = torch.zeros(len(widths), dtype=torch.float64, device=sq.device).index_add_(0, block, (sq > 0).double())
        if groups is not None:
            groups = torch.as_tensor(groups, device=sq.device).long()
            if groups.shape != (len(widths),):
                raise ValueError(f"damp_groups must have one entry per block ({len(widths)},); got {tuple(groups.shape)}")
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
        """(start, n_blocks, block) triples covering [0, d): the full blocks, then the shorter last one."""
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
            per_page = max(1, (self._pages(B)[0][1] - self._pages(B)[0][0]) // B) if self.page_bytes else nb
            for b0 in range(0, nb, per_page):
                b1 = min(nb, b0 + per_page)
                s, e = start + b0 * B, start + b1 * B
                Gb = self._load(s, e).reshape(m, b1 - b0, B).permute(1, 0, 2).to(torch.float64)  # (nb, m, B)
                K = Gb @ Gb.mT  # (nb, m, m)
                shift = m * self.block_damp[first + b0 : first + b1].to(Gb.device)  # (nb,)
                K.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
                L, _ = damped_cholesky(K, shift, "StaticMFAC(block)")
                Wb = torch.linalg.solve_triangular(L, Gb, upper=False)  # (nb, m, B)
                self._store(s, e, Wb.permute(1, 0, 2).reshape(m, e - s).to(self.W.dtype))
            first += nb

    # -- queries ---------------------------------------------------------------------------------------
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
        """1/λ of each coordinate (a number when it is the same for all) in ``like``'s dtype and device."""
        inv = self._inv_damp
        if isinstance(inv, float):
            return inv
        inv = inv if index is None else inv[index]
        return inv.to(device=like.device, dtype=like.dtype)

    def diag(self) -> torch.Tensor:
        """``diag(F^{-1})`` (d,) (eq. 25), O(dm), accumulated in fp64 over column chunks (bounded temporaries)."""
        sq = torch.empty(self.dim, dtype=torch.float64, device=self.W.device)
        step = max(1, (32 << 20) // (8 * self.num_grads))  # 32 MiB of fp64 per chunk
        for s in range(0, self.dim, step):
            sq[s : s + step] = (self.W[:, s : s + step].to(torch.float64) ** 2).sum(0)
        return ((1.0 - sq) * self._inv_damp_as(sq)).to(self.W.dtype)

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
        return self.element(idx[:, :, None].expand(-1, -1, idx.shape[1]), idx[:, None, :].expand(-1, idx.shape[1], -1))

    def column(self, j: int) -> torch.Tensor:
        """``F^{-1} e_j`` (d,), O(dm) (zero outside j's block in block-wise mode)."""
        e = torch.zeros(self.dim, dtype=self.W.dtype, device=self.W.device)
        e[j] = 1
        return self.mul(e)
