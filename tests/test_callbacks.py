"""PruningCallback inside transformers.Trainer with a tiny BERT: schedule, masks, metrics,
checkpoints, resume, sweeps, cyclic LR, hf_mfac.MFAC, distillation."""
import json
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_mfac  # noqa: E402
from hf_mfac.core.schedules import cubic_sparsity  # noqa: E402
from hf_mfac.core.schedules import cyclic_linear_lambda  # noqa: E402
from hf_mfac.integrations.gradual import (  # noqa: E402
    CHECKPOINT_MASKS_NAME,
    CHECKPOINT_STATE_NAME,
    DistillationTrainer,
    PruningArguments,
    PruningCallback,
    distillation_loss,
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def dataset(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, 10), generator=g)
    y = (ids == 7).any(1).long() + (ids == 9).any(1).long()
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": y[i]}
        for i in range(n)
    ]


def targets_of(model, cb):
    params = dict(model.named_parameters())
    return {n: params[n] for n in cb.targets}


class Spy(TrainerCallback):
    """Records, after every optimizer step, the sparsity of the targets and whether pruned weights
    are zero."""

    def __init__(self, cb):
        self.cb, self.sparsity, self.zero_ok, self.logs, self.lrs = cb, {}, True, [], {}

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs[state.global_step] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, **kw):
        if self.cb.masks:
            for name, m in self.cb.masks.items():
                self.zero_ok &= bool((self.cb.targets[name].detach()[~m] == 0).all())
        self.sparsity[state.global_step] = self.cb.current_sparsity()

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))


def make_trainer(
    tmp_path, cb, max_steps=12, model=None, train=None, attach=True, trainer_cls=Trainer, **kw
):
    args = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=100,
        seed=0,
        data_seed=0,
    )
    args.update(kw.pop("args", {}))
    args_cls = kw.pop("args_cls", TrainingArguments)
    spy = Spy(cb)
    trainer = trainer_cls(
        model=model or tiny_model(),
        args=args_cls(**args),
        train_dataset=train or dataset(),
        callbacks=[spy] + ([] if attach else [cb]),
        **kw,
    )
    if attach:
        cb.attach(trainer)
    return trainer, spy


def obert(**kw):
    base = dict(
        final_sparsity=0.6,
        initial_sparsity=0.2,
        start=2,
        end=8,
        frequency=3,
        num_grads=4,
        block_size=16,
    )
    return PruningCallback("obert", **{**base, **kw})


# -- schedule, masks, metrics
# ------------------------------------------------------------------------------------
def test_sparsity_follows_the_cubic_schedule_and_masks_hold(tmp_path):
    cb = obert()
    trainer, spy = make_trainer(tmp_path, cb)
    trainer.train()
    expected = [
        (t, cubic_sparsity(t, start_step=2, end_step=8, initial_sparsity=0.2, final_sparsity=0.6))
        for t in (2, 5, 8)
    ]
    assert cb.schedule == expected
    assert [h["step"] for h in cb.history] == [2, 5, 8]
    # pruning at step t happens before optimizer step t+1: spy sees it at the end of that step
    for t, s in expected:
        assert spy.sparsity[t + 1] == pytest.approx(s, abs=1e-4)
    assert spy.sparsity[1] == 0.0 and spy.sparsity[12] == pytest.approx(0.6, abs=1e-4)
    assert spy.zero_ok, "pruned weights stayed exactly zero after every optimizer step"
    total = sum(p.numel() for p in cb.targets.values())
    assert sum(int((~m).sum()) for m in cb.masks.values()) == round(0.6 * total)
    # momentum of pruned coordinates was cleared (AdamW exp_avg) and stays zero
    opt = trainer.optimizer.optimizer
    for name, m in cb.masks.items():
        st = opt.state[cb.targets[name]]
        assert bool((st["exp_avg"][~m] == 0).all())


