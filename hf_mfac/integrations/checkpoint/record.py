"""Masks and the sparsity record that every checkpoint form writes into
``config.json["hf_mfac_sparsity"]``.

Owns the checking of masks against a model (:func:`resolve_masks`: names, shapes, bool or 0/1
values, no nonzero weight where pruned; or masks derived from exact zeros), the ``N:M`` pattern test
(:func:`is_nm_sparse`), building the record (:func:`sparsity_metadata`: counts, per-layer table,
redacted recipe), reading it back from a model, a config or a folder with its shape checked
(:func:`read_sparsity_metadata`), and saving a config with the record set for the duration of the
save only (:func:`save_config_with`). Masks follow :mod:`hf_mfac.core.masks`: ``{parameter name:
bool tensor}``, ``True`` = kept.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .files import FORMAT_VERSION, SPARSITY_KEY, read_json, hf_mfac_version
from .redaction import redact

__all__ = ["resolve_masks", "is_nm_sparse", "sparsity_metadata", "read_sparsity_metadata"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _linear_weight_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight" if name else "weight"
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    ]


def matching_names(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """Names equal to a target or matching it as a regular expression (``re.search``)."""
    names, out = list(names), []
    for t in targets:
        hit = [n for n in names if n == t or re.search(t, n)]
        if not hit:
            raise ValueError(f"target {t!r} matches no candidate of the model")
        out += [n for n in hit if n not in out]
    return out


def _as_bool_mask(name: str, mask, param: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask).detach().cpu()
    if mask.shape != param.shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"mask for {name!r} must be bool or 0/1 values (True/1 = kept)")
        mask = mask != 0
    return mask


def resolve_masks(
    model: nn.Module, masks: Mapping[str, Any] | None = None, targets: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Validated masks ``{name: bool CPU tensor}`` (True = kept) for ``model``.

    With ``masks``: each name must be a parameter of ``model``, each mask its shape, and no weight
    may be nonzero where its mask says pruned (``ValueError`` listing the offenders). Without: masks
    are derived from exact zeros (``weight != 0``) of the weight matrices (parameters with 2 or more
    dimensions; biases and norms, often initialised to 0, never count) whose names match ``targets``
    (names or regular expressions), or, when ``targets`` is None, of every ``nn.Linear`` weight
    holding at least one zero.
    """
    params = dict(model.named_parameters())
    if masks is None:
        if targets is None:
            names = [
                n
                for n in _linear_weight_names(model)
                if n in params and bool((params[n] == 0).any())
            ]
        else:
            matrices = [n for n, p in params.items() if p.dim() >= 2]
            names = matching_names(matrices, [targets] if isinstance(targets, str) else targets)
        return {n: (params[n].detach() != 0).cpu() for n in names}
    out, bad = {}, []
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(
                f"mask given for {name!r}, which is not a parameter of the model "
                "(masks are keyed by model.named_parameters() names)"
            )
        out[name] = mask = _as_bool_mask(name, mask, params[name])
        wrong = int(((params[name].detach().cpu() != 0) & ~mask).sum())
        if wrong:
            bad.append(f"{name}: {wrong} nonzero weights where the mask says pruned")
    if bad:
        raise ValueError(
            "masks disagree with the weights (apply the masks first, e.g. "
            "weight.mul_(mask)):\n  " + "\n  ".join(bad)
        )
    return out


