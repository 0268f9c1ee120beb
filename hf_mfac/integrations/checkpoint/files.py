"""The files a sparse checkpoint is made of, and reading them back with errors that name the file.

Holds the names every form shares (:data:`SPARSITY_KEY` in ``config.json``, :data:`MASKS_NAME`,
:data:`COMPACT_WEIGHTS_NAME`, :data:`FORMAT_VERSION`); the patterns of the weights files
``transformers`` writes (single, sharded, index), which a save owns and replaces
(:func:`is_checkpoint_file`) and the order a staged save moves them in (:func:`process_rank`);
hf_mfac's version as recorded in the files (:func:`hf_mfac_version`); and the JSON and safetensors
readers (:func:`read_json`, :func:`open_safetensors`) that turn a truncated or corrupted file into a
``ValueError`` naming it; the checksums of tensor bytes written into our safetensors headers and
their check (:func:`checksum_metadata`, :func:`verify_checksums`); and the dense weights' tensors
read by name (:func:`read_dense_weights`)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["SPARSITY_KEY", "MASKS_NAME", "COMPACT_WEIGHTS_NAME", "FORMAT_VERSION", "CHECKSUMS_KEY",
           "WEIGHT_CHECKSUMS_KEY", "tensor_checksum", "checksum_metadata", "verify_checksums",
           "read_dense_weights"]


SPARSITY_KEY = "hf_mfac_sparsity"  # key in config.json
MASKS_NAME = "sparsity_masks.safetensors"
COMPACT_WEIGHTS_NAME = "hf_mfac_compact.safetensors"
FORMAT_VERSION = 1
CHECKSUMS_KEY = "hf_mfac_sha256"  # safetensors header: {tensor name: sha256 of its bytes}, as JSON
# masks file header: the same for the masked dense weights
WEIGHT_CHECKSUMS_KEY = "hf_mfac_weights_sha256"


def hf_mfac_version() -> str:
    """hf_mfac's version, also when ``hf_mfac`` itself resolved as a namespace package (a folder
    named ``hf_mfac`` in the working directory shadowing the real one) and its ``__init__`` never
    ran."""
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


# Weight files transformers writes or reads (any variant, sharded or not, with their index), and
# ours.
_STEM, _EXT = r"(?:model|pytorch_model|tf_model|flax_model)", r"(?:safetensors|bin|h5|msgpack)"
# model.safetensors, model.fp16.safetensors
_SINGLE_WEIGHTS = re.compile(rf"^{_STEM}(?:\.[^.]+)?\.{_EXT}$")
# model-00001-of-00002.safetensors
_SHARD = re.compile(rf"^{_STEM}(?:\.[^.]+)?-\d{{5}}-of-\d{{5}}\.{_EXT}$")
# model.safetensors.index(.fp16).json
_INDEX = re.compile(rf"^{_STEM}\.{_EXT}\.index(?:\.[^.]+)?\.json$")


def is_checkpoint_file(name: str) -> bool:
    """Files a save of either form owns: every weights file (dense, sharded, index, compact) and the
    masks. A save removes those it did not write itself; anything else in the folder is left
    alone."""
    return bool(
        name in (COMPACT_WEIGHTS_NAME, MASKS_NAME)
        or _SINGLE_WEIGHTS.match(name)
        or _SHARD.match(name)
        or _INDEX.match(name)
    )


def process_rank(name: str) -> int:
    """Commit order (ascending on install, descending on withdrawal): the files a loader opens to
    find the weights (``model.safetensors``, an index, ``hf_mfac_compact.safetensors``) come last in
    and go first out; shards just before them; README.md after everything else it may describe."""
    if _SHARD.match(name):
        return 2
    if name == COMPACT_WEIGHTS_NAME or _SINGLE_WEIGHTS.match(name) or _INDEX.match(name):
        return 3
    return 1 if name == "README.md" else 0


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None


def open_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header metadata) of a safetensors file; a missing file raises ``FileNotFoundError``
    and a truncated or garbage one ``ValueError``, both naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
        return load_file(path), header
    except SafetensorError as e:
        raise ValueError(
            f"{what} {path} is not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None


# -- checksums -------------------------------------------------------------------------------


def tensor_checksum(t: torch.Tensor) -> str:
    """``sha256:<hex>`` of the tensor's bytes in row-major order (its dtype's in-memory layout);
    O(numel)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return "sha256:" + hashlib.sha256(memoryview(raw)).hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor], key: str = CHECKSUMS_KEY) -> dict[str, str]:
    """The safetensors header entry ``{key: JSON {name: checksum}}`` for ``tensors``
    (:func:`tensor_checksum`)."""
    return {key: json.dumps({n: tensor_checksum(t) for n, t in sorted(tensors.items())})}


def _recorded(header: dict, path: str, key: str) -> dict | None:
    if header.get(key) is None:
        return None
    try:
        sums = json.loads(header[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {key!r} header is not valid JSON: {e}") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ValueError(f"{path}: the {key!r} header must map tensor names to checksums")
    return sums


def verify_checksums(
    tensors: dict[str, torch.Tensor],
    header: dict,
    path: str,
    key: str = CHECKSUMS_KEY,
    what: str = "tensor",
    header_path: str | None = None,
    why: str | None = None,
) -> None:
    """Check each tensor of the file ``path`` against the checksum that ``header[key]`` (the header
    of ``header_path``, by default ``path`` itself) records for it; ``ValueError`` naming the tensor
    and the file on a mismatch (a flipped or swapped bit, a changed value), and, when the header is
    the file's own, when the header and the file list different tensors. A header without ``key``
    (a file written before hf_mfac recorded checksums) passes unchecked. ``why`` replaces the
    message's likely causes."""
    exact = header_path is None
    header_path = header_path or path
    sums = _recorded(header, header_path, key)
    if sums is None:
        return
    if exact and set(sums) != set(tensors):
        odd = sorted(set(sums) ^ set(tensors))[:5]
        raise ValueError(
            f"{path}: the tensors {odd} are in the file or in its checksums, not "
            "both: the file was changed after it was written"
        )
    for name, t in tensors.items():
        if name in sums and tensor_checksum(t) != sums[name]:
            where = "" if header_path == path else f" recorded in {header_path}"
            why = why or "the file is corrupted or was edited after it was written"
            raise ValueError(f"{path}: {what} {name!r} does not match its checksum{where}: {why}")


def read_dense_weights(folder: str, names) -> dict[str, tuple[torch.Tensor, str]]:
    """``{name: (tensor, file)}`` for the ``names`` stored in the folder's safetensors weights
    (``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists); names the
    files do not hold are left out, and a folder whose weights are not safetensors gives ``{}``."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map", {})
        where = {n: os.path.join(folder, weight_map[n]) for n in names if n in weight_map}
    else:
        single = os.path.join(folder, "model.safetensors")
        where = {n: single for n in names} if os.path.isfile(single) else {}
    out = {}
    for path in sorted(set(where.values())):
        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                out.update(
                    {
                        n: (f.get_tensor(n), path)
                        for n, p in where.items()
                        if p == path and n in keys
                    }
                )
        except SafetensorError as e:
            why = f"weights file {path} is not a readable safetensors file: {e}"
            raise ValueError(why) from None
    return out
