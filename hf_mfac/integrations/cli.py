"""``hf-mfac`` command line: its parser, the checks of its inputs before any model is loaded, and
its commands.

``hf-mfac prune``: one-shot pruning of a saved sequence-classification model with a local
CSV/TSV/JSON(L) dataset. Its options are :class:`PruneCommandArguments` (data, output, evaluation)
and every field of :class:`~hf_mfac.pruning.PruningConfig` (the pruning settings, with the same
names, defaults and help as ``prune_oneshot``'s keywords and the examples' ``--prune_*`` flags),
both parsed by ``transformers.HfArgumentParser`` (``--num_grads`` and ``--num-grads`` both work).

```bash
hf-mfac prune path/to/finetuned-model --data train.csv --method obert --sparsities 0.5 0.7 0.9 \
    --num_grads 256 --batch_size 16 --recompute 4 --eval_data dev.csv --output_dir out/pruned
```

The gradients (one per ``--batch_size`` batch) come from ``--data`` (read with ``datasets``,
``--encoding`` for files that are not UTF-8); with ``--sparsities`` the run is a sweep (each target
continues from the previous masks) and each result goes to ``<output_dir>/sparsity-<s>``. Every
result folder is written whole (:func:`save_prune_result`):
:func:`hf_mfac.integrations.save_sparse_pretrained` (dense safetensors with exact zeros that stock
``from_pretrained`` loads, plus the masks and the sparsity record), the tokenizer,
``pruning_report.json`` and a model card (``README.md`` and its plot,
:func:`hf_mfac.integrations.create_sparse_model_card`) go into one staging folder that is moved into
place, so Ctrl-C leaves each folder either as it was or complete. ``--eval_data`` prints loss and
accuracy before and after. The inputs are checked before the model is loaded: the settings; the
model folder; every output folder (not the model folder itself, whatever the spelling: symlinks,
relative paths and trailing slashes are resolved; not an existing file; under a writable folder);
the data files (present, files, readable), their columns and labels. A refused input exits with
status 2 and ``hf-mfac prune: error: ...``.

``hf-mfac build-kernels``: build and self-check the CUDA kernels for every visible GPU
(:func:`hf_mfac.kernels.build_kernels`), printing the report as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("hf_mfac")

__all__ = ["main", "build_parser", "PruneCommandArguments", "load_data", "save_prune_result"]

_TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "premise", "tweet")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


@dataclass
class PruneCommandArguments:
    """What ``hf-mfac prune`` reads and writes (the pruning settings are
    :class:`~hf_mfac.pruning.PruningConfig`)."""

    data: str = field(metadata={
        "help": "Calibration data for the gradients: a .csv/.tsv/.json/.jsonl file with a text and "
                "a label column."})
    output_dir: str = field(metadata={
        "help": "Where to save the pruned model (a sweep: one sparsity-<s> folder per target)."})
    encoding: str = field(default="utf-8", metadata={
        "help": "Text encoding of .csv/.tsv files, e.g. latin-1 (JSON is always UTF-8)."})
    text_column: str | None = field(default=None, metadata={
        "help": "Text column; None: the first of sentence, text, sentence1, question, premise, "
                "tweet, else the first "
                "text column."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column, for "
                                                                         "pair tasks."})
    label_column: str = field(default="label", metadata={
        "help": "Label column: class ids, or names found in the model's label2id (else mapped in "
                "sorted order)."})
    batch_size: int = field(default=16, metadata={
        "help": "Samples per calibration batch (one gradient per batch unless --fisher_batch_size "
                "or --per_sample)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per sample; longer texts are "
                                                           "truncated."})
    eval_data: str | None = field(default=None, metadata={
        "help": "A file (same layout as --data) to report loss and accuracy on before and after "
                "pruning."})
    eval_batch_size: int = field(default=64, metadata={"help": "Samples per evaluation batch."})
    device: str | None = field(default=None, metadata={
        "help": "Where the model lives: cpu, cuda, cuda:1 ...; None: cuda when available (the "
                "Fisher too, unless --fisher_device)."})
    device_map: str | None = field(default=None, metadata={
        "help": "Load the model dispatched by accelerate over the GPUs and the CPU: auto, "
                "balanced, balanced_low_0 or sequential (from_pretrained's device_map); each "
                "target's gradients and Fisher blocks then stay on its weight's device (layers "
                "accelerate offloads to the CPU are refused: the model must fit the GPUs; spread "
                "the Fisher with --fisher_device). Not with --device."})
    fisher_device: str | None = field(default=None, metadata={
        "help": "Where the Fisher blocks live: one device (cuda:1), several (cuda:0,cuda:1,cpu) "
                "or auto (the visible GPUs by free memory, then the CPU); None: the model's "
                "device (each weight's device with --device_map)."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration batches' order."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar over the "
                                                               "gradients."})

    def __post_init__(self):
        for name in ("batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer; got {getattr(self, name)}")


def build_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    from .. import __version__
    from ..pruning import PruningConfig

    parser = argparse.ArgumentParser(prog="hf-mfac", description="hf_mfac: second-order "
                                                                 "optimization and pruning")
    parser.add_argument("--version", action="version", version=f"hf-mfac {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    p = sub.add_parser("prune", dataclass_types=[PruneCommandArguments, PruningConfig],
                       help="one-shot pruning of a saved sequence-classification model",
                       description="One-shot pruning of a saved sequence-classification model with "
                                   "local data.")
    p.add_argument("model", help="folder of a saved model (config.json, weights, tokenizer)")
    sub.add_parser("build-kernels", help="build and self-check the CUDA kernels for every visible "
                                         "GPU",
                   description="Build (or load from the cache) and self-check hf_mfac's CUDA "
                               "kernels for every "
                               "visible GPU; prints the report as JSON. Exit status 1 when a "
                               "visible GPU has no "
                               "working build.")
    return parser


def _dataclasses_from(ns: argparse.Namespace, *types):
    return [t(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(t)}) for t in types]


# -- checks before loading
# -------------------------------------------------------------------------------
def check_model_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder with a saved model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json: not a saved transformers model")
    if not any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHTS) and not glob.glob(
            os.path.join(path, "model-*.safetensors")):
        raise ValueError(f"{path} has no weights ({', '.join(_WEIGHTS[:2])} or shards)")
    if not any(os.path.isfile(os.path.join(path, t)) for t in _TOKENIZER):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER[:3])}...): save "
                         "the tokenizer next "
                         "to the model (tokenizer.save_pretrained(folder))")


def _result_folders(args: PruneCommandArguments, config) -> list[str]:
    """The folders a run writes: ``output_dir``, or ``output_dir/sparsity-<s>`` per target of a
    sweep."""
    if not config.sparsities:
        return [args.output_dir]
    return [os.path.join(args.output_dir, f"sparsity-{s:.2f}") for s in config.sparsities]


def check_output_folders(model_path: str, folders: list[str]) -> None:
    """Refuse, before any work, output folders that would write over the model's own files or that
    cannot be written: a result folder that is the model folder (a subfolder of it is fine: a save
    only replaces the entries it writes), a path that exists and is not a folder, or one whose
    nearest existing parent is not a writable folder. Symlinks, relative paths and trailing slashes
    are resolved first."""
    model = os.path.realpath(model_path)
    for folder in folders:
        real = os.path.realpath(folder)
        if real == model:
            raise ValueError(f"output folder {folder} is the model folder {model_path}: saving "
                             "there would overwrite the model being pruned; choose another folder "
                             "(a subfolder is fine)")
        if os.path.exists(real) and not os.path.isdir(real):
            raise ValueError(f"output folder {folder} exists and is not a folder (--output_dir)")
        parent = real
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"output folder {folder}: {parent} is a file, not a folder "
                             "(--output_dir)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"output folder {folder}: {parent} is not writable (--output_dir)")


def check_data_file(path: str, flag: str) -> None:
    """A data file that exists, is a file and can be read (``ValueError`` naming ``flag``
    otherwise)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be read: {e.strerror or e}") from None


