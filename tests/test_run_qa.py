"""examples/run_qa.py: SQuAD loading, feature preparation, answer post-processing, EM/F1, and short
runs (plain, --optim mfac, gradual pruning, one-shot pruning) with a tiny BERT and a tokenizer built
from a word list."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForQuestionAnswering, BertTokenizer  # noqa: E402

_SPEC = importlib.util.spec_from_file_location(
    "run_qa", os.path.join(os.path.dirname(__file__), os.pardir, "examples", "run_qa.py"))
run_qa = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_qa)

WORDS = ("the cat sat on mat red door blue dog ran to park where did who what color is a house "
         "bird flew over "
         "tree green sun rose in east").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ","] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=True, model_max_length=64)


SENTENCES = ["the cat sat on the mat.", "the dog ran to the park.", "the red door is blue.",
             "a bird flew over the green tree.", "the sun rose in the east."]
QUESTIONS = [("where did the cat sit?", "on the mat"), ("where did the dog run?", "to the park"),
             ("what color is the door?", "blue"), ("what flew over the tree?", "a bird"),
             ("where did the sun rise?", "in the east")]


def squad_json(path, n=20, v2=False, nested=True):
    """Contexts of all five sentences in rotated order; every question's answer occurs once."""
    data, flat = [], []
    for i in range(n):
        k = i % 5
        ctx = " ".join(SENTENCES[(k + j) % 5] for j in range(5))
        q, a = QUESTIONS[(i * 2) % 5]
        impossible = v2 and i % 4 == 3
        answers = [] if impossible else [{"text": a, "answer_start": ctx.index(a)}]
        qa = {"id": f"q{i}", "question": q, "answers": answers}
        if v2:
            qa["is_impossible"] = impossible
        data.append({"title": f"t{i}", "paragraphs": [{"context": ctx, "qas": [qa]}]})
        flat.append({"id": f"q{i}", "title": f"t{i}", "context": ctx, "question": q,
                     "answers": {"text": [x["text"] for x in answers],
                                 "answer_start": [x["answer_start"] for x in answers]}})
    with open(path, "w") as f:
        json.dump({"version": "v2.0" if v2 else "1.1", "data": data} if nested else flat, f)
    return path


# -- data
# --------------------------------------------------------------------------------------------------
def test_load_both_layouts(tmp_path):
    nested = run_qa.load_squad_file(squad_json(tmp_path / "a.json", n=6, v2=True))
    flat = run_qa.load_squad_file(squad_json(tmp_path / "b.json", n=6, v2=True, nested=False))
    assert nested == [{k: v for k, v in e.items()} for e in flat]
    assert nested[3]["answers"] == {"text": [], "answer_start": []}
    ex = nested[0]
    assert ex["context"][ex["answers"]["answer_start"][0]:].startswith(ex["answers"]["text"][0])
    with open(tmp_path / "c.jsonl", "w") as f:
        for rec in json.load(open(tmp_path / "b.json")):
            f.write(json.dumps(rec) + "\n")
    assert run_qa.load_squad_file(str(tmp_path / "c.jsonl")) == flat


# -- post-processing and metrics
# --------------------------------------------------------------------------
def _one_feature(context, token_spans, start_logits, end_logits, eid="x"):
    feats = [{"example_id": eid, "offset_mapping": [None] + token_spans}]
    return feats, (np.array([start_logits]), np.array([end_logits]))


def test_postprocess_picks_best_valid_span():
    ctx = "the cat sat on the mat"
    spans = [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22)]
    #          CLS  the  cat  sat  on   the  mat
    start = [0.0, 0.1, 5.0, 0.2, 4.0, 0.0, 0.0]
    end = [0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 6.0]
    feats, preds = _one_feature(ctx, spans, start, end)
    ex = Dataset.from_list([{"id": "x", "context": ctx}])
    assert run_qa.postprocess_qa_predictions(ex, feats, preds) == {"x": "cat sat on the mat"}
    # max_answer_length=3 excludes "cat ... mat" (5 tokens): "on the mat" wins
    assert run_qa.postprocess_qa_predictions(ex, feats, preds, max_answer_length=3) == {"x": "on "
                                                                                             "the "
                                                                                             "mat"}
    # end before start is never taken
    feats, preds = _one_feature(ctx, spans, [0, 0, 0, 0, 0, 0, 9.0], [0, 0, 9.0, 0, 0, 0, 0])
    assert run_qa.postprocess_qa_predictions(ex, feats, preds)["x"] in {"mat", "cat"}


