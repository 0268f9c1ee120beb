"""The portable sparse checkpoint: dense safetensors with exact zeros plus hf_mfac's metadata.

:func:`save_sparse_pretrained` writes ``model.save_pretrained`` output (pruned weights exactly 0),
the sparsity record under ``config.json["hf_mfac_sparsity"]`` and the masks in
``sparsity_masks.safetensors``; :func:`load_sparse_masks` reads the masks back. Stock
``AutoModel*.from_pretrained`` loads the folder with no extra code. The other forms and the shared
file handling live beside this module in :mod:`hf_mfac.integrations.checkpoint`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .files import (
    MASKS_NAME,
    SPARSITY_KEY,
    WEIGHT_CHECKSUMS_KEY,
    is_checkpoint_file,
    open_safetensors,
    hf_mfac_version,
    checksum_metadata,
    read_dense_weights,
    verify_checksums,
)
from .record import (
    save_config_with,
    read_sparsity_metadata,
    resolve_masks,
    sparsity_metadata,
)
from .staging import staged_save

logger = logging.getLogger("hf_mfac")

__all__ = ["save_sparse_pretrained", "load_sparse_masks", "log_saved"]


# -- dense with exact zeros
# ----------------------------------------------------------------------------

def save_sparse_pretrained(model: nn.Module, save_directory: str | os.PathLike,
                           masks: Mapping[str, Any] | None = None,
                           *, method: str | None = None, targets: Iterable[str] | None = None,
                           pattern: str | None = None, recipe=None, save_masks: bool = True,
                           extra_metadata: Mapping[str, Any] | None = None, _log: bool = True,
                           **save_kwargs) -> dict:
    """Save a pruned ``transformers`` model so that stock ``AutoModel*.from_pretrained`` loads it.

    Writes ``model.save_pretrained(save_directory, **save_kwargs)`` (dense safetensors; pruned
    weights are exactly 0), with :func:`sparsity_metadata` under
    ``config.json["hf_mfac_sparsity"]``, and, with ``save_masks``, ``sparsity_masks.safetensors``
    (bool masks keyed by parameter name; read them back with :func:`load_sparse_masks`).
    ``model.config`` is left as it was.

    The files are written into a staging folder and moved into place (:func:`staged_save`): an
    exception, ``KeyboardInterrupt`` included, leaves ``save_directory`` as it was. A save replaces
    a previous one completely: weights of any earlier save (another shard count,
    ``pytorch_model.bin``, the compact file) and, with ``save_masks=False``, an earlier masks file
    are removed; other files (a README, a tokenizer) are kept. ``save_kwargs`` with
    ``is_main_process=False`` writes nothing hf_mfac-specific (only what ``save_pretrained`` itself
    writes on such a process).

    Args:
        masks: ``{parameter name: bool tensor}``, True = kept; None derives them from exact zeros
    (see
            :func:`resolve_masks`, which also says how ``targets`` selects parameters then).
        method, pattern, recipe, targets, extra_metadata: recorded in the metadata (``recipe`` and
            ``extra_metadata`` must be JSON-serialisable, and their secret-looking values are
            redacted, see :func:`redact`); an ``"N:M"`` pattern is checked against the masks.

    Raises, before writing anything: ``ValueError`` when nothing is pruned, when a mask disagrees
    with its weight (nonzero where pruned) or with ``pattern``; ``KeyError`` for a mask of an
    unknown parameter; ``TypeError`` for ``push_to_hub`` (use
    :func:`~hf_mfac.integrations.push_sparse_to_hub`). Returns the metadata written.
    """
    if save_kwargs.get("push_to_hub"):
        raise TypeError("save_sparse_pretrained(push_to_hub=True) is not supported: the folder is "
                        "written through a "
                        "staging folder; use hf_mfac.integrations.push_sparse_to_hub")
    masks = resolve_masks(model, masks, targets)
    meta = sparsity_metadata(model, masks, method=method, targets=targets, pattern=pattern,
                             recipe=recipe,
                             extra=extra_metadata, form="dense")
    meta["masks_file"] = MASKS_NAME if save_masks else None
    if not save_kwargs.get("is_main_process", True):
        save_config_with(model, {SPARSITY_KEY: meta},
                         lambda: model.save_pretrained(save_directory, **save_kwargs))
        return meta
    with staged_save(save_directory, stale=is_checkpoint_file) as stage:
        save_config_with(model, {SPARSITY_KEY: meta},
                         lambda: model.save_pretrained(stage, **save_kwargs))
        if save_masks:
            _save_masks(masks, stage)
    if _log:  # callers that save into a staging or temporary folder log the final folder themselves
        log_saved(save_directory, meta)
    return meta


def _save_masks(masks: Mapping[str, torch.Tensor], stage: str) -> None:
    """``sparsity_masks.safetensors`` in ``stage``, its header holding the checksum of each mask and
    of each masked weight as written beside it (read back from the weights file, so it is what a
    loader will read)."""
    masks = {k: v.contiguous() for k, v in masks.items()}
    weights = {n: t for n, (t, _) in read_dense_weights(stage, masks).items()}
    save_file(masks, os.path.join(stage, MASKS_NAME),
              metadata={"format": "pt", "library": "hf_mfac", "library_version": hf_mfac_version(),
                        "convention": "True = kept", **checksum_metadata(masks),
                        **checksum_metadata(weights, WEIGHT_CHECKSUMS_KEY)})


def log_saved(save_directory, meta: Mapping[str, Any]) -> None:
    """The ``saved <folder>: <sparsity> over <n> tensors (<pattern>)`` line at INFO, for the
    metadata ``meta`` that :func:`save_sparse_pretrained` wrote there."""
    logger.info("saved %s: %.2f%% sparsity over %d tensors (%s)", save_directory,
                100 * meta["sparsity"],
                len(meta["per_layer"]), meta["pattern"])


def load_sparse_masks(save_directory: str | os.PathLike,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The masks written by :func:`save_sparse_pretrained` (``{name: bool tensor}``, True = kept).

    Checked against the folder's sparsity record when ``config.json`` holds one (the same names,
    shapes and pruned counts: a masks file left from another save fails), against the checksum of
    each mask's bytes that the file's header records (a flipped or swapped byte fails), and against
    the dense weights beside it (``model.safetensors`` or its shards): a pruned position must hold
    an exact zero (a kept one may be zero too), and each masked weight must match the checksum
    recorded when it was saved. Files written before hf_mfac recorded checksums carry none and still
    load (the record and the zeros are still checked); weights that are not safetensors are not
    read. ``FileNotFoundError`` for a missing file, ``ValueError`` naming the file and tensor for a
    truncated, corrupted or inconsistent one. Cost: one read of the masked weights."""
    save_directory = os.fspath(save_directory)
    path = os.path.join(save_directory, MASKS_NAME)
    masks, header = open_safetensors(path, "masks file")
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise ValueError(f"{path}: mask {name!r} has dtype {m.dtype}, expected torch.bool")
    _check_masks_record(masks, save_directory, path)
    verify_checksums(masks, header, path, what="mask")
    _check_masks_weights(masks, header, save_directory, path)
    return {k: v.to(device) for k, v in masks.items()}