def test_metrics_reach_log_history_and_other_callbacks(tmp_path):
    cb = obert()
    trainer, spy = make_trainer(tmp_path, cb)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sparsity" in h]
    assert [h["step"] for h in logged] == [2, 5, 8]
    assert {"pruning_target", "pruning_saliency", "pruning_time", "pruning_grad_share"} <= set(
        logged[0]
    )
    # what TensorBoard/W&B callbacks receive: on_log of every callback
    seen = [entry for entry in spy.logs if "sparsity" in entry]
    assert [round(entry["sparsity"], 3) for entry in seen] == [
        round(h["sparsity"], 3) for h in logged
    ]


def test_unattached_callback_logs_to_history_only(tmp_path, caplog):
    cb = obert()
    trainer, spy = make_trainer(tmp_path, cb, attach=False)
    with caplog.at_level(logging.WARNING, logger="hf_mfac"):
        trainer.train()
    assert "attach" in caplog.text
    assert len([h for h in trainer.state.log_history if "sparsity" in h]) == 3
    assert not [entry for entry in spy.logs if "sparsity" in entry]


@pytest.mark.parametrize("log_level,shown", [("info", True), ("warning", False)])
def test_pruning_step_is_logged_at_the_trainer_log_level(
    tmp_path, caplog, capsys, log_level, shown
):
    """At --log_level info a pruning step logs when it starts and what it did (the "hf_mfac" logger
    follows TrainingArguments.get_process_log_level(), as transformers' loggers do), and its metric
    reaches the log; with tqdm enabled the gradients get a progress bar."""
    logging.getLogger("hf_mfac").setLevel(logging.WARNING)
    cb = PruningCallback("obert", 0.5, start=2, end=2, num_grads=4, block_size=16)
    trainer, _ = make_trainer(
        tmp_path, cb, max_steps=3, args=dict(log_level=log_level, disable_tqdm=False)
    )
    trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_mfac"]
    started = [m for m in lines if m.startswith("PruningCallback: step 2: pruning with obert")]
    done = [
        m for m in lines if m.startswith("PruningCallback: step 2: sparsity 0.5000 (target 0.5000)")
    ]
    assert bool(started) == shown and bool(done) == shown
    assert [h["sparsity"] for h in trainer.state.log_history if "sparsity" in h] == [
        pytest.approx(0.5, abs=1e-3)
    ]
    assert "collecting gradients" in capsys.readouterr().err


def test_calibration_dataloader_and_epoch_unit(tmp_path):
    calib = [
        {
            "input_ids": torch.randint(5, 50, (4, 10)),
            "attention_mask": torch.ones(4, 10, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,)),
        }
        for _ in range(4)
    ]
    cb = PruningCallback(
        "magnitude", 0.5, start=0.5, end=1.0, frequency=0.25, unit="epochs", dataloader=calib
    )
    trainer, spy = make_trainer(tmp_path, cb, max_steps=40)  # 160 samples / 8 = 20 steps per epoch
    trainer.train()
    assert [t for t, _ in cb.schedule] == [15, 20]  # t=10 has cubic sparsity 0 and is skipped
    assert spy.sparsity[40] == pytest.approx(0.5, abs=1e-4)


def test_nm_pattern_prunes_once(tmp_path):
    cb = PruningCallback("obert", pattern="2:4", start=3, num_grads=4, block_size=16)
    trainer, spy = make_trainer(tmp_path, cb)
    trainer.train()
    assert cb.schedule == [(3, None)]
    for m in cb.masks.values():
        assert bool(((~m).reshape(-1, 4).sum(1) == 2).all())
    assert spy.zero_ok


def test_sparse_finetuning_with_mfac(tmp_path):
    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments

    cb = obert()
    trainer, spy = make_trainer(
        tmp_path,
        cb,
        trainer_cls=MFACTrainer,
        args_cls=MFACTrainingArguments,
        args={"optim": "mfac", "mfac_num_grads": 4, "learning_rate": 1e-3},
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, hf_mfac.MFAC)
    masks = {p: m for p, m in opt.masks.items()}
    assert len(masks) == len(cb.masks)
    for name, m in cb.masks.items():
        assert torch.equal(masks[cb.targets[name]], m)
    assert spy.zero_ok and spy.sparsity[12] == pytest.approx(0.6, abs=1e-4)
    kept = sum(int(m.sum()) for m in cb.masks.values())
    others = sum(
        p.numel()
        for n, p in trainer.model.named_parameters()
        if n not in cb.masks and p.requires_grad
    )
    assert opt.window.dim == kept + others, "the M-FAC window covers the kept weights only"


