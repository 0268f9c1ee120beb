"""The gradual-pruning recipes: each expands to the documented settings, scales with the run's
length, and explicit settings win (hf_mfac.pruning.recipes; pure Python, no model)."""
import pytest

from hf_mfac.core.schedules import cubic_sparsity
from hf_mfac.pruning.recipes import RECIPES, distillation, expand, lr_restarts, recipe_names


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


CAP_300 = [0.4, 0.5, 0.6, 0.65, 0.7, 0.75, *(0.75 + 0.15 * k / 9 for k in range(1, 10))]


def test_cap_at_the_papers_length_is_the_papers_recipe():
    """300 steps stand for the paper's 300 epochs: a pruning step every 20 from 0 to 280, 40 %, 50,
    60, then linear to 75 % at 100 and linear to 90 % at 280 (the official 300-epoch recipe)."""
    s = expand("cap", max_steps=300, sparsity=0.9)
    assert (s["method"], s["start"], s["frequency"], s["end"]) == ("cap", 0, 20, 280)
    assert prune_steps(s) == list(range(0, 281, 20))
    assert s["sparsity"] is None
    assert s["sparsities"] == pytest.approx(CAP_300)
    assert (s["num_grads"], s["block_size"]) == (4096, 192)
    assert s["cyclic_lr"] is True and s["lr_min_ratio"] == pytest.approx(0.02)  # 5e-4 -> 1e-5
    assert distillation("cap") is None
    steps = dict(zip(prune_steps(s), s["sparsities"]))
    assert (steps[20], steps[40], steps[100], steps[280]) == pytest.approx((0.5, 0.6, 0.75, 0.9))


@pytest.mark.parametrize("max_steps", [16, 60, 100, 301, 997])
def test_cap_scales_with_the_run(max_steps):
    """Fifteen steps whatever the run's length, finer towards the end, the recovery after the last
    at least the paper's 1/15 of training."""
    s = expand("cap", max_steps=max_steps, sparsity=0.9)
    steps = prune_steps(s)
    assert len(steps) == 15 and steps[0] == 0 and steps[-1] == s["end"] < max_steps
    assert max_steps - steps[-1] >= max_steps / 15 - 1
    assert s["sparsities"] == pytest.approx(CAP_300)
    jumps = [b - a for a, b in zip(s["sparsities"], s["sparsities"][1:])]
    assert all(b <= a + 1e-12 for a, b in zip(jumps, jumps[1:]))  # never coarser later on
    assert jumps[-1] == pytest.approx(0.15 / 9)


def test_cap_levels_for_another_target_and_count():
    """Another target: the same fractions of the way from 40 %; another number of steps (a given
    frequency): the levels read off the same curve, still ending at the target."""
    s = expand("cap", max_steps=300, sparsity=0.8)
    assert s["sparsities"] == pytest.approx([0.4 + 0.4 * (x - 0.4) / 0.5 for x in CAP_300])
    fewer = expand("cap", max_steps=300, sparsity=0.9, given={"frequency": 40})
    assert prune_steps(fewer) == list(range(0, 281, 40))
    assert fewer["sparsities"] == pytest.approx(CAP_300[::2])
    three = expand("cap", max_steps=300, sparsity=0.9, given={"frequency": 140})
    assert three["sparsities"] == pytest.approx([0.4, CAP_300[7], 0.9])


