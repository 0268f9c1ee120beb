"""The pruning settings, written once: :class:`PruningConfig` (one-shot) and
:class:`GradualPruningConfig` (adds the schedule of :class:`~hf_mfac.integrations.PruningCallback`).

Every front end derives from these dataclasses, so names, defaults and help agree everywhere:
``prune_oneshot(model, dataloader, config, **overrides)`` takes a :class:`PruningConfig` (its fields
are also keywords, which override it), ``PruningCallback(config=..., **overrides)`` takes a
:class:`GradualPruningConfig`, ``hf-mfac prune`` and the examples' ``--prune_*`` flags are built
from the fields by ``transformers.HfArgumentParser`` (the ``help`` metadata becomes the ``--help``
text; :func:`prefixed_fields` adds the ``prune_`` prefix). Every field is checked on construction
(numbers must be numbers: ``"0.8"`` or ``False`` for a sparsity is refused, naming the field).

``None`` means "the method's default": the defaults themselves live in the pruner classes
(``Pruner.default_num_grads`` / ``default_block_size`` / ``default_rel_damp``), one place each.

```python
from hf_mfac.pruning import PruningConfig, prune_oneshot
config = PruningConfig(method="obert", sparsity=0.8, num_grads=256, recompute=4)
masks, report = prune_oneshot(model, dataloader, config)
masks, report = prune_oneshot(model, dataloader, config, sparsity=0.9)  # the keyword wins
```
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..core._checks import check_damp, check_positive_int, check_real, check_sparsity
from .pruners import PRUNERS, Pattern, Pruner, make_pruner
from .recipes import get_recipe, recipe_names
from .recipes import schedule as recipe_schedule
from .recipes import settings as recipe_settings
from .targets import DEFAULT_EXCLUDE, DEFAULT_TYPES, find_prunable

__all__ = ["PruningConfig", "GradualPruningConfig", "prefixed_fields", "from_prefixed",
           "oneshot_config", "FROM_CONFIG", "PRUNER_FIELDS", "SETTINGS"]

_METHODS = sorted(PRUNERS)
# the fields a Pruner holds
PRUNER_FIELDS = ("pattern", "scope", "block_size", "damp", "rel_damp", "woodtaylor")
_SCHEDULE_FIELDS = ("start", "end", "frequency", "initial_sparsity", "sparsities")
RECIPE_FIELDS = _SCHEDULE_FIELDS + ("method", "num_grads", "block_size", "fisher_batch_size",
                                    "recompute", "cyclic_lr", "lr_min_ratio")  # what a recipe sets


class _FromConfig:
    """The default of :func:`~hf_mfac.pruning.prune_oneshot`'s setting keywords: the config's
    value."""

    def __repr__(self) -> str:
        return "<from config>"


FROM_CONFIG = _FromConfig()


def _number(name: str, value, **bounds):
    """``value`` checked to be a real number (not a bool, not a string) within ``bounds`` (see
    :func:`~hf_mfac.core.check_real`), naming ``name``; a one-element tensor becomes a float."""
    v = check_real(name, value, **bounds)
    return value if isinstance(value, numbers.Real) else v


def _flag(name: str, value) -> bool:
    """``value`` checked to be True or False (0 and 1 too), naming ``name``; ``"False"`` is
    refused."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")


def _fraction(name: str, value) -> float:
    """A sparsity: a real number in [0, 1), naming ``name``."""
    return check_sparsity(_number(name, value), name)


