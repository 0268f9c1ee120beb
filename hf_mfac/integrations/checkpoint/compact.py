"""hf_mfac's compact checkpoint: for each masked tensor its kept values and a packed bitmask (1 bit
per weight), every other tensor dense, all in ``hf_mfac_compact.safetensors`` beside
``config.json``.

Owns :func:`save_compact_pretrained` (tied tensors stored once, the layout recorded in the file's
header, the size report) and :func:`load_compact_pretrained`, which checks every length, count,
shape and dtype against the header and the sparsity record before building the model, and builds
only a ``transformers`` model class that the config names (:func:`_model_class`). At sparsity s a
float32 tensor takes ``(1 - s) + 1/32`` of its dense size. Stock ``from_pretrained`` refuses such a
folder (it has no ``model.safetensors``) instead of loading random weights.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .files import (
    COMPACT_WEIGHTS_NAME,
    FORMAT_VERSION,
    SPARSITY_KEY,
    is_checkpoint_file,
    open_safetensors,
    hf_mfac_version,
    checksum_metadata,
    verify_checksums,
)
from .record import save_config_with, read_sparsity_metadata, resolve_masks, sparsity_metadata
from .staging import staged_save

__all__ = ["save_compact_pretrained", "load_compact_pretrained"]

logger = logging.getLogger("hf_mfac")


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` without tensors that share storage (tied weights): (tensors, {alias:
    source})."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pack(tensors: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]):
    """(the compact file's tensors, {masked name: shape}): ``name:values`` and ``name:bitmask`` for
    each tensor with a mask, every other tensor as it is."""
    out, shapes = {}, {}
    for name, t in tensors.items():
        mask = masks.get(name)
        if mask is None:
            out[name] = t
            continue
        out[f"{name}:values"] = t.reshape(-1)[mask.reshape(-1)].clone()
        out[f"{name}:bitmask"] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy(),
                                                              bitorder="little"))
        shapes[name] = list(t.shape)
    return out, shapes


def save_compact_pretrained(model: nn.Module, save_directory: str | os.PathLike,
                            masks: Mapping[str, Any] | None = None,
                            *, method: str | None = None, targets: Iterable[str] | None = None,
                            pattern: str | None = None, recipe=None,
                            extra_metadata: Mapping[str, Any] | None = None) -> dict:
    """Save ``model`` in hf_mfac's compact form: kept values + a packed bitmask per masked tensor.

    Writes ``config.json`` (``model.config.save_pretrained``, with :func:`sparsity_metadata`,
    ``format: "compact"``) and ``hf_mfac_compact.safetensors`` holding, for each masked tensor
    ``name``, ``"name:values"`` (the kept entries, in row-major order, original dtype) and
    ``"name:bitmask"`` (``numpy.packbits(mask, bitorder="little")``, uint8); every other state-dict
    tensor is stored dense under its name, and tied tensors once. Its header records the shapes, the
    dtypes and the aliases. Load with :func:`load_compact_pretrained`. Masks and arguments are
    checked as in :func:`save_sparse_pretrained`, before anything is written, and the files are
    moved into place the same way (:func:`staged_save`): a failure leaves the folder as it was, and
    a success removes the weights and masks of an earlier dense save, so stock ``from_pretrained``
    refuses the folder instead of loading them.

    Returns the size report ``{"dense_bytes", "compact_bytes", "ratio", "saving"}``: ``dense_bytes``
    is the tensor payload of the dense checkpoint (what ``model.safetensors`` holds, header aside),
    ``compact_bytes`` the size of the compact file, ``ratio = compact / dense``, ``saving = 1 -
    ratio``.
    """
    masks = resolve_masks(model, masks, targets)
    meta = sparsity_metadata(model, masks, method=method, targets=targets, pattern=pattern,
                             recipe=recipe,
                             extra=extra_metadata, form="compact")
    tensors, aliases = _unique_state(model)
    masked = {n: n if n in tensors else aliases.get(n) for n in masks}
    if None in masked.values():
        missing = [n for n, src in masked.items() if src is None]
        raise ValueError(f"masked parameters missing from the state dict: {missing}")
    out, shapes = _pack(tensors, {src: masks[n] for n, src in masked.items()})
    layout = {"format_version": FORMAT_VERSION, "shapes": shapes, "aliases": aliases,
              "dtypes": {n: _dtype_name(t.dtype) for n, t in tensors.items()}}
    dense = sum(_nbytes(t) for t in tensors.values())
    with staged_save(save_directory, stale=is_checkpoint_file) as stage:
        weights = os.path.join(stage, COMPACT_WEIGHTS_NAME)
        header = {"format": "pt", "library": "hf_mfac", "library_version": hf_mfac_version(),
                  "hf_mfac_compact": json.dumps(layout), **checksum_metadata(out)}
        save_file(out, weights, metadata=header)
        compact = os.path.getsize(weights)
        report = {"dense_bytes": dense, "compact_bytes": compact, "ratio": compact / dense,
                  "saving": 1 - compact / dense}
        meta["compact"] = report
        # model.save_pretrained would record the class; config.save_pretrained alone does not
        save_config_with(model, {SPARSITY_KEY: meta, "architectures": [type(model).__name__]},
                          lambda: model.config.save_pretrained(stage))
    logger.info("saved compact %s: %.1f MB instead of %.1f MB dense (%.1f%% smaller)",
                save_directory,
                compact / 1e6, dense / 1e6, 100 * report["saving"])
    return report


_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")


def _model_class(archs, config, path: str):
    """The ``transformers`` model class ``config.architectures[0]`` names: an exported name of
    ``transformers`` (nothing is imported from elsewhere, no other attribute is looked up) that is a
    ``PreTrainedModel`` subclass defined in ``transformers.models`` and takes this config class."""
    import transformers

    name = archs[0] if isinstance(archs, (list, tuple)) and archs else None
    cls = None
    exported = set(getattr(transformers, "__all__", ()))
    if isinstance(name, str) and _CLASS_NAME.fullmatch(name) and name in exported:
        cls = getattr(transformers, name, None)
    if not (
        isinstance(cls, type)
        and issubclass(cls, transformers.PreTrainedModel)
        and cls.__module__.startswith("transformers.models.")
    ):
        raise ValueError(
            f"{path}: architectures={archs!r} names no transformers model class; pass model_cls="
        )
    expected = getattr(cls, "config_class", None)
    if isinstance(expected, type) and not isinstance(config, expected):
        raise ValueError(
            f"{path}: architectures names {name}, which takes a {expected.__name__}, "
            "but the config is a "
            f"{type(config).__name__}; pass model_cls="
        )
    return cls


def _check_layout(layout, path: str) -> None:
    """The 'hf_mfac_compact' header must hold ``shapes`` and ``aliases`` mappings and a format
    version this reads."""
    if (
        not isinstance(layout, dict)
        or not isinstance(layout.get("shapes"), dict)
        or not isinstance(layout.get("aliases", {}), dict)
    ):
        raise ValueError(
            f"{path}: the 'hf_mfac_compact' header needs 'shapes' and 'aliases' mappings"
        )
    if layout.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise ValueError(
            f"{path}: compact format_version {layout.get('format_version')!r} is not "
            "one this hf_mfac "
            f"reads (1..{FORMAT_VERSION}); upgrade hf_mfac"
        )


def _unpack(
    name: str, shape, raw: dict[str, torch.Tensor], path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense tensor, bool mask) of the masked tensor ``name`` from its ``:values`` and ``:bitmask``
    tensors, checking the header's shape, the bitmask's dtype, length and padding bits, and the
    number of values."""
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{path}: header shape of {name!r} is {shape!r}, not a list of sizes")
    for part in ("values", "bitmask"):
        if f"{name}:{part}" not in raw:
            raise ValueError(f"{path}: tensor {name + ':' + part!r} is missing")
    values, packed = raw[f"{name}:values"], raw[f"{name}:bitmask"]
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{path}: tensor {name + ':bitmask'!r} is {packed.dtype} of shape "
            f"{tuple(packed.shape)}; "
            f"a {shape} tensor needs uint8 of shape ({(numel + 7) // 8},)"
        )
    bits = np.unpackbits(packed.numpy(), bitorder="little")
    if bits[numel:].any():
        raise ValueError(
            f"{path}: tensor {name + ':bitmask'!r} has bits set past the {numel} "
            f"weights of {name!r}"
        )
    mask = torch.from_numpy(bits[:numel].astype(bool))
    kept = int(mask.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise ValueError(
            f"{path}: tensor {name + ':values'!r} has shape {tuple(values.shape)}; "
            "its bitmask keeps "
            f"{kept} weights, so it needs shape ({kept},)"
        )
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape), mask.reshape(shape)


