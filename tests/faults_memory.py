"""Fault rows for the memory checks (run by tests/test_faults.py): a prune whose Fisher fits in the
host's available memory (MemAvailable: free pages plus the page cache the kernel gives back) runs,
even when the free pages alone would not hold it; one that fits in neither is refused before any
weight moves."""

from __future__ import annotations

import sys

import torch

from faults_pruning import mlp
from hf_mfac.core import _checks
from hf_mfac.pruning import prune_oneshot
from test_faults import Fault


def _with_host(meminfo: dict, free_pages: int):
    """Run ``act`` with the host readers patched: ``/proc/meminfo`` gives ``meminfo``,
    ``SC_AVPHYS_PAGES`` ``free_pages`` pages of 4 KiB, no psutil."""

    def wrap(act):
        def run(ctx):
            saved = _checks.read_meminfo, _checks.os.sysconf, sys.modules.get("psutil", ...)
            _checks.read_meminfo = lambda path=None: dict(meminfo)
            _checks.os.sysconf = lambda name: free_pages if name == "SC_AVPHYS_PAGES" else 4096
            sys.modules["psutil"] = None
            try:
                return act(ctx)
            finally:
                _checks.read_meminfo, _checks.os.sysconf = saved[0], saved[1]
                if saved[2] is ...:
                    del sys.modules["psutil"]
                else:
                    sys.modules["psutil"] = saved[2]

        return run

    return wrap


def _prune(ctx):
    return prune_oneshot(
        ctx["model"],
        ctx["data"],
        method="obert",
        sparsity=0.5,
        num_grads=8,
        block_size=4,
        progress=False,
    )


def _pruned(ctx, result):
    assert result.report.sparsity > 0.4


def _prune_with(**kw):
    from hf_mfac.pruning import OBSPruner

    def act(ctx):
        pruner = OBSPruner(block_size=4, **kw)
        return prune_oneshot(ctx["model"], ctx["data"], method=pruner, sparsity=0.5, num_grads=8,
                             progress=False)

    return act


CASES = [
    Fault(
        "oneshot-fits-mem-available-not-mem-free",
        mlp,
        _with_host({"MemFree": 4096, "MemAvailable": 8 << 30}, 1)(_prune),
        None,
        check=_pruned,
    ),
    Fault(
        "oneshot-over-mem-available-refused",
        mlp,
        _with_host({"MemFree": 4096, "MemAvailable": 4096}, 1)(_prune),
        MemoryError,
        r"needs an estimated .* on cpu .* only 0\.0 MiB is available",
    ),
    Fault("oneshot-fisher-dtype-not-a-float", mlp, _prune_with(fisher_dtype=torch.int8), ValueError,
          r"fisher_dtype must be torch.float32 .* got torch.int8"),
    Fault("oneshot-fisher-dtype-half-not-offered", mlp, _prune_with(fisher_dtype=torch.bfloat16),
          ValueError, r"fisher_dtype .* got torch.bfloat16"),
]
