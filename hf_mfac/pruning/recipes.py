"""The papers' gradual-pruning recipes, scaled to a run's length: :data:`RECIPES`, :func:`expand`.

A recipe fixes where the pruning steps fall (as fractions of training), the sparsity of the first
step, the schedule from there to the target, the Fisher settings, the learning-rate rewinds and the
distillation. :func:`expand` turns it into :class:`~hf_mfac.pruning.GradualPruningConfig` settings
for a run of ``max_steps`` optimizer steps; settings the user gave explicitly win over the recipe.

- ``obert``: 7 pruning steps, at 2/30 of training and then every 4/30 (the last at 26/30); the
  first to 70 %, then the cubic schedule to the target; 1024 gradients of 16 samples, blocks of
  B = 50; the learning rate rewound at each step and decayed linearly to 0.1x its peak;
  distillation from the dense starting model, hardness 1, temperature 2.
- ``cap``: 5 pruning steps, at 0 and then every fifth of training (the last at 4/5); the first to
  40 %, then equal increments to the target; 4096 gradients, B = 192; the learning rate rewound at
  each step and decayed linearly to 0.02x its peak; no distillation.
- ``magnitude``: the ``obert`` recipe without the Fisher (same steps, rewinds and distillation).

Sources. oBERT: the 30-epoch downstream recipes of the paper ([oBERT, §4.1, Table 1]; sparseml's
``research/optimal_BERT_surgeon_oBERT/recipes/30epochs_unstructured{80,90,97}_*.yaml``): 2 dense
epochs, pruning at epochs 2, 6, ..., 26 from 70 % with the cubic schedule, 4 epochs of fine-tuning
after the last step, ``num_grads`` 1024 of batches of 16 (GLUE; 8 on SQuAD), ``fisher_block_size``
50, one Fisher per step, a linear learning rate from 8e-5 to 8e-6 restarting every 4 epochs,
distillation from the dense teacher with hardness 1.0 and temperature 2.0. CAP: the first step to
40 % and a cyclic linear learning rate from 5e-4 to 1e-5 restarting at each pruning step
([CAP, §3.2 eq. 8, §4.2, App. B Table 6]), 4096 gradients ([CAP, App. I]), one Fisher per step; the
linear schedule over the first 80 % of training and B = 192 are those of the official CAP code's
DeiT recipes.
Magnitude: the oBERT recipe without the Fisher, as the fair baseline (gradual magnitude with the
same schedule, rewinds and distillation, as the oBERT paper compares it).

Not taken from the papers: the absolute dampening (oBERT 1e-7, CAP 1e-8) depends on the loss scale,
so the recipes keep hf_mfac's relative damping (``rel_damp``); the learning rate's peak is the run's
own (``--learning_rate``), the recipe only sets its shape; before the first pruning step the rate is
held at its peak (oBERT decays it linearly over the 2 dense epochs).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Recipe", "RECIPES", "expand", "settings", "schedule", "distillation", "get_recipe",
           "recipe_names"]


@dataclass(frozen=True)
class Recipe:
    """One paper's gradual recipe, in fractions of training (see the module docstring)."""

    method: str
    first: float  # fraction of training at the first pruning step
    interval: float  # fraction of training between two pruning steps
    steps: int  # pruning steps
    initial_sparsity: float  # sparsity of the first step (capped at the target)
    schedule: str  # "cubic" (callback's schedule) or "linear" (a sweep of equal increments)
    num_grads: int | None
    block_size: int | None
    fisher_batch_size: int | None
    recompute: int
    lr_min_ratio: float  # cyclic linear LR: lowest rate as a fraction of the peak
    distill_hardness: float | None  # None: no distillation
    distill_temperature: float | None


_OBERT = Recipe(method="obert", first=2 / 30, interval=4 / 30, steps=7, initial_sparsity=0.7,
                schedule="cubic", num_grads=1024, block_size=50, fisher_batch_size=16, recompute=1,
                lr_min_ratio=0.1, distill_hardness=1.0, distill_temperature=2.0)
RECIPES: dict[str, Recipe] = {
    "obert": _OBERT,
    "cap": Recipe(method="cap", first=0.0, interval=0.2, steps=5, initial_sparsity=0.4,
                  schedule="linear", num_grads=4096, block_size=192, fisher_batch_size=None,
                  recompute=1, lr_min_ratio=0.02, distill_hardness=None, distill_temperature=None),
    "magnitude": dataclasses.replace(_OBERT, method="magnitude", num_grads=None, block_size=None,
                                     fisher_batch_size=None),
}

# the GradualPruningConfig fields a recipe sets (besides the schedule)
_FISHER_KEYS = ("num_grads", "block_size", "fisher_batch_size", "recompute")


