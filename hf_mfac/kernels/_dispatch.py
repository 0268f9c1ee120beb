"""One dispatch point for every kernel op.

Each op has, side by side: ``_why_not_<op>`` (the CUDA kernel's limits: device, dtypes, shapes,
contiguity, sizes; returns the reason it does not apply, or None), ``_cuda_<op>`` (calls the
compiled module) and the reference in :mod:`.reference`. :func:`_run` picks one:

- ``impl="torch"``: the reference.
- ``impl="cuda"``: the kernel, or :class:`KernelUnavailableError` naming why not (no GPU, no nvcc or
  ninja, a failed build, or inputs outside the kernel's limits).
- ``impl="auto"``: the kernel when the inputs are within its limits, it builds and it passed its
  self-check; inputs outside the limits (e.g. CPU tensors) silently take the reference; a kernel
  that cannot be built takes the reference with one :class:`KernelFallbackWarning` per process, one
  that fails its self-check with one :class:`KernelSelfCheckWarning` (per kernel, dtype and device).

Before a kernel's first use in a process (per build, device and storage dtype) :mod:`._selfcheck`
runs it against the reference on small problems that reach its edge paths (a few milliseconds,
once); ``impl="cuda"`` raises :class:`KernelSelfCheckError` on a mismatch.

Limits in one place: every ``TORCH_CHECK`` in ``cuda/*.cpp`` is listed in
:data:`TORCH_CHECK_MIRRORS` with the ``_why_not_<op>`` message that rejects such inputs here (so
``auto`` never calls a kernel that would raise where the reference returns a value), or the
conversion in ``_cuda_<op>`` that makes the condition hold.

``HF_MFAC_KERNELS=auto|cuda|torch`` replaces ``impl="auto"``; an explicit ``"cuda"``/``"torch"``
wins.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

import torch

from . import _loader, _selfcheck, reference
from ._glue import (  # noqa: F401 - the calls into the compiled module, shared with the self-check
    launch_mfac_apply_coefficients,
    launch_mfac_b,
    launch_mfac_coefficients,
    launch_window_matvec,
    launch_window_rmatvec,
)
from ._loader import KernelFallbackWarning, KernelUnavailableError
from ._selfcheck import KernelSelfCheckError, KernelSelfCheckWarning  # noqa: F401 - re-exported

IMPLS = ("auto", "cuda", "torch")
ENV_VAR = "HF_MFAC_KERNELS"


_warned = [False]


def resolve_impl(impl: str = "auto") -> str:
    """``impl`` after the ``HF_MFAC_KERNELS`` override of ``"auto"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}; expected one of {IMPLS}")
        impl = env
    return impl


def _is_cuda(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda


def _why_not_autograd(*tensors) -> str | None:
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    ):
        return "the CUDA kernels do not support autograd (call under torch.no_grad())"
    return None


def _why_not_vector(v, G: torch.Tensor, n: int, name: str) -> str | None:
    if not isinstance(v, torch.Tensor) or v.device != G.device:
        return f"{name} must be a tensor on {G.device}"
    if not v.is_floating_point() or v.dtype == torch.float64:
        return f"{name} must be float32/bfloat16/float16 (it is used in float32); got {v.dtype}"
    if v.shape != (n,):
        return f"{name} must have shape ({n},); got {tuple(v.shape)}"
    return None


# --- window products: cuda/window_gemv.cu
# -----------------------------------------------------------

_WINDOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _why_not_window(G, acc_dtype) -> str | None:
    if not _is_cuda(G):
        return f"G must be a CUDA tensor; got {getattr(G, 'device', type(G).__name__)}"
    if G.dim() != 2 or G.numel() == 0:
        return f"G must be a non-empty 2-D (m, d) tensor; got shape {tuple(G.shape)}"
    if G.dtype not in _WINDOW_DTYPES:
        return f"G must be float32, bfloat16 or float16 (fp32 accumulation); got {G.dtype}"
    if not G.is_contiguous():
        return "G must be contiguous (row-major (m, d))"
    if acc_dtype not in (None, torch.float32):
        return f"the kernel accumulates in float32; acc_dtype={acc_dtype} requested"
    return None


def _why_not_window_matvec(G, x, acc_dtype=None) -> str | None:
    return (
        _why_not_window(G, acc_dtype)
        or _why_not_vector(x, G, G.shape[1], "x")
        or _why_not_autograd(G, x)
    )


def _why_not_window_rmatvec(G, c, acc_dtype=None) -> str | None:
    return (
        _why_not_window(G, acc_dtype)
        or _why_not_vector(c, G, G.shape[0], "c")
        or _why_not_autograd(G, c)
    )


# --- M-FAC coefficients: D by torch's Cholesky, B by cuda/mfac_b.cu
# ---------------------------------

_MAX_M = 65535 * 32  # grid limit of the B kernel (nb = ceil(m / 32) <= 65535)


