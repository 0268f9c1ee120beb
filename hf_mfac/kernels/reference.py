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


def window_matvec(G: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``p = G @ x`` with accumulation in ``acc_dtype`` (fp32 unless G is fp64).

    G: (m, d) in fp32/fp64/bf16/fp16, x: (d,). Returns (m,) in ``acc_dtype``. Cost: one pass over G.
    Low-precision G is upcast chunk by chunk, so the result is accumulated in fp32 whatever the storage.
    """
    acc = _acc_dtype(G, acc_dtype)
    if G.dtype == acc:
        return G @ x.to(acc)
    out = torch.zeros(G.shape[0], dtype=acc, device=G.device)
    xa = x.to(acc)
    for s in range(0, G.shape[1], _CHUNK):
        out += G[:, s : s + _CHUNK].to(acc) @ xa[s : s + _CHUNK]
    return out


def window_rmatvec(G: torch.Tensor, c: torch.Tensor, acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = G^T @ c``: G (m, d), c (m,) -> (d,) in ``acc_dtype``. Cost: one pass over G."""
    acc = _acc_dtype(G, acc_dtype)
    ca = c.to(acc)
    if G.dtype == acc:
        return ca @ G
    out = torch.empty(G.shape[1], dtype=acc, device=G.device)
    for s in range(0, G.shape[1], _CHUNK):
        out[s : s + _CHUNK] = ca @ G[:, s : s + _CHUNK].to(acc)
    return out


def mfac_coefficients(GGt: torch.Tensor, damp: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 000 Algorithm 1: the M-FAC coefficient matrices D (upper) and B (lower), both (m, m).

    ``D`` is the upper factor of the LU decomposition without pivoting of ``A = GG^T / damp + scale * I``
    minus ``scale * I``; ``B = (I + L)^{-1} / damp`` with ``L`` the strictly lower part of the unit-lower
    LU factor, ``L[i, j] = D[j, i] / (scale + D[j, j])``. ``scale`` is m in the paper. A is symmetric
    positive definite, so the LU without pivoting is the LDL^T / Cholesky factorisation:
    ``A = C C^T``, ``U = diag(C) C^T``, unit lower ``C diag(C)^{-1}``. Cost O(m^3), computed in the
    dtype of ``GGt`` (pass fp64 for tiny damp).
    """
    m = GGt.shape[-1]
    eye = torch.eye(m, dtype=GGt.dtype, device=GGt.device)
    A = GGt / damp + scale * eye
    C = torch.linalg.cholesky(A)  # (m, m) lower
    cdiag = torch.diagonal(C)
    D = cdiag[:, None] * C.mT - scale * eye  # U - scale I, upper
    Lunit = C / cdiag[None, :]
    B = torch.linalg.solve_triangular(Lunit, eye, upper=False, unitriangular=True) / damp
    return D, B


def mfac_apply_coefficients(G: torch.Tensor, D: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                            damp: float, scale: float) -> torch.Tensor:
    """Seed 000 Algorithm 2 (with each q_{i-1} already divided when used, see DESIGN.md §4):
    ``F^{-1} x = x / damp - G^T (B^T q)`` with ``q = (D + scale I)^{-T} (G x / damp)``. Cost O(dm + m^2)."""
    m = D.shape[-1]
    q = window_matvec(G, x, D.dtype) / damp
    U = D + scale * torch.eye(m, dtype=D.dtype, device=D.device)
    q = torch.linalg.solve_triangular(U.mT, q[:, None], upper=False)[:, 0]
    c = B.mT @ q
    return x.to(D.dtype) / damp - window_rmatvec(G, c, D.dtype)
