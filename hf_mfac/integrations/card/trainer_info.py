"""What a ``Trainer`` tells a model card: the masks, method, pattern and recipe of its pruning
callback (:func:`_callback_sparsity`), the M-FAC hyperparameters of its arguments or optimizer
(:func:`mfac_hparams`), its training hyperparameters (:func:`_training_hparams`) and its last
evaluation metrics (:func:`_last_eval`), gathered with the base model, the repository and the
redacted command line into the arguments of :func:`~hf_mfac.integrations.create_sparse_model_card`
(:func:`trainer_sparsity`, :func:`trainer_card_kwargs`) for
:func:`~hf_mfac.integrations.card.model_card.write_trainer_model_card`.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

import torch

from .section import one_line
from ..checkpoint.redaction import redacted_command

_PERF_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def mfac_hparams(trainer) -> dict | None:
    from ...optim import is_mfac_optimizer, selects_mfac, unwrap_optimizer

    args = trainer.args
    if selects_mfac(args) and hasattr(args, "mfac_kwargs"):
        hp = args.mfac_kwargs()
    else:
        opt = getattr(trainer, "optimizer", None)
        if not is_mfac_optimizer(opt):
            return None
        opt = unwrap_optimizer(opt)  # accelerate's AcceleratedOptimizer wraps it
        hp = {"lr": opt.defaults["lr"], "num_grads": opt.num_grads, "damp": opt.damp,
              "weight_decay": opt.defaults["weight_decay"], "momentum": opt.defaults["momentum"],
              "grad_dtype": opt.grad_dtype, "density": getattr(opt, "density", 1.0)}
    return {
        k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
        for k, v in hp.items()
        if v is not None
    }


def _training_hparams(trainer) -> dict:
    a = trainer.args
    hp = {
        "learning_rate": a.learning_rate,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "num_train_epochs": a.num_train_epochs if a.max_steps <= 0 else None,
        "max_steps": a.max_steps if a.max_steps > 0 else None,
        "lr_scheduler_type": getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type),
        "weight_decay": a.weight_decay,
        "max_grad_norm": a.max_grad_norm,
        "seed": a.seed,
        "optim": getattr(a.optim, "value", a.optim),
        "global_step": trainer.state.global_step,
    }
    return {k: v for k, v in hp.items() if v is not None}


def _last_eval(trainer) -> dict:
    for entry in reversed(trainer.state.log_history):
        metrics = {
            k[len("eval_") :]: v
            for k, v in entry.items()
            if k.startswith("eval_") and not k.endswith(_PERF_KEYS) and isinstance(v, (int, float))
        }
        if metrics:
            return metrics
    return {}


_RECIPE_FIELDS = (
    "final_sparsity",
    "initial_sparsity",
    "sparsities",
    "start",
    "end",
    "frequency",
    "unit",
    "num_grads",
    "recompute",
    "fisher_batch_size",
    "cyclic_lr",
)


def _callback_sparsity(trainer, model) -> tuple[dict | None, dict]:
    """Masks, method, pattern and recipe from the first callback with a non-empty ``masks`` mapping
    (keyed by parameter name or by parameter), e.g. :class:`~hf_mfac.integrations.PruningCallback`:
    ``method`` and ``recipe`` attributes when it has them, else its ``pruner.config()`` and schedule
    attributes."""
    names = {id(p): n for n, p in model.named_parameters()}
    for cb in trainer.callback_handler.callbacks:
        masks = getattr(cb, "masks", None)
        if not (isinstance(masks, Mapping) and masks):
            continue
        pruner = getattr(cb, "pruner", None)
        config = pruner.config() if callable(getattr(pruner, "config", None)) else {}
        recipe = getattr(cb, "recipe", None)
        if recipe is None and config:
            recipe = {
                "callback": type(cb).__name__,
                **{k: v for k, v in config.items() if v is not None},
                **{k: getattr(cb, k) for k in _RECIPE_FIELDS if getattr(cb, k, None) is not None},
            }
        info = {
            "method": getattr(cb, "method", None) or config.get("method"),
            "recipe": recipe,
            "pattern": config.get("pattern"),
        }
        masks = {names.get(id(k), k) if torch.is_tensor(k) else k: v for k, v in masks.items()}
        return masks, {k: v for k, v in info.items() if v is not None}
    return None, {}


def trainer_sparsity(trainer, model, info: dict) -> tuple[Mapping | None, str | None, object, dict]:
    """(masks, method, recipe, save_sparse_pretrained arguments) for the card, taking them out of
    ``info``: the caller's ``masks`` / ``method`` / ``recipe`` / ``targets`` / ``pattern`` /
    ``save_masks`` / ``extra_metadata``, else those of the pruning callback
    (:func:`_callback_sparsity`; its pattern only with its own masks)."""
    cb_masks, cb_info = _callback_sparsity(trainer, model)
    masks = info.pop("masks", None) or cb_masks
    method = info.pop("method", None) or cb_info.get("method")
    recipe = info.pop("recipe", None) or cb_info.get("recipe")
    save_args = {
        k: info.pop(k) for k in ("targets", "pattern", "save_masks", "extra_metadata") if k in info
    }
    if "pattern" in cb_info and "pattern" not in save_args and masks is cb_masks:
        save_args["pattern"] = cb_info["pattern"]
    return masks, method, recipe, save_args


def trainer_card_kwargs(trainer, model, output_dir, info: dict, *, method, recipe) -> dict:
    """The :func:`~hf_mfac.integrations.create_sparse_model_card` arguments for ``trainer``:
    ``Trainer.create_model_card``'s arguments in ``info`` mapped onto the card's (``finetuned_from``
    -> base model, ``tasks`` -> task, ``dataset_tags`` -> datasets, ``dataset`` -> dataset name,
    ``dataset_args`` -> dataset config), the base model else from ``config._name_or_path`` when it
    is not a local folder, the metrics, hyperparameters and redacted command line gathered here; the
    rest of ``info`` passed on as it is."""
    tasks, dataset = info.pop("tasks", None), info.pop("dataset", None)
    dataset_tags, dataset_args = info.pop("dataset_tags", None), info.pop("dataset_args", None)
    first = lambda v: v[0] if isinstance(v, (list, tuple)) and v else v  # noqa: E731
    name_or_path = getattr(model.config, "_name_or_path", "") or ""
    hub_name = name_or_path if name_or_path and not os.path.isdir(name_or_path) else None
    base = info.pop("finetuned_from", None) or hub_name
    tags = info.pop("tags", None)
    repo_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
    kwargs = dict(
        model=model,
        method=method,
        recipe=recipe,
        base_model=base,
        tags=[tags] if isinstance(tags, str) else tags,
        task=first(tasks),
        datasets=dataset_tags,
        dataset_name=first(dataset),
        dataset_config=first(dataset_args),
        eval_results=_last_eval(trainer) or None,
        mfac=mfac_hparams(trainer),
        training=_training_hparams(trainer),
        command=redacted_command(sys.argv),
        repo_id=repo_id,
        model_name=(repo_id or "").split("/")[-1]
        or one_line(os.path.basename(os.path.normpath(output_dir))),
    )
    kwargs.update(info)
    return kwargs
