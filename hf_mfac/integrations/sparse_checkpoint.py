"""Sparse checkpoints: portable dense-with-zeros, a compact values+bitmask form, and 2:4 GPU export.

Three forms, for three uses (DESIGN.md §5: compressed-tensors' sparse-bitmask format is gone, so the
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
``True`` = kept. Every function checks its inputs before writing anything.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from safetensors import safe_open
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
]

SPARSITY_KEY = "hf_mfac_sparsity"  # key in config.json
MASKS_NAME = "sparsity_masks.safetensors"
COMPACT_WEIGHTS_NAME = "hf_mfac_compact.safetensors"
FORMAT_VERSION = 1
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# -- masks ---------------------------------------------------------------------------------------------

def _linear_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" if name else "weight" for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _select(names: Iterable[str], targets: Iterable[str]) -> list[str]:
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
            names = _select(matrices, [targets] if isinstance(targets, str) else targets)
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
    masked names), ``recipe``, ``sparsity`` (pruned / masked weights), ``num_masked``, ``num_pruned``,
    ``model_sparsity`` (pruned / all parameters), ``per_layer`` (``{name: {shape, num_pruned, sparsity}}``),
    plus the ``extra`` keys. :func:`save_sparse_pretrained` adds ``masks_file``, :func:`save_compact_pretrained`
    the size report under ``compact``.
    Raises ``ValueError`` when nothing is pruned.
    """
    from .. import __version__

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
        "library_version": __version__,
        "method": method,
        "pattern": _check_pattern(pattern, masks),
        "targets": list(targets) if targets is not None else list(masks),
        "recipe": _jsonable("recipe", recipe),
        "sparsity": pruned / masked,
        "num_masked": masked,
        "num_pruned": pruned,
        "model_sparsity": pruned / total,
        "per_layer": per_layer,
        **_jsonable("extra", dict(extra or {})),
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

    Args:
        masks: ``{parameter name: bool tensor}``, True = kept; None derives them from exact zeros (see
            :func:`resolve_masks`, which also says how ``targets`` selects parameters then).
        method, pattern, recipe, targets, extra_metadata: recorded in the metadata (``recipe`` and
            ``extra_metadata`` must be JSON-serialisable); an ``"N:M"`` pattern is checked against the masks.

    Raises, before writing anything: ``ValueError`` when nothing is pruned, when a mask disagrees with its
    weight (nonzero where pruned) or with ``pattern``; ``KeyError`` for a mask of an unknown parameter.
    Returns the metadata written.
    """
    masks = resolve_masks(model, masks, targets)
    meta = sparsity_metadata(model, masks, method=method, targets=targets, pattern=pattern, recipe=recipe,
                             extra=extra_metadata, form="dense")
    meta["masks_file"] = MASKS_NAME if save_masks else None
    _save_config_with(model, {SPARSITY_KEY: meta}, lambda: model.save_pretrained(save_directory, **save_kwargs))
    if save_masks and save_kwargs.get("is_main_process", True):
        from .. import __version__
        save_file({k: v.contiguous() for k, v in masks.items()}, os.path.join(save_directory, MASKS_NAME),
                  metadata={"format": "pt", "library": "hf_mfac", "library_version": __version__,
                            "convention": "True = kept"})
    logger.info("saved %s: %.2f%% sparsity over %d tensors (%s)", save_directory, 100 * meta["sparsity"],
                len(masks), meta["pattern"])
    return meta


def load_sparse_masks(save_directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The masks written by :func:`save_sparse_pretrained` (``{name: bool tensor}``, True = kept)."""
    return load_file(os.path.join(save_directory, MASKS_NAME), device=str(device))


def read_sparsity_metadata(source) -> dict | None:
    """The ``hf_mfac_sparsity`` record from a model, a config, a folder or a ``config.json`` path (None if absent)."""
    if isinstance(source, nn.Module):
        source = getattr(source, "config", None)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else source
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f).get(SPARSITY_KEY)
    return getattr(source, SPARSITY_KEY, None)


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


