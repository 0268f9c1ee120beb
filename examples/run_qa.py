#!/usr/bin/env python
# Copyright 2020 The HuggingFace Inc. team. Copyright 2026 the hf_mfac authors.
# Licensed under the Apache License, Version 2.0.
"""Fine-tune (and prune) a model for extractive question answering on SQuAD v1.1 / v2.0 from local JSON.

Port of transformers' ``examples/pytorch/question-answering/run_qa.py`` (with its ``utils_qa.py``
post-processing and ``trainer_qa.py`` evaluation loop) that

* reads local files only: the official SQuAD layout (``{"data": [{"title", "paragraphs": [{"context", "qas":
  [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``) or flat records
  (``.json`` list / ``{"data": [...]}`` or ``.jsonl``) with ``id``, ``context``, ``question`` and
  ``answers: {"text": [...], "answer_start": [...]}``; no ``datasets`` needed;
* computes EM/F1 locally (the official SQuAD v1.1 / v2.0 normalisation; ``evaluate.load`` needs the Hub);
* parses :class:`hf_mfac.integrations.MFACTrainingArguments`, so ``--optim mfac`` works, and
  :class:`hf_mfac.integrations.callbacks.PruningArguments`: ``--prune_method obert --prune_sparsity 0.8
  --prune_end 2 --prune_unit epochs ...`` prunes gradually during training (oBERT recipe; add
  ``--distill_teacher self`` for distillation from the dense starting model), ``--prune_mode oneshot`` prunes
  before training/evaluation.

Example::

    python examples/run_qa.py --model_name_or_path path/to/bert-finetuned-squad --train_file train.json \
        --validation_file dev.json --do_train --do_eval --max_seq_length 384 --doc_stride 128 \
        --prune_method obert --prune_sparsity 0.8 --prune_unit epochs --prune_end 2 --prune_frequency 0.5 \
        --prune_num_grads 1024 --distill_teacher self --output_dir out/squad-obert80
"""
import collections
import json
import logging
import os
import re
import string
import sys
from dataclasses import dataclass, field

import numpy as np

import transformers
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import PredictionOutput, get_last_checkpoint

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments
from hf_mfac.integrations.callbacks import DistillationMixin, PruningArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder of a pretrained model (a fast tokenizer inside)."})
    config_name: str | None = field(default=None, metadata={"help": "Config folder, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Unused (kept for command-line compatibility)."})