def is_nm_sparse(mask_or_weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the last dimension has at most ``n``
    nonzeros (for a bool mask: at most ``n`` kept). False when the last dimension does not divide by
    ``m``."""
    t = mask_or_weight
    if t.dim() == 0 or t.shape[-1] % m:
        return False
    return bool(((t != 0).reshape(-1, m).sum(1) <= n).all())


def _exactly_2_4(mask: torch.Tensor) -> bool:
    return (
        mask.dim() > 0 and mask.shape[-1] % 4 == 0 and bool((mask.reshape(-1, 4).sum(1) == 2).all())
    )


def _check_pattern(pattern: str | None, masks: Mapping[str, torch.Tensor]) -> str:
    if pattern is None:
        return "2:4" if all(_exactly_2_4(k) for k in masks.values()) else "unstructured"
    nm = _NM.match(pattern)
    if nm:
        n, m = map(int, nm.groups())
        off = [k for k, v in masks.items() if not is_nm_sparse(v, n, m)]
        if off:
            raise ValueError(
                f"pattern {pattern!r} does not hold for "
                f"{off[:5]}{' ...' if len(off) > 5 else ''}: "
                f"some group of {m} along the last dimension keeps more than {n}"
            )
        return f"{n}:{m}"
    return pattern


def _jsonable(name: str, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable to go into config.json: {e}") from None
    return value


def sparsity_metadata(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    method: str | None = None,
    targets: Iterable[str] | None = None,
    pattern: str | None = None,
    recipe=None,
    extra: Mapping[str, Any] | None = None,
    form: str = "dense",
) -> dict:
    """The ``config.json["hf_mfac_sparsity"]`` record for validated ``masks`` (see
    :func:`resolve_masks`).

    Fields: ``format`` (``"dense"`` or ``"compact"``), ``format_version``, ``library``,
    ``library_version``, ``method``, ``pattern`` (``"N:M"``, checked against the masks; when None,
    ``"2:4"`` if every mask keeps exactly 2 of each 4 along its last dimension, else
    ``"unstructured"``), ``targets`` (as given, else the masked names), ``recipe`` (secret-looking
    values redacted, :func:`redact`), ``sparsity`` (pruned / masked weights), ``num_masked``,
    ``num_pruned``, ``model_sparsity`` (pruned / all parameters), ``per_layer`` (``{name: {shape,
    num_pruned, sparsity}}``), plus the ``extra`` keys (redacted the same way).
    :func:`save_sparse_pretrained` adds ``masks_file``, :func:`save_compact_pretrained` the size
    report under ``compact``. Raises ``ValueError`` when nothing is pruned.
    """
    per_layer, pruned, masked = {}, 0, 0
    for name, mask in masks.items():
        k = int((~mask).sum())
        per_layer[name] = {
            "shape": list(mask.shape),
            "num_pruned": k,
            "sparsity": k / max(mask.numel(), 1),
        }
        pruned, masked = pruned + k, masked + mask.numel()
    if pruned == 0:
        raise ValueError(
            "the model has no sparsity to save: no mask prunes anything and no "
            "targeted weight is "
            "exactly zero. Prune first (hf_mfac.pruning) or pass masks=... / "
            "targets=...; "
            "use model.save_pretrained for a dense model"
        )
    total = sum(p.numel() for p in model.parameters())
    targets = [targets] if isinstance(targets, str) else targets
    return {
        "format": form,
        "format_version": FORMAT_VERSION,
        "library": "hf_mfac",
        "library_version": hf_mfac_version(),
        "method": method,
        "pattern": _check_pattern(pattern, masks),
        "targets": list(targets) if targets is not None else list(masks),
        "recipe": redact(_jsonable("recipe", recipe)),
        "sparsity": pruned / masked,
        "num_masked": masked,
        "num_pruned": pruned,
        "model_sparsity": pruned / total,
        "per_layer": per_layer,
        **redact(_jsonable("extra", dict(extra or {}))),
    }


def save_config_with(model: nn.Module, attrs: Mapping[str, Any], save) -> None:
    """Run ``save()`` with ``attrs`` set on ``model.config``, restoring the config afterwards."""
    config, missing = model.config, object()
    old = {k: getattr(config, k, missing) for k in attrs}
    for k, v in attrs.items():
        setattr(config, k, v)
    try:
        save()
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(config, k)
            else:
                setattr(config, k, v)


def _check_record(rec, where: str) -> dict:
    """The ``hf_mfac_sparsity`` record, checked enough for the readers (a dict whose ``per_layer``
    maps names to a shape and a pruned count); ``ValueError`` naming ``where`` otherwise."""

    def bad(why):
        return ValueError(f"{where}: the {SPARSITY_KEY!r} record is malformed ({why})")

    if not isinstance(rec, dict):
        raise bad(f"not a mapping but {type(rec).__name__}")
    if rec.get("format", "dense") not in ("dense", "compact"):
        raise bad(f"format {rec.get('format')!r}")
    per_layer = rec.get("per_layer", {})
    if not isinstance(per_layer, dict):
        raise bad("per_layer is not a mapping")
    for name, r in per_layer.items():
        ok = (
            isinstance(r, dict)
            and isinstance(r.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in r["shape"])
            and isinstance(r.get("num_pruned"), int)
            and 0 <= r["num_pruned"] <= math.prod(r["shape"])
        )
        if not ok:
            raise bad(
                f"per_layer[{name!r}] needs a shape (list of sizes) and 0 <= num_pruned <= its size"
            )
    return rec


def read_sparsity_metadata(source) -> dict | None:
    """The ``hf_mfac_sparsity`` record from a model, a config, a folder or a ``config.json`` path
    (None if absent). A file that is not valid JSON, or a malformed record, raises ``ValueError``
    naming the file."""
    if isinstance(source, nn.Module):
        source = getattr(source, "config", None)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else os.fspath(source)
        if not os.path.isfile(path):
            return None
        config = read_json(path)
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        rec = config.get(SPARSITY_KEY)
        return None if rec is None else _check_record(rec, path)
    rec = getattr(source, SPARSITY_KEY, None)
    return None if rec is None else _check_record(rec, f"{type(source).__name__}.{SPARSITY_KEY}")
