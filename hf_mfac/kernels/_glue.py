"""The calls into the compiled module, one per op: arguments made contiguous and fp32 where the
kernel wants it, launched on the current stream. Shared by the dispatch (:mod:`._dispatch`) and the
self-check (:mod:`._selfcheck`), so that a kernel is checked through the same glue as real calls."""
from __future__ import annotations

import torch

from . import reference


def current_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer (0 elsewhere: the self-check's fake
    kernels)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def launch_window_matvec(ext, G, x, acc_dtype=None) -> torch.Tensor:
    return ext.window_matvec(G, x.to(torch.float32).contiguous(), current_stream(G.device))


def launch_window_rmatvec(ext, G, c, acc_dtype=None) -> torch.Tensor:
    return ext.window_rmatvec(G, c.to(torch.float32).contiguous(), current_stream(G.device))


def launch_mfac_b(ext, D, damp, scale) -> torch.Tensor:
    return ext.mfac_b(D.contiguous(), float(damp), float(scale), current_stream(D.device))


def launch_mfac_coefficients(ext, GGt, damp, scale) -> tuple[torch.Tensor, torch.Tensor]:
    D = reference.mfac_d(GGt, damp, scale)  # cuSOLVER Cholesky: O(m^3) in one call
    return D, launch_mfac_b(ext, D, damp, scale)


def launch_mfac_apply_coefficients(ext, G, D, B, x, damp, scale) -> torch.Tensor:
    s = current_stream(G.device)
    x32 = x.to(torch.float32).contiguous()
    c = reference.mfac_coefficient_vector(D, B, ext.window_matvec(G, x32, s), damp, scale)  # (m,)
    return x32 / damp - ext.window_rmatvec(G, c.contiguous(), s)
