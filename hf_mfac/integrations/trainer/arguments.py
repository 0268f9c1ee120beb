"""``TrainingArguments`` that accept ``--optim mfac``.

Stock transformers rejects ``mfac`` in three places: the CLI choices that ``HfArgumentParser`` builds from
the ``OptimizerNames`` enum, the enum conversion in ``TrainingArguments.__post_init__``, and
``Trainer.get_optimizer_cls_and_kwargs``. :class:`MFACTrainingArguments` handles the first two (``optim``
becomes a plain string field whose choices add ``mfac``); :class:`hf_mfac.integrations.MFACTrainer` or
:func:`hf_mfac.integrations.mfac_optimizer_cls_and_kwargs` handle the third.

This module imports nothing else of :mod:`hf_mfac.integrations`; :mod:`.trainer` imports it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ...core._checks import check_int, check_real
from ...optim.mfac import MFAC_OPTIM, selects_mfac

__all__ = ["MFACTrainingArguments", "parse_optim_args", "check_supported_setup", "MFAC_OPTIM", "OPTIM_ARG_ALIASES"]

logger = logging.getLogger(__name__)

# Spellings accepted in --optim_args -> hf_mfac.MFAC keyword. `num_grads`/`damp`/`lr` appear on the M-FAC
# model cards on the Hub (`--optim_args '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}'`), `ngrads` in the
# reference code's command lines.
OPTIM_ARG_ALIASES = {
    "num_grads": "num_grads", "ngrads": "num_grads",
    "damp": "damp",
    "momentum": "momentum",
    "grad_dtype": "grad_dtype",
    "window_device": "window_device",
    "normalize_by_seen": "normalize_by_seen",
    "nonfinite": "nonfinite",
    "lr": "lr",
    "weight_decay": "weight_decay",
}
# optim_args key -> the typed field it sets (the other keys go to MFAC as they are, or to the Trainer's args).
_FIELD_OF = {"num_grads": "mfac_num_grads", "damp": "mfac_damp", "momentum": "mfac_momentum",
             "grad_dtype": "mfac_grad_dtype", "window_device": "mfac_window_device"}
GRAD_DTYPES = ("float32", "bfloat16", "float16")


def _convert(value: str):
    """'1e-6' -> 1e-6, '1024' -> 1024, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        with contextlib.suppress(ValueError):  # not this type: try the next
            return cast(value)
    return value.strip()


def check_mfac_option(name: str, value, label: str | None = None):
    """``value`` of the ``hf_mfac.MFAC`` keyword ``name`` checked (and typed: ``1024.0`` -> 1024) as
    ``MFAC`` would check it; ``ValueError`` naming ``label`` (default: ``name``) and what is wrong."""
    label = label or name
    try:
        if name == "num_grads":
            return check_int(label, value)
        if name == "damp":
            return check_real(label, value, low=0, low_open=True)
        if name in ("lr", "weight_decay"):
            return check_real(label, value, low=0)
        if name == "momentum":
            return check_real(label, value, low=0, high=1, high_open=True)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if name == "grad_dtype":
        if value is not None and str(value).replace("torch.", "") not in GRAD_DTYPES:
            raise ValueError(f"{label} must be one of {', '.join(GRAD_DTYPES)}; got {value!r}")
        return value if value is None else str(value).replace("torch.", "")
    if name == "window_device":
        if value is not None:
            import torch

            try:
                torch.device(value)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{label} must be a device such as 'cpu' or 'cuda:0'; got {value!r} ({e})") from None
        return value
    if name == "normalize_by_seen":
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false; got {value!r}")
        return value
    if name == "nonfinite":
        if value not in ("raise", "skip"):
            raise ValueError(f"{label} must be 'raise' or 'skip'; got {value!r}")
        return value
    return value


