"""The papers' gradual-pruning recipes, scaled to a run's length: :data:`RECIPES`, :func:`expand`.

A recipe fixes where the pruning steps fall (as fractions of training), the sparsity of the first
step, the schedule from there to the target, the Fisher settings, the learning-rate rewinds and the
distillation. :func:`expand` turns it into :class:`~hf_mfac.pruning.GradualPruningConfig` settings
for a run of ``max_steps`` optimizer steps; settings the user gave explicitly win over the recipe.

- ``obert``: 7 pruning steps, at 2/30 of training and then every 4/30 (the last at 26/30); the
  first to 70 %, then the cubic schedule to the target; 1024 gradients of 16 samples, blocks of
  B = 50; the learning rate decayed linearly to 0.1x its peak over the dense steps before the
  first pruning step, then rewound at each pruning step and decayed linearly to 0.1x again;
  distillation from the dense starting model, hardness 1, temperature 2.
- ``cap``: 15 pruning steps, at 0 and then every 1/15 of training (the last at 14/15); the first
  to 40 %, then finer and finer increments to the target: on the way from 40 % to 90 % the levels
  40, 50, 60, 65, 70, 75 % and nine equal steps from 75 to 90 % (for another target the same
  fractions of the way from the first step's sparsity to it); 4096 gradients, B = 192; the
  learning rate rewound at each step and decayed linearly to 0.02x its peak; no distillation.
- ``magnitude``: the ``obert`` recipe without the Fisher (same steps, rewinds and distillation).

Sources. oBERT: the 30-epoch downstream recipes of the paper ([oBERT, §4.1, Table 1]; sparseml's
``research/optimal_BERT_surgeon_oBERT/recipes/30epochs_unstructured{80,90,97}_*.yaml``): 2 dense
epochs with the learning rate decaying linearly from 8e-5 to 8e-6, pruning at epochs 2, 6, ..., 26
from 70 % with the cubic schedule, 4 epochs of fine-tuning after the last step, ``num_grads`` 1024
of batches of 16 (GLUE; 8 on SQuAD), ``fisher_block_size`` 50, one Fisher per step, a cyclic
linear learning rate from 8e-5 to 8e-6 restarting every 4 epochs from epoch 2, distillation from
the dense teacher with hardness 1.0 and temperature 2.0. CAP: the gradual recipe of its headline
results ([CAP, §4.2, App. B Table 6]: 300 epochs, the first step to 40 %, a pruning step every 20
epochs, a cyclic linear learning rate from 5e-4 to 1e-5 restarting at each pruning step [CAP, eq.
8]; no distillation) with the levels of the official CAP code's
``research/recipes/gradual_pruning/cap/300ep_vit_sp=0.40_90.yaml`` (50 % at epoch 20, 60 % at 40,
linear to 75 % at 100, linear to 90 % at 280, 20 epochs of recovery), 4096 gradients
([CAP, App. I]), B = 192, one Fisher per step. (The same code's 100-epoch ablation recipe prunes
five times in equal increments, the last step 12.5 points at once.)
Magnitude: the oBERT recipe without the Fisher, as the fair baseline (gradual magnitude with the
same schedule, rewinds and distillation, as the oBERT paper compares it).

Not taken from the papers: the absolute dampening (oBERT 1e-7, CAP 1e-8) depends on the loss scale,
so the recipes keep hf_mfac's relative damping (``rel_damp``); the learning rate's peak is the run's
own (``--learning_rate``), the recipe only sets its shape.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Recipe", "RECIPES", "expand", "settings", "schedule", "distillation", "get_recipe",
           "recipe_names", "lr_restarts"]


@dataclass(frozen=True)
class Recipe:
    """One paper's gradual recipe, in fractions of training (see the module docstring)."""

    method: str
    first: float  # fraction of training at the first pruning step
    interval: float  # fraction of training between two pruning steps
    steps: int  # pruning steps
    initial_sparsity: float  # sparsity of the first step (capped at the target)
    schedule: str  # "cubic" (callback's schedule), "linear" (equal increments) or "levels"
    num_grads: int | None
    block_size: int | None
    fisher_batch_size: int | None
    recompute: int
    lr_min_ratio: float  # cyclic linear LR: lowest rate as a fraction of the peak
    distill_hardness: float | None  # None: no distillation
    distill_temperature: float | None
    # "levels": each pruning step's sparsity as a fraction of the way from the first step's
    # sparsity (0) to the target (1); resampled when the run has another number of steps
    levels: tuple[float, ...] | None = None
    # the learning rate decays linearly from its peak to lr_min_ratio over the steps before the
    # first pruning step (False: held at its peak)
    decay_before_first: bool = False


