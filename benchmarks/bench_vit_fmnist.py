#!/usr/bin/env python
"""Small ViT on Fashion-MNIST: AdamW vs M-FAC training, then one-shot pruning (magnitude / oBERT /
M-FAC / CAP).

1. Loads Fashion-MNIST from the idx .gz files with
   ``examples/run_image_classification.load_fashion_mnist`` and takes a fixed random subset
   (``--train_samples`` / ``--test_samples``, ``--data_seed``, default ``--seed``).
2. Trains a small ViT from scratch (``transformers.ViTConfig``) twice at the same budget with
   :class:`hf_mfac.integrations.MFACTrainer`: AdamW and M-FAC (``optim="mfac"``), and evaluates test
   accuracy.
3. Prunes the better dense model one-shot (:func:`hf_mfac.pruning.prune_oneshot`, global
   unstructured) to each sparsity with each method, always from a fresh copy of the dense model, and
   evaluates test accuracy. Targets: the encoder Linear weights (``vit.layers.N.*``); patch
   embedding and classifier stay dense.
4. Prints markdown tables and the exact command.

Example::

    python benchmarks/bench_vit_fmnist.py --train_samples 12000 --test_samples 2000
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, HERE)

from run_image_classification import load_fashion_mnist  # noqa: E402
from _util import machine, table  # noqa: E402

from transformers import ViTConfig, ViTForImageClassification, default_data_collator, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments  # noqa: E402
from hf_mfac.pruning import PRUNERS, FisherCache, prune_oneshot  # noqa: E402
from hf_mfac.pruning.targets import find_prunable  # noqa: E402

ENCODER_LINEARS = r"^vit\.layers\.\d+\."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--train_samples", type=int, default=12000)
    p.add_argument("--test_samples", type=int, default=2000)
    p.add_argument(
        "--seed", type=int, default=0, help="training seed (initialisation, batch order)"
    )
    p.add_argument(
        "--data_seed",
        type=int,
        default=None,
        help="seed of the fixed train/test subsets (default: --seed)",
    )
    p.add_argument("--patch_size", type=int, default=7, choices=[4, 7])
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--intermediate_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--adamw_lr", type=float, default=1e-3)
    p.add_argument("--mfac_lr", type=float, default=1e-2)
    p.add_argument("--mfac_num_grads", type=int, default=32)
    p.add_argument("--methods", default="magnitude,obert,mfac,cap")
    p.add_argument("--sparsities", default="0.5,0.7,0.8")
    p.add_argument("--prune_num_grads", type=int, default=None, help="default: each method's")
    p.add_argument("--fisher_batch", type=int, default=16, help="images per Fisher gradient")
    p.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="Fisher block size for obert and cap (default: theirs)",
    )
    p.add_argument(
        "--mfac_block_size",
        type=int,
        default=None,
        help="block size for mfac pruning (default: its)",
    )
    p.add_argument(
        "--damp", type=float, default=None, help="absolute damping instead of the relative default"
    )
    p.add_argument(
        "--rel_damps",
        default="",
        help="comma list of rel_damp values to sweep (default: each method's)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def transform(image) -> torch.Tensor:
    """A (28, 28) image in [0, 1] -> the normalised (1, 28, 28) input, (x - 0.5) / 0.5."""
    return (torch.as_tensor(image, dtype=torch.float32)[None] - 0.5) / 0.5


class ImageDataset(torch.utils.data.Dataset):
    """(images, labels) -> {"pixel_values": (1, 28, 28), "labels": int}."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": transform(self.images[i]), "labels": int(self.labels[i])}


def subset(images, labels, n, rng):
    idx = rng.permutation(len(labels))[:n]
    return images[idx], labels[idx]


