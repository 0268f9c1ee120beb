"""Kernel ops: one dispatch point per op, a pure-torch reference beside each.

Every public op takes ``impl="auto" | "cuda" | "torch"``. ``torch`` runs the reference in
:mod:`hf_mfac.kernels.reference` (the specification, any device); ``cuda`` runs the JIT-compiled
kernel from ``cuda/`` and raises :class:`KernelUnavailableError` with the reason when it cannot;
``auto`` uses the kernel when :func:`supports` holds for the inputs, the module builds and the
kernel passed its self-check, else the reference (with one :class:`KernelFallbackWarning` per
process when the build is refused or fails). The environment variable ``HF_MFAC_KERNELS``
(``auto``/``cuda``/``torch``) replaces ``impl="auto"``. :func:`status` says whether the kernels can
be built here and why not. Importing this package compiles nothing and does not initialise CUDA.

Self-check: before a kernel's first use in a process (per build, GPU and storage dtype) it runs
against its reference on small problems that reach its tails, split reductions and misaligned paths
(a few milliseconds, once; the verdict is also kept next to the build, so later processes skip it).
A mismatch under ``auto`` warns once (:class:`KernelSelfCheckWarning`, with the numbers) and the
reference runs from then on; under ``impl="cuda"`` it raises :class:`KernelSelfCheckError`.
``HF_MFAC_KERNELS=torch`` skips kernels and checks. The first build compiles for about a minute and
logs so (logger ``"hf_mfac"``); :func:`build_kernels` (``hf-mfac build-kernels``) builds and checks
ahead of training, safely from several processes at once.

Ops (shapes: G (m, d) gradient window, m = num_grads):

- ``window_matvec(G, x)`` -> ``G @ x`` (m,), fp32 accumulation; ``window_rmatvec(G, c)`` -> ``G^T @
  c`` (d,).
- ``mfac_coefficients(GGt, damp, scale)`` -> ``(D, B)``, [M-FAC, App. B, Alg. 1]; ``mfac_b(D, damp,
  scale)``.
- ``mfac_apply_coefficients(G, D, B, x, damp, scale)`` -> ``F^{-1} x``, [M-FAC, App. B, Alg. 2].
"""
from __future__ import annotations

from . import reference
from ._build import build_kernels
from ._dispatch import (
    ENV_VAR,
    IMPLS,
    TORCH_CHECK_MIRRORS,
    KernelFallbackWarning,
    KernelSelfCheckError,
    KernelSelfCheckWarning,
    mfac_apply_coefficients,
    mfac_b,
    mfac_coefficients,
    resolve_impl,
    supports,
    why_not,
    window_matvec,
    window_rmatvec,
)
from ._loader import KernelUnavailableError

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
    "build_kernels",
    "TORCH_CHECK_MIRRORS",
    "resolve_impl",
    "IMPLS",
    "ENV_VAR",
    "KernelUnavailableError",
    "KernelFallbackWarning",
    "KernelSelfCheckError",
    "KernelSelfCheckWarning",
]


def status() -> dict:
    """Where the CUDA kernels stand, without building anything:
    :func:`hf_mfac.kernels._loader.status` plus ``selfcheck``, the self-check verdicts of this
    process (:mod:`hf_mfac.kernels._selfcheck`)."""
    from . import _loader, _selfcheck

    return {**_loader.status(), "selfcheck": _selfcheck.verdicts()}
