"""Dynamic M-FAC with a compressed gradient window: top-k rows and error feedback [EFCP].

The window of :class:`~hf_mfac.core.DynamicMFAC` holds m full gradients (m * d values: 450 GB at
d = 1.1e8, m = 1024). Following [EFCP, Alg. 1] each new gradient ``g_t`` is first added to an error
buffer, ``a_t = e_{t-1} + g_t``; the window receives only ``c_t = TopK(a_t)`` (the largest entries
by magnitude, a fraction ``density`` of each block of the flat vector), and what was dropped stays
in the buffer, ``e_t = a_t - c_t``, to be added to the next gradient. The window stores per row the
indices (int16 within a block of at most 2^15 coordinates, else int32) and values of ``c_t``: about
``density * m * d * (2 + 4)`` bytes instead of ``4 * m * d``.

Everything m x m (``G G^T``, its fp64 Cholesky with the damped fallback, the ring position,
``normalize_by_seen``, sharding) is that of :class:`~hf_mfac.core.DynamicMFAC`; only the O(dm)
products differ: ``G x`` selects x at the stored indices (``index_select``), ``G^T c`` adds at
them (``index_add_``), block by block.
"""
from __future__ import annotations

import concurrent.futures
import math

import torch

from ._checks import all_finite, check_int, check_real, free_bytes
from .ihvp import DynamicMFAC, GradientRejected

__all__ = ["CompressedMFAC", "compressed_window_bytes", "check_density", "index_dtype",
           "kept_per_block", "product_workers", "DEFAULT_BLOCK_SIZE"]

# Coordinates per block of the top-k selection: the largest block whose indices fit int16.
DEFAULT_BLOCK_SIZE = 1 << 15
_INT16_SPAN = 1 << 15  # blocks up to this length index their coordinates with int16
_CHUNK_ENTRIES = 1 << 22  # window entries per chunk of the products (bounds their temporaries)
_MAX_WORKERS = 8  # threads of the products on a CPU
_POOL = None  # their thread pool, made on first use


def check_density(density, label: str = "density") -> float:
    """``density`` as a float in (0, 1]: the fraction of each block the window keeps; errors name
    ``label``."""
    return check_real(label, density, low=0.0, low_open=True, high=1.0)


def kept_per_block(n: int, density: float) -> int:
    """Entries a block of ``n`` coordinates keeps: ``ceil(density * n)`` (at least 1), the product
    rounded to 6 decimals first so that e.g. 0.07 * 100 keeps 7, not 8."""
    return max(1, math.ceil(round(density * n, 6)))


def _layout(dim: int, density: float, block_size: int) -> tuple[int, int, int, int, int]:
    """``(block, full, k_block, rest, k_rest)``: ``full`` blocks of ``block`` coordinates keep
    ``k_block`` entries each; a last partial block of ``rest`` coordinates keeps ``k_rest``."""
    block = min(block_size, dim)
    full, rest = divmod(dim, block)
    k_block = kept_per_block(block, density)
    k_rest = kept_per_block(rest, density) if rest else 0
    return block, full, k_block, rest, k_rest


def index_dtype(dim: int, block_size: int) -> torch.dtype:
    """int16 when every block has at most 2^15 coordinates, else int32."""
    return torch.int16 if min(block_size, dim) <= _INT16_SPAN else torch.int32


def compressed_window_bytes(dim: int, num_grads: int, density: float,
                            block_size: int = DEFAULT_BLOCK_SIZE, grad_dtype=torch.float32,
                            dtype: torch.dtype = torch.float32, workers: int | None = None) -> int:
    """Memory of a :class:`CompressedMFAC`: per block and row ``k_block`` indices and values (the
    last partial block padded to ``k_block``), the fp64 m x m matrix, and in the compute ``dtype``
    three vectors of the padded length D (the error buffer, its spare, the compressed gradient)
    and the products' workspace (per worker, a chunk of about 2^22 / workers entries, at least
    one block of all rows: int32 indices, and values selected or terms added). ``workers``:
    :func:`product_workers` of the CPU by default."""
    block, full, k_block, rest, _ = _layout(dim, density, block_size)
    blocks = full + (1 if rest else 0)
    item = torch.empty((), dtype=grad_dtype).element_size()
    index = torch.empty((), dtype=index_dtype(dim, block_size)).element_size()
    compute = torch.empty((), dtype=dtype).element_size()
    workers, step = _chunk_plan(blocks, num_grads * k_block,
                                workers if workers is not None else product_workers())
    chunk = workers * step * num_grads * k_block
    return (num_grads * blocks * k_block * (item + index) + 8 * num_grads * num_grads
            + 3 * blocks * block * compute + chunk * (4 + compute))