def _why_not_square(A, name: str) -> str | None:
    if not _is_cuda(A):
        return f"{name} must be a CUDA tensor; got {getattr(A, 'device', type(A).__name__)}"
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        return f"{name} must be a non-empty square (m, m) matrix; got shape {tuple(A.shape)}"
    if A.dtype not in (torch.float32, torch.float64):
        return f"{name} must be float32 or float64; got {A.dtype}"
    if A.shape[0] > _MAX_M:
        return f"m={A.shape[0]} exceeds the B kernel's limit of {_MAX_M}"
    return None


def _why_not_damp_scale(damp, scale) -> str | None:
    try:
        damp, scale = float(damp), float(scale)
    except (TypeError, ValueError):
        return f"damp and scale must be numbers; got {type(damp).__name__}, {type(scale).__name__}"
    if not (damp > 0 and scale >= 0):  # also rejects NaN, as the kernel's check does
        return f"the B kernel needs damp > 0 and scale >= 0; got damp={damp}, scale={scale}"
    return None


def _why_not_mfac_b(D, damp, scale) -> str | None:
    return _why_not_square(D, "D") or _why_not_damp_scale(damp, scale) or _why_not_autograd(D)


def _why_not_mfac_coefficients(GGt, damp, scale) -> str | None:
    return _why_not_square(GGt, "GGt") or _why_not_damp_scale(damp, scale) or _why_not_autograd(GGt)


# --- Algorithm 2: two window kernels around the O(m^2) torch middle
# --------------------------------


def _why_not_mfac_apply_coefficients(G, D, B, x, damp, scale) -> str | None:
    why = _why_not_window(G, None) or _why_not_vector(x, G, G.shape[1], "x")
    if why:
        return why
    m = G.shape[0]
    for name, A in (("D", D), ("B", B)):
        if not isinstance(A, torch.Tensor) or A.device != G.device or A.shape != (m, m):
            return f"{name} must be an ({m}, {m}) tensor on {G.device}"
        if A.dtype != torch.float32:
            return f"{name} must be float32 (the kernels accumulate in float32); got {A.dtype}"
    return _why_not_autograd(G, D, B, x)


# --- limits in one place: every TORCH_CHECK of cuda/*.cpp and its mirror here
# ----------------------

# Condition of each TORCH_CHECK in cuda/*.cpp (whitespace collapsed) -> how the Python side keeps
# it: ("why_not", fragment of the _why_not_<op> message that rejects inputs violating it),
# ("converted", the _cuda_<op> conversion that makes it hold) or ("runtime", not an input limit).
# tests/test_kernels.py parses the C++ sources, checks that this table lists exactly their
# conditions, and builds a violating input for every "why_not" entry of every op that reaches the
# check.
TORCH_CHECK_MIRRORS: dict[str, tuple[str, str]] = {
    # check_cuda: a failed CUDA runtime call or launch
    "err == cudaSuccess": ("runtime", "a CUDA error raises RuntimeError; it is no input limit"),
    # check_window (window_matvec, window_rmatvec; the window products of mfac_apply_coefficients)
    "G.is_cuda()": ("why_not", "G must be a CUDA tensor"),
    "G.dim() == 2": ("why_not", "G must be a non-empty 2-D (m, d) tensor"),
    "G.size(0) > 0 && G.size(1) > 0": ("why_not", "G must be a non-empty 2-D (m, d) tensor"),
    "G.is_contiguous()": ("why_not", "G must be contiguous"),
    "st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16": (
        "why_not",
        "G must be float32, bfloat16 or float16",
    ),
    # check_vector (x of G x, c of G^T c)
    "v.device() == G.device()": ("why_not", "must be a tensor on"),
    "v.scalar_type() == torch::kFloat32": (
        "converted",
        "_cuda_<op> passes x.to(torch.float32) / c.to(torch.float32)",
    ),
    "v.dim() == 1 && v.size(0) == n": ("why_not", "must have shape"),
    "v.is_contiguous()": ("converted", "_cuda_<op> passes .contiguous() vectors"),
    # mfac_b (mfac_b; mfac_coefficients on D = mfac_d(GGt), same device, dtype and shape as GGt)
    "D.is_cuda()": ("why_not", "must be a CUDA tensor"),
    "D.dim() == 2 && D.size(0) == D.size(1) && D.size(0) > 0": (
        "why_not",
        "must be a non-empty square (m, m) matrix",
    ),
    "D.is_contiguous()": ("converted", "launch_mfac_b passes D.contiguous()"),
    "D.scalar_type() == torch::kFloat32 || D.scalar_type() == torch::kFloat64": (
        "why_not",
        "must be float32 or float64",
    ),
    "damp > 0 && scale >= 0": ("why_not", "needs damp > 0 and scale >= 0"),
    "hf_mfac::ceil_div(m, hf_mfac::kBTile) <= 65535": ("why_not", "exceeds the B kernel's limit"),
}


# --- dispatch
# ---------------------------------------------------------------------------------------


class _Op(NamedTuple):
    why_not: Callable[..., str | None]
    cuda: Callable[..., object]
    torch: Callable[..., object]
    checks: Callable[..., list]  # the (kernel, storage dtype) self-checks the CUDA path relies on


def _window_checks(G, *_):
    return [("window_matvec", G.dtype), ("window_rmatvec", G.dtype)]


