"""Block-diagonal empirical-Fisher inverse ([WoodFisher, §4], [oBERT, §3]).

Coordinates are cut into blocks of B consecutive weights (the last block is padded with coordinates
that carry no gradient, so d need not divide by B). Per block ``F_b = λ_b * I + (1/m) G_b^T G_b``,
with either one absolute ``λ_b = damp`` (the papers' setting) or a damping relative to the block's
own scale, ``λ_b = rel_damp * mean(diag((1/m) G_b^T G_b))`` (see :func:`relative_damp`), which does
not change when the loss, hence every gradient, is multiplied by a constant. Instead of oBERT's one
Woodbury rank-1 update per gradient (memory-bound: d*B reads and writes per gradient), gradients
arrive in chunks (k, d) and ``G_b^T G_b`` is accumulated with one batched GEMM per chunk; the
inverse is then formed once with batched fp64 Cholesky (then ``L^{-T} L^{-1}``). The m gradients are
never all held.

Precision and memory. The precision of the build follows the error bound: an fp32 sum of k products
errs by about ``k * eps32 * |g|^2`` (``|g|^2`` the mean square of the gradients' coordinates), which
matters only against a damping that small. Each chunk's products ``G_b^T G_b`` are fp32 GEMMs when
``k * eps32 * |g|^2 <= PRODUCT_TOL * λ``, else fp64 (exact for fp32 values) (:func:`product_dtype`);
the running sum is fp32 when the bound of the whole fp32 path, ``(m + 1) * eps32 * |g|^2``, is
within ``SUM_TOL * λ`` for a relative damping and the announced number of gradients m
(:func:`sum_dtype`), else fp64. With the relative damping ``λ = rel_damp * |g|^2`` both rules are
free of the gradients' scale: at the pruners' defaults (rel_damp = 1e-2, m = 128, chunks of at most
32) everything is fp32 and the accumulator is the size of the packed fp32 inverse, written over it
in place; the papers' tiny absolute damps get exact products and an fp64 sum, since there an fp32
sum is far less accurate than oBERT's fp32 rank-1 Woodbury updates (benchmarks/RESULTS.md, "Why
the block-Fisher sum stays in fp64").

Storage. With an fp32 inverse the sums of each symmetric block are packed, ``Bp (Bp + 1) / 2``
values (Bp = B rounded up to even), in the layout of LAPACK's rectangular full packed storage, so
that packing and unpacking are strided copies rather than gathers: for ``Bp = 2h`` the upper
triangle of the top-left (h, h) quarter and the lower triangle of the bottom-right one share an
(h + 1, h) rectangle and the bottom-left quarter follows (an odd block is padded by one zero row and
column). The inverse is kept packed as well, in fp32, half of a whole fp32 block, and written page
by page over the sums: row for row over fp32 sums, or over the first half of the bytes of fp64 sums
(two slabs of blocks, the second freed once the inverse is formed, see :class:`BlockFisherInverse`):
the build peaks at the accumulator, never accumulator plus inverse. Whatever needs whole blocks
(``mul``, the OBS update, CAP) unpacks a page at a time (:func:`read_blocks`). With an fp64 inverse
whole fp64 blocks are accumulated and inverted in place (d*B values). The gradient chunk is
reordered to (block, gradient, coordinate) in pages of blocks: cache-sized on a CPU, larger on an
accelerator, where each page costs kernel launches.
"""
from __future__ import annotations

import logging
import time

import torch

from ._checks import (
    check_damp,
    check_finite,
    check_float_tensor,
    check_positive_int,
    damped_cholesky,
    page_bytes,
    trim_host_heap,
)

logger = logging.getLogger("hf_mfac")

__all__ = [
    "block_fisher_bytes",
    "BlockFisherInverse",
    "relative_damp",
    "check_damping",
    "read_blocks",
    "block_shape",
    "product_dtype",
    "sum_dtype",
    "PRODUCT_TOL",
    "SUM_TOL",
]

# fp64 bytes of one page of blocks in add_grads and the inversion (the temporaries are a few times
# this), per device type: small enough to stay in cache on a CPU; other devices (accelerators, where
# each page costs a few kernel launches) use _ACCEL_PAGE_BYTES ...
_PAGE_BYTES = {"cpu": 1 << 20}
_ACCEL_PAGE_BYTES = 256 << 20
# ... and at most this fraction of the fp32 inverse's bytes, so that small Fishers do not double in
# the build
_PAGE_FRACTION = {"cpu": 1 / 32}
_ACCEL_PAGE_FRACTION = 1 / 8


