"""``hf_mfac.MFAC``: SGD preconditioned with the sliding-window inverse empirical Fisher [M-FAC].

A thin ``torch.optim.Optimizer`` shell over :class:`hf_mfac.core.DynamicMFAC`: it flattens the
gradients of all parameters (across param groups) into one vector g of dimension d, calls
``update_mul(g)`` to get ``F^{-1} g`` for the window of the last ``num_grads`` gradients, and
applies momentum, weight decay and each group's learning rate. Its options are defined once, in
:class:`~hf_mfac.optim.options.MFACOptions`.

This module also owns the question "is this M-FAC?" for the rest of the package (no transformers
import): :func:`unwrap_optimizer` / :func:`is_mfac_optimizer` for optimizer objects (also inside
accelerate's or the Trainer's wrappers) and :func:`selects_mfac` for training arguments or an
``optim`` name.
"""
from __future__ import annotations

import itertools
import logging
import warnings

import torch

from ..core import CompressedMFAC, DynamicMFAC
from ..core._checks import free_bytes
from ..core.ihvp import GradientRejected, _padded, check_real
from ..core.sparse_window import check_density, compressed_window_bytes
from .options import MFACOptions

logger = logging.getLogger("hf_mfac")

__all__ = ["MFAC", "window_bytes", "MFAC_OPTIM", "selects_mfac", "unwrap_optimizer",
           "is_mfac_optimizer"]

MFAC_OPTIM = "mfac"  # the ``--optim`` / ``TrainingArguments.optim`` name of this optimizer
_DEFAULT = MFACOptions()  # the keyword defaults of MFAC