# -- checkpoints and resume
# ------------------------------------------------------------------------------
def test_checkpoints_hold_masks_and_resume_keeps_them(tmp_path):
    ref_cb = obert()
    ref, _ = make_trainer(tmp_path / "ref", ref_cb)
    ref.train()

    cb = obert()
    trainer, _ = make_trainer(tmp_path, cb, args={"save_strategy": "steps", "save_steps": 6})
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-6"
    assert (ckpt / CHECKPOINT_MASKS_NAME).exists() and (ckpt / CHECKPOINT_STATE_NAME).exists()
    state = json.load(open(ckpt / CHECKPOINT_STATE_NAME))
    assert state["last_pruned_step"] == 5 and [h["step"] for h in state["history"]] == [2, 5]

    cb2 = obert()
    resumed, spy = make_trainer(tmp_path, cb2, args={"save_strategy": "steps", "save_steps": 6})
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["step"] for h in cb2.history] == [2, 5, 8], (
        "history restored, step 8 pruned after resume"
    )
    assert spy.sparsity[7] == pytest.approx(state["sparsity"], abs=1e-6), (
        "resumed with the checkpoint's masks"
    )
    for name in ref_cb.masks:
        assert torch.equal(cb2.masks[name], ref_cb.masks[name]), (
            "same masks as an uninterrupted run"
        )
    assert spy.zero_ok


