#!/usr/bin/env python
# coding=utf-8
# Copyright 2021 The HuggingFace Inc. team. All rights reserved.
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
"""Fine-tuning a Transformers model for image classification, with M-FAC and second-order pruning.

Ported from transformers' ``examples/pytorch/image-classification/run_image_classification.py``. The
changes, each marked ``# hf_mfac:`` in the code:

* M-FAC: ``MFACTrainingArguments`` / ``MFACTrainer`` in place of ``TrainingArguments`` /
  ``Trainer``, so ``--optim mfac`` (``--mfac_num_grads``, ``--mfac_damp``, ``--optim_args``...)
  works next to every stock ``--optim``;
* pruning: the ``--prune_*`` flags of :class:`hf_mfac.integrations.PruningArguments` (gradual
  pruning during training, ``--prune_mode oneshot``, ``--distill_teacher self``); the pruned model
  is saved sparse;
* local data: ``--dataset fashion_mnist`` (the idx ``.gz`` files in ``--fashion_mnist_dir``, Debian
  package ``dataset-fashion-mnist``) and ``--dataset digits`` (scikit-learn's 8x8 digits) become a
  ``DatasetDict`` with an ``image`` and a ``label`` column, as ``--train_dir``/``--validation_dir``
  (the "imagefolder" builder) and ``--dataset_name`` give;
* without ``--model_name_or_path``, a small ``ViTConfig`` trained from scratch (``--image_size``,
  ``--patch_size``, ``--hidden_size``...): no checkpoint is downloaded;
* the accuracy is computed locally (``evaluate.load`` needs the network);
* torchvision is optional: without it, stand-ins for its few transforms (same arguments, PIL and
  torch).

The datasets keep their ``image`` column until the transforms run, so pass ``--remove_unused_columns
False`` as upstream. Example (see examples/README.md)::

    python examples/run_image_classification.py --dataset digits --output_dir out/digits-mfac \
        --remove_unused_columns False --do_train --do_eval \
        --optim mfac --mfac_num_grads 64 --learning_rate 2e-3
"""

import glob  # hf_mfac: the Fashion-MNIST idx files
import gzip  # hf_mfac
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import numpy as np
import torch
from datasets import load_dataset
from datasets import ClassLabel, DatasetDict, Features  # hf_mfac
from PIL import Image

try:
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        Lambda,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )
# hf_mfac: torchvision is optional (no wheel for a CPU-only torch 2.13): the same transforms
except ImportError:
    import math

    def Compose(transforms):
        def compose(x):
            for t in transforms:
                x = t(x)
            return x

        return compose

    def Lambda(fn):
        return fn

    def ToTensor():  # PIL image -> float tensor (C, H, W) in [0, 1]
        return lambda img: torch.from_numpy(
            np.atleast_3d(np.asarray(img, dtype=np.float32) / 255.0)
        ).permute(2, 0, 1)

    def Normalize(mean, std):
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
        return lambda x: (x - mean) / std

    def _hw(size):
        return (size, size) if isinstance(size, int) else tuple(size)

    def Resize(size):  # an int resizes the shorter edge, keeping the aspect ratio
        def resize(img):
            if not isinstance(size, int):
                return img.resize(_hw(size)[::-1], Image.Resampling.BILINEAR)
            scale = size / min(img.size)
            w, h = max(size, int(img.width * scale)), max(size, int(img.height * scale))
            return img.resize((w, h), Image.Resampling.BILINEAR)

        return resize

    def CenterCrop(size):
        def crop(img):
            h, w = _hw(size)
            left, top = round((img.width - w) / 2), round((img.height - h) / 2)
            return img.crop((left, top, left + w, top + h))

        return crop

    def RandomHorizontalFlip(p=0.5):
        return lambda img: (
            img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1).item() < p else img
        )

    def RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        def crop(img):
            width, height = img.size
            for _ in range(10):
                area = width * height * torch.empty(1).uniform_(*scale).item()
                aspect = math.exp(
                    torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item()
                )
                w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = torch.randint(0, height - h + 1, (1,)).item()
                    left = torch.randint(0, width - w + 1, (1,)).item()
                    break
            else:  # the whole image
                top, left, h, w = 0, 0, height, width
            return img.resize(
                _hw(size)[::-1], Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
            )

        return crop