def test_lr_restarts():
    """oBERT (and magnitude) decay the rate over the dense steps before the first pruning step,
    i.e. it restarts at step 0 too; CAP prunes at step 0; no recipe: the pruning steps."""
    assert lr_restarts("obert", [2, 6, 10]) == [0, 2, 6, 10]
    assert lr_restarts("magnitude", [10, 2]) == [0, 2, 10]
    assert lr_restarts("cap", [0, 4, 8]) == [0, 4, 8]
    assert lr_restarts("cap", [3, 7]) == [3, 7]
    assert lr_restarts(None, [5, 9]) == [5, 9]
    assert lr_restarts("obert", []) == []


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
    assert expand("cap", max_steps=100, sparsity=0.3)["initial_sparsity"] == 0.3


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="sparsegpt", max_steps=100, sparsity=0.9), "unknown pruning recipe"),
    (dict(name="obert", max_steps=7, sparsity=0.9), "more than 7 optimizer steps"),
    (dict(name="cap", max_steps=15, sparsity=0.9), "prunes 15 times"),
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
    run = c.for_run(300)
    assert (run.start, run.frequency, run.end, run.unit) == (0, 20, 280, "steps")
    assert run.sparsity is None
    assert run.sparsities == pytest.approx(CAP_300)
    assert run.num_grads == 64 and run.for_run(300) == run  # resolving twice changes nothing
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


def _tiny_bert_and_data(transformers, n: int):
    """A tiny random BERT classifier (3 labels) and ``n`` examples of 10 random tokens."""
    import torch

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (n, 10), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": int(ids[i, 0]) % 3} for i in range(n)]
    return model, data


@pytest.mark.parametrize("recipe, given", [("magnitude", {}), ("obert", {"num_grads": 4}),
                                           ("cap", {"num_grads": 4, "block_size": 8})])
def test_callback_prunes_on_the_recipes_steps_with_rewinds(tmp_path, recipe, given):
    transformers = pytest.importorskip("transformers")
    from hf_mfac.integrations import PruningCallback

    model, data = _tiny_bert_and_data(transformers, 64)
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
    assert cb.current_sparsity() == pytest.approx(0.9, abs=1e-3)
    assert (cb.pruner.name, cb.config.num_grads) == (recipe, given.get("num_grads"))
    if recipe == "cap":  # 15 steps every 2 from 0, the last ones finer
        assert [t for t, _ in cb.schedule] == list(range(0, 29, 2))
        assert [s for _, s in cb.schedule] == pytest.approx(CAP_300)
        # the learning rate restarts at its peak at each pruning step, decays linearly to 0.02x
        for t in (0, 2, 28):
            assert lrs[t] == pytest.approx(1e-3, rel=1e-6)
        assert lrs[1] == pytest.approx(1e-3 * (1 - 0.98 / 2)) and lrs[29] < 0.6e-3
        return
    assert [t for t, _ in cb.schedule] == [2, 6, 10, 14, 18, 22, 26]
    assert cb.schedule[0][1] == pytest.approx(0.7) and cb.schedule[-1][1] == pytest.approx(0.9)
    # the learning rate restarts at its peak at each pruning step and decays linearly towards 0.1x;
    # before the first pruning step it decays from its peak too (oBERT's dense epochs)
    for t in (0, 2, 6, 26):
        assert lrs[t] == pytest.approx(1e-3, rel=1e-6)
    assert lrs[1] == pytest.approx(1e-3 * (1 - 0.9 / 2))
    assert lrs[5] < 0.5e-3 and lrs[29] < 0.5e-3