def _unicode_error(e: BaseException) -> UnicodeDecodeError | None:
    while e is not None:
        if isinstance(e, UnicodeDecodeError):
            return e
        e = e.__cause__ or e.__context__
    return None


def load_data(path: str, encoding: str = "utf-8"):
    """A local .csv/.tsv/.json/.jsonl file as a ``datasets.Dataset`` (the datasets csv/json
    builders)."""
    import datasets

    check_data_file(path, "data file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported file type {ext!r}; use .csv, .tsv, .json or .jsonl")
    if ext in (".json", ".jsonl"):
        builder, kwargs = "json", {}
    else:
        builder, kwargs = (
            "csv",
            {"encoding": encoding, **({"delimiter": "\t"} if ext == ".tsv" else {})},
        )
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as e:  # the csv builder wraps the codec error in a DatasetGenerationError
        bad = _unicode_error(e)
        if bad is None:
            raise
        raise ValueError(
            f"{path} is not valid {encoding} (byte "
            f"{bad.object[bad.start : bad.start + 1]!r} at "
            f"position {bad.start}); pass --encoding with the file's encoding, e.g. "
            "--encoding "
            "latin-1"
        ) from None
    if len(ds) == 0:
        raise ValueError(f"{path} has no rows")
    return ds


def text_columns(ds, text_col, pair_col, label_col, path: str) -> tuple[str, str | None]:
    cols = ds.column_names
    if label_col not in cols:
        raise ValueError(
            f"{path}: label column {label_col!r} not found; columns: {cols} (--label_column)"
        )
    if text_col is None:
        strings = [
            c
            for c in cols
            if c != label_col
            and getattr(ds.features[c], "dtype", None) in ("string", "large_string")
        ]
        text_col = next((c for c in _TEXT_COLUMNS if c in cols), strings[0] if strings else None)
    if text_col is None:
        raise ValueError(f"{path}: no text column found; give --text_column (columns: {cols})")
    for c in (text_col, pair_col):
        if c is not None and c not in cols:
            raise ValueError(f"{path}: column {c!r} not found; columns: {cols}")
    return text_col, pair_col


