"""Sparse checkpoints: portable dense-with-zeros, a compact values+bitmask form, and 2:4 GPU export.

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

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

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

SPARSITY_KEY = "hf_mfac_sparsity"  # key in config.json
MASKS_NAME = "sparsity_masks.safetensors"
COMPACT_WEIGHTS_NAME = "hf_mfac_compact.safetensors"
FORMAT_VERSION = 1
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _version() -> str:
    """hf_mfac's version, also when ``hf_mfac`` itself resolved as a namespace package (a folder named
    ``hf_mfac`` in the working directory shadowing the real one) and its ``__init__`` never ran."""
    try:
        from .. import __version__

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


# -- secrets -------------------------------------------------------------------------------------------------

REDACTED = "***"
# A name is secret when it contains one of these words, in any case, ignoring "-" and "_".
_SECRET_WORDS = re.compile(r"token|secret|key|pass|auth|credential", re.I)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
_KV = re.compile(r"(?P<k>[A-Za-z_][\w.-]*)(?P<sep>\s*=\s*)(?P<v>[^\s,;&]*)")
_QUOTED_KV = re.compile(  # "name": "value" / 'name': value, as in JSON or a Python dict literal
    r"""(?P<q>["'])(?P<k>[^"'\n]*)(?P=q)(?P<sep>\s*:\s*)"""
    r"""(?:(?P<vq>["'])(?P<v>(?:\\.|(?!(?P=vq)).)*)(?P=vq)|(?P<bare>[^\s,}\]]+))""")


def secret_name(name: str) -> bool:
    """True when ``name`` (a flag, a key, an environment variable) says it holds a secret: it contains token,
    secret, key, pass, auth or credential, in any case, once ``-`` and ``_`` are removed."""
    return bool(_SECRET_WORDS.search(re.sub(r"[-_]", "", str(name))))


def redact_text(text: str) -> str:
    """``text`` with secrets replaced by ``***``: the userinfo of every URL (``https://user:pass@host`` ->
    ``https://***@host``), every Hugging Face token (``hf_`` and 30 or more letters and digits) wherever it
    stands, and the value of every ``NAME=VALUE`` pair and quoted ``"NAME": VALUE`` pair whose ``NAME`` is
    secret (:func:`secret_name`), e.g. inside ``k=v,k=v`` lists, query strings and JSON."""
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _HF_TOKEN.sub(REDACTED, text)
    text = _KV.sub(lambda m: m.group("k") + m.group("sep") + REDACTED if secret_name(m.group("k")) and m.group("v")
                   else m.group(0), text)

    def quoted(m):
        if not secret_name(m.group("k")):
            return m.group(0)
        value = f"{m.group('vq')}{REDACTED}{m.group('vq')}" if m.group("vq") else f'"{REDACTED}"'
        return f"{m.group('q')}{m.group('k')}{m.group('q')}{m.group('sep')}{value}"

    return _QUOTED_KV.sub(quoted, text)


def redact(value):
    """A copy of ``value`` (JSON-like: mappings, lists, strings, numbers) with secrets replaced by ``***``: the
    value of every key that :func:`secret_name` flags (unless None or a bool), and inside every string what
    :func:`redact_text` hides. A string that parses as a JSON object or list is redacted as such."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if secret_name(k) and value[k] is not None and not isinstance(value[k], bool)
                    else redact(value[k])) for k in value}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            try:
                parsed = json.loads(stripped)
            except ValueError:
                pass
            else:
                cleaned = redact(parsed)
                return value if cleaned == parsed else json.dumps(cleaned)
        return redact_text(value)
    return value


# -- masks ---------------------------------------------------------------------------------------------

def _linear_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _matching_names(names: Iterable[str], targets: Iterable[str]) -> list[str]:
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
        raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"mask for {name!r} must be bool or 0/1 values (True/1 = kept)")
        mask = mask != 0
    return mask


def resolve_masks(model: nn.Module, masks: Mapping[str, Any] | None = None,
                  targets: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Validated masks ``{name: bool CPU tensor}`` (True = kept) for ``model``.

    With ``masks``: each name must be a parameter of ``model``, each mask its shape, and no weight may be
    nonzero where its mask says pruned (``ValueError`` listing the offenders). Without: masks are derived
    from exact zeros (``weight != 0``) of the weight matrices (parameters with 2 or more dimensions; biases
    and norms, often initialised to 0, never count) whose names match ``targets`` (names or regular
    expressions), or, when ``targets`` is None, of every ``nn.Linear`` weight holding at least one zero.
    """
    params = dict(model.named_parameters())
    if masks is None:
        if targets is None:
            names = [n for n in _linear_weight_names(model) if n in params and bool((params[n] == 0).any())]
        else:
            matrices = [n for n, p in params.items() if p.dim() >= 2]
            names = _matching_names(matrices, [targets] if isinstance(targets, str) else targets)
        return {n: (params[n].detach() != 0).cpu() for n in names}
    out, bad = {}, []
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask given for {name!r}, which is not a parameter of the model "
                           "(masks are keyed by model.named_parameters() names)")
        out[name] = mask = _as_bool_mask(name, mask, params[name])
        wrong = int(((params[name].detach().cpu() != 0) & ~mask).sum())
        if wrong:
            bad.append(f"{name}: {wrong} nonzero weights where the mask says pruned")
    if bad:
        raise ValueError("masks disagree with the weights (apply the masks first, e.g. weight.mul_(mask)):\n  "
                         + "\n  ".join(bad))
    return out


