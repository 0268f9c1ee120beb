"""The gradual-pruning recipes: each expands to the documented settings, scales with the run's
length, and explicit settings win (hf_mfac.pruning.recipes; pure Python, no model)."""
import pytest

from hf_mfac.core.schedules import cubic_sparsity
from hf_mfac.pruning.recipes import RECIPES, distillation, expand, recipe_names


def prune_steps(s: dict) -> list[int]:
    """The optimizer steps at which a cubic (start..end every frequency) or sweep schedule
    prunes."""
    if s["sparsities"]:
        return [s["start"] + i * s["frequency"] for i in range(len(s["sparsities"]))]
    return list(range(s["start"], s["end"] + 1, s["frequency"]))


def test_obert_at_the_papers_length_is_the_papers_recipe():
    """30 steps stand for the paper's 30 epochs: prune at 2, 6, ..., 26 from 70 % (cubic) to
    90 %."""
    s = expand("obert", max_steps=30, sparsity=0.9)
    assert (s["method"], s["start"], s["end"], s["frequency"]) == ("obert", 2, 26, 4)
    assert prune_steps(s) == [2, 6, 10, 14, 18, 22, 26]
    assert s["initial_sparsity"] == 0.7 and s["sparsity"] == 0.9 and s["sparsities"] is None
    fisher = (s["num_grads"], s["block_size"], s["fisher_batch_size"], s["recompute"])
    assert fisher == (1024, 50, 16, 1)
    assert s["cyclic_lr"] is True and s["lr_min_ratio"] == pytest.approx(0.1)  # 8e-5 -> 8e-6
    assert s["unit"] == "steps"
    assert distillation("obert") == {"teacher": "self", "hardness": 1.0, "temperature": 2.0}
    levels = [cubic_sparsity(t, start_step=2, end_step=26, initial_sparsity=0.7, final_sparsity=0.9)
              for t in prune_steps(s)]
    assert levels[0] == pytest.approx(0.7) and levels[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("max_steps", [30, 300, 997, 12])
def test_obert_scales_with_the_run(max_steps):
    """Seven pruning steps at the same fractions of training whatever its length, the last one
    followed by recovery steps."""
    s = expand("obert", max_steps=max_steps, sparsity=0.9)
    steps = prune_steps(s)
    assert len(steps) == 7 and steps[-1] == s["end"] < max_steps
    if max_steps >= 300:
        assert abs(s["start"] / max_steps - 2 / 30) < 0.01
        assert abs(s["frequency"] / max_steps - 4 / 30) < 0.01
        assert abs(s["end"] / max_steps - 26 / 30) < 0.02


def test_cap_is_a_linear_sweep_from_40_percent():
    s = expand("cap", max_steps=100, sparsity=0.9)
    assert (s["method"], s["start"], s["frequency"], s["end"]) == ("cap", 0, 20, 80)
    assert s["sparsity"] is None
    assert s["sparsities"] == pytest.approx([0.4, 0.525, 0.65, 0.775, 0.9])
    assert (s["num_grads"], s["block_size"]) == (4096, 192)
    assert s["cyclic_lr"] is True and s["lr_min_ratio"] == pytest.approx(0.02)  # 5e-4 -> 1e-5
    assert distillation("cap") is None


def test_magnitude_is_obert_without_the_fisher():
    m = expand("magnitude", max_steps=300, sparsity=0.9)
    o = expand("obert", max_steps=300, sparsity=0.9)
    assert m["method"] == "magnitude"
    assert m["num_grads"] is None and m["block_size"] is None and m["fisher_batch_size"] is None
    for key in ("start", "end", "frequency", "initial_sparsity", "sparsity", "cyclic_lr",
                "lr_min_ratio"):
        assert m[key] == o[key], key
    assert distillation("magnitude") == distillation("obert")


def test_explicit_settings_win():
    s = expand("obert", max_steps=300, sparsity=0.9,
               given={"num_grads": 128, "block_size": 32, "lr_min_ratio": 0.5, "method": "cap"})
    assert (s["num_grads"], s["block_size"], s["lr_min_ratio"]) == (128, 32, 0.5)
    assert s["method"] == "cap"
    assert s["start"] == 20  # the rest is still the recipe's
    moved = expand("obert", max_steps=300, sparsity=0.9,
                   given={"start": 0, "frequency": 10, "end": 60})
    assert prune_steps(moved) == list(range(0, 61, 10))
    cap = expand("cap", max_steps=100, sparsity=0.8, given={"sparsities": [0.5, 0.8]})
    assert cap["sparsities"] == [0.5, 0.8] and cap["sparsity"] is None


def test_a_low_target_caps_the_first_step():
    assert expand("obert", max_steps=300, sparsity=0.5)["initial_sparsity"] == 0.5
    assert expand("cap", max_steps=100, sparsity=0.3)["sparsities"] == pytest.approx([0.3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="sparsegpt", max_steps=100, sparsity=0.9), "unknown pruning recipe"),
    (dict(name="obert", max_steps=7, sparsity=0.9), "more than 7 optimizer steps"),
    (dict(name="obert", max_steps=100, sparsity=1.0), r"final sparsity in \(0, 1\)"),
])
def test_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expand(kwargs.pop("name"), **kwargs)


