#!/usr/bin/env python
# Copyright 2020 The HuggingFace Inc. team. Copyright 2026 the hf_mfac authors.
# Licensed under the Apache License, Version 2.0.
"""Fine-tune a model for sequence classification on GLUE-style data from local CSV/JSON files, with M-FAC.

Port of transformers' ``examples/pytorch/text-classification/run_glue.py`` (5.x) that

* reads local files only (``--train_file``/``--validation_file``/``--test_file``, ``.csv``, ``.tsv``,
  ``.json``/``.jsonl``) with the datasets "csv"/"json" builders, or with the standard library when
  ``datasets`` is not installed;
* uses the GLUE column layout of ``--task_name`` (``sentence``, ``sentence1``/``sentence2``, ``question``...),
  or ``--text_column_names``/``--label_column_name`` for any other table;
* computes the GLUE metrics locally (accuracy, F1, Matthews, Pearson/Spearman): ``evaluate.load`` needs the Hub;
* parses :class:`hf_mfac.integrations.MFACTrainingArguments` and trains with
  :class:`hf_mfac.integrations.MFACTrainer`, so ``--optim mfac`` (with ``--mfac_num_grads``, ``--mfac_damp``,
  ``--optim_args``...) works, and every stock ``--optim`` still does;
* parses :class:`hf_mfac.integrations.PruningArguments` as run_qa.py does: ``--prune_method obert
  --prune_sparsity 0.8 --prune_end 2 --prune_unit epochs ...`` prunes gradually during training (add
  ``--distill_teacher self`` for distillation from the dense starting model), ``--prune_mode oneshot`` prunes
  before training; the pruned model is saved with :func:`hf_mfac.integrations.save_sparse_pretrained`.

Example (see examples/README.md)::

    python examples/run_glue.py --model_name_or_path path/to/bert --task_name sst2 \
        --train_file sst2/train.csv --validation_file sst2/dev.csv --do_train --do_eval \
        --optim mfac --mfac_num_grads 1024 --learning_rate 1e-4 --output_dir out/sst2
"""
import contextlib
import csv
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np

