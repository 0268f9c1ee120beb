"""Block-diagonal empirical-Fisher inverse ([WoodFisher, §4], [oBERT, §3]).

Coordinates are cut into blocks of B consecutive weights (the last block is padded with coordinates
that carry no gradient, so d need not divide by B). Per block ``F_b = λ_b * I + (1/m) G_b^T G_b``, with
either one absolute ``λ_b = damp`` (the papers' setting) or a damping relative to the block's own scale,
``λ_b = rel_damp * mean(diag((1/m) G_b^T G_b))`` (see :func:`relative_damp`), which does not change when the
loss, hence every gradient, is multiplied by a constant.
Instead of oBERT's one Woodbury rank-1 update per gradient (memory-bound: d*B reads and writes per
gradient), gradients arrive in chunks (k, d) and ``G_b^T G_b`` is accumulated with one batched GEMM per
chunk; the inverse is then formed once with batched fp64 Cholesky. Memory: d*B values (the
accumulator is turned into the inverse in place); the m gradients are never all held.
"""
from __future__ import annotations

import torch

from ._checks import check_damp, check_finite, check_float_tensor, check_positive_int, damped_cholesky

__all__ = ["BlockFisherInverse", "relative_damp", "check_damping"]

# fp64 bytes of blocks factorised per batch (the temporaries are a few times this).
_BATCH_BYTES = 32 << 20


def check_damping(damp, rel_damp) -> tuple[float | None, float | None]:
    """Validate a damping given as an absolute ``damp`` or a relative ``rel_damp`` (exactly one of them)."""
    if (damp is None) == (rel_damp is None):
        raise ValueError("give exactly one of damp (absolute: F = damp*I + ...) and rel_damp (relative: a fraction "
                         f"of the mean diagonal of each Fisher block); got damp={damp!r}, rel_damp={rel_damp!r}")
    if damp is not None:
        return check_damp(damp), None
    return None, check_damp(rel_damp, "rel_damp")


def relative_damp(diag_sums: torch.Tensor, counts: torch.Tensor, rel_damp: float, groups: torch.Tensor | None = None,
                  reduce=None) -> torch.Tensor:
    """Per-block damping ``rel_damp * mean Fisher diagonal`` (n_blocks,) fp64.

    ``diag_sums`` (n_blocks,) are the sums of each block's Fisher diagonal over its live coordinates and
    ``counts`` (n_blocks,) their number (coordinates with a non-zero diagonal: padding and pruned weights carry no
    gradient). The mean is taken over each group of blocks (``groups`` (n_blocks,) int: the target tensor each
    block belongs to; None: each block its own group), as SparseGPT and OBC damp a layer Hessian by a fraction of
    its mean diagonal. With ``reduce`` given (a sharded Fisher), ``reduce(t)`` sums the per-group sums and counts
    (a (2, n_groups) fp64 tensor) over the shards in place, so that every shard damps a group alike.

    A group with no gradient at all gets the smallest damping of the others (scale-aware, so that its weights,
    which the Fisher says cost nothing, stay cheap to prune), or ``rel_damp`` when every group is empty.
    Multiplying every gradient by c multiplies the result by c^2, as it does the Fisher: OBS scores scale
    uniformly and neither the selection nor the updates change.
    """
    sums, cnt = diag_sums.to(torch.float64), counts.to(torch.float64)
    if groups is not None:
        n = int(groups.max()) + 1 if groups.numel() else 0
        acc = torch.zeros(2, n, dtype=torch.float64, device=sums.device)
        acc[0].index_add_(0, groups, sums)
        acc[1].index_add_(0, groups, cnt)
    else:
        acc = torch.stack([sums, cnt])
    if reduce is not None:
        reduce(acc)
    lam = torch.where(acc[1] > 0, acc[0] / acc[1].clamp_min(1), torch.zeros_like(acc[0])) * rel_damp
    pos = lam > 0
    floor = lam[pos].min() if bool(pos.any()) else torch.tensor(rel_damp, dtype=torch.float64, device=lam.device)
    lam = torch.where(pos, lam, floor)
    return lam if groups is None else lam[groups]