def selects_mfac(args_or_optim) -> bool:
    """Whether training arguments (anything with an ``optim`` attribute) or an ``optim`` name select
    M-FAC (``"mfac"``, any case)."""
    optim = getattr(args_or_optim, "optim", args_or_optim)
    return isinstance(optim, str) and str.lower(optim) == MFAC_OPTIM


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` / the Trainer's wrappers (objects
    whose ``.optimizer`` is a ``torch.optim.Optimizer``), stopping at the first :class:`MFAC`;
    ``None`` stays None."""
    while not isinstance(optimizer, MFAC) and isinstance(getattr(optimizer, "optimizer", None),
                                                         torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_mfac_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is an :class:`MFAC` (a ``ShardedMFAC`` included), possibly wrapped."""
    return isinstance(unwrap_optimizer(optimizer), MFAC)


def window_bytes(dim: int, num_grads: int, grad_dtype=torch.float32, density: float = 1.0) -> int:
    """Memory the gradient window needs: ``num_grads`` rows of ``dim`` stored values (padded to a
    multiple of 8) plus the fp64 m x m matrix; with ``density < 1`` that of the compressed window
    (:func:`~hf_mfac.core.sparse_window.compressed_window_bytes`: indices and values of the kept
    entries, the error buffer and the products' workspace)."""
    if check_density(density) < 1.0:
        return compressed_window_bytes(dim, num_grads, density, grad_dtype=grad_dtype)
    item = torch.empty((), dtype=grad_dtype).element_size()
    return num_grads * _padded(dim) * item + 8 * num_grads * num_grads


def _check_group(where: str, group: dict) -> None:
    check_real(f"{where}: lr", group["lr"], low=0)
    check_real(f"{where}: weight_decay", group["weight_decay"], low=0)
    check_real(f"{where}: momentum", group["momentum"], low=0, high=1, high_open=True)
    for j, p in enumerate(group["params"]):
        if p.is_complex():
            names = group.get("param_names")
            name = f" ({names[j]})" if names else ""
            raise TypeError(
                f"{where}['params'][{j}]{name} is complex ({p.dtype}, shape {tuple(p.shape)}): "
                "MFAC does not support complex parameters (their imaginary part would be lost). "
                "Hold it as a real parameter of shape (..., 2) (torch.view_as_real) and use "
                "torch.view_as_complex of it in forward, or optimise it with another optimizer.")


def _window_kind(density: float) -> str:
    return "dense (density=1.0)" if density == 1.0 else f"compressed (density={density!r})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class MFAC(torch.optim.Optimizer):
    r"""M-FAC optimizer: ``p <- p - lr * (momentum buffer of F^{-1} g)``, F from the last
    ``num_grads`` gradients [M-FAC, Alg. 1].

    Args (each defined, with its default and check, in :class:`~hf_mfac.optim.options.MFACOptions`):
        params: parameters or param groups (the Trainer's decay / no-decay groups work; every group
            may set its own ``lr``, ``weight_decay`` and ``momentum``). One window covers the
            parameters of all groups: the Fisher is over the whole concatenated gradient. Real
            floating-point tensors only: a complex parameter is refused (hold it as
            ``torch.view_as_real``, shape (..., 2)).
        lr: learning rate (finite, >= 0). The step ``F^{-1} g`` grows roughly like ``num_grads /
            |g|^2`` for gradients in the span of the window, so the learning rate depends on
            ``num_grads``: a good start is ``lr ≈ 0.1 / num_grads`` (1e-4 at m = 1024 as in the
            paper, ~2e-3 at m = 64).
        num_grads: m, the number of gradients in the sliding window (any integer m >= 1).
        damp: λ in ``F = λ I + (1/m) Σ g g^T`` (finite, > 0). A huge damp makes M-FAC SGD with
            learning rate lr / damp.
        weight_decay: decoupled (AdamW-style) weight decay, ``p <- p * (1 - lr * weight_decay)``; it
            does not enter the window.
        momentum: heavy-ball momentum on the preconditioned direction, ``b <- momentum * b + F^{-1}
            g`` (in [0, 1)).
        grad_dtype: storage dtype of the window (``torch.bfloat16``/``"bfloat16"`` halves memory and
            time; products are accumulated in fp32).
        window_device: device that holds the window (default: the parameters' device), e.g. "cpu" to
            keep a GPU free at the cost of moving the gradient each step.
        normalize_by_seen: before the window is full, divide the Fisher by the number of gradients
            seen instead of m (see :class:`~hf_mfac.core.DynamicMFAC`).
        density: the fraction of each gradient the window keeps, in (0, 1]. 1.0 (default) keeps
            whole gradients (:class:`~hf_mfac.core.DynamicMFAC`). Below 1 the window is compressed
            with error feedback [EFCP] (:class:`~hf_mfac.core.CompressedMFAC`): each gradient plus
            what earlier steps left out is cut to its largest ``density`` fraction per block of
            2^15 coordinates, the rest is kept in a d-sized buffer for the next step, and the step
            is ``F^{-1}`` of the kept part. Memory about ``density * m * d * 6`` bytes (fp32
            values, int16 indices; 4 with ``grad_dtype=torch.bfloat16``) plus 3 d-vectors: at
            d = 1.1e8, m = 1024, density 0.01 that is 8.1 GB (7.6 GiB) with fp32 values and 5.8 GB
            (5.4 GiB) with bfloat16 values, instead of 450 GB. While fewer than m gradients have
            been seen, ``lr * m`` and ``m * damp`` alone set the step (the rows not yet written
            count as zeros), so a short run behaves the same at any m above its step count. The
            error buffer delays what the window drops: a coordinate is taken about once per
            ``1 / density`` steps, so a run of a few hundred steps or fewer wants a higher density
            (and fewer rows for the same memory) than the 1 % of long runs
            (benchmarks/RESULTS.md, "Compressed M-FAC window").
        nonfinite: what to do with a gradient the window refuses
            (:class:`~hf_mfac.core.ihvp.GradientRejected`: NaN/inf, values beyond the range of
            ``grad_dtype`` such as 7e4 in a float16 window, non-finite products with the window, a
            failed factorisation, a non-finite ``F^{-1} g``): ``"raise"`` (default) raises it,
            ``"skip"`` skips the step with a warning. In both cases the window, the momentum buffers
            and the parameters are left exactly as they were; under :class:`~hf_mfac.ShardedMFAC`
            all ranks take the same decision.

    Arguments are checked when the optimizer is built (and ``lr``/``weight_decay``/``momentum`` of
    every param group, and that no parameter is complex): a wrong type raises ``TypeError``, a value
    out of range (NaN and inf included) ``ValueError``, both naming the argument or parameter.

    Gradients: a parameter whose ``.grad`` is None this step is not moved (its coordinates of g are
    zero in the window, and its update is skipped). A parameter whose ``.grad`` is a zero tensor
    *does* move:
    ``F^{-1}`` couples the coordinates, so ``(F^{-1} g)_p`` is not zero when earlier gradients in
    the window correlate p with the others. Set ``.grad = None`` (``zero_grad(set_to_none=True)``,
    the default) for a parameter that must stay put, or freeze it (``requires_grad=False``) before
    the first step.

    Precision: the direction ``F^{-1} g`` is computed in fp32; with fp16/bf16 parameters the
    momentum buffer is kept in fp32 too and the learning rate is applied in fp32, so the update is
    rounded to the parameter's dtype once, at the end (``lr * F^{-1} g`` = 6.67 does not become inf
    because ``F^{-1} g`` = 66700 would overflow fp16).

    Memory: ``num_grads * d`` values of ``grad_dtype`` (:func:`window_bytes`); the optimizer fails
    before allocating when the window's device has less free memory. With :meth:`set_masks`, pruned
    weights are left out of the window (d counts the kept weights only) and stay exactly zero.

    The whole window is part of :meth:`state_dict` (tensors and plain types only), under the extra
    key ``"mfac"`` with the shape and dtype of every parameter, and is restored as saved (its dtype
    is not cast to the parameters' dtype, nor are the momentum buffers). :meth:`load_state_dict`
    checks the parameters' shapes and dtypes, the momentum buffers, the masks and the window
    (:meth:`~hf_mfac.core.DynamicMFAC.load_state_dict`) before it changes anything.
    """

    def __init__(self, params, lr: float = _DEFAULT.lr, num_grads: int = _DEFAULT.num_grads,
                 damp: float = _DEFAULT.damp, weight_decay: float = _DEFAULT.weight_decay,
                 momentum: float = _DEFAULT.momentum, *, grad_dtype=_DEFAULT.grad_dtype,
                 window_device=_DEFAULT.window_device,
                 normalize_by_seen: bool = _DEFAULT.normalize_by_seen,
                 nonfinite: str = _DEFAULT.nonfinite, density: float = _DEFAULT.density):
        opts = MFACOptions(lr=lr, num_grads=num_grads, damp=damp, weight_decay=weight_decay,
                           momentum=momentum, grad_dtype=grad_dtype, window_device=window_device,
                           normalize_by_seen=normalize_by_seen, nonfinite=nonfinite,
                           density=density)
        defaults = dict(lr=opts.lr, weight_decay=opts.weight_decay, momentum=opts.momentum)
        super().__init__(params, defaults)
        self.num_grads = opts.num_grads
        self.damp = opts.damp
        self.grad_dtype = getattr(torch, opts.grad_dtype or "float32")
        device = opts.window_device
        self.window_device = None if device is None else torch.device(device)
        self.normalize_by_seen = opts.normalize_by_seen
        self.nonfinite = opts.nonfinite
        self.density = opts.density
        self.window: DynamicMFAC | None = None
        # list of (param, flat index tensor of kept coordinates or None, offset, length)
        self._layout = None
        self._masks: dict[torch.Tensor, torch.Tensor] = {}

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's ``lr``, ``weight_decay`` and
        ``momentum`` are checked, and complex parameters refused (the group is not added when one is
        wrong)."""
        super().add_param_group(param_group)
        try:
            _check_group(f"param_groups[{len(self.param_groups) - 1}]", self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # -- layout of the flat gradient ---------------------------------------------------------------
    def _params(self):
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _new_layout(self, masks: dict):
        """(layout, ids, window) over the trainable coordinates kept by ``masks``; assigns
        nothing."""
        layout, offset = [], 0
        for p in self._params():
            mask = masks.get(p)
            idx = None if mask is None else mask.reshape(-1).nonzero().squeeze(1).to(p.device)
            n = p.numel() if idx is None else idx.numel()
            layout.append((p, idx, offset, n))
            offset += n
        if offset == 0:
            raise ValueError(f"{type(self).__name__} has no trainable coordinates "
                             "(all parameters frozen or fully masked)")
        window = self._make_window(offset, self.window_device or layout[0][0].device)
        return layout, {id(p) for p, *_ in layout}, window

    def _build_layout(self):
        self._layout, self._layout_ids, self.window = self._new_layout(self._masks)

    def _make_window(self, dim: int, device) -> DynamicMFAC:
        """The window over ``dim`` flattened coordinates (subclasses shard it); fails early without
        memory (the compressed window checks its own memory before it allocates)."""
        if self.density < 1.0:
            return CompressedMFAC(dim, self.num_grads, self.damp, self.density, device=device,
                                  grad_dtype=self.grad_dtype,
                                  normalize_by_seen=self.normalize_by_seen)
        need = window_bytes(dim, self.num_grads, self.grad_dtype)
        free = free_bytes(device)
        if free is not None and need > free:
            raise MemoryError(
                f"the M-FAC window needs {need / 2**30:.2f} GiB (num_grads={self.num_grads} x "
                f"d={dim} values) but only {free / 2**30:.2f} GiB is free on {device}. Lower "
                "num_grads, store it in bfloat16 (grad_dtype), put it on another device "
                "(window_device) or shard it across processes (ShardedMFAC).")
        return DynamicMFAC(dim, self.num_grads, self.damp, device=device,
                           grad_dtype=self.grad_dtype, normalize_by_seen=self.normalize_by_seen)

    def set_masks(self, masks: dict | None) -> None:
        """Fix sparsity masks ``{param: bool tensor}`` (True = kept) for sparse fine-tuning: masked
        weights are zeroed now, stay zero, and are left out of the window. The window restarts (its
        coordinates change). ``None`` removes all masks."""
        new = {}
        for p, mask in (masks or {}).items():
            mask = torch.as_tensor(mask).to(device=p.device, dtype=torch.bool)
            if mask.shape != p.shape:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match parameter of "
                                 f"shape {tuple(p.shape)}")
            new[p] = mask
        known = set(map(id, self._params()))
        if any(id(p) not in known for p in new):
            raise ValueError("set_masks got a tensor that is not a trainable parameter of this "
                             "optimizer")
        self._masks = new
        with torch.no_grad():
            for p, mask in new.items():
                p.mul_(mask)
        if self.window is not None and self.window.count:
            logger.info("MFAC: masks changed, the gradient window restarts")
        self._layout = self.window = None

    @property
    def masks(self) -> dict:
        return dict(self._masks)

    def _flat_grad(self) -> torch.Tensor:
        g = torch.zeros(self.window.dim, dtype=torch.float32, device=self.window.device)  # (d,)
        for p, idx, off, n in self._layout:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
            src = p.grad.reshape(-1) if idx is None else p.grad.reshape(-1)[idx]
            g[off : off + n] = src.to(device=g.device, dtype=torch.float32)
        return g

    # -- step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step [M-FAC, Alg. 1]. Up to the write-back nothing changes: a refused gradient
        leaves the window, the momentum and the parameters as they were."""
        loss = self._closure_loss(closure)
        # g <- concat(p.grad, kept coordinates; zeros where .grad is None)            (d,)
        g = self._gather_grad()
        # u <- F^{-1} g, G <- [G[1:]; g]  (refused g: raise, or skip with nothing changed)  (d,)
        u = self._precondition(g)
        if u is None:
            return loss
        for p, group, u_p in self._segments(u):  # u_p: p's part of u, shaped like p
            # b <- momentum * b + u_p
            b = self._momentum(p, group, u_p)
            # p <- p * (1 - lr * weight_decay)
            self._decay(p, group)
            # p <- (p - lr * b) * mask
            self._write_back(p, group, b)
        return loss

    @staticmethod
    def _closure_loss(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _gather_grad(self) -> torch.Tensor:
        """The flat gradient (d,); lays out the window at the first step, and refuses a parameter
        that has a gradient now but had none (no place in the window) then."""
        if self._layout is None:
            self._build_layout()
        elif any(p.grad is not None and id(p) not in self._layout_ids for p in self._params()):
            raise RuntimeError("a parameter that had no gradient when MFAC started now has one; "
                               "call reset_window() after changing which parameters train")
        return self._flat_grad()

    def _precondition(self, g: torch.Tensor) -> torch.Tensor | None:
        """``F^{-1} g`` (d,) with g entered into the window, or None for a gradient the window
        refused with ``nonfinite="skip"`` (``"raise"`` raises). The window checks g (finite, fits
        the storage dtype) before it changes anything."""
        try:
            return self.window.update_mul(g)
        except GradientRejected as e:
            msg = (f"MFAC: {e}; the step was not applied, and the parameters and momentum are "
                   "unchanged too. Lower the learning rate, enable gradient clipping "
                   "(max_grad_norm), store the window in float32 (grad_dtype) if it overflowed, or "
                   "use nonfinite='skip'.")
            if self.nonfinite == "raise":
                raise GradientRejected(msg) from e
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None

    def _segments(self, u: torch.Tensor):
        """``(p, group, u_p)`` for every parameter with a gradient: u_p its coordinates of ``u`` in
        p's shape (zeros at masked weights), in ``promote(p.dtype, fp32)`` (fp32 for fp16/bf16
        p)."""
        groups = {id(p): grp for grp in self.param_groups for p in grp["params"]}
        for p, idx, off, n in self._layout:
            if p.grad is None:
                continue
            compute = torch.promote_types(p.dtype, u.dtype)
            seg = u[off : off + n].to(device=p.device, dtype=compute)  # (n,)
            if idx is not None:
                full = torch.zeros(p.numel(), dtype=compute, device=p.device)
                full[idx] = seg
                seg = full
            yield p, groups[id(p)], seg.view(p.shape)

    def _momentum(self, p: torch.Tensor, group: dict, u_p: torch.Tensor) -> torch.Tensor:
        """``b <- momentum * b + u_p`` (the buffer starts as u_p); u_p itself without momentum."""
        if not group["momentum"]:
            return u_p
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = u_p.clone()
        else:
            if buf.dtype != u_p.dtype or buf.device != p.device:
                buf = state["momentum_buffer"] = buf.to(device=p.device, dtype=u_p.dtype)
            buf.mul_(group["momentum"]).add_(u_p)
        return buf

    @staticmethod
    def _decay(p: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _write_back(self, p: torch.Tensor, group: dict, b: torch.Tensor) -> None:
        p.add_(b, alpha=-group["lr"])  # computed in b's dtype, rounded to p.dtype once
        mask = self._masks.get(p)
        if mask is not None:
            p.mul_(mask)

    def reset_window(self) -> None:
        """Forget the gradient window (e.g. after a pruning step); momentum buffers are kept."""
        self._layout = self.window = None

    def reset_momentum(self) -> None:
        for st in self.state.values():
            st.pop("momentum_buffer", None)

    # -- checkpointing -----------------------------------------------------------------------------
    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _param_index(self) -> dict:
        return {id(p): i for i, p in enumerate(self._all_params())}

    def _param_record(self) -> list:
        """``[shape, dtype name]`` of every parameter, in param-group order (plain types)."""
        return [[list(p.shape), _dtype_name(p.dtype)] for p in self._all_params()]

    def _param_name(self, i: int) -> str:
        """Parameter ``i`` of :meth:`_all_params` as ``param_groups[g]['params'][j]`` (and its
        name)."""
        for g, group in enumerate(self.param_groups):
            if i < len(group["params"]):
                names = group.get("param_names")
                return f"param_groups[{g}]['params'][{i}]" + (f" ({names[i]})" if names else "")
            i -= len(group["params"])
        raise IndexError(i)

    def _check_param_record(self, record) -> None:
        """Refuse a saved :meth:`_param_record` (None: an older checkpoint without it) whose
        parameters differ in number, shape or dtype from this optimizer's, naming the first that
        differs."""
        if record is None:
            return
        params = self._all_params()
        if len(record) != len(params):
            raise ValueError(f"the M-FAC checkpoint was saved for {len(record)} parameters; this "
                             f"optimizer has {len(params)}. Load it into an optimizer over the "
                             "same model.")
        for i, (p, (shape, dtype)) in enumerate(zip(params, record)):
            if tuple(shape) != tuple(p.shape) or dtype != _dtype_name(p.dtype):
                raise ValueError(
                    f"the M-FAC checkpoint does not fit parameter {i}, {self._param_name(i)}: it "
                    f"was saved for shape {tuple(shape)}, {dtype}; this one has shape "
                    f"{tuple(p.shape)}, {_dtype_name(p.dtype)}. Load it into an optimizer over the "
                    "same model, with its parameters in the same order and dtype (cast the model "
                    "first); nothing was changed.")

    def _check_saved_params(self, state_dict: dict, extra: dict | None) -> None:
        """The saved param groups have this optimizer's sizes, the saved parameters its shapes and
        dtypes, and every momentum buffer its parameter's shape."""
        saved_sizes = [len(g["params"]) for g in state_dict.get("param_groups", ())]
        sizes = [len(g["params"]) for g in self.param_groups]
        if saved_sizes != sizes:
            raise ValueError(f"the checkpoint has param groups of {saved_sizes} parameters; this "
                             f"optimizer has {sizes}. Load it into an optimizer over the same "
                             "model.")
        self._check_param_record((extra or {}).get("params"))
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        index = dict(zip(saved_ids, range(len(self._all_params()))))
        params = self._all_params()
        for k, st in state_dict.get("state", {}).items():
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if isinstance(buf, torch.Tensor) and k in index and buf.shape != params[index[k]].shape:
                i = index[k]
                raise ValueError(
                    f"the checkpoint's momentum buffer of parameter {i}, {self._param_name(i)}, "
                    f"has shape {tuple(buf.shape)}; the parameter has {tuple(params[i].shape)}. "
                    "Load it into an optimizer over the same model; nothing was changed.")

    def state_dict(self):
        sd = super().state_dict()
        index = self._param_index()
        extra = {"num_grads": self.num_grads, "damp": self.damp, "density": self.density,
                 "params": self._param_record(),
                 "masks": {index[id(p)]: m for p, m in self._masks.items()}}
        if self.window is not None:
            extra["window"] = self.window.state_dict()
            extra["layout"] = [index[id(p)] for p, *_ in self._layout]
        sd["mfac"] = extra
        return sd

    def _saved_masks(self, extra: dict) -> dict:
        params = self._all_params()
        masks = {}
        for i, m in extra.get("masks", {}).items():
            if not 0 <= int(i) < len(params):
                raise ValueError(f"the checkpoint has a mask for parameter {i}; this optimizer has "
                                 f"{len(params)}")
            p = params[int(i)]
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"the checkpoint's mask for parameter {i} has shape "
                                 f"{tuple(getattr(m, 'shape', ()))}; the parameter has "
                                 f"{tuple(p.shape)}")
            masks[p] = m.to(p.device, torch.bool)
        return masks

    def _check_density(self, extra: dict) -> None:
        """A saved window must be of this optimizer's kind: dense (density 1) or compressed with
        the same density."""
        saved = extra.get("density", 1.0)
        if "window" in extra and saved != self.density:
            raise ValueError(
                f"the checkpoint's M-FAC window is {_window_kind(saved)} but this optimizer's is "
                f"{_window_kind(self.density)}: build the optimizer with density={saved!r} to "
                "resume it; nothing was changed.")

    def _restore_momentum(self, state_dict: dict) -> None:
        """Put back the saved momentum buffers in their saved dtype (``Optimizer.load_state_dict``
        casts them to the parameter's dtype: an fp32 buffer of an fp16 parameter would lose its
        precision)."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        by_id = dict(zip(saved_ids, self._all_params()))
        for k, st in state_dict.get("state", {}).items():
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if isinstance(buf, torch.Tensor) and k in by_id:
                p = by_id[k]
                self.state[p]["momentum_buffer"] = buf.to(device=p.device, copy=True)

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`. Checked first, and refused with nothing changed: the
        parameters' number, shapes and dtypes and the momentum buffers' shapes against this
        optimizer's, the saved masks, the window's layout and contents (see
        :meth:`~hf_mfac.core.DynamicMFAC.load_state_dict`)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        self._check_saved_params(state_dict, extra)
        if extra is None:
            super().load_state_dict(state_dict)
            self._restore_momentum(state_dict)
            return
        masks = self._saved_masks(extra)
        self._check_density(extra)
        layout = ids = window = None
        if "window" in extra:
            layout, ids, window = self._new_layout(masks)
            index = self._param_index()
            if [index[id(p)] for p, *_ in layout] != list(extra.get("layout", ())):
                raise ValueError("the checkpoint's M-FAC window was built over other parameters "
                                 "than this optimizer's")
            window.load_state_dict(extra["window"])
        super().load_state_dict(state_dict)
        self._restore_momentum(state_dict)
        self._masks = masks
        self._layout, self.window = layout, window
        if ids is not None:
            self._layout_ids = ids
