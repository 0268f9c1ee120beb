#!/usr/bin/env python
"""M-FAC against AdamW on the main job's tweets task over several training seeds.

Runs ``examples/main_job.py --methods "" --skip_gradual`` (fine-tuning only, no pruning) once per
seed in ``--seeds``, with the train/eval split fixed (``--split_seed 0``: the same 3000 train / 1000
eval tweets in every run) so that only the head initialisation, batch order and dropout change. Each
run writes ``<output_dir>/seed<S>/results.json``; this script reads them back and prints a markdown
table with each seed and the mean and sample standard deviation per optimizer, plus the command.

Example (about 3 min per seed on an idle 2-core CPU)::

    python benchmarks/bench_tweets_seeds.py --seeds 0,1,2 --output_dir outputs/tweets_seeds

Extra arguments after ``--`` go to main_job.py (e.g. ``-- --mfac_lr 1e-2``).
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
    results = {s: r["dense"] for s, r in main_job_seeds(
        argv, __doc__, flag="seeds", default_dir="outputs/tweets_seeds", folder="seed",
        job_args=lambda s: ["--seed", str(s), "--split_seed", "0", "--methods", "",
                            "--skip_gradual"]).items()}
    names = sorted({k for r in results.values() for k in r})
    rows = []
    for seed, r in results.items():
        rows.append([seed, *(f"{r[n]['accuracy']:.3f}" if n in r else "n/a" for n in names)])
    for label, fn in (("mean", statistics.mean), ("std", statistics.stdev)):
        if len(results) > 1 or label == "mean":
            rows.append(
                [label, *(f"{fn([r[n]['accuracy'] for r in results.values()]):.3f}" for n in names)]
            )
    lrs = {n: next(r[n]["lr"] for r in results.values() if n in r) for n in names}
    print(f"\nMachine: {machine()}; {(time.time() - t0) / 60:.1f} min")
    print(f"Learning rates: {', '.join(f'{n} {lr:g}' for n, lr in lrs.items())}\n")
    print(table(["seed", *(f"{n} accuracy" for n in names)], rows))
    diffs = [
        r["mfac"]["accuracy"] - r["adamw"]["accuracy"]
        for r in results.values()
        if {"mfac", "adamw"} <= set(r)
    ]
    if diffs:
        print(f"\nM-FAC minus AdamW per seed: {', '.join(f'{d:+.3f}' for d in diffs)}")
    print(
        "\nCommand: python benchmarks/bench_tweets_seeds.py "
        + shlex.join(argv if argv is not None else sys.argv[1:])
    )


if __name__ == "__main__":
    main()