@torch.no_grad()
def accuracy(model, x, y, batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(pixel_values=x[i : i + batch]).logits
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / len(y)


def build_model(args) -> ViTForImageClassification:
    config = ViTConfig(
        image_size=28,
        patch_size=args.patch_size,
        num_channels=1,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def train(args, train_ds, optim: str, lr: float, outdir: str):
    set_seed(args.seed)
    model = build_model(args)
    extra = {"mfac_num_grads": args.mfac_num_grads} if optim == "mfac" else {}
    targs = MFACTrainingArguments(
        output_dir=outdir,
        optim=optim,
        learning_rate=lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )
    trainer = MFACTrainer(
        model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator
    )
    t0 = time.perf_counter()
    out = trainer.train()
    secs = time.perf_counter() - t0
    return trainer.model, secs, float(out.training_loss)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t_all = time.perf_counter()
    command = "python " + " ".join(
        shlex.quote(a)
        for a in [os.path.relpath(__file__, ROOT)] + (sys.argv[1:] if argv is None else list(argv))
    )

    # 1. data
    splits = load_fashion_mnist(args.data_dir)
    rng = np.random.default_rng(args.seed if args.data_seed is None else args.data_seed)
    tr_x, tr_y = subset(*splits["train"], args.train_samples, rng)
    te_x, te_y = subset(*splits["validation"], args.test_samples, rng)
    train_ds = ImageDataset(tr_x, tr_y)
    test_x = torch.stack([transform(im) for im in te_x])
    test_y = torch.as_tensor(te_y)

    # 2. dense training
    dense, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, optim, lr in (
            ("AdamW", "adamw_torch", args.adamw_lr),
            ("M-FAC", "mfac", args.mfac_lr),
        ):
            try:
                model, secs, loss = train(args, train_ds, optim, lr, os.path.join(tmp, name))
                acc = accuracy(model, test_x, test_y)
                note = "" if np.isfinite(loss) else "diverged (non-finite loss)"
            except Exception as e:  # noqa: BLE001  (report, keep going with the other optimizer)
                model, secs, loss, acc, note = (
                    None,
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    f"failed: {e!r}",
                )
            dense.append((name, lr, acc, secs, loss, note))
            if model is not None and np.isfinite(acc):
                models[name] = (acc, model)
            print(
                f"[dense] {name} lr={lr:g}: acc={acc:.4f} train_loss={loss:.4f} {secs:.1f}s {note}",
                flush=True,
            )
    best_name, (best_acc, best) = max(models.items(), key=lambda kv: kv[1][0])

    # 3. one-shot pruning of the better model
    targets = find_prunable(best, include=ENCODER_LINEARS)
    assert all(n.startswith("vit.layers.") for n in targets) and not any(
        "classifier" in n for n in targets
    )
    n_target = sum(t.numel() for t in targets.values())
    n_total = sum(p.numel() for p in best.parameters())
    g = torch.Generator().manual_seed(args.seed)
    n_grads = args.prune_num_grads or max(
        PRUNERS[m].default_num_grads for m in ("obert", "cap", "mfac")
    )
    order = torch.randperm(len(tr_y), generator=g)[: n_grads * args.fisher_batch]
    fx = torch.stack([transform(tr_x[i]) for i in order.tolist()])
    fy = torch.as_tensor(tr_y[order.numpy()])
    fisher_loader = [
        {"pixel_values": fx[i : i + args.fisher_batch], "labels": fy[i : i + args.fisher_batch]}
        for i in range(0, len(fy), args.fisher_batch)
    ]

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    results, times = {}, {}
    rel_damps = [float(r) for r in args.rel_damps.split(",") if r.strip()] or [None]
    rows = [(m, None) for m in methods if m == "magnitude"] + [
        (m, r) for m in methods if m != "magnitude" for r in rel_damps
    ]
    cache = FisherCache()
    for method, rel in rows:
        for s in sparsities:
            model = copy.deepcopy(best)
            kw = dict(method=method, sparsity=s, include=ENCODER_LINEARS, progress=False)
            if method != "magnitude":
                given = dict(
                    num_grads=args.prune_num_grads,
                    damp=args.damp,
                    rel_damp=rel,
                    block_size=args.mfac_block_size if method == "mfac" else args.block_size,
                )
                kw.update({k: v for k, v in given.items() if v is not None}, fisher_cache=cache)
            try:
                _, rep = prune_oneshot(
                    model, fisher_loader if method != "magnitude" else None, **kw
                )
                acc, secs = accuracy(model, test_x, test_y), rep.time_total
                real = sum(
                    int((t == 0).sum())
                    for t in find_prunable(model, include=ENCODER_LINEARS).values()
                )
                print(
                    f"[prune] {method} s={s}: acc={acc:.4f} achieved={real / n_target:.4f} "
                    f"{secs:.1f}s",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                acc, secs = float("nan"), float("nan")
                print(f"[prune] {method} s={s}: failed: {e!r}", flush=True)
            results[(method, rel), s], times[(method, rel), s] = acc, secs
            del model

    # 4. tables
    print("\n## Dense training\n")
    print(
        f"ViT patch {args.patch_size}, hidden {args.hidden_size}, MLP {args.intermediate_size}, "
        f"{args.num_layers} layers, {args.num_heads} heads ({n_total} parameters); Fashion-MNIST "
        f"{args.train_samples} train / {args.test_samples} test (subset seed "
        f"{args.seed if args.data_seed is None else args.data_seed}, training seed {args.seed}); "
        f"{args.epochs:g} epochs, batch {args.batch_size}, M-FAC num_grads "
        f"{args.mfac_num_grads}.\n"
    )
    print(
        table(
            ["optimizer", "lr", "test accuracy", "train loss", "seconds", "note"],
            [
                (n, f"{lr:g}", f"{a:.4f}", f"{lo:.4f}", f"{s:.1f}", note or "-")
                for n, lr, a, s, lo, note in dense
            ],
        )
    )
    print(f"\n## One-shot pruning of the {best_name} model (dense accuracy {best_acc:.4f})\n")

    def label(m, r):
        if m == "magnitude":
            return m
        p = PRUNERS[m]
        return (
            f"{m} (rel_damp {r if r is not None else p.default_rel_damp:g})"
            if args.damp is None
            else m
        )

    print(
        f"Global unstructured, {len(targets)} encoder Linear weights ({n_target} of {n_total} "
        "parameters; "
        f"patch embedding and classifier dense); Fisher gradients of {args.fisher_batch} train "
        "images; "
        f"num_grads {args.prune_num_grads or 'default'}, block {args.block_size or 'default'} "
        "(obert, cap) / "
        f"{args.mfac_block_size or 'default'} (mfac), damping "
        f"{args.damp if args.damp is not None else 'relative'}; "
        "no recomputation. Test accuracy:\n"
    )
    print(
        table(
            ["method"] + [f"{s:g}" for s in sparsities],
            [[label(*r)] + [f"{results[r, s]:.4f}" for s in sparsities] for r in rows],
        )
    )
    print("\nPruning seconds (gradients + solve):\n")
    print(
        table(
            ["method"] + [f"{s:g}" for s in sparsities],
            [[label(*r)] + [f"{times[r, s]:.1f}" for s in sparsities] for r in rows],
        )
    )
    print(f"\nMachine: {machine()}. Total {time.perf_counter() - t_all:.0f}s.")
    print(f"\nCommand: `{command}`")


if __name__ == "__main__":
    main()