def parse_optim_args(s: str | dict | None, *, source: str = "--optim_args") -> dict:
    """Parse ``--optim_args`` for M-FAC into ``hf_mfac.MFAC`` keyword names.

    Accepts ``None``/``""`` (-> ``{}``), a JSON object (``'{"num_grads": 512, "damp": 1e-6}'``), the
    transformers form ``"k=v,k=v"`` (``"ngrads=512,damp=1e-6"``) or an already parsed dict. Values of the
    ``k=v`` form are typed (int, float, bool, ``none``). Keys are mapped through :data:`OPTIM_ARG_ALIASES`
    (``ngrads`` -> ``num_grads``) and every value is checked as ``MFAC`` checks it. Anything wrong (bad JSON,
    an unknown key, ``ngrads=abc``, ``damp=-1``) raises ``ValueError`` naming ``source`` and the problem.
    """
    if s is None or (isinstance(s, str) and not s.strip()):
        return {}
    if isinstance(s, dict):
        raw = dict(s)
    elif not isinstance(s, str):
        raise ValueError(f"{source} must be a string ('k=v,k=v' or JSON) or a dict; got {type(s).__name__}")
    elif s.strip().startswith("{"):
        try:
            raw = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e.msg} at character {e.pos}): {s!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source} JSON must be an object; got {s!r}")
        raw = {k: _convert(v) if isinstance(v, str) else v for k, v in raw.items()}
    else:
        raw = {}
        for item in s.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{source} expects 'k=v,k=v' or a JSON object; cannot read {item!r} in {s!r}")
            raw[key.strip()] = _convert(value)
    out = {}
    for key, value in raw.items():
        name = OPTIM_ARG_ALIASES.get(str(key).strip().lower())
        if name is None:
            raise ValueError(f"{source}: unknown M-FAC key {key!r}; known: {sorted(OPTIM_ARG_ALIASES)}")
        value = check_mfac_option(name, value, f"{source} {str(key).strip()}")
        if name in out and out[name] != value:
            raise ValueError(f"{source} gives {name} twice with different values ({out[name]!r}, {value!r})")
        out[name] = value
    return out


def _choices() -> list[str]:
    return [o.value for o in OptimizerNames] + [MFAC_OPTIM, MFAC_OPTIM.upper()]


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


