"""Pure-PyTorch references for every kernel op.

These are the specification: the CUDA kernels in ``cuda/`` must agree with them (tests compare the
two with tolerances derived from the reference's own error). Every function here runs on any device.
"""
from __future__ import annotations

import torch

# Columns of G processed per chunk when G is stored in a low-precision dtype: bounds the fp32
# temporary to m * _CHUNK values while keeping each gemv large enough to be bandwidth-bound.
_CHUNK = 1 << 16


def _acc_dtype(G: torch.Tensor, acc: torch.dtype | None) -> torch.dtype:
    if acc is not None:
        return acc
    return torch.float64 if G.dtype == torch.float64 else torch.float32


def window_matvec(G: torch.Tensor, x: torch.Tensor,
                  acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``p = G @ x`` with accumulation in ``acc_dtype`` (fp32 unless G is fp64).

    G: (m, d) in fp32/fp64/bf16/fp16, x: (d,). Returns (m,) in ``acc_dtype``. Cost: one pass over G.
    Low-precision G is upcast chunk by chunk, so the result is accumulated in fp32 whatever the
    storage.
    """
    acc = _acc_dtype(G, acc_dtype)
    if G.dtype == acc:
        return G @ x.to(acc)
    out = torch.zeros(G.shape[0], dtype=acc, device=G.device)
    xa = x.to(acc)
    for s in range(0, G.shape[1], _CHUNK):
        out += G[:, s : s + _CHUNK].to(acc) @ xa[s : s + _CHUNK]
    return out


def window_rmatvec(G: torch.Tensor, c: torch.Tensor,
                   acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = G^T @ c``: G (m, d), c (m,) -> (d,) in ``acc_dtype``. Cost: one pass over G."""
    acc = _acc_dtype(G, acc_dtype)
    ca = c.to(acc)
    if G.dtype == acc:
        return ca @ G
    out = torch.empty(G.shape[1], dtype=acc, device=G.device)
    for s in range(0, G.shape[1], _CHUNK):
        out[s : s + _CHUNK] = ca @ G[:, s : s + _CHUNK].to(acc)
    return out


def mfac_d(GGt: torch.Tensor, damp: float, scale: float) -> torch.Tensor:
    """[M-FAC, App. B, Alg. 1], first loop: the upper-triangular coefficient matrix D, (m, m).

    ``D`` is the upper factor of the LU decomposition without pivoting of ``A = GG^T / damp + scale
    * I`` minus ``scale * I`` (``scale`` is m in the paper). A is symmetric positive definite, so
    this LU is the LDL^T / Cholesky factorisation: ``A = C C^T``, ``U = diag(C) C^T``. Cost O(m^3)
    in the dtype of ``GGt`` (pass fp64 for tiny damp). Raises ``torch.linalg.LinAlgError`` when A is
    not positive definite.
    """
    m = GGt.shape[-1]
    eye = torch.eye(m, dtype=GGt.dtype, device=GGt.device)
    C = torch.linalg.cholesky(GGt / damp + scale * eye)  # (m, m) lower
    return torch.diagonal(C)[:, None] * C.mT - scale * eye  # U - scale I, upper


def mfac_b(D: torch.Tensor, damp: float, scale: float) -> torch.Tensor:
    """[M-FAC, App. B, Alg. 1], second loop: the lower-triangular coefficient matrix B, (m, m).

    ``B = (I + L)^{-1} / damp`` with L strictly lower, ``L[i, j] = D[j, i] / (scale + D[j, j])``:
    row i of B is minus the combination of rows < i with coefficients ``D[:i, i] / (scale +
    diag(D)[:i])``, plus ``1/damp`` on the diagonal. One unit-lower triangular solve, O(m^3). The
    CUDA twin is the 32x32-tiled kernel of [M-FAC, App. B] (``cuda/mfac_b.cu``).
    """
    m = D.shape[-1]
    eye = torch.eye(m, dtype=D.dtype, device=D.device)
    # (m, m), unit lower (upper part unused)
    Lunit = (D + scale * eye).mT / (scale + torch.diagonal(D))[None, :]
    return torch.linalg.solve_triangular(Lunit, eye, upper=False, unitriangular=True) / damp


def mfac_coefficients(GGt: torch.Tensor, damp: float,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[M-FAC, App. B, Alg. 1]: the M-FAC coefficient matrices ``(D, B)``, both (m, m); see
    :func:`mfac_d` and :func:`mfac_b`. Cost O(m^3) in the dtype of ``GGt``."""
    D = mfac_d(GGt, damp, scale)
    return D, mfac_b(D, damp, scale)


def mfac_coefficient_vector(D: torch.Tensor, B: torch.Tensor, p: torch.Tensor, damp: float,
                            scale: float) -> torch.Tensor:
    """The O(m^2) middle of [M-FAC, App. B, Alg. 2]: ``c = B^T q`` with ``q = (D + scale I)^{-T} (p
    / damp)`` and ``p = G x`` (m,). Each q_i is divided by ``scale + D_ii`` before it is used in the
    recursion (the triangular solve; the printed algorithm divides only after the loop, which is
    wrong). Returns c (m,) in the dtype of D."""
    m = D.shape[-1]
    U = D + scale * torch.eye(m, dtype=D.dtype, device=D.device)  # (m, m) upper
    q = torch.linalg.solve_triangular(U.mT, (p.to(D.dtype) / damp)[:, None], upper=False)[:, 0]
    return B.mT @ q


def mfac_apply_coefficients(G: torch.Tensor, D: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                            damp: float, scale: float) -> torch.Tensor:
    """[M-FAC, App. B, Alg. 2]: ``F^{-1} x = x / damp - G^T c`` with c from
    :func:`mfac_coefficient_vector` applied to ``p = G x``, where ``F = damp I + G^T G / scale``. G
    (m, d), D and B (m, m), x (d,); returns (d,) in the dtype of D. Cost: two passes over G plus
    O(m^2)."""
    c = mfac_coefficient_vector(D, B, window_matvec(G, x, D.dtype), damp, scale)
    return x.to(D.dtype) / damp - window_rmatvec(G, c, D.dtype)
