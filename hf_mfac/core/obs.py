"""Optimal Brain Surgeon scores and updates with an inverse-Fisher operator.

``finv`` is any object with ``diag()`` (d,), ``mul(x)`` (d,) -> F^{-1} x and ``submatrix(idx)`` (n,
g) -> ``[F^{-1}]_QQ`` (n, g, g): :class:`~hf_mfac.core.BlockFisherInverse` and
:class:`~hf_mfac.core.StaticMFAC`.

Single weight q [WoodFisher, eqs. 10-11]: ``rho_q = w_q^2 / (2 [F^{-1}]_qq)``, ``dw = -w_q F^{-1}
e_q / [F^{-1}]_qq``. Group Q [oBERT, eq. 5]: ``rho_Q = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q``, ``dw =
-F^{-1} E_Q^T ([F^{-1}]_QQ)^{-1} w_Q``. WoodTaylor [WoodFisher, §6.2, eqs. 21-23] adds the gradient:
with ``u = F^{-1} grad`` the score is ``rho_q = (w_q - u_q)^2 / (2 [F^{-1}]_qq)`` and the update
``-(w_q - u_q) F^{-1} e_q / [F^{-1}]_qq - u``, i.e. OBS applied to ``w - u`` plus the Newton step
``-u``; pass ``u`` to get it. Pruning many units at once sums their updates (the WoodFisher/oBERT
approximation, [M-FAC, App. D.1]); pruned weights are set exactly to zero afterwards.
"""
from __future__ import annotations

import itertools

import torch

from ._checks import page_bytes
from .fisher import block_shape, read_blocks

__all__ = ["obs_scores", "group_scores", "nm_select", "obs_update", "obs_update_masked",
           "block_obs_update", "woodtaylor_shift"]

_TINY = 1e-30


def woodtaylor_shift(finv, grad: torch.Tensor) -> torch.Tensor:
    """``u = F^{-1} grad`` (d,), the first-order term of WoodTaylor."""
    return finv.mul(grad)


