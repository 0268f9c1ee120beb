#!/usr/bin/env python
# Copyright 2021 The HuggingFace Inc. team. Copyright 2026 the hf_mfac authors.
# Licensed under the Apache License, Version 2.0.
"""Train a ViT image classifier on local images with M-FAC.

Port of transformers' ``examples/pytorch/image-classification/run_image_classification.py`` (5.x) that reads
local data only:

* ``--train_dir`` (and optionally ``--validation_dir``): an image folder, one sub-folder per class
  (``train/cat/001.png``, ``train/dog/002.jpg``...), the layout of the datasets "imagefolder" builder;
* ``--dataset fashion_mnist``: the Fashion-MNIST idx files (``*-images-idx3-ubyte.gz``/``*-labels-idx1-ubyte.gz``)
  in ``--fashion_mnist_dir`` (default ``/usr/share/datasets/fashion-mnist``, Debian ``dataset-fashion-mnist``);
* ``--dataset digits``: scikit-learn's bundled 8x8 digits (1797 images).

The model is a local checkpoint (``--model_name_or_path``, with its image processor) or, without one, a small
``ViTConfig`` trained from scratch (``--image_size``, ``--patch_size``, ``--hidden_size``...). Arguments are
:class:`hf_mfac.integrations.MFACTrainingArguments`, so ``--optim mfac`` works; the metric (accuracy) is computed
locally. There is no data augmentation (the official script uses torchvision's, which is not a dependency here).
:class:`hf_mfac.integrations.PruningArguments` are parsed as in run_qa.py (``--prune_method magnitude
--prune_sparsity 0.5 ...``: gradual pruning during training, or ``--prune_mode oneshot``; ``--distill_teacher``);
the pruned model is saved with :func:`hf_mfac.integrations.save_sparse_pretrained`.
"""
import glob
import gzip
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments
from hf_mfac.integrations.callbacks import DistillationMixin, PruningArguments

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


