"""Dynamic M-FAC: the optimizer's sliding-window inverse-Fisher-vector products [M-FAC, App. B].

Convention ([M-FAC, Theorem 1]): ``F = damp * I + (1/m) * sum_i g_i g_i^T``; ``mul(x)`` returns
``F^{-1} x``. With ``G`` the (m, d) matrix of gradients and ``K = m * damp * I + G G^T`` the
Woodbury identity gives

    F^{-1} x = (x - G^T K^{-1} G x) / damp.

:class:`DynamicMFAC` keeps G as a ring buffer with ``G G^T`` up to date and refuses a bad gradient
with :class:`GradientRejected`; the module also holds the numerics of its window (row padding, the
accumulation error of the CUDA window products). The static inverse of the pruner,
:class:`StaticMFAC`, lives in :mod:`hf_mfac.core.static_mfac`, the argument checks
``check_real``/``check_int`` in :mod:`hf_mfac.core._checks`; both are re-exported here for older
imports.
"""
from __future__ import annotations

import logging
import math
import numbers

import torch

from .. import kernels
from ._checks import (
    all_finite,
    check_damp,
    check_finite,
    check_float_tensor,
    check_int,
    check_real,
    damped_cholesky,
)
from .static_mfac import StaticMFAC, _default_page_columns  # noqa: F401 - re-exported for older imports

__all__ = ["DynamicMFAC", "StaticMFAC", "GradientRejected"]

logger = logging.getLogger("hf_mfac")

# Window rows are padded to a multiple of this many elements (16 bytes of bf16/fp16), so that every
# row of the window starts 16-byte aligned and the CUDA window kernels use full vector loads for any
# d.
_ROW_ALIGN = 8

# The CUDA window kernels (cuda/window_gemv.cu, cuda/mfac_kernels.h): threads per block, rows per
# block.
_GEMV_THREADS = 256
_MATVEC_ROWS = 4
_SMS: dict = {}  # CUDA device index -> number of multiprocessors


class GradientRejected(FloatingPointError):
    """The gradient window refused a gradient: NaN/inf values, values beyond the range of the
    storage dtype, non-finite products with the window, a factorisation that failed even with more
    damping, or a non-finite result. The window (G, G G^T, ring position, cached factor) is exactly
    as it was before the call."""


def _storage_dtype(grad_dtype, dtype: torch.dtype) -> torch.dtype:
    if grad_dtype is None:
        return dtype
    if isinstance(grad_dtype, str):
        grad_dtype = getattr(torch, grad_dtype.replace("torch.", ""), None)
    if grad_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"grad_dtype must be float16, bfloat16, float32 or float64; got {grad_dtype!r}"
        )
    return grad_dtype