def _shifted(w: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    return w if u is None else w - u.to(w.dtype)


def obs_scores(w: torch.Tensor, diag: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Single-weight OBS saliency (d,): ``(w - u)^2 / (2 diag(F^{-1}))``; ``u=None`` is plain
    OBS."""
    return _shifted(w, u) ** 2 / (2 * diag.clamp_min(_TINY))


def group_scores(w: torch.Tensor, sub: torch.Tensor, idx: torch.Tensor,
                 u: torch.Tensor | None = None) -> torch.Tensor:
    """Group saliency (n,) ``1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` for groups ``idx`` (n, g), ``sub``
    (n, g, g)."""
    wq = _shifted(w, u)[idx].to(torch.float64)  # (n, g)
    z = torch.linalg.solve(sub.to(torch.float64), wq[..., None])[..., 0]
    return 0.5 * (wq * z).sum(-1)


def nm_select(w: torch.Tensor, sub: torch.Tensor, idx: torch.Tensor, n_keep: int,
              u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best set of ``M - N`` weights to prune in each N:M group, by exact joint OBS saliency.

    ``idx`` (n, M) are the groups, ``sub`` (n, M, M) their ``[F^{-1}]`` blocks. All C(M, M-N)
    subsets are scored with the group formula (for 2:4: 6 subsets of 2), which accounts for the
    correlations inside the group. Returns (pruned (n, M) bool, score (n,) of the chosen subset).
    Cost O(n C k^3), k = M - N.
    """
    M = idx.shape[1]
    k = M - n_keep
    if not 0 < k < M:
        raise ValueError(f"N:M needs 0 < N < M; got N={n_keep}, M={M}")
    combos = torch.tensor(list(itertools.combinations(range(M), k)), device=idx.device)  # (C, k)
    wq = _shifted(w, u)[idx].to(torch.float64)  # (n, M)
    S = sub.to(torch.float64)
    ws = wq[:, combos]  # (n, C, k)
    Ss = S[:, combos[:, :, None], combos[:, None, :]]  # (n, C, k, k)
    z = torch.linalg.solve(Ss, ws[..., None])[..., 0]
    scores = 0.5 * (ws * z).sum(-1)  # (n, C)
    best = scores.argmin(1)
    pruned = torch.zeros_like(wq, dtype=torch.bool)
    pruned.scatter_(1, combos[best], True)
    return pruned, scores.gather(1, best[:, None])[:, 0]


def obs_update(finv, w: torch.Tensor, idx: torch.Tensor, u: torch.Tensor | None = None,
               sub: torch.Tensor | None = None) -> torch.Tensor:
    """Weights after pruning the units ``idx`` (n, g) (g=1: single weights) with the summed OBS
    update.

    ``dw = -F^{-1} sum_Q E_Q^T ([F^{-1}]_QQ)^{-1} (w_Q - u_Q) - u``; the pruned weights are then set
    to 0. Cost: one ``finv.mul`` (O(dB) block-wise, O(dm) for M-FAC) plus O(n g^3). Returns a new
    tensor.
    """
    idx = idx.reshape(idx.shape[0], -1) if idx.dim() == 2 else idx.reshape(-1, 1)
    ws = _shifted(w, u)
    z = torch.zeros_like(w, dtype=torch.float64)
    if idx.numel():
        if idx.shape[1] == 1:
            d = finv.diag()[idx[:, 0]].to(torch.float64).clamp_min(_TINY)
            z[idx[:, 0]] = ws[idx[:, 0]].to(torch.float64) / d
        else:
            S = (finv.submatrix(idx) if sub is None else sub).to(torch.float64)
            z[idx.reshape(-1)] = torch.linalg.solve(S, ws[idx].to(torch.float64)[..., None])[
                ..., 0
            ].reshape(-1)
    delta = -finv.mul(z.to(w.dtype))
    if u is not None:
        delta = delta - u.to(delta.dtype)
    out = w + delta.to(w.dtype)
    out[idx.reshape(-1)] = 0
    return out


def obs_update_masked(finv, w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor | None = None,
                      page: int = 1 << 20) -> torch.Tensor:
    """:func:`obs_update` for single weights given as a mask ``pruned`` (d,) bool instead of
    indices: the same weights (the same arithmetic: ``z_q = (w - u)_q / [F^{-1}]_qq`` in fp64,
    rounded to w's dtype, ``dw = -F^{-1} z - u``), without the index tensor (8 bytes a pruned
    weight) and the fp64 ``z``: ``z`` is formed a page of ``page`` coordinates at a time, the
    diagonal read per page where the inverse can (``finv.diag(a, b)`` of a
    :class:`~hf_mfac.core.BlockFisherInverse` or an object that unpacks pages of blocks like
    one)."""
    from .fisher import BlockFisherInverse

    pages = isinstance(finv, BlockFisherInverse) or (
        hasattr(finv, "unpack") and hasattr(finv, "num_blocks")
    )
    d_all = None if pages else finv.diag()
    z = torch.empty_like(w)
    for a in range(0, w.numel(), page):
        b = min(w.numel(), a + page)
        d = (finv.diag(a, b) if d_all is None else d_all[a:b]).to(w.device)
        ws = _shifted(w[a:b], None if u is None else u[a:b]).to(torch.float64)
        zq = ws / d.to(torch.float64).clamp_min(_TINY)
        torch.where(pruned[a:b], zq, torch.zeros_like(zq), out=zq)
        z[a:b] = zq
    del d_all
    delta = finv.mul(z).neg_()
    del z
    if u is not None:
        delta = delta - u.to(delta.dtype)
    out = w + delta.to(w.dtype)
    return out.masked_fill_(pruned, 0)


# fp64 bytes of one page of blocks in block_obs_update (three such buffers are kept), per device
# type; other devices (accelerators, where each page costs kernel launches) use _ACCEL_PAGE_BYTES
_PAGE_BYTES = {"cpu": 1 << 20}
_ACCEL_PAGE_BYTES = 64 << 20


def block_obs_update(
    w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """Exact joint OBS update of each block for the set P of its weights to remove (any number per
    block).

    ``w`` (nb, B), ``hinv`` (nb, B, B) the block inverses ``F_b^{-1}`` (a tensor, or a
    :class:`~hf_mfac.core.BlockFisherInverse`, unpacked a page at a time), ``pruned`` (nb, B) bool.
    Per block, ``dw = -F^{-1}_{:,P} ([F^{-1}]_PP)^{-1} (w - u)_P - u`` and ``w_P`` is set exactly to
    0: the minimiser of the quadratic model under the constraint ``w_P = 0`` ([WoodFisher, eq. 10]
    for a set, [oBERT, eq. 5]), where summing the single-weight updates (:func:`obs_update`) ignores
    the correlations between the removed weights and can overshoot when the damping is small.
    Returns (new weights (nb, B) in w's dtype, the block's saliency ``1/2 (w - u)_P^T
    ([F^{-1}]_PP)^{-1} (w - u)_P`` (nb,) fp64, the quadratic model's loss increase). Cost O(nb B^3),
    in pages of 1 MiB of fp64 inverses on a CPU (64 MiB on an accelerator): three page buffers (the
    fp64 inverses, the masked matrices and their Cholesky factors) are allocated once and reused, so
    the working set is ~3 pages. ``out`` (nb, B): where the new weights go (may be ``w`` itself:
    each page of ``w`` is read before it is written), else a new tensor.
    """
    nb, B = w.shape
    if block_shape(hinv) != (nb, B, B):
        raise ValueError(
            f"hinv must hold one ({B}, {B}) inverse per block of w; got {block_shape(hinv)}"
        )
    dev = w.device
    if out is None:
        out = torch.empty_like(w)
    elif out.shape != w.shape or out.dtype != w.dtype:
        raise ValueError(f"out must be like w, {tuple(w.shape)} {w.dtype}; got "
                         f"{tuple(out.shape)} {out.dtype}")
    loss = torch.zeros(nb, dtype=torch.float64, device=dev)
    page = max(1, min(nb, page_bytes(dev, _PAGE_BYTES, _ACCEL_PAGE_BYTES) // (8 * B * B)))
    Hbuf = torch.empty(page, B, B, dtype=torch.float64, device=dev)
    Abuf = torch.empty_like(Hbuf)
    Lbuf = torch.empty_like(Hbuf)
    info_buf = torch.empty(page, dtype=torch.int32, device=dev)
    for s in range(0, nb, page):
        e = min(nb, s + page)
        n = e - s
        p = pruned[s:e]
        H, A, L, info = Hbuf[:n], Abuf[:n], Lbuf[:n], info_buf[:n]
        read_blocks(hinv, s, e, H)
        W = w[s:e].to(torch.float64)
        Ws = W if u is None else W - u[s:e].to(torch.float64)
        # A = H_PP on P, the identity elsewhere, built in place (the same values as P H P + (1 - P)
        # I)
        torch.mul(H, (p[:, :, None] & p[:, None, :]), out=A)
        A.diagonal(dim1=-2, dim2=-1).add_(~p)
        # A is symmetric positive definite (H is): Cholesky, not LU, which is faster and avoids an
        # MKL LU path that hangs on batched fp64 systems past B ~ 150 on some CPU builds
        torch.linalg.cholesky_ex(A, out=(L, info))
        rhs = (p * Ws)[..., None]  # (n, B, 1)
        # (n, B)
        z = (torch.cholesky_solve(rhs, L) if not bool(info.any()) else torch.linalg.solve(A, rhs))[
            ..., 0
        ]
        loss[s:e] = 0.5 * (rhs[..., 0] * z).sum(1)
        new = torch.baddbmm(Ws[..., None], H, z[..., None], alpha=-1)[..., 0]
        out[s:e] = new.masked_fill_(p, 0)
    return out, loss