import transformers
from transformers import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TimmWrapperImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
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


""" Fine-tuning a 🤗 Transformers model for image classification"""

logger = logging.getLogger(__name__)

# Will error if the minimal version of Transformers is not installed. Remove at your own risks.
check_min_version("5.0.0")

require_version(
    "datasets>=2.14.0",
    "To fix: pip install -r examples/pytorch/image-classification/requirements.txt",
)

MODEL_CONFIG_CLASSES = list(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)


def pil_loader(path: str):
    with open(path, "rb") as f:
        im = Image.open(f)
        return im.convert("RGB")


@dataclass
class DataTrainingArguments:
    """
    Arguments pertaining to what data we are going to input our model for training and eval.
    Using `HfArgumentParser` we can turn this class into argparse arguments to be able to specify
    them on the command line.
    """

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Name of a dataset from the hub (could be your own, possibly private dataset "
            "hosted on the hub)."
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "The configuration name of the dataset to use (via the datasets library)."
        },
    )
    # hf_mfac: local data sets
    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "A local data set: fashion_mnist (idx .gz files in --fashion_mnist_dir) or "
            "digits (scikit-learn).",
            "choices": ["fashion_mnist", "digits"],
        },
    )
    fashion_mnist_dir: str = field(
        default="/usr/share/datasets/fashion-mnist",
        metadata={
            "help": "Where the Fashion-MNIST .gz files are (Debian package dataset-fashion-mnist)."
        },
    )
    train_dir: Optional[str] = field(
        default=None, metadata={"help": "A folder containing the training data."}
    )
    validation_dir: Optional[str] = field(
        default=None, metadata={"help": "A folder containing the validation data."}
    )
    train_val_split: Optional[float] = field(
        default=0.15, metadata={"help": "Percent to split off of train for validation."}
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of training "
                "examples to this "
                "value if set."
            )
        },
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of evaluation "
                "examples to this "
                "value if set."
            )
        },
    )
    image_column_name: str = field(
        default="image",
        metadata={
            "help": "The name of the dataset column containing the image data. Defaults to 'image'."
        },
    )
    label_column_name: str = field(
        default="label",
        metadata={
            "help": "The name of the dataset column containing the labels. Defaults to 'label'."
        },
    )

    def __post_init__(self):
        if self.dataset is not None:  # hf_mfac: a local data set
            return
        if self.dataset_name is None and (self.train_dir is None and self.validation_dir is None):
            raise ValueError(
                "You must specify either a dataset name from the hub or a train and/or validation "
                "directory."
            )


