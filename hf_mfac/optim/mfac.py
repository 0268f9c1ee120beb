"""``hf_mfac.MFAC``: SGD preconditioned with the sliding-window inverse empirical Fisher (seed 002).

A thin ``torch.optim.Optimizer`` shell over :class:`hf_mfac.core.DynamicMFAC`: it flattens the
gradients of all parameters (across param groups) into one vector g of dimension d, calls
``update_mul(g)`` to get ``F^{-1} g`` for the window of the last ``num_grads`` gradients, and applies
momentum, weight decay and each group's learning rate.
"""
from __future__ import annotations

import logging
import warnings

import torch

from ..core import DynamicMFAC
from ..core._checks import all_finite, check_damp, check_positive_int, free_bytes
from ..core.ihvp import _storage_dtype

logger = logging.getLogger("hf_mfac")

__all__ = ["MFAC", "window_bytes"]


def window_bytes(dim: int, num_grads: int, grad_dtype=torch.float32) -> int:
    """Memory the gradient window needs: ``num_grads * dim`` stored values plus the fp64 m x m matrix."""
    item = torch.empty((), dtype=grad_dtype).element_size()
    return num_grads * dim * item + 8 * num_grads * num_grads


class MFAC(torch.optim.Optimizer):
    r"""M-FAC optimizer: ``p <- p - lr * (momentum buffer of F^{-1} g)``, F from the last ``num_grads`` gradients.

    Args:
        params: parameters or param groups (the Trainer's decay / no-decay groups work; every group may
            set its own ``lr``, ``weight_decay`` and ``momentum``). One window covers the parameters of
            all groups: the Fisher is over the whole concatenated gradient.
        lr: learning rate. The step ``F^{-1} g`` grows roughly like ``num_grads / |g|^2`` for gradients in
            the span of the window, so the learning rate depends on ``num_grads``: a good start is
            ``lr ≈ 0.1 / num_grads`` (1e-4 at m = 1024 as in the paper, ~2e-3 at m = 64).
        num_grads: m, the number of gradients in the sliding window (any m >= 1).
        damp: λ in ``F = λ I + (1/m) Σ g g^T``. A huge damp makes M-FAC SGD with learning rate lr / damp.
        weight_decay: decoupled (AdamW-style) weight decay, ``p <- p * (1 - lr * weight_decay)``; it does not
            enter the window.
        momentum: heavy-ball momentum on the preconditioned direction, ``b <- momentum * b + F^{-1} g``.
        grad_dtype: storage dtype of the window (``torch.bfloat16``/``"bfloat16"`` halves memory and time;
            products are accumulated in fp32).
        window_device: device that holds the window (default: the parameters' device), e.g. "cpu" to keep a
            GPU free at the cost of moving the gradient each step.
        normalize_by_seen: before the window is full, divide the Fisher by the number of gradients seen
            instead of m (see :class:`~hf_mfac.core.DynamicMFAC`).
        nonfinite: ``"raise"`` (default) raises on NaN/inf gradients, ``"skip"`` skips the step with a
            warning; in both cases the window and the parameters are left unchanged.

    Memory: ``num_grads * d`` values of ``grad_dtype`` (:func:`window_bytes`); the optimizer fails before
    allocating when the window's device has less free memory. With :meth:`set_masks`, pruned weights are
    left out of the window (d counts the kept weights only) and stay exactly zero.

    The whole window is part of :meth:`state_dict` (tensors and plain types only), under the extra key
    ``"mfac"``, and is restored as saved (its dtype is not cast to the parameters' dtype).
    """

    def __init__(self, params, lr: float = 1e-4, num_grads: int = 1024, damp: float = 1e-6,
                 weight_decay: float = 0.0, momentum: float = 0.0, *, grad_dtype=None, window_device=None,
                 normalize_by_seen: bool = False, nonfinite: str = "raise"):
        if lr < 0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1); got {momentum}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip'; got {nonfinite!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.num_grads = check_positive_int("num_grads", num_grads)
        self.damp = check_damp(damp)
        self.grad_dtype = _storage_dtype(grad_dtype, torch.float32)
        self.window_device = None if window_device is None else torch.device(window_device)
        self.normalize_by_seen = normalize_by_seen
        self.nonfinite = nonfinite
        self.window: DynamicMFAC | None = None
        self._layout = None  # list of (param, flat index tensor of kept coordinates or None, offset, length)
        self._masks: dict[torch.Tensor, torch.Tensor] = {}

    # -- layout of the flat gradient -------------------------------------------------------------------
    def _params(self):
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _build_layout(self):
        layout, offset = [], 0
        for p in self._params():
            mask = self._masks.get(p)
            idx = None if mask is None else mask.reshape(-1).nonzero().squeeze(1).to(p.device)
            n = p.numel() if idx is None else idx.numel()
            layout.append((p, idx, offset, n))
            offset += n
        if offset == 0:
            raise ValueError(f"{type(self).__name__} has no trainable coordinates (all parameters frozen or fully masked)")
        window = self._make_window(offset, self.window_device or layout[0][0].device)
        self._layout = layout
        self._layout_ids = {id(p) for p, *_ in layout}
        self.window = window

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
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match parameter of shape {tuple(p.shape)}")
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
        g = self._flat_grad()
        if not all_finite(g):
            msg = ("MFAC got NaN/inf gradients; the step was not applied and the gradient window is unchanged. "
                   "Lower the learning rate, enable gradient clipping (max_grad_norm) or use nonfinite='skip'.")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return loss
        direction = self.window.update_mul(g)  # (d,) F^{-1} g
        groups = {id(p): grp for grp in self.param_groups for p in grp["params"]}
        for p, idx, off, n in self._layout:
            if p.grad is None:
                continue
            group = groups[id(p)]
            seg = direction[off : off + n].to(device=p.device, dtype=p.dtype)
            if idx is None:
                upd = seg.view_as(p)
            else:
                upd = torch.zeros_like(p).reshape(-1)
                upd[idx] = seg
                upd = upd.view_as(p)
            if group["momentum"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = upd.clone()
                else:
                    buf.mul_(group["momentum"]).add_(upd)
                upd = buf
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(upd, alpha=-group["lr"])
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
    def state_dict(self):
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        extra = {"num_grads": self.num_grads, "damp": self.damp,
                 "masks": {index[id(p)]: m for p, m in self._masks.items()}}
        if self.window is not None:
            extra["window"] = self.window.state_dict()
            extra["layout"] = [index[id(p)] for p, *_ in self._layout]
        sd["mfac"] = extra
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self._masks = {params[int(i)]: m.to(params[int(i)].device, torch.bool) for i, m in extra.get("masks", {}).items()}
        self._layout = self.window = None
        if "window" in extra:
            self._build_layout()
            index = {id(p): i for i, p in enumerate(params)}
            if [index[id(p)] for p, *_ in self._layout] != list(extra["layout"]):
                raise ValueError("the checkpoint's M-FAC window was built over other parameters than this optimizer's")
            self.window.load_state_dict(extra["window"])
