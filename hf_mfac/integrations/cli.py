"""``hf-mfac`` command line. ``hf-mfac prune``: one-shot pruning of a saved sequence-classification model with
a local CSV/TSV/JSON(L) dataset.

```bash
hf-mfac prune path/to/finetuned-model --data train.csv --method obert --sparsity 0.5 0.7 0.9 \
    --num-grads 256 --batch-size 16 --recompute 4 --eval-data dev.csv --output-dir out/pruned
```

The gradients (one per ``--batch-size`` batch, seed 001 §5.1) come from ``--data``; with several sparsities
the run is a sweep (each target continues from the previous masks) and each result goes to
``<output-dir>/sparsity-<s>``. Every result is saved with
:func:`hf_mfac.integrations.save_sparse_pretrained` (dense safetensors with exact zeros that stock
``from_pretrained`` loads, plus the masks and the sparsity record), with the tokenizer and
``pruning_report.json``. ``--eval-data`` prints loss and accuracy before and after.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys

import torch

logger = logging.getLogger("hf_mfac")

__all__ = ["main", "build_parser", "load_table"]


def load_table(path: str) -> list[dict]:
    """Rows of a local ``.csv``/``.tsv`` (header line) or ``.json``/``.jsonl`` (list of records) file."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            return list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
        if ext == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        if ext == ".json":
            data = json.load(f)
            data = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a list of records (or {{'data': [...]}})")
            return data
    raise ValueError(f"{path}: unsupported file type {ext!r}; use .csv, .tsv, .json or .jsonl")


def build_parser() -> argparse.ArgumentParser:
    from ..pruning import PRUNERS

    parser = argparse.ArgumentParser(prog="hf-mfac", description="hf_mfac: second-order optimization and pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="one-shot pruning of a saved sequence-classification model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="folder of a saved model (config, weights, tokenizer)")
    p.add_argument("--data", required=True, help="calibration data: .csv/.tsv/.json/.jsonl with text and labels")
    p.add_argument("--output-dir", required=True, help="where to save the pruned model(s)")
    p.add_argument("--method", default="obert", choices=sorted(PRUNERS))
    p.add_argument("--sparsity", type=float, nargs="+", default=None,
                   help="target sparsity; several values run a sweep (one saved model each)")
    p.add_argument("--pattern", default=None, help="unstructured (default), N:M (e.g. 2:4) or G-block (e.g. 4-block)")
    p.add_argument("--scope", default="global", choices=["global", "layer"])
    p.add_argument("--num-grads", type=int, default=None, help="gradients m (method default)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per gradient (the Fisher mini-batch)")
    p.add_argument("--block-size", type=int, default=None, help="Fisher block size B (method default)")
    p.add_argument("--damp", type=float, default=None, help="dampening λ (method default)")
    p.add_argument("--recompute", type=int, default=1, help="Fisher recomputations per target")
    p.add_argument("--woodtaylor", action="store_true", help="WoodTaylor (first-order term), obert/mfac")
    p.add_argument("--include", nargs="+", default=None, help="regexes of module names to prune")
    p.add_argument("--exclude", nargs="+", default=None, help="regexes of module names to keep dense")
    p.add_argument("--text-column", default=None, help="text column (default: sentence/text/first text column)")
    p.add_argument("--text-pair-column", default=None, help="second text column for pair tasks")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-data", default=None, help="file to report loss/accuracy before and after")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return parser


def _text_columns(rows, text_col, pair_col, label_col):
    if not rows:
        raise ValueError("the data file has no rows")
    cols = list(rows[0])
    if label_col not in cols:
        raise ValueError(f"label column {label_col!r} not found; columns: {cols}")
    if text_col is None:
        for c in ("sentence", "text", "sentence1", "question", "premise", "tweet"):
            if c in cols:
                text_col = c
                break
        else:
            text_col = next((c for c in cols if c != label_col and isinstance(rows[0][c], str)), None)
    for c in (text_col, pair_col):
        if c is not None and c not in cols:
            raise ValueError(f"column {c!r} not found; columns: {cols}")
    if text_col is None:
        raise ValueError(f"no text column found; give --text-column (columns: {cols})")
    return text_col, pair_col


def _label_fn(config, rows, label_col):
    values = [r[label_col] for r in rows]
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    named = label2id and not all(k.startswith("LABEL_") for k in label2id)
    if named and all(str(v) in label2id for v in values):
        return lambda v: label2id[str(v)]
    try:
        ints = [int(v) for v in values]
    except (TypeError, ValueError):
        names = sorted({str(v) for v in values})
        if len(names) != config.num_labels:
            raise ValueError(f"labels {names[:10]} cannot be mapped onto the model's {config.num_labels} classes "
                             "(its config has no matching label2id)") from None
        mapping = {n: i for i, n in enumerate(names)}
        logger.warning("labels mapped in sorted order: %s", mapping)
        return lambda v: mapping[str(v)]
    if min(ints) < 0 or max(ints) >= config.num_labels:
        raise ValueError(f"integer labels must lie in [0, {config.num_labels})")
    return int