def _bench_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recipe.py"
    spec = importlib.util.spec_from_file_location("bench_recipe_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_benchmarks_rows_are_checked_before_training():
    """bench_recipe.py's rows: a recipe, ``+kd``, or ``+<key>=<value>`` overrides (the distillation
    weight of a distilling recipe, recomputations of a Fisher recipe, the first step's sparsity),
    alone or together; anything else is refused by name before the dense start is trained."""
    bench = _bench_recipe()
    assert bench.parse_row("dense") == ("dense", "", {})
    assert bench.parse_row("cap+kd") == ("cap", "kd", {"kd": True})
    assert bench.parse_row("obert+hardness=0.5") == ("obert", "hardness=0.5", {"hardness": 0.5})
    assert bench.parse_row("obert+recompute=4+initial_sparsity=0.5") == (
        "obert", "recompute=4+initial_sparsity=0.5", {"recompute": 4, "initial_sparsity": 0.5})
    assert bench.parse_row("magnitude+initial_sparsity=0.3")[2] == {"initial_sparsity": 0.3}
    # +kd gives CAP a distillation, whose weight +hardness then sets (in either order)
    for row in ("cap+kd+hardness=0.5", "cap+hardness=0.5+kd"):
        assert bench.parse_row(row)[2] == {"kd": True, "hardness": 0.5}
    for bad in ("obert+hardness=1.5", "obert+hardness=x", "cap+hardness=0.5", "dense+kd",
                "obert+lr=1", "nosuch", "obert+recompute=0", "obert+recompute=2.5",
                "magnitude+recompute=2", "obert+initial_sparsity=1", "obert+fast"):
        with pytest.raises(ValueError, match="row|recipe"):
            bench.parse_row(bad)


def test_the_benchmarks_sparsity_at_each_evaluation(tmp_path):
    """benchmarks/bench_recipe.py reads the sparsity at each evaluation off the schedule
    (``sparsity_at``): the callback prunes at the start of a step, so the evaluation at step t
    comes before a pruning step scheduled at t. Checked against the callback's masks at each
    evaluation of a real run."""
    transformers = pytest.importorskip("transformers")
    from hf_mfac.integrations import PruningCallback

    bench = _bench_recipe()
    assert bench.sparsity_at([(0, 0.4), (4, 0.5)], 0) == 0.0
    assert bench.sparsity_at([(0, 0.4), (4, 0.5)], 4) == 0.4
    assert bench.sparsity_at([(0, 0.4), (4, 0.5)], 5) == 0.5

    model, data = _tiny_bert_and_data(transformers, 32)
    seen = {}
    cb = PruningCallback(recipe="magnitude", final_sparsity=0.9)

    class AtEval(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, **kw):
            seen[state.global_step] = cb.current_sparsity()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
        eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   eval_dataset=data[:8], callbacks=[AtEval()])
    cb.attach(trainer)
    trainer.train()
    assert sorted(seen) == list(range(2, 31, 2))
    # the schedule prunes at 2, 6, ..., 26: the evaluations at those steps see the level before
    assert [t for t, _ in cb.schedule] == [2, 6, 10, 14, 18, 22, 26]
    for step, got in seen.items():
        assert got == pytest.approx(bench.sparsity_at(cb.schedule, step), abs=2e-3), step


def test_the_benchmarks_plot_only_redraws_with_the_runs_own_settings(tmp_path, capsys):
    """``bench_recipe.py --plot_only`` draws and tabulates a results.json made with other flags
    than the defaults (it takes the runs' settings from the file), and refuses a folder without
    one, creating nothing."""
    pytest.importorskip("matplotlib")
    import json

    bench = _bench_recipe()
    settings = {k: getattr(bench.parse_args([]), k) for k in bench._SAME}
    settings.update(num_grads=32, eval_every=50, sparsity=0.8)
    curve = [[50, 0.77], [100, 0.78]]
    runs = {"dense": {"0": {"accuracy": 0.8, "sparsity": 0.0, "curve": curve, "seconds": 1.0,
                            "pruning_seconds": 0.0, "settings": {}}},
            "obert": {"0": {"accuracy": 0.77, "sparsity": 0.8, "curve": curve, "seconds": 2.0,
                            "pruning_seconds": 1.0,
                            "settings": {"schedule": [[20, 0.7], [60, 0.8]]}}}}
    (tmp_path / "results.json").write_text(json.dumps(
        {"dense_start": {"0": 0.79}, "runs": runs, "settings": settings,
         "commands": ["python benchmarks/bench_recipe.py --seeds 0"], "machines": ["cpu"],
         "minutes": 3.0}))
    bench.main(["--plot_only", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| obert | 80.0% | 0.770 |" in out
    assert (tmp_path / "accuracy_along_training.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"] == settings
    missing = tmp_path / "nothing_here"
    with pytest.raises(SystemExit, match="no .*results.json"):
        bench.main(["--plot_only", "--output_dir", str(missing)])
    assert not missing.exists()
