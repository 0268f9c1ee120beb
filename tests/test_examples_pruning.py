"""--prune_* flags (hf_mfac.integrations.PruningArguments) in examples/run_glue.py and
examples/run_image_classification.py: a few CPU steps of magnitude pruning (gradual; one-shot for
run_glue) on tiny random models; the saved model must hold the target sparsity in its encoder Linear
weights. Also what run_glue.py keeps from the official script with local files: string labels, the
model's own label order, MNLI's matched and mismatched evaluation."""
import csv
import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_text_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAIN = [
    "--use_cpu",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--log_level",
    "error",
    "--seed",
    "0",
    "--do_train",
    "--max_steps",
    "4",
    "--learning_rate",
    "1e-3",
]
COMMON = TRAIN + [
    "--prune_method",
    "magnitude",
    "--prune_sparsity",
    "0.5",
    "--prune_start",
    "1",
    "--prune_end",
    "3",
    "--prune_frequency",
    "1",
]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"_example_prune_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the encoder blocks: bert.encoder.layer.0., vit.layers.0.
BLOCK = re.compile(r"(^|\.)layers?\.\d+\.")


def _encoder_linear_sparsity(model) -> float:
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and BLOCK.search(name):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    assert total > 0
    return zeros / total


def _check_saved(out, model_cls):
    from hf_mfac.integrations.checkpoint import load_sparse_masks, read_sparsity_metadata

    assert read_sparsity_metadata(str(out))["method"] == "magnitude"
    masks = load_sparse_masks(out)
    assert masks and all(BLOCK.search(k) for k in masks)
    model = model_cls.from_pretrained(out)
    assert _encoder_linear_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    weights = dict(model.named_parameters())
    for name, m in masks.items():
        assert bool((weights[name].detach()[~m] == 0).all())


def test_lazy_exports():
    from hf_mfac.integrations import DistillationMixin, PruningArguments
    from hf_mfac.integrations.gradual import DistillationMixin as DM, PruningArguments as PA

    assert PruningArguments is PA and DistillationMixin is DM


@pytest.mark.parametrize("mode", ["gradual", "oneshot"])
def test_run_glue_magnitude_pruning(tmp_path, mode):
    model_dir, words = save_tiny_text_model(tmp_path, num_hidden_layers=2)
    rng = random.Random(0)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(
            [" ".join(rng.choice(words) for _ in range(5)), rng.randint(0, 1)] for _ in range(32)
        )
    out = tmp_path / "out"
    trainer = _load_example("run_glue").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--task_name",
            "sst2",
            "--train_file",
            str(tmp_path / "train.csv"),
            "--max_seq_length",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(out),
            *COMMON,
            "--prune_mode",
            mode,
        ]
    )
    if mode == "gradual":
        assert any("sparsity" in h for h in trainer.state.log_history)
    _check_saved(out, AutoModelForSequenceClassification)


def test_run_image_classification_gradual_magnitude_pruning(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    trainer = _load_example("run_image_classification").main(
        [
            "--dataset",
            "digits",
            "--output_dir",
            str(out),
            "--remove_unused_columns",
            "False",
            "--per_device_train_batch_size",
            "16",
            "--patch_size",
            "4",
            "--hidden_size",
            "16",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "32",
            *COMMON,
        ]
    )
    assert any("sparsity" in h for h in trainer.state.log_history)
    _check_saved(out, AutoModelForImageClassification)


def test_run_glue_string_label_column(tmp_path):
    """A ``label`` column of strings is encoded as a ClassLabel over the sorted names of all splits
    before tokenising (writing ids into a string column used to fail with "too many dimensions
    'str'")."""
    model_dir, words = save_tiny_text_model(tmp_path)
    rng = random.Random(0)
    for split, n in (("train", 24), ("dev", 8)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            w.writerows(
                [
                    " ".join(rng.choice(words) for _ in range(5)),
                    rng.choice(["positive", "negative", "neutral"]),
                ]
                for _ in range(n)
            )
    trainer = _load_example("run_glue").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--train_file",
            str(tmp_path / "train.csv"),
            "--validation_file",
            str(tmp_path / "dev.csv"),
            "--do_eval",
            "--ignore_mismatched_sizes",
            "--max_seq_length",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
            *COMMON,
        ]
    )
    assert trainer.model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert set(trainer.eval_dataset["label"]) <= {0, 1, 2}
    assert "eval_accuracy" in trainer.evaluate()


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_run_glue_keeps_the_model_label_order(tmp_path):
    """A model fine-tuned with its own label2id ({"pos": 0, "neg": 1}) keeps it: the string labels
    of the file are mapped onto the model's ids, not onto the sorted order."""
    model_dir, words = save_tiny_text_model(tmp_path)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.label2id, config.id2label = {"pos": 0, "neg": 1}, {0: "pos", 1: "neg"}
    config.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [
        [" ".join(rng.choice(words) for _ in range(5)), rng.choice(["pos", "neg"])]
        for _ in range(16)
    ]
    _write_csv(tmp_path / "train.csv", ["sentence", "label"], rows)
    trainer = _load_example("run_glue").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--train_file",
            str(tmp_path / "train.csv"),
            "--max_seq_length",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(tmp_path / "out"),
            *TRAIN,
        ]
    )
    assert trainer.model.config.id2label == {0: "pos", 1: "neg"}
    assert trainer.train_dataset["label"] == [{"pos": 0, "neg": 1}[r[1]] for r in rows]


def test_run_glue_mnli_matched_and_mismatched(tmp_path):
    """MNLI from local files: the validation file is the matched split, --validation_mismatched_file
    the other; both are evaluated, the mismatched metrics with the _mm suffix, as upstream does with
    the Hub's GLUE."""
    model_dir, words = save_tiny_text_model(tmp_path)
    rng = random.Random(0)
    text = lambda: " ".join(rng.choice(words) for _ in range(4))  # noqa: E731
    for name, n in (("train", 16), ("dev_m", 6), ("dev_mm", 5)):
        _write_csv(
            tmp_path / f"{name}.csv",
            ["premise", "hypothesis", "label"],
            [[text(), text(), rng.randint(0, 2)] for _ in range(n)],
        )
    out = tmp_path / "out"
    _load_example("run_glue").main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--task_name",
            "mnli",
            "--train_file",
            str(tmp_path / "train.csv"),
            "--validation_file",
            str(tmp_path / "dev_m.csv"),
            "--validation_mismatched_file",
            str(tmp_path / "dev_mm.csv"),
            "--do_eval",
            "--ignore_mismatched_sizes",
            "--max_seq_length",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(out),
            *TRAIN,
        ]
    )
    import json

    results = json.load(open(out / "eval_results.json"))
    assert results["eval_samples"] == 6 and results["eval_samples_mm"] == 5
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)