def _batches(rows, tokenizer, cols, label_of, label_col, batch_size, max_length, shuffle, seed):
    from transformers import DataCollatorWithPadding

    rows = list(rows)
    if shuffle:
        random.Random(seed).shuffle(rows)
    collate = DataCollatorWithPadding(tokenizer)
    text, pair = cols
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        enc = tokenizer([r[text] for r in chunk], [r[pair] for r in chunk] if pair else None, truncation=True,
                        max_length=max_length)
        feats = [{k: enc[k][i] for k in enc} for i in range(len(chunk))]
        batch = collate(feats)
        batch["labels"] = torch.tensor([label_of(r[label_col]) for r in chunk])
        out.append(dict(batch))
    return out


@torch.no_grad()
def _evaluate(model, batches, device) -> dict:
    model.eval()
    loss = correct = n = 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = model(**b)
        loss += float(out.loss) * len(b["labels"])
        correct += int((out.logits.argmax(-1) == b["labels"]).sum())
        n += len(b["labels"])
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1)}


def prune_command(args) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..pruning import DEFAULT_EXCLUDE, prune_sweep
    from .sparse_checkpoint import save_sparse_pretrained

    if not os.path.isdir(args.model):
        raise ValueError(f"{args.model} is not a folder with a saved model")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).to(device)
    rows = load_table(args.data)
    cols = _text_columns(rows, args.text_column, args.text_pair_column, args.label_column)
    label_of = _label_fn(model.config, rows, args.label_column)
    calib = _batches(rows, tokenizer, cols, label_of, args.label_column, args.batch_size, args.max_length, True,
                     args.seed)
    evalb = None
    if args.eval_data:
        erows = load_table(args.eval_data)
        evalb = _batches(erows, tokenizer, _text_columns(erows, *cols, args.label_column), label_of,
                         args.label_column, args.eval_batch_size, args.max_length, False, 0)
        before = _evaluate(model, evalb, device)
        print(f"dense: eval loss {before['loss']:.4f}, accuracy {before['accuracy']:.4f}")
    sparsities = args.sparsity or ([None] if args.pattern and ":" in args.pattern else None)
    if not sparsities:
        raise ValueError("give --sparsity (one value, or several for a sweep)")
    sweep = len(sparsities) > 1
    records = []

    def save(s, model, masks, report):
        out = os.path.join(args.output_dir, f"sparsity-{s:.2f}") if sweep else args.output_dir
        os.makedirs(out, exist_ok=True)
        rec = {"target": s, "sparsity": report.sparsity, "loss_increase": report.loss_increase,
               "time": report.time_total, "grad_share": report.grad_share}
        if evalb is not None:
            rec.update({f"eval_{k}": v for k, v in _evaluate(model, evalb, device).items()})
        recipe = {k: v for k, v in vars(args).items() if k not in ("model", "data", "output_dir", "eval_data")}
        save_sparse_pretrained(model, out, masks, method=args.method, pattern=args.pattern, recipe=recipe)
        tokenizer.save_pretrained(out)
        with open(os.path.join(out, "pruning_report.json"), "w") as f:
            json.dump({**report.to_dict(), **rec}, f, indent=2)
        records.append(rec)
        extra = f", eval loss {rec['eval_loss']:.4f}, accuracy {rec['eval_accuracy']:.4f}" if evalb else ""
        print(f"{args.method} -> {out}: sparsity {report.sparsity:.4f}{extra}")

    kwargs = dict(method=args.method, num_grads=args.num_grads, block_size=args.block_size, damp=args.damp,
                  recompute=args.recompute, scope=args.scope, pattern=args.pattern, woodtaylor=args.woodtaylor,
                  include=args.include, exclude=args.exclude if args.exclude is not None else DEFAULT_EXCLUDE,
                  progress=not args.no_progress)
    if sparsities == [None]:
        from ..pruning import prune_oneshot

        res = prune_oneshot(model, calib, sparsity=None, **kwargs)
        save(res.report.sparsity, model, res.masks, res.report)
    else:
        prune_sweep(model, calib, sparsities, save_fn=save, **kwargs)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``hf-mfac`` script. Returns the exit status (errors in the inputs: 2, with a message)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prune":
            return prune_command(args)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"hf-mfac {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