def _padded(n: int) -> int:
    return -(-n // _ROW_ALIGN) * _ROW_ALIGN


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def kernel_matvec_terms(rows: int, stride: int, element_size: int, multiprocessors: int) -> int:
    """Terms each thread of the CUDA ``window_matvec`` kernel adds up sequentially in fp32 for ``G
    x`` with G (rows, stride): the kernel splits the d columns into ``splits`` slices of ``chunk``
    columns (about 8 blocks per multiprocessor) and each of the 256 threads of a block sums chunk /
    256 products (mirrors ``plan_window_matvec`` in ``cuda/mfac_kernels.h``)."""

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    vec = 16 // element_size
    while vec > 1 and stride % vec:
        vec //= 2
    want = cdiv(8 * multiprocessors, cdiv(rows, _MATVEC_ROWS))
    most = stride // (4 * _GEMV_THREADS * vec)
    splits = min(max(min(want, most), 1), 65535)
    chunk = cdiv(cdiv(stride, splits), vec) * vec
    return cdiv(chunk, _GEMV_THREADS)


def accumulation_error(terms: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error (to ``sum |a_i b_i|``) of a dot product whose partial sums run over ``terms``
    products each, accumulated in ``dtype``: ``4 sqrt(terms) eps``, the typical (not worst-case
    ``terms * eps / 2``) size of the rounding of sequential sums, with a safety factor of 4 (an
    upper estimate of what all-positive fp32 sums show)."""
    return 4.0 * math.sqrt(max(1, terms)) * torch.finfo(dtype).eps


class DynamicMFAC:
    """Sliding-window inverse empirical Fisher (the dynamic algorithm of [M-FAC], [M-FAC, App. B]).

    Holds the last ``num_grads`` (m) gradients of dimension ``dim`` (d) in a ring buffer ``G`` (m,
    d) together with ``GGt = G G^T`` (m, m, fp64). ``update(g)`` replaces the oldest gradient,
    ``mul(x)`` returns ``F^{-1} x`` for the current window and ``update_mul(g)`` does both with a
    single product ``p = G g`` ([M-FAC, App. B]: the new row of ``G G^T`` is also the right-hand
    side of the solve).

    Cost per call: two passes over G (``G x`` and ``G^T c``, each O(dm)), one O(m^3/3) fp64 Cholesky
    of the m x m system after each update (done by ``update``/``update_mul`` themselves, so that a
    failure is seen before the call returns; cached until the next update) and O(m^2) for the
    solves. Memory: m*d values of ``grad_dtype`` (rows padded to a multiple of 8 elements, see
    below) plus 8*m^2 bytes, and during an update one more row (the one it replaces, kept until the
    update has succeeded). Storing G in bf16/fp16 halves memory and the O(dm) time; products are
    always accumulated in fp32 (fp64 if ``dtype`` is fp64). With low-precision storage
    ``update_mul`` multiplies the stored (rounded) gradient, so that the in-span part cancels
    exactly.

    The Woodbury system ``K = s*damp*I + G G^T`` is solved by Cholesky instead of the paper's D/B
    recursion: the two are the same LDL^T factorisation of ``G G^T / damp + s I`` ([M-FAC, App. B];
    :func:`hf_mfac.kernels.mfac_coefficients` gives D and B explicitly), and cuSOLVER/LAPACK
    Cholesky is the strong baseline the tiled B kernel has to beat.

    All or nothing: ``update``/``update_mul`` first check the gradient (NaN/inf, and values beyond
    the range of the storage dtype, e.g. above 65504 in fp16), then write it, form ``p = G g``
    (which must be finite), factor the new system and (``update_mul``) check that ``F^{-1} g`` is
    finite. Any failure, an interrupt included, restores the replaced row of G and of ``G G^T``, the
    ring position, the count and the cached factor exactly and raises :class:`GradientRejected` (a
    ``FloatingPointError``).

    Numerics: the m x m system is factorised in fp64, but ``G G^T`` is only as exact as the fp32
    products over G. On the CPU / PyTorch path these are BLAS dot products. The CUDA window kernel
    splits the d columns into a few slices (about 8 blocks per multiprocessor) and each of its 256
    threads per block sums chunk/256 products sequentially in fp32 (chunk = d / slices): about 86
    000 terms at m = 1024, d = 1.1e8 on a 132-SM GPU, so each entry of ``G G^T`` carries a relative
    error of ~1e-4 (to ``|g_i| |g_j|``; :func:`accumulation_error`), not ~eps32. A ``damp`` far
    below that level makes the system numerically indefinite. Where the products go to the kernels
    (a CUDA window with the fp32 compute dtype, unless ``HF_MFAC_KERNELS=torch``), the factorisation
    therefore damps at least at that level (``s*damp >= error * max_i |g_i|^2``, raising the damping
    by powers of 10); everywhere, a failed factorisation retries with 10x, 100x, ... more damping.
    Both warn once and count the occurrences in ``fallbacks``; results are never silently
    non-finite.

    Row padding: G is stored as (m, d_pad) with d_pad the next multiple of 8 and the padding columns
    kept zero, so that the rows stay 16-byte aligned for the CUDA kernels (which otherwise fall back
    to 2-byte loads for a bf16 window whenever d is not a multiple of 8: shard sizes, masked
    windows). The kernels get the padded rows and a zero-padded vector; the PyTorch path gets ``G[:,
    :d]``, so its results are those of an unpadded window bit for bit. ``G`` (and
    :meth:`state_dict`) show the (m, d) window.

    Sharding: with ``allreduce`` given, this object holds only a shard of the coordinates (``dim``
    is the shard's size) and ``allreduce(v)`` sums a vector over all shards in place (e.g.
    ``torch.distributed.all_reduce``): the partial products ``p = G_r x_r`` with two flags appended
    (this shard's gradient was non-finite / overflowed the storage dtype), so that every shard takes
    the same decision to accept or reject a gradient. Everything m x m is then identical on every
    shard, and ``mul``/``update_mul`` return this shard's part of ``F^{-1} x`` for the Fisher over
    all coordinates. Communication: one (m + 2)-vector per call, plus one flag for the finiteness of
    the result of ``update_mul`` (:class:`hf_mfac.ShardedMFAC` checks the gathered result instead).

    Before the window is full: by default (``normalize_by_seen=False``) the Fisher is divided by m
    as in the paper, i.e. the missing gradients count as zeros. With ``normalize_by_seen=True`` it
    is divided by the number n of gradients held, ``F = damp*I + (1/n) sum_i g_i g_i^T``. Both agree
    once the window is full.
    """

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float,
        device=None,
        dtype: torch.dtype = torch.float32,
        grad_dtype=None,
        normalize_by_seen: bool = False,
        allreduce=None,
    ):
        self.dim = check_int("dim", dim)
        self.num_grads = check_int("num_grads", num_grads)
        self.damp = check_damp(check_real("damp", damp))
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype (the compute dtype) must be torch.float32 or torch.float64; got {dtype}"
            )
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalize_by_seen = bool(normalize_by_seen)
        self.allreduce = (
            allreduce  # sums a vector across coordinate shards in place (None: unsharded)
        )
        self._allocate_window(_storage_dtype(grad_dtype, dtype))
        self.GGt = torch.zeros(
            self.num_grads, self.num_grads, dtype=torch.float64, device=self.device
        )  # (m, m)
        self.ptr = 0  # next slot to overwrite
        self.count = 0  # slots in use; they are always G[:count]
        self._chol = None  # Cholesky factor of K for the current window (fp64), None when stale
        self.fallbacks = 0  # factorisations that needed extra damping (warned about once)

    def _allocate_window(self, storage: torch.dtype) -> None:
        """Allocate the rows of the window (subclasses store them differently)."""
        self._stride = _padded(self.dim)  # row length in memory; columns [dim, _stride) stay zero
        self._G = torch.zeros(
            self.num_grads, self._stride, dtype=storage, device=self.device
        )  # (m, d_pad)

    # -- helpers
    # ---------------------------------------------------------------------------------------
    @property
    def G(self) -> torch.Tensor:
        """The window (m, d): a view of the padded rows without the padding columns."""
        return self._G[:, : self.dim]

    @property
    def grad_dtype(self) -> torch.dtype:
        return self._G.dtype

    def _scale(self, n: int) -> float:
        return float(n if self.normalize_by_seen else self.num_grads)

    def _vector(self, name: str, x: torch.Tensor, finite: bool = True) -> torch.Tensor:
        check_float_tensor(name, x)
        if x.numel() != self.dim:
            raise ValueError(
                f"{name} has {x.numel()} elements; this DynamicMFAC was built for dim={self.dim}"
            )
        x = x.reshape(-1).to(device=self.device)
        if finite:
            check_finite(name, x)
        return x

    def _kernel_rows(self) -> bool:
        """Whether the window products may go to the CUDA kernels: they then get the padded rows."""
        return self._G.is_cuda and self.dtype == torch.float32 and kernels.resolve_impl() != "torch"

    def _matvec(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """``G[:n] x`` (n,) for x (d,) or zero-padded (d_pad,) in the compute dtype."""
        if self._kernel_rows():
            if x.numel() != self._stride:
                x = torch.nn.functional.pad(x, (0, self._stride - x.numel()))
            return kernels.window_matvec(self._G[:n], x, self.dtype)
        return kernels.window_matvec(self._G[:n, : self.dim], x[: self.dim], self.dtype)

    def _rmatvec(self, n: int, c: torch.Tensor) -> torch.Tensor:
        """``G[:n]^T c`` (d,) in the compute dtype."""
        if self._kernel_rows():
            return kernels.window_rmatvec(self._G[:n], c, self.dtype)[: self.dim]
        return kernels.window_rmatvec(self._G[:n, : self.dim], c, self.dtype)

    def _reduce(self, p: torch.Tensor, flags: list[float]) -> tuple[torch.Tensor, list[float]]:
        """Sum ``p`` and ``flags`` over the shards in one all-reduce (nothing to do when
        unsharded)."""
        if self.allreduce is None:
            return p, flags
        buf = torch.cat([p.reshape(-1), torch.tensor(flags, dtype=p.dtype, device=p.device)])
        self.allreduce(buf)
        n = p.numel()
        return buf[:n], [float(f) for f in buf[n:].tolist()]

    def _agree(self, bad: bool) -> bool:
        """Whether any shard has ``bad`` set (one all-reduce of one value when sharded)."""
        if self.allreduce is None:
            return bad
        flag = torch.tensor([1.0 if bad else 0.0], dtype=self.dtype, device=self.device)
        self.allreduce(flag)
        return float(flag) > 0

    def _shift_floor(self, n: int) -> float:
        """Least diagonal shift the accumulation error of ``G G^T`` allows (0 where it is not
        estimated)."""
        if n == 0 or not self._kernel_rows():
            return 0.0
        terms = kernel_matvec_terms(
            n, self._stride, self._G.element_size(), _multiprocessors(self.device)
        )
        return accumulation_error(terms) * float(self.GGt[:n, :n].diagonal().max())

    def _factor(self) -> torch.Tensor:
        if self._chol is None:
            n = self.count
            shift = self._scale(n) * self.damp
            floor = self._shift_floor(n)
            raised = shift
            if floor > shift:  # below the rounding level of G G^T: damp at that level
                raised = shift * 10.0 ** math.ceil(math.log10(floor / shift))
                (logger.warning if self.fallbacks == 0 else logger.debug)(
                    "DynamicMFAC: damping %.1e is below the accumulation error of G G^T (~%.1e); "
                    "factorising "
                    "with %.1e",
                    shift,
                    floor,
                    raised,
                )
            K = self.GGt[:n, :n] + raised * torch.eye(n, dtype=torch.float64, device=self.device)
            chol, extra = damped_cholesky(K, raised, "DynamicMFAC", warn=self.fallbacks == 0)
            if raised > shift or float(extra.max()) > 0:
                self.fallbacks += 1
            self._chol = chol
        return self._chol

    def _solve(self, p: torch.Tensor) -> torch.Tensor:
        """c = K^{-1} p, (n,) in fp64."""
        return torch.cholesky_solve(p.to(torch.float64)[:, None], self._factor())[:, 0]

    def _restore(self, undo: tuple) -> None:
        """Put back what :meth:`_stage` changed (bit for bit)."""
        slot, row, ggt_row, ggt_col, ptr, count, chol, fallbacks = undo
        self._G[slot] = row
        self.GGt[slot] = ggt_row
        self.GGt[:, slot] = ggt_col
        self.ptr, self.count, self._chol, self.fallbacks = ptr, count, chol, fallbacks

    def _stage(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Check g (d,), write it over the oldest row, update ``G G^T`` and factor; all or nothing.

        Returns ``(p, g_stored, undo)``: ``p = G_new g_stored`` (n,) and the stored (rounded)
        gradient, zero-padded to (d_pad,), in the compute dtype (a view of the window row when the
        storage dtype is the compute dtype); ``undo`` for :meth:`_restore`. Raises
        :class:`GradientRejected` with everything restored. Sharded, every shard takes the same
        decision.

        The gradient is written straight into its row (the padding columns stay zero) and checked
        through ``p``: its entry ``p[slot] = sum_i s_i^2`` over the stored values ``s`` is a sum of
        non-negative terms, so it is NaN or inf whenever a stored value is (NaN, inf, or a value
        that overflowed the cast to the storage dtype). Only a non-finite ``p`` is examined
        element-wise, to tell the three causes apart."""
        slot, n = self.ptr, min(self.count + 1, self.num_grads)
        undo = (
            slot,
            self._G[slot].clone(),
            self.GGt[slot].clone(),
            self.GGt[:, slot].clone(),
            self.ptr,
            self.count,
            self._chol,
            self.fallbacks,
        )
        try:
            row = self._G[slot]
            row[: self.dim] = (
                g  # the gradient as stored: the cast to the storage dtype may overflow
            )
            g_stored = row.to(self.dtype)
            p = self._matvec(n, g_stored)  # (n,) one pass over G
            nonfinite = overflow = 0.0
            # g non-finite, g beyond the storage range, or the fp32 products overflowed
            if not all_finite(p):
                if not all_finite(g):
                    nonfinite = 1.0
                elif not all_finite(row):
                    overflow = 1.0
                if nonfinite or overflow:
                    if self.allreduce is None:
                        raise GradientRejected(self._rejection(nonfinite, overflow))
                    p = torch.zeros(
                        n, dtype=self.dtype, device=self.device
                    )  # sharded: join the all-reduce
            p, (nonfinite, overflow) = self._reduce(p, [nonfinite, overflow])
            if nonfinite or overflow:
                raise GradientRejected(self._rejection(nonfinite, overflow))
            if not all_finite(p):
                raise GradientRejected(
                    "the products G g of the gradient with the window are not finite (|g| too "
                    "large for fp32 "
                    "accumulation); the window is unchanged"
                )
            self._commit_products(slot, n, p)
        except BaseException:
            self._restore(undo)
            raise
        return p, g_stored, undo

    def _commit_products(self, slot: int, n: int, p: torch.Tensor) -> None:
        """Write the new row's products ``p`` into GG^T as row and column ``slot`` of the ``n``
        rows held, advance the ring and refactor; a system that cannot be factorised raises
        GradientRejected (the caller restores the window)."""
        p64 = p.to(torch.float64)
        self.GGt[slot, :n] = p64
        self.GGt[:n, slot] = p64
        self.count = n
        self.ptr = (slot + 1) % self.num_grads
        self._chol = None
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
            what = f"g contains NaN or inf values{where}"
        else:
            big = torch.finfo(self._G.dtype).max
            what = (
                f"g has values beyond the range of the window's storage dtype {self._G.dtype} "
                f"(|x| > {big:.6g}){where}: store the window in float32 (grad_dtype) or clip the "
                "gradients"
            )
        return f"{what}; the window is unchanged"

    def _finish(self, x: torch.Tensor, p: torch.Tensor, slot: int | None = None) -> torch.Tensor:
        """(x - G^T K^{-1} p) / damp with p = G x; x (d,) in the compute dtype (not modified).
        Returns a new tensor.

        ``slot``: x is the window's row ``slot`` (``update_mul``: x is the stored gradient). Then
        ``x - G^T c = G^T (e_slot - c)``, and the result is the one product ``G^T c'`` with ``c' =
        (e_slot - c) / damp`` formed in fp64: no pass over x, and no cancellation between x and its
        in-span part ``c_slot G_slot`` (``c_slot`` is close to 1), which otherwise costs ~eps32 *
        |c| / |y|, large at small damping. Where ``c'`` overflows the compute dtype (a tiny damp)
        it falls back to the plain formula."""
        c = self._solve(p)  # (n,) fp64
        if slot is not None:
            e = -c
            e[slot] += 1.0
            scaled = (e / self.damp).to(self.dtype)
            if all_finite(scaled):
                return self._rmatvec(self.count, scaled)  # (d,)
        y = self._rmatvec(self.count, c.to(self.dtype))  # (d,), a new tensor: finished in place,
        return y.sub_(x).div_(-self.damp)  # bit for bit (x - y) / damp

    def _update_mul(self, g: torch.Tensor, check: bool) -> tuple[torch.Tensor, tuple]:
        """``update_mul`` returning also the undo record; ``check``: reject a non-finite result
        (agreed over the shards). Without ``check`` the caller must check the result and
        :meth:`_restore` on failure."""
        p, g_stored, undo = self._stage(g)
        try:
            y = self._finish(g_stored[: self.dim], p, slot=undo[0])
            if check and self._agree(not all_finite(y)):
                raise GradientRejected(
                    "F^{-1} g is not finite for this gradient (damp too small for its scale?); "
                    "the window is unchanged"
                )
        except BaseException:
            self._restore(undo)
            raise
        return y, undo

    # -- public interface
    # ------------------------------------------------------------------------------
    def update(self, g: torch.Tensor) -> None:
        """Add gradient ``g`` (d,), replacing the oldest once m are held, and factor the new system.
        Raises :class:`GradientRejected` (window unchanged) on NaN/inf, on values beyond the storage
        dtype's range, on non-finite products and when the factorisation fails."""
        self._stage(self._vector("g", g, finite=False))

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``F^{-1} x`` (d,) in the compute dtype on the window's device. O(dm + m^2)."""
        x = self._vector("x", x, finite=self.allreduce is None).to(self.dtype)
        if self.allreduce is None:
            return (
                x / self.damp if self.count == 0 else self._finish(x, self._matvec(self.count, x))
            )
        bad = 0.0 if all_finite(x) else 1.0  # sharded: every shard raises or none
        p = (
            self._matvec(self.count, x)
            if self.count and not bad
            else torch.zeros(self.count, dtype=self.dtype, device=self.device)
        )
        p, (bad,) = self._reduce(p, [bad])
        if bad:
            raise FloatingPointError(
                "x contains NaN or inf values (on at least one shard); nothing was changed"
            )
        return x / self.damp if self.count == 0 else self._finish(x, p)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``update(g)`` then ``mul(g)``, reusing ``p = G g``: two passes over G instead of three.
        All or nothing as :meth:`update`; also rejects (and undoes) an update whose ``F^{-1} g`` is
        not finite."""
        return self._update_mul(self._vector("g", g, finite=False), check=True)[0]

    def reset(self) -> None:
        """Forget all gradients."""
        self._G.zero_()
        self.GGt.zero_()
        self.ptr = self.count = 0
        self._chol = None

    def state_dict(self) -> dict:
        """Tensors and plain types only (loadable with ``torch.load(weights_only=True)``). ``G`` is
        the (m, d) window (a view of the padded rows, not a copy), as saved by unpadded windows."""
        return {
            "G": self.G,
            "GGt": self.GGt,
            "ptr": self.ptr,
            "count": self.count,
            "num_grads": self.num_grads,
            "dim": self.dim,
            "damp": self.damp,
            "normalize_by_seen": self.normalize_by_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a window saved by :meth:`state_dict` (dtype of G is kept as saved).

        Refuses (``ValueError`` naming what is wrong; nothing changes) a state whose G or GGt has
        the wrong shape or type or non-finite values, whose ``count``/``ptr`` are out of range or
        inconsistent (a window that is not full has ``ptr == count``), or whose GGt does not belong
        to G: GGt must be symmetric and its diagonal must equal the squared row norms of G (O(md))
        up to the rounding of the storage dtype and of the products. Sharded, the row norms are
        summed over the shards (one all-reduce) and every shard accepts or refuses the same way."""
        self._load_state(state, [])

    def _load_state(self, state: dict, problems: list[str]) -> None:
        """:meth:`load_state_dict` with ``problems`` found by the caller (e.g. a shard range)
        added."""
        problems = list(problems)
        kinds = [0.0] * 4  # caller's / shape or type / count-ptr / non-finite
        kinds[0] = 1.0 if problems else 0.0
        get = state.get if isinstance(state, dict) else (lambda key: None)
        G, GGt = get("G"), get("GGt")
        if G is None and get("I") is not None:
            problems.append(
                f"this is the state of a compressed window (density={get('density')!r}); "
                "this window is dense: load it with the same density"
            )
        shapes_ok = self._check_window_tensors(G, GGt, problems)
        kinds[1] = 0.0 if shapes_ok else 1.0
        count, ptr = get("count"), get("ptr")
        kinds[2] = 0.0 if self._check_ring(count, ptr, problems) else 1.0
        norms = torch.zeros(self.num_grads, dtype=torch.float64, device=self.device)
        if shapes_ok:
            G = G.to(self.device)
            GGt = GGt.to(device=self.device, dtype=torch.float64)
            if not self._check_finite_window(G, GGt, norms, problems):
                kinds[3] = 1.0
        # one all-reduce: the row norms over all shards, and everyone's verdict
        if self.allreduce is not None:
            norms, kinds = self._reduce(norms, kinds)
        if any(kinds):
            self._refuse(kinds, problems)
        n = int(count)
        mismatch = self._gram_mismatch(G, GGt[:n, :n], norms[:n])
        if self._agree(mismatch is not None):
            raise ValueError(
                "cannot load the DynamicMFAC window: "
                + (mismatch or "GGt does not match G on another shard")
                + " (nothing was changed)"
            )
        self._install(G, GGt, int(ptr), n)

    def _check_window_tensors(self, G, GGt, problems: list[str]) -> bool:
        """Whether G (m, d) and GGt (m, m) are floating-point tensors of this window's shapes; else
        the problems are appended to ``problems``."""
        m, d = self.num_grads, self.dim
        ok = True
        for name, t, shape in (("G", G, (m, d)), ("GGt", GGt, (m, m))):
            if not isinstance(t, torch.Tensor):
                problems.append(f"{name} is missing or not a tensor ({type(t).__name__})")
            elif t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                problems.append(f"{name} has dtype {t.dtype}; expected a floating-point dtype")
            elif tuple(t.shape) != shape:
                problems.append(
                    f"{name} has shape {tuple(t.shape)}; this DynamicMFAC holds {shape} (num_grads "
                    "and "
                    "the set of trained parameters must match the checkpoint)"
                )
            else:
                continue
            ok = False
        return ok

    def _check_ring(self, count, ptr, problems: list[str]) -> bool:
        """Whether ``count``/``ptr`` are integers in range and consistent (a window that is not full
        has ``ptr == count``); else the problem is appended to ``problems``."""
        m = self.num_grads
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (count, ptr)):
            problems.append(f"count and ptr must be integers; got count={count!r}, ptr={ptr!r}")
        elif not 0 <= count <= m:
            problems.append(f"count={count} is outside [0, num_grads={m}]")
        elif not 0 <= ptr < m:
            problems.append(f"ptr={ptr} is outside [0, num_grads={m})")
        elif count < m and ptr != count:
            problems.append(
                f"ptr={ptr} does not follow count={count}: a window that is not full has ptr == "
                "count"
            )
        else:
            return True
        return False

    def _check_finite_window(
        self, G: torch.Tensor, GGt: torch.Tensor, norms: torch.Tensor, problems: list[str]
    ) -> bool:
        """Whether G and GGt (on this device) are finite; adds the squared row norms of a finite G
        to ``norms`` (m,) fp64, in bounded column chunks, and appends the problems to
        ``problems``."""
        ok = True
        if not all_finite(G):
            bad = int((~torch.isfinite(G)).any(1).nonzero()[0])
            problems.append(f"G holds NaN or inf values (first in row {bad})")
            ok = False
        else:
            for s in range(0, self.dim, 1 << 20):
                norms += G[:, s : s + (1 << 20)].to(torch.float64).square().sum(1)
        if not all_finite(GGt):
            problems.append("GGt holds NaN or inf values")
            ok = False
        return ok

    @staticmethod
    def _refuse(kinds: list[float], problems: list[str]) -> None:
        """Raise the ``ValueError`` of a refused window; with no problem of its own, name the kinds
        another shard reported (``kinds``: caller's / shape or type / count-ptr / non-finite)."""
        if not problems:
            what = [
                w
                for k, w in zip(
                    kinds, ("a shard range", "a shape or type", "count/ptr", "non-finite values")
                )
                if k
            ]
            problems.append(
                f"another shard's window is invalid ({', '.join(what)}); see that rank's error"
            )
        raise ValueError(
            "cannot load the DynamicMFAC window: " + "; ".join(problems) + " (nothing was changed)"
        )

    def _gram_mismatch(self, G: torch.Tensor, K: torch.Tensor, want: torch.Tensor) -> str | None:
        """Why ``K = GGt[:n, :n]`` does not belong to G (not symmetric, or its diagonal differs from
        the squared row norms ``want`` (n,) beyond the rounding of the storage dtype and of the
        products); None if it does."""
        if not torch.equal(K, K.T):
            return "GGt[:count, :count] is not symmetric"
        if not K.shape[0]:
            return None
        tol = 4 * torch.finfo(G.dtype).eps + accumulation_error(self.dim, self.dtype)
        diag = K.diagonal()
        off = (diag - want).abs() > tol * want
        if not bool(off.any()):
            return None
        i = int(off.nonzero()[0])
        return (
            f"GGt does not match G: GGt[{i}, {i}] = {float(diag[i]):.6g} but the squared norm "
            f"of G[{i}] "
            f"is {float(want[i]):.6g} (relative tolerance {tol:.1e})"
        )

    def _install(self, G: torch.Tensor, GGt: torch.Tensor, ptr: int, count: int) -> None:
        """Copy a checked window in: G (m, d) into the padded rows (new rows when its dtype
        differs), GGt, the ring position; the cached factor is dropped."""
        m, d = self.num_grads, self.dim
        if G.dtype == self._G.dtype:
            self._G[:, :d].copy_(G)
        else:
            rows = torch.zeros(m, self._stride, dtype=G.dtype, device=self.device)
            rows[:, :d] = G
            self._G = rows
        self.GGt = GGt.clone()
        self.ptr, self.count = ptr, count
        self._chol = None
