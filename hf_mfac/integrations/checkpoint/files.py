"""The files a sparse checkpoint is made of, and reading them back with errors that name the file.

Holds the names every form shares (:data:`SPARSITY_KEY` in ``config.json``, :data:`MASKS_NAME`,
:data:`COMPACT_WEIGHTS_NAME`, :data:`FORMAT_VERSION`); the patterns of the weights files ``transformers`` writes
(single, sharded, index), which a save owns and replaces (:func:`_is_checkpoint_file`) and the order a staged save
moves them in (:func:`_rank`); hf_mfac's version as recorded in the files (:func:`_version`); and the JSON and
safetensors readers (:func:`_read_json`, :func:`_open_safetensors`) that turn a truncated or corrupted file into a
``ValueError`` naming it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["SPARSITY_KEY", "MASKS_NAME", "COMPACT_WEIGHTS_NAME", "FORMAT_VERSION"]


SPARSITY_KEY = "hf_mfac_sparsity"  # key in config.json
MASKS_NAME = "sparsity_masks.safetensors"
COMPACT_WEIGHTS_NAME = "hf_mfac_compact.safetensors"
FORMAT_VERSION = 1


def _version() -> str:
    """hf_mfac's version, also when ``hf_mfac`` itself resolved as a namespace package (a folder named
    ``hf_mfac`` in the working directory shadowing the real one) and its ``__init__`` never ran."""
    try:
        from ... import __version__

        return __version__
    except ImportError:
        pass
    init = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__init__.py")
    with contextlib.suppress(OSError):
        with open(init, encoding="utf-8") as f:
            found = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
        if found:
            return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_mfac")
    except PackageNotFoundError:
        return "unknown"


# Weight files transformers writes or reads (any variant, sharded or not, with their index), and ours.
_STEM, _EXT = r"(?:model|pytorch_model|tf_model|flax_model)", r"(?:safetensors|bin|h5|msgpack)"
_SINGLE_WEIGHTS = re.compile(rf"^{_STEM}(?:\.[^.]+)?\.{_EXT}$")  # model.safetensors, model.fp16.safetensors
_SHARD = re.compile(rf"^{_STEM}(?:\.[^.]+)?-\d{{5}}-of-\d{{5}}\.{_EXT}$")  # model-00001-of-00002.safetensors
_INDEX = re.compile(rf"^{_STEM}\.{_EXT}\.index(?:\.[^.]+)?\.json$")  # model.safetensors.index(.fp16).json


def _is_checkpoint_file(name: str) -> bool:
    """Files a save of either form owns: every weights file (dense, sharded, index, compact) and the masks.
    A save removes those it did not write itself; anything else in the folder is left alone."""
    return bool(name in (COMPACT_WEIGHTS_NAME, MASKS_NAME) or _SINGLE_WEIGHTS.match(name) or _SHARD.match(name)
                or _INDEX.match(name))


def _rank(name: str) -> int:
    """Commit order (ascending on install, descending on withdrawal): the files a loader opens to find the
    weights (``model.safetensors``, an index, ``hf_mfac_compact.safetensors``) come last in and go first out;
    shards just before them; README.md after everything else it may describe."""
    if _SHARD.match(name):
        return 2
    if name == COMPACT_WEIGHTS_NAME or _SINGLE_WEIGHTS.match(name) or _INDEX.match(name):
        return 3
    return 1 if name == "README.md" else 0


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None


def _open_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header metadata) of a safetensors file; a missing file raises ``FileNotFoundError`` and a
    truncated or garbage one ``ValueError``, both naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
        return load_file(path), header
    except SafetensorError as e:
        raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