def check_damping(damp, rel_damp) -> tuple[float | None, float | None]:
    """Validate a damping given as an absolute ``damp`` or a relative ``rel_damp`` (exactly one of
    them)."""
    if (damp is None) == (rel_damp is None):
        raise ValueError(
            "give exactly one of damp (absolute: F = damp*I + ...) and rel_damp "
            "(relative: a fraction "
            "of the mean Fisher diagonal of each damping group of blocks); got "
            f"damp={damp!r}, rel_damp={rel_damp!r}"
        )
    if damp is not None:
        return check_damp(damp), None
    return None, check_damp(rel_damp, "rel_damp")


def damp_group_sums(
    diag_sums: torch.Tensor, counts: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-group sums of the blocks' diagonal sums and live counts, a (2, n_groups) fp64 tensor
    (``groups`` None: each block its own group): what :func:`relative_damp` means over, and what a
    Fisher split over shards or devices adds up across them before it damps."""
    sums, cnt = diag_sums.to(torch.float64), counts.to(torch.float64)
    if groups is None:
        return torch.stack([sums, cnt])
    n = int(groups.max()) + 1 if groups.numel() else 0
    acc = torch.zeros(2, n, dtype=torch.float64, device=sums.device)
    acc[0].index_add_(0, groups, sums)
    acc[1].index_add_(0, groups, cnt)
    return acc


def relative_damp(
    diag_sums: torch.Tensor,
    counts: torch.Tensor,
    rel_damp: float,
    groups: torch.Tensor | None = None,
    reduce=None,
) -> torch.Tensor:
    """Per-block damping ``rel_damp * mean Fisher diagonal`` (n_blocks,) fp64.

    ``diag_sums`` (n_blocks,) are the sums of each block's Fisher diagonal over its live coordinates
    and ``counts`` (n_blocks,) their number (coordinates with a non-zero diagonal: padding and
    pruned weights carry no gradient). The mean is taken over each group of blocks (``groups``
    (n_blocks,) int: the target tensor each block belongs to; None: each block its own group), as
    SparseGPT and OBC damp a layer Hessian by a fraction of its mean diagonal. With ``reduce`` given
    (a sharded Fisher), ``reduce(t)`` sums the per-group sums and counts (a (2, n_groups) fp64
    tensor) over the shards in place, so that every shard damps a group alike.

    A group with no gradient at all gets the smallest damping of the others (scale-aware, so that
    its weights, which the Fisher says cost nothing, stay cheap to prune), or ``rel_damp`` when
    every group is empty. Multiplying every gradient by c multiplies the result by c^2, as it does
    the Fisher: OBS scores scale uniformly and neither the selection nor the updates change."""
    acc = damp_group_sums(diag_sums, counts, groups)
    if reduce is not None:
        reduce(acc)
    lam = torch.where(acc[1] > 0, acc[0] / acc[1].clamp_min(1), torch.zeros_like(acc[0])) * rel_damp
    pos = lam > 0
    floor = (
        lam[pos].min()
        if bool(pos.any())
        else torch.tensor(rel_damp, dtype=torch.float64, device=lam.device)
    )
    lam = torch.where(pos, lam, floor)
    return lam if groups is None else lam[groups]


# fp32 products are used where their error bound k eps32 |g|^2 is at most this fraction of the
# damping ...
PRODUCT_TOL = 1e-3
# ... and an fp32 running sum where the bound of the whole fp32 path, (m + 1) eps32 |g|^2, is at
# most this one: measured at the default relative damping (1e-2), m = 128, B = 32, gradients with a
# decaying spectrum, the fp32 sum erred by 1.0e-5 in diag(F^{-1}) against 8.7e-6 for fp32 products
# summed in fp64 and 6e-8 for exact products (fp32 rank-1 Woodbury updates: 7e-7); all far below the
# sampling error of a Fisher from m gradients (about 1 / sqrt(m)), and the masks agree (tested)
SUM_TOL = 1e-2
_EPS32 = torch.finfo(torch.float32).eps


def product_dtype(
    k: int,
    mean_square: float,
    damp: float | None = None,
    rel_damp: float | None = None,
    tol: float = PRODUCT_TOL,
) -> torch.dtype:
    """The dtype of the products ``G_b^T G_b`` of a chunk of ``k`` gradients, from the error bound.

    fp32 GEMMs over k gradients err by about ``k * eps32 * |g|^2`` in each entry of ``(1/m) sum
    G_b^T G_b`` (``mean_square`` = ``|g|^2``, the mean square of the gradients' coordinates);
    against the damping λ this is a relative error of ``F^{-1}`` of at most that over λ. fp32 when
    ``k * eps32 * |g|^2 <= tol * λ``, with ``λ = damp`` (absolute) or ``rel_damp * |g|^2``
    (relative: the rule is then ``k * eps32 <= tol * rel_damp``, independent of the scale), else
    fp64 (exact products). A chunk of zeros (``|g|^2 = 0``) is fp32 (exact)."""
    if rel_damp is not None:
        ok = k * _EPS32 <= tol * rel_damp
    else:
        ok = k * _EPS32 * mean_square <= tol * damp
    return torch.float32 if ok else torch.float64


def sum_dtype(num_grads: int | None, rel_damp: float | None, tol: float = SUM_TOL) -> torch.dtype:
    """The dtype of the running sum of ``G_b^T G_b`` (the accumulator), chosen before any gradient
    is seen.

    Summing the fp32 products of chunks of k gradients into an fp32 accumulator errs by about ``(k +
    m / k) * eps32 * |g|^2 <= (m + 1) * eps32 * |g|^2`` for m gradients in all. fp32 (half the
    memory, and the packed fp32 inverse is then written over the accumulator exactly) when that
    bound is at most ``tol`` times a relative damping ``rel_damp * |g|^2``, i.e. ``(m + 1) * eps32
    <= tol * rel_damp``; fp64 with an absolute damping (the gradients' scale is not known yet) or
    when ``m`` is not given."""
    if rel_damp is None or num_grads is None:
        return torch.float64
    return torch.float32 if (num_grads + 1) * _EPS32 <= tol * rel_damp else torch.float64


def block_fisher_bytes(
    dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    num_grads: int | None = None,
    rel_damp: float | None = None,
) -> tuple[int, int]:
    """``(build, inverse)``: the bytes a :class:`BlockFisherInverse` of these settings holds while
    it accumulates (its peak) and once inverted. fp32: packed triangles, summed in fp32 or fp64
    (:func:`sum_dtype`), the inverse packed in fp32; fp64: whole fp64 blocks throughout."""
    B = min(block_size, dim)
    nb = -(-dim // B)
    if dtype == torch.float64:
        return nb * B * B * 8, nb * B * B * 8
    Bp = B + B % 2
    P = Bp * (Bp + 1) // 2
    if sum_dtype(num_grads, rel_damp) == torch.float32:
        return nb * P * 4, nb * P * 4
    return nb * P * 8, -(-nb // 2) * P * 8


def block_shape(hinv) -> tuple[int, int, int]:
    """``(n_blocks, B, B)`` of block inverses given as a tensor (n, B, B) or a
    :class:`BlockFisherInverse`."""
    if isinstance(hinv, torch.Tensor):
        return tuple(hinv.shape)
    return hinv.num_blocks, hinv.block_size, hinv.block_size


def read_blocks(hinv, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
    """Blocks [s, e) of ``hinv`` (a tensor (n, B, B), or a :class:`BlockFisherInverse` whose packed
    blocks are unpacked) copied into ``out`` (e - s, B, B), converted to its dtype; returns
    ``out``."""
    if isinstance(hinv, torch.Tensor):
        return out.copy_(hinv[s:e])
    return hinv.unpack(s, e, out=out)


class BlockFisherInverse:
    """Block-diagonal ``F^{-1}`` built from streamed gradients.

    ``add_grads(G)`` takes a chunk (k, d) or a single gradient (d,); ``diag()`` (d,), ``mul(x)``
    (d,), ``submatrix(idx)`` and ``unpack(s, e)`` (e - s, B, B) give the inverse (formed on first
    use, O(d B^2)). Cost of ``add_grads``: O(k d B) as batched GEMMs. ``m`` in the formula is the
    number of gradients added. Damping: give ``damp`` (absolute λ) or ``rel_damp`` (a fraction of
    the mean Fisher diagonal of each group of blocks, ``damp_groups`` (n_blocks,) int, e.g. the
    target tensor of each block; default: each block alone; :func:`relative_damp`); ``block_damp``
    (n_blocks,) holds the λ_b used once the inverse is formed. ``products``: the dtype of each
    chunk's products ``G_b^T G_b`` (the running sum is fp64): ``"auto"`` chooses by the error bound
    (:func:`product_dtype`), ``product_counts`` counts the gradients taken with each.

    Storage (fp32, the default): each inverse block is kept as its packed triangle, ``Bp (Bp + 1) /
    2`` values (``Bp`` = B rounded up to even), about half of the (B, B) block; everything that
    needs whole blocks unpacks a page of them at a time (:meth:`unpack`). The accumulator is two
    fp64 slabs of blocks (the first half of the blocks and the rest); the packed fp32 inverse of
    every block is written, page by page, over the first slab (whose bytes are exactly the packed
    fp32 inverse of all blocks), and the second slab is freed once read: the build peaks at the fp64
    accumulator, what follows holds the packed fp32 inverse alone. ``dtype=float64`` keeps whole
    fp64 blocks (d B values) instead."""

    def __init__(
        self,
        dim: int,
        block_size: int,
        damp: float | None = None,
        *,
        rel_damp: float | None = None,
        damp_groups: torch.Tensor | None = None,
        damp_reduce=None,
        device=None,
        dtype: torch.dtype = torch.float32,
        products: str | torch.dtype = "auto",
        num_grads: int | None = None,
    ):
        self.dim = check_positive_int("dim", dim)
        if products not in ("auto", torch.float32, torch.float64):
            raise ValueError(
                f"products must be 'auto', torch.float32 or torch.float64; got {products!r}"
            )
        self.products = products
        self.expected_grads = (
            None if num_grads is None else check_positive_int("num_grads", num_grads)
        )
        # gradients accumulated with each
        self.product_counts = {torch.float32: 0, torch.float64: 0}
        self.block_size = min(check_positive_int("block_size", block_size), self.dim)
        self.damp, self.rel_damp = check_damping(damp, rel_damp)
        self.block_damp: torch.Tensor | None = None
        self.damp_groups, self.damp_reduce = damp_groups, damp_reduce
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_blocks = -(-self.dim // self.block_size)
        self.padded_dim = self.num_blocks * self.block_size
        B = self.block_size
        self._packed = dtype == torch.float32
        # packed blocks are stored for an even size (an odd block gets one zero row and column)
        self._bp = B + B % 2 if self._packed else B
        h = self._bp // 2
        self._rect = (h + 1) * h  # packed row: [rect (h+1, h) | S21 (h, h)], see _pack_add
        self.packed_size = self._bp * (self._bp + 1) // 2
        self._rect_upper = torch.ones(h + 1, h, dtype=torch.bool, device=self.device).triu()
        r = torch.arange(self._bp, device=self.device)
        # where the diagonal sits in a packed row: S11[r, r] at rect[r, r], S22[r, r] at rect[r + 1,
        # r]
        self._diag_pos = torch.where(r < h, r * h + r, (r - h + 1) * h + (r - h))[:B]
        # (B, B) packed position of each entry, built on first use
        self._pos: torch.Tensor | None = None
        # the fp64 sums of G_b^T G_b: packed, two slabs of blocks [0, split) and [split, nb); or
        # (nb, B, B) the running sum: fp32 where the error bound allows it (sum_dtype), packed, in
        # one slab over which the packed fp32 inverse is written row for row; else fp64, in two
        # slabs (see the class docstring)
        self.sum_dtype = torch.float64
        if self._packed and products in ("auto", torch.float32):
            self.sum_dtype = sum_dtype(self.expected_grads, self.rel_damp)
        fp64_sum = self.sum_dtype == torch.float64
        self._split = -(-self.num_blocks // 2) if self._packed and fp64_sum else self.num_blocks
        self._slabs: list[torch.Tensor] | None = None
        # the inverse: packed (nb, P) fp32, or (nb, B, B) fp64
        self._mat: torch.Tensor | None = None
        self.reset()

    # -- storage
    # ------------------------------------------------------------------------------------------
    def _acc(self, s: int, e: int) -> torch.Tensor:
        """The accumulated rows of blocks [s, e), inside one slab (a view)."""
        if s >= self._split:
            return self._slabs[1][s - self._split : e - self._split]
        if e > self._split:
            raise IndexError("a page of blocks crosses the accumulator's slabs")
        return self._slabs[0][s:e]

    def _pages(self, n: int):
        """(s, e) pages of at most ``n`` blocks that never cross the accumulator's slabs."""
        for lo, hi in ((0, self._split), (self._split, self.num_blocks)):
            for s in range(lo, hi, n):
                yield s, min(hi, s + n)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_dim == self.dim:
            return x
        return torch.nn.functional.pad(x, (0, self.padded_dim - self.dim))

    def _page(self, per_block_bytes: int) -> int:
        cap = page_bytes(self.device, _PAGE_BYTES, _ACCEL_PAGE_BYTES)
        frac = _PAGE_FRACTION.get(self.device.type, _ACCEL_PAGE_FRACTION)
        page = min(cap, max(1 << 14, int(4 * self.padded_dim * self.block_size * frac)))
        return max(1, page // max(1, per_block_bytes))

    def add_grads(self, G: torch.Tensor) -> None:
        """Accumulate gradients G (k, d) (or (d,)); raises on NaN/inf without changing the
        accumulator."""
        if self._inverted:
            raise RuntimeError(
                "the inverse was already formed; call reset() before adding new gradients"
            )
        check_float_tensor("G", G)
        G = G.reshape(1, -1) if G.dim() == 1 else G
        if G.dim() != 2 or G.shape[1] != self.dim:
            raise ValueError(f"G must have shape (k, {self.dim}); got {tuple(G.shape)}")
        t0 = time.perf_counter()
        G = G.to(device=self.device)
        check_finite("G", G)
        if (
            self.sum_dtype == torch.float32
            and self.num_grads + G.shape[0] > self.expected_grads
            and self.num_grads <= self.expected_grads
        ):
            logger.warning(
                "BlockFisherInverse: more than the %d gradients announced (num_grads) "
                "go "
                "into an fp32 sum chosen for that many; its error bound grows with "
                "their "
                "number",
                self.expected_grads,
            )
        self._accumulate(G)
        self.num_grads += G.shape[0]
        self.seconds["accumulate"] += time.perf_counter() - t0

    def _accumulate(self, G: torch.Tensor) -> None:
        """``acc_b += G_b^T G_b`` for a chunk G (k, d), page by page of blocks: products in the
        dtype of :meth:`_product_dtype`, the running sum in fp64."""
        k, B, Bp, nb = G.shape[0], self.block_size, self._bp, self.num_blocks
        dt = self._product_dtype(G)
        self.product_counts[dt] += k
        size = 8 if dt == torch.float64 else 4
        # blocks per page: the chunk and products stay in cache
        n = min(nb, self._page(size * Bp * (k + Bp)))
        buf = torch.empty(n, k, Bp, dtype=dt, device=self.device)
        if Bp > B:
            buf[:, :, B:] = 0  # the padding column of an odd block carries no gradient
        prod = torch.empty(n, Bp, Bp, dtype=dt, device=self.device)
        full = self.dim // B  # blocks that hold B coordinates (the last one may hold fewer)
        for s, e in self._pages(n):
            Gb, f = buf[: e - s], min(e, full)
            if f > s:  # reorder to (block, gradient, coordinate) and convert in one pass
                Gb[: f - s, :, :B].copy_(G[:, s * B : f * B].view(k, f - s, B).transpose(0, 1))
            if e > f:  # the last, partial block: its missing coordinates carry no gradient
                Gb[-1].zero_()
                Gb[-1, :, : self.dim - f * B].copy_(G[:, f * B :])
            if self._packed:
                self._pack_add(self._acc(s, e), torch.bmm(Gb.mT, Gb, out=prod[: e - s]))
            elif dt == torch.float64:
                self._acc(s, e).baddbmm_(Gb.mT, Gb)  # (n, B, B) += G_b^T G_b
            else:
                self._acc(s, e).add_(torch.bmm(Gb.mT, Gb, out=prod[: e - s]))

    def _product_dtype(self, G: torch.Tensor) -> torch.dtype:
        """fp32 or fp64 products for the chunk G (k, d): ``products`` when set; fp64 for an fp64
        inverse or fp64 gradients; else by the error bound (:func:`product_dtype`; an absolute
        damping compares with the chunk's mean square)."""
        if self.products != "auto":
            return self.products
        if self.sum_dtype == torch.float32:  # within the bound of the whole fp32 path (sum_dtype)
            return torch.float32
        if self.dtype == torch.float64 or G.dtype == torch.float64:  # asked for fp64 accuracy
            return torch.float64
        if self.rel_damp is not None:
            return product_dtype(G.shape[0], 0.0, rel_damp=self.rel_damp)
        ms = float(G.square().sum(dtype=torch.float64)) / G.numel()
        return product_dtype(G.shape[0], ms, damp=self.damp)

    def _pack_add(self, acc: torch.Tensor, P: torch.Tensor) -> None:
        """``acc += pack(P)`` for symmetric P (n, Bp, Bp), Bp = 2h, in the layout of rectangular
        full packed storage: the upper triangle of the top-left (h, h) quarter and the lower
        triangle of the bottom-right one share an (h + 1, h) rectangle, the bottom-left quarter
        follows; strided views, no gather."""
        h, n = self._bp // 2, P.shape[0]
        rect = torch.where(self._rect_upper, P[:, : h + 1, :h], P[:, h - 1 :, h:])
        acc[:, : self._rect].view(n, h + 1, h).add_(rect)
        acc[:, self._rect :].view(n, h, h).add_(P[:, h:, :h])

    def _pack_into(self, dst: torch.Tensor, P: torch.Tensor) -> None:
        """``dst = pack(P)`` (n, packed_size), any dtype, for symmetric P (n, Bp, Bp)."""
        h, n = self._bp // 2, P.shape[0]
        dst[:, : self._rect].view(n, h + 1, h).copy_(
            torch.where(self._rect_upper, P[:, : h + 1, :h], P[:, h - 1 :, h:])
        )
        dst[:, self._rect :].view(n, h, h).copy_(P[:, h:, :h])

    def _unpack_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Whole symmetric blocks (n, B, B) from packed rows (n, packed_size), in ``out``'s dtype
        (default: the rows' dtype). Strided copies, no gather."""
        h, n, B = self._bp // 2, rows.shape[0], self.block_size
        dtype = rows.dtype if out is None else out.dtype
        rows = rows.to(dtype)
        direct = out is not None and self._bp == B
        full = (
            out if direct else torch.empty(n, self._bp, self._bp, dtype=dtype, device=rows.device)
        )
        rect = rows[:, : self._rect].view(n, h + 1, h)
        low = rows[:, self._rect :].view(n, h, h)
        top, bottom = rect[:, :h], rect[:, 1:]  # S11's upper triangle, S22's lower triangle
        upper = self._rect_upper[:h]
        torch.where(upper, top, top.mT, out=full[:, :h, :h])
        torch.where(upper, bottom.mT, bottom, out=full[:, h:, h:])
        full[:, h:, :h] = low
        full[:, :h, h:] = low.mT
        if direct or self._bp == B:
            return full
        if out is None:
            return full[:, :B, :B]
        return out.copy_(full[:, :B, :B])

    def _full(self, s: int, e: int) -> torch.Tensor:
        """The accumulated sums of blocks [s, e) as full symmetric fp64 matrices (a new tensor)."""
        if not self._packed:
            return self._acc(s, e).clone()
        if self.sum_dtype == torch.float64:
            return self._unpack_rows(self._acc(s, e))
        B = self.block_size
        out = torch.empty(e - s, B, B, dtype=torch.float64, device=self.device)
        return self._unpack_rows(self._acc(s, e), out)

    def _pack(self, full: torch.Tensor) -> torch.Tensor:
        """The packed rows (n, Bp(Bp+1)/2) fp64 of symmetric blocks (n, B, B)."""
        n, B, Bp = full.shape[0], self.block_size, self._bp
        P = torch.zeros(n, Bp, Bp, dtype=torch.float64, device=self.device)
        P[:, :B, :B] = full
        acc = torch.zeros(n, self.packed_size, dtype=torch.float64, device=self.device)
        self._pack_add(acc, P)
        return acc

    def _invert(self) -> None:
        if self._inverted:
            return
        if self.num_grads == 0:
            raise RuntimeError("no gradients were added; call add_grads() first")
        t0 = time.perf_counter()
        if self.device.type == "cpu":  # the gradient phase's freed activations back to the system
            trim_host_heap()
        B, nb = self.block_size, self.num_blocks
        lam = self._block_damp()  # (nb,)
        if self._packed and self.sum_dtype == torch.float32:  # row for row over the fp32 sums
            out = self._slabs[0]
        elif self._packed:  # block b's packed fp32 inverse lands on the first slab's blocks <= b/2
            out = self._slabs[0].view(-1).view(torch.float32)[: nb * self.packed_size].view(nb, -1)
        else:
            out = self._slabs[0]
        batch = self._page(8 * B * B)
        eye = torch.eye(B, dtype=torch.float64, device=self.device)
        for s, e in self._pages(batch):
            shift = lam[s:e]
            F = self._full(s, e).div_(self.num_grads)
            F.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
            L, _ = damped_cholesky(F, shift, "BlockFisherInverse")
            # F^{-1} = L^{-T} L^{-1}: one batched triangular solve and one bmm (written over F, no
            # longer needed) ran 1.5x faster than cholesky_inverse (LAPACK potri per matrix) at B =
            # 32, as accurate (the same two steps), and exactly symmetric as well
            Li = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
            inv = torch.bmm(Li.mT, Li, out=F)
            if self._packed:
                if self._bp > B:
                    # the padding row and column: zero
                    inv = torch.nn.functional.pad(inv, (0, 1, 0, 1))
                self._pack_into(out[s:e], inv)
            else:
                out[s:e] = inv
        self._mat, self._slabs = out, None  # the second slab is freed here
        self.block_damp = lam
        self._inverted = True
        self.seconds["invert"] += time.perf_counter() - t0

    def _block_damp(self) -> torch.Tensor:
        """λ_b (n_blocks,) fp64 for the accumulated (not yet inverted) blocks."""
        if self.rel_damp is None:
            return torch.full(
                (self.num_blocks,), self.damp, dtype=torch.float64, device=self.device
            )
        sums, counts = self._diag_sums()
        return relative_damp(sums, counts, self.rel_damp, self._groups(), self.damp_reduce)

    def _groups(self) -> torch.Tensor | None:
        return None if self.damp_groups is None else self.damp_groups.to(self.device)

    def _diag_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each accumulated block's sum and count of its live diagonal entries of F, a page of
        blocks at a time (the whole (nb, B) diagonal would be 4-8 bytes a weight on top of the
        accumulator)."""
        nb, B = self.num_blocks, self.block_size
        sums = torch.empty(nb, dtype=self.sum_dtype if self._packed else torch.float64,
                           device=self.device)
        counts = torch.empty(nb, dtype=torch.long, device=self.device)
        for s, e in self._pages(max(1, (1 << 20) // B)):
            if self._packed:
                diag = self._acc(s, e)[:, self._diag_pos] / self.num_grads  # (e - s, B)
            else:
                diag = self._acc(s, e).diagonal(dim1=-2, dim2=-1) / self.num_grads
            torch.sum(diag, 1, out=sums[s:e])
            torch.sum(diag > 0, 1, out=counts[s:e])
        return sums, counts

    def damp_sums(self) -> torch.Tensor | None:
        """The per-group diagonal sums and live counts of the accumulated Fisher, (2, n_groups)
        fp64 (see :func:`damp_group_sums`), before any ``damp_reduce``: what a Fisher split in
        parts adds up over its parts so that each damps like the whole. None with an absolute
        damping (nothing to add up). Before the inverse only."""
        if self.rel_damp is None:
            return None
        if self._inverted:
            raise RuntimeError("damp_sums() reads the accumulated Fisher: call it before invert()")
        if self.num_grads == 0:
            raise RuntimeError("no gradients were added; call add_grads() first")
        sums, counts = self._diag_sums()
        return damp_group_sums(sums, counts, self._groups())

    # -- the inverse
    # ----------------------------------------------------------------------------------------
    def invert(self) -> "BlockFisherInverse":
        """Form the inverse now (it is formed on first use otherwise); returns this object."""
        self._invert()
        return self

    def unpack(
        self, s: int = 0, e: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Whole inverse blocks [s, e) as (e - s, B, B), in ``out`` (any float dtype) or a new
        tensor in ``dtype``. Rows/columns past ``dim`` in the last block are padding. O((e - s)
        B^2)."""
        self._invert()
        e = self.num_blocks if e is None else e
        if not self._packed:
            return self._mat[s:e].clone() if out is None else out.copy_(self._mat[s:e])
        return self._unpack_rows(self._mat[s:e], out)

    def blocks(self) -> torch.Tensor:
        """All inverse blocks (n_blocks, B, B), a new tensor in ``dtype`` (about twice the packed
        storage: prefer :meth:`unpack` by pages at scale; the fp64 storage itself with
        ``dtype=float64``)."""
        self._invert()
        return self._mat if not self._packed else self.unpack()

    def diag(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``diag(F^{-1})`` (d,), or its coordinates ``[start, stop)`` (read from those blocks
        only: a page of the diagonal without the whole)."""
        self._invert()
        stop = self.dim if stop is None else min(stop, self.dim)
        B = self.block_size
        s, e = start // B, -(-stop // B)
        if self._packed:
            d = self._mat[s:e, self._diag_pos]
        else:
            d = self._mat[s:e].diagonal(dim1=-2, dim2=-1)
        return d.reshape(-1)[start - s * B : stop - s * B]

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^{-1} x`` for x (d,): batched matrix-vector products over pages of unpacked blocks,
        O(d B)."""
        check_float_tensor("x", x)
        if x.numel() != self.dim:
            raise ValueError(f"x has {x.numel()} elements; expected dim={self.dim}")
        self._invert()
        B = self.block_size
        xb = self._padded(x.reshape(-1).to(device=self.device, dtype=self.dtype))
        xb = xb.view(self.num_blocks, B, 1)
        if not self._packed:
            return (self._mat @ xb).reshape(-1)[: self.dim]
        y = torch.empty_like(xb)
        n = min(self.num_blocks, self._page(4 * B * B))
        buf = torch.empty(n, B, B, dtype=self.dtype, device=self.device)
        for s in range(0, self.num_blocks, n):
            e = min(self.num_blocks, s + n)
            torch.bmm(self._unpack_rows(self._mat[s:e], buf[: e - s]), xb[s:e], out=y[s:e])
        return y.reshape(-1)[: self.dim]

    def _positions(self) -> torch.Tensor:
        """(B, B) long: where entry (r, c) of a block sits in its packed row."""
        if self._pos is None:
            codes = torch.arange(self.packed_size, dtype=torch.float64, device=self.device)[None]
            self._pos = self._unpack_rows(codes)[0].round().long()
        return self._pos

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``[F^{-1}]_QQ`` for index sets ``idx`` (n, g) -> (n, g, g); zero between different
        blocks."""
        self._invert()
        idx = torch.as_tensor(idx, device=self.device)
        blk, loc = torch.div(idx, self.block_size, rounding_mode="floor"), idx % self.block_size
        if self._packed:  # (n, g, g), the row's block
            vals = self._mat[blk[:, :, None], self._positions()[loc[:, :, None], loc[:, None, :]]]
        else:
            vals = self._mat[blk[:, :, None], loc[:, :, None], loc[:, None, :]]
        return torch.where(blk[:, :, None] == blk[:, None, :], vals, torch.zeros_like(vals))

    def finish(self) -> "BlockFisherInverse":
        """The inverse once all gradients are in: this object (formed on first use). Gradient sinks
        of the pruners (``add_grads`` then ``finish``) share this protocol."""
        return self

    def storage_bytes(self) -> int:
        """Bytes this object holds now: the fp64 accumulator while building, the inverse once
        formed."""
        held = [self._mat] if self._inverted else (self._slabs or [])
        return sum(t.untyped_storage().nbytes() for t in held if t is not None)

    def reset(self) -> None:
        B, nb = self.block_size, self.num_blocks
        # free the old blocks before the new accumulator is allocated
        self._slabs, self._mat = None, None
        if self._packed:
            sizes = (self._split, nb - self._split) if self._split < nb else (nb,)
            self._slabs = [
                torch.zeros(n, self.packed_size, dtype=self.sum_dtype, device=self.device)
                for n in sizes
            ]
        else:
            self._slabs = [torch.zeros(nb, B, B, dtype=torch.float64, device=self.device)]
        self.num_grads = 0
        self.product_counts = {torch.float32: 0, torch.float64: 0}
        # wall time of add_grads and of forming the inverse
        self.seconds = {"accumulate": 0.0, "invert": 0.0}
        self._inverted = False
        self.block_damp = None

    def state_dict(self) -> dict:
        """``mat``: the inverse blocks (dtype, whole) once formed, else the accumulated ``sum G_b^T
        G_b`` (fp64, whole blocks)."""
        if self._inverted:
            mat = self.unpack()
        else:
            mat = torch.cat([self._full(s, e) for s, e in self._pages(self.num_blocks)])
        return {
            "mat": mat,
            "num_grads": self.num_grads,
            "inverted": self._inverted,
            "block_damp": self.block_damp,
        }

    def load_state_dict(self, state: dict) -> None:
        B, nb = self.block_size, self.num_blocks
        if tuple(state["mat"].shape) != (nb, B, B):
            raise ValueError(
                f"saved blocks have shape {tuple(state['mat'].shape)}; expected {(nb, B, B)}"
            )
        mat = state["mat"].to(device=self.device, dtype=torch.float64)
        inverted = bool(state["inverted"])
        self.reset()
        if not self._packed:
            self._slabs[0].copy_(mat)
            if inverted:
                self._mat, self._slabs = self._slabs[0], None
        elif inverted:
            out = self._slabs[0].view(-1).view(torch.float32)[: nb * self.packed_size].view(nb, -1)
            out = self._slabs[0] if self.sum_dtype == torch.float32 else out
            for s, e in self._pages(self._page(8 * B * B)):
                out[s:e].copy_(self._pack(mat[s:e]))
            self._mat, self._slabs = out, None
        else:
            for s, e in self._pages(self._page(8 * B * B)):
                self._acc(s, e).copy_(self._pack(mat[s:e]))
        self.num_grads, self._inverted = int(state["num_grads"]), inverted
        bd = state.get("block_damp")
        self.block_damp = (
            None if bd is None else bd.to(device=self.device, dtype=torch.float64).clone()
        )
