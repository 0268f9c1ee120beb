"""Dynamic M-FAC with a compressed gradient window: top-k rows and error feedback [EFCP].

The window of :class:`~hf_mfac.core.DynamicMFAC` holds m full gradients (m * d values: 450 GB at d =
1.1e8, m = 1024). Following [EFCP, Alg. 1] each new gradient ``g_t`` is first added to an error
buffer, ``a_t = e_{t-1} + g_t``; the window receives only ``c_t = TopK(a_t)`` (the largest entries
by magnitude, a fraction ``density`` of each block of the flat vector), and what was dropped stays
in the buffer, ``e_t = a_t - c_t``, to be added to the next gradient. The window then stores per row
the k indices (int16 within a block of at most 2^15 coordinates, else int32) and values of ``c_t``:
about ``density * m * d * (2 + 4)`` bytes instead of ``4 * m * d``.

Everything m x m (``G G^T``, its fp64 Cholesky with the damped fallback, the ring position,
``normalize_by_seen``, sharding) is that of :class:`~hf_mfac.core.DynamicMFAC`; only the O(dm)
products differ: ``G x`` gathers x at the stored indices, ``G^T c`` scatters with ``index_add``. """

from __future__ import annotations

import math

import torch

from ._checks import all_finite, check_int, check_real, free_bytes
from .ihvp import DynamicMFAC, GradientRejected

__all__ = [
    "CompressedMFAC",
    "compressed_window_bytes",
    "check_density",
    "index_dtype",
    "kept_per_block",
    "DEFAULT_BLOCK_SIZE",
]

# Coordinates per block of the top-k selection: the largest block whose indices fit int16.
DEFAULT_BLOCK_SIZE = 1 << 15
_INT16_SPAN = 1 << 15  # blocks up to this length index their coordinates with int16
_CHUNK_ENTRIES = (
    1 << 22
)  # window entries per chunk of the products (bounds their int64 index temporaries)


def check_density(density) -> float:
    """``density`` as a float in (0, 1]: the fraction of each block the window keeps."""
    return check_real("density", density, low=0.0, low_open=True, high=1.0)


def kept_per_block(n: int, density: float) -> int:
    """Entries a block of ``n`` coordinates keeps: ``ceil(density * n)`` (at least 1), with the
    product rounded to 6 decimals first so that e.g. 0.07 * 100 keeps 7, not 8."""
    return max(1, math.ceil(round(density * n, 6)))


def _layout(dim: int, density: float, block_size: int) -> tuple[int, int, int, int, int]:
    """``(block, blocks, k_block, rest, k_rest)``: ``blocks`` full blocks of ``block`` coordinates
    keep ``k_block`` each, the last partial block of ``rest`` coordinates keeps ``k_rest``."""
    block = min(block_size, dim)
    blocks, rest = divmod(dim, block)
    k_block = kept_per_block(block, density)
    k_rest = kept_per_block(rest, density) if rest else 0
    return block, blocks, k_block, rest, k_rest


def index_dtype(dim: int, block_size: int) -> torch.dtype:
    """int16 when every block has at most 2^15 coordinates, else int32."""
    return torch.int16 if min(block_size, dim) <= _INT16_SPAN else torch.int32