def save_compact_pretrained(model: nn.Module, save_directory: str | os.PathLike, masks: Mapping[str, Any] | None = None,
                            *, method: str | None = None, targets: Iterable[str] | None = None,
                            pattern: str | None = None, recipe=None,
                            extra_metadata: Mapping[str, Any] | None = None) -> dict:
    """Save ``model`` in hf_mfac's compact form: kept values + a packed bitmask per masked tensor.

    Writes ``config.json`` (``model.config.save_pretrained``, with :func:`sparsity_metadata`, ``format:
    "compact"``) and ``hf_mfac_compact.safetensors`` holding, for each masked tensor ``name``,
    ``"name:values"`` (the kept entries, in row-major order, original dtype) and ``"name:bitmask"``
    (``numpy.packbits(mask, bitorder="little")``, uint8); every other state-dict tensor is stored dense
    under its name, and tied tensors once. Load with :func:`load_compact_pretrained`. Masks and arguments
    are checked as in :func:`save_sparse_pretrained`, before anything is written.

    Returns the size report ``{"dense_bytes", "compact_bytes", "ratio", "saving"}``: ``dense_bytes`` is the
    tensor payload of the dense checkpoint (what ``model.safetensors`` holds, header aside),
    ``compact_bytes`` the size of the compact file, ``ratio = compact / dense``, ``saving = 1 - ratio``.
    """
    from .. import __version__

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
    os.makedirs(save_directory, exist_ok=True)
    weights = os.path.join(save_directory, COMPACT_WEIGHTS_NAME)
    layout = {"format_version": FORMAT_VERSION, "shapes": shapes, "aliases": aliases}
    save_file(out, weights, metadata={"format": "pt", "library": "hf_mfac", "library_version": __version__,
                                      "hf_mfac_compact": json.dumps(layout)})
    dense = sum(_nbytes(t) for t in tensors.values())
    compact = os.path.getsize(weights)
    report = {"dense_bytes": dense, "compact_bytes": compact, "ratio": compact / dense, "saving": 1 - compact / dense}
    meta["compact"] = report
    # model.save_pretrained would record the class; config.save_pretrained alone does not
    _save_config_with(model, {SPARSITY_KEY: meta, "architectures": [type(model).__name__]},
                      lambda: model.config.save_pretrained(save_directory))
    logger.info("saved compact %s: %.1f MB instead of %.1f MB dense (%.1f%% smaller)", save_directory,
                compact / 1e6, dense / 1e6, 100 * report["saving"])
    return report


def load_compact_pretrained(save_directory: str | os.PathLike, model_cls=None, *, return_masks: bool = False,
                            device: str | torch.device | None = None):
    """Load a folder written by :func:`save_compact_pretrained`.

    Builds ``model_cls(config)`` — by default the ``transformers`` class named in ``config.architectures[0]``
    — casts it to the dtype the floating tensors were saved in (when they share one), and loads the
    rebuilt dense state dict with ``strict=True``; values and zeros are bit-exact. Returns the model in
    eval mode (and ``{name: bool mask}`` with ``return_masks``). Costs one random initialisation of the model.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(save_directory)
    if model_cls is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"config.architectures={archs!r} names no transformers class; pass model_cls=")
        model_cls = getattr(transformers, archs[0])
    path = os.path.join(save_directory, COMPACT_WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        header = (f.metadata() or {}).get("hf_mfac_compact")
    if header is None:
        raise ValueError(f"{path} is not an hf_mfac compact checkpoint (no 'hf_mfac_compact' metadata)")
    layout, raw = json.loads(header), load_file(path)
    state, masks = {}, {}
    for name, t in raw.items():
        if name.endswith((":values", ":bitmask")):
            continue
        state[name] = t
    for name, shape in layout["shapes"].items():
        numel = math.prod(shape)
        bits = np.unpackbits(raw[f"{name}:bitmask"].numpy(), count=numel, bitorder="little")
        mask = torch.from_numpy(bits.astype(bool)).reshape(shape)
        values = raw[f"{name}:values"]
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask.reshape(-1)] = values
        state[name], masks[name] = dense.reshape(shape), mask
    for alias, source in layout["aliases"].items():
        state[alias] = state[source]
    model = model_cls(config)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
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
    names = None if targets is None else set(_select((n for n, m in model.named_modules() if isinstance(m, nn.Linear)),
                                                     [targets] if isinstance(targets, str) else targets))
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
