"""What a ``Trainer`` tells a model card: the masks, method, pattern and recipe of its pruning callback
(:func:`_callback_sparsity`), the M-FAC hyperparameters of its arguments or optimizer (:func:`_mfac_hparams`), its
training hyperparameters (:func:`_training_hparams`) and its last evaluation metrics (:func:`_last_eval`).
:func:`~hf_mfac.integrations.model_card.write_trainer_model_card` gathers them from here.
"""
from __future__ import annotations

from typing import Mapping

import torch

_PERF_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def _mfac_hparams(trainer) -> dict | None:
    from ..optim import is_mfac_optimizer, selects_mfac, unwrap_optimizer

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
              "grad_dtype": opt.grad_dtype}
    return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in hp.items()
            if v is not None}


def _training_hparams(trainer) -> dict:
    a = trainer.args
    hp = {"learning_rate": a.learning_rate, "per_device_train_batch_size": a.per_device_train_batch_size,
          "gradient_accumulation_steps": a.gradient_accumulation_steps,
          "num_train_epochs": a.num_train_epochs if a.max_steps <= 0 else None,
          "max_steps": a.max_steps if a.max_steps > 0 else None,
          "lr_scheduler_type": getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type),
          "weight_decay": a.weight_decay, "max_grad_norm": a.max_grad_norm, "seed": a.seed,
          "optim": getattr(a.optim, "value", a.optim), "global_step": trainer.state.global_step}
    return {k: v for k, v in hp.items() if v is not None}


def _last_eval(trainer) -> dict:
    for entry in reversed(trainer.state.log_history):
        metrics = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")
                   and not k.endswith(_PERF_KEYS) and isinstance(v, (int, float))}
        if metrics:
            return metrics
    return {}


_RECIPE_FIELDS = ("final_sparsity", "initial_sparsity", "sparsities", "start", "end", "frequency", "unit",
                  "num_grads", "recompute", "fisher_batch_size", "cyclic_lr")


def _callback_sparsity(trainer, model) -> tuple[dict | None, dict]:
    """Masks, method, pattern and recipe from the first callback with a non-empty ``masks`` mapping (keyed by
    parameter name or by parameter), e.g. :class:`~hf_mfac.integrations.PruningCallback`: ``method`` and
    ``recipe`` attributes when it has them, else its ``pruner.config()`` and schedule attributes."""
    names = {id(p): n for n, p in model.named_parameters()}
    for cb in trainer.callback_handler.callbacks:
        masks = getattr(cb, "masks", None)
        if not (isinstance(masks, Mapping) and masks):
            continue
        pruner = getattr(cb, "pruner", None)
        config = pruner.config() if callable(getattr(pruner, "config", None)) else {}
        recipe = getattr(cb, "recipe", None)
        if recipe is None and config:
            recipe = {"callback": type(cb).__name__, **{k: v for k, v in config.items() if v is not None},
                      **{k: getattr(cb, k) for k in _RECIPE_FIELDS if getattr(cb, k, None) is not None}}
        info = {"method": getattr(cb, "method", None) or config.get("method"), "recipe": recipe,
                "pattern": config.get("pattern")}
        masks = {names.get(id(k), k) if torch.is_tensor(k) else k: v for k, v in masks.items()}
        return masks, {k: v for k, v in info.items() if v is not None}
    return None, {}