def is_nm_sparse(mask_or_weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the last dimension has at most ``n``
    nonzeros (for a bool mask: at most ``n`` kept). False when the last dimension does not divide by ``m``."""
    t = mask_or_weight
    if t.dim() == 0 or t.shape[-1] % m:
        return False
    return bool(((t != 0).reshape(-1, m).sum(1) <= n).all())


def _exactly_2_4(mask: torch.Tensor) -> bool:
    return mask.dim() > 0 and mask.shape[-1] % 4 == 0 and bool((mask.reshape(-1, 4).sum(1) == 2).all())


def _check_pattern(pattern: str | None, masks: Mapping[str, torch.Tensor]) -> str:
    if pattern is None:
        return "2:4" if all(_exactly_2_4(k) for k in masks.values()) else "unstructured"
    nm = _NM.match(pattern)
    if nm:
        n, m = map(int, nm.groups())
        off = [k for k, v in masks.items() if not is_nm_sparse(v, n, m)]
        if off:
            raise ValueError(f"pattern {pattern!r} does not hold for {off[:5]}{' ...' if len(off) > 5 else ''}: "
                             f"some group of {m} along the last dimension keeps more than {n}")
        return f"{n}:{m}"
    return pattern


def _jsonable(name: str, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable to go into config.json: {e}") from None
    return value


def sparsity_metadata(model: nn.Module, masks: Mapping[str, torch.Tensor], *, method: str | None = None,
                      targets: Iterable[str] | None = None, pattern: str | None = None, recipe=None,
                      extra: Mapping[str, Any] | None = None, form: str = "dense") -> dict:
    """The ``config.json["hf_mfac_sparsity"]`` record for validated ``masks`` (see :func:`resolve_masks`).

    Fields: ``format`` (``"dense"`` or ``"compact"``), ``format_version``, ``library``, ``library_version``,
    ``method``, ``pattern`` (``"N:M"``, checked against the masks; when None, ``"2:4"`` if every mask keeps
    exactly 2 of each 4 along its last dimension, else ``"unstructured"``), ``targets`` (as given, else the
    masked names), ``recipe`` (secret-looking values redacted, :func:`redact`), ``sparsity`` (pruned / masked
    weights), ``num_masked``, ``num_pruned``,
    ``model_sparsity`` (pruned / all parameters), ``per_layer`` (``{name: {shape, num_pruned, sparsity}}``),
    plus the ``extra`` keys (redacted the same way). :func:`save_sparse_pretrained` adds ``masks_file``,
    :func:`save_compact_pretrained`
    the size report under ``compact``.
    Raises ``ValueError`` when nothing is pruned.
    """
    per_layer, pruned, masked = {}, 0, 0
    for name, mask in masks.items():
        k = int((~mask).sum())
        per_layer[name] = {"shape": list(mask.shape), "num_pruned": k, "sparsity": k / max(mask.numel(), 1)}
        pruned, masked = pruned + k, masked + mask.numel()
    if pruned == 0:
        raise ValueError("the model has no sparsity to save: no mask prunes anything and no targeted weight is "
                         "exactly zero. Prune first (hf_mfac.pruning) or pass masks=... / targets=...; "
                         "use model.save_pretrained for a dense model")
    total = sum(p.numel() for p in model.parameters())
    targets = [targets] if isinstance(targets, str) else targets
    return {
        "format": form,
        "format_version": FORMAT_VERSION,
        "library": "hf_mfac",
        "library_version": _version(),
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


def _save_config_with(model: nn.Module, attrs: Mapping[str, Any], save) -> None:
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


# -- staged saves: write beside, then move into place ------------------------------------------------------

# Weight files transformers writes or reads (any variant, sharded or not, with their index), and ours.
_STEM, _EXT = r"(?:model|pytorch_model|tf_model|flax_model)", r"(?:safetensors|bin|h5|msgpack)"
_SINGLE_WEIGHTS = re.compile(rf"^{_STEM}(?:\.[^.]+)?\.{_EXT}$")  # model.safetensors, model.fp16.safetensors
_SHARD = re.compile(rf"^{_STEM}(?:\.[^.]+)?-\d{{5}}-of-\d{{5}}\.{_EXT}$")  # model-00001-of-00002.safetensors
_INDEX = re.compile(rf"^{_STEM}\.{_EXT}\.index(?:\.[^.]+)?\.json$")  # model.safetensors.index(.fp16).json
_STAGE_PREFIX = ".hf_mfac-staging-"
_PREVIOUS = ".hf_mfac-previous"


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


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            _fsync(os.path.join(d, n))
        _fsync(d, directory=True)


class _RollbackFailed(RuntimeError):
    """Moving the previous files back failed too; they are kept in the staging folder named in the message."""


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(text)


@contextlib.contextmanager
def staged_save(save_directory: str | os.PathLike, stale=None):
    """Context manager yielding an empty staging folder; on a clean exit its files replace those of
    ``save_directory``, on an exception nothing in ``save_directory`` changes and the staging folder is removed.

    The staging folder is on the same filesystem: beside ``save_directory`` when that does not exist yet (then
    one ``rename`` makes the whole folder appear), else inside it (``.hf_mfac-staging-*``). Committing into an
    existing folder moves, with one ``os.replace`` per entry: first out (into the staging folder, weights
    first) every entry that a new file replaces and every existing entry for which ``stale(name)`` is true,
    then in every new entry, the weights last (shards, then ``model.safetensors`` / the index /
    ``hf_mfac_compact.safetensors``). So at every instant the folder holds the old save, the new save, or a
    save without weights that every loader refuses; never new weights with old metadata or masks. (POSIX has
    no atomic rename of several files: a reader that opens ``config.json`` before the move and the weights
    after it can still pair them.) Entries that neither the new save writes nor ``stale`` names are never
    touched. Any exception during the moves, ``KeyboardInterrupt`` included, moves everything back; a
    process killed while moving leaves the old files in ``.hf_mfac-staging-*/.hf_mfac-previous``.
    """
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a folder")
    fresh = not os.path.isdir(target)
    made, stage, keep_stage = [], None, False  # made: parent folders this call creates, removed on failure
    try:
        if fresh:
            parent = os.path.dirname(target)
            missing = parent
            while missing and not os.path.isdir(missing):
                made.append(missing)
                missing = os.path.dirname(missing)
            os.makedirs(parent, exist_ok=True)
            stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_STAGE_PREFIX}", dir=parent)
        else:
            stage = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=target)
        yield stage
        _fsync_tree(stage)
        if fresh:
            os.rename(stage, target)
            stage = None
            _fsync(os.path.dirname(target), directory=True)
        else:
            _commit(stage, target, stale)
    except _RollbackFailed:
        keep_stage = True
        raise
    except BaseException as e:
        _note(e, f"hf_mfac: nothing was changed in {target}")
        raise
    finally:
        if stage is not None and not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
        if fresh and not os.path.isdir(target):
            for d in made:
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def _commit(stage: str, target: str, stale) -> None:
    """Move the entries of ``stage`` into ``target`` (see :func:`staged_save`); on failure move them back."""
    new = sorted(os.listdir(stage), key=lambda n: (_rank(n), n))
    backup = os.path.join(stage, _PREVIOUS)
    os.mkdir(backup)
    own = os.path.basename(stage)
    old = [n for n in os.listdir(target) if n != own and not n.startswith(_STAGE_PREFIX)
           and (n in new or (stale is not None and stale(n)))]
    old.sort(key=lambda n: (-_rank(n), n))
    try:
        for n in old:
            os.replace(os.path.join(target, n), os.path.join(backup, n))
        for n in new:
            os.replace(os.path.join(stage, n), os.path.join(target, n))
    except BaseException as e:
        # Decide from the filesystem, not from counters: an interrupt may land after a rename returned.
        try:
            for n in reversed(new):
                if not os.path.lexists(os.path.join(stage, n)) and os.path.lexists(os.path.join(target, n)):
                    os.replace(os.path.join(target, n), os.path.join(stage, n))
            for n in reversed(old):
                if os.path.lexists(os.path.join(backup, n)):
                    os.replace(os.path.join(backup, n), os.path.join(target, n))
        except BaseException as undo:
            raise _RollbackFailed(f"saving into {target} failed ({e!r}) and so did restoring the previous files "
                               f"({undo!r}); they are in {backup}") from e
        raise
    _fsync(target, directory=True)


# -- dense with exact zeros ----------------------------------------------------------------------------

def save_sparse_pretrained(model: nn.Module, save_directory: str | os.PathLike, masks: Mapping[str, Any] | None = None,
                           *, method: str | None = None, targets: Iterable[str] | None = None,
                           pattern: str | None = None, recipe=None, save_masks: bool = True,
                           extra_metadata: Mapping[str, Any] | None = None, **save_kwargs) -> dict:
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
    logger.info("saved %s: %.2f%% sparsity over %d tensors (%s)", save_directory, 100 * meta["sparsity"],
                len(masks), meta["pattern"])
    return meta


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


def _check_record(rec, where: str) -> dict:
    """The ``hf_mfac_sparsity`` record, checked enough for the readers (a dict whose ``per_layer`` maps names
    to a shape and a pruned count); ``ValueError`` naming ``where`` otherwise."""
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
        ok = isinstance(r, dict) and isinstance(r.get("shape"), list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in r["shape"]) and isinstance(
            r.get("num_pruned"), int) and 0 <= r["num_pruned"] <= math.prod(r["shape"])
        if not ok:
            raise bad(f"per_layer[{name!r}] needs a shape (list of sizes) and 0 <= num_pruned <= its size")
    return rec


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


def read_sparsity_metadata(source) -> dict | None:
    """The ``hf_mfac_sparsity`` record from a model, a config, a folder or a ``config.json`` path (None if absent).
    A file that is not valid JSON, or a malformed record, raises ``ValueError`` naming the file."""
    if isinstance(source, nn.Module):
        source = getattr(source, "config", None)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else os.fspath(source)
        if not os.path.isfile(path):
            return None
        config = _read_json(path)
        if not isinstance(config, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        rec = config.get(SPARSITY_KEY)
        return None if rec is None else _check_record(rec, path)
    rec = getattr(source, SPARSITY_KEY, None)
    return None if rec is None else _check_record(rec, f"{type(source).__name__}.{SPARSITY_KEY}")


# -- compact: kept values + packed bitmask ----------------------------------------------------------------

def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` without tensors that share storage (tied weights): (tensors, {alias: source})."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
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


def save_compact_pretrained(model: nn.Module, save_directory: str | os.PathLike, masks: Mapping[str, Any] | None = None,
                            *, method: str | None = None, targets: Iterable[str] | None = None,
                            pattern: str | None = None, recipe=None,
                            extra_metadata: Mapping[str, Any] | None = None) -> dict:
    """Save ``model`` in hf_mfac's compact form: kept values + a packed bitmask per masked tensor.

    Writes ``config.json`` (``model.config.save_pretrained``, with :func:`sparsity_metadata`, ``format:
    "compact"``) and ``hf_mfac_compact.safetensors`` holding, for each masked tensor ``name``,
    ``"name:values"`` (the kept entries, in row-major order, original dtype) and ``"name:bitmask"``
    (``numpy.packbits(mask, bitorder="little")``, uint8); every other state-dict tensor is stored dense
    under its name, and tied tensors once. Its header records the shapes, the dtypes and the aliases. Load
    with :func:`load_compact_pretrained`. Masks and arguments are checked as in
    :func:`save_sparse_pretrained`, before anything is written, and the files are moved into place the same
    way (:func:`staged_save`): a failure leaves the folder as it was, and a success removes the weights and
    masks of an earlier dense save, so stock ``from_pretrained`` refuses the folder instead of loading them.

    Returns the size report ``{"dense_bytes", "compact_bytes", "ratio", "saving"}``: ``dense_bytes`` is the
    tensor payload of the dense checkpoint (what ``model.safetensors`` holds, header aside),
    ``compact_bytes`` the size of the compact file, ``ratio = compact / dense``, ``saving = 1 - ratio``.
    """
    masks = resolve_masks(model, masks, targets)
    meta = sparsity_metadata(model, masks, method=method, targets=targets, pattern=pattern, recipe=recipe,
                             extra=extra_metadata, form="compact")
    tensors, aliases = _unique_state(model)
    masked = {n: n if n in tensors else aliases.get(n) for n in masks}
    if None in masked.values():
        missing = [n for n, src in masked.items() if src is None]
        raise ValueError(f"masked parameters missing from the state dict: {missing}")
    by_source = {src: masks[n] for n, src in masked.items()}
    out, shapes = {}, {}
    for name, t in tensors.items():
        mask = by_source.get(name)
        if mask is None:
            out[name] = t
            continue
        out[f"{name}:values"] = t.reshape(-1)[mask.reshape(-1)].clone()
        out[f"{name}:bitmask"] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
        shapes[name] = list(t.shape)
    layout = {"format_version": FORMAT_VERSION, "shapes": shapes, "aliases": aliases,
              "dtypes": {n: _dtype_name(t.dtype) for n, t in tensors.items()}}
    dense = sum(_nbytes(t) for t in tensors.values())
    with staged_save(save_directory, stale=_is_checkpoint_file) as stage:
        weights = os.path.join(stage, COMPACT_WEIGHTS_NAME)
        save_file(out, weights, metadata={"format": "pt", "library": "hf_mfac", "library_version": _version(),
                                          "hf_mfac_compact": json.dumps(layout)})
        compact = os.path.getsize(weights)
        report = {"dense_bytes": dense, "compact_bytes": compact, "ratio": compact / dense,
                  "saving": 1 - compact / dense}
        meta["compact"] = report
        # model.save_pretrained would record the class; config.save_pretrained alone does not
        _save_config_with(model, {SPARSITY_KEY: meta, "architectures": [type(model).__name__]},
                          lambda: model.config.save_pretrained(stage))
    logger.info("saved compact %s: %.1f MB instead of %.1f MB dense (%.1f%% smaller)", save_directory,
                compact / 1e6, dense / 1e6, 100 * report["saving"])
    return report


_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")


def _model_class(archs, config, path: str):
    """The ``transformers`` model class ``config.architectures[0]`` names: an exported name of ``transformers``
    (nothing is imported from elsewhere, no other attribute is looked up) that is a ``PreTrainedModel``
    subclass defined in ``transformers.models`` and takes this config class."""
    import transformers

    name = archs[0] if isinstance(archs, (list, tuple)) and archs else None
    cls = None
    if isinstance(name, str) and _CLASS_NAME.fullmatch(name) and name in set(getattr(transformers, "__all__", ())):
        cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.models.")):
        raise ValueError(f"{path}: architectures={archs!r} names no transformers model class; pass model_cls=")
    expected = getattr(cls, "config_class", None)
    if isinstance(expected, type) and not isinstance(config, expected):
        raise ValueError(f"{path}: architectures names {name}, which takes a {expected.__name__}, but the config is a "
                         f"{type(config).__name__}; pass model_cls=")
    return cls


def _compact_state(raw: dict[str, torch.Tensor], layout, rec: dict, path: str, config_path: str):
    """Rebuild the dense state dict and the masks from the compact file's tensors, checking every length, count,
    shape and dtype against its header and against the sparsity record of ``config.json``."""
    if not isinstance(layout, dict) or not isinstance(layout.get("shapes"), dict) or not isinstance(
            layout.get("aliases", {}), dict):
        raise ValueError(f"{path}: the 'hf_mfac_compact' header needs 'shapes' and 'aliases' mappings")
    if layout.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise ValueError(f"{path}: compact format_version {layout.get('format_version')!r} is not one this hf_mfac "
                         f"reads (1..{FORMAT_VERSION}); upgrade hf_mfac")
    shapes, aliases, dtypes = layout["shapes"], layout.get("aliases", {}), layout.get("dtypes")
    state, masks = {}, {}
    for name, t in raw.items():
        base, _, part = name.rpartition(":")
        if part in ("values", "bitmask") and base:
            if base not in shapes:
                raise ValueError(f"{path}: tensor {name!r} belongs to no masked tensor of the header")
            continue
        state[name] = t
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: header shape of {name!r} is {shape!r}, not a list of sizes")
        for part in ("values", "bitmask"):
            if f"{name}:{part}" not in raw:
                raise ValueError(f"{path}: tensor {name + ':' + part!r} is missing")
        values, packed = raw[f"{name}:values"], raw[f"{name}:bitmask"]
        numel = math.prod(shape)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
            raise ValueError(f"{path}: tensor {name + ':bitmask'!r} is {packed.dtype} of shape {tuple(packed.shape)}; "
                             f"a {shape} tensor needs uint8 of shape ({(numel + 7) // 8},)")
        bits = np.unpackbits(packed.numpy(), bitorder="little")
        if bits[numel:].any():
            raise ValueError(f"{path}: tensor {name + ':bitmask'!r} has bits set past the {numel} weights of {name!r}")
        mask = torch.from_numpy(bits[:numel].astype(bool))
        kept = int(mask.sum())
        if values.dim() != 1 or values.numel() != kept:
            raise ValueError(f"{path}: tensor {name + ':values'!r} has shape {tuple(values.shape)}; its bitmask keeps "
                             f"{kept} weights, so it needs shape ({kept},)")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        state[name], masks[name] = dense.reshape(shape), mask.reshape(shape)
    if dtypes is not None:
        if not isinstance(dtypes, dict) or set(dtypes) != set(state):
            raise ValueError(f"{path}: the header's dtypes do not list exactly the tensors of the file")
        for name, t in state.items():
            if _dtype_name(t.dtype) != dtypes[name]:
                what = f"{name}:values" if name in shapes else name
                raise ValueError(f"{path}: tensor {what!r} has dtype {_dtype_name(t.dtype)}, the header says "
                                 f"{dtypes[name]}")
    for alias, source in aliases.items():
        if not isinstance(source, str) or source not in state or alias in state:
            raise ValueError(f"{path}: alias {alias!r} -> {source!r} names no stored tensor (or shadows one)")
        state[alias] = state[source]
    per_layer = rec.get("per_layer", {})
    for name, r in per_layer.items():
        src = name if name in masks else aliases.get(name)
        if src not in masks:
            raise ValueError(f"{path} has no bitmask for {name!r}, which {config_path} records as masked")
        m = masks[src]
        if list(m.shape) != r["shape"] or int((~m).sum()) != r["num_pruned"]:
            raise ValueError(f"{path}: tensor {src + ':bitmask'!r} (shape {list(m.shape)}, {int((~m).sum())} pruned) "
                             f"disagrees with {config_path} (shape {r['shape']}, {r['num_pruned']} pruned)")
    recorded = {name if name in masks else aliases.get(name) for name in per_layer}
    if per_layer and set(masks) - recorded:
        raise ValueError(f"{path} holds bitmasks for {sorted(set(masks) - recorded)[:5]} that {config_path} does not "
                         "record: the files come from different saves")
    return state, masks


def load_compact_pretrained(save_directory: str | os.PathLike, model_cls=None, *, return_masks: bool = False,
                            device: str | torch.device | None = None):
    """Load a folder written by :func:`save_compact_pretrained`.

    Builds ``model_cls(config)`` — by default the ``transformers`` model class named in
    ``config.architectures[0]`` (only a ``PreTrainedModel`` subclass exported by ``transformers`` that takes
    this config class; nothing else is looked up or imported) — casts it to the dtype the floating tensors
    were saved in (when they share one), and loads the rebuilt dense state dict with ``strict=True``; values
    and zeros are bit-exact. Returns the model in eval mode (and ``{name: bool mask}`` with
    ``return_masks``). Costs one random initialisation of the model. Reads local files only.

    Everything is checked before the model is built: ``config.json`` must hold a ``"compact"`` sparsity
    record; each bitmask must be uint8 of exactly ``ceil(numel / 8)`` bytes with no bit set past the weights;
    each values tensor must hold exactly as many entries as its bitmask keeps; shapes and dtypes must match
    the file's header, the pruned counts the record, and the shapes the model. A missing folder or file raises
    ``FileNotFoundError``, anything truncated, corrupted or inconsistent ``ValueError``, naming the file and
    the tensor.
    """
    import transformers

    save_directory = os.fspath(save_directory)
    if not os.path.isdir(save_directory):
        raise FileNotFoundError(f"{save_directory} is not a folder (load_compact_pretrained reads local folders only)")
    config_path = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    rec = read_sparsity_metadata(config_path)
    if rec is None or rec.get("format") != "compact":
        raise ValueError(f"{config_path} holds no compact {SPARSITY_KEY!r} record (format "
                         f"{(rec or {}).get('format')!r}): not a save_compact_pretrained folder")
    try:
        config = transformers.AutoConfig.from_pretrained(save_directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: transformers cannot build a config from it: {e}") from e
    if model_cls is None:
        model_cls = _model_class(getattr(config, "architectures", None), config, config_path)
    path = os.path.join(save_directory, COMPACT_WEIGHTS_NAME)
    raw, header = _open_safetensors(path, "compact weights file")
    if header.get("hf_mfac_compact") is None:
        raise ValueError(f"{path} is not an hf_mfac compact checkpoint (no 'hf_mfac_compact' metadata)")
    try:
        layout = json.loads(header["hf_mfac_compact"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the 'hf_mfac_compact' header is not valid JSON: {e}") from None
    state, masks = _compact_state(raw, layout, rec, path, config_path)
    model = model_cls(config)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing tensors {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, {type(model).__name__} needs "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    if device is not None:
        model = model.to(device)
    model.eval()
    return (model, masks) if return_masks else model


# -- 2:4 semi-structured export for GPU inference ----------------------------------------------------------

def _semi_structured(weight: torch.Tensor):
    """``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt), or the CUTLASS backend where cuSPARSELt is
    missing. Torch checks dtype, shape and contiguity and raises ``RuntimeError`` otherwise."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    if torch.backends.cusparselt.is_available():
        return to_sparse_semi_structured(weight)
    return SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def _semi_structured_blocker(weight: torch.Tensor) -> str | None:
    if not is_nm_sparse(weight, 2, 4):
        return "not 2:4 sparse (some group of 4 input weights has more than 2 nonzeros)"
    if not weight.is_cuda:
        return f"2:4 sparse kernels need a CUDA GPU; the weight is on {weight.device}"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 sparse kernels need compute capability >= 8.0 (Ampere or newer)"
    return None


