"""PruningConfig / GradualPruningConfig: validation, the prune_oneshot keywords, and the
HfArgumentParser front ends derived from them (names, defaults and help agree)."""
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
    """Every one-shot field except rel_damp (the pruners' new setting) is a keyword of
    prune_oneshot; None values are left out so the function's default applies."""
    params = inspect.signature(prune_oneshot).parameters
    cfg = PruningConfig(sparsity=0.5, num_grads=8, rel_damp=None)
    kw = cfg.oneshot_kwargs()
    assert (
        kw["sparsity"] == 0.5
        and kw["num_grads"] == 8
        and "damp" not in kw
        and "sparsities" not in kw
    )
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
        [
            "--method",
            "cap",
            "--sparsities",
            "0.5",
            "0.7",
            "--num-grads",
            "8",
            "--include",
            "a",
            "b",
            "--no_reset_momentum",
            "--unit",
            "epochs",
        ]
    )
    assert cfg == GradualPruningConfig(
        method="cap",
        sparsities=[0.5, 0.7],
        num_grads=8,
        include=["a", "b"],
        reset_momentum=False,
        unit="epochs",
    )
    (default,) = HfArgumentParser(GradualPruningConfig).parse_args_into_dataclasses([])
    assert default == GradualPruningConfig()


def test_prefixed_fields_round_trip():
    from transformers import HfArgumentParser

    cls = dataclasses.make_dataclass(
        "Flags", prefixed_fields(GradualPruningConfig, "prune_", {"method": None})
    )
    (flags,) = HfArgumentParser(cls).parse_args_into_dataclasses(
        ["--prune_sparsity", "0.8", "--prune_damp", "1e-4"]
    )
    assert flags.prune_method is None
    assert from_prefixed(flags, "prune_", method="obert") == GradualPruningConfig(
        sparsity=0.8, damp=1e-4
    )
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
    original = {f.name: f.metadata["help"] for f in dataclasses.fields(PruningConfig)}
    assert helps["prune_num_grads"] == original["num_grads"]


def _flags(config, cls, prefix=""):
    """``config``'s method and its settings that differ from ``cls``'s defaults, as command-line
    flags (the examples' ``--prune_method`` defaults to no pruning)."""
    argv = []
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if value == f.default and f.name != "method":
            continue
        argv += [
            f"--{prefix}{f.name}",
            *(map(str, value) if isinstance(value, list) else [str(value)]),
        ]
    return argv


