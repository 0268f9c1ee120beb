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
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, {gpu}, "
            f"torch {torch.__version__}")


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def run_main_job(output_dir: str, args: list[str], reuse: bool = False) -> dict:
    """Run ``examples/main_job.py --output_dir output_dir *args`` in a subprocess (unless ``reuse``
    and its ``results.json`` exists) and return that ``results.json``."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    path = os.path.join(output_dir, "results.json")
    if not (reuse and os.path.isfile(path)):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, os.path.join(root, "examples", "main_job.py"), "--output_dir",
               output_dir, *args]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(path) as f:
        return json.load(f)


def main_job_seeds(argv, doc: str, *, flag: str, default_dir: str, folder: str, job_args) -> dict:
    """Command line of the seed benchmarks: ``--<flag> 0,1,2 --output_dir D [--reuse] [-- main_job
    args]``. Runs :func:`run_main_job` once per seed in ``D/<folder><seed>`` with ``job_args(seed)``
    plus the extra arguments, and returns ``{seed: results.json}``."""
    import argparse
    import os

    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(f"--{flag}", default="0,1,2")
    ap.add_argument("--output_dir", default=default_dir)
    ap.add_argument("--reuse", action="store_true", help="skip the seeds whose results.json exists")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to main_job.py")
    a = ap.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    seeds = [int(s) for s in getattr(a, flag).split(",") if s.strip()]
    return {
        s: run_main_job(os.path.join(a.output_dir, f"{folder}{s}"), [*job_args(s), *extra], a.reuse)
        for s in seeds
    }