def label_mapping(config, values, label_col: str):
    """``value -> class id`` for the label column's values: the model's label2id for names, else
    ints, else the sorted names (with a warning)."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    named = label2id and not all(k.startswith("LABEL_") for k in label2id)
    if named and all(str(v) in label2id for v in values):
        return lambda v: label2id[str(v)]
    try:
        ints = sorted({int(v) for v in values})
    except (TypeError, ValueError):
        names = sorted({str(v) for v in values})
        if len(names) != config.num_labels:
            raise ValueError(
                f"labels {names[:10]} of {label_col!r} cannot be mapped onto the "
                "model's "
                f"{config.num_labels} classes (its config has no matching label2id)"
            ) from None
        mapping = {n: i for i, n in enumerate(names)}
        logger.warning("labels mapped in sorted order: %s", mapping)
        return lambda v: mapping[str(v)]
    if ints[0] < 0 or ints[-1] >= config.num_labels:
        raise ValueError(f"integer labels must lie in [0, {config.num_labels})")
    return int


# -- the command
# -----------------------------------------------------------------------------------------
def _loader(ds, tokenizer, cols, label_of, label_col, batch_size, max_length, shuffle, seed):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    text, pair = cols

    def encode(rows):
        enc = tokenizer(
            rows[text], rows[pair] if pair else None, truncation=True, max_length=max_length
        )
        enc["labels"] = [label_of(v) for v in rows[label_col]]
        return enc

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


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


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _fisher_spec(args: PruneCommandArguments):
    """``--fisher_device`` as ``prune_oneshot(device=...)`` takes it: None, "auto", one device or a
    list."""
    spec = args.fisher_device
    if spec is None or spec.strip().lower() == "auto":
        return spec
    names = [d.strip() for d in spec.split(",") if d.strip()]
    return names if len(names) > 1 else (names[0] if names else spec)


def _check_devices(args: PruneCommandArguments) -> None:
    """--device, --device_map and --fisher_device name devices that exist here (else ValueError)."""
    from ..pruning.placement import check_device, parse_fisher_device

    if args.device is not None and args.device_map is not None:
        raise ValueError(
            "give --device (the whole model on one device) or --device_map (dispatched by "
            "accelerate), not both"
        )
    if args.device is not None:
        check_device(args.device, "--device")
    if args.device_map is not None and args.device_map not in _DEVICE_MAPS:
        raise ValueError(
            f"--device_map {args.device_map!r} is not one of {', '.join(_DEVICE_MAPS)}"
        )
    try:
        parse_fisher_device(_fisher_spec(args))
    except ValueError as e:
        raise ValueError(f"--fisher_device: {e}") from None


def _check_prune_inputs(model_path: str, args: PruneCommandArguments, config):
    """(calibration data, (text, pair) columns, evaluation data or None, label -> class id):
    everything that can be checked before loading the model (the settings, the model folder, the
    data files, their columns and labels)."""
    from transformers import AutoConfig

    from ..pruning import Pattern

    nm = Pattern.parse(config.pattern).kind == "nm"
    if config.sparsity is None and not config.sparsities and not nm:
        raise ValueError(
            "give --sparsity (one target) or --sparsities (a sweep), or an N:M --pattern"
        )
    if config.method is None:
        raise ValueError("give --method")
    _check_devices(args)
    check_model_folder(model_path)
    check_output_folders(model_path, _result_folders(args, config))
    check_data_file(args.data, "--data")
    if args.eval_data:
        check_data_file(args.eval_data, "--eval_data")
    data = load_data(args.data, args.encoding)
    cols = text_columns(data, args.text_column, args.text_pair_column, args.label_column, args.data)
    eval_data = None
    if args.eval_data:
        eval_data = load_data(args.eval_data, args.encoding)
        text_columns(eval_data, *cols, args.label_column, args.eval_data)
    labels = list(data[args.label_column]) + (
        list(eval_data[args.label_column]) if eval_data is not None else []
    )
    label_of = label_mapping(AutoConfig.from_pretrained(model_path), labels, args.label_column)
    return data, cols, eval_data, label_of


def save_prune_result(
    out: str,
    model,
    masks,
    report: dict,
    *,
    tokenizer,
    method,
    pattern,
    recipe,
    command: str,
    eval_results: dict | None = None,
    dataset_name: str | None = None,
) -> None:
    """Write one result folder whole: the sparse checkpoint (:func:`save_sparse_pretrained`), the
    tokenizer, ``pruning_report.json`` (``report``), and the model card with its plot (an existing
    ``README.md`` is updated, not replaced), all into one staging folder moved into place by
    :func:`~hf_mfac.integrations.checkpoint.staged_save`: an exception, ``KeyboardInterrupt``
    included, leaves ``out`` as it was (absent, or the previous result), never half written."""
    from .card.model_card import CardFields, create_sparse_model_card
    from .checkpoint.files import is_checkpoint_file
    from .checkpoint.sparse import log_saved, save_sparse_pretrained
    from .checkpoint.staging import staged_save

    with staged_save(out, stale=is_checkpoint_file) as stage:
        meta = save_sparse_pretrained(
            model, stage, masks, method=method, pattern=pattern, recipe=recipe, _log=False
        )
        tokenizer.save_pretrained(stage)
        with open(os.path.join(stage, "pruning_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        readme = os.path.join(out, "README.md")
        if os.path.isfile(readme):
            shutil.copy2(readme, os.path.join(stage, "README.md"))
        card = CardFields(
            model_name=os.path.basename(os.path.normpath(out)),
            method=method,
            recipe=recipe,
            command=command,
            eval_results=eval_results,
            dataset_name=dataset_name,
        )
        create_sparse_model_card(stage, card, model=model, sparsity=meta)
    log_saved(out, meta)


def _result_saver(args: PruneCommandArguments, config, argv: list[str], tokenizer, evalb, device):
    """The run's ``save_fn(s, model, masks, report)``: each result goes to ``output_dir`` (a sweep:
    ``sparsity-<s>``) through :func:`save_prune_result` (evaluated on ``evalb`` when given), and one
    line is printed."""
    sweep = bool(config.sparsities)
    recipe = {
        **{k: v for k, v in config.to_dict().items() if v is not None},
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
    }
    command = shlex.join(["hf-mfac", *argv])

    def save(s, model, masks, report):
        out = os.path.join(args.output_dir, f"sparsity-{s:.2f}") if sweep else args.output_dir
        rec = {
            "target": s,
            "sparsity": report.sparsity,
            "loss_increase": report.loss_increase,
            "time": report.time_total,
            "grad_share": report.grad_share,
        }
        if evalb is not None:
            rec.update({f"eval_{k}": v for k, v in _evaluate(model, evalb, device).items()})
        results = {k[5:]: v for k, v in rec.items() if k.startswith("eval_")} or None
        save_prune_result(
            out,
            model,
            masks,
            {**report.to_dict(), **rec},
            tokenizer=tokenizer,
            method=config.method,
            pattern=config.pattern,
            recipe=recipe,
            command=command,
            eval_results=results,
            dataset_name=os.path.basename(args.eval_data) if results else None,
        )
        extra = (
            f", eval loss {rec['eval_loss']:.4f}, accuracy {rec['eval_accuracy']:.4f}"
            if evalb
            else ""
        )
        print(f"{config.method} -> {out}: sparsity {report.sparsity:.4f}{extra}")

    return save


def prune_command(model_path: str, args: PruneCommandArguments, config, argv: list[str]) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..pruning import prune_oneshot, prune_sweep

    data, cols, eval_data, label_of = _check_prune_inputs(model_path, args, config)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.device_map is not None:  # accelerate's hooks move the inputs where each layer is
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, device_map=args.device_map)
        device = next(model.parameters()).device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device)
    calib = _loader(
        data,
        tokenizer,
        cols,
        label_of,
        args.label_column,
        args.batch_size,
        args.max_length,
        True,
        args.seed,
    )
    evalb = None
    if eval_data is not None:
        evalb = _loader(
            eval_data,
            tokenizer,
            cols,
            label_of,
            args.label_column,
            args.eval_batch_size,
            args.max_length,
            False,
            0,
        )
        before = _evaluate(model, evalb, device)
        print(f"dense: eval loss {before['loss']:.4f}, accuracy {before['accuracy']:.4f}")
    save = _result_saver(args, config, argv, tokenizer, evalb, device)
    kwargs = {**config.oneshot_kwargs(), "progress": not args.no_progress}
    if args.fisher_device is not None:
        kwargs["device"] = _fisher_spec(args)
    if config.sparsities:  # a sweep
        prune_sweep(model, calib, config.sparsities, save_fn=save, **kwargs)
    else:
        res = prune_oneshot(model, calib, **kwargs)
        save(res.report.sparsity, model, res.masks, res.report)
    return 0


def build_kernels_command() -> int:
    from ..kernels import build_kernels

    report = build_kernels(verbose=True)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("ok") or not report.get("gpu") else 1


def main(argv=None) -> int:
    """Entry point of the ``hf-mfac`` script. Returns the exit status (errors in the inputs: 2, with
    a message)."""
    from .log_level import follow_log_level

    follow_log_level(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        # --help, --version and unknown options exit here, as argparse does
        ns = parser.parse_args(argv)
        if ns.command == "prune":
            from ..pruning import PruningConfig

            args, config = _dataclasses_from(ns, PruneCommandArguments, PruningConfig)
            return prune_command(ns.model, args, config, argv)
        if ns.command == "build-kernels":
            return build_kernels_command()
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"hf-mfac {command or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