def test_resume_without_mask_file_rebuilds_from_zeros(tmp_path, caplog):
    cb = obert()
    trainer, _ = make_trainer(tmp_path, cb, args={"save_strategy": "steps", "save_steps": 6})
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-6"
    saved = json.load(open(ckpt / CHECKPOINT_STATE_NAME))["sparsity"]
    os.remove(ckpt / CHECKPOINT_MASKS_NAME)
    cb2 = obert()
    resumed, spy = make_trainer(tmp_path, cb2, max_steps=7)
    with caplog.at_level(logging.WARNING, logger="hf_mfac"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    assert "rebuilt from the zero weights" in caplog.text
    assert spy.sparsity[7] == pytest.approx(saved, abs=1e-6)


def test_sweep_saves_one_checkpoint_per_target(tmp_path):
    cb = PruningCallback(
        "obert",
        sparsities=[0.3, 0.5, 0.7],
        start=0,
        frequency=4,
        num_grads=4,
        block_size=16,
        save_at_targets=True,
    )
    trainer, _ = make_trainer(tmp_path, cb)
    trainer.train()
    found = {}
    for step in (4, 8, 12):
        st = json.load(open(tmp_path / "out" / f"checkpoint-{step}" / CHECKPOINT_STATE_NAME))
        found[step] = round(st["sparsity"], 4)
    assert found == {4: 0.3, 8: 0.5, 12: 0.7}


# -- learning rate, distillation, arguments
# -----------------------------------------------------------------
def test_cyclic_linear_lambda():
    f = cyclic_linear_lambda([2, 6], max_steps=10, lr_min_ratio=0.1)
    assert [round(f(t), 3) for t in range(11)] == [
        1.0,
        1.0,
        1.0,
        0.775,
        0.55,
        0.325,
        1.0,
        0.775,
        0.55,
        0.325,
        0.1,
    ]


def test_cyclic_lr_in_trainer(tmp_path):
    cb = obert(cyclic_lr=True, lr_min_ratio=0.1)
    trainer, spy = make_trainer(tmp_path, cb)
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    lr = spy.lrs  # lr used by optimizer step t+1, read at on_step_begin of global_step t
    assert (
        lr[2] == pytest.approx(1e-3)
        and lr[5] == pytest.approx(1e-3)
        and lr[8] == pytest.approx(1e-3)
    )
    assert lr[4] < lr[3] < lr[2] and lr[11] < lr[9]
    with pytest.raises(ValueError, match="attach"):
        t2, _ = make_trainer(tmp_path / "b", obert(cyclic_lr=True), attach=False)
        t2.train()


def test_distillation():
    s = torch.randn(4, 3)
    assert float(distillation_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(s, torch.randn(4, 3))) > 0
    teacher = tiny_model(1)
    args = TrainingArguments(output_dir="/tmp/unused", report_to=[], use_cpu=True)
    tr = DistillationTrainer(
        model=tiny_model(0),
        args=args,
        teacher_model=teacher,
        distill_hardness=1.0,
        distill_temperature=2.0,
    )
    batch = {
        k: torch.stack([d[k] for d in dataset(8)])
        for k in ("input_ids", "attention_mask", "labels")
    }
    tr.model.train()
    loss = tr.compute_loss(tr.model, batch).detach()
    with torch.no_grad():
        expected = distillation_loss(tr.model(**batch).logits, teacher(**batch).logits, 2.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="hardness"):
        DistillationTrainer(
            model=tiny_model(0), args=args, teacher_model=teacher, distill_hardness=1.5
        )


def test_pruning_arguments_build_callbacks():
    parser = transformers.HfArgumentParser(PruningArguments)
    (pa,) = parser.parse_args_into_dataclasses(
        args=[
            "--prune_method",
            "cap",
            "--prune_sparsity",
            "0.7",
            "--prune_end",
            "10",
            "--prune_num_grads",
            "8",
            "--prune_include",
            "query",
            "value",
        ]
    )
    cb = pa.callback()
    assert (
        cb.pruner.name == "cap"
        and cb.final_sparsity == 0.7
        and cb.end == 10
        and cb.include == ["query", "value"]
    )
    assert pa.oneshot_kwargs()["method"] == "cap"
    assert PruningArguments().callback() is None


def test_pruning_arguments_teacher(tmp_path):
    """--distill_teacher: none, "self" (a separate copy of the starting model), or a saved model
    folder."""
    model = tiny_model(0)
    assert PruningArguments().teacher(model) is None
    twin = PruningArguments(distill_teacher="self").teacher(model)
    assert twin is not model and all(
        torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters())
    )
    tiny_model(1).save_pretrained(tmp_path)
    loaded = PruningArguments(distill_teacher=str(tmp_path)).teacher(
        model, BertForSequenceClassification
    )
    assert torch.equal(next(loaded.parameters()), next(tiny_model(1).parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="final_sparsity"):
        PruningCallback("obert")
    with pytest.raises(ValueError, match="unit"):
        PruningCallback("obert", 0.5, unit="minutes")
    with pytest.raises(ValueError, match="increase"):
        PruningCallback("obert", sparsities=[0.5, 0.3])
    with pytest.raises(ValueError, match="does not support"):
        PruningCallback("cap", 0.5, pattern="4-block")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PruningCallback("obert", 1.0)


def test_initial_masks_above_early_targets(tmp_path):
    from hf_mfac.pruning import find_prunable, prune_oneshot

    model = tiny_model()
    masks, _ = prune_oneshot(model, method="magnitude", sparsity=0.4)
    cb = obert(masks=masks)  # schedule 0.2 (step 2, skipped: already 0.4), then 0.55, 0.6
    trainer, spy = make_trainer(tmp_path, cb, model=model)
    trainer.train()
    assert [h["step"] for h in cb.history] == [5, 8]
    assert spy.sparsity[1] == pytest.approx(0.4, abs=1e-4) and spy.sparsity[12] == pytest.approx(
        0.6, abs=1e-4
    )
    for name, m in masks.items():
        assert not bool((cb.masks[name] & ~m).any())
    assert spy.zero_ok and set(find_prunable(model)) == set(cb.masks)
