"""Building ``hf_mfac.MFAC`` inside ``transformers.Trainer``.

Two ways, for the two kinds of users:

* :class:`MFACTrainer` — a ``Trainer`` that understands ``args.optim == "mfac"``
  (:class:`~hf_mfac.integrations.MFACTrainingArguments`), so ``--optim mfac`` on the command line is enough.
* :func:`mfac_optimizer_cls_and_kwargs` — for any ``Trainer`` (subclass), e.g. a question-answering trainer:
  ``QuestionAnsweringTrainer(..., optimizer_cls_and_kwargs=mfac_optimizer_cls_and_kwargs(args))``.

Either way the Trainer builds its usual parameter groups (weight decay on weights, none on biases and
LayerNorm), wraps the optimizer for accelerate (gradient accumulation, DDP, bf16, fp16 with its gradient
scaler), schedules the learning rate through ``param_group["lr"]``, and saves/restores
``optimizer.state_dict()`` — the whole gradient window — with each checkpoint, so ``resume_from_checkpoint``
continues exactly. What M-FAC sees each optimizer step is the gradient the Trainer would hand to AdamW:
accumulated over micro-batches, all-reduced over DDP ranks, unscaled and clipped to ``max_grad_norm``
(see :class:`~hf_mfac.integrations.MFACTrainingArguments` for why clipping is kept). A step that the fp16
gradient scaler skips for overflow never calls ``optimizer.step()``, so the overflowed gradient never
enters the window.
"""
from __future__ import annotations

import os

from transformers import Trainer, TrainingArguments

from .training_args import MFAC_OPTIM, OPTIM_ARG_ALIASES, parse_optim_args

__all__ = ["MFACTrainer", "mfac_optimizer_cls_and_kwargs", "check_supported_setup"]

_MFAC_KWARGS = frozenset(OPTIM_ARG_ALIASES.values())


def _is_mfac(args) -> bool:
    optim = getattr(args, "optim", None)
    return isinstance(optim, str) and optim.lower() == MFAC_OPTIM


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_supported_setup(args, trainer=None) -> None:
    """Raise ``ValueError`` for setups where ``hf_mfac.MFAC`` would train wrongly: FSDP, DeepSpeed, sharding.

    FSDP and DeepSpeed (ZeRO) shard or move the parameters, gradients and optimizer step, so each rank would
    build its window from a shard, or the step would bypass ``MFAC.step``; tensor/context parallelism shard
    the parameters too. Reads ``args.fsdp``, ``args.deepspeed``, ``args.parallelism_config``, the
    ``ACCELERATE_USE_FSDP``/``ACCELERATE_USE_DEEPSPEED`` variables set by ``accelerate launch``, and, when
    given, the Trainer's ``is_fsdp_enabled``/``is_deepspeed_enabled``. Plain DDP is supported.
    """
    problems = []
    if getattr(args, "fsdp", None) or _env_true("ACCELERATE_USE_FSDP") or getattr(trainer, "is_fsdp_enabled", False):
        problems.append("FSDP")
    if (getattr(args, "deepspeed", None) or _env_true("ACCELERATE_USE_DEEPSPEED")
            or getattr(trainer, "is_deepspeed_enabled", False)):
        problems.append("DeepSpeed")
    pc = getattr(args, "parallelism_config", None)
    if pc is not None:
        for name in ("tp_size", "cp_size", "sp_size", "dp_shard_size"):
            if (getattr(pc, name, 1) or 1) > 1:
                problems.append(f"parallelism_config.{name}={getattr(pc, name)}")
    if problems:
        raise ValueError(
            f"hf_mfac.MFAC does not support {', '.join(problems)} yet: these shard the parameters/gradients or "
            "move the optimizer step, so M-FAC would precondition with the wrong Fisher. Train with plain DDP "
            "(`torchrun --nproc_per_node=N script.py ...` without --fsdp/--deepspeed), or choose another --optim."
        )


