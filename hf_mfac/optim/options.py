"""The settings of :class:`~hf_mfac.MFAC`, defined once: :class:`MFACOptions`.

Each field of :class:`MFACOptions` holds one option of the optimizer [M-FAC]: its type and default,
its help text, the other spellings it is known by (``num_grads`` is ``ngrads`` in the reference
code's command lines and ``m`` in the paper), the values offered on a command line, and its check.
Everything else is read from it:

* ``MFAC``'s keyword defaults and its argument checks (``MFACOptions(**kwargs)`` checks every
  value);
* the ``mfac_*`` fields of :class:`~hf_mfac.integrations.MFACTrainingArguments`
  (:func:`option_fields`), with their ``--help`` text;
* :func:`parse_optim_args`, which reads ``--optim_args`` (``k=v,k=v`` or JSON, any spelling) into
  option names;
* :data:`OPTION_ALIASES`, every accepted spelling -> option name.

A new option is one new field here (``option(default, help, check, ...)``) and its use in ``MFAC``.
This module imports torch only (no transformers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass

import torch

from ..core._checks import check_int, check_real
from ..core.sparse_window import check_density

__all__ = ["MFACOptions", "OPTION_ALIASES", "GRAD_DTYPES", "option_fields", "check_option",
           "parse_optim_args"]

# Window storage dtypes offered on a command line (the Python API also takes float64, torch dtypes).
GRAD_DTYPES = ("float32", "bfloat16", "float16")
_STORAGE = ("float16", "bfloat16", "float32", "float64")


# -- checks: (label, value) -> the value in canonical form; TypeError/ValueError naming label ---
def _nonnegative(label: str, value) -> float:
    return check_real(label, value, low=0)


def _positive(label: str, value) -> float:
    return check_real(label, value, low=0, low_open=True)


def _fraction(label: str, value) -> float:
    return check_real(label, value, low=0, high=1, high_open=True)


def _count(label: str, value) -> int:
    return check_int(label, value)


def _flag(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{label} must be True or False; got {value!r}")
    return value


def _raise_or_skip(label: str, value) -> str:
    if value not in ("raise", "skip"):
        raise ValueError(f"{label} must be 'raise' or 'skip'; got {value!r}")
    return value


def _storage_name(label: str, value) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16``, ``"torch.bfloat16"`` or ``"bfloat16"``; None stays
    None."""
    name = None if value is None else str(value).replace("torch.", "")
    if name is not None and name not in _STORAGE:
        raise ValueError(f"{label} must be float16, bfloat16, float32 or float64; got {value!r}")
    return name


def _density(label: str, value) -> float:
    return check_density(value, label)


def _device(label: str, value):
    if value is not None:
        try:
            torch.device(value)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{label} must be a device such as 'cpu' or 'cuda:0'; "
                             f"got {value!r} ({e})") from None
    return value


def option(default, help: str, check, *, aliases: tuple = (), choices: tuple | None = None,
           core: bool = False):
    """A field of :class:`MFACOptions`. ``check(label, value)`` returns the value in canonical form
    or raises naming ``label``; ``aliases``: other spellings accepted in ``--optim_args``;
    ``choices``: the values offered where the option is given as text (a command line,
    ``--optim_args``), listed in its help; ``core``: a hyperparameter of the algorithm [M-FAC,
    Alg. 1], always passed on and reported (a model card's table), where the others are only when
    set away from their default (so a new option at its default changes no run, card or log)."""
    meta = {"help": help, "check": check, "aliases": tuple(aliases), "choices": choices,
            "core": core}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class MFACOptions:
    """Every option of :class:`~hf_mfac.MFAC`, checked when built (``TypeError``/``ValueError``
    naming the option). ``MFACOptions()`` holds the defaults."""

    lr: float = option(
        1e-4, "Learning rate (finite, >= 0); a good start is 0.1 / num_grads.", _nonnegative,
        core=True)
    num_grads: int = option(
        1024, "Number m of past gradients in the sliding window (an integer >= 1).", _count,
        aliases=("ngrads", "m"), core=True)
    damp: float = option(
        1e-6, "Dampening λ of the empirical Fisher, F = λI + (1/m) Σ g gᵀ (finite, > 0).",
        _positive, core=True)
    weight_decay: float = option(
        0.0, "Decoupled weight decay, p <- p (1 - lr wd) (finite, >= 0).", _nonnegative, core=True)
    momentum: float = option(
        0.0, "Momentum on the preconditioned direction, in [0, 1).", _fraction, core=True)
    grad_dtype: str | None = option(
        None, "Storage dtype of the gradient window (float32 when unset; bfloat16 or float16 halve "
        "memory and time).", _storage_name, choices=GRAD_DTYPES)
    window_device: str | None = option(
        None, "Device holding the window (default: the parameters' device), e.g. 'cpu'.", _device)
    normalize_by_seen: bool = option(
        False, "Before the window is full, divide the Fisher by the gradients seen instead of m.",
        _flag)
    nonfinite: str = option(
        "raise", "A gradient the window refuses (NaN/inf, beyond the storage dtype): 'raise' or "
        "'skip' the step.", _raise_or_skip)
    density: float = option(
        1.0, "Fraction of each gradient the window keeps, in (0, 1]; below 1 the window is "
        "compressed (top-k per block with error feedback), e.g. 0.01 for num_grads=1024 at "
        "BERT-base size.", _density)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def option_fields() -> tuple:
    """The fields of :class:`MFACOptions` (``dataclasses.Field``: name, type, default, metadata with
    ``help``, ``check``, ``aliases``, ``choices``), in order."""
    return dataclasses.fields(MFACOptions)


