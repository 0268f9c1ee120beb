"""Sparse checkpoints: portable dense-with-zeros, a compact values+bitmask form, and 2:4 GPU export.

This module owns the portable dense form (:func:`save_sparse_pretrained`, :func:`load_sparse_masks`) and is the
one place to import every sparse-checkpoint name from; the other parts live beside it and are re-exported here:
masks and the sparsity record in :mod:`.sparsity_record`, the compact form in :mod:`.compact`, the 2:4 export in
:mod:`.semi_structured`, staged saves in :mod:`.staged_save`, file names and readers in :mod:`.checkpoint_files`,
and redaction in :mod:`.redaction`.

Three forms, for three uses (compressed-tensors' sparse-bitmask format is gone, so the
portable form is dense safetensors with exact zeros plus our metadata):

* :func:`save_sparse_pretrained` — ``model.save_pretrained`` (dense safetensors, pruned weights exactly 0)
  plus the sparsity metadata under ``config.json["hf_mfac_sparsity"]`` and the masks in
  ``sparsity_masks.safetensors``. Any ``AutoModel*.from_pretrained`` loads it with no extra code; the
  extra config key is kept as a plain attribute of the loaded config.
* :func:`save_compact_pretrained` / :func:`load_compact_pretrained` — hf_mfac's own form: for each masked
  tensor the kept values and a packed bitmask (1 bit per weight), everything else dense, in
  ``hf_mfac_compact.safetensors``. Exact round trip; at sparsity s a float32 tensor takes
  ``(1 - s) + 1/32`` of its dense size. Stock ``from_pretrained`` refuses the folder (no
  ``model.safetensors``) instead of loading random weights.
* :func:`export_semi_structured` — swaps 2:4-sparse ``nn.Linear`` weights for
  ``torch.sparse.to_sparse_semi_structured`` tensors (cuSPARSELt / CUTLASS kernels, CUDA only) and leaves
  every other layer dense, saying why.

Masks follow :mod:`hf_mfac.core.masks`: ``{parameter name as in model.named_parameters(): bool tensor}``,
``True`` = kept. Every function checks its inputs before writing anything, and the savers write into a
staging folder on the same filesystem and move the files into place (:func:`staged_save`): an exception
leaves the folder as it was; a successful save removes the weights of the other form (and of a sharded or
older save) and stale masks, and keeps every other file. The loaders check every length, count, shape and
dtype against the metadata and name the file and the tensor. Secret-looking values in the recorded
``recipe`` / ``extra_metadata`` are redacted (:func:`redact`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_files import (
    COMPACT_WEIGHTS_NAME,
    FORMAT_VERSION,  # noqa: F401 (importable from here, as before the split)
    MASKS_NAME,
    SPARSITY_KEY,
    _is_checkpoint_file,
    _open_safetensors,
    _version,
)
from .compact import load_compact_pretrained, save_compact_pretrained
from .redaction import REDACTED, redact, redact_text, secret_name  # noqa: F401 (REDACTED, secret_name: as before)
from .semi_structured import export_semi_structured
from .sparsity_record import (
    _save_config_with,
    is_nm_sparse,
    read_sparsity_metadata,
    resolve_masks,
    sparsity_metadata,
)
from .staged_save import staged_save

logger = logging.getLogger("hf_mfac")

__all__ = [
    "SPARSITY_KEY",
    "MASKS_NAME",
    "COMPACT_WEIGHTS_NAME",
    "resolve_masks",
    "sparsity_metadata",
    "save_sparse_pretrained",
    "load_sparse_masks",
    "read_sparsity_metadata",
    "save_compact_pretrained",
    "load_compact_pretrained",
    "is_nm_sparse",
    "export_semi_structured",
    "staged_save",
    "redact",
    "redact_text",
]


# -- dense with exact zeros ----------------------------------------------------------------------------

def save_sparse_pretrained(model: nn.Module, save_directory: str | os.PathLike, masks: Mapping[str, Any] | None = None,
                           *, method: str | None = None, targets: Iterable[str] | None = None,
                           pattern: str | None = None, recipe=None, save_masks: bool = True,
                           extra_metadata: Mapping[str, Any] | None = None, _log: bool = True,
                           **save_kwargs) -> dict:
    """Save a pruned ``transformers`` model so that stock ``AutoModel*.from_pretrained`` loads it.

    Writes ``model.save_pretrained(save_directory, **save_kwargs)`` (dense safetensors; pruned weights are
    exactly 0), with :func:`sparsity_metadata` under ``config.json["hf_mfac_sparsity"]``, and, with
    ``save_masks``, ``sparsity_masks.safetensors`` (bool masks keyed by parameter name; read them back with
    :func:`load_sparse_masks`). ``model.config`` is left as it was.

    The files are written into a staging folder and moved into place (:func:`staged_save`): an exception,
    ``KeyboardInterrupt`` included, leaves ``save_directory`` as it was. A save replaces a previous one
    completely: weights of any earlier save (another shard count, ``pytorch_model.bin``, the compact file)
    and, with ``save_masks=False``, an earlier masks file are removed; other files (a README, a tokenizer)
    are kept. ``save_kwargs`` with ``is_main_process=False`` writes nothing hf_mfac-specific (only what
    ``save_pretrained`` itself writes on such a process).

    Args:
        masks: ``{parameter name: bool tensor}``, True = kept; None derives them from exact zeros (see
            :func:`resolve_masks`, which also says how ``targets`` selects parameters then).
        method, pattern, recipe, targets, extra_metadata: recorded in the metadata (``recipe`` and
            ``extra_metadata`` must be JSON-serialisable, and their secret-looking values are redacted, see
            :func:`redact`); an ``"N:M"`` pattern is checked against the masks.

    Raises, before writing anything: ``ValueError`` when nothing is pruned, when a mask disagrees with its
    weight (nonzero where pruned) or with ``pattern``; ``KeyError`` for a mask of an unknown parameter;
    ``TypeError`` for ``push_to_hub`` (use :func:`~hf_mfac.integrations.push_sparse_to_hub`).
    Returns the metadata written.
    """
    if save_kwargs.get("push_to_hub"):
        raise TypeError("save_sparse_pretrained(push_to_hub=True) is not supported: the folder is written through a "
                        "staging folder; use hf_mfac.integrations.push_sparse_to_hub")
    masks = resolve_masks(model, masks, targets)
    meta = sparsity_metadata(model, masks, method=method, targets=targets, pattern=pattern, recipe=recipe,
                             extra=extra_metadata, form="dense")
    meta["masks_file"] = MASKS_NAME if save_masks else None
    if not save_kwargs.get("is_main_process", True):
        _save_config_with(model, {SPARSITY_KEY: meta}, lambda: model.save_pretrained(save_directory, **save_kwargs))
        return meta
    with staged_save(save_directory, stale=_is_checkpoint_file) as stage:
        _save_config_with(model, {SPARSITY_KEY: meta}, lambda: model.save_pretrained(stage, **save_kwargs))
        if save_masks:
            save_file({k: v.contiguous() for k, v in masks.items()}, os.path.join(stage, MASKS_NAME),
                      metadata={"format": "pt", "library": "hf_mfac", "library_version": _version(),
                                "convention": "True = kept"})
    if _log:  # callers that save into a staging or temporary folder log the final folder themselves
        log_saved(save_directory, meta)
    return meta


def log_saved(save_directory, meta: Mapping[str, Any]) -> None:
    """The ``saved <folder>: <sparsity> over <n> tensors (<pattern>)`` line at INFO, for the metadata ``meta``
    that :func:`save_sparse_pretrained` wrote there."""
    logger.info("saved %s: %.2f%% sparsity over %d tensors (%s)", save_directory, 100 * meta["sparsity"],
                len(meta["per_layer"]), meta["pattern"])


def load_sparse_masks(save_directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The masks written by :func:`save_sparse_pretrained` (``{name: bool tensor}``, True = kept).

    Checked against the folder's sparsity record when ``config.json`` holds one: the same names, shapes and
    pruned counts (a masks file left from another save fails). ``FileNotFoundError`` for a missing file,
    ``ValueError`` naming the file and tensor for a truncated, corrupted or inconsistent one."""
    path = os.path.join(save_directory, MASKS_NAME)
    masks, _ = _open_safetensors(path, "masks file")
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise ValueError(f"{path}: mask {name!r} has dtype {m.dtype}, expected torch.bool")
    rec = read_sparsity_metadata(save_directory)
    if rec is not None:
        config = os.path.join(save_directory, "config.json")
        if rec.get("masks_file") != MASKS_NAME:
            raise ValueError(f"{path} does not belong to the save in {config} (its record has masks_file="
                             f"{rec.get('masks_file')!r}); it is left from another save")
        per_layer = rec.get("per_layer", {})
        if set(masks) != set(per_layer):
            raise ValueError(f"{path} holds masks for {sorted(set(masks) ^ set(per_layer))[:5]} that {config} does "
                             "not record, or lacks some it does: the files come from different saves")
        for name, m in masks.items():
            r = per_layer[name]
            if list(m.shape) != r["shape"] or int((~m).sum()) != r["num_pruned"]:
                raise ValueError(f"{path}: mask {name!r} (shape {list(m.shape)}, {int((~m).sum())} pruned) disagrees "
                                 f"with {config} (shape {r['shape']}, {r['num_pruned']} pruned)")
    return {k: v.to(device) for k, v in masks.items()}
