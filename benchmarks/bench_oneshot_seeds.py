#!/usr/bin/env python
"""One-shot pruning of the main job's fine-tuned MiniLM over several draws of the calibration data.

The ordering of the methods at high sparsity depends on which calibration batches give the Fisher.
This runs ``examples/main_job.py --optimizers adamw --skip_gradual`` once per ``--prune_seeds``
entry with everything else fixed (split, training seed 0, so the same dense model every time) and
only ``--prune_seed`` changed, i.e. another draw of the ``--prune_grads`` calibration batches. Each
run writes ``<output_dir>/prune_seed<S>/results.json``; this script prints, per method and sparsity,
the mean and sample standard deviation of the accuracy, the per-draw values, and how often each
method is best at each sparsity.

Example (about 4 min per draw on an idle 2-core CPU)::

    python benchmarks/bench_oneshot_seeds.py --prune_seeds 0,1,2 --output_dir outputs/oneshot_seeds

Extra arguments after ``--`` go to main_job.py (e.g. ``-- --prune_grads 128``).
"""
from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _util import machine, main_job_seeds, table  # noqa: E402


def main(argv=None):
    t0 = time.time()
    runs = main_job_seeds(argv, __doc__, flag="prune_seeds", default_dir="outputs/oneshot_seeds",
                          folder="prune_seed", job_args=lambda s: [
                              "--seed", "0", "--split_seed", "0", "--prune_seed", str(s),
                              "--optimizers", "adamw",
                              "--skip_gradual"])
    seeds = list(runs)
    dense = {s: r["dense"]["adamw"]["accuracy"] for s, r in runs.items()}
    methods = list(next(iter(runs.values()))["oneshot"])
    targets = [p["sparsity"] for p in next(iter(runs.values()))["oneshot"][methods[0]]]
    acc = {
        (m, i, s): runs[s]["oneshot"][m][i]["accuracy"]
        for m in methods
        for i in range(len(targets))
        for s in seeds
    }

    def cell(m, i):
        vals = [acc[m, i, s] for s in seeds]
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.3f}{sd}"

    print(
        f"\nMachine: {machine()}; {(time.time() - t0) / 60:.1f} min; dense accuracy "
        f"{', '.join(f'{v:.3f}' for v in dense.values())} (the same model for every draw)\n"
    )
    print(
        table(
            ["method", *(f"{t:.0%}" for t in targets)],
            [[m, *(cell(m, i) for i in range(len(targets)))] for m in methods],
        )
    )
    print("\nPer draw (" + ", ".join(f"prune_seed {s}" for s in seeds) + "):\n")
    print(
        table(
            ["method", *(f"{t:.0%}" for t in targets)],
            [
                [
                    m,
                    *(
                        " / ".join(f"{acc[m, i, s]:.3f}" for s in seeds)
                        for i in range(len(targets))
                    ),
                ]
                for m in methods
            ],
        )
    )
    print("\nBest method per draw (ties listed together):\n")
    rows = []
    for i, t in enumerate(targets):
        best = []
        for s in seeds:
            top = max(acc[m, i, s] for m in methods)
            best.append("+".join(m for m in methods if acc[m, i, s] == top))
        rows.append([f"{t:.0%}", *best])
    print(table(["sparsity", *(f"prune_seed {s}" for s in seeds)], rows))
    print(
        "\nCommand: python benchmarks/bench_oneshot_seeds.py "
        + shlex.join(argv if argv is not None else sys.argv[1:])
    )


if __name__ == "__main__":
    main()