def test_one_config_gives_the_same_settings_to_every_front_end():
    """One GradualPruningConfig reaches prune_oneshot (config= or its keywords), PruningCallback,
    the examples' --prune_* flags and ``hf-mfac prune``'s options as the same settings; keywords
    override a config."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

    from hf_mfac.integrations import PruningArguments, PruningCallback
    from hf_mfac.integrations.cli import _dataclasses_from, build_parser

    cfg = GradualPruningConfig(
        method="obert",
        sparsity=0.6,
        scope="layer",
        num_grads=2,
        block_size=8,
        rel_damp=0.05,
        recompute=2,
        woodtaylor=True,
        fisher_batch_size=2,
        include=["query", "value"],
        exclude=["pooler"],
        initial_sparsity=0.1,
        end=6,
        frequency=2,
        reset_momentum=False,
    )
    oneshot = PruningConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PruningConfig)}
    )

    # the examples' flags
    (pa,) = HfArgumentParser(PruningArguments).parse_args_into_dataclasses(
        _flags(cfg, GradualPruningConfig, "prune_")
    )
    assert (
        pa.config() == cfg
        and pa.oneshot_kwargs() == cfg.oneshot_kwargs() == oneshot.oneshot_kwargs()
    )
    # PruningCallback: from the config, from the flags, and with a keyword overriding the config
    assert PruningCallback(config=cfg).config == cfg == pa.callback().config
    overridden = PruningCallback(config=cfg, num_grads=4)
    assert overridden.num_grads == 4 and overridden.config == cfg.replace(num_grads=4)
    # hf-mfac prune's options
    ns = build_parser().parse_args(
        [
            "prune",
            "model",
            "--data",
            "d.csv",
            "--output_dir",
            "out",
            *_flags(oneshot, PruningConfig),
        ]
    )
    (cli_config,) = _dataclasses_from(ns, PruningConfig)
    assert cli_config == oneshot
    # prune_oneshot: config= and the keywords give the same masks
    masks = []
    for kwargs in (dict(config=oneshot), cli_config.oneshot_kwargs()):
        torch.manual_seed(0)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=30,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
        )
        g = torch.Generator().manual_seed(0)
        batches = [
            {
                "input_ids": torch.randint(0, 30, (4, 6), generator=g),
                "labels": torch.tensor([0, 1, 0, 1]),
            }
            for _ in range(2)
        ]
        masks.append(prune_oneshot(model, batches, progress=False, **kwargs).masks)
    assert masks[0].keys() == masks[1].keys() and all(
        k.startswith("bert.encoder") for k in masks[0]
    )
    assert all(
        ("query" in k or "value" in k) and torch.equal(masks[0][k], masks[1][k]) for k in masks[0]
    )


def test_per_sample_and_fisher_batch_size_are_refused_together():
    with pytest.raises(ValueError, match="per_sample=True means one sample per gradient"):
        PruningConfig(per_sample=True, fisher_batch_size=4)
    assert PruningConfig(per_sample=True, fisher_batch_size=1).per_sample


NUMERIC = {  # every numeric field and a good value of it
    PruningConfig: dict(
        sparsity=0.5,
        num_grads=8,
        block_size=16,
        damp=1e-4,
        rel_damp=0.01,
        recompute=2,
        fisher_batch_size=2,
    ),
    GradualPruningConfig: dict(
        initial_sparsity=0.1, start=1, end=10, frequency=2, lr_min_ratio=0.1
    ),
}
NOT_NUMBERS = ["0.8", "80%", False, True, None, [0.5], object()]


@pytest.mark.parametrize(
    "cls,name",
    [(c, n) for c, fields in NUMERIC.items() for n in fields],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_numeric_fields_take_numbers_only(cls, name):
    """A string ("0.8", "80%"), a bool or any other non-number is refused for each numeric field,
    naming the field; the good value is accepted (None too where the field is optional)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    numeric = ("float", "int", "float | None", "int | None")
    assert set(NUMERIC[PruningConfig]) | set(NUMERIC[GradualPruningConfig]) >= {
        f.name for f in dataclasses.fields(GradualPruningConfig) if f.type in numeric
    }
    good = {"sparsity": 0.5} if name != "sparsity" else {}
    assert getattr(cls(**good, **{name: NUMERIC[cls][name]}), name) == NUMERIC[cls][name]
    for bad in NOT_NUMBERS:
        if bad is None and fields[name].default is None:
            assert getattr(cls(**good, **{name: None}), name) is None
            continue
        with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
            cls(**good, **{name: bad})


@pytest.mark.parametrize(
    "name", ["woodtaylor", "per_sample", "reset_momentum", "cyclic_lr", "save_at_targets"]
)
def test_flags_take_bools_only(name):
    """``"False"`` is a true string: a flag given a string (or 2, or None) is refused, naming it."""
    assert getattr(GradualPruningConfig(sparsity=0.5, **{name: True}), name) is True
    for bad in ["False", "yes", 2, None]:
        with pytest.raises(TypeError, match=rf"{name} must be True or False"):
            GradualPruningConfig(sparsity=0.5, **{name: bad})


def test_sparsities_take_a_list_of_numbers():
    assert PruningConfig(sparsities=(0.3, 0.5)).sparsities == [0.3, 0.5]
    for bad in ["0.3", ["0.3", "0.5"], [0.3, False], 0.5]:
        with pytest.raises((TypeError, ValueError), match="sparsities"):
            PruningConfig(sparsities=bad)


def test_a_pruner_instance_holds_its_settings():
    from hf_mfac.pruning import OBSPruner

    pruner = OBSPruner(block_size=16)
    assert PruningConfig(method=pruner).pruner() is pruner
    with pytest.raises(ValueError, match=r"\['block_size', 'scope'\] are set on the Pruner"):
        PruningConfig(method=pruner, block_size=8, scope="layer")
    with pytest.raises(ValueError, match=r"\['device'\] are set on the Pruner instance"):
        PruningConfig(method=pruner).pruner(device="cpu")
    held = PruningConfig(method="obert", block_size=8).with_pruner(pruner)
    assert held == PruningConfig(method=pruner)