def test_names():
    assert recipe_names() == sorted(RECIPES) == ["cap", "magnitude", "obert"]
    assert expand("OBERT", max_steps=30, sparsity=0.9)["method"] == "obert"


# -- the recipe in the config, the callback and the examples' flags --------------------------------
def test_config_takes_the_recipe_and_keeps_explicit_settings():
    from hf_mfac.pruning import GradualPruningConfig

    c = GradualPruningConfig(recipe="cap", sparsity=0.9, num_grads=64)
    assert (c.method, c.num_grads, c.block_size, c.initial_sparsity) == ("cap", 64, 192, 0.4)
    assert c.cyclic_lr is True and c.lr_min_ratio == pytest.approx(0.02)
    run = c.for_run(100)
    assert (run.start, run.frequency, run.end, run.unit) == (0, 20, 80, "steps")
    assert run.sparsity is None
    assert run.sparsities == pytest.approx([0.4, 0.525, 0.65, 0.775, 0.9])
    assert run.num_grads == 64 and run.for_run(100) == run  # resolving twice changes nothing
    epochs = GradualPruningConfig(recipe="obert", sparsity=0.8, unit="epochs", start=1)
    epochs = epochs.for_run(300, 100)
    assert (epochs.start, epochs.frequency) == (100, 40)  # a start given in epochs, in steps
    assert GradualPruningConfig(sparsity=0.9).for_run(300).start == 0  # no recipe: unchanged
    with pytest.raises(ValueError, match="unknown pruning recipe"):
        GradualPruningConfig(recipe="movement", sparsity=0.9)


def test_flags_choose_method_and_distillation():
    transformers = pytest.importorskip("transformers")
    from hf_mfac.integrations import PruningArguments

    parser = transformers.HfArgumentParser(PruningArguments)
    (a,) = parser.parse_args_into_dataclasses(
        ["--prune_recipe", "obert", "--prune_sparsity", "0.9", "--prune_num_grads", "128"])
    assert (a.prune_method, a.distill_teacher) == ("obert", "self")
    assert (a.distill_hardness, a.distill_temperature) == (1.0, 2.0)
    c = a.config()
    assert (c.num_grads, c.block_size, c.fisher_batch_size) == (128, 50, 16)
    assert c.initial_sparsity == 0.7
    (cap,) = parser.parse_args_into_dataclasses(
        ["--prune_recipe", "cap", "--prune_sparsity", "0.9"])
    assert cap.prune_method == "cap" and cap.distill_teacher is None


@pytest.mark.parametrize("recipe, given", [("magnitude", {}), ("obert", {"num_grads": 4})])
def test_callback_prunes_on_the_recipes_steps_with_rewinds(tmp_path, recipe, given):
    transformers = pytest.importorskip("transformers")
    import torch
    from hf_mfac.integrations import PruningCallback

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (64, 10), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": int(ids[i, 0]) % 3} for i in range(64)]
    lrs = {}

    class LR(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            lrs[state.global_step] = optimizer.param_groups[0]["lr"]

    cb = PruningCallback(recipe=recipe, final_sparsity=0.9, **given)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[LR()])
    cb.attach(trainer)
    trainer.train()
    assert [t for t, _ in cb.schedule] == [2, 6, 10, 14, 18, 22, 26]
    assert cb.schedule[0][1] == pytest.approx(0.7) and cb.schedule[-1][1] == pytest.approx(0.9)
    assert cb.current_sparsity() == pytest.approx(0.9, abs=1e-3)
    assert (cb.pruner.name, cb.config.num_grads) == (recipe, given.get("num_grads"))
    # the learning rate restarts at its peak at each pruning step and decays linearly towards 0.1x
    for t in (2, 6, 26):
        assert lrs[t] == pytest.approx(1e-3, rel=1e-6)
    assert lrs[5] < 0.5e-3 and lrs[29] < 0.5e-3
