#!/usr/bin/env python
"""One-shot pruning of the main job's fine-tuned MiniLM over several draws of the calibration data (issue 4).

The ordering of the methods at high sparsity depends on which calibration batches give the Fisher. This runs
``examples/main_job.py --optimizers adamw --skip_gradual`` once per ``--prune_seeds`` entry with everything
else fixed (split, training seed 0, so the same dense model every time) and only ``--prune_seed`` changed,
i.e. another draw of the ``--prune_grads`` calibration batches. Each run writes
``<output_dir>/prune_seed<S>/results.json``; this script prints, per method and sparsity, the mean and sample
standard deviation of the accuracy, the per-draw values, and how often each method is best at each sparsity.

Example (about 4 min per draw on an idle 2-core CPU)::

    python benchmarks/bench_oneshot_seeds.py --prune_seeds 0,1,2 --output_dir outputs/oneshot_seeds

Extra arguments after ``--`` go to main_job.py (e.g. ``-- --prune_grads 128``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _util import machine, run_main_job, table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prune_seeds", default="0,1,2")
    ap.add_argument("--output_dir", default="outputs/oneshot_seeds")
    ap.add_argument("--reuse", action="store_true", help="skip draws whose results.json exists")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to main_job.py")
    a = ap.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    seeds = [int(s) for s in a.prune_seeds.split(",") if s.strip()]
    t0 = time.time()
    runs = {s: run_main_job(os.path.join(a.output_dir, f"prune_seed{s}"), [
        "--seed", "0", "--split_seed", "0", "--prune_seed", str(s), "--optimizers", "adamw", "--skip_gradual",
        *extra], a.reuse) for s in seeds}
    dense = {s: r["dense"]["adamw"]["accuracy"] for s, r in runs.items()}
    methods = list(next(iter(runs.values()))["oneshot"])
    targets = [p["sparsity"] for p in next(iter(runs.values()))["oneshot"][methods[0]]]
    acc = {(m, i, s): runs[s]["oneshot"][m][i]["accuracy"] for m in methods for i in range(len(targets)) for s in seeds}

    def cell(m, i):
        vals = [acc[m, i, s] for s in seeds]
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.3f}{sd}"

    print(f"\nMachine: {machine()}; {(time.time() - t0) / 60:.1f} min; dense accuracy "
          f"{', '.join(f'{v:.3f}' for v in dense.values())} (the same model for every draw)\n")
    print(table(["method", *(f"{t:.0%}" for t in targets)], [[m, *(cell(m, i) for i in range(len(targets)))]
                                                            for m in methods]))
    print("\nPer draw (" + ", ".join(f"prune_seed {s}" for s in seeds) + "):\n")
    print(table(["method", *(f"{t:.0%}" for t in targets)],
                [[m, *(" / ".join(f"{acc[m, i, s]:.3f}" for s in seeds) for i in range(len(targets)))]
                 for m in methods]))
    print("\nBest method per draw (ties listed together):\n")
    rows = []
    for i, t in enumerate(targets):
        best = []
        for s in seeds:
            top = max(acc[m, i, s] for m in methods)
            best.append("+".join(m for m in methods if acc[m, i, s] == top))
        rows.append([f"{t:.0%}", *best])
    print(table(["sparsity", *(f"prune_seed {s}" for s in seeds)], rows))
    print("\nCommand: python benchmarks/bench_oneshot_seeds.py "
          + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