def test_postprocess_v2_null_answer_and_files(tmp_path):
    ctx = "the cat sat"
    spans = [(0, 3), (4, 7), (8, 11)]
    feats, preds = _one_feature(ctx, spans, [5.0, 0.0, 2.0, 0.0], [5.0, 0.0, 2.0, 0.0])
    ex = Dataset.from_list([{"id": "x", "context": ctx}])
    assert run_qa.postprocess_qa_predictions(ex, feats, preds, version_2_with_negative=True) == {
        "x": ""
    }
    # null score 10 vs best span 4: with a threshold above 6 the span wins
    out = run_qa.postprocess_qa_predictions(
        ex,
        feats,
        preds,
        version_2_with_negative=True,
        null_score_diff_threshold=7.0,
        output_dir=str(tmp_path),
        prefix="eval",
    )
    assert out == {"x": "cat"}
    assert json.load(open(tmp_path / "eval_null_odds.json")) == {"x": pytest.approx(6.0)}
    nbest = json.load(open(tmp_path / "eval_nbest_predictions.json"))["x"]
    assert abs(sum(c["probability"] for c in nbest) - 1) < 1e-6


def test_postprocess_takes_best_over_features():
    ctx = "the cat sat on the mat"
    f1 = {"example_id": "x", "offset_mapping": [None, (0, 3), (4, 7), (8, 11)]}
    f2 = {"example_id": "x", "offset_mapping": [None, (12, 14), (15, 18), (19, 22)]}
    start = np.array([[0, 1.0, 0, 0], [0, 0, 0, 3.0]])
    end = np.array([[0, 1.0, 0, 0], [0, 0, 0, 3.0]])
    ex = Dataset.from_list([{"id": "x", "context": ctx}])
    assert run_qa.postprocess_qa_predictions(ex, [f1, f2], (start, end)) == {"x": "mat"}


def test_squad_metrics():
    assert run_qa.normalize_answer("The  Cat, sat!") == "cat sat"
    assert run_qa.f1_score("cat sat down", "the cat sat") == pytest.approx(0.8)
    refs = [
        {"id": "a", "answers": {"text": ["on the mat", "the mat"], "answer_start": [0, 3]}},
        {"id": "b", "answers": {"text": ["blue"], "answer_start": [0]}},
    ]
    m = run_qa.squad_metrics({"a": "mat", "b": "red"}, refs)
    assert m == {"exact_match": 50.0, "f1": 50.0}
    m = run_qa.squad_metrics({"a": "the mat.", "b": "blue"}, refs)
    assert m == {"exact_match": 100.0, "f1": 100.0}
    refs2 = refs + [{"id": "c", "answers": {"text": [], "answer_start": []}}]
    m2 = run_qa.squad_metrics(
        {"a": "cat", "b": "blue", "c": ""}, refs2, version_2_with_negative=True
    )
    assert m2["NoAns_exact"] == 100.0 and m2["HasAns_exact"] == 50.0 and m2["total"] == 3
    assert m2["exact"] == pytest.approx(200 / 3)
    assert run_qa.squad_metrics({"c": "blue"}, refs2[2:], True)["exact"] == 0.0


# -- short runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny_qa")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForQuestionAnswering(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _run(model_dir, tmp_path, *extra, v2=False):
    train = squad_json(tmp_path / "train.json", n=24, v2=v2)
    dev = squad_json(tmp_path / "dev.json", n=8, v2=v2)
    out = tmp_path / "out"
    args = [
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(train),
        "--validation_file",
        str(dev),
        "--do_train",
        "--do_eval",
        "--max_seq_length",
        "32",
        "--doc_stride",
        "8",
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--max_steps",
        "6",
        "--learning_rate",
        "1e-3",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--log_level",
        "error",
        *extra,
    ]
    if v2:
        args.append("--version_2_with_negative")
    trainer = run_qa.main(args)
    return trainer, out


