"""Build and self-check the CUDA kernels ahead of training (``hf-mfac build-kernels``).

:func:`build_kernels` compiles (or loads from the cache) the module for every visible GPU's
architecture and re-runs the self-check of every kernel in every storage dtype on every visible GPU,
then returns a JSON-able report. Run it once per machine (or per image) before launching e.g. 8 DDP
ranks: they then load the cached build and read the verdicts instead of each blocking on the compile
at step 1. Several processes may call it at once: the compile is serialised by the build folder's
file lock, the verdict file is merged under its own lock and replaced atomically.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

import torch

from . import _loader, _selfcheck

logger = logging.getLogger("hf_mfac")


def _finite_or_none(v):
    """NaN/inf (a kernel that raised or returned garbage) as None, so that the report is strict
    JSON."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _devices() -> list[torch.device]:
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def _progress(verbose: bool):
    """With ``verbose``, show the ``hf_mfac`` logger's INFO messages on stderr for the block, unless
    logging is already configured to show them somewhere."""
    if not verbose or logger.hasHandlers() and logger.getEffectiveLevel() <= logging.INFO:
        yield
        return
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


def build_kernels(verbose: bool = True) -> dict:
    """Build the CUDA kernels for every visible GPU and self-check every kernel and dtype on each.

    Returns a JSON-able report: ``ok`` (every visible GPU has a build whose checks all passed),
    ``gpu`` (a CUDA GPU is visible to torch), ``reason`` (why nothing was built, else None),
    ``torch``, ``torch_cuda``, ``build_root``, ``lock`` (the file-lock backend) and ``devices``: per
    GPU its ``index``, ``name``, ``arch``, ``build`` (module name), ``build_dir``, ``compiled``
    (this call compiled it), ``seconds`` (build or load time), ``error`` (a failed build, else
    None), ``ok`` and ``checks`` (one verdict per kernel and dtype: ``kernel``, ``dtype``, ``ok``,
    ``max_err``, ``bound``, ``case``, ``error``, ``seconds``). Without a usable GPU or toolchain it
    builds nothing and says why in ``reason`` (``ok`` False, the torch reference ops will be used).
    ``verbose`` shows progress on stderr through the ``hf_mfac`` logger.
    """
    report = {"ok": False, "gpu": bool(torch.cuda.is_available()), "reason": None,
              "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "build_root": str(_loader.build_root()),
              "lock": _loader.lock_backend(), "devices": []}
    with _progress(verbose):
        reason = _loader.environment_reason()
        if reason is not None:
            report["reason"] = reason
            logger.warning("hf_mfac build-kernels: nothing built: %s. The PyTorch reference ops "
                           "will be used.",
                           reason)
            return report
        devices = _devices()
        if not devices:
            report["reason"] = "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)"
            logger.warning("hf_mfac build-kernels: nothing built: %s", report["reason"])
            return report
        for device in devices:
            entry = {"index": device.index, "name": _selfcheck._device_name(device),
                     "arch": _loader.device_arch(device), "build": None, "build_dir": None,
                     "compiled": False,
                     "seconds": None, "error": None, "ok": False, "checks": []}
            report["devices"].append(entry)
            logger.info("hf_mfac build-kernels: %s (%s, %s)", device, entry["name"], entry["arch"])
            t0 = time.perf_counter()
            try:
                ext = _loader.load(device)
            except _loader.KernelUnavailableError as exc:
                entry["error"] = str(exc)
                logger.warning("hf_mfac build-kernels: %s: %s", device, exc)
                continue
            info = _loader.status()["builds"].get(entry["arch"], {})
            entry.update(build=info.get("name", _selfcheck._build_of(ext)),
                         build_dir=info.get("dir"),
                         compiled=bool(info.get("compiled")),
                         seconds=round(time.perf_counter() - t0, 3))
            entry["checks"] = [{k: _finite_or_none(v[k]) for k in ("kernel", "dtype", "ok",
                                                                   "max_err", "bound",
                                                                    "case", "error", "seconds")}
                               for v in _selfcheck.check_all(ext, device, force=True)]
            entry["ok"] = all(c["ok"] for c in entry["checks"])
            for c in entry["checks"]:
                if not c["ok"]:
                    logger.warning("hf_mfac build-kernels: %s: self-check FAILED: %s %s: %s",
                                   device, c["kernel"],
                                   c["dtype"], c["error"] or f"max error {c['max_err']} > "
                                                             f"{c['bound']} ({c['case']})")
            logger.info("hf_mfac build-kernels: %s: %d/%d self-checks passed", device,
                        sum(c["ok"] for c in entry["checks"]), len(entry["checks"]))
        report["ok"] = all(e["ok"] for e in report["devices"])
    return report
