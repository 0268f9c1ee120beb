"""Self-check of the CUDA kernels before their first use.

The first time an op would run a CUDA kernel in a process, for each (build, device, kernel, storage
dtype), :func:`ensure` runs that kernel and its torch reference on small random problems chosen to
reach the kernel's edge paths, and compares them with the tolerance the kernel tests use
(:func:`within_tolerance`). The verdict is kept in memory and written next to the build, in ``<build
dir>/selfcheck.json`` (the build folder is keyed on the sources, toolchain and architecture; the
entry inside on the GPU's name, the kernel and the dtype), so that later processes read it instead
of re-running the check. ``hf-mfac build-kernels`` (:func:`hf_mfac.kernels.build_kernels`) re-runs
every check and rewrites the file.

- A kernel that disagrees under ``impl="auto"``: one :class:`KernelSelfCheckWarning` with the
  numbers, then the torch reference for that kernel and dtype from then on (also in later processes,
  through the file). Under ``impl="cuda"``: :class:`KernelSelfCheckError`.
- Cost: a few milliseconds on a GPU, once per process and kernel/dtype actually used (the problems
  hold about 1.1M elements; the float64 comparison runs on the same GPU). ``HF_MFAC_KERNELS=torch``
  skips the kernels, and with them the check.
- The check uses its own ``torch.Generator`` (the global RNG is untouched) and runs under
  ``torch.no_grad()``. It cannot run while a CUDA graph is being captured: ``auto`` then takes the
  reference for that call, ``cuda`` raises (check first with ``build_kernels()`` or one eager step).

The problems (see :func:`window_problems`, :func:`mfac_b_problems`):

- window products, each storage dtype: ``m = 67`` rows (the last group of 4 rows in ``G x`` is
  partial, the unrolled-by-4 row loop of ``G^T c`` has a remainder, ``m >= 64`` splits ``G^T c``
  into two row slices); ``d = 16424`` at an aligned base (16-byte vector loads, ``G x`` split over
  d, a last column block shorter than 256 vectors); ``d = 4099`` with the bases of G and x one
  element off alignment (scalar loads, ``G x`` split over d); ``(7, 2056)`` with G aligned and x one
  element off (vector loads of G, x copied to an aligned buffer); and tiny ``(5, 24)``, ``(1, 1)``.
- B kernel, float32 and float64: ``m = 67`` (three 32-wide tiles, a partial last one, an update
  launch with two tile rows), ``m = 32`` (one full tile) and ``m = 1``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from . import _glue, reference
from ._loader import KernelFallbackWarning, KernelUnavailableError

logger = logging.getLogger("hf_mfac")

# bump when the problems or the tolerance change: older verdicts on disk are ignored
CHECK_VERSION = 1
VERDICT_FILE = "selfcheck.json"
U32 = 2.0**-24

# kernel -> storage dtypes it implements
KERNEL_DTYPES = {
    "window_matvec": (torch.float32, torch.bfloat16, torch.float16),
    "window_rmatvec": (torch.float32, torch.bfloat16, torch.float16),
    "mfac_b": (torch.float32, torch.float64),
}


class KernelSelfCheckError(KernelUnavailableError):
    """A CUDA kernel disagreed with its torch reference in the self-check (``impl="cuda"``)."""


class KernelSelfCheckWarning(KernelFallbackWarning):
    """A CUDA kernel disagreed with its torch reference in the self-check; the reference runs
    instead."""


_lock = threading.RLock()
_verdicts: dict[tuple, dict] = {}  # (build, device, kernel, dtype) -> verdict
_disk: dict[str, dict] = {}  # verdict file -> its entries, read once per process
_warned: set[tuple] = set()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _build_of(ext) -> str:
    return getattr(ext, "__name__", type(ext).__name__)


def _verdict_path(ext) -> Path | None:
    """``selfcheck.json`` in the build folder of ``ext`` (its ``__file__`` is the compiled library
    there)."""
    f = getattr(ext, "__file__", None)
    return Path(f).parent / VERDICT_FILE if f else None


def _disk_key(device, kernel: str, dtype: torch.dtype) -> str:
    return f"{_device_name(device)}|{kernel}|{_dtype_name(dtype)}"


# --- the tolerance of the kernel tests
# --------------------------------------------------------------

def within_tolerance(got: torch.Tensor, ref_same_precision: torch.Tensor, exact: torch.Tensor,
                     floor: float) -> tuple[bool, float, float]:
    """``(ok, err, bound)``: ``err = max |got - exact| <= bound = 4 max |ref - exact| + floor``,
    where ``ref`` is the torch reference in the kernel's precision and ``exact`` float64. NaN
    fails."""
    err_ref = (ref_same_precision.double() - exact).abs().max().item()
    err = (got.double() - exact).abs().max().item()
    bound = 4 * err_ref + floor
    return bool(err <= bound), err, bound


# --- problems
# --------------------------------------------------------------------------------------

# (m, d, offset of G's base, offset of x) in elements
WINDOW_CASES = ((67, 16424, 0, 0), (67, 4099, 1, 1), (7, 2056, 0, 1), (5, 24, 0, 0), (1, 1, 0, 0))
MFAC_B_CASES = (67, 32, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def window_problems(dtype: torch.dtype, device) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]]:
    """``(label, G, x, c)`` per case of :data:`WINDOW_CASES`: G (m, d) in ``dtype`` starting
    ``g_off`` elements into its buffer, x (d,) fp32 ``x_off`` elements into its own, c (m,) fp32.
    Drawn on the CPU from a fixed seed, then moved."""
    out = []
    for i, (m, d, g_off, x_off) in enumerate(WINDOW_CASES):
        g = _gen(1000 + i)
        Gbuf = torch.randn(m * d + g_off, generator=g).to(dtype).to(device)
        xbuf = torch.randn(d + x_off, generator=g).to(device)
        c = torch.randn(m, generator=g).to(device)
        label = f"m={m} d={d} G offset={g_off} x offset={x_off}"
        out.append((label, Gbuf[g_off:].view(m, d), xbuf[x_off:], c))
    return out


def mfac_b_problems(dtype: torch.dtype, device) -> list[tuple[str, torch.Tensor, float, float]]:
    """``(label, D, damp, scale)`` per case: D from a well-conditioned random window (float64, then
    cast)."""
    out = []
    for m in MFAC_B_CASES:
        G = torch.randn(m, 2 * m + 3, generator=_gen(2000 + m),
                        dtype=torch.float64) / (2 * m + 3) ** 0.5
        damp, scale = 1e-2, float(m)
        D = reference.mfac_d(G @ G.T, damp, scale).to(dtype).to(device)
        out.append((f"m={m}", D, damp, scale))
    return out


# --- one check
# ---------------------------------------------------------------------------------------

def _worse(a: tuple, b: tuple) -> tuple:
    """The case with the larger err / bound (the one closest to failing)."""
    return b if b[1] / max(b[2], 1e-300) >= a[1] / max(a[2], 1e-300) else a


def _compare_window(kernel: str, ext, dtype, device) -> tuple[bool, float, float, str]:
    worst = (True, 0.0, 0.0, "")
    for label, G, x, c in window_problems(dtype, device):
        Gr = G.double()
        if kernel == "window_matvec":
            got = _glue.launch_window_matvec(ext, G, x)
            ref = reference.window_matvec(G, x)
            exact, mag = Gr @ x.double(), Gr.abs() @ x.double().abs()
            n = G.shape[0]
        else:
            got = _glue.launch_window_rmatvec(ext, G, c)
            ref = reference.window_rmatvec(G, c)
            exact, mag = Gr.T @ c.double(), Gr.abs().T @ c.double().abs()
            n = G.shape[1]
        if not isinstance(got, torch.Tensor) or got.shape != (n,) or got.dtype != torch.float32:
            return (
                False,
                float("nan"),
                0.0,
                f"{label}: returned {getattr(got, 'dtype', type(got))} "
                f"{tuple(getattr(got, 'shape', ()))}, expected float32 ({n},)",
            )
        ok, err, bound = within_tolerance(got, ref, exact, 8 * U32 * mag.max().item())
        if not ok:
            return ok, err, bound, label
        worst = _worse(worst, (ok, err, bound, label))
    return worst


def _compare_mfac_b(ext, dtype, device) -> tuple[bool, float, float, str]:
    worst = (True, 0.0, 0.0, "")
    for label, D, damp, scale in mfac_b_problems(dtype, device):
        got = _glue.launch_mfac_b(ext, D, damp, scale)
        if not isinstance(got, torch.Tensor) or got.shape != D.shape or got.dtype != dtype:
            return (
                False,
                float("nan"),
                0.0,
                f"{label}: returned {getattr(got, 'dtype', type(got))} "
                f"{tuple(getattr(got, 'shape', ()))}, expected {dtype} {tuple(D.shape)}",
            )
        exact = reference.mfac_b(D.double(), damp, scale)
        floor = 16 * torch.finfo(dtype).eps * exact.abs().max().item()
        ok, err, bound = within_tolerance(got, reference.mfac_b(D, damp, scale), exact, floor)
        if not ok:
            return ok, err, bound, label
        worst = _worse(worst, (ok, err, bound, label))
    return worst


def run_check(ext, device, kernel: str, dtype: torch.dtype) -> dict:
    """Run one self-check now (no cache): the kernel of ``ext`` against the reference on ``device``.

    Returns the verdict: ``kernel``, ``dtype``, ``ok``, ``max_err`` and ``bound`` (of the worst
    case, or the first failing one), ``case``, ``error`` (an exception raised by the kernel, else
    None), ``seconds``, ``device``, ``build``, ``check_version``.
    """
    if kernel not in KERNEL_DTYPES or dtype not in KERNEL_DTYPES[kernel]:
        raise ValueError(f"no self-check for kernel {kernel!r} in {dtype}")
    device = torch.device(device)
    t0 = time.perf_counter()
    error = None
    # no autograd, no autocast (it would compute the fp32 reference in low precision and loosen the
    # bound)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if kernel == "mfac_b":
                ok, err, bound, case = _compare_mfac_b(ext, dtype, device)
            else:
                ok, err, bound, case = _compare_window(kernel, ext, dtype, device)
    except Exception as exc:  # noqa: BLE001 - a kernel that raises fails its check; the message is the verdict
        ok, err, bound, case = False, float("nan"), 0.0, ""
        error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError as exc:  # a launch error surfacing late: the verdict is a failure
            ok, error = False, error or f"{type(exc).__name__}: {str(exc).strip()[:500]}"
    return {
        "kernel": kernel,
        "dtype": _dtype_name(dtype),
        "ok": ok,
        "max_err": err,
        "bound": bound,
        "case": case,
        "error": error,
        "seconds": round(time.perf_counter() - t0, 6),
        "device": _device_name(device),
        "build": _build_of(ext),
        "check_version": CHECK_VERSION,
    }


# --- verdicts: memory and the file next to the build
# -------------------------------------------------


def _read_disk(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _disk_entries(path: Path | None) -> dict:
    if path is None:
        return {}
    key = str(path)
    if key not in _disk:
        _disk[key] = _read_disk(path)
    return _disk[key]


def _write_disk(path: Path | None, entries: dict[str, dict]) -> None:
    """Merge ``entries`` into the verdict file under its lock (read-modify-write, atomic
    replace)."""
    if path is None:
        return
    from ._loader import file_lock

    try:
        with file_lock(path.with_suffix(".lock"), timeout=60, what="the self-check verdict file"):
            data = _read_disk(path)
            data.update(entries)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        _disk[str(path)] = data
    # a read-only cache folder: keep the verdict in memory
    except (OSError, KernelUnavailableError) as exc:
        logger.info("hf_mfac: could not record the kernel self-check in %s: %s", path, exc)


def _describe(v: dict, device) -> str:
    where = f"{_device_key(device)} ({v['device']}, build {v['build']})"
    what = f"the CUDA kernel {v['kernel']} ({v['dtype']}) on {where}"
    if v.get("error"):
        return f"{what} failed its self-check: it raised {v['error']}"
    return (
        f"{what} disagrees with its torch reference: max error {v['max_err']:.3g} > allowed "
        f"{v['bound']:.3g} "
        f"({v['case']})"
    )


def verdict(ext, device, kernel: str, dtype: torch.dtype, force: bool = False) -> dict:
    """The verdict for ``kernel``/``dtype`` of ``ext`` on ``device``: from memory, else from the
    file next to the build, else by running :func:`run_check` (and recording it in both). ``force``
    re-runs it."""
    key = (_build_of(ext), _device_key(device), kernel, dtype)
    with _lock:
        if not force and key in _verdicts:
            return _verdicts[key]
        path = _verdict_path(ext)
        dkey = _disk_key(device, kernel, dtype)
        saved = None if force else _disk_entries(path).get(dkey)
        if (
            isinstance(saved, dict)
            and saved.get("check_version") == CHECK_VERSION
            and "ok" in saved
        ):
            v = dict(saved, source="file")
        else:
            v = run_check(ext, device, kernel, dtype)
            (logger.info if v["ok"] else logger.debug)(
                "hf_mfac: self-check of %s (%s) on %s: %s, max error %.3g (allowed %.3g), %.1f ms",
                kernel,
                v["dtype"],
                _device_key(device),
                "passed" if v["ok"] else "FAILED",
                v["max_err"],
                v["bound"],
                1e3 * v["seconds"],
            )
            _write_disk(path, {dkey: v})
            v = dict(v, source="run")
        _verdicts[key] = v
        return v


def _capturing(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def ensure(ext, device, needs, strict: bool) -> bool:
    """Whether every ``(kernel, dtype)`` in ``needs`` passed its self-check on ``device`` (running
    the checks not yet known). A failure warns once (:class:`KernelSelfCheckWarning`) and returns
    False, or raises :class:`KernelSelfCheckError` when ``strict`` (``impl="cuda"``)."""
    build, dev = _build_of(ext), None
    for kernel, dtype in needs:
        if dev is None:
            dev = _device_key(device)
        v = _verdicts.get((build, dev, kernel, dtype))
        if v is None:
            if _capturing(device):
                if strict:
                    raise KernelUnavailableError(
                        f"the self-check of the CUDA kernel {kernel} ({_dtype_name(dtype)}) cannot "
                        "run during CUDA "
                        "graph capture; run hf_mfac.kernels.build_kernels() or one eager step "
                        "before capturing"
                    )
                return False
            v = verdict(ext, device, kernel, dtype)
        if v["ok"]:
            continue
        msg = _describe(v, device)
        if strict:
            raise KernelSelfCheckError(
                f"{msg}. Set HF_MFAC_KERNELS=torch (or impl='torch') to use "
                "the reference; "
                "`hf-mfac build-kernels` re-runs the check and prints the "
                "report."
            )
        key = (build, dev, kernel, dtype)
        with _lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            warnings.warn(
                f"hf_mfac: {msg}; using the PyTorch reference for it from now on. Please "
                "report this "
                "with the output of `hf-mfac build-kernels`; HF_MFAC_KERNELS=torch "
                "silences it.",
                KernelSelfCheckWarning,
                stacklevel=4,
            )
        return False
    return True


def check_all(ext, device, force: bool = True) -> list[dict]:
    """Every kernel in every dtype on ``device`` (re-run when ``force``): the verdicts, recorded as
    usual."""
    return [
        verdict(ext, device, kernel, dtype, force=force)
        for kernel, dtypes in KERNEL_DTYPES.items()
        for dtype in dtypes
    ]


def verdicts() -> list[dict]:
    """The verdicts known to this process (for :func:`hf_mfac.kernels.status`)."""
    with _lock:
        return [dict(v, on=dev) for (_, dev, _, _), v in _verdicts.items()]


def reset() -> None:
    """Forget the verdicts and warnings of this process (tests). Files on disk stay."""
    with _lock:
        _verdicts.clear()
        _disk.clear()
        _warned.clear()
