"""``hf_mfac.MFAC``: SGD preconditioned with the sliding-window inverse empirical Fisher [M-FAC].

A thin ``torch.optim.Optimizer`` shell over :class:`hf_mfac.core.DynamicMFAC`: it flattens the
gradients of all parameters (across param groups) into one vector g of dimension d, calls
``update_mul(g)`` to get ``F^{-1} g`` for the window of the last ``num_grads`` gradients, and applies
momentum, weight decay and each group's learning rate.

This module also owns the question "is this M-FAC?" for the rest of the package (no transformers import):
:func:`unwrap_optimizer` / :func:`is_mfac_optimizer` for optimizer objects (also inside accelerate's or the
Trainer's wrappers) and :func:`selects_mfac` for training arguments or an ``optim`` name.
"""
from __future__ import annotations

import itertools
import logging
import warnings

import torch

from ..core import DynamicMFAC
from ..core._checks import free_bytes
from ..core.ihvp import GradientRejected, _padded, _storage_dtype, check_int, check_real

logger = logging.getLogger("hf_mfac")

__all__ = ["MFAC", "window_bytes", "MFAC_OPTIM", "selects_mfac", "unwrap_optimizer", "is_mfac_optimizer"]

MFAC_OPTIM = "mfac"  # the ``--optim`` / ``TrainingArguments.optim`` name of this optimizer