def _check_dtypes(state: dict[str, torch.Tensor], dtypes, shapes, path: str) -> None:
    """Every rebuilt tensor has the dtype the header records for it (when the header records
    dtypes)."""
    if dtypes is None:
        return
    if not isinstance(dtypes, dict) or set(dtypes) != set(state):
        raise ValueError(f"{path}: the header's dtypes do not list exactly the tensors of the file")
    for name, t in state.items():
        if _dtype_name(t.dtype) != dtypes[name]:
            what = f"{name}:values" if name in shapes else name
            raise ValueError(
                f"{path}: tensor {what!r} has dtype {_dtype_name(t.dtype)}, the "
                "header says "
                f"{dtypes[name]}"
            )


def _check_against_record(
    masks: dict[str, torch.Tensor], aliases, rec: dict, path: str, config_path: str
) -> None:
    """The bitmasks are those ``config.json``'s sparsity record lists: the same tensors (through
    aliases), the same shapes and pruned counts."""
    per_layer = rec.get("per_layer", {})
    for name, r in per_layer.items():
        src = name if name in masks else aliases.get(name)
        if src not in masks:
            raise ValueError(
                f"{path} has no bitmask for {name!r}, which {config_path} records as masked"
            )
        m = masks[src]
        if list(m.shape) != r["shape"] or int((~m).sum()) != r["num_pruned"]:
            raise ValueError(
                f"{path}: tensor {src + ':bitmask'!r} (shape {list(m.shape)}, "
                f"{int((~m).sum())} pruned) "
                f"disagrees with {config_path} (shape {r['shape']}, {r['num_pruned']} "
                "pruned)"
            )
    recorded = {name if name in masks else aliases.get(name) for name in per_layer}
    if per_layer and set(masks) - recorded:
        raise ValueError(
            f"{path} holds bitmasks for {sorted(set(masks) - recorded)[:5]} that "
            f"{config_path} does not "
            "record: the files come from different saves"
        )