def _check_masks_record(masks: dict[str, torch.Tensor], save_directory: str, path: str) -> None:
    """The masks are those ``config.json``'s sparsity record lists (when it holds one): names,
    shapes, counts."""
    rec = read_sparsity_metadata(save_directory)
    if rec is None:
        return
    config = os.path.join(save_directory, "config.json")
    if rec.get("masks_file") != MASKS_NAME:
        raise ValueError(f"{path} does not belong to the save in {config} (its record has "
                         f"masks_file={rec.get('masks_file')!r}); it is left from another save")
    per_layer = rec.get("per_layer", {})
    if set(masks) != set(per_layer):
        odd = sorted(set(masks) ^ set(per_layer))[:5]
        raise ValueError(f"{path} holds masks for {odd} that {config} does not record, or lacks "
                         "some it does: the files come from different saves")
    for name, m in masks.items():
        r = per_layer[name]
        if list(m.shape) != r["shape"] or int((~m).sum()) != r["num_pruned"]:
            raise ValueError(f"{path}: mask {name!r} (shape {list(m.shape)}, {int((~m).sum())} "
                             f"pruned) disagrees with {config} (shape {r['shape']}, "
                             f"{r['num_pruned']} pruned)")


def _check_masks_weights(masks: dict[str, torch.Tensor], header: dict, save_directory: str,
                         path: str) -> None:
    """Each masked weight stored beside the masks is exactly zero where its mask prunes, and matches
    the checksum the masks file recorded for it (when it recorded one)."""
    weights = read_dense_weights(save_directory, masks)
    for name, (w, file) in weights.items():
        if w.shape != masks[name].shape:
            raise ValueError(f"{path}: mask {name!r} has shape {tuple(masks[name].shape)}, the "
                             f"weight in {file} {tuple(w.shape)}: the files come from different "
                             "saves")
        wrong = int(((w != 0) & ~masks[name]).sum())
        if wrong:
            raise ValueError(f"{path}: mask {name!r} prunes {wrong} weights that are nonzero in "
                             f"{file}: the masks and the weights disagree (a corrupted file, or "
                             "files from different saves)")
    for file in sorted({f for _, f in weights.values()}):
        verify_checksums({n: w for n, (w, f) in weights.items() if f == file}, header, file,
                         key=WEIGHT_CHECKSUMS_KEY, what="weight", header_path=path,
                         why="the weights changed after the masks were saved (saved again "
                             "without them, or corrupted); save both with save_sparse_pretrained")