class BlockFisherInverse:
    """Block-diagonal ``F^{-1}`` built from streamed gradients.

    ``add_grads(G)`` takes a chunk (k, d) or a single gradient (d,); ``diag()`` (d,), ``mul(x)`` (d,) and
    ``blocks()`` (n_blocks, B, B) give the inverse (formed on first use, O(d B^2)). Cost of
    ``add_grads``: O(k d B) as one batched GEMM. ``m`` in the formula is the number of gradients added.
    Damping: give ``damp`` (absolute λ) or ``rel_damp`` (a fraction of the mean Fisher diagonal of each group of
    blocks, ``damp_groups`` (n_blocks,) int, e.g. the target tensor of each block; default: each block alone;
    :func:`relative_damp`); ``block_damp`` (n_blocks,) holds the λ_b used once the inverse is formed.
    """

    def __init__(self, dim: int, block_size: int, damp: float | None = None, *, rel_damp: float | None = None,
                 damp_groups: torch.Tensor | None = None, damp_reduce=None, device=None,
                 dtype: torch.dtype = torch.float32):
        self.dim = check_positive_int("dim", dim)
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
        self._mat = torch.zeros(self.num_blocks, B, B, dtype=dtype, device=self.device)  # sum G_b^T G_b, then F_b^{-1}
        self.num_grads = 0
        self._inverted = False

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_dim == self.dim:
            return x
        return torch.nn.functional.pad(x, (0, self.padded_dim - self.dim))

    def add_grads(self, G: torch.Tensor) -> None:
        """Accumulate gradients G (k, d) (or (d,)); raises on NaN/inf without changing the accumulator."""
        if self._inverted:
            raise RuntimeError("the inverse was already formed; call reset() before adding new gradients")
        check_float_tensor("G", G)
        G = G.reshape(1, -1) if G.dim() == 1 else G
        if G.dim() != 2 or G.shape[1] != self.dim:
            raise ValueError(f"G must have shape (k, {self.dim}); got {tuple(G.shape)}")
        G = G.to(device=self.device, dtype=self.dtype)
        check_finite("G", G)
        # (nb, k, B), made contiguous: one O(kd) copy lets the batched GEMM run on dense operands
        Gb = self._padded(G).view(G.shape[0], self.num_blocks, self.block_size).transpose(0, 1).contiguous()
        self._mat.baddbmm_(Gb.mT, Gb)  # (nb, B, B) += G_b^T G_b
        self.num_grads += G.shape[0]

    def _invert(self) -> None:
        if self._inverted:
            return
        if self.num_grads == 0:
            raise RuntimeError("no gradients were added; call add_grads() first")
        B = self.block_size
        eye = torch.eye(B, dtype=torch.float64, device=self.device)
        lam = self._block_damp()  # (nb,)
        batch = max(1, _BATCH_BYTES // (8 * B * B))
        for s in range(0, self.num_blocks, batch):
            shift = lam[s : s + batch]
            F = self._mat[s : s + batch].to(torch.float64) / self.num_grads + shift[:, None, None] * eye  # (nb, B, B)
            L, _ = damped_cholesky(F, shift, "BlockFisherInverse")
            self._mat[s : s + batch] = torch.cholesky_inverse(L).to(self.dtype)
        self.block_damp = lam
        self._inverted = True

    def _block_damp(self) -> torch.Tensor:
        """λ_b (n_blocks,) fp64 for the accumulated (not yet inverted) blocks."""
        if self.rel_damp is None:
            return torch.full((self.num_blocks,), self.damp, dtype=torch.float64, device=self.device)
        diag = self._mat.diagonal(dim1=-2, dim2=-1).to(torch.float64) / self.num_grads  # (nb, B)
        groups = None if self.damp_groups is None else self.damp_groups.to(self.device)
        return relative_damp(diag.sum(1), (diag > 0).sum(1), self.rel_damp, groups, self.damp_reduce)

    def blocks(self) -> torch.Tensor:
        """The inverse blocks (n_blocks, B, B); rows/columns past ``dim`` in the last block are padding."""
        self._invert()
        return self._mat

    def diag(self) -> torch.Tensor:
        """``diag(F^{-1})`` (d,)."""
        return self.blocks().diagonal(dim1=-2, dim2=-1).reshape(-1)[: self.dim]

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^{-1} x`` for x (d,): one batched matrix-vector product, O(d B)."""
        check_float_tensor("x", x)
        if x.numel() != self.dim:
            raise ValueError(f"x has {x.numel()} elements; expected dim={self.dim}")
        xb = self._padded(x.reshape(-1).to(device=self.device, dtype=self.dtype)).view(self.num_blocks, self.block_size, 1)
        return (self.blocks() @ xb).reshape(-1)[: self.dim]

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``[F^{-1}]_QQ`` for index sets ``idx`` (n, g) -> (n, g, g); zero between different blocks."""
        idx = torch.as_tensor(idx, device=self.device)
        blk, loc = torch.div(idx, self.block_size, rounding_mode="floor"), idx % self.block_size
        vals = self.blocks()[blk[:, :, None], loc[:, :, None], loc[:, None, :]]  # (n, g, g), row's block
        return torch.where(blk[:, :, None] == blk[:, None, :], vals, torch.zeros_like(vals))

    def reset(self) -> None:
        self._mat.zero_()
        self.num_grads = 0
        self._inverted = False
        self.block_damp = None

    def state_dict(self) -> dict:
        return {"mat": self._mat, "num_grads": self.num_grads, "inverted": self._inverted,
                "block_damp": self.block_damp}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["mat"].shape) != tuple(self._mat.shape):
            raise ValueError(f"saved blocks have shape {tuple(state['mat'].shape)}; expected {tuple(self._mat.shape)}")
        self._mat = state["mat"].to(device=self.device, dtype=self.dtype).clone()
        self.num_grads, self._inverted = int(state["num_grads"]), bool(state["inverted"])
        bd = state.get("block_damp")
        self.block_damp = None if bd is None else bd.to(device=self.device, dtype=torch.float64).clone()