@dataclass
class DataTrainingArguments:
    train_file: str | None = field(default=None, metadata={"help": "SQuAD-layout JSON (or JSONL) training file."})
    validation_file: str | None = field(default=None, metadata={"help": "SQuAD-layout JSON validation file."})
    test_file: str | None = field(default=None, metadata={"help": "SQuAD-layout JSON test file."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per feature (question + context span)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap between the spans of a long context."})
    pad_to_max_length: bool = field(default=True, metadata={"help": "Pad every feature to max_seq_length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training features."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test examples."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2: some questions have no answer."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "v2: predict no answer when null score - best span score > this."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates considered per feature."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Unused (no cache)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Unused."})

    def __post_init__(self):
        if self.train_file is None and self.validation_file is None and self.test_file is None:
            raise ValueError("give --train_file, --validation_file or --test_file (local SQuAD-layout JSON)")


# -- data ---------------------------------------------------------------------------------------------------
def load_squad_file(path: str) -> list[dict]:
    """Examples ``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    if isinstance(records, dict):
        records = records.get("data", records)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records or {{'data': [...]}}")
    examples = []
    for rec in records:
        if "paragraphs" in rec:  # official nested layout
            for para in rec["paragraphs"]:
                for qa in para["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    examples.append({"id": str(qa["id"]), "title": rec.get("title", ""), "context": para["context"],
                                     "question": qa["question"],
                                     "answers": {"text": [a["text"] for a in answers],
                                                 "answer_start": [int(a["answer_start"]) for a in answers]}})
        else:
            ans = rec.get("answers", {"text": [], "answer_start": []})
            if isinstance(ans, list):
                ans = {"text": [a["text"] for a in ans], "answer_start": [int(a["answer_start"]) for a in ans]}
            examples.append({"id": str(rec["id"]), "title": rec.get("title", ""), "context": rec["context"],
                             "question": rec["question"], "answers": ans})
    ids = [e["id"] for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids must be unique")
    return examples


def _tokenize(tokenizer, examples, max_seq_length, doc_stride, pad):
    pad_on_right = tokenizer.padding_side == "right"
    questions = [e["question"].lstrip() for e in examples]  # leading spaces would waste the truncation budget
    contexts = [e["context"] for e in examples]
    enc = tokenizer(questions if pad_on_right else contexts, contexts if pad_on_right else questions,
                    truncation="only_second" if pad_on_right else "only_first", max_length=max_seq_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length" if pad else False)
    return enc, (1 if pad_on_right else 0)


_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def prepare_train_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad=True) -> list[dict]:
    """One or more features per example (long contexts are split into overlapping spans), labelled with the
    answer's start/end token; spans that do not contain the answer (and unanswerable questions) point at CLS."""
    enc, ctx_id = _tokenize(tokenizer, examples, max_seq_length, doc_stride, pad)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq = enc.sequence_ids(i)
        ans = examples[enc["overflow_to_sample_mapping"][i]]["answers"]
        start = end = cls
        if ans["answer_start"]:
            s_char = ans["answer_start"][0]
            e_char = s_char + len(ans["text"][0])
            first = seq.index(ctx_id)  # first and last context token of this span
            last = len(seq) - 1 - seq[::-1].index(ctx_id)
            if offsets[first][0] <= s_char and offsets[last][1] >= e_char:
                start = first
                while start <= last and offsets[start][0] <= s_char:
                    start += 1
                start -= 1
                end = last
                while end >= first and offsets[end][1] >= e_char:
                    end -= 1
                end += 1
        feat = {k: enc[k][i] for k in _MODEL_KEYS if k in enc}
        feat.update(start_positions=start, end_positions=end)
        features.append(feat)
    return features


def prepare_validation_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad=True) -> list[dict]:
    """Features with ``example_id`` and ``offset_mapping`` (None outside the context) for post-processing."""
    enc, ctx_id = _tokenize(tokenizer, examples, max_seq_length, doc_stride, pad)
    features = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        feat = {k: enc[k][i] for k in _MODEL_KEYS if k in enc}
        feat["example_id"] = examples[enc["overflow_to_sample_mapping"][i]]["id"]
        feat["offset_mapping"] = [o if seq[k] == ctx_id else None for k, o in enumerate(enc["offset_mapping"][i])]
        features.append(feat)
    return features


def model_inputs(features) -> list[dict]:
    return [{k: f[k] for k in (*_MODEL_KEYS, "start_positions", "end_positions") if k in f} for f in features]


# -- post-processing (utils_qa.postprocess_qa_predictions) -------------------------------------------------------
def postprocess_qa_predictions(examples, features, predictions, version_2_with_negative=False, n_best_size=20,
                               max_answer_length=30, null_score_diff_threshold=0.0, output_dir=None, prefix=None):
    """Turn start/end logits of the features into answer strings of the examples.

    For every feature, the ``n_best_size`` best start and end tokens are paired; pairs outside the context, with
    end < start or longer than ``max_answer_length`` tokens are dropped; the best-scoring span (start + end logit)
    over all features of an example wins. SQuAD v2: the null answer scores ``start_logit[CLS] + end_logit[CLS]``
    (its minimum over the example's features) and is predicted when it beats the best span by more than
    ``null_score_diff_threshold``. Returns ``{id: text}``; with ``output_dir`` writes ``predictions.json``,
    ``nbest_predictions.json`` (and ``null_odds.json`` for v2), prefixed with ``prefix_``.
    """
    start_all, end_all = predictions[:2]
    if len(start_all) != len(features):
        raise ValueError(f"got {len(start_all)} predictions for {len(features)} features")
    by_example = collections.defaultdict(list)
    for i, feat in enumerate(features):
        by_example[feat["example_id"]].append(i)
    answers, nbest_json, null_odds = collections.OrderedDict(), collections.OrderedDict(), collections.OrderedDict()
    for ex in examples:
        null, cands = None, []
        for fi in by_example[ex["id"]]:
            s_log, e_log, offsets = start_all[fi], end_all[fi], features[fi]["offset_mapping"]
            score0 = float(s_log[0] + e_log[0])
            if null is None or score0 < null["score"]:
                null = {"offsets": (0, 0), "score": score0, "start_logit": float(s_log[0]),
                        "end_logit": float(e_log[0])}
            starts = np.argsort(s_log)[::-1][:n_best_size]
            ends = np.argsort(e_log)[::-1][:n_best_size]
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    cands.append({"offsets": (offsets[s][0], offsets[e][1]), "score": float(s_log[s] + e_log[e]),
                                  "start_logit": float(s_log[s]), "end_logit": float(e_log[e])})
        null_score = None if null is None else null["score"]
        if version_2_with_negative and null is not None:
            cands.append(null)
        best = sorted(cands, key=lambda c: c["score"], reverse=True)[:n_best_size]
        if version_2_with_negative and null is not None and not any(c["offsets"] == (0, 0) for c in best):
            best.append(null)
        for c in best:
            s, e = c.pop("offsets")
            c["text"] = ex["context"][s:e]
        if not best or (len(best) == 1 and best[0]["text"] == ""):
            best.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([c.pop("score") for c in best])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for p, c in zip(probs, best):
            c["probability"] = float(p)
        if not version_2_with_negative:
            answers[ex["id"]] = best[0]["text"]
        else:
            top = next(c for c in best if c["text"] != "")
            diff = null_score - top["start_logit"] - top["end_logit"]
            null_odds[ex["id"]] = float(diff)
            answers[ex["id"]] = "" if diff > null_score_diff_threshold else top["text"]
        nbest_json[ex["id"]] = best
    if output_dir is not None:
        pre = f"{prefix}_" if prefix else ""
        outputs = {"predictions.json": answers, "nbest_predictions.json": nbest_json}
        if version_2_with_negative:
            outputs["null_odds.json"] = null_odds
        for name, obj in outputs.items():
            with open(os.path.join(output_dir, pre + name), "w") as f:
                json.dump(obj, f, indent=4)
    return answers


# -- metrics (official SQuAD v1.1 / v2.0 evaluation scripts) ----------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:  # v2: both empty is a match, one empty is not
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict, references: list[dict], version_2_with_negative: bool = False) -> dict:
    """EM and F1 in percent (max over the gold answers). v1: ``exact_match``, ``f1``. v2: ``exact``, ``f1``,
    ``total`` and the ``HasAns_*``/``NoAns_*`` breakdown (unanswerable: the gold answer is "")."""
    em, f1, has = {}, {}, {}
    for ref in references:
        qid = ref["id"]
        golds = [t for t in ref["answers"]["text"] if normalize_answer(t)] or [""]
        if not version_2_with_negative:
            golds = list(ref["answers"]["text"]) or [""]
        pred = predictions.get(qid, "")
        em[qid] = max(exact_match_score(pred, g) for g in golds)
        f1[qid] = max(f1_score(pred, g) for g in golds)
        has[qid] = golds != [""]
    n = max(len(references), 1)
    if not version_2_with_negative:
        return {"exact_match": 100.0 * sum(em.values()) / n, "f1": 100.0 * sum(f1.values()) / n}
    out = {"exact": 100.0 * sum(em.values()) / n, "f1": 100.0 * sum(f1.values()) / n, "total": len(references)}
    for tag, sel in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in has if has[q] == sel]
        if ids:
            out.update({f"{tag}_exact": 100.0 * sum(em[q] for q in ids) / len(ids),
                        f"{tag}_f1": 100.0 * sum(f1[q] for q in ids) / len(ids), f"{tag}_total": len(ids)})
    return out