_OPS = {
    "window_matvec": _Op(
        _why_not_window_matvec,
        launch_window_matvec,
        reference.window_matvec,
        lambda G, *_: [("window_matvec", G.dtype)],
    ),
    "window_rmatvec": _Op(
        _why_not_window_rmatvec,
        launch_window_rmatvec,
        reference.window_rmatvec,
        lambda G, *_: [("window_rmatvec", G.dtype)],
    ),
    "mfac_b": _Op(
        _why_not_mfac_b, launch_mfac_b, reference.mfac_b, lambda D, *_: [("mfac_b", D.dtype)]
    ),
    "mfac_coefficients": _Op(
        _why_not_mfac_coefficients,
        launch_mfac_coefficients,
        reference.mfac_coefficients,
        lambda GGt, *_: [("mfac_b", GGt.dtype)],
    ),
    "mfac_apply_coefficients": _Op(
        _why_not_mfac_apply_coefficients,
        launch_mfac_apply_coefficients,
        reference.mfac_apply_coefficients,
        _window_checks,
    ),
}


def supports(op: str, *args, **kwargs) -> bool:
    """Whether the CUDA kernel of ``op`` accepts these arguments (same signature as the op, without
    ``impl``). Says nothing about whether the kernels can be built here: see :func:`status`."""
    return why_not(op, *args, **kwargs) is None


def why_not(op: str, *args, **kwargs) -> str | None:
    """The reason the CUDA kernel of ``op`` rejects these arguments, or None when it accepts
    them."""
    if op not in _OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {sorted(_OPS)}")
    return _OPS[op].why_not(*args, **kwargs)


def _run(op: str, impl: str, *args):
    impl = resolve_impl(impl)
    spec = _OPS[op]
    if impl == "torch":
        return spec.torch(*args)
    why = spec.why_not(*args)
    strict = impl == "cuda"
    if strict:
        env = _loader.environment_reason()
        if env is not None:
            raise KernelUnavailableError(
                f"hf_mfac.kernels.{op}(impl='cuda'): CUDA kernels unavailable: {env}"
            )
        if why is not None:
            raise KernelUnavailableError(
                f"hf_mfac.kernels.{op}(impl='cuda'): inputs outside the kernel's limits: {why}"
            )
    elif why is not None:
        return spec.torch(*args)
    device = args[0].device
    try:
        ext = _loader.load(device)
    except KernelUnavailableError as exc:
        if strict:
            raise KernelUnavailableError(f"hf_mfac.kernels.{op}(impl='cuda'): {exc}") from exc
        if not _warned[0]:
            _warned[0] = True
            warnings.warn(
                f"hf_mfac: CUDA kernels unavailable ({exc}); using the PyTorch reference "
                "ops. "
                f"Set {ENV_VAR}=torch to choose them explicitly.",
                KernelFallbackWarning,
                stacklevel=3,
            )
        return spec.torch(*args)
    try:
        verified = _selfcheck.ensure(ext, device, spec.checks(*args), strict=strict)
    except KernelUnavailableError as exc:
        raise type(exc)(f"hf_mfac.kernels.{op}(impl='cuda'): {exc}") from exc
    if not verified:
        return spec.torch(*args)
    return spec.cuda(ext, *args)


def window_matvec(
    G: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``p = G @ x`` (m,), accumulated in fp32 (or ``acc_dtype``); G (m, d), x (d,). One pass over
    G. See :func:`hf_mfac.kernels.reference.window_matvec`."""
    return _run("window_matvec", impl, G, x, acc_dtype)


def window_rmatvec(
    G: torch.Tensor, c: torch.Tensor, acc_dtype: torch.dtype | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """``y = G^T @ c`` (d,), accumulated in fp32 (or ``acc_dtype``); G (m, d), c (m,). One pass over
    G. See :func:`hf_mfac.kernels.reference.window_rmatvec`."""
    return _run("window_rmatvec", impl, G, c, acc_dtype)


def mfac_b(D: torch.Tensor, damp: float, scale: float, *, impl: str = "auto") -> torch.Tensor:
    """The B of [M-FAC, App. B, Alg. 1] (m, m) from D; see
    :func:`hf_mfac.kernels.reference.mfac_b`."""
    return _run("mfac_b", impl, D, damp, scale)


def mfac_coefficients(
    GGt: torch.Tensor, damp: float, scale: float, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M-FAC, App. B, Alg. 1]: ``(D, B)`` from ``G G^T`` (m, m); see
    :func:`hf_mfac.kernels.reference.mfac_coefficients`."""
    return _run("mfac_coefficients", impl, GGt, damp, scale)


def mfac_apply_coefficients(
    G: torch.Tensor,
    D: torch.Tensor,
    B: torch.Tensor,
    x: torch.Tensor,
    damp: float,
    scale: float,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """[M-FAC, App. B, Alg. 2]: ``F^{-1} x`` (d,); see
    :func:`hf_mfac.kernels.reference.mfac_apply_coefficients`."""
    return _run("mfac_apply_coefficients", impl, G, D, B, x, damp, scale)