def export_semi_structured(model: nn.Module, targets: Iterable[str] | None = None, *,
                           strict: bool = False) -> dict[str, str]:
    """Replace 2:4-sparse ``nn.Linear`` weights by semi-structured sparse tensors for GPU inference, in place.

    Each ``nn.Linear`` (those whose name matches ``targets``, names or regular expressions, when given)
    whose weight is 2:4 sparse along the input dimension gets ``nn.Parameter(to_sparse_semi_structured(W),
    requires_grad=False)``; ``F.linear`` then runs on the sparse tensor cores (cuSPARSELt, or CUTLASS where
    cuSPARSELt is missing). Needs CUDA, compute capability >= 8.0, and the dtypes and shapes torch's
    kernels accept (fp16/bf16/int8, and fp32 on CUTLASS; both dimensions multiples of 16-64). Cast the
    model to the dtype you will run in first. The model is for inference only afterwards.

    Layers that cannot be converted stay dense. Returns ``{module name: "semi-structured 2:4" or "dense:
    <reason>"}``; a ``UserWarning`` names the layers that are 2:4 sparse but could not be converted (CPU,
    dtype, shape), or says that nothing was. With ``strict=True`` any such layer raises ``RuntimeError``
    instead and the model is left untouched.
    """
    linears = (n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    wanted = [targets] if isinstance(targets, str) else targets
    names = None if targets is None else set(_matching_names(linears, wanted))
    report, converted, missed = {}, {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (names is not None and name not in names):
            continue
        w = mod.weight.detach()
        reason = _semi_structured_blocker(w)
        if reason is None:
            try:
                converted[name] = _semi_structured(w.contiguous())
            except (RuntimeError, ValueError, NotImplementedError) as e:
                reason = str(e).strip().splitlines()[0]
        if reason is not None:
            report[name] = f"dense: {reason}"
            if is_nm_sparse(w, 2, 4):
                missed[name] = reason
    if missed and strict:
        raise RuntimeError("export_semi_structured(strict=True): 2:4 sparse layers that cannot be converted:\n  "
                           + "\n  ".join(f"{n}: {r}" for n, r in missed.items()))
    modules = dict(model.named_modules())
    for name, sparse in converted.items():
        modules[name].weight = nn.Parameter(sparse, requires_grad=False)
        report[name] = "semi-structured 2:4"
    if missed:
        first = next(iter(missed.values()))
        warnings.warn(f"export_semi_structured: {len(missed)} 2:4-sparse Linear layer(s) kept dense "
                      f"(e.g. {next(iter(missed))}: {first}); see the returned report", stacklevel=2)
    elif not converted:
        warnings.warn("export_semi_structured: no Linear layer is 2:4 sparse; the model is unchanged "
                      "(prune with pattern '2:4' first)", stacklevel=2)
    return dict(sorted(report.items()))
