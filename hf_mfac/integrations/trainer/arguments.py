"""``TrainingArguments`` that accept ``--optim mfac``.

Stock transformers rejects ``mfac`` in three places: the CLI choices that ``HfArgumentParser``
builds from the ``OptimizerNames`` enum, the enum conversion in ``TrainingArguments.__post_init__``,
and ``Trainer.get_optimizer_cls_and_kwargs``. :class:`MFACTrainingArguments` handles the first two
(``optim`` becomes a plain string field whose choices add ``mfac``); :class:`MFACTrainer` or
:func:`mfac_optimizer_cls_and_kwargs` (:mod:`.mfac_trainer`) handle the third.

The M-FAC settings are not spelled here: they are the fields of
:class:`~hf_mfac.optim.options.MFACOptions`. Each becomes a flag (``--mfac_<name>``, or the
Trainer's own ``--learning_rate`` / ``--weight_decay`` for ``lr`` / ``weight_decay``:
:data:`TRAINER_FLAGS`), ``--optim_args`` is read by its :func:`parse_optim_args`, and every value is
checked by its :func:`check_option`.

This module imports nothing else of :mod:`hf_mfac.integrations`; :mod:`.mfac_trainer` imports it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ...optim.mfac import MFAC_OPTIM, selects_mfac
from ...optim.options import GRAD_DTYPES, OPTION_ALIASES, MFACOptions, check_option, option_fields
from ...optim.options import parse_optim_args  # noqa: F401 - the --optim_args reader, exported here

__all__ = ["MFACTrainingArguments", "parse_optim_args", "check_supported_setup", "MFAC_OPTIM",
           "OPTIM_ARG_ALIASES", "TRAINER_FLAGS", "GRAD_DTYPES"]

logger = logging.getLogger(__name__)

OPTIM_ARG_ALIASES = OPTION_ALIASES  # every spelling accepted in --optim_args -> MFAC keyword

# The options that TrainingArguments already has a flag for; every other option is ``mfac_<name>``.
TRAINER_FLAGS = {"lr": "learning_rate", "weight_decay": "weight_decay"}


def flag_of(option: str) -> str:
    """The training-arguments field that holds ``option`` (``num_grads`` -> ``mfac_num_grads``)."""
    return TRAINER_FLAGS.get(option, f"mfac_{option}")


def check_mfac_option(name: str, value, label: str | None = None):
    """``value`` of the ``hf_mfac.MFAC`` option ``name`` checked and typed (``1024.0`` -> 1024) as
    given on a command line; ``ValueError`` naming ``label`` (default: ``name``) and what is
    wrong."""
    return check_option(name, value, label, text=True)


def _mfac_fields() -> list:
    """``(mfac_<name>, type, field)`` for every option without a Trainer flag, with its default,
    help text and command-line choices."""
    hints = typing.get_type_hints(MFACOptions)
    out = []
    for f in option_fields():
        if f.name in TRAINER_FLAGS:
            continue
        meta = {"help": f"M-FAC: {f.metadata['help']}"}
        if f.metadata["choices"]:
            meta["choices"] = list(f.metadata["choices"])
        out.append((flag_of(f.name), hints[f.name], field(default=f.default, metadata=meta)))
    return out


MFACOptionFields = dataclasses.make_dataclass("MFACOptionFields", _mfac_fields(), eq=False,
                                              repr=False)
MFACOptionFields.__module__ = __name__
MFACOptionFields.__doc__ = "The ``mfac_*`` fields of :class:`MFACTrainingArguments`, one per option"


def _choices() -> list[str]:
    return [o.value for o in OptimizerNames] + [MFAC_OPTIM, MFAC_OPTIM.upper()]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_supported_setup(args, trainer=None) -> None:
    """Raise ``ValueError`` for setups where ``hf_mfac.MFAC`` would train wrongly: FSDP, DeepSpeed,
    sharding.

    FSDP and DeepSpeed (ZeRO) shard or move the parameters, gradients and optimizer step, so each
    rank would build its window from a shard, or the step would bypass ``MFAC.step``; tensor/context
    parallelism shard the parameters too. Reads ``args.fsdp``, ``args.deepspeed``,
    ``args.parallelism_config``, the ``ACCELERATE_USE_FSDP``/``ACCELERATE_USE_DEEPSPEED`` variables
    set by ``accelerate launch``, and, when given, the Trainer's
    ``is_fsdp_enabled``/``is_deepspeed_enabled``. Plain DDP is supported.
    """
    problems = []
    if (getattr(args, "fsdp", None) or _env_true("ACCELERATE_USE_FSDP")
            or getattr(trainer, "is_fsdp_enabled", False)):
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
            f"hf_mfac.MFAC does not support {', '.join(problems)} yet: these shard the "
            "parameters/gradients or move the optimizer step, so M-FAC would precondition with the "
            "wrong Fisher. Train with plain DDP (`torchrun --nproc_per_node=N script.py ...` "
            "without --fsdp/--deepspeed), or choose another --optim.")


@dataclass
class MFACTrainingArguments(MFACOptionFields, TrainingArguments):
    """``TrainingArguments`` plus M-FAC: ``--optim mfac``, typed ``mfac_*`` fields, richer
    ``--optim_args``.

    Everything of :class:`transformers.TrainingArguments` behaves as usual; with another ``optim``
    the ``mfac_*`` fields are ignored. With ``optim="mfac"`` (also ``"MFAC"``, the model-card
    spelling):

    * The M-FAC options are those of :class:`~hf_mfac.optim.options.MFACOptions`, each a field
      ``mfac_<name>`` (``mfac_num_grads``, ``mfac_damp``, ``mfac_momentum``, ``mfac_grad_dtype``,
      ``mfac_window_device``, ``mfac_normalize_by_seen``, ``mfac_nonfinite``, ...), with its default
      and help; ``lr`` and ``weight_decay`` are the Trainer's ``learning_rate`` and
      ``weight_decay``.
    * ``learning_rate`` is M-FAC's lr, scheduled by the Trainer as for any optimizer. Its scale
      depends on ``mfac_num_grads`` (m): for gradients inside the window's span the update grows
      roughly like m, so use ``lr ≈ 0.1 / m`` (``1e-4`` at m=1024 as in the paper, ``~2e-3`` at
      m=64). The transformers default ``5e-5`` is a poor choice for M-FAC.
    * ``weight_decay`` is decoupled (``p -= lr * weight_decay * p``) and, as for AdamW, the Trainer
      leaves biases and LayerNorm weights out of it (its no-decay parameter group).
    * ``optim_args`` may be ``"k=v,k=v"`` or JSON and may use the model-card spellings
      (``num_grads``/``ngrads``/``m``, ``damp``, ``momentum``, ``lr``, and every other option's
      name). It is read once, when the arguments are built, and its values are written into the
      fields, so ``args.mfac_num_grads`` always holds the value in use; a field set away from its
      default that disagrees with ``optim_args`` is an error. An ``lr`` there replaces
      ``learning_rate`` (with a warning if they differ), a ``weight_decay`` ``weight_decay``.
    * ``max_grad_norm`` (default 1.0) is left as it is for every optimizer: the Trainer clips the
      (accumulated, all-reduced, unscaled) gradient *before* M-FAC sees it, so the window holds the
      clipped gradients and the Fisher is the empirical Fisher of what the optimizer is actually
      fed. This is also what the published M-FAC fine-tuning runs did (the stock Trainer with its
      default clipping). Pass ``--max_grad_norm 0`` for the paper's unclipped algorithm. Clipping
      rescales gradients, and ``F^{-1} g`` is not invariant to that scale (small gradients give
      larger steps), so keep the same setting when comparing learning rates.
    * Memory: the window holds m x d values (d = trainable parameters) of ``mfac_grad_dtype``, on
      ``mfac_window_device``; e.g. BERT-base (110M) at m=1024 in fp32 needs ~450 GB, in bf16 half.
    * FSDP, DeepSpeed and tensor/context parallelism are refused (they move or shard the optimizer
      step); DDP is supported (every rank holds the full window and computes the same step).
    * Everything is checked when the arguments are built, not when training starts: a bad M-FAC
      setting (``--mfac_num_grads -4``, ``--mfac_damp -1``, ``--mfac_grad_dtype int8``, a NaN
      ``--learning_rate``, ``--optim_args ngrads=abc``, malformed JSON in ``--optim_args``) raises
      ``ValueError`` naming the flag and what is wrong, and an unknown ``--optim`` lists the valid
      names, ``mfac`` included.
    """

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "The optimizer to use; `mfac` selects hf_mfac.MFAC.",
                  "choices": _choices()},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "Optimizer arguments as 'k=v,k=v' or JSON. For mfac: any M-FAC option "
                          f"({', '.join(sorted(OPTION_ALIASES))})."},
    )

    def __post_init__(self):
        if not selects_mfac(self):
            if isinstance(self.optim, str) and self.optim not in {o.value for o in OptimizerNames}:
                raise ValueError(f"--optim {self.optim!r} is not a known optimizer; choose one of: "
                                 + ", ".join([MFAC_OPTIM] + [o.value for o in OptimizerNames]))
            super().__post_init__()
            return
        self._resolve_mfac_options()
        check_supported_setup(self)  # before super(): a DeepSpeed config would be built there
        # Stock __post_init__ converts `optim` with OptimizerNames(...), which has no member for us.
        self.optim = OptimizerNames.SGD
        try:
            super().__post_init__()
        finally:
            self.optim = MFAC_OPTIM

    def _resolve_mfac_options(self) -> None:
        """Read ``optim_args`` once into the fields, and check each M-FAC setting once, naming its
        flag (values from ``optim_args`` are checked as they are read)."""
        given = parse_optim_args(self.optim_args)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in (f.name for f in option_fields()):
            flag = flag_of(name)
            current = getattr(self, flag)
            if name not in given:
                setattr(self, flag, check_option(name, current, f"--{flag}", text=True))
            elif name in TRAINER_FLAGS:
                if given[name] != current:
                    logger.warning("--optim_args %s=%s replaces --%s=%s", name, given[name], flag,
                                   current)
                setattr(self, flag, float(given[name]))
            elif current != defaults[flag] and current != given[name]:
                raise ValueError(f"--{flag}={current!r} and --optim_args {name}={given[name]!r} "
                                 "disagree; give one")
            else:
                setattr(self, flag, given[name])

    def mfac_kwargs(self) -> dict:
        """Keyword arguments for ``hf_mfac.MFAC``, from the fields: the algorithm's hyperparameters
        (``core`` options: ``lr``, ``weight_decay``, ``num_grads``, ``damp``, ``momentum``) always,
        every other option when set away from its default (which is ``MFAC``'s default too). The
        Trainer's parameter groups set the weight decay per group."""
        values = {f.name: (getattr(self, flag_of(f.name)), f) for f in option_fields()}
        return {name: v for name, (v, f) in values.items() if f.metadata["core"] or v != f.default}

    def set_optimizer(self, name="adamw_torch", *args, **kwargs):
        """As :meth:`TrainingArguments.set_optimizer`, also accepting ``name="mfac"``."""
        if selects_mfac(name):
            super().set_optimizer("sgd", *args, **kwargs)
            self.optim = MFAC_OPTIM
            self._resolve_mfac_options()
            return self
        return super().set_optimizer(name, *args, **kwargs)