def _compact_state(raw: dict[str, torch.Tensor], layout, rec: dict, path: str, config_path: str):
    """Rebuild the dense state dict and the masks from the compact file's tensors, checking every
    length, count, shape and dtype against its header and against the sparsity record of
    ``config.json``."""
    _check_layout(layout, path)
    shapes, aliases, dtypes = layout["shapes"], layout.get("aliases", {}), layout.get("dtypes")
    state, masks = {}, {}
    for name, t in raw.items():
        base, _, part = name.rpartition(":")
        if part in ("values", "bitmask") and base:
            if base not in shapes:
                raise ValueError(
                    f"{path}: tensor {name!r} belongs to no masked tensor of the header"
                )
            continue
        state[name] = t
    for name, shape in shapes.items():
        state[name], masks[name] = _unpack(name, shape, raw, path)
    _check_dtypes(state, dtypes, shapes, path)
    for alias, source in aliases.items():
        if not isinstance(source, str) or source not in state or alias in state:
            raise ValueError(
                f"{path}: alias {alias!r} -> {source!r} names no stored tensor (or shadows one)"
            )
        state[alias] = state[source]
    _check_against_record(masks, aliases, rec, path, config_path)
    return state, masks


def _read_compact_config(save_directory: str):
    """(config.json path, its compact sparsity record, the ``transformers`` config) of a compact
    folder."""
    import transformers

    if not os.path.isdir(save_directory):
        raise FileNotFoundError(
            f"{save_directory} is not a folder (load_compact_pretrained reads local folders only)"
        )
    config_path = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    rec = read_sparsity_metadata(config_path)
    if rec is None or rec.get("format") != "compact":
        raise ValueError(
            f"{config_path} holds no compact {SPARSITY_KEY!r} record (format "
            f"{(rec or {}).get('format')!r}): not a save_compact_pretrained folder"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(save_directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: transformers cannot build a config from it: {e}") from e
    return config_path, rec, config


def _read_compact_file(path: str) -> tuple[dict[str, torch.Tensor], Any, dict]:
    """(tensors, parsed 'hf_mfac_compact' header, the whole header) of the compact weights file."""
    raw, header = open_safetensors(path, "compact weights file")
    if header.get("hf_mfac_compact") is None:
        raise ValueError(
            f"{path} is not an hf_mfac compact checkpoint (no 'hf_mfac_compact' metadata)"
        )
    try:
        return raw, json.loads(header["hf_mfac_compact"]), header
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the 'hf_mfac_compact' header is not valid JSON: {e}") from None


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``state`` holds exactly the tensors of ``model.state_dict()``, each of its shape."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match {type(model).__name__}: missing tensors "
            f"{missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"{type(model).__name__} needs "
                f"{tuple(expected[name].shape)}"
            )


def load_compact_pretrained(
    save_directory: str | os.PathLike,
    model_cls=None,
    *,
    return_masks: bool = False,
    device: str | torch.device | None = None,
):
    """Load a folder written by :func:`save_compact_pretrained`.

    Builds ``model_cls(config)`` — by default the ``transformers`` model class named in
    ``config.architectures[0]`` (only a ``PreTrainedModel`` subclass exported by ``transformers``
    that takes this config class; nothing else is looked up or imported) — casts it to the dtype the
    floating tensors were saved in (when they share one), and loads the rebuilt dense state dict
    with ``strict=True``; values and zeros are bit-exact. Returns the model in eval mode (and
    ``{name: bool mask}`` with ``return_masks``). Costs one random initialisation of the model.
    Reads local files only.

    Everything is checked before the model is built: ``config.json`` must hold a ``"compact"``
    sparsity record; each bitmask must be uint8 of exactly ``ceil(numel / 8)`` bytes with no bit set
    past the weights; each values tensor must hold exactly as many entries as its bitmask keeps;
    shapes and dtypes must match the file's header, the pruned counts the record, and the shapes the
    model; and every tensor's bytes must match the checksum the header records for it, so a change
    that keeps every count (two differing bits of a bitmask swapped) is refused too. Files written
    before hf_mfac recorded checksums carry none and still load, with every other check. A missing
    folder or file raises ``FileNotFoundError``, anything truncated, corrupted or inconsistent
    ``ValueError``, naming the file and the tensor."""
    save_directory = os.fspath(save_directory)
    config_path, rec, config = _read_compact_config(save_directory)
    if model_cls is None:
        model_cls = _model_class(getattr(config, "architectures", None), config, config_path)
    path = os.path.join(save_directory, COMPACT_WEIGHTS_NAME)
    raw, layout, header = _read_compact_file(path)
    state, masks = _compact_state(raw, layout, rec, path, config_path)
    model = model_cls(config)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    _check_fits(model, state, path)
    verify_checksums(raw, header, path)  # after the checks that name what is wrong more precisely
    model.load_state_dict(state, strict=True)
    if device is not None:
        model = model.to(device)
    model.eval()
    return (model, masks) if return_masks else model