_OBERT = Recipe(method="obert", first=2 / 30, interval=4 / 30, steps=7, initial_sparsity=0.7,
                schedule="cubic", num_grads=1024, block_size=50, fisher_batch_size=16, recompute=1,
                lr_min_ratio=0.1, distill_hardness=1.0, distill_temperature=2.0,
                decay_before_first=True)
# CAP's 300-epoch levels from 40 % to 90 %: 40, 50, 60, 65, 70, 75, then nine equal steps to 90
_CAP_LEVELS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, *(0.7 + 0.3 * k / 9 for k in range(1, 10)))
RECIPES: dict[str, Recipe] = {
    "obert": _OBERT,
    "cap": Recipe(method="cap", first=0.0, interval=1 / 15, steps=15, initial_sparsity=0.4,
                  schedule="levels", num_grads=4096, block_size=192, fisher_batch_size=None,
                  recompute=1, lr_min_ratio=0.02, distill_hardness=None, distill_temperature=None,
                  levels=_CAP_LEVELS),
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
    ``max_steps``. The frequency is rounded down where the steps do not divide evenly, so the
    recovery after the last pruning step is never shorter than the recipe's fraction."""
    if max_steps <= r.steps:
        raise ValueError(f"the {r.method} recipe prunes {r.steps} times: it needs a run of more "
                         f"than {r.steps} optimizer steps; got max_steps={max_steps}")
    start = round(r.first * max_steps)
    if r.steps == 1:
        return max(0, min(start, max_steps - 1)), max(1, round(r.interval * max_steps))
    # the last pruning step where the recipe puts it, keeping a step of recovery after it
    last = min(round((r.first + (r.steps - 1) * r.interval) * max_steps), max_steps - 1)
    freq = max(1, (last - start) // (r.steps - 1))
    start = min(start, last - (r.steps - 1) * freq)
    return max(0, start), freq


def _levels(r: Recipe, first: float, target: float, n: int) -> list[float]:
    """``n`` sparsities from ``first`` to ``target`` (the last is ``target``): equal increments
    for a ``linear`` recipe; the recipe's ``levels`` for a ``levels`` one, read off at ``n``
    evenly spaced points (piecewise linearly) when the run has another number of steps."""
    if n == 1 or math.isclose(first, target):
        return [target]
    knots = r.levels if r.schedule == "levels" and r.levels else (0.0, 1.0)
    out = []
    for i in range(n):
        x = i * (len(knots) - 1) / (n - 1)
        j = min(int(x), len(knots) - 2)
        frac = knots[j] + (knots[j + 1] - knots[j]) * (x - j)
        out.append(first + (target - first) * frac)
    out[-1] = target
    return out


def lr_restarts(name: str | None, prune_steps) -> list[int]:
    """The steps at which the recipe's cyclic learning rate restarts at its peak: the pruning
    steps, and step 0 too when the recipe decays the rate over its dense steps before the first
    pruning step (``obert``, ``magnitude``). Without a recipe (None): the pruning steps."""
    steps = sorted({int(t) for t in prune_steps})
    if name is not None and get_recipe(name).decay_before_first and steps and steps[0] > 0:
        return [0, *steps]
    return steps


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
    recipe, ``sparsity`` (for a linear or levels one, ``sparsities``: one level per pruning step,
    from the first step's sparsity up to ``sparsity``). ``given`` start/frequency/end/
    initial_sparsity/sparsities (in steps) win; a given ``frequency`` without ``end`` prunes up to
    the recipe's last step (the levels then read off the recipe's curve at that many steps)."""
    r, given = get_recipe(name), dict(given or {})
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"a recipe needs a final sparsity in (0, 1); got {sparsity!r}")
    start, freq = _positions(r, max_steps)
    last = start + (r.steps - 1) * freq  # the recipe's last pruning step
    start = int(given.get("start", start))
    freq = int(given.get("frequency", freq))
    end = int(given.get("end", max(start, last) if "frequency" in given else
                        start + (r.steps - 1) * freq))
    out = dict(start=start, end=end, frequency=freq, unit="steps")
    if "sparsities" in given:
        return {**out, "sparsities": list(given["sparsities"]), "sparsity": None}
    if r.schedule == "cubic":
        return {**out, "sparsity": sparsity, "sparsities": None}
    first = min(float(given.get("initial_sparsity", r.initial_sparsity)), sparsity)
    n = len(range(start, end + 1, max(1, freq)))
    return {**out, "sparsities": _levels(r, first, sparsity, n), "sparsity": None}


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
