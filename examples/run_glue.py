#!/usr/bin/env python
# Copyright 2020 The HuggingFace Inc. team. All rights reserved.
# Copyright 2026 the hf_mfac authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Finetuning the library models for sequence classification on GLUE, with M-FAC and second-order
pruning.

Ported from transformers' ``examples/pytorch/text-classification/run_glue.py`` (transformers 5.x).
The changes, each marked ``# hf_mfac:`` in the code:

* M-FAC: ``MFACTrainingArguments`` / ``MFACTrainer`` in place of ``TrainingArguments`` /
  ``Trainer``, so ``--optim mfac`` (``--mfac_num_grads``, ``--mfac_damp``, ``--optim_args``...)
  works next to every stock ``--optim``;
* pruning: the ``--prune_*`` flags of :class:`hf_mfac.integrations.PruningArguments` (gradual
  pruning during training, ``--prune_mode oneshot``, ``--distill_teacher self``); the pruned model
  is saved sparse;
* local files first: ``--train_file``/``--validation_file``/``--test_file`` (``.csv``, ``.tsv``,
  ``.json``, ``.jsonl``; ``--file_encoding``) are used when given, ``--task_name`` then only chooses
  the columns and the metric (``--validation_mismatched_file``/``--test_mismatched_file`` for MNLI);
  without files, ``--task_name`` and ``--dataset_name`` load from the Hub as upstream.
  ``--label_column_name``, ``--text_column_names`` and ``--validation_split_percentage`` adapt any
  table; string labels are encoded as a ``ClassLabel`` before tokenising;
* the GLUE metrics are computed locally (``evaluate.load`` needs the network).

Example (see examples/README.md)::

    python examples/run_glue.py --model_name_or_path path/to/bert --task_name sst2 \
        --train_file sst2/train.csv --validation_file sst2/dev.csv --do_train --do_eval \
        --optim mfac --mfac_num_grads 1024 --learning_rate 1e-4 --output_dir out/sst2