@dataclass
class MFACTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus M-FAC: ``--optim mfac``, typed ``mfac_*`` fields, richer ``--optim_args``.

    Everything of :class:`transformers.TrainingArguments` behaves as usual; with another ``optim`` the
    ``mfac_*`` fields are ignored. With ``optim="mfac"`` (also ``"MFAC"``, the model-card spelling):

    * ``learning_rate`` is M-FAC's lr, scheduled by the Trainer as for any optimizer. Its scale depends on
      ``mfac_num_grads`` (m): for gradients inside the window's span the update grows roughly like m, so
      use ``lr ≈ 0.1 / m`` (``1e-4`` at m=1024 as in the paper, ``~2e-3`` at m=64). The transformers default
      ``5e-5`` is a poor choice for M-FAC.
    * ``weight_decay`` is decoupled (``p -= lr * weight_decay * p``) and, as for AdamW, the Trainer leaves
      biases and LayerNorm weights out of it (its no-decay parameter group).
    * ``optim_args`` may be ``"k=v,k=v"`` or JSON and may use the model-card spellings
      (``num_grads``/``ngrads``, ``damp``, ``momentum``, ``lr``, plus ``grad_dtype``, ``window_device``,
      ``normalize_by_seen``, ``nonfinite``). Its values are written into the typed fields, so
      ``args.mfac_num_grads`` always holds the value in use; a typed field set away from its default
      that disagrees with ``optim_args`` is an error. An ``lr`` there replaces ``learning_rate`` (with a
      warning if they differ).
    * ``max_grad_norm`` (default 1.0) is left as it is for every optimizer: the Trainer clips the
      (accumulated, all-reduced, unscaled) gradient *before* M-FAC sees it, so the window holds the clipped
      gradients and the Fisher is the empirical Fisher of what the optimizer is actually fed. This is also
      what the published M-FAC fine-tuning runs did (the stock Trainer with its default clipping). Pass
      ``--max_grad_norm 0`` for the paper's unclipped algorithm. Clipping rescales gradients, and
      ``F^{-1} g`` is not invariant to that scale (small gradients give larger steps), so keep the same
      setting when comparing learning rates.
    * Memory: the window holds m x d values (d = trainable parameters) of ``mfac_grad_dtype``, on
      ``mfac_window_device``; e.g. BERT-base (110M) at m=1024 in fp32 needs ~450 GB, in bf16 half of it.
    * FSDP, DeepSpeed and tensor/context parallelism are refused (they move or shard the optimizer step);
      DDP is supported (every rank holds the full window and computes the same step).
    * Everything is checked when the arguments are built, not when training starts: a bad M-FAC setting
      (``--mfac_num_grads -4``, ``--mfac_damp -1``, ``--mfac_grad_dtype int8``, a NaN ``--learning_rate``,
      ``--optim_args ngrads=abc``, malformed JSON in ``--optim_args``) raises ``ValueError`` naming the flag and
      what is wrong, and an unknown ``--optim`` lists the valid names, ``mfac`` included.
    """

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "The optimizer to use; `mfac` selects hf_mfac.MFAC.", "choices": _choices()},
    )
    optim_args: str | None = field(
        default=None,
        metadata={"help": "Optimizer arguments as 'k=v,k=v' or JSON. For mfac: num_grads (or ngrads), damp, "
                          "momentum, grad_dtype, window_device, normalize_by_seen, nonfinite, lr."},
    )
    mfac_num_grads: int = field(
        default=1024, metadata={"help": "M-FAC: number m of past gradients in the sliding window."})
    mfac_damp: float = field(
        default=1e-6, metadata={"help": "M-FAC: dampening λ of the empirical Fisher, F = λI + (1/m) Σ g gᵀ."})
    mfac_momentum: float = field(
        default=0.0, metadata={"help": "M-FAC: momentum applied to the preconditioned direction."})
    mfac_grad_dtype: str | None = field(
        default=None,
        metadata={"help": "M-FAC: storage dtype of the gradient window (float32 by default; bfloat16 or float16 "
                          "halve memory and time).", "choices": ["float32", "bfloat16", "float16"]})
    mfac_window_device: str | None = field(
        default=None, metadata={"help": "M-FAC: device holding the window (default: the parameters' device)."})

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
        """Write ``optim_args`` into the typed fields and check every M-FAC setting, naming its flag."""
        opts = parse_optim_args(self.optim_args)
        defaults = {f.name: f.default for f in self.__dataclass_fields__.values()}
        for key, name in _FIELD_OF.items():
            if key not in opts:
                continue
            current = getattr(self, name)
            if current != defaults[name] and current != opts[key]:
                raise ValueError(f"--{name}={current!r} and --optim_args {key}={opts[key]!r} disagree; give one")
            setattr(self, name, opts[key])
        if "lr" in opts and opts["lr"] != self.learning_rate:
            logger.warning("--optim_args lr=%s replaces --learning_rate=%s", opts["lr"], self.learning_rate)
            self.learning_rate = float(opts["lr"])
        if "weight_decay" in opts and opts["weight_decay"] != self.weight_decay:
            logger.warning("--optim_args weight_decay=%s replaces --weight_decay=%s",
                           opts["weight_decay"], self.weight_decay)
            self.weight_decay = float(opts["weight_decay"])
        for name, option in (("mfac_num_grads", "num_grads"), ("mfac_damp", "damp"), ("mfac_momentum", "momentum"),
                             ("mfac_grad_dtype", "grad_dtype"), ("mfac_window_device", "window_device"),
                             ("learning_rate", "lr"), ("weight_decay", "weight_decay")):
            setattr(self, name, check_mfac_option(option, getattr(self, name), f"--{name}"))

    def mfac_kwargs(self) -> dict:
        """Keyword arguments for ``hf_mfac.MFAC`` (lr included; per-group weight decay comes from the Trainer)."""
        extra = {k: v for k, v in parse_optim_args(self.optim_args).items()
                 if k in ("normalize_by_seen", "nonfinite")}
        return {"lr": self.learning_rate, "weight_decay": self.weight_decay, "num_grads": self.mfac_num_grads,
                "damp": self.mfac_damp, "momentum": self.mfac_momentum, "grad_dtype": self.mfac_grad_dtype,
                "window_device": self.mfac_window_device, **extra}

    def set_optimizer(self, name="adamw_torch", *args, **kwargs):
        """As :meth:`TrainingArguments.set_optimizer`, also accepting ``name="mfac"``."""
        if selects_mfac(name):
            super().set_optimizer("sgd", *args, **kwargs)
            self.optim = MFAC_OPTIM
            self._resolve_mfac_options()
            return self
        return super().set_optimizer(name, *args, **kwargs)
