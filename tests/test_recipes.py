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