# -- trainer (trainer_qa.QuestionAnsweringTrainer) -------------------------------------------------------------
class QuestionAnsweringTrainer(DistillationMixin, MFACTrainer):
    """Evaluates by post-processing the logits into answers and scoring them against the examples.
    ``--optim mfac`` (MFACTrainer) and distillation (``teacher_model=``) included."""

    def __init__(self, *args, eval_examples=None, eval_features=None, post_process_function=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples, self.eval_features = eval_examples, eval_features
        self.post_process_function = post_process_function

    def _loop(self, dataset, description, ignore_keys, prefix):
        compute_metrics, self.compute_metrics = self.compute_metrics, None  # metrics need the examples: done here
        try:
            return self.evaluation_loop(self.get_eval_dataloader(dataset) if description == "Evaluation"
                                        else self.get_test_dataloader(dataset), description=description,
                                        prediction_loss_only=True if compute_metrics is None else None,
                                        ignore_keys=ignore_keys, metric_key_prefix=prefix)
        finally:
            self.compute_metrics = compute_metrics

    def evaluate(self, eval_dataset=None, eval_examples=None, eval_features=None, ignore_keys=None,
                 metric_key_prefix: str = "eval"):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        examples = self.eval_examples if eval_examples is None else eval_examples
        features = self.eval_features if eval_features is None else eval_features
        output = self._loop(dataset, "Evaluation", ignore_keys, metric_key_prefix)
        metrics = {k: v for k, v in output.metrics.items()}
        if self.post_process_function is not None and self.compute_metrics is not None:
            preds = self.post_process_function(examples, features, output.predictions, metric_key_prefix)
            for k, v in self.compute_metrics(preds).items():
                metrics[k if k.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{k}"] = v
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, predict_dataset, predict_examples, predict_features, ignore_keys=None,
                metric_key_prefix: str = "test"):
        output = self._loop(predict_dataset, "Prediction", ignore_keys, metric_key_prefix)
        if self.post_process_function is None or self.compute_metrics is None:
            return output
        preds = self.post_process_function(predict_examples, predict_features, output.predictions, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.compute_metrics(preds).items()}
        metrics.update(output.metrics)
        return PredictionOutput(predictions=preds.predictions, label_ids=preds.label_ids, metrics=metrics)


# -- main --------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MFACTrainingArguments, PruningArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args, prune_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args, prune_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    set_seed(training_args.seed)

    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path, config=config)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError("run_qa.py needs a fast tokenizer (offset mappings)")
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    prep = dict(tokenizer=tokenizer, max_seq_length=max_seq_length, doc_stride=data_args.doc_stride,
                pad=data_args.pad_to_max_length)

    train_features = eval_examples = eval_features = predict_examples = predict_features = None
    if training_args.do_train:
        if data_args.train_file is None:
            raise ValueError("--do_train requires a --train_file")
        train_features = prepare_train_features(load_squad_file(data_args.train_file), **prep)
        if data_args.max_train_samples is not None:
            train_features = train_features[: data_args.max_train_samples]
    if training_args.do_eval:
        if data_args.validation_file is None:
            raise ValueError("--do_eval requires a --validation_file")
        eval_examples = load_squad_file(data_args.validation_file)[: data_args.max_eval_samples]
        eval_features = prepare_validation_features(eval_examples, **prep)
    if training_args.do_predict:
        if data_args.test_file is None:
            raise ValueError("--do_predict requires a --test_file")
        predict_examples = load_squad_file(data_args.test_file)[: data_args.max_predict_samples]
        predict_features = prepare_validation_features(predict_examples, **prep)

    data_collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)

    def post_processing_function(examples, features, predictions, stage="eval"):
        answers = postprocess_qa_predictions(
            examples, features, predictions, version_2_with_negative=data_args.version_2_with_negative,
            n_best_size=data_args.n_best_size, max_answer_length=data_args.max_answer_length,
            null_score_diff_threshold=data_args.null_score_diff_threshold,
            output_dir=training_args.output_dir if training_args.should_save else None, prefix=stage)
        references = [{"id": ex["id"], "answers": ex["answers"]} for ex in examples]
        return EvalPrediction(predictions=answers, label_ids=references)

    def compute_metrics(p: EvalPrediction):
        return squad_metrics(p.predictions, p.label_ids, data_args.version_2_with_negative)

    teacher = prune_args.teacher(model, AutoModelForQuestionAnswering)

    if training_args.output_dir and training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
    trainer = QuestionAnsweringTrainer(
        model=model, args=training_args,
        train_dataset=model_inputs(train_features) if train_features is not None else None,
        eval_dataset=model_inputs(eval_features) if eval_features is not None else None,
        eval_examples=eval_examples, eval_features=eval_features, processing_class=tokenizer,
        data_collator=data_collator, post_process_function=post_processing_function,
        compute_metrics=compute_metrics, teacher_model=teacher, distill_hardness=prune_args.distill_hardness,
        distill_temperature=prune_args.distill_temperature)

    callback, masks = prune_args.setup(trainer, has_train_data=train_features is not None)

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_features)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    masks = prune_args.save_sparse(trainer, callback, masks)  # final masks, saved as a sparse checkpoint

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_examples)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        logger.info("*** Predict ***")
        results = trainer.predict(model_inputs(predict_features), predict_examples, predict_features)
        metrics = results.metrics
        metrics["predict_samples"] = len(predict_examples)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
    return trainer


if __name__ == "__main__":
    main()