def _chunk_blocks(per_block: int) -> int:
    """Blocks per chunk of the products: about 2^22 stored entries, at least one block."""
    return max(1, _CHUNK_ENTRIES // max(1, per_block))


def product_workers(device=None) -> int:
    """Threads the window's products run on: on a CPU the number of torch threads (at most 8),
    since ``index_select``/``index_add_`` on one block run on one core; on a GPU one."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return max(1, min(torch.get_num_threads(), _MAX_WORKERS)) if device.type == "cpu" else 1


def _chunk_plan(blocks: int, per_block: int, workers: int) -> tuple[int, int]:
    """``(workers, blocks per chunk)``: the chunks of all workers together hold about 2^22
    stored entries (at least one block each), and the blocks are shared among the workers."""
    workers = max(1, min(workers, blocks))
    return workers, min(-(-blocks // workers), max(1, _chunk_blocks(per_block) // workers))


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS, "hf_mfac-window")
    return _POOL


class CompressedMFAC(DynamicMFAC):
    """Sliding-window inverse empirical Fisher over top-k compressed gradients with error feedback
    ([M-FAC, App. B] on the compressed window of [EFCP, Alg. 1]).

    ``update(g)`` forms ``a = e + g`` (d,), keeps ``c = TopK_block(a)`` (in each block of
    ``block_size`` coordinates the ``ceil(density * block)`` largest ``|a_i|``, values rounded to
    ``grad_dtype``) as the new row of the window, and keeps ``e = a - c`` (the dropped entries and
    the rounding of the kept ones). The Fisher is ``F = damp*I + (1/m) sum_i c_i c_i^T`` over the
    stored rows.

    What is preconditioned: ``update_mul(g)`` returns ``F^{-1} c`` for the compressed ``c``, not
    ``F^{-1} g``. This is the choice of [EFCP, Alg. 1] (the step is the preconditioned compressed
    accumulator): with error feedback the mass dropped from ``g`` is not lost but delayed; it enters
    a later ``c`` and so a later step, whereas ``F^{-1} g`` would apply the dropped mass twice (now
    and again through the buffer). It also keeps ``c`` in the span of the window, so the result is
    the one product ``G^T c'`` (no cancellation; ``DynamicMFAC._finish``). ``mul(x)`` is
    ``F^{-1} x`` for any dense x. With ``density=1`` nothing is dropped, ``c = g`` and this is
    :class:`DynamicMFAC`.

    Layout: block-major, ``I`` and ``V`` of shape (blocks, m, k_block): the products go block by
    block over all rows, so that each block of x (128 KiB at 2^15 fp32) stays in cache while all m
    rows gather from it (row by row, the gathers would miss the cache; benchmarks/RESULTS.md).
    A last partial block of r coordinates keeps ``ceil(density * r)`` entries; its other slots point
    at coordinate r (padding, value 0).

    Cost per ``update_mul``: the block top-k of a (O(d)), two passes over the m * k stored entries
    (``G c`` by ``index_select``, ``G^T c'`` by ``index_add_``, in chunks of 2^22 entries with
    int32 index temporaries when the indices are stored as int16; on a CPU the blocks are shared
    among :func:`product_workers` threads, since these index ops use one core each, and the
    partial sums are added in a fixed order), the O(m^3/3) Cholesky and
    O(m^2) solves of :class:`DynamicMFAC`. Memory: :func:`compressed_window_bytes`, checked
    against the free memory of ``device`` before anything is allocated (``MemoryError`` with the
    numbers); during a step three more d-vectors.

    All or nothing as :class:`DynamicMFAC`: a non-finite gradient (or one beyond the range of
    ``grad_dtype``), non-finite products, a failed factorisation or (``update_mul``) a non-finite
    result raise :class:`GradientRejected` with the window, ``G G^T``, ring position and error
    buffer as before.
    """

    def __init__(self, dim: int, num_grads: int, damp: float, density: float, device=None,
                 dtype: torch.dtype = torch.float32, grad_dtype=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, normalize_by_seen: bool = False,
                 allreduce=None):
        self.density = check_density(density)
        self.block_size = check_int("block_size", block_size)
        super().__init__(dim, num_grads, damp, device=device, dtype=dtype, grad_dtype=grad_dtype,
                         normalize_by_seen=normalize_by_seen, allreduce=allreduce)

    def _allocate_window(self, storage: torch.dtype) -> None:
        """Indices (int16/int32) and values (``storage``) of shape (blocks, m, k_block) and the
        error buffer; fails before allocating when ``device`` lacks the memory."""
        self._workers = product_workers(self.device)
        need = compressed_window_bytes(self.dim, self.num_grads, self.density, self.block_size,
                                       storage, self.dtype, self._workers)
        free = free_bytes(self.device)
        if free is not None and need > free:
            raise MemoryError(
                f"the compressed M-FAC window needs {need / 2**30:.2f} GiB (num_grads="
                f"{self.num_grads} rows of {self.density:g} x d={self.dim} entries, plus the error "
                f"buffer) but only {free / 2**30:.2f} GiB is free on {self.device}. Lower "
                "num_grads or density, store the values in bfloat16 (grad_dtype) or shard the "
                "window across processes.")
        block, full, k_block, rest, k_rest = _layout(self.dim, self.density, self.block_size)
        self._block, self._full, self._k_block, self._rest, self._k_rest = (
            block, full, k_block, rest, k_rest)
        self._nblk = full + (1 if rest else 0)
        self.k = full * k_block + k_rest  # entries kept per gradient
        shape = (self._nblk, self.num_grads, k_block)
        idx = index_dtype(self.dim, self.block_size)
        self._I = torch.zeros(shape, dtype=idx, device=self.device)  # (blocks, m, k_block)
        self._I[-1, :, k_rest:] = rest  # the unused slots of a partial last block: its padding
        self._V = torch.zeros(shape, dtype=storage, device=self.device)  # (blocks, m, k_block)
        padded = self._nblk * block
        # e of [EFCP] and the buffer the next step forms a = e + g in (they swap on success),
        # the compressed gradient c (D,), padded to whole blocks with zeros
        self._err, self._spare, self._c = (
            torch.zeros(padded, dtype=self.dtype, device=self.device) for _ in range(3))
        self._work: dict = {}  # the products' chunk buffers, allocated on first use and kept

    # -- the window's products ---------------------------------------------------------------------
    @property
    def G(self) -> torch.Tensor:
        raise AttributeError("a CompressedMFAC window holds no dense G; dense_rows() builds it "
                             "(m x d values)")

    @property
    def error(self) -> torch.Tensor:
        """The error-feedback buffer e (d,): what the window has not taken of the gradients."""
        return self._err[: self.dim]

    @property
    def grad_dtype(self) -> torch.dtype:
        return self._V.dtype

    @property
    def index_dtype(self) -> torch.dtype:
        return self._I.dtype

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """x (d,) zero-padded to (blocks * block,): x itself when nothing is padded, else x
        copied into the compressed-gradient buffer (whose padding is kept zero)."""
        if x.numel() == self._c.numel():
            return x
        self._c[: self.dim].copy_(x)
        return self._c

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A kept workspace tensor of ``numel`` elements (a fresh allocation of this size can cost
        more in page faults than the products themselves)."""
        buf = self._work.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._work[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def dense_rows(self) -> torch.Tensor:
        """The window as a dense (m, d) tensor in the compute dtype (for tests and small d only)."""
        m = self.num_grads
        out = torch.zeros(m, self._nblk, self._block, dtype=self.dtype, device=self.device)
        out.scatter_(2, self._I.permute(1, 0, 2).long(), self._V.permute(1, 0, 2).to(self.dtype))
        return out.view(m, -1)[:, : self.dim]

    def _kernel_rows(self) -> bool:
        return False  # the products are PyTorch index ops; G G^T carries only their fp32 rounding

    def _chunk_entries(self) -> int:
        """Entries of one worker's largest chunk (all m rows): the size of its kept buffers."""
        per = self.num_grads * self._k_block
        return _chunk_plan(self._nblk, per, self._workers)[1] * per

    def _chunks(self, n: int, worker: int):
        """The block ranges of rows [0, n) that ``worker`` handles: chunks of about 2^22 / workers
        stored entries, dealt round-robin, with their indices (blocks, n * k_block) as int32
        (``index_select``/``index_add_`` take int32; int16 is copied into the worker's kept
        buffer, stored int32 indices of all rows are used in place)."""
        per = n * self._k_block
        workers, step = _chunk_plan(self._nblk, self.num_grads * self._k_block, self._workers)
        buf = None
        for b in range(worker * step, self._nblk, workers * step):
            e = min(self._nblk, b + step)
            if self._I.dtype == torch.int32 and n == self.num_grads:
                yield b, e, self._I[b:e].view(e - b, per)
                continue
            if buf is None:
                buf = self._buffer(("index", worker), self._chunk_entries(), torch.int32)
            idx = buf[: (e - b) * per].view(e - b, n, self._k_block)
            idx.copy_(self._I[b:e, :n])
            yield b, e, idx.view(e - b, per)

    def _parallel(self, fn) -> list:
        """``[fn(w) for w in workers]``, on threads when there are several (the index ops release
        the GIL and run on one core each); waits for every worker even when one fails or the
        wait is interrupted, so that no worker still writes to the buffers afterwards."""
        workers = _chunk_plan(self._nblk, self.num_grads * self._k_block, self._workers)[0]
        if workers == 1:
            return [fn(0)]
        futures = [_pool().submit(fn, w) for w in range(workers)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            concurrent.futures.wait(futures)
            raise

    def _matvec(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """``G[:n] x`` (n,) for dense x (d,) or padded: ``p_i = sum_j V[., i, j] x[I[., i, j]]``,
        block by block ``index_select`` of x at the stored indices (faster here than ``gather``,
        which also needs int64 indices; benchmarks/RESULTS.md). The workers' partial sums are
        added in worker order (the result does not depend on their timing)."""
        xb = self._pad(x).view(self._nblk, self._block)  # (blocks, block)
        kb = self._k_block

        def part(worker: int) -> torch.Tensor:
            p = torch.zeros(n, dtype=self.dtype, device=self.device)
            vals = self._buffer(("values", worker), self._chunk_entries(), self.dtype)
            for b, e, idx in self._chunks(n, worker):
                v = vals[: idx.numel()].view_as(idx)  # (e - b, n * k_block)
                for j in range(e - b):
                    torch.index_select(xb[b + j], 0, idx[j], out=v[j])
                v.view(e - b, n, kb).mul_(self._V[b:e, :n])
                p += v.view(e - b, n, kb).sum(2).sum(0)
            return p

        parts = self._parallel(part)
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)

    def _rmatvec(self, n: int, c: torch.Tensor) -> torch.Tensor:
        """``G[:n]^T c`` (d,) for c (n,): block by block ``index_add_`` of ``c_i V[., i, j]`` at
        ``I[., i, j]`` (each block is written by one worker only)."""
        y = torch.zeros(self._nblk, self._block, dtype=self.dtype, device=self.device)
        coef = c[:n].to(self.dtype).view(1, n, 1)

        def part(worker: int) -> None:
            terms = self._buffer(("values", worker), self._chunk_entries(), self.dtype)
            for b, e, idx in self._chunks(n, worker):
                t = terms[: idx.numel()].view(e - b, n, -1)
                torch.mul(self._V[b:e, :n], coef, out=t)  # (e - b, n, k_block)
                for j in range(e - b):
                    y[b + j].index_add_(0, idx[j], t[j].view(-1))

        self._parallel(part)
        return y.view(-1)[: self.dim]

    # -- compression and the update ----------------------------------------------------------------
    def _select(self, a: torch.Tensor) -> torch.Tensor:
        """Local indices (blocks, k_block) int64 of the largest ``|a_i|`` of each block of the
        padded a [EFCP, top-k]; the unused slots of a partial last block point at its padding."""
        mag = torch.abs(a, out=self._c).view(self._nblk, self._block)  # c is free until filled
        if not self._rest:
            return mag.topk(self._k_block, dim=1, sorted=False).indices
        local = torch.full((self._nblk, self._k_block), self._rest, dtype=torch.int64,
                           device=self.device)
        if self._full:
            local[:-1] = mag[:-1].topk(self._k_block, dim=1, sorted=False).indices
        local[-1, : self._k_rest] = mag[-1, : self._rest].topk(self._k_rest, sorted=False).indices
        return local

    def _stage(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Error feedback, compression, the new row of the window and of ``G G^T``, the
        factorisation; all or nothing. Returns ``(p, c, undo)``: ``p = G_new c`` (n,), the
        compressed vector c densified (padded to whole blocks) in the compute dtype, and ``undo``
        for :meth:`_restore`."""
        slot, n = self.ptr, min(self.count + 1, self.num_grads)
        undo = (slot, self._I[:, slot].clone(), self._V[:, slot].clone(), self.GGt[slot].clone(),
                self.GGt[:, slot].clone(), self.ptr, self.count, self._chol, self.fallbacks,
                self._err, self._spare)
        try:
            a = self._spare  # (D,) a_t = e_{t-1} + g_t; its padding stays zero
            torch.add(self.error, g.to(self.dtype), out=a[: self.dim])
            nonfinite = 0.0 if all_finite(a) else 1.0
            if nonfinite:
                if self.allreduce is None:
                    raise GradientRejected(self._rejection(1.0, 0.0))
                a.zero_()  # sharded: join the all-reduce, then everyone rejects
            local = self._select(a)  # (blocks, k_block)
            self._I[:, slot] = local
            self._V[:, slot] = a.view(self._nblk, self._block).gather(1, local)  # may overflow fp16
            kept = self._V[:, slot].to(self.dtype)  # (blocks, k_block) as stored
            overflow = 0.0 if nonfinite or all_finite(kept) else 1.0
            if overflow:
                kept = torch.zeros_like(kept)
            c = self._c.zero_()
            c.view(self._nblk, self._block).scatter_(1, local, kept)
            p = self._matvec(n, c)  # (n,) one pass over the stored entries
            p, (nonfinite, overflow) = self._reduce(p, [nonfinite, overflow])
            if nonfinite or overflow:
                raise GradientRejected(self._rejection(nonfinite, overflow))
            if not all_finite(p):
                raise GradientRejected("the products G c of the compressed gradient with the "
                                       "window are not finite (|g| too large for fp32 "
                                       "accumulation); the window is unchanged")
            self._commit(slot, n, p, a.sub_(c))  # e_t = a_t - c_t, in place
        except BaseException:
            self._restore(undo)
            raise
        return p, c, undo

    def _commit(self, slot: int, n: int, p: torch.Tensor, error: torch.Tensor) -> None:
        self._err, self._spare = error, self._err
        self._commit_products(slot, n, p)

    def _rejection(self, nonfinite: float, overflow: float) -> str:
        where = "" if self.allreduce is None else " (on at least one shard)"
        if nonfinite:
            return (f"g (plus the error buffer) contains NaN or inf values{where}; "
                    "the window is unchanged")
        big = torch.finfo(self._V.dtype).max
        return (f"the kept values of g exceed the range of the window's storage dtype "
                f"{self._V.dtype} (|x| > {big:.6g}){where}: store the values in float32 "
                "(grad_dtype) or clip the gradients; the window is unchanged")

    def _restore(self, undo: tuple) -> None:
        slot, rows, vals, ggt_row, ggt_col, ptr, count, chol, fallbacks, error, spare = undo
        self._I[:, slot] = rows
        self._V[:, slot] = vals
        self.GGt[slot] = ggt_row
        self.GGt[:, slot] = ggt_col
        self.ptr, self.count, self._chol, self.fallbacks = ptr, count, chol, fallbacks
        self._err, self._spare = error, spare

    def reset(self) -> None:
        """Forget all gradients and the error buffer."""
        self._I.zero_()
        self._I[-1, :, self._k_rest :] = self._rest
        self._V.zero_()
        self._err.zero_()
        self.GGt.zero_()
        self.ptr = self.count = 0
        self._chol = None

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain types only: indices ``I`` and values ``V`` (blocks, m, k_block), the
        error buffer (d,), ``GGt`` and the ring position (views, not copies)."""
        return {"I": self._I, "V": self._V, "error": self.error, "GGt": self.GGt, "ptr": self.ptr,
                "count": self.count, "num_grads": self.num_grads, "dim": self.dim,
                "damp": self.damp, "density": self.density, "block_size": self.block_size,
                "normalize_by_seen": self.normalize_by_seen}

    def _load_state(self, state: dict, problems: list[str]) -> None:
        """Check a saved compressed window (settings, shapes, dtypes, index ranges, finite values,
        ring position, ``G G^T`` against the stored rows) and install it; ``ValueError`` naming the
        problems, with nothing changed. Sharded, every shard accepts or refuses together."""
        problems = list(problems)
        get = state.get if isinstance(state, dict) else (lambda key: None)
        if get("G") is not None and get("I") is None:
            problems.append("this is the state of a dense window (it holds G); this window is "
                            f"compressed (density={self.density:g}): load it with density=1.0")
        else:
            self._check_layout(get, problems)
        tensors_ok = not problems
        self._check_ring(get("count"), get("ptr"), problems)
        norms = torch.zeros(self.num_grads, dtype=torch.float64, device=self.device)
        if tensors_ok:
            norms += get("V").to(self.device, torch.float64).square().sum((0, 2))
        bad = 1.0 if problems else 0.0
        if self.allreduce is not None:
            norms, (bad,) = self._reduce(norms, [bad])
        if bad:
            if not problems:
                problems.append("another shard's window is invalid; see that rank's error")
            raise ValueError("cannot load the CompressedMFAC window: " + "; ".join(problems)
                             + " (nothing was changed)")
        n = int(get("count"))
        GGt = get("GGt").to(device=self.device, dtype=torch.float64)
        mismatch = self._gram_mismatch(get("V"), GGt[:n, :n], norms[:n])
        if self._agree(mismatch is not None):
            raise ValueError("cannot load the CompressedMFAC window: "
                             + (mismatch or "GGt does not match the rows on another shard")
                             + " (nothing was changed)")
        self._install_rows(get("I"), get("V"), get("error"), GGt, int(get("ptr")), n)

    def _check_layout(self, get, problems: list[str]) -> None:
        """Settings, shapes, dtypes, index ranges and finiteness of a saved window."""
        for key, mine in (("density", self.density), ("block_size", self.block_size)):
            if get(key) != mine:
                problems.append(f"{key}={get(key)!r} in the state but {mine!r} here")
        m, d, shape = self.num_grads, self.dim, tuple(self._I.shape)
        want = (("I", shape, (torch.int16, torch.int32)),
                ("V", shape, (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
                ("error", (d,), (torch.float32, torch.float64)),
                ("GGt", (m, m), (torch.float64, torch.float32)))
        for key, size, dtypes in want:
            t = get(key)
            if not isinstance(t, torch.Tensor):
                problems.append(f"{key} is missing or not a tensor ({type(t).__name__})")
            elif t.dtype not in dtypes or tuple(t.shape) != size:
                problems.append(f"{key} is {t.dtype} {tuple(t.shape)}; expected {size} of {dtypes}")
        if problems:
            return
        if not self._indices_ok(get("I").to(self.device), get("V").to(self.device)):
            problems.append("I holds indices outside their blocks")
        for key in ("V", "error", "GGt"):
            if not all_finite(get(key)):
                problems.append(f"{key} holds NaN or inf values")

    def _indices_ok(self, index: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether every index lies in its block, and the unused slots of a partial last block
        point at its padding with value 0."""
        if bool(((index < 0) | (index >= self._block)).any()):
            return False
        if not self._rest:
            return True
        used, spare = index[-1, :, : self._k_rest], index[-1, :, self._k_rest :]
        return (bool((used < self._rest).all()) and bool((spare == self._rest).all())
                and not bool(values[-1, :, self._k_rest :].any()))

    def _install_rows(self, index, values, error, GGt, ptr: int, count: int) -> None:
        """Copy a checked window in (the values keep their saved dtype)."""
        self._I.copy_(index)
        if values.dtype == self._V.dtype:
            self._V.copy_(values)
        else:
            self._V = values.to(self.device).clone()
        self.error.copy_(error)
        self.GGt = GGt.clone()
        self.ptr, self.count = ptr, count
        self._chol = None
