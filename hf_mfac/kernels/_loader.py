"""Lazy, cached JIT build of the CUDA module in ``cuda/`` (shipped as the package
``hf_mfac._cuda``).

Nothing happens at import. The first CUDA op calls :func:`load`, which checks, in order, that torch
was built with CUDA, that ``torch.cuda.is_available()``, that nvcc (``CUDA_HOME`` or ``PATH``) and
ninja exist, then builds with ``torch.utils.cpp_extension.load``. The build directory and module
name are keyed on a hash of the sources, torch/CUDA/Python versions and the device architecture
(``sm_XX``), so an edited source or a different GPU rebuilds and an unchanged one loads from cache
(also across processes). A refusal or a failed build is remembered with its reason, which
:func:`status` reports and :class:`KernelUnavailableError` carries.

A compile is visible: it logs (logger ``"hf_mfac"``, level WARNING, since it blocks the caller for a
minute or more) where it builds and, when done, how long it took; a load from the cache logs at
INFO. Builds into one cache folder are serialised across processes by an exclusive file lock
(``<build dir>/hf_mfac.lock``; ``filelock`` when installed, else ``fcntl.flock``): of 8 ranks
starting together, one compiles and the others wait, then load the result. The OS drops the lock
when its holder dies, so a killed build never blocks the next one (torch's own lock file, which a
killed build leaves behind, is removed under this lock). ``hf-mfac build-kernels``
(:func:`hf_mfac.kernels.build_kernels`) builds ahead of training.

Environment: ``HF_MFAC_BUILD_DIR`` (build root; default
``$XDG_CACHE_HOME/hf_mfac/torch_extensions``), ``HF_MFAC_KERNELS_VERBOSE=1`` (show the compiler
output), ``HF_MFAC_BUILD_LOCK_TIMEOUT`` (seconds to wait for another process's build, default 1800;
then the kernels count as unavailable).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

_SOURCE_SUFFIXES = (".cu", ".cpp")
_HASHED_SUFFIXES = (".cu", ".cpp", ".h", ".cuh")

_lock = threading.RLock()
_modules: dict[str, object] = {}  # arch ("sm_90") -> loaded module
_failures: dict[str, str] = {}  # arch -> why the build failed
_precheck: list[str | None] = []  # [reason or None] once checked
_builds: dict[str, dict] = {}  # arch -> {"name", "dir", "compiled", "seconds"} of the loaded module

logger = logging.getLogger("hf_mfac")
LOCK_NAME = "hf_mfac.lock"
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


class KernelUnavailableError(RuntimeError):
    """The CUDA kernels cannot be used here; the message says why."""


class KernelFallbackWarning(UserWarning):
    """The CUDA kernels could not be used; the pure-PyTorch reference ops run instead."""


def source_dir() -> Path:
    """Directory with the ``.cu``/``.cpp`` sources: the installed ``hf_mfac._cuda`` package, else
    the repository's ``cuda/`` next to ``hf_mfac/`` (a source checkout used without installing)."""
    # not installed as a package: use the checkout's cuda/
    with contextlib.suppress(ImportError, TypeError):
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
        return (f"torch.cuda.is_available() is False: this PyTorch build ({torch.__version__}) has "
                "no CUDA "
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


def build_name(arch: str) -> str:
    """Module name of the build for ``arch``: ``hf_mfac_cuda_<arch>_<build_key>``."""
    return f"hf_mfac_cuda_{arch}_{build_key(arch)}"


def build_dir(arch: str) -> Path:
    """Cache folder of the build for ``arch`` (it also holds the self-check verdicts)."""
    return build_root() / build_name(arch)


def _lock_timeout() -> float:
    env = os.environ.get("HF_MFAC_BUILD_LOCK_TIMEOUT", "").strip()
    try:
        return float(env) if env else 1800.0
    except ValueError:
        raise ValueError(f"HF_MFAC_BUILD_LOCK_TIMEOUT={env!r} is not a number of seconds") from None


def lock_backend() -> str | None:
    """What :func:`file_lock` uses here: ``"filelock"``, ``"fcntl"`` or None (no inter-process
    lock)."""
    try:
        import filelock  # noqa: F401
        return "filelock"
    except ImportError:
        pass
    try:
        import fcntl  # noqa: F401
        return "fcntl"
    except ImportError:
        return None


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None, what: str = "the lock"):
    """Hold an exclusive inter-process lock on the file ``path`` (created if missing) for the block.

    ``filelock.FileLock`` when the package is installed, else ``fcntl.flock`` (both OS locks:
    released when the holder exits or dies). Logs once at WARNING when it has to wait (saying for
    ``what``); raises :class:`KernelUnavailableError` after ``timeout`` seconds (default
    ``HF_MFAC_BUILD_LOCK_TIMEOUT``). Without either backend (Windows without filelock) the block
    runs unlocked.
    """
    timeout = _lock_timeout() if timeout is None else float(timeout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = lock_backend()

    def waited_too_long():
        return KernelUnavailableError(f"gave up after {timeout:.0f} s waiting for {what} ({path}: "
                                      "another process "
                                      "holds it); raise HF_MFAC_BUILD_LOCK_TIMEOUT or remove a "
                                      "stuck process")

    if backend == "filelock":
        import filelock

        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.warning("hf_mfac: waiting for %s (held by another process: %s)", what, path)
            try:
                lock.acquire(timeout=timeout, poll_interval=0.1)
            except filelock.Timeout:
                raise waited_too_long() from None
        try:
            yield
        finally:
            lock.release()
        return
    if backend == "fcntl":
        import fcntl

        with open(path, "a+") as fh:
            deadline, warned = time.monotonic() + timeout, False
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except (BlockingIOError, PermissionError):
                    if not warned:
                        warned = True
                        logger.warning("hf_mfac: waiting for %s (held by another process: %s)",
                                       what, path)
                    if time.monotonic() > deadline:
                        raise waited_too_long() from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    logger.debug("hf_mfac: no file lock available (install filelock); %s is not held", what)
    yield


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
            _failures[arch] = (
                f"building the CUDA extension for {arch} failed: {type(exc).__name__}: {detail}"
            )
            # the caller's warning or exception carries it
            logger.debug("hf_mfac: %s", _failures[arch])
            raise KernelUnavailableError(_failures[arch]) from exc
        return _modules[arch]


def _build(arch: str):
    """Build (or load from the cache folder) the module for ``arch`` under the folder's file
    lock."""
    from torch.utils import cpp_extension

    cc = arch[3:]
    name = build_name(arch)
    folder = build_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(
        folder / LOCK_NAME, what=f"another process's build of the hf_mfac CUDA kernels for {arch}"
    ):
        # Under our lock nobody else builds here: a torch lock file left by a killed build is stale,
        # and torch would wait on it forever.
        (folder / "lock").unlink(missing_ok=True)
        compiled = not (folder / f"{name}{_LIB_EXT}").is_file()
        if compiled:
            logger.warning(
                "hf_mfac: compiling the CUDA kernels for %s (first use of this source "
                "version, GPU "
                "architecture and toolchain; about a minute) into %s. `hf-mfac "
                "build-kernels` does this "
                "ahead of training; HF_MFAC_KERNELS=torch skips the kernels.",
                arch,
                folder,
            )
        else:
            logger.info("hf_mfac: loading the CUDA kernels for %s from %s", arch, folder)
        t0 = time.perf_counter()
        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(source_dir())],
            extra_cflags=["-O3"],
            # An explicit -gencode makes torch skip its own arch list: build for this device only.
            extra_cuda_cflags=["-O3", "-lineinfo", f"-gencode=arch=compute_{cc},code=sm_{cc}"],
            build_directory=str(folder),
            verbose=os.environ.get("HF_MFAC_KERNELS_VERBOSE") == "1",
        )
        seconds = time.perf_counter() - t0
    if compiled:
        logger.warning(
            "hf_mfac: compiled the CUDA kernels for %s in %.1f s (cached in %s)",
            arch,
            seconds,
            folder,
        )
    _builds[arch] = {
        "name": name,
        "dir": str(folder),
        "compiled": compiled,
        "seconds": round(seconds, 3),
    }
    return module


def status() -> dict:
    """Where the CUDA kernels stand, without building anything.

    Keys: ``available`` (the environment can build them), ``reason`` (why not, else None),
    ``loaded`` (architectures with a loaded module), ``builds`` (architecture -> name, folder,
    whether this process compiled it and the seconds it took), ``failed`` (architecture -> build
    error), ``build_root``, ``sources`` (:func:`hf_mfac.kernels.status` adds the self-check verdicts
    of this process).
    """
    reason = environment_reason()
    with _lock:
        return {
            "available": reason is None,
            "reason": reason,
            "loaded": sorted(_modules),
            "builds": {k: dict(v) for k, v in _builds.items()},
            "failed": dict(_failures),
            "build_root": str(build_root()),
            "sources": [p.name for p in sources()],
        }


def reset() -> None:
    """Forget cached checks and failures (tests; after installing a missing tool). Loaded modules
    stay."""
    with _lock:
        _precheck.clear()
        _failures.clear()