def mfac_optimizer_cls_and_kwargs(args_or_kwargs: TrainingArguments | dict | None = None, **overrides):
    """Return ``(hf_mfac.MFAC, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args_or_kwargs`` is either training arguments — :class:`MFACTrainingArguments` (its ``learning_rate``,
    ``weight_decay``, ``mfac_*`` fields and ``optim_args``) or a stock ``TrainingArguments`` (its
    ``learning_rate`` and ``weight_decay`` only; give the M-FAC settings as ``overrides``) — or a dict of
    ``MFAC`` keyword arguments in any spelling :func:`parse_optim_args` reads (``ngrads``, ...).
    ``overrides`` (same spellings) win over both. The Trainer passes these kwargs to ``MFAC`` as they are and
    does not add the learning rate, so a dict must contain ``lr``; with training arguments the lr is theirs,
    and the Trainer's lr scheduler then drives ``param_group["lr"]`` as usual. The Trainer's decay/no-decay
    parameter groups set ``weight_decay`` per group. Refuses FSDP/DeepSpeed (:func:`check_supported_setup`).

    Example::

        trainer = QuestionAnsweringTrainer(model=model, args=args, ...,
                                           optimizer_cls_and_kwargs=mfac_optimizer_cls_and_kwargs(args, ngrads=512))
    """
    import hf_mfac

    if isinstance(args_or_kwargs, TrainingArguments):
        check_supported_setup(args_or_kwargs)
        if hasattr(args_or_kwargs, "mfac_kwargs"):
            kwargs = args_or_kwargs.mfac_kwargs()
        else:
            kwargs = {"lr": args_or_kwargs.learning_rate, "weight_decay": args_or_kwargs.weight_decay}
    else:
        kwargs = parse_optim_args(dict(args_or_kwargs or {}))
    kwargs.update(parse_optim_args(overrides))
    if "lr" not in kwargs:
        raise ValueError("mfac_optimizer_cls_and_kwargs: give `lr` (Trainer passes these kwargs as they are and "
                         "does not add the learning rate), or pass the TrainingArguments")
    unknown = set(kwargs) - _MFAC_KWARGS
    if unknown:
        raise ValueError(f"unknown hf_mfac.MFAC arguments {sorted(unknown)}")
    return hf_mfac.MFAC, kwargs


class MFACTrainer(Trainer):
    """``transformers.Trainer`` that builds ``hf_mfac.MFAC`` when ``args.optim == "mfac"``.

    Use with :class:`~hf_mfac.integrations.MFACTrainingArguments`; any other ``optim`` behaves exactly as in
    ``Trainer``. The optimizer gets the Trainer's parameter groups (``args.weight_decay`` on weights, 0 on
    biases and LayerNorm) and its learning-rate schedule; its state, the gradient window included, is saved
    with every checkpoint and restored by ``train(resume_from_checkpoint=...)``. FSDP and DeepSpeed are
    refused (:func:`check_supported_setup`). ``create_model_card`` writes hf_mfac's card when
    ``hf_mfac.integrations.model_card`` is available, the stock card otherwise.

    Gradient scale: transformers 5.x assumes a model whose ``forward`` takes ``**kwargs`` normalises its
    loss by ``num_items_in_batch``, and then neither divides by the accumulation steps nor undoes the
    multiplication by the number of processes. Most models (BERT/ViT classification among them) ignore
    ``num_items_in_batch``, so their gradient comes out (accumulation steps x processes) too large. AdamW
    does not care; M-FAC's step ``F^{-1} g`` does. With ``optim="mfac"``, unless a ``compute_loss_func`` is
    given or the model declares ``accepts_loss_kwargs``, this trainer therefore sets
    ``model_accepts_loss_kwargs = False``: every micro-batch loss is a mean and is divided by the
    accumulation steps, so M-FAC sees the mean gradient of the optimizer step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _is_mfac(self.args):
            check_supported_setup(self.args, self)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.compute_loss_func is None and not hasattr(unwrapped, "accepts_loss_kwargs"):
                self.model_accepts_loss_kwargs = False

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None):
        if _is_mfac(args):
            return mfac_optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_model_card(self, **info) -> None:
        """Write ``README.md`` in ``args.output_dir``: hf_mfac's card (M-FAC/sparsity metadata) if available."""
        try:
            from .model_card import write_trainer_model_card
        except ImportError:
            return super().create_model_card(**info)
        if self.is_world_process_zero():
            write_trainer_model_card(self, self.args.output_dir, **info)