"""

import logging
import os
import random
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
from datasets import ClassLabel, DatasetDict, load_dataset

import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PretrainedConfig,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import check_min_version
from transformers.utils.versions import require_version

# hf_mfac
from hf_mfac.integrations import (
    DistillationMixin,
    MFACTrainer,
    MFACTrainingArguments,
    PruningArguments,
)

check_min_version("5.0.0")

require_version(
    "datasets>=1.8.0",
    "To fix: pip install -r examples/pytorch/text-classification/requirements.txt",
)

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
    """
    Arguments pertaining to what data we are going to input our model for training and eval.

    Using `HfArgumentParser` we can turn this class
    into argparse arguments to be able to specify them on
    the command line.
    """

    task_name: str | None = field(
        default=None,
        metadata={"help": "The name of the task to train on: " + ", ".join(task_to_keys.keys())},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "The name of the dataset to use (via the datasets library)."},
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={
            "help": "The configuration name of the dataset to use (via the datasets library)."
        },
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": (
                "The maximum total input sequence length after tokenization. Sequences longer "
                "than this will be truncated, sequences shorter will be padded."
            )
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."}
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether to pad all samples to `max_seq_length`. "
                "If False, will pad the samples dynamically when batching to the maximum length in "
                "the batch."
            )
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of training "
                "examples to this "
                "value if set."
            )
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of evaluation "
                "examples to this "
                "value if set."
            )
        },
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of prediction "
                "examples to this "
                "value if set."
            )
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "A csv/tsv or a json/jsonl file containing the training data."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "A csv/tsv or a json/jsonl file containing the validation data."},
    )
    test_file: str | None = field(
        default=None, metadata={"help": "A csv/tsv or a json/jsonl file containing the test data."}
    )
    # hf_mfac: local MNLI mismatched splits, and the columns of tables that are not in a GLUE layout
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI with local files: the validation_mismatched split."}
    )
    test_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI with local files: the test_mismatched split."}
    )
    validation_split_percentage: int | None = field(
        default=None,
        metadata={
            "help": "Without a validation file: the percentage of the train set held out as "
            "validation set."
        },
    )
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated text columns (one or two), e.g. 'text' or "
            "'sentence1,sentence2'."
        },
    )
    label_column_name: str = field(
        default="label", metadata={"help": "The column holding the labels."}
    )
    file_encoding: str = field(
        default="utf-8", metadata={"help": "Text encoding of csv/tsv files (e.g. latin-1)."}
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys.keys():
                raise ValueError(
                    "Unknown task, you should pick one in " + ",".join(task_to_keys.keys())
                )
        elif self.dataset_name is not None:
            pass
        # hf_mfac
        elif self.train_file is None and self.validation_file is None and self.test_file is None:
            raise ValueError(
                "Need either a GLUE task, a training/validation file or a dataset name."
            )


@dataclass
class ModelArguments:
    """
    Arguments pertaining to which model/config/tokenizer we are going to fine-tune from.
    """

    model_name_or_path: str = field(
        metadata={"help": "Path to pretrained model or model identifier from huggingface.co/models"}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Pretrained config name or path if not the same as model_name"},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where do you want to store the pretrained models downloaded from "
            "huggingface.co"
        },
    )
    model_revision: str = field(
        default="main",
        metadata={
            "help": "The specific model version to use (can be a branch name, tag name or "
            "commit id)."
        },
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": (
                "The token to use as HTTP bearer authorization for remote files. If not specified, "
                "will use the token "
                "generated when running `hf auth login` (stored in `~/.huggingface`)."
            )
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": (
                "Whether to trust the execution of code from datasets/models defined on the Hub."
                " This option should only be set to `True` for repositories you trust and in which "
                "you have read the"
                " code, as it will execute code present on the Hub on your local machine."
            )
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Will enable to load a pretrained model whose head dimensions are different."
        },
    )


# hf_mfac: local files with the datasets builders, string labels, metrics computed locally,
# distillation -------
def load_local_splits(data_files: dict, encoding: str = "utf-8", cache_dir=None) -> DatasetDict:
    """{split: path} -> DatasetDict, with the datasets "csv" builder (``.csv``, ``.tsv``) or "json"
    (``.json``, ``.jsonl``)."""
    extension = next(iter(data_files.values())).rsplit(".", 1)[-1].lower()
    if extension in ("json", "jsonl"):
        return load_dataset("json", data_files=data_files, cache_dir=cache_dir)
    kwargs = {"delimiter": "\t"} if extension == "tsv" else {}
    return load_dataset(
        "csv", data_files=data_files, cache_dir=cache_dir, encoding=encoding, **kwargs
    )


def encode_string_labels(raw_datasets: DatasetDict, label_key: str = "label") -> DatasetDict:
    """A string label column (positive, negative...) as a ``ClassLabel`` over the sorted names of
    all splits, cast before tokenising: ``map`` writing integer ids into a string column keeps its
    string type, and the collator then fails with "too many dimensions 'str'"."""
    splits = {k: ds for k, ds in raw_datasets.items() if label_key in ds.features}
    if not splits or any(
        getattr(ds.features[label_key], "dtype", None) not in ("string", "large_string")
        for ds in splits.values()
    ):
        return raw_datasets
    names = sorted({v for ds in splits.values() for v in ds.unique(label_key) if v is not None})
    label = ClassLabel(names=names)
    return DatasetDict(
        {
            k: ds.cast_column(label_key, label) if k in splits else ds
            for k, ds in raw_datasets.items()
        }
    )


def glue_metrics(
    task: str | None, preds: np.ndarray, labels: np.ndarray, is_regression: bool
) -> dict:
    """The GLUE metric of ``task`` computed locally (same definitions as ``evaluate.load("glue",
    task)``); without a task: accuracy and macro F1 (classification) or MSE with Pearson/Spearman
    (regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if is_regression:
        out = {"mse": float(((preds - labels) ** 2).mean())}
        if task == "stsb" or task is None:
            out.update(
                pearson=float(pearsonr(preds, labels)[0]),
                spearmanr=float(spearmanr(preds, labels)[0]),
            )
        return out
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    out = {"accuracy": float((preds == labels).mean())}
    if task in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, preds))
    elif task is None:
        out["f1_macro"] = float(f1_score(labels, preds, average="macro"))
    return out