@dataclass
class DataTrainingArguments:
    """What images to train and evaluate on. Local data only."""

    dataset: str | None = field(
        default=None, metadata={"help": "A built-in local loader: fashion_mnist or digits.",
                                "choices": ["fashion_mnist", "digits"]})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder with one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation."})
    fashion_mnist_dir: str = field(
        default="/usr/share/datasets/fashion-mnist", metadata={"help": "Where the Fashion-MNIST .gz files are."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training data held out for validation when there is "
                                        "no validation set (fixed split, seeded by --seed)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})

    def __post_init__(self):
        if (self.dataset is None) == (self.train_dir is None):
            raise ValueError("Give exactly one of --dataset (fashion_mnist, digits) and --train_dir.")


@dataclass
class ModelArguments:
    """A local checkpoint, or the shape of a ViT trained from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path to a pretrained image classifier; omit to train a small ViT from scratch."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor path, if not the model's."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Allow a classification head with a different number of labels."})
    image_size: int | None = field(default=None, metadata={"help": "From scratch: input size (default: the data's)."})
    patch_size: int = field(default=4, metadata={"help": "From scratch: ViT patch size."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch: ViT hidden size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: number of ViT layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch: MLP width."})


# ---- data ---------------------------------------------------------------------------------------------------
def _read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST format): big-endian header of ndim int32 sizes after a 4-byte magic number."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str) -> dict:
    """{"train": (images (N, 28, 28) float in [0, 1], labels), "validation": ...} from the idx .gz files."""
    def find(kind, split):
        prefix = "train" if split == "train" else "t10k"
        hits = sorted(glob.glob(os.path.join(root, f"{prefix}-{kind}-idx*-ubyte.gz")))
        if not hits:
            raise FileNotFoundError(
                f"no {prefix}-{kind}-idx*-ubyte.gz in {root} (Debian package dataset-fashion-mnist)")
        return hits[0]

    return {split: (_read_idx(find("images", split)).astype(np.float32) / 255.0,
                    _read_idx(find("labels", split)).astype(np.int64)) for split in ("train", "validation")}


def load_digits_split(seed: int, val_fraction: float) -> dict:
    """scikit-learn's 8x8 digits, values scaled to [0, 1], split at random with ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    return _split({"train": (images, labels)}, seed, val_fraction)


def scan_image_folder(root: str, class_names: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, class names) of ``root/<class>/<image>``; classes sorted by name, as in imagefolder."""
    class_names = class_names or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, name, file))
                labels.append(label)
    if not paths:
        raise ValueError(f"no images found under {root}/<class>/")
    return paths, np.asarray(labels, dtype=np.int64), class_names


def _split(splits: dict, seed: int, val_fraction: float) -> dict:
    if "validation" in splits or val_fraction <= 0:
        return splits
    items, labels = splits["train"]
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * val_fraction))
    take = lambda idx: ([items[i] for i in idx] if isinstance(items, list) else items[idx], labels[idx])  # noqa: E731
    return {"train": take(order[n_val:]), "validation": take(order[:n_val])}


class ImageDataset(torch.utils.data.Dataset):
    """(items, labels) -> {"pixel_values": (C, H, W), "labels": int}; items are arrays (H, W) or image paths."""

    def __init__(self, items, labels, transform):
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.transform(self.items[i]), "labels": int(self.labels[i])}


def make_transform(image_processor, image_size: int, num_channels: int):
    """Item -> normalised (C, H, W) tensor: the checkpoint's image processor, or resize + (x - 0.5) / 0.5."""
    from PIL import Image

    def to_pil(item):
        if isinstance(item, str):
            return Image.open(item)
        return Image.fromarray(np.uint8(np.clip(item, 0, 1) * 255))

    if image_processor is not None:
        return lambda item: image_processor(to_pil(item).convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def transform(item):
        if isinstance(item, str):
            img = Image.open(item).convert("L" if num_channels == 1 else "RGB")
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
            x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        else:
            x = torch.as_tensor(item, dtype=torch.float32)[None].expand(num_channels, -1, -1)  # (C, H, W)
        if tuple(x.shape[-2:]) != (image_size, image_size):
            x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
        return (x - 0.5) / 0.5

    return transform


class ImageClassificationTrainer(DistillationMixin, MFACTrainer):
    """``MFACTrainer`` with optional distillation from a dense teacher (``--distill_teacher``)."""


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
        f"n_gpu: {training_args.n_gpu}, optimizer: {training_args.optim}"
    )

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    set_seed(training_args.seed)

    # Data: (items, labels) per split; items are float arrays (N, H, W) or image paths.
    if data_args.dataset == "fashion_mnist":
        splits, class_names = load_fashion_mnist(data_args.fashion_mnist_dir), FASHION_MNIST_CLASSES
    elif data_args.dataset == "digits":
        splits = load_digits_split(training_args.seed, data_args.train_val_split)
        class_names = [str(d) for d in range(10)]
    else:
        paths, labels, class_names = scan_image_folder(data_args.train_dir)
        splits = {"train": (paths, labels)}
        if data_args.validation_dir is not None:
            splits["validation"] = scan_image_folder(data_args.validation_dir, class_names)[:2]
        splits = _split(splits, training_args.seed, data_args.train_val_split)
    label2id = {name: i for i, name in enumerate(class_names)}
    id2label = {i: name for i, name in enumerate(class_names)}

    # Model: a local checkpoint with its image processor, or a small ViT from scratch.
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, num_labels=len(class_names), label2id=label2id, id2label=id2label,
            finetuning_task="image-classification")
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
        image_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path)
        transform = make_transform(image_processor, None, None)
    else:
        first = splits["train"][0][0]
        native = first.shape[-1] if isinstance(first, np.ndarray) else 32
        num_channels = 1 if data_args.dataset is not None else 3
        image_size = model_args.image_size or native
        config = ViTConfig(
            image_size=image_size, patch_size=model_args.patch_size, num_channels=num_channels,
            hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads, intermediate_size=model_args.intermediate_size,
            num_labels=len(class_names), label2id=label2id, id2label=id2label)
        model, image_processor = ViTForImageClassification(config), None
        transform = make_transform(None, image_size, num_channels)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        items, labels = splits["train"]
        n = min(len(labels), data_args.max_train_samples or len(labels))
        train_dataset = ImageDataset(items[:n], labels[:n], transform)
    if training_args.do_eval:
        if "validation" not in splits:
            raise ValueError("--do_eval needs --validation_dir or --train_val_split > 0")
        items, labels = splits["validation"]
        n = min(len(labels), data_args.max_eval_samples or len(labels))
        eval_dataset = ImageDataset(items[:n], labels[:n], transform)

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).mean())}

    teacher = prune_args.teacher(model, AutoModelForImageClassification)

    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=default_data_collator,
        teacher_model=teacher,
        distill_hardness=prune_args.distill_hardness,
        distill_temperature=prune_args.distill_temperature,
    )

    # Pruning: one-shot before training, or gradual with a PruningCallback during it (PruningArguments.setup).
    callback, masks = prune_args.setup(trainer, has_train_data=train_dataset is not None)

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    masks = prune_args.save_sparse(trainer, callback, masks)  # final masks, saved as a sparse checkpoint

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"tasks": "image-classification", "tags": ["image-classification", "vision"]}
    if model_args.model_name_or_path is not None:
        kwargs["finetuned_from"] = model_args.model_name_or_path
    if data_args.dataset is not None:
        kwargs["dataset"] = data_args.dataset
    if masks:  # the card re-saves a sparse model: keep the method and pattern in its sparsity record
        kwargs.update(masks=masks, method=prune_args.prune_method, pattern=prune_args.prune_pattern)
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return trainer


if __name__ == "__main__":
    main()
