"""Lazy, cached JIT build of the CUDA module in ``cuda/`` (shipped as the package ``hf_mfac._cuda``).

Nothing happens at import. The first CUDA op calls :func:`load`, which checks, in order, that torch
was built with CUDA, that ``torch.cuda.is_available()``, that nvcc (``CUDA_HOME`` or ``PATH``) and
ninja exist, then builds with ``torch.utils.cpp_extension.load``. The build directory and module
name are keyed on a hash of the sources, torch/CUDA/Python versions and the device architecture
(``sm_XX``), so an edited source or a different GPU rebuilds and an unchanged one loads from cache
(also across processes). A refusal or a failed build is remembered with its reason, which
:func:`status` reports and :class:`KernelUnavailableError` carries.

Environment: ``HF_MFAC_BUILD_DIR`` (build root; default ``$XDG_CACHE_HOME/hf_mfac/torch_extensions``),
``HF_MFAC_KERNELS_VERBOSE=1`` (show the compiler output).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

_SOURCE_SUFFIXES = (".cu", ".cpp")
_HASHED_SUFFIXES = (".cu", ".cpp", ".h", ".cuh")

_lock = threading.RLock()
_modules: dict[str, object] = {}  # arch ("sm_90") -> loaded module
_failures: dict[str, str] = {}  # arch -> why the build failed
_precheck: list[str | None] = []  # [reason or None] once checked


class KernelUnavailableError(RuntimeError):
    """The CUDA kernels cannot be used here; the message says why."""


def source_dir() -> Path:
    """Directory with the ``.cu``/``.cpp`` sources: the installed ``hf_mfac._cuda`` package, else the
    repository's ``cuda/`` next to ``hf_mfac/`` (a source checkout used without installing)."""
    with contextlib.suppress(ImportError, TypeError):  # not installed as a package: use the checkout's cuda/
        from importlib.resources import files

        path = Path(str(files("hf_mfac._cuda")))
        if path.is_dir():
            return path
    return Path(__file__).resolve().parents[2] / "cuda"


def sources() -> list[Path]:
    """The translation units to compile, sorted by name."""
    d = source_dir()
    return sorted(p for p in d.iterdir() if p.suffix in _SOURCE_SUFFIXES) if d.is_dir() else []


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


def _check_environment() -> str | None:
    """Why the kernels cannot be built here, or None. Cheap: compiles nothing."""
    if torch.version.cuda is None:
        return (f"torch.cuda.is_available() is False: this PyTorch build ({torch.__version__}) has no CUDA "
                "support (torch.version.cuda is None)")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no usable CUDA GPU or driver"
    from torch.utils import cpp_extension

    if _nvcc() is None:
        which = shutil.which("nvcc")
        hint = f"; nvcc on PATH is {which}" if which else ""
        return ("nvcc not found: set CUDA_HOME to a CUDA toolkit matching torch.version.cuda="
                f"{torch.version.cuda} (CUDA_HOME={cpp_extension.CUDA_HOME}{hint})")
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja); torch.utils.cpp_extension.load needs it"
    if not sources():
        return f"CUDA sources not found in {source_dir()}"
    return None


def environment_reason() -> str | None:
    """Cached :func:`_check_environment`."""
    with _lock:
        if not _precheck:
            _precheck.append(_check_environment())
        return _precheck[0]


def device_arch(device: torch.device | int | None = None) -> str:
    """``sm_XY`` of a CUDA device (initialises CUDA)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def build_key(arch: str) -> str:
    """Hash of the sources and headers, the toolchain versions and ``arch``: names the build."""
    h = hashlib.sha256()
    d = source_dir()
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if p.suffix in _HASHED_SUFFIXES:
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{arch}".encode())
    return h.hexdigest()[:16]


def build_root() -> Path:
    env = os.environ.get("HF_MFAC_BUILD_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hf_mfac" / "torch_extensions"


def load(device: torch.device | int | None = None):
    """The compiled module for ``device``'s architecture, built on first use.

    Raises :class:`KernelUnavailableError` with the reason when the environment cannot build it or
    the build failed (the reason is remembered; later calls fail fast with the same message).
    """
    with _lock:
        reason = environment_reason()
        if reason is not None:
            raise KernelUnavailableError(reason)
        arch = device_arch(device)
        if arch in _modules:
            return _modules[arch]
        if arch in _failures:
            raise KernelUnavailableError(_failures[arch])
        try:
            _modules[arch] = _build(arch)
        except Exception as exc:  # noqa: BLE001 - any build error becomes the recorded reason
            msg = str(exc).strip().splitlines()
            detail = "\n".join(msg[-20:])[-2000:]
            _failures[arch] = f"building the CUDA extension for {arch} failed: {type(exc).__name__}: {detail}"
            raise KernelUnavailableError(_failures[arch]) from exc
        return _modules[arch]


def _build(arch: str):
    from torch.utils import cpp_extension

    cc = arch[3:]
    name = f"hf_mfac_cuda_{arch}_{build_key(arch)}"
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources()],
        extra_include_paths=[str(source_dir())],
        extra_cflags=["-O3"],
        # An explicit -gencode makes torch skip its own arch list: build for this device only.
        extra_cuda_cflags=["-O3", "-lineinfo", f"-gencode=arch=compute_{cc},code=sm_{cc}"],
        build_directory=str(build_dir),
        verbose=os.environ.get("HF_MFAC_KERNELS_VERBOSE") == "1",
    )


def status() -> dict:
    """Where the CUDA kernels stand, without building anything.

    Keys: ``available`` (the environment can build them), ``reason`` (why not, else None), ``loaded``
    (architectures with a loaded module), ``failed`` (architecture -> build error), ``build_root``,
    ``sources``.
    """
    reason = environment_reason()
    with _lock:
        return {
            "available": reason is None,
            "reason": reason,
            "loaded": sorted(_modules),
            "failed": dict(_failures),
            "build_root": str(build_root()),
            "sources": [p.name for p in sources()],
        }


def reset() -> None:
    """Forget cached checks and failures (tests; after installing a missing tool). Loaded modules stay."""
    with _lock:
        _precheck.clear()
        _failures.clear()
