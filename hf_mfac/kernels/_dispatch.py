"""Dispatch: for now every op runs its torch reference (the CUDA module plugs in here)."""
from __future__ import annotations

import torch

from . import reference


def window_matvec(G: torch.Tensor, x: torch.Tensor, acc_dtype=None, *, impl: str = "auto") -> torch.Tensor:
    return reference.window_matvec(G, x, acc_dtype)


def window_rmatvec(G: torch.Tensor, c: torch.Tensor, acc_dtype=None, *, impl: str = "auto") -> torch.Tensor:
    return reference.window_rmatvec(G, c, acc_dtype)


def mfac_coefficients(GGt: torch.Tensor, damp: float, scale: float, *, impl: str = "auto"):
    return reference.mfac_coefficients(GGt, damp, scale)


def mfac_apply_coefficients(G, D, B, x, damp: float, scale: float, *, impl: str = "auto"):
    return reference.mfac_apply_coefficients(G, D, B, x, damp, scale)
