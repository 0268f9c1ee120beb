"""PruningConfig / GradualPruningConfig: validation, the prune_oneshot keywords, and the HfArgumentParser front
ends derived from them (names, defaults and help agree)."""
import dataclasses
import inspect

import pytest

from hf_mfac.pruning import GradualPruningConfig, PruningConfig, prune_oneshot
from hf_mfac.pruning.config import from_prefixed, prefixed_fields

BAD = [  # (settings, words the message must contain)
    (dict(sparsity=1.5), "sparsity must lie in [0, 1)"),
    (dict(method="sparsegpt"), "unknown pruning method"),
    (dict(sparsities=[0.5, 0.3]), "increase strictly"),
    (dict(sparsity=0.5, sparsities=[0.6]), "not both"),
    (dict(pattern="2:4", sparsity=0.7), "contradicts the 2:4 pattern"),
    (dict(pattern="3x"), "unknown sparsity pattern"),
    (dict(scope="row"), "scope must be"),
    (dict(num_grads=0), "num_grads must be a positive integer"),
    (dict(damp=-1.0), "damp must be"),
    (dict(rel_damp=0.0), "rel_damp must be"),
]


@pytest.mark.parametrize("settings,message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_fail_on_construction(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        PruningConfig(**settings)


@pytest.mark.parametrize("settings", [dict(unit="epoch"), dict(frequency=0), dict(start=5, end=2),
                                      dict(lr_min_ratio=2.0), dict(initial_sparsity=1.0)])
def test_bad_schedule_fails(settings):
    with pytest.raises(ValueError):
        GradualPruningConfig(sparsity=0.5, **settings)


def test_every_field_has_help():
    for cls in (PruningConfig, GradualPruningConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_oneshot_kwargs_are_prune_oneshot_keywords():
    """Every one-shot field except rel_damp (the pruners' new setting) is a keyword of prune_oneshot; None
    values are left out so the function's default applies."""
    params = inspect.signature(prune_oneshot).parameters
    cfg = PruningConfig(sparsity=0.5, num_grads=8, rel_damp=None)
    kw = cfg.oneshot_kwargs()
    assert kw["sparsity"] == 0.5 and kw["num_grads"] == 8 and "damp" not in kw and "sparsities" not in kw
    names = {f.name for f in dataclasses.fields(PruningConfig)} - {"sparsities", "rel_damp"}
    assert names <= set(params)


def test_replace_validates_and_names_unknown_settings():
    cfg = GradualPruningConfig(sparsity=0.5)
    assert cfg.replace(num_grads=4).num_grads == 4
    with pytest.raises(TypeError, match="unknown pruning settings"):
        cfg.replace(num_gradients=4)
    with pytest.raises(ValueError):
        cfg.replace(sparsity=2.0)


def test_parser_builds_the_same_settings():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(GradualPruningConfig).parse_args_into_dataclasses(
        ["--method", "cap", "--sparsities", "0.5", "0.7", "--num-grads", "8", "--include", "a", "b",
         "--no_reset_momentum", "--unit", "epochs"])
    assert cfg == GradualPruningConfig(method="cap", sparsities=[0.5, 0.7], num_grads=8, include=["a", "b"],
                                       reset_momentum=False, unit="epochs")
    (default,) = HfArgumentParser(GradualPruningConfig).parse_args_into_dataclasses([])
    assert default == GradualPruningConfig()


def test_prefixed_fields_round_trip():
    from transformers import HfArgumentParser

    cls = dataclasses.make_dataclass("Flags", prefixed_fields(GradualPruningConfig, "prune_", {"method": None}))
    (flags,) = HfArgumentParser(cls).parse_args_into_dataclasses(["--prune_sparsity", "0.8", "--prune_damp", "1e-4"])
    assert flags.prune_method is None
    assert from_prefixed(flags, "prune_", method="obert") == GradualPruningConfig(sparsity=0.8, damp=1e-4)
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
    original = {f.name: f.metadata["help"] for f in dataclasses.fields(PruningConfig)}
    assert helps["prune_num_grads"] == original["num_grads"]