@dataclass
class ModelArguments:
    """
    Arguments pertaining to which model/config/tokenizer we are going to fine-tune from.
    """

    model_name_or_path: Optional[str] = field(
        # hf_mfac: no default checkpoint (nothing is downloaded): without one, a ViT from scratch
        default=None,
        metadata={
            "help": "Path to pretrained model or model identifier from huggingface.co/models"
        },
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "If training from scratch, pass a model type from the list: "
            + ", ".join(MODEL_TYPES)
        },
    )
    config_name: Optional[str] = field(
        default=None,
        metadata={"help": "Pretrained config name or path if not the same as model_name"},
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where do you want to store the pretrained models downloaded from s3"},
    )
    model_revision: str = field(
        default="main",
        metadata={
            "help": "The specific model version to use (can be a branch name, tag name or "
            "commit id)."
        },
    )
    image_processor_name: str = field(
        default=None, metadata={"help": "Name or path of preprocessor config."}
    )
    token: str = field(
        default=None,
        metadata={
            "help": (
                "The token to use as HTTP bearer authorization for remote files. If not specified, "
                "will use the token "
                "generated when running `huggingface-cli login` (stored in `~/.huggingface`)."
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
    # hf_mfac: the ViT trained from scratch without --model_name_or_path
    image_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "From scratch: input size (default 8 for digits, 28 for fashion_mnist, "
            "else 32)."
        },
    )
    patch_size: int = field(default=4, metadata={"help": "From scratch: ViT patch size."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch: ViT hidden size."})
    num_hidden_layers: int = field(
        default=4, metadata={"help": "From scratch: number of ViT layers."}
    )
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch: MLP width."})


# hf_mfac: the local data sets as a DatasetDict (image, label), distillation
# -------------------------------------
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST format): big-endian header of ndim int32 sizes after a 4-byte magic
    number."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str) -> dict:
    """{"train": (images (N, 28, 28) float in [0, 1], labels), "validation": ...} from the idx .gz
    files."""

    def find(kind, split):
        prefix = "train" if split == "train" else "t10k"
        hits = sorted(glob.glob(os.path.join(root, f"{prefix}-{kind}-idx*-ubyte.gz")))
        if not hits:
            raise FileNotFoundError(
                f"no {prefix}-{kind}-idx*-ubyte.gz in {root} (Debian package dataset-fashion-mnist)"
            )
        return hits[0]

    return {
        split: (
            _read_idx(find("images", split)).astype(np.float32) / 255.0,
            _read_idx(find("labels", split)).astype(np.int64),
        )
        for split in ("train", "validation")
    }


def load_local_dataset(name: str, fashion_mnist_dir: str) -> DatasetDict:
    """``--dataset fashion_mnist`` (train, validation = the test set) or ``digits`` (train only) as
    a DatasetDict with an ``image`` column (grayscale PIL images) and a ``ClassLabel`` ``label``
    column."""
    if name == "fashion_mnist":
        splits, names = load_fashion_mnist(fashion_mnist_dir), FASHION_MNIST_CLASSES
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        splits, names = (
            {"train": (digits.images / 16.0, digits.target)},
            [str(d) for d in range(10)],
        )
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": list(np.uint8(np.round(images * 255))), "label": labels.tolist()},
                features=features,
            )
            for split, (images, labels) in splits.items()
        }
    )