def recipe_names() -> list[str]:
    """The recipes' names, sorted."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (case-insensitive); a clear error for another name."""
    key = str(name).lower()
    if key not in RECIPES:
        raise ValueError(f"unknown pruning recipe {name!r}; choose one of {recipe_names()}")
    return RECIPES[key]


def _positions(r: Recipe, max_steps: int) -> tuple[int, int]:
    """(start, frequency) in optimizer steps: ``steps`` pruning steps, the last one before
    ``max_steps``."""
    if max_steps <= r.steps:
        raise ValueError(f"the {r.method} recipe prunes {r.steps} times: it needs a run of more "
                         f"than {r.steps} optimizer steps; got max_steps={max_steps}")
    freq = max(1, round(r.interval * max_steps))
    start = round(r.first * max_steps)
    last = min(start + (r.steps - 1) * freq, max_steps - 1)  # keep a step of recovery after it
    freq = max(1, (last - start) // (r.steps - 1)) if r.steps > 1 else freq
    start = min(start, last - (r.steps - 1) * freq)
    return max(0, start), freq


def _linear_levels(first: float, target: float, n: int) -> list[float]:
    """``n`` sparsities rising in equal steps from ``first`` to ``target`` (the last is
    ``target``)."""
    if n == 1 or math.isclose(first, target):
        return [target]
    return [first + (target - first) * i / (n - 1) for i in range(n)]


def settings(name: str, *, sparsity: float | None = None, given: Mapping | None = None) -> dict:
    """The settings of recipe ``name`` that do not depend on the run's length: ``method``,
    ``initial_sparsity`` (capped at the final ``sparsity`` when given), the Fisher settings
    (``num_grads``, ``block_size``, ``fisher_batch_size``, ``recompute``; None: the method's
    default), ``cyclic_lr=True`` and ``lr_min_ratio``. ``given`` (the settings the user chose
    explicitly) wins."""
    r, given = get_recipe(name), dict(given or {})
    out = dict(method=r.method, initial_sparsity=r.initial_sparsity, cyclic_lr=True,
               lr_min_ratio=r.lr_min_ratio, **{k: getattr(r, k) for k in _FISHER_KEYS})
    out.update({k: v for k, v in given.items() if k in out})
    if sparsity is not None:
        out["initial_sparsity"] = min(float(out["initial_sparsity"]), sparsity)
    return out


def schedule(name: str, *, max_steps: int, sparsity: float, given: Mapping | None = None) -> dict:
    """Where recipe ``name`` prunes in a run of ``max_steps`` optimizer steps to the final
    ``sparsity``: ``start``, ``end``, ``frequency`` (steps, ``unit="steps"``) and, for a cubic
    recipe, ``sparsity`` (for a linear one, ``sparsities``: one level per pruning step, from the
    first step's sparsity up to ``sparsity``). ``given`` start/frequency/end/initial_sparsity/
    sparsities (in steps) win."""
    r, given = get_recipe(name), dict(given or {})
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"a recipe needs a final sparsity in (0, 1); got {sparsity!r}")
    start, freq = _positions(r, max_steps)
    start = int(given.get("start", start))
    freq = int(given.get("frequency", freq))
    end = int(given.get("end", start + (r.steps - 1) * freq))
    out = dict(start=start, end=end, frequency=freq, unit="steps")
    if "sparsities" in given:
        return {**out, "sparsities": list(given["sparsities"]), "sparsity": None}
    if r.schedule == "cubic":
        return {**out, "sparsity": sparsity, "sparsities": None}
    first = min(float(given.get("initial_sparsity", r.initial_sparsity)), sparsity)
    n = len(range(start, end + 1, max(1, freq)))
    return {**out, "sparsities": _linear_levels(first, sparsity, n), "sparsity": None}


def expand(name: str, *, max_steps: int, sparsity: float, given: Mapping | None = None) -> dict:
    """All the :class:`~hf_mfac.pruning.GradualPruningConfig` settings of recipe ``name`` for a run
    of ``max_steps`` optimizer steps to the final ``sparsity``: :func:`settings` and
    :func:`schedule` together. ``given`` maps the settings the user chose explicitly to their
    values: they win (e.g. ``{"num_grads": 128}``, or ``{"start": 0}`` to move the first step; the
    schedule is then built from the given ``start``/``frequency``/``end``)."""
    return {**settings(name, sparsity=sparsity, given=given),
            **schedule(name, max_steps=max_steps, sparsity=sparsity, given=given)}


def distillation(name: str) -> dict | None:
    """The recipe's distillation as ``{"teacher": "self", "hardness": h, "temperature": T}``
    (the dense starting model as the teacher), or None when the recipe does not distill."""
    r = get_recipe(name)
    if r.distill_hardness is None:
        return None
    return {"teacher": "self", "hardness": r.distill_hardness, "temperature": r.distill_temperature}