def selects_mfac(args_or_optim) -> bool:
    """Whether training arguments (anything with an ``optim`` attribute) or an ``optim`` name select M-FAC
    (``"mfac"``, any case)."""
    optim = getattr(args_or_optim, "optim", args_or_optim)
    return isinstance(optim, str) and str.lower(optim) == MFAC_OPTIM


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` / the Trainer's wrappers (objects whose
    ``.optimizer`` is a ``torch.optim.Optimizer``), stopping at the first :class:`MFAC`; ``None`` stays None."""
    while not isinstance(optimizer, MFAC) and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_mfac_optimizer(optimizer) -> bool:
    """Whether ``optimizer`` is an :class:`MFAC` (a ``ShardedMFAC`` included), possibly wrapped."""
    return isinstance(unwrap_optimizer(optimizer), MFAC)


def window_bytes(dim: int, num_grads: int, grad_dtype=torch.float32) -> int:
    """Memory the gradient window needs: ``num_grads`` rows of ``dim`` stored values (padded to a multiple of
    8) plus the fp64 m x m matrix."""
    item = torch.empty((), dtype=grad_dtype).element_size()
    return num_grads * _padded(dim) * item + 8 * num_grads * num_grads


def _check_group(where: str, group: dict) -> None:
    check_real(f"{where}lr", group["lr"], low=0)
    check_real(f"{where}weight_decay", group["weight_decay"], low=0)
    check_real(f"{where}momentum", group["momentum"], low=0, high=1, high_open=True)


class MFAC(torch.optim.Optimizer):
    r"""M-FAC optimizer: ``p <- p - lr * (momentum buffer of F^{-1} g)``, F from the last ``num_grads`` gradients.

    Args:
        params: parameters or param groups (the Trainer's decay / no-decay groups work; every group may
            set its own ``lr``, ``weight_decay`` and ``momentum``). One window covers the parameters of
            all groups: the Fisher is over the whole concatenated gradient.
        lr: learning rate (finite, >= 0). The step ``F^{-1} g`` grows roughly like ``num_grads / |g|^2`` for
            gradients in the span of the window, so the learning rate depends on ``num_grads``: a good start is
            ``lr ≈ 0.1 / num_grads`` (1e-4 at m = 1024 as in the paper, ~2e-3 at m = 64).
        num_grads: m, the number of gradients in the sliding window (any integer m >= 1).
        damp: λ in ``F = λ I + (1/m) Σ g g^T`` (finite, > 0). A huge damp makes M-FAC SGD with learning rate
            lr / damp.
        weight_decay: decoupled (AdamW-style) weight decay, ``p <- p * (1 - lr * weight_decay)``; it does not
            enter the window.
        momentum: heavy-ball momentum on the preconditioned direction, ``b <- momentum * b + F^{-1} g``
            (in [0, 1)).
        grad_dtype: storage dtype of the window (``torch.bfloat16``/``"bfloat16"`` halves memory and time;
            products are accumulated in fp32).
        window_device: device that holds the window (default: the parameters' device), e.g. "cpu" to keep a
            GPU free at the cost of moving the gradient each step.
        normalize_by_seen: before the window is full, divide the Fisher by the number of gradients seen
            instead of m (see :class:`~hf_mfac.core.DynamicMFAC`).
        nonfinite: what to do with a gradient the window refuses (:class:`~hf_mfac.core.ihvp.GradientRejected`:
            NaN/inf, values beyond the range of ``grad_dtype`` such as 7e4 in a float16 window, non-finite
            products with the window, a failed factorisation, a non-finite ``F^{-1} g``): ``"raise"`` (default)
            raises it, ``"skip"`` skips the step with a warning. In both cases the window, the momentum buffers
            and the parameters are left exactly as they were; under :class:`~hf_mfac.ShardedMFAC` all ranks
            take the same decision.

    Arguments are checked when the optimizer is built (and ``lr``/``weight_decay``/``momentum`` of every param
    group): a wrong type raises ``TypeError``, a value out of range (NaN and inf included) ``ValueError``,
    both naming the argument.

    Precision: the direction ``F^{-1} g`` is computed in fp32; with fp16/bf16 parameters the momentum buffer is
    kept in fp32 too and the learning rate is applied in fp32, so the update is rounded to the parameter's
    dtype once, at the end (``lr * F^{-1} g`` = 6.67 does not become inf because ``F^{-1} g`` = 66700 would
    overflow fp16).

    Memory: ``num_grads * d`` values of ``grad_dtype`` (:func:`window_bytes`); the optimizer fails before
    allocating when the window's device has less free memory. With :meth:`set_masks`, pruned weights are
    left out of the window (d counts the kept weights only) and stay exactly zero.

    The whole window is part of :meth:`state_dict` (tensors and plain types only), under the extra key
    ``"mfac"``, and is restored as saved (its dtype is not cast to the parameters' dtype, nor are the momentum
    buffers). :meth:`load_state_dict` checks the window (:meth:`~hf_mfac.core.DynamicMFAC.load_state_dict`)
    before it changes anything.
    """

    def __init__(self, params, lr: float = 1e-4, num_grads: int = 1024, damp: float = 1e-6,
                 weight_decay: float = 0.0, momentum: float = 0.0, *, grad_dtype=None, window_device=None,
                 normalize_by_seen: bool = False, nonfinite: str = "raise"):
        lr = check_real("lr", lr, low=0)
        weight_decay = check_real("weight_decay", weight_decay, low=0)
        momentum = check_real("momentum", momentum, low=0, high=1, high_open=True)
        num_grads = check_int("num_grads", num_grads)
        damp = check_real("damp", damp, low=0, low_open=True)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {nonfinite!r}")
        if not isinstance(normalize_by_seen, bool):
            raise TypeError(f"normalize_by_seen must be True or False; got {normalize_by_seen!r}")
        grad_dtype = _storage_dtype(grad_dtype, torch.float32)
        window_device = None if window_device is None else torch.device(window_device)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.num_grads = num_grads
        self.damp = damp
        self.grad_dtype = grad_dtype
        self.window_device = window_device
        self.normalize_by_seen = normalize_by_seen
        self.nonfinite = nonfinite
        self.window: DynamicMFAC | None = None
        self._layout = None  # list of (param, flat index tensor of kept coordinates or None, offset, length)
        self._masks: dict[torch.Tensor, torch.Tensor] = {}

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's ``lr``, ``weight_decay`` and ``momentum``
        are checked (the group is not added when one is wrong)."""
        super().add_param_group(param_group)
        try:
            _check_group(f"param_groups[{len(self.param_groups) - 1}]: ", self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # -- layout of the flat gradient -------------------------------------------------------------------
    def _params(self):
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _new_layout(self, masks: dict):
        """(layout, ids, window) over the trainable coordinates kept by ``masks``; assigns nothing."""
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
        """The window over ``dim`` flattened coordinates (subclasses shard it); fails early without memory."""
        need = window_bytes(dim, self.num_grads, self.grad_dtype)
        free = free_bytes(device)
        if free is not None and need > free:
            raise MemoryError(
                f"the M-FAC window needs {need / 2**30:.2f} GiB (num_grads={self.num_grads} x d={dim} values) "
                f"but only {free / 2**30:.2f} GiB is free on {device}. Lower num_grads, store it in bfloat16 "
                "(grad_dtype), put it on another device (window_device) or shard it across processes (ShardedMFAC)."
            )
        return DynamicMFAC(dim, self.num_grads, self.damp, device=device, grad_dtype=self.grad_dtype,
                           normalize_by_seen=self.normalize_by_seen)

    def set_masks(self, masks: dict | None) -> None:
        """Fix sparsity masks ``{param: bool tensor}`` (True = kept) for sparse fine-tuning: masked weights
        are zeroed now, stay zero, and are left out of the window. The window restarts (its coordinates
        change). ``None`` removes all masks."""
        new = {}
        for p, mask in (masks or {}).items():
            mask = torch.as_tensor(mask).to(device=p.device, dtype=torch.bool)
            if mask.shape != p.shape:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match parameter of shape "
                                 f"{tuple(p.shape)}")
            new[p] = mask
        known = set(map(id, self._params()))
        if any(id(p) not in known for p in new):
            raise ValueError("set_masks got a tensor that is not a trainable parameter of this optimizer")
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
        g = torch.zeros(self.window.dim, dtype=torch.float32, device=self.window.device)
        for p, idx, off, n in self._layout:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
            src = p.grad.reshape(-1) if idx is None else p.grad.reshape(-1)[idx]
            g[off : off + n] = src.to(device=g.device, dtype=torch.float32)
        return g

    # -- step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layout is None:
            self._build_layout()
        elif any(p.grad is not None and id(p) not in self._layout_ids for p in self._params()):
            raise RuntimeError("a parameter that had no gradient when MFAC started now has one; "
                               "call reset_window() after changing which parameters train")
        try:  # checks the gradient (finite, fits the storage dtype) before it changes anything
            direction = self.window.update_mul(self._flat_grad())  # (d,) F^{-1} g
        except GradientRejected as e:
            msg = (f"MFAC: {e}; the step was not applied, and the parameters and momentum are unchanged too. "
                   "Lower the learning rate, enable gradient clipping (max_grad_norm), store the window in float32 "
                   "(grad_dtype) if it overflowed, or use nonfinite='skip'.")
            if self.nonfinite == "raise":
                raise GradientRejected(msg) from e
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return loss
        groups = {id(p): grp for grp in self.param_groups for p in grp["params"]}
        for p, idx, off, n in self._layout:
            if p.grad is None:
                continue
            group = groups[id(p)]
            compute = torch.promote_types(p.dtype, direction.dtype)  # fp32 for fp16/bf16 parameters
            seg = direction[off : off + n].to(device=p.device, dtype=compute)
            if idx is None:
                upd = seg.view(p.shape)
            else:
                upd = torch.zeros(p.numel(), dtype=compute, device=p.device)
                upd[idx] = seg
                upd = upd.view(p.shape)
            if group["momentum"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = upd.clone()
                else:
                    if buf.dtype != compute or buf.device != p.device:
                        buf = state["momentum_buffer"] = buf.to(device=p.device, dtype=compute)
                    buf.mul_(group["momentum"]).add_(upd)
                upd = buf
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(upd, alpha=-group["lr"])  # computed in `compute`, rounded to p.dtype once
            mask = self._masks.get(p)
            if mask is not None:
                p.mul_(mask)
        return loss

    def reset_window(self) -> None:
        """Forget the gradient window (e.g. after a pruning step); momentum buffers are kept."""
        self._layout = self.window = None

    def reset_momentum(self) -> None:
        for st in self.state.values():
            st.pop("momentum_buffer", None)

    # -- checkpointing ---------------------------------------------------------------------------------
    def _param_index(self) -> dict:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self):
        sd = super().state_dict()
        index = self._param_index()
        extra = {"num_grads": self.num_grads, "damp": self.damp,
                 "masks": {index[id(p)]: m for p, m in self._masks.items()}}
        if self.window is not None:
            extra["window"] = self.window.state_dict()
            extra["layout"] = [index[id(p)] for p, *_ in self._layout]
        sd["mfac"] = extra
        return sd

    def _saved_masks(self, extra: dict) -> dict:
        params = [p for g in self.param_groups for p in g["params"]]
        masks = {}
        for i, m in extra.get("masks", {}).items():
            if not 0 <= int(i) < len(params):
                raise ValueError(f"the checkpoint has a mask for parameter {i}; this optimizer has {len(params)}")
            p = params[int(i)]
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"the checkpoint's mask for parameter {i} has shape "
                                 f"{tuple(getattr(m, 'shape', ()))}; the parameter has {tuple(p.shape)}")
            masks[p] = m.to(p.device, torch.bool)
        return masks

    def _restore_momentum(self, state_dict: dict) -> None:
        """Put back the saved momentum buffers in their saved dtype (``Optimizer.load_state_dict`` casts them
        to the parameter's dtype: an fp32 buffer of an fp16 parameter would lose its precision)."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for k, st in state_dict.get("state", {}).items():
            buf = st.get("momentum_buffer") if isinstance(st, dict) else None
            if isinstance(buf, torch.Tensor) and k in by_id:
                p = by_id[k]
                self.state[p]["momentum_buffer"] = buf.to(device=p.device, copy=True)

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`. The saved masks and window are checked first (their shapes, the window's
        contents, see :meth:`~hf_mfac.core.DynamicMFAC.load_state_dict`); a refusal changes nothing."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if extra is None:
            super().load_state_dict(state_dict)
            self._restore_momentum(state_dict)
            return
        masks = self._saved_masks(extra)
        layout = ids = window = None
        if "window" in extra:
            layout, ids, window = self._new_layout(masks)
            index = self._param_index()
            if [index[id(p)] for p, *_ in layout] != list(extra.get("layout", ())):
                raise ValueError("the checkpoint's M-FAC window was built over other parameters than this optimizer's")
            window.load_state_dict(extra["window"])
        super().load_state_dict(state_dict)
        self._restore_momentum(state_dict)
        self._masks = masks
        self._layout, self.window = layout, window
        if ids is not None:
            self._layout_ids = ids