class GlueTrainer(DistillationMixin, MFACTrainer):
    """``MFACTrainer`` with optional distillation from a dense teacher (``--distill_teacher``)."""


def main(argv=None):
    # See all possible arguments in src/transformers/training_args.py
    # or by passing the --help flag to this script.
    # We now keep distinct sets of args, for a cleaner separation of concerns.

    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, MFACTrainingArguments, PruningArguments)
    )
    argv = sys.argv[1:] if argv is None else list(argv)  # hf_mfac: main(argv) for tests
    if len(argv) == 1 and argv[0].endswith(".json"):
        # If we pass only one argument to the script and it's the path to a json file,
        # let's parse it to get our arguments.
        model_args, data_args, training_args, prune_args = parser.parse_json_file(
            json_file=os.path.abspath(argv[0])
        )
    else:
        model_args, data_args, training_args, prune_args = parser.parse_args_into_dataclasses(
            args=argv
        )

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )

    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to
        # have that default.
        transformers.utils.logging.set_verbosity_info()

    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    # Log on each process the small summary:
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: "
        f"{training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    # Detecting last checkpoint.
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(
                f"Checkpoint detected, resuming training at {last_checkpoint}. To avoid this "
                "behavior, change "
                "the `--output_dir` to train from scratch."
            )

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: you can either provide your own CSV/JSON training and evaluation files (see
    # below) or specify a GLUE benchmark task (the dataset will be downloaded automatically from the
    # datasets Hub).
    #
    # For CSV/JSON files, this script will use as labels the column called 'label' and as pair of
    # sentences the sentences in columns called 'sentence1' and 'sentence2' if such column exists or
    # the first two columns not named label if at least two columns are provided.
    #
    # If the CSVs/JSONs contain only one non-label column, the script does single sentence
    # classification on this single column. You can easily tweak this behavior (see below)
    #
    # In distributed training, the load_dataset function guarantee that only one local process can
    # concurrently download the dataset. hf_mfac: local files first; a GLUE task then gives the
    # columns and the metric
    local_files = (data_args.train_file, data_args.validation_file, data_args.test_file)
    if any(f is not None for f in local_files):
        mnli = data_args.task_name == "mnli"
        data_files = {
            "train": data_args.train_file,
            "validation_matched" if mnli else "validation": data_args.validation_file,
            "validation_mismatched": data_args.validation_mismatched_file,
            "test_matched" if mnli else "test": data_args.test_file,
            "test_mismatched": data_args.test_mismatched_file,
        }
        data_files = {k: v for k, v in data_files.items() if v is not None}
        for key in data_files:
            logger.info(f"load a local file for {key}: {data_files[key]}")
        raw_datasets = load_local_splits(data_files, data_args.file_encoding, model_args.cache_dir)
    elif data_args.task_name is not None:
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            "nyu-mll/glue",
            data_args.task_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    # See more about loading any type of standard or custom dataset at
    # https://huggingface.co/docs/datasets/loading_datasets.

    # hf_mfac: any label column, a held-out validation split, string labels as a ClassLabel
    if data_args.label_column_name != "label":
        raw_datasets = raw_datasets.rename_column(data_args.label_column_name, "label")
    if data_args.validation_split_percentage and "validation" not in raw_datasets:
        split = raw_datasets["train"].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=training_args.seed
        )
        raw_datasets["train"], raw_datasets["validation"] = split["train"], split["test"]
    raw_datasets = encode_string_labels(raw_datasets)
    reference = (
        raw_datasets["train"] if "train" in raw_datasets else next(iter(raw_datasets.values()))
    )
    is_class_label = isinstance(reference.features["label"], ClassLabel)

    # Labels
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        if not is_regression:
            label_list = (
                reference.features["label"].names
                if is_class_label
                else sorted(reference.unique("label"))
            )
            num_labels = len(label_list)
        else:
            num_labels = 1
    else:
        # Trying to have good defaults here, don't hesitate to tweak to your needs.
        is_regression = reference.features["label"].dtype in ["float32", "float64"]
        if is_regression:
            num_labels = 1
        elif is_class_label:  # hf_mfac: named labels keep their names
            label_list = reference.features["label"].names
            num_labels = len(label_list)
        else:
            # A useful fast method:
            # https://huggingface.co/docs/datasets/package_reference/main_classes#datasets.Dataset.unique
            label_list = reference.unique("label")
            label_list.sort()  # Let's sort it for determinism
            num_labels = len(label_list)

    # Load pretrained model and tokenizer
    #
    # In distributed training, the .from_pretrained methods guarantee that only one local process
    # can concurrently download model & vocab.
    config = AutoConfig.from_pretrained(
        model_args.config_name if model_args.config_name else model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name if model_args.tokenizer_name else model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    # Preprocessing the raw_datasets
    if data_args.text_column_names is not None:  # hf_mfac
        keys = [k.strip() for k in data_args.text_column_names.split(",")]
        sentence1_key, sentence2_key = keys[0], (keys[1] if len(keys) > 1 else None)
    elif data_args.task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[data_args.task_name]
    else:
        # Again, we try to have some nice defaults but don't hesitate to tweak to your use case.
        non_label_column_names = [name for name in reference.column_names if name != "label"]
        if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        else:
            if len(non_label_column_names) >= 2:
                sentence1_key, sentence2_key = non_label_column_names[:2]
            else:
                sentence1_key, sentence2_key = non_label_column_names[0], None

    # Padding strategy
    if data_args.pad_to_max_length:
        padding = "max_length"
    else:
        # We will pad later, dynamically at batch creation, to the max sequence length in each batch
        padding = False

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (
        model.config.label2id != PretrainedConfig(num_labels=num_labels).label2id
        # hf_mfac: or named labels of a local file
        and (data_args.task_name is not None or is_class_label)
        and not is_regression
    ):
        # Some have all caps in their config, some don't.
        label_name_to_id = {str(k).lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id.keys()) == sorted(str(label).lower() for label in label_list):
            label_to_id = {
                i: int(label_name_to_id[str(label_list[i]).lower()]) for i in range(num_labels)
            }
        else:
            logger.warning(
                "Your model seems to have been trained with labels, but they don't match the "
                "dataset: "
                f"model labels: {sorted(label_name_to_id.keys())}, dataset labels: "
                f"{sorted(label_list)}."
                "\nIgnoring the model labels as a result.",
            )
    elif data_args.task_name is None and not is_regression and not is_class_label:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None and data_args.task_name is None and not is_class_label:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}
    # with the model's order, its label2id stays as it is
    elif label_to_id is None and not is_regression:
        model.config.label2id = {label: i for i, label in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum "
            "length for the "
            f"model ({tokenizer.model_max_length}). Using "
            f"max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        # Tokenize the texts
        args = (
            (examples[sentence1_key],)
            if sentence2_key is None
            else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*args, padding=padding, max_length=max_seq_length, truncation=True)

        # Map labels to IDs (not necessary for GLUE tasks)
        if label_to_id is not None and "label" in examples:
            result["label"] = [(label_to_id[lbl] if lbl != -1 else -1) for lbl in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function,
            batched=True,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )
    if training_args.do_train:
        if "train" not in raw_datasets:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            max_train_samples = min(len(train_dataset), data_args.max_train_samples)
            train_dataset = train_dataset.select(range(max_train_samples))

    if training_args.do_eval:
        if "validation" not in raw_datasets and "validation_matched" not in raw_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = raw_datasets[
            "validation_matched" if data_args.task_name == "mnli" else "validation"
        ]
        if data_args.max_eval_samples is not None:
            max_eval_samples = min(len(eval_dataset), data_args.max_eval_samples)
            eval_dataset = eval_dataset.select(range(max_eval_samples))

    # hf_mfac: a local task may have no test file
    if training_args.do_predict or data_args.test_file is not None:
        if "test" not in raw_datasets and "test_matched" not in raw_datasets:
            raise ValueError("--do_predict requires a test dataset")
        predict_dataset = raw_datasets["test_matched" if data_args.task_name == "mnli" else "test"]
        if data_args.max_predict_samples is not None:
            max_predict_samples = min(len(predict_dataset), data_args.max_predict_samples)
            predict_dataset = predict_dataset.select(range(max_predict_samples))

    # Log a few random samples from the training set:
    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), 3):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # hf_mfac: the metric computed locally (evaluate.load needs the network)
    # You can define your custom compute_metrics function. It takes an `EvalPrediction` object (a
    # namedtuple with a predictions and label_ids field) and has to return a dictionary string to
    # float.
    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        result = glue_metrics(data_args.task_name, preds, p.label_ids, is_regression)
        if len(result) > 1:
            result["combined_score"] = np.mean(list(result.values())).item()
        return result

    # Data collator will default to DataCollatorWithPadding when the tokenizer is passed to Trainer,
    # so we change it if we already did the padding.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = None

    # Initialize our Trainer
    trainer = GlueTrainer(  # hf_mfac: MFACTrainer, with distillation from a dense teacher
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        teacher_model=prune_args.teacher(model, AutoModelForSequenceClassification),
        distill_hardness=prune_args.distill_hardness,
        distill_temperature=prune_args.distill_temperature,
    )
    # hf_mfac: one-shot pruning now, or gradual pruning with a PruningCallback during training
    callback, masks = prune_args.setup(trainer, has_train_data=training_args.do_train)

    # Training
    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None:
            checkpoint = training_args.resume_from_checkpoint
        elif last_checkpoint is not None:
            checkpoint = last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        max_train_samples = (
            data_args.max_train_samples
            if data_args.max_train_samples is not None
            else len(train_dataset)
        )
        metrics["train_samples"] = min(max_train_samples, len(train_dataset))

        trainer.save_model()  # Saves the tokenizer too for easy upload

        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    # hf_mfac: the final masks, saved as a sparse model
    masks = prune_args.save_sparse(trainer, callback, masks)

    # Evaluation
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        if data_args.task_name == "mnli" and "validation_mismatched" in raw_datasets:
            tasks.append("mnli-mm")
            valid_mm_dataset = raw_datasets["validation_mismatched"]
            if data_args.max_eval_samples is not None:
                max_eval_samples = min(len(valid_mm_dataset), data_args.max_eval_samples)
                valid_mm_dataset = valid_mm_dataset.select(range(max_eval_samples))
            eval_datasets.append(valid_mm_dataset)
            combined = {}

        for eval_dataset, task in zip(eval_datasets, tasks):
            metrics = trainer.evaluate(eval_dataset=eval_dataset)

            max_eval_samples = (
                data_args.max_eval_samples
                if data_args.max_eval_samples is not None
                else len(eval_dataset)
            )
            metrics["eval_samples"] = min(max_eval_samples, len(eval_dataset))

            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            if task is not None and "mnli" in task:
                combined.update(metrics)

            trainer.log_metrics("eval", metrics)
            trainer.save_metrics(
                "eval", combined if task is not None and "mnli" in task else metrics
            )

    if training_args.do_predict:
        logger.info("*** Predict ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        predict_datasets = [predict_dataset]
        if data_args.task_name == "mnli" and "test_mismatched" in raw_datasets:
            tasks.append("mnli-mm")
            predict_datasets.append(raw_datasets["test_mismatched"])

        for predict_dataset, task in zip(predict_datasets, tasks):
            # Removing the `label` columns because it contains -1 and Trainer won't like that.
            # hf_mfac: a local test file may have no labels
            if "label" in predict_dataset.column_names:
                predict_dataset = predict_dataset.remove_columns("label")
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = (
                np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
            )

            output_predict_file = os.path.join(
                training_args.output_dir, f"predict_results_{task}.txt"
            )
            if trainer.is_world_process_zero():
                with open(output_predict_file, "w") as writer:
                    logger.info(f"***** Predict results {task} *****")
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        if is_regression:
                            writer.write(f"{index}\t{item:3.3f}\n")
                        else:
                            item = label_list[item]
                            writer.write(f"{index}\t{item}\n")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"
    # hf_mfac: the card re-saves a sparse model: keep the method and pattern in its sparsity record
    if masks:
        kwargs.update(masks=masks, method=prune_args.prune_method, pattern=prune_args.prune_pattern)

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return trainer  # hf_mfac: for tests


def _mp_fn(index):
    # For xla_spawn (TPUs)
    main()


if __name__ == "__main__":
    main()
