"""Which weights to prune, and one flat, padded view of them.

:func:`find_prunable` picks the ``weight`` of every module of the given types whose name matches
``include`` and not ``exclude``. The default exclusion keeps embeddings, poolers and task heads
dense, as oBERT (encoder Linear weights only) and CAP (no first convolution, no classifier) do;
biases and norms are never targets because only ``weight`` tensors of Linear/Conv modules are.

:class:`Layout` concatenates the targets into one vector of dimension ``D``. Each target starts at a
multiple of ``pad`` (the Fisher block size for block methods), so Fisher blocks, N:M groups and
weight groups never straddle two layers; the padding coordinates carry no gradient and are never
pruned.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_TYPES", "find_prunable", "Layout", "module_modes",
           "keep_modes"]

DEFAULT_EXCLUDE = (
    r"(^|\.)(embeddings?|embedder|patch_embed\w*|pooler|classifier|qa_outputs|lm_head|heads?|score|cls)(\.|$)",
)
DEFAULT_TYPES = (nn.Linear, nn.Conv2d)


def _patterns(p) -> tuple[str, ...]:
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(p)


def find_prunable(
    model: nn.Module, include=None, exclude=DEFAULT_EXCLUDE, types: Sequence[type] = DEFAULT_TYPES
) -> dict[str, nn.Parameter]:
    """Target weights ``{"<module>.weight": parameter}`` in module order.

    ``include``/``exclude``: a regular expression or a list of them, searched (``re.search``) in the
    module's qualified name; ``include=None`` means every module of ``types``. Each ``include``
    pattern must match at least one module of ``types``, and something must remain, else
    ``ValueError`` (nothing is changed). The output embeddings (a tied LM head) are always left out.
    """
    inc, exc = _patterns(include), _patterns(exclude)
    for p in inc + exc:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid module-name pattern {p!r}: {e}") from None
    tied = None
    if hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        tied = getattr(out, "weight", None) if out is not None else None
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, tuple(types)) and isinstance(getattr(mod, "weight", None), torch.Tensor)
    ]
    for p in inc:
        if not any(re.search(p, name) for name, _ in candidates):
            sample = ", ".join(name for name, _ in candidates[:6])
            raise ValueError(
                f"include pattern {p!r} matches no "
                f"{'/'.join(t.__name__ for t in types)} module "
                f"(some names: {sample or 'none'})"
            )
    found, seen = {}, set()
    for name, mod in candidates:
        if inc and not any(re.search(p, name) for p in inc):
            continue
        if any(re.search(p, name) for p in exc):
            continue
        w = mod.weight
        # tied or shared weights are pruned once (or, if tied to embeddings, never)
        if w is tied or id(w) in seen:
            continue
        seen.add(id(w))
        found[f"{name}.weight" if name else "weight"] = w
    if not found:
        raise ValueError(
            "no prunable weights: every candidate module was excluded "
            f"(include={list(inc) or None}, exclude={list(exc)})"
        )
    return found


class Layout:
    """Flat padded view of the target weights.

    Target ``i`` occupies ``[offsets[i], offsets[i] + numels[i])`` of a vector of ``dim`` = D
    coordinates, ``offsets[i]`` a multiple of ``pad``. ``flatten`` gathers tensors into (D,),
    ``unflatten`` cuts a (D,) vector back into views shaped like the targets.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], pad: int = 1):
        if not params:
            raise ValueError("Layout needs at least one target tensor")
        self.pad = int(pad)
        self.names = list(params)
        self.params = dict(params)
        self.shapes = [tuple(t.shape) for t in params.values()]
        self.numels = [t.numel() for t in params.values()]
        self.offsets, off = [], 0
        for n in self.numels:
            self.offsets.append(off)
            off += -(-n // self.pad) * self.pad
        self.dim = off
        self.numel = sum(self.numels)

    def _segments(self):
        return zip(self.names, self.offsets, self.numels, self.shapes)

    def flatten(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
        *,
        dtype=None,
        device=None,
        fill=0,
    ) -> torch.Tensor:
        """(D,) vector holding ``tensors`` (a mapping by name or a sequence in target order);
        padding = ``fill``."""
        ts = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        dtype = dtype or ts[0].dtype
        device = device or ts[0].device
        out = torch.full((self.dim,), fill, dtype=dtype, device=device)
        for (name, off, n, _), t in zip(self._segments(), ts):
            out[off : off + n] = t.detach().reshape(-1).to(device=device, dtype=dtype)
        return out

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view of vec shaped like the target}`` (padding dropped)."""
        return {name: vec[off : off + n].view(shape) for name, off, n, shape in self._segments()}

    def valid(self, device=None) -> torch.Tensor:
        """(D,) bool, False on padding."""
        v = torch.zeros(self.dim, dtype=torch.bool, device=device)
        for _, off, n, _ in self._segments():
            v[off : off + n] = True
        return v

    def layer_index(self, device=None) -> torch.Tensor:
        """(D,) long: the target each coordinate belongs to (padding belongs to the preceding
        target)."""
        ids = torch.empty(self.dim, dtype=torch.long, device=device)
        ends = self.offsets[1:] + [self.dim]
        for i, (off, end) in enumerate(zip(self.offsets, ends)):
            ids[off:end] = i
        return ids


def module_modes(model: nn.Module) -> Callable[[], None]:
    """Record the train/eval mode of every module of ``model``; the returned function puts each one
    back. (``model.train(flag)`` alone sets every submodule to ``flag``, losing e.g. a part kept in
    eval mode.)"""
    modes = [(m, m.training) for m in model.modules()]

    def restore() -> None:
        for m, training in modes:
            m.training = training

    return restore


@contextlib.contextmanager
def keep_modes(model: nn.Module):
    """Every module of ``model`` leaves the block in the train/eval mode it had on entry, whatever
    happens."""
    restore = module_modes(model)
    try:
        yield
    finally:
        restore()
