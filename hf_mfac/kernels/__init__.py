"""Kernel ops: one dispatch point per op, a pure-torch reference beside each.

Every public op takes ``impl="auto" | "cuda" | "torch"``. ``torch`` runs the reference in
:mod:`hf_mfac.kernels.reference`; ``cuda`` runs the JIT-compiled kernel (and raises with the reason when it
cannot); ``auto`` uses the kernel when :func:`supports` holds and it builds, else the reference.
The environment variable ``HF_MFAC_KERNELS`` (``auto``/``cuda``/``torch``) overrides ``auto``.
Nothing is compiled at import.
"""
from __future__ import annotations

from . import reference
from ._dispatch import mfac_apply_coefficients, mfac_coefficients, window_matvec, window_rmatvec

__all__ = [
    "reference",
    "window_matvec",
    "window_rmatvec",
    "mfac_coefficients",
    "mfac_apply_coefficients",
]