_FIELDS = {f.name: f for f in option_fields()}
OPTION_ALIASES = {spelling: f.name for f in option_fields()
                  for spelling in (f.name, *f.metadata["aliases"])}
"""Every spelling accepted in ``--optim_args`` -> the option (``MFAC`` keyword) it sets."""


def check_option(name: str, value, label: str | None = None, *, text: bool = False):
    """``value`` of option ``name`` checked and in canonical form (``1024.0`` -> 1024,
    ``torch.bfloat16`` -> ``"bfloat16"``). ``text=True`` for a value given as text (a command line,
    ``--optim_args``, a training argument): only the option's ``choices`` are accepted and every
    error is a ``ValueError``. Errors name ``label`` (default: ``name``)."""
    f, label = _FIELDS[name], label or name
    choices = f.metadata["choices"]
    if text and choices and value is not None and str(value).replace("torch.", "") not in choices:
        raise ValueError(f"{label} must be one of {', '.join(choices)}; got {value!r}")
    try:
        return f.metadata["check"](label, value)
    except TypeError as e:
        if not text:
            raise
        raise ValueError(str(e)) from None


def _convert(value: str):
    """'1e-6' -> 1e-6, '1024' -> 1024, 'true' -> True, 'none' -> None, anything else stays a
    string."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        with contextlib.suppress(ValueError):  # not this type: try the next
            return cast(value)
    return value.strip()


def _read(s, source: str) -> dict:
    """The raw ``{key: value}`` of ``--optim_args`` (JSON object, ``k=v,k=v`` or a dict), values
    typed."""
    if isinstance(s, dict):
        return dict(s)
    if not isinstance(s, str):
        raise ValueError(f"{source} must be a string ('k=v,k=v' or JSON) or a dict; "
                         f"got {type(s).__name__}")
    if s.strip().startswith("{"):
        try:
            raw = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e.msg} at character {e.pos}): "
                             f"{s!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{source} JSON must be an object; got {s!r}")
        return {k: _convert(v) if isinstance(v, str) else v for k, v in raw.items()}
    raw = {}
    for item in filter(str.strip, s.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{source} expects 'k=v,k=v' or a JSON object; cannot read {item!r} "
                             f"in {s!r}")
        raw[key.strip()] = _convert(value)
    return raw


def parse_optim_args(s: str | dict | None, *, source: str = "--optim_args") -> dict:
    """``--optim_args`` for M-FAC as ``{option name: checked value}`` (only the options it gives).

    Accepts ``None``/``""`` (-> ``{}``), a JSON object (``'{"num_grads": 512, "damp": 1e-6}'``), the
    transformers form ``"k=v,k=v"`` (``"ngrads=512,damp=1e-6"``) or an already parsed dict. Values
    of the ``k=v`` form are typed (int, float, bool, ``none``). Keys are read through
    :data:`OPTION_ALIASES` (``ngrads`` -> ``num_grads``) and every value is checked by
    :func:`check_option`. Anything wrong (bad JSON, an unknown key, ``ngrads=abc``, ``damp=-1``, one
    option given twice with different values) raises ``ValueError`` naming ``source`` and the
    problem.
    """
    if s is None or (isinstance(s, str) and not s.strip()):
        return {}
    out = {}
    for key, value in _read(s, source).items():
        name = OPTION_ALIASES.get(str(key).strip().lower())
        if name is None:
            raise ValueError(f"{source}: unknown M-FAC key {key!r}; "
                             f"known: {sorted(OPTION_ALIASES)}")
        value = check_option(name, value, f"{source} {str(key).strip()}", text=True)
        if name in out and out[name] != value:
            raise ValueError(f"{source} gives {name} twice with different values "
                             f"({out[name]!r}, {value!r})")
        out[name] = value
    return out