@dataclass
class PruningConfig:
    """How to prune once: the keyword arguments of :func:`~hf_mfac.pruning.prune_oneshot` that are
    settings (not runtime objects such as the model, dataloader, device or a cache), plus
    ``sparsities`` for a sweep (:func:`~hf_mfac.pruning.prune_sweep`). Validated on construction."""

    method: str | None = field(default="obert", metadata={
        "help": "Pruning method: magnitude, obert (WoodFisher/oBERT block Fisher), mfac (static "
                "M-FAC) or cap "
                "(CAP). None: no pruning.", "choices": _METHODS})
    sparsity: float | None = field(default=None, metadata={
        "help": "Target (final) sparsity: the fraction in [0, 1) of the target weights set to "
                "zero; "
                "implied by an N:M pattern."})
    sparsities: list[float] | None = field(default=None, metadata={
        "help": "Sparsity sweep instead of one target: prune to each of these increasing values in "
                "turn, each "
                "starting from the previous masks (one saved result per value)."})
    pattern: str | None = field(default=None, metadata={
        "help": "Sparsity pattern: unstructured (default), N:M such as 2:4, or G-block such as "
                "4-block."})
    scope: str = field(default="global", metadata={
        "help": "global: one threshold over all targets; layer: the same sparsity in every target.",
        "choices": ["global", "layer"]})
    num_grads: int | None = field(default=None, metadata={
        "help": "Gradients m per Fisher estimate; None: the method's default."})
    block_size: int | None = field(default=None, metadata={
        "help": "Fisher block size B (weights per diagonal block); None: the method's default."})
    damp: float | None = field(default=None, metadata={
        "help": "Absolute Fisher dampening λ in F = λI + GᵀG/m; None: the method's default."})
    rel_damp: float | None = field(default=None, metadata={
        "help": "Dampening relative to the Fisher's scale: λ = rel_damp · the mean Fisher "
                "diagonal over all target weights (one λ for every block); "
                "None: the method's default."})
    recompute: int = field(default=1, metadata={
        "help": "Fisher recomputations per target: steps on fresh gradients, each pruning the same "
                "fraction of "
                "the remaining weights."})
    woodtaylor: bool = field(default=False, metadata={
        "help": "WoodTaylor: add the first-order (gradient) term to the saliency and update "
                "(obert, mfac)."})
    fisher_batch_size: int | None = field(default=None, metadata={
        "help": "Samples per Fisher gradient; None: one batch of the dataloader."})
    per_sample: bool = field(default=False, metadata={
        "help": "One gradient per sample (the exact empirical Fisher) instead of one per batch."})
    include: list[str] | None = field(default=None, metadata={
        "help": "Regular expressions of module names to prune; None: every Linear/Conv2d not "
                "excluded."})
    exclude: list[str] | None = field(default=None, metadata={
        "help": "Regular expressions of module names to keep dense; None: embeddings, pooler and "
                "heads "
                "(hf_mfac.pruning.DEFAULT_EXCLUDE)."})

    def __post_init__(self):
        if isinstance(self.method, Pruner):
            given = sorted(k for k in PRUNER_FIELDS if getattr(self, k) != _DEFAULTS[k])
            if given:
                raise ValueError(f"{given} are set on the Pruner instance; do not pass them "
                                 "beside it")
        elif self.method is not None:
            if str(self.method).lower() not in PRUNERS:
                raise ValueError(
                    f"unknown pruning method {self.method!r}; choose one of {_METHODS}"
                )
            self.method = str(self.method).lower()
        self._check_numbers()
        pat = Pattern.parse(self.pattern)
        if (
            pat.kind == "nm"
            and self.sparsity is not None
            and not math.isclose(self.sparsity, pat.sparsity)
        ):
            raise ValueError(
                f"sparsity={self.sparsity} contradicts the {pat} pattern (which gives "
                f"{pat.sparsity:g}); leave sparsity out for N:M"
            )
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer'; got {self.scope!r}")
        if self.per_sample and self.fisher_batch_size not in (None, 1):
            raise ValueError(
                "per_sample=True means one sample per gradient "
                "(fisher_batch_size=1); got "
                f"fisher_batch_size={self.fisher_batch_size}: give one of the two"
            )
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])

    def _check_numbers(self) -> None:
        """Each numeric field a number of its range (never a string or a bool), each flag a bool."""
        if self.sparsity is not None:
            self.sparsity = _fraction("sparsity", self.sparsity)
        if self.sparsities is not None:
            s = self.sparsities
            if isinstance(s, (str, bytes)) or not isinstance(s, Iterable):
                raise TypeError(f"sparsities must be a list of numbers; got {s!r}")
            self.sparsities = s = [_fraction("sparsities", v) for v in s]
            if not s or any(b <= a for a, b in zip(s, s[1:])):
                raise ValueError(
                    f"sparsities must be non-empty and increase strictly (masks never "
                    f"regrow); got {s}"
                )
            if self.sparsity is not None:
                raise ValueError("give sparsity (one target) or sparsities (a sweep), not both")
        for name in ("num_grads", "block_size", "recompute", "fisher_batch_size"):
            if getattr(self, name) is not None or name == "recompute":
                setattr(self, name, check_positive_int(name, getattr(self, name)))
        for name in ("damp", "rel_damp"):
            if getattr(self, name) is not None:
                setattr(self, name, check_damp(getattr(self, name), name))
        self.woodtaylor = _flag("woodtaylor", self.woodtaylor)
        self.per_sample = _flag("per_sample", self.per_sample)

    def replace(self, **overrides) -> "PruningConfig":
        """A validated copy with ``overrides`` (field names; unknown names raise ``TypeError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown pruning settings {unknown}; the settings are {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The settings as a plain dict (a Pruner instance as its ``config()``), e.g. for a
        recipe."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.method, Pruner):
            d["method"] = self.method.config()
        return d

    def oneshot_kwargs(self) -> dict:
        """Keyword arguments for :func:`~hf_mfac.pruning.prune_oneshot`: the fields of
        :class:`PruningConfig` except ``sparsities``, leaving out those that are None (the
        function's own default applies)."""
        names = [f.name for f in dataclasses.fields(PruningConfig) if f.name != "sparsities"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def pruner(self, **runtime) -> Pruner:
        """The :class:`~hf_mfac.pruning.Pruner` of these settings (``runtime``: ``device``,
        ``page_bytes``), or ``method`` itself when it is a Pruner instance, which holds its own
        settings: then the pruner fields (:data:`PRUNER_FIELDS`, checked on construction) stay at
            their defaults and ``runtime`` at None."""
        if not isinstance(self.method, Pruner):
            settings = {k: getattr(self, k) for k in PRUNER_FIELDS}
            return make_pruner(self.method, **settings, **runtime)
        given = sorted(k for k, v in runtime.items() if v is not None)
        if given:
            raise ValueError(
                f"{given} are set on the Pruner instance; do not pass them to prune_oneshot"
            )
        return self.method

    def with_pruner(self, pruner: Pruner) -> "PruningConfig":
        """A copy whose ``method`` is ``pruner`` (built from these settings), the pruner fields at
        their defaults (the pruner holds them)."""
        return self.replace(method=pruner, **{k: _DEFAULTS[k] for k in PRUNER_FIELDS})

    def find_targets(self, model: nn.Module, types=DEFAULT_TYPES) -> dict:
        """The pruning targets these settings select in ``model``
        (:func:`~hf_mfac.pruning.find_prunable` with ``include``, ``exclude`` (None:
        :data:`~hf_mfac.pruning.DEFAULT_EXCLUDE`) and ``types``)."""
        exclude = DEFAULT_EXCLUDE if self.exclude is None else self.exclude
        return find_prunable(model, include=self.include, exclude=exclude, types=types)


@dataclass
class GradualPruningConfig(PruningConfig):
    """:class:`PruningConfig` plus the schedule of gradual pruning during training
    (:class:`~hf_mfac.integrations.PruningCallback`): the cubic schedule
    ``s_t = s_f + (s_i - s_f)(1 - (t - start)/(end - start))^3`` from ``initial_sparsity`` to
    ``sparsity``, pruning at ``start``, ``start + frequency``, ..., ``end``; or, with
    ``sparsities``, one target per pruning step (a sweep, as in CAP)."""

    initial_sparsity: float = field(
        default=0.0, metadata={"help": "Sparsity of the cubic schedule at start."}
    )
    start: float = field(default=0, metadata={"help": "First pruning step (or epoch, see unit)."})
    end: float | None = field(
        default=None,
        metadata={
            "help": "Last pruning step (or epoch) of the cubic schedule; None: three quarters of "
            "training."
        },
    )
    frequency: float = field(
        default=1, metadata={"help": "Steps (or epochs) between two pruning steps."}
    )
    unit: str = field(
        default="steps",
        metadata={"help": "Unit of start, end and frequency.", "choices": ["steps", "epochs"]},
    )
    reset_momentum: bool = field(
        default=True,
        metadata={
            "help": "Forget the optimizer's momentum (and the M-FAC window) after each pruning "
                    "step."
        },
    )
    cyclic_lr: bool = field(
        default=False,
        metadata={"help": "CAP's cyclic linear learning rate, restarting at every pruning step."},
    )
    lr_min_ratio: float = field(
        default=0.02,
        metadata={"help": "Cyclic learning rate: lowest learning rate as a fraction of the peak."},
    )
    save_at_targets: bool = field(
        default=False,
        metadata={
            "help": "Save a checkpoint at the end of each sparsity level (one fine-tuned "
                    "checkpoint "
            "per sweep target)."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A paper's gradual recipe scaled to the run's length "
                    "(hf_mfac.pruning.recipes): "
            "obert, cap, or magnitude on oBERT's schedule. It sets the method, pruning steps, "
            "first sparsity, schedule, Fisher, LR rewinds (and the examples' distillation); "
            "settings given explicitly (not at their defaults) win.",
            "choices": recipe_names(),
        },
    )

    def __post_init__(self):
        if self.recipe is not None and not isinstance(self.method, Pruner):  # (a Pruner: applied)
            self.recipe = str(self.recipe).lower()
            get_recipe(self.recipe)  # an unknown name is refused here
            given = self.recipe_given()
            chosen = recipe_settings(self.recipe, sparsity=self.sparsity, given=given)
            for key, value in chosen.items():
                setattr(self, key, value)
        super().__post_init__()
        self.initial_sparsity = _fraction("initial_sparsity", self.initial_sparsity)
        if self.unit not in ("steps", "epochs"):
            raise ValueError(f"unit must be 'steps' or 'epochs'; got {self.unit!r}")
        self.frequency = _number("frequency", self.frequency, low=0, low_open=True)
        self.start = _number("start", self.start, low=0)
        if self.end is not None:
            self.end = _number("end", self.end, low=0)
        if self.end is not None and self.end < self.start:
            raise ValueError(f"need 0 <= start <= end; got start={self.start}, end={self.end}")
        self.lr_min_ratio = _number("lr_min_ratio", self.lr_min_ratio, low=0, high=1)
        for name in ("reset_momentum", "cyclic_lr", "save_at_targets"):
            setattr(self, name, _flag(name, getattr(self, name)))

    def recipe_given(self) -> dict:
        """The settings a recipe sets that are given here, i.e. not at their defaults (a None
        method counts as not given)."""
        out = {}
        for f in dataclasses.fields(GradualPruningConfig):
            value = getattr(self, f.name)
            if f.name in RECIPE_FIELDS and value is not None and value != f.default:
                out[f.name] = value
        return out

    def for_run(self, max_steps: int, steps_per_epoch: float = 1.0) -> "GradualPruningConfig":
        """This config with its recipe's schedule for a run of ``max_steps`` optimizer steps
        (``start``/``end``/``frequency`` in steps; given ones in ``unit`` are converted);
        itself without a recipe. See :func:`hf_mfac.pruning.recipes.schedule`."""
        if self.recipe is None:
            return self
        scale = steps_per_epoch if self.unit == "epochs" else 1.0
        given = {k: v for k, v in self.recipe_given().items() if k in _SCHEDULE_FIELDS}
        given.update(
            {k: int(round(given[k] * scale)) for k in ("start", "end", "frequency") if k in given}
        )
        target = self.sparsity if self.sparsity is not None else (self.sparsities or [None])[-1]
        if target is None:
            raise ValueError(f"the {self.recipe} recipe needs a final sparsity (sparsity=...)")
        steps = recipe_schedule(self.recipe, max_steps=max_steps, sparsity=target, given=given)
        return self.replace(**steps)


def prefixed_fields(cls, prefix: str, defaults: dict | None = None) -> list[tuple]:
    """``cls``'s fields renamed ``prefix + name`` as ``(name, type, field)`` for
    ``dataclasses.make_dataclass`` (same help and choices; ``defaults`` overrides some defaults by
    unprefixed name). Types are resolved, so ``HfArgumentParser`` reads them whatever module the new
    class lives in."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    out = []
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default)
        out.append(
            (prefix + f.name, hints[f.name], field(default=default, metadata=dict(f.metadata)))
        )
    return out


def from_prefixed(obj, prefix: str, cls=GradualPruningConfig, **overrides):
    """The ``cls`` config read from ``obj``'s ``prefix + name`` attributes (the inverse of
    :func:`prefixed_fields`)."""
    values = {
        f.name: getattr(obj, prefix + f.name)
        for f in dataclasses.fields(cls)
        if hasattr(obj, prefix + f.name)
    }
    return cls(**{**values, **overrides})


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruningConfig)}
SETTINGS = tuple(_DEFAULTS)  # the names of PruningConfig's fields, in order


def oneshot_config(config: PruningConfig | None = None, **overrides) -> PruningConfig:
    """The settings of one :func:`~hf_mfac.pruning.prune_oneshot` run: ``config`` (default:
    ``PruningConfig()``) with ``overrides`` (field names) applied, validated. A keyword
    ``exclude=None`` excludes nothing, as in :func:`~hf_mfac.pruning.find_prunable` (a config's None
    is the default exclusion). Refused: a config that is not a :class:`PruningConfig`, no method, a
    sweep (``sparsities``)."""
    if config is None:
        config = PruningConfig()
    elif not isinstance(config, PruningConfig):
        raise TypeError(
            f"config must be a hf_mfac.pruning.PruningConfig; got {type(config).__name__}"
        )
    if "exclude" in overrides and overrides["exclude"] is None:
        overrides["exclude"] = []
    config = config.replace(**overrides)
    if config.method is None:
        raise ValueError("method is None (no pruning): give a pruning method, e.g. method='obert'")
    if config.sparsities is not None:
        raise ValueError(
            f"sparsities={config.sparsities} is a sweep: call "
            "prune_sweep(model, dataloader, config=config) instead"
        )
    return config
