import os

import pytest
import torch

# Keep the suite light on the 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def dense_fisher(G: torch.Tensor, damp: float, scale: float | None = None) -> torch.Tensor:
    """F = damp*I + (1/scale) G^T G in float64 (scale defaults to the number of rows)."""
    G = G.to(torch.float64)
    scale = G.shape[0] if scale is None else scale
    return damp * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / scale


def block_fisher(G: torch.Tensor, damp: float, B: int) -> torch.Tensor:
    """Dense block-diagonal F with blocks of B consecutive coordinates (last block shorter)."""
    d = G.shape[1]
    return torch.block_diag(*[dense_fisher(G[:, s : s + B], damp) for s in range(0, d, B)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def woodbury_tol(G: torch.Tensor, damp: float, dtype: torch.dtype, scale=None) -> float:
    """Relative tolerance for a dtype-precision Woodbury solve: c * eps(dtype) * cond(K),
    K = scale*damp*I + G G^T, the system the O(m^3) part solves."""
    G = G.to(torch.float64)
    scale = G.shape[0] if scale is None else scale
    K = G @ G.T + scale * damp * torch.eye(G.shape[0], dtype=torch.float64)
    return 50 * torch.finfo(dtype).eps * float(torch.linalg.cond(K))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