def test_run_qa_short_training(model_dir, tmp_path):
    trainer, out = _run(model_dir, tmp_path)
    metrics = json.load(open(out / "eval_results.json"))
    assert 0.0 <= metrics["eval_exact_match"] <= 100.0 and 0.0 <= metrics["eval_f1"] <= 100.0
    preds = json.load(open(out / "eval_predictions.json"))
    assert set(preds) == {f"q{i}" for i in range(8)}
    assert (out / "model.safetensors").exists()


def test_run_qa_v2_with_mfac(model_dir, tmp_path):
    trainer, out = _run(model_dir, tmp_path, "--optim", "mfac", "--mfac_num_grads", "4", v2=True)
    import hf_mfac

    assert isinstance(trainer.optimizer.optimizer, hf_mfac.MFAC)
    metrics = json.load(open(out / "eval_results.json"))
    assert {"eval_exact", "eval_f1", "eval_HasAns_exact", "eval_NoAns_exact"} <= set(metrics)
    assert (out / "eval_null_odds.json").exists()


def test_run_qa_gradual_pruning_with_distillation(model_dir, tmp_path):
    trainer, out = _run(
        model_dir,
        tmp_path,
        "--prune_method",
        "obert",
        "--prune_sparsity",
        "0.5",
        "--prune_start",
        "1",
        "--prune_end",
        "4",
        "--prune_frequency",
        "1",
        "--prune_num_grads",
        "2",
        "--prune_block_size",
        "16",
        "--distill_teacher",
        "self",
        "--distill_hardness",
        "0.5",
    )
    from hf_mfac.integrations.checkpoint import load_sparse_masks, read_sparsity_metadata

    masks = load_sparse_masks(out)
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert pruned == round(0.5 * total)
    assert read_sparsity_metadata(str(out))["method"] == "obert"
    assert trainer.teacher_model is not None
    assert any("sparsity" in h for h in trainer.state.log_history)


def test_run_qa_oneshot_pruning(model_dir, tmp_path):
    trainer, out = _run(
        model_dir,
        tmp_path,
        "--prune_method",
        "cap",
        "--prune_mode",
        "oneshot",
        "--prune_pattern",
        "2:4",
        "--prune_num_grads",
        "3",
        "--prune_block_size",
        "16",
    )
    from hf_mfac.integrations.checkpoint import load_sparse_masks

    masks = load_sparse_masks(out)
    assert all(bool(((~m).reshape(-1, 4).sum(1) == 2).all()) for m in masks.values())
    weights = dict(trainer.model.named_parameters())
    for name, m in masks.items():  # sparse fine-tuning kept the masks
        assert bool((weights[name].detach().cpu()[~m] == 0).all())


def test_features_label_the_answer_span(model_dir, tmp_path, tokenizer):
    """The script's feature preparation (upstream's prepare_train_features /
    prepare_validation_features): long contexts split into overlapping spans, each labelled with its
    answer's tokens or with CLS (answer not in the span, or unanswerable); validation features keep
    their example id and the context offsets only."""
    trainer, _ = _run(model_dir, tmp_path, "--max_seq_length", "24", "--max_steps", "1", v2=True)
    train, val = trainer.train_dataset, trainer.eval_dataset
    assert len(train) > 24, "long contexts are split into several spans"
    found = set()
    for f in train:
        assert len(f["input_ids"]) == 24
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0  # CLS: answer not in this span (or unanswerable)
            continue
        found.add(tokenizer.decode(f["input_ids"][s : e + 1]))
    assert found and found <= {a for _, a in QUESTIONS}
    assert set(val["example_id"]) == {f"q{i}" for i in range(8)}
    # CLS and the question are outside the context
    assert all(f["offset_mapping"][0] is None for f in val)


def test_run_qa_predict(model_dir, tmp_path):
    """--do_predict on a test file: post-processed answers (predict_predictions.json) and their
    metrics."""
    test = squad_json(tmp_path / "test.json", n=6)
    _, out = _run(model_dir, tmp_path, "--do_predict", "--test_file", str(test), "--max_steps", "1")
    assert set(json.load(open(out / "predict_predictions.json"))) == {f"q{i}" for i in range(6)}
    results = json.load(open(out / "predict_results.json"))  # upstream: metric_key_prefix "test"
    assert {"test_exact_match", "test_f1", "predict_samples"} <= set(results)