def compressed_window_bytes(
    dim: int,
    num_grads: int,
    density: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
    grad_dtype=torch.float32,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Memory of a :class:`CompressedMFAC`: m rows of k indices and k values, the fp64 m x m matrix
    and the d-sized error buffer in the compute ``dtype``."""
    block, blocks, k_block, _, k_rest = _layout(dim, density, block_size)
    k = blocks * k_block + k_rest
    item = torch.empty((), dtype=grad_dtype).element_size()
    index = torch.empty((), dtype=index_dtype(dim, block_size)).element_size()
    compute = torch.empty((), dtype=dtype).element_size()
    base = 4 if dim < 2**31 else 8  # the block offset of each column
    return num_grads * k * (item + index) + 8 * num_grads * num_grads + dim * compute + base * k


class CompressedMFAC(DynamicMFAC):
    """Sliding-window inverse empirical Fisher over top-k compressed gradients with error feedback
    ([M-FAC, App. B] on the compressed window of [EFCP, Alg. 1]).

    ``update(g)`` forms ``a = e + g`` (d,), keeps ``c = TopK_block(a)`` (k entries: in each block of
    ``block_size`` coordinates the ``ceil(density * block)`` largest ``|a_i|``, values rounded to
    ``grad_dtype``) as the new row of the window, and keeps ``e = a - c`` (the dropped entries and
    the rounding of the kept ones). The Fisher is ``F = damp*I + (1/m) sum_i c_i c_i^T`` over the
    stored rows.

    What is preconditioned: ``update_mul(g)`` returns ``F^{-1} c`` for the compressed ``c``, not
    ``F^{-1} g``. This is the choice of [EFCP, Alg. 1] (the update is the preconditioned compressed
    accumulator): with error feedback the mass dropped from ``g`` is not lost but delayed, it enters
    a later ``c`` and so a later step, whereas ``F^{-1} g`` would see the dropped mass twice (now
    and again through the buffer). It also keeps ``c`` in the span of the window, so the result is
    the one product ``G^T c'`` (no cancellation; :meth:`DynamicMFAC._finish`). ``mul(x)`` is
    ``F^{-1} x`` for any dense x. With ``density=1`` nothing is dropped, ``c = g`` and this is
    :class:`DynamicMFAC`.

    Cost per ``update_mul``: the block top-k of a (O(d)), two passes over the m*k stored entries
    (``G c`` by gather, ``G^T c'`` by ``index_add``, in chunks of 2^22 entries with int64 index
    temporaries), the O(m^3/3) Cholesky and O(m^2) solves of :class:`DynamicMFAC`. Memory:
    :func:`compressed_window_bytes`, checked against the free memory of ``device`` before anything
    is allocated (``MemoryError`` with the numbers); during a step two more d-vectors (a and the
    densified c).

    All or nothing as :class:`DynamicMFAC`: a non-finite gradient (or one beyond the range of
    ``grad_dtype``), non-finite products, a failed factorisation or (``update_mul``) a non-finite
    result raise :class:`GradientRejected` with the window, ``G G^T``, ring position and error
    buffer as before. """

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float,
        density: float,
        device=None,
        dtype: torch.dtype = torch.float32,
        grad_dtype=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        normalize_by_seen: bool = False,
        allreduce=None,
    ):
        self.density = check_density(density)
        self.block_size = check_int("block_size", block_size)
        super().__init__(
            dim,
            num_grads,
            damp,
            device=device,
            dtype=dtype,
            grad_dtype=grad_dtype,
            normalize_by_seen=normalize_by_seen,
            allreduce=allreduce,
        )

    def _allocate_window(self, storage: torch.dtype) -> None:
        """Rows of k indices (int16/int32) and k values (``storage``), the error buffer and the
        block offsets of the k columns; fails before allocating when ``device`` lacks the memory."""
        need = compressed_window_bytes(
            self.dim, self.num_grads, self.density, self.block_size, storage, self.dtype
        )
        free = free_bytes(self.device)
        if free is not None and need > free:
            raise MemoryError(
                f"the compressed M-FAC window needs {need / 2**30:.2f} GiB (num_grads="
                f"{self.num_grads} rows of {self.density:g} x d={self.dim} entries, plus the error "
                f"buffer) but only {free / 2**30:.2f} GiB is free on {self.device}. Lower "
                "num_grads or density, store the values in bfloat16 (grad_dtype) or shard the "
                "window across processes."
            )
        block, blocks, k_block, rest, k_rest = _layout(self.dim, self.density, self.block_size)
        self._block, self._blocks, self._k_block = block, blocks, k_block
        self._rest, self._k_rest = rest, k_rest
        self.k = blocks * k_block + k_rest
        m, dev = self.num_grads, self.device
        self._I = torch.zeros(
            m, self.k, dtype=index_dtype(self.dim, self.block_size), device=dev
        )  # (m, k)
        self._V = torch.zeros(m, self.k, dtype=storage, device=dev)  # (m, k)
        self.error = torch.zeros(self.dim, dtype=self.dtype, device=dev)  # (d,) e of [EFCP]
        base = (
            torch.arange(blocks, device=dev).repeat_interleave(k_block) * block
        )  # (blocks * k_block,)
        tail = torch.full((k_rest,), blocks * block, dtype=torch.int64, device=dev)
        wide = torch.int32 if self.dim < 2**31 else torch.int64
        self._col_base = torch.cat([base, tail]).to(wide)  # (k,) first coordinate of its block

    # -- the window's products ---------------------------------------------------------------------
    @property
    def G(self) -> torch.Tensor:
        raise AttributeError(
            "a CompressedMFAC window holds no dense G; dense_rows() builds it (m x d values)"
        )

    @property
    def grad_dtype(self) -> torch.dtype:
        return self._V.dtype

    @property
    def index_dtype(self) -> torch.dtype:
        return self._I.dtype

    def dense_rows(self) -> torch.Tensor:
        """The window as a dense (m, d) tensor in the compute dtype (for tests and small d only)."""
        out = torch.zeros(self.num_grads, self.dim, dtype=self.dtype, device=self.device)
        return out.scatter_(1, self._I.long() + self._col_base, self._V.to(self.dtype))

    def _kernel_rows(self) -> bool:
        return False  # the products are gathers in PyTorch; G G^T carries only their fp32 rounding

    def _chunks(self, n: int):
        """Row ranges of the stored window with about 2^22 entries each, with their global indices
        (int32 below 2^31 coordinates: ``index_select``/``index_add_`` take them, at half the traffic
        of int64)."""
        step = max(1, _CHUNK_ENTRIES // max(1, self.k))
        for r in range(0, n, step):
            s = min(n, r + step)
            idx = self._I[r:s].to(self._col_base.dtype, copy=True)  # never a view of the window
            yield r, s, idx.add_(self._col_base)  # (s - r, k)

    def _matvec(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """``G[:n] x`` (n,) for dense x (d,): ``p_i = sum_j V[i, j] x[I[i, j]]``. O(nk)."""
        x = x[: self.dim]
        p = torch.empty(n, dtype=self.dtype, device=self.device)
        for r, s, idx in self._chunks(n):
            vals = self._V[r:s].to(self.dtype)  # (s - r, k)
            p[r:s] = x.index_select(0, idx.reshape(-1)).view_as(vals).mul_(vals).sum(1)
        return p

    def _rmatvec(self, n: int, c: torch.Tensor) -> torch.Tensor:
        """``G[:n]^T c`` (d,) for c (n,): ``index_add`` of ``c_i V[i, j]`` at ``I[i, j]``. O(nk)."""
        y = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for r, s, idx in self._chunks(n):
            terms = self._V[r:s].to(self.dtype) * c[r:s, None]  # (s - r, k)
            y.index_add_(0, idx.reshape(-1), terms.reshape(-1))
        return y

    # -- compression and the update ----------------------------------------------------------------
    def _select(self, a: torch.Tensor) -> torch.Tensor:
        """Local indices (k,) int64 of the ``k_block`` largest ``|a_i|`` in each block [EFCP,
        top-k]."""
        mag = a.abs()  # (d,)
        head = self._blocks * self._block
        parts = []
        if self._blocks:
            parts.append(
                mag[:head]
                .view(self._blocks, self._block)
                .topk(self._k_block, dim=1, sorted=False)
                .indices.reshape(-1)
            )
        if self._rest:
            parts.append(mag[head:].topk(self._k_rest, sorted=False).indices)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _stage(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Error feedback, compression, the new row of the window and of ``G G^T``, the
        factorisation; all or nothing. Returns ``(p, c, undo)``: ``p = G_new c`` (n,), the
        compressed vector c densified (d,) in the compute dtype, and ``undo`` for
        :meth:`_restore`."""
        slot, n = self.ptr, min(self.count + 1, self.num_grads)
        undo = (
            slot,
            self._I[slot].clone(),
            self._V[slot].clone(),
            self.GGt[slot].clone(),
            self.GGt[:, slot].clone(),
            self.ptr,
            self.count,
            self._chol,
            self.fallbacks,
            self.error,
        )
        try:
            a = self.error + g.to(self.dtype)  # (d,) a_t = e_{t-1} + g_t, a new tensor
            nonfinite = 0.0 if all_finite(a) else 1.0
            if nonfinite:
                if self.allreduce is None:
                    raise GradientRejected(self._rejection(1.0, 0.0))
                a = torch.zeros_like(a)  # sharded: join the all-reduce, then everyone rejects
            local = self._select(a)  # (k,) int64
            where = local + self._col_base  # (k,) global coordinates
            self._I[slot] = local.to(self._I.dtype)
            self._V[slot] = a[where]  # the kept values as stored (the cast may overflow fp16)
            kept = self._V[slot].to(self.dtype)  # (k,)
            overflow = 0.0 if nonfinite or all_finite(kept) else 1.0
            if overflow:
                kept = torch.zeros_like(kept)
            c = torch.zeros(self.dim, dtype=self.dtype, device=self.device).index_put_(
                (where,), kept
            )
            p = self._matvec(n, c)  # (n,) one pass over the stored entries
            p, (nonfinite, overflow) = self._reduce(p, [nonfinite, overflow])
            if nonfinite or overflow:
                raise GradientRejected(self._rejection(nonfinite, overflow))
            if not all_finite(p):
                raise GradientRejected(
                    "the products G c of the compressed gradient with the window are not "
                    "finite (|g| too large for fp32 accumulation); the window is unchanged"
                )
            self._commit(slot, n, p, a.sub_(c))  # e_t = a_t - c_t
        except BaseException:
            self._restore(undo)
            raise
        return p, c, undo

    def _commit(self, slot: int, n: int, p: torch.Tensor, error: torch.Tensor) -> None:
        p64 = p.to(torch.float64)
        self.GGt[slot, :n] = p64
        self.GGt[:n, slot] = p64
        self.count = n
        self.ptr = (slot + 1) % self.num_grads
        self._chol = None
        self.error = error
        try:
            self._factor()
        except FloatingPointError as e:
            raise GradientRejected(
                f"the window's system could not be factorised with this gradient ({e}); "
                "the window is unchanged"
            ) from e

    def _rejection(self, nonfinite: float, overflow: float) -> str:
        where = "" if self.allreduce is None else " (on at least one shard)"
        if nonfinite:
            return (f"g (plus the error buffer) contains NaN or inf values{where}; "
                    "the window is unchanged")
        big = torch.finfo(self._V.dtype).max
        return (
            f"the kept values of g exceed the range of the window's storage dtype "
            f"{self._V.dtype} (|x| > {big:.6g}){where}: store the values in float32 (grad_dtype) "
            "or clip the gradients; the window is unchanged"
        )

    def _restore(self, undo: tuple) -> None:
        slot, rows, vals, ggt_row, ggt_col, ptr, count, chol, fallbacks, error = undo
        self._I[slot] = rows
        self._V[slot] = vals
        self.GGt[slot] = ggt_row
        self.GGt[:, slot] = ggt_col
        self.ptr, self.count, self._chol, self.fallbacks, self.error = (
            ptr,
            count,
            chol,
            fallbacks,
            error,
        )

    def reset(self) -> None:
        """Forget all gradients and the error buffer."""
        self._I.zero_()
        self._V.zero_()
        self.error = torch.zeros_like(self.error)
        self.GGt.zero_()
        self.ptr = self.count = 0
        self._chol = None

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain types only: the rows ``I`` (m, k) and ``V`` (m, k), the error buffer
        (d,), ``GGt`` and the ring position (views, not copies)."""
        return {
            "I": self._I,
            "V": self._V,
            "error": self.error,
            "GGt": self.GGt,
            "ptr": self.ptr,
            "count": self.count,
            "num_grads": self.num_grads,
            "dim": self.dim,
            "damp": self.damp,
            "density": self.density,
            "block_size": self.block_size,
            "normalize_by_seen": self.normalize_by_seen,
        }

    def _load_state(self, state: dict, problems: list[str]) -> None:
        """Check a saved compressed window (shapes, dtypes, index ranges, finite values, ring
        position, ``G G^T`` against the stored rows) and install it; ``ValueError`` with nothing
        changed."""
        problems = list(problems)
        get = state.get if isinstance(state, dict) else (lambda key: None)
        if get("G") is not None and get("I") is None:
            problems.append(
                "this is the state of a dense window (it holds G); this window is compressed "
                f"(density={self.density:g}): load it into an optimizer with density=1.0"
            )
        else:
            self._check_layout(get, problems)
        tensors_ok = not problems
        self._check_ring(get("count"), get("ptr"), problems)
        norms = torch.zeros(self.num_grads, dtype=torch.float64, device=self.device)
        if tensors_ok:
            V = get("V").to(self.device)
            for r in range(self.num_grads):
                norms[r] = V[r].to(torch.float64).square().sum()
        bad = 1.0 if problems else 0.0
        if self.allreduce is not None:
            norms, (bad,) = self._reduce(norms, [bad])
        if bad:
            if not problems:
                problems.append("another shard's window is invalid; see that rank's error")
            raise ValueError(
                "cannot load the CompressedMFAC window: "
                + "; ".join(problems)
                + " (nothing was changed)"
            )
        n = int(get("count"))
        GGt = get("GGt").to(device=self.device, dtype=torch.float64)
        mismatch = self._gram_mismatch(get("V"), GGt[:n, :n], norms[:n])
        if self._agree(mismatch is not None):
            raise ValueError(
                "cannot load the CompressedMFAC window: "
                + (mismatch or "GGt does not match the rows on another shard")
                + " (nothing was changed)"
            )
        self._install_rows(get("I"), get("V"), get("error"), GGt, int(get("ptr")), n)

    def _check_layout(self, get, problems: list[str]) -> None:
        """Shapes, dtypes, settings, index ranges and finiteness of a saved window."""
        for key, mine in (("density", self.density), ("block_size", self.block_size)):
            if get(key) != mine:
                problems.append(f"{key}={get(key)!r} in the state but {mine!r} here")
        m, k, d = self.num_grads, self.k, self.dim
        want = (
            ("I", (m, k), (torch.int16, torch.int32)),
            ("V", (m, k), (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
            ("error", (d,), (torch.float32, torch.float64)),
            ("GGt", (m, m), (torch.float64, torch.float32)),
        )
        for key, shape, dtypes in want:
            t = get(key)
            if not isinstance(t, torch.Tensor):
                problems.append(f"{key} is missing or not a tensor ({type(t).__name__})")
            elif t.dtype not in dtypes or tuple(t.shape) != shape:
                problems.append(
                    f"{key} is {t.dtype} {tuple(t.shape)}; expected {shape} of {dtypes}"
                )
        if problems:
            return
        lengths = torch.cat(
            [
                torch.full((self._blocks * self._k_block,), self._block),
                torch.full((self._k_rest,), self._rest),
            ]
        ).to(self.device)
        rows = get("I").to(self.device)
        if bool(((rows < 0) | (rows.long() >= lengths)).any()):
            problems.append("I holds indices outside their blocks")
        for key in ("V", "error", "GGt"):
            if not all_finite(get(key)):
                problems.append(f"{key} holds NaN or inf values")

    def _install_rows(self, index, V, error, GGt, ptr: int, count: int) -> None:
        """Copy a checked window in (V keeps its saved dtype)."""
        if index.dtype == self._I.dtype:
            self._I.copy_(index)
        else:
            self._I = index.to(self.device).clone()
        if V.dtype == self._V.dtype:
            self._V.copy_(V)
        else:
            self._V = V.to(self.device).clone()
        self.error = error.to(device=self.device, dtype=self.dtype).clone()
        self.GGt = GGt.clone()
        self.ptr, self.count = ptr, count
        self._chol = None