import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments
from hf_mfac.integrations.callbacks import DistillationMixin, PruningArguments

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on. Local files only."""

    task_name: str | None = field(
        default=None,
        metadata={"help": "GLUE task whose column layout and metric to use: " + ", ".join(task_to_keys)},
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv/tsv/json(l) file with the training data."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv/tsv/json(l) file with the validation data."})
    test_file: str | None = field(default=None, metadata={"help": "A csv/tsv/json(l) file with the test data."})
    validation_split_percentage: int | None = field(
        default=None,
        metadata={"help": "Without --validation_file: hold out this percentage of the training file "
                          "(fixed split, seeded by --seed) as validation data."},
    )
    text_column_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated text columns (one or two), e.g. 'text' or 'sentence1,sentence2'. "
                          "Default: the task's columns, else sentence1/sentence2, else the first non-label columns."},
    )
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})
    file_encoding: str = field(default="utf-8", metadata={"help": "Text encoding of csv/tsv files (e.g. latin-1)."})
    max_seq_length: int = field(
        default=128,
        metadata={"help": "The maximum total input sequence length after tokenization; longer ones are truncated."},
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad all samples to `max_seq_length`; if False, pad dynamically per batch."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set to this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set to this size."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test set to this size."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys:
                raise ValueError("Unknown task, you should pick one in " + ",".join(task_to_keys))
        if self.train_file is None and self.validation_file is None and self.test_file is None:
            raise ValueError("Need a --train_file, --validation_file or --test_file (local files only).")


@dataclass
class ModelArguments:
    """Which model/config/tokenizer to fine-tune from (local paths; no Hub access is needed)."""

    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model (or a cached Hub identifier)."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache models and datasets."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a classification head with a different number of labels."}
    )


# ---- data ---------------------------------------------------------------------------------------------------
class _Table:
    """The few ``datasets.Dataset`` methods this script uses, over a dict of columns (no ``datasets`` needed)."""

    def __init__(self, columns: dict):
        self.columns = columns

    @property
    def column_names(self):
        return list(self.columns)

    def __len__(self):
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}

    def unique(self, name):
        return list(dict.fromkeys(self.columns[name]))

    def select(self, indices):
        return _Table({k: [v[i] for i in indices] for k, v in self.columns.items()})

    def remove_columns(self, names):
        names = [names] if isinstance(names, str) else names
        return _Table({k: v for k, v in self.columns.items() if k not in names})

    def map(self, fn, batched=True, **_):
        return _Table({**self.columns, **dict(fn(self.columns))})


def _read_rows(path: str, encoding: str) -> list[dict]:
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        if text.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))


def _typed(values: list) -> list:
    """CSV cells are strings: make a column of ints or floats when every cell parses (as the csv builder does)."""
    if not values or not all(isinstance(v, str) for v in values):
        return values
    for cast in (int, float):
        with contextlib.suppress(ValueError):  # not all of this type: try the next
            return [cast(v) for v in values]
    return values


def load_local_splits(data_files: dict, encoding: str = "utf-8", cache_dir=None) -> dict:
    """{split: path} -> {split: Dataset}, with the datasets csv/json builders, else the standard library."""
    ext = next(iter(data_files.values())).rsplit(".", 1)[-1].lower()
    try:
        import datasets
    except ImportError:
        splits = {}
        for split, path in data_files.items():
            rows = _read_rows(path, encoding)
            splits[split] = _Table({k: _typed([r.get(k) for r in rows]) for k in (rows[0] if rows else {})})
        return splits
    if ext in ("json", "jsonl"):
        return datasets.load_dataset("json", data_files=data_files, cache_dir=cache_dir)
    kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
    return datasets.load_dataset("csv", data_files=data_files, cache_dir=cache_dir, encoding=encoding, **kwargs)


def encode_string_labels(raw_datasets: dict, label_key: str) -> dict:
    """A string label column (positive, negative...) as a ``ClassLabel`` over the sorted names of all splits,
    cast before tokenising: ``map`` writing integer ids into a string column keeps its string type, and the
    collator then fails with "too many dimensions 'str'"."""
    import datasets

    splits = {k: ds for k, ds in raw_datasets.items() if isinstance(ds, datasets.Dataset) and label_key in ds.features}
    if not splits or any(getattr(ds.features[label_key], "dtype", None) not in ("string", "large_string")
                         for ds in splits.values()):
        return raw_datasets
    names = sorted({v for ds in splits.values() for v in ds.unique(label_key) if v is not None})
    label = datasets.ClassLabel(names=names)
    return {k: ds.cast_column(label_key, label) if k in splits else ds for k, ds in raw_datasets.items()}


class GlueTrainer(DistillationMixin, MFACTrainer):
    """``MFACTrainer`` with optional distillation from a dense teacher (``--distill_teacher``)."""


# ---- metrics ------------------------------------------------------------------------------------------------
def glue_metrics(task: str | None, preds: np.ndarray, labels: np.ndarray, is_regression: bool) -> dict:
    """The GLUE metric of ``task`` computed locally (same definitions as ``evaluate.load("glue", task)``)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if is_regression:
        out = {"mse": float(((preds - labels) ** 2).mean())}
        if task == "stsb" or task is None:
            out.update(pearson=float(pearsonr(preds, labels)[0]), spearmanr=float(spearmanr(preds, labels)[0]))
        return out
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    out = {"accuracy": float((preds == labels).mean())}
    if task in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, preds))
    elif task is None:  # any table: macro F1 over the classes present
        out["f1_macro"] = float(f1_score(labels, preds, average="macro"))
    return out


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MFACTrainingArguments, PruningArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args, prune_args = parser.parse_json_file(
            json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args, prune_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}, optimizer: {training_args.optim}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    set_seed(training_args.seed)

    # Local files only. Labels are read from --label_column_name; texts from the task's columns.
    data_files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file),
                                    ("test", data_args.test_file)) if v is not None}
    for split, path in data_files.items():
        logger.info(f"load a local file for {split}: {path}")
    raw_datasets = dict(load_local_splits(data_files, data_args.file_encoding, model_args.cache_dir))
    label_key = data_args.label_column_name
    if data_args.validation_split_percentage and "validation" not in raw_datasets:
        train = raw_datasets["train"]
        order = np.random.default_rng(training_args.seed).permutation(len(train)).tolist()
        n_val = len(train) * data_args.validation_split_percentage // 100
        raw_datasets["validation"], raw_datasets["train"] = train.select(order[:n_val]), train.select(order[n_val:])

    raw_datasets = encode_string_labels(raw_datasets, label_key)
    reference = raw_datasets.get("train", raw_datasets.get("validation"))
    first_label = reference[0][label_key]
    is_regression = data_args.task_name == "stsb" or (data_args.task_name is None and isinstance(first_label, float))
    class_names = getattr(getattr(reference, "features", {}).get(label_key), "names", None)
    if is_regression:
        num_labels, label_list = 1, None
    elif class_names is not None:  # a ClassLabel column holds the ids; its names become the model's labels
        label_list = class_names
        num_labels = len(label_list)
    else:
        label_list = sorted(reference.unique(label_key), key=str)
        num_labels = len(label_list)

    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    if data_args.text_column_names is not None:
        keys = [k.strip() for k in data_args.text_column_names.split(",")]
        sentence1_key, sentence2_key = keys[0], (keys[1] if len(keys) > 1 else None)
    elif data_args.task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[data_args.task_name]
    else:
        non_label_column_names = [name for name in reference.column_names if name != label_key]
        if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif len(non_label_column_names) >= 2:
            sentence1_key, sentence2_key = non_label_column_names[:2]
        else:
            sentence1_key, sentence2_key = non_label_column_names[0], None

    padding = "max_length" if data_args.pad_to_max_length else False
    label_to_id = None if is_regression else {v: i for i, v in enumerate(label_list)}
    if class_names is not None:
        label_to_id = {i: i for i in range(num_labels)}
    if label_to_id is not None:
        model.config.label2id = {str(label): i for i, label in enumerate(label_list)}
        model.config.id2label = {i: str(label) for i, label in enumerate(label_list)}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum length for the "
            f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        keys = (sentence1_key,) if sentence2_key is None else (sentence1_key, sentence2_key)
        texts = tuple([t if t is not None else "" for t in examples[key]] for key in keys)
        result = dict(tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True))
        if label_key in examples:
            if label_to_id is not None:
                result["label"] = [label_to_id.get(lab, -1) for lab in examples[label_key]]
            else:
                result["label"] = [float(lab) for lab in examples[label_key]]
        return result

    processed = {}
    with training_args.main_process_first(desc="dataset map pre-processing"):
        for split, ds in raw_datasets.items():
            kwargs = {} if isinstance(ds, _Table) else {"load_from_cache_file": not data_args.overwrite_cache,
                                                        "desc": f"Running tokenizer on {split}"}
            ds = ds.map(preprocess_function, batched=True, **kwargs)
            keep = {"input_ids", "attention_mask", "token_type_ids", "label"}
            processed[split] = ds.remove_columns([c for c in ds.column_names if c not in keep])

    def _take(split, limit):
        ds = processed[split]
        return ds.select(range(min(len(ds), limit))) if limit is not None else ds

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        if "train" not in processed:
            raise ValueError("--do_train requires a --train_file")
        train_dataset = _take("train", data_args.max_train_samples)
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")
    if training_args.do_eval:
        if "validation" not in processed:
            raise ValueError("--do_eval requires a --validation_file or --validation_split_percentage")
        eval_dataset = _take("validation", data_args.max_eval_samples)
    if training_args.do_predict:
        if "test" not in processed:
            raise ValueError("--do_predict requires a --test_file")
        predict_dataset = _take("test", data_args.max_predict_samples)

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        result = glue_metrics(data_args.task_name, preds, p.label_ids, is_regression)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = DataCollatorWithPadding(tokenizer)

    teacher = prune_args.teacher(model, AutoModelForSequenceClassification)

    trainer = GlueTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        teacher_model=teacher,
        distill_hardness=prune_args.distill_hardness,
        distill_temperature=prune_args.distill_temperature,
    )

    # Pruning: one-shot before training, or gradual with a PruningCallback during it (PruningArguments.setup).
    callback, masks = prune_args.setup(trainer, has_train_data=train_dataset is not None)

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # saves the tokenizer too
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    masks = prune_args.save_sparse(trainer, callback, masks)  # final masks, saved as a sparse checkpoint

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")
        if "label" in predict_dataset.column_names:
            predict_dataset = predict_dataset.remove_columns("label")
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
        name = data_args.task_name or "test"
        output_predict_file = os.path.join(training_args.output_dir, f"predict_results_{name}.txt")
        if trainer.is_world_process_zero():
            with open(output_predict_file, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    writer.write(f"{index}\t{item:3.3f}\n" if is_regression else f"{index}\t{label_list[item]}\n")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs.update(language="en", dataset_tags="glue", dataset_args=data_args.task_name,
                      dataset=f"GLUE {data_args.task_name.upper()}")
    if masks:  # the card re-saves a sparse model: keep the method and pattern in its sparsity record
        kwargs.update(masks=masks, method=prune_args.prune_method, pattern=prune_args.prune_pattern)
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return trainer


if __name__ == "__main__":
    main()
