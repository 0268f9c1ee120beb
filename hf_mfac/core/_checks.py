"""Argument checks (numbers, integers, damping, sparsity, tensors, finiteness), the damped-Cholesky
fallback and the free-memory probe, shared by the core solvers, the optimizer and the
integrations."""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os

import torch

logger = logging.getLogger("hf_mfac")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_damp(damp: float, name: str = "damp") -> float:
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) and not (
            isinstance(damp, torch.Tensor) and damp.numel() == 1):
        raise TypeError(f"{name} must be a number; got {type(damp).__name__} {damp!r}")
    damp = float(damp)
    if not math.isfinite(damp) or damp <= 0:
        what = "the dampening λ of F = damp*I + G^T G / m" if name == "damp" else \
            "the dampening as a fraction of the mean Fisher diagonal"
        raise ValueError(f"{name} must be a finite number > 0 ({what}); got {damp}")
    return damp


def check_real(name: str, value, *, low: float | None = None, low_open: bool = False,
               high: float | None = None, high_open: bool = False) -> float:
    """``value`` as a finite float within the given bounds; ``TypeError``/``ValueError`` naming
    ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number; got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}; got {v:g}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}; got {v:g}")
    return v


def check_int(name: str, value, *, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (integral floats such as 1024.0 are accepted); names
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if not (
        isinstance(value, numbers.Integral)
        or (math.isfinite(float(value)) and float(value).is_integer())
    ):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    v = int(value)
    if v < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {v}")
    return v


def check_positive_int(name: str, value) -> int:
    """:func:`check_int` with ``low=1`` (a one-element tensor counts as its value), raising
    ``ValueError`` "``name`` must be a positive integer" whatever is wrong."""
    item = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    try:
        return check_int(name, item, low=1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer; got {value!r}") from None


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    sparsity = float(sparsity)
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1) (the fraction of weights set to zero); got {sparsity}"
        )
    return sparsity


def check_float_tensor(
    name: str, t, ndim: int | None = None, size: tuple | None = None
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (fp16/bf16/fp32/fp64); got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {tuple(t.shape)}")
    if size is not None:
        for i, s in enumerate(size):
            if s is not None and t.shape[i] != s:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; "
                    f"expected {tuple('*' if s is None else s for s in size)}"
                )
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` has no NaN/inf. A sum is one cheap pass (``isfinite().all()`` materialises a
    bool tensor and is ~10x slower on CPU); only a non-finite sum (NaN/inf inside, or an overflow of
    huge values) is checked element-wise."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise FloatingPointError(
            f"{name} contains NaN or inf values; nothing was changed. Check the loss scale / "
            "learning rate, "
            "or skip this batch (the optimizer's nonfinite='skip' does that)."
        )


def damped_cholesky(
    K: torch.Tensor, shift: torch.Tensor | float, what: str, max_tries: int = 8, warn: bool = True
):
    """Cholesky of ``K`` (batch allowed); where it fails, retry with ``K + 10^t * shift * I`` and
    warn.

    ``shift`` is the diagonal that the damping already contributes (scalar or per-batch), so each
    retry multiplies the effective damping by 10. The retry is logged as a warning (debug level with
    ``warn=False``, for callers that warn once themselves). Returns ``(L, extra)``, where ``extra``
    is the diagonal added to each matrix (zeros where the first try worked). Raises instead of
    returning non-finite values.
    """
    L, info = torch.linalg.cholesky_ex(K)
    extra = torch.zeros(K.shape[:-2], dtype=K.dtype, device=K.device)
    if not bool((info != 0).any()) and all_finite(L):  # the common case, two cheap reductions
        return L, extra
    bad = (info != 0) | ~torch.isfinite(L).flatten(-2).all(-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    shift_t = torch.as_tensor(shift, dtype=K.dtype, device=K.device).expand(K.shape[:-2]).clone()
    shift_t = torch.where(shift_t > 0, shift_t, torch.ones_like(shift_t))
    for t in range(1, max_tries + 1):
        add = torch.where(bad, shift_t * (10.0**t), extra)
        L2, info2 = torch.linalg.cholesky_ex(K + add[..., None, None] * eye)
        fixed = (info2 == 0) & torch.isfinite(L2).flatten(-2).all(-1)
        L = torch.where(bad[..., None, None] & fixed[..., None, None], L2, L)
        extra = torch.where(bad & fixed, add, extra)
        bad = bad & ~fixed
        if not bool(bad.any()):
            n = int((extra > 0).sum())
            (logger.warning if warn else logger.debug)(
                "%s: Cholesky failed for %d matrix(es); retried with up to %.1e more damping.",
                what,
                n,
                float(extra.max()),
            )
            return L, extra
    raise FloatingPointError(
        f"{what}: Cholesky failed even after adding {10.0**max_tries:g} times the damping; the "
        "inputs are "
        "probably non-finite or wildly scaled. Increase damp or check the gradients."
    )


def page_bytes(device, sizes: dict, default: int) -> int:
    """Bytes of one page of a paged routine on ``device``: ``sizes[device.type]`` when given (on a
    CPU, pages small enough to stay in cache), else ``default`` (on an accelerator every page costs
    a few kernel launches per step, so pages are large there and bounded only by the memory they
    take)."""
    return int(sizes.get(torch.device(device).type, default))


MEMINFO = "/proc/meminfo"


def read_meminfo(path: str = MEMINFO) -> dict[str, int]:
    """The fields of ``/proc/meminfo`` in bytes (``{"MemAvailable": ..., ...}``); empty where there
    is none."""
    out = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def host_available_bytes() -> int | None:
    """Host memory a new allocation can get: ``psutil.virtual_memory().available`` where psutil is
    installed, else ``MemAvailable`` of ``/proc/meminfo`` (free pages plus the page cache and
    reclaimable memory the kernel gives back), else the free physical pages (``SC_AVPHYS_PAGES``,
    which leaves out the page cache and so understates what is available, often by many GiB), else
    None."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        with contextlib.suppress(Exception):
            return int(psutil.virtual_memory().available)
    avail = read_meminfo().get("MemAvailable")
    if avail is not None:
        return avail
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def free_bytes(device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: ``mem_get_info``; CPU:
    :func:`host_available_bytes`), or None when it cannot be told. Used to fail early, with the
    number, before a large allocation."""
    device = torch.device(device)
    # unknown (no such device, a build without it): don't block
    with contextlib.suppress(ValueError, OSError, RuntimeError, AttributeError, AssertionError):
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            return host_available_bytes()
    return None


_LIBC = None


def trim_host_heap() -> bool:
    """Give the free pages of the host's heap back to the operating system (glibc's
    ``malloc_trim(0)``); True when it could be called. Between the gradient phase and the inverse:
    the model's activations are freed into the heap, where the kernel still counts them as
    resident, while the large tensors that follow (the step's vectors) are fresh mappings, so the
    two would add up in the process's peak. Elsewhere (no glibc) it does nothing."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        _LIBC = False
        return False
