"""Small timing helpers shared by the benchmarks (median of repeats, same-run ratios)."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (synchronising CUDA if used)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(numel: int, dtype=torch.float32, device="cpu", repeats: int = 5) -> float:
    """Bytes/s torch reaches copying a tensor of ``numel`` elements (read + write counted)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeats)
    return 2 * numel * src.element_size() / t


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def run_main_job(output_dir: str, args: list[str], reuse: bool = False) -> dict:
    """Run ``examples/main_job.py --output_dir output_dir *args`` in a subprocess (unless ``reuse`` and its
    ``results.json`` exists) and return that ``results.json``."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    path = os.path.join(output_dir, "results.json")
    if not (reuse and os.path.isfile(path)):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, os.path.join(root, "examples", "main_job.py"), "--output_dir", output_dir, *args]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)
