"""Kernel ops: one dispatch point per op, a pure-torch reference beside each.

Every public op takes ``impl="auto" | "cuda" | "torch"``. ``torch`` runs the reference in
:mod:`hf_mfac.kernels.reference` (the specification, any device); ``cuda`` runs the JIT-compiled kernel
from ``cuda/`` and raises :class:`KernelUnavailableError` with the reason when it cannot; ``auto`` uses the
kernel when :func:`supports` holds for the inputs and the module builds, else the reference (with one
:class:`KernelFallbackWarning` per process when the build is refused or fails). The environment variable
``HF_MFAC_KERNELS`` (``auto``/``cuda``/``torch``) replaces ``impl="auto"``. :func:`status` says whether the
kernels can be built here and why not. Importing this package compiles nothing and does not initialise CUDA.

Ops (shapes: G (m, d) gradient window, m = num_grads):

- ``window_matvec(G, x)`` -> ``G @ x`` (m,), fp32 accumulation; ``window_rmatvec(G, c)`` -> ``G^T @ c`` (d,).
- ``mfac_coefficients(GGt, damp, scale)`` -> ``(D, B)``, [M-FAC, App. B, Alg. 1]; ``mfac_b(D, damp, scale)``.
- ``mfac_apply_coefficients(G, D, B, x, damp, scale)`` -> ``F^{-1} x``, [M-FAC, App. B, Alg. 2].
"""
from __future__ import annotations

from . import reference
from ._dispatch import (
    ENV_VAR,
    IMPLS,
    KernelFallbackWarning,
    mfac_apply_coefficients,
    mfac_b,
    mfac_coefficients,
    resolve_impl,
    supports,
    why_not,
    window_matvec,
    window_rmatvec,
)
from ._loader import KernelUnavailableError, status

__all__ = [
    "reference",
    "window_matvec",
    "window_rmatvec",
    "mfac_b",
    "mfac_coefficients",
    "mfac_apply_coefficients",
    "supports",
    "why_not",
    "status",
    "resolve_impl",
    "IMPLS",
    "ENV_VAR",
    "KernelUnavailableError",
    "KernelFallbackWarning",
]