class ImageClassificationTrainer(DistillationMixin, MFACTrainer):
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
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    # Log on each process the small summary:
    logger.warning(
        f"Process rank: {training_args.local_rank}, device: {training_args.device}, n_gpu: "
        f"{training_args.n_gpu}, "
        + f"distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        + f"16-bits training: {training_args.fp16}"
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

    # Initialize our dataset and prepare it for the 'image-classification' task.
    if data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.dataset is not None:  # hf_mfac: a local data set (image, label)
        dataset = load_local_dataset(data_args.dataset, data_args.fashion_mnist_dir)
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset(
            "imagefolder",
            data_files=data_files,
            cache_dir=model_args.cache_dir,
        )

    dataset_column_names = (
        dataset["train"].column_names if "train" in dataset else dataset["validation"].column_names
    )
    if data_args.image_column_name not in dataset_column_names:
        raise ValueError(
            f"--image_column_name {data_args.image_column_name} not found in dataset "
            f"'{data_args.dataset_name}'. "
            "Make sure to set `--image_column_name` to the correct audio column - one of "
            f"{', '.join(dataset_column_names)}."
        )
    if data_args.label_column_name not in dataset_column_names:
        raise ValueError(
            f"--label_column_name {data_args.label_column_name} not found in dataset "
            f"'{data_args.dataset_name}'. "
            "Make sure to set `--label_column_name` to the correct text column - one of "
            f"{', '.join(dataset_column_names)}."
        )

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example[data_args.label_column_name] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    # If we don't have a validation split, split off a percentage of train as validation.
    data_args.train_val_split = (
        None if "validation" in dataset.keys() else data_args.train_val_split
    )
    if isinstance(data_args.train_val_split, float) and data_args.train_val_split > 0.0:
        split = dataset["train"].train_test_split(data_args.train_val_split)
        dataset["train"] = split["train"]
        dataset["validation"] = split["test"]

    # Prepare label mappings.
    # We'll include these in the model's config to get human readable labels in the Inference API.
    labels = dataset["train"].features[data_args.label_column_name].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label

    # hf_mfac: the accuracy computed locally (evaluate.load needs the network)
    # Define our compute_metrics function. It takes an `EvalPrediction` object (a namedtuple with a
    # predictions and label_ids field) and has to return a dictionary string to float.
    def compute_metrics(p):
        """Computes accuracy on a batch of predictions"""
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    # hf_mfac: no checkpoint to download: a small ViT from scratch
    if model_args.model_name_or_path is None:
        image_size = model_args.image_size or {"digits": 8, "fashion_mnist": 28}.get(
            data_args.dataset, 32
        )
        config = ViTConfig(
            image_size=image_size,
            patch_size=model_args.patch_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
        )
        model = ViTForImageClassification(config)
        image_processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    else:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
        image_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )

    # Define torchvision transforms to be applied to each image.
    if isinstance(image_processor, TimmWrapperImageProcessor):
        _train_transforms = image_processor.train_transforms
        _val_transforms = image_processor.val_transforms
    else:
        if "shortest_edge" in image_processor.size:
            size = image_processor.size["shortest_edge"]
        else:
            size = (image_processor.size["height"], image_processor.size["width"])

        # Create normalization transform
        if hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_std"):
            normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        else:
            normalize = Lambda(lambda x: x)
        _train_transforms = Compose(
            [
                RandomResizedCrop(size),
                RandomHorizontalFlip(),
                ToTensor(),
                normalize,
            ]
        )
        _val_transforms = Compose(
            [
                Resize(size),
                CenterCrop(size),
                ToTensor(),
                normalize,
            ]
        )

    def train_transforms(example_batch):
        """Apply _train_transforms across a batch."""
        example_batch["pixel_values"] = [
            _train_transforms(pil_img.convert("RGB"))
            for pil_img in example_batch[data_args.image_column_name]
        ]
        return example_batch

    def val_transforms(example_batch):
        """Apply _val_transforms across a batch."""
        example_batch["pixel_values"] = [
            _val_transforms(pil_img.convert("RGB"))
            for pil_img in example_batch[data_args.image_column_name]
        ]
        return example_batch

    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train requires a train dataset")
        if data_args.max_train_samples is not None:
            dataset["train"] = (
                dataset["train"]
                .shuffle(seed=training_args.seed)
                .select(range(data_args.max_train_samples))
            )
        # Set the training transforms
        dataset["train"].set_transform(train_transforms)

    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval requires a validation dataset")
        if data_args.max_eval_samples is not None:
            dataset["validation"] = (
                dataset["validation"]
                .shuffle(seed=training_args.seed)
                .select(range(data_args.max_eval_samples))
            )
        # Set the validation transforms
        dataset["validation"].set_transform(val_transforms)

    # Initialize our trainer
    # hf_mfac: MFACTrainer, with distillation from a dense teacher
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
        teacher_model=prune_args.teacher(model, AutoModelForImageClassification),
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
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    # hf_mfac: the final masks, saved as a sparse model
    masks = prune_args.save_sparse(trainer, callback, masks)

    # Evaluation
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Write model card and (optionally) push to hub
    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name or data_args.dataset,
        "tags": ["image-classification", "vision"],
    }
    # hf_mfac: the card re-saves a sparse model: keep the method and pattern in its sparsity record
    if masks:
        kwargs.update(masks=masks, method=prune_args.prune_method, pattern=prune_args.prune_pattern)
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return trainer  # hf_mfac: for tests


if __name__ == "__main__":
    main()
