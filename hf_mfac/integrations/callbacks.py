"""Gradual pruning inside ``transformers.Trainer``: :class:`PruningCallback`, CAP's cyclic learning rate and
oBERT-style knowledge distillation.

```python
callback = PruningCallback("obert", final_sparsity=0.8, start=0, end=600, frequency=100, num_grads=256)
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
callback.attach(trainer)          # metrics through trainer.log (TensorBoard/W&B), optional cyclic LR
trainer.train()                   # resume_from_checkpoint=... keeps the masks
```

What happens each optimizer step (transformers' callback order, DESIGN.md §5):
``on_step_begin`` prunes when the step is on the schedule (fresh gradients from ``dataloader`` or the
Trainer's train dataloader; :func:`hf_mfac.pruning.prune_oneshot` with the current masks) and resets the
optimizer's momentum; ``on_pre_optimizer_step`` zeroes the pruned gradients; ``on_optimizer_step``
re-zeroes the pruned weights. ``on_save`` writes ``hf_mfac_pruning.safetensors`` (masks) and
``hf_mfac_pruning.json`` (schedule position, history) into every ``checkpoint-N`` folder;
``on_train_begin`` reads them back on resume.

Under DDP (``torchrun`` / ``accelerate launch``) a pruning step is one
:func:`hf_mfac.pruning.distributed.prune_oneshot_distributed` over all ranks: each rank computes the gradients of
its own batches (``num_grads`` counts them over all ranks), factorises and scores the Fisher blocks it owns, and
every rank ends with the same masks and weights; an error on one rank stops all ranks with its message.
"""
from __future__ import annotations

import bisect
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..comm import Comm
from ..core.schedules import cubic_sparsity, cyclic_linear_lr
from ..pruning import DEFAULT_EXCLUDE, DEFAULT_TYPES, Layout, find_prunable, make_pruner, prune_oneshot
from ..pruning.distributed import prune_oneshot_distributed
from ..pruning.oneshot import masks_from_zeros

__all__ = ["PruningCallback", "PruningArguments", "cyclic_linear_lambda", "cyclic_linear_scheduler",
           "distillation_loss", "DistillationMixin", "DistillationTrainer", "MASKS_NAME", "STATE_NAME"]

logger = logging.getLogger("hf_mfac")

MASKS_NAME = "hf_mfac_pruning.safetensors"
STATE_NAME = "hf_mfac_pruning.json"


# -- CAP's cyclic linear learning rate ---------------------------------------------------------------------
def cyclic_linear_lambda(prune_steps: Sequence[int], max_steps: int,
                         lr_min_ratio: float = 0.02) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: CAP's cyclic linear schedule (seed 004 eq. 8) restarted at every pruning
    step: from 1 right after a pruning step down to ``lr_min_ratio`` just before the next one (after the last,
    down to ``lr_min_ratio`` at ``max_steps``); 1 before the first."""
    steps = sorted(set(int(s) for s in prune_steps))
    ends = steps[1:] + [max(int(max_steps), (steps[-1] + 1) if steps else 1)]

    def factor(t: int) -> float:
        i = bisect.bisect_right(steps, t) - 1
        if i < 0:
            return 1.0
        period = max(1, ends[i] - steps[i])
        return cyclic_linear_lr(min(t - steps[i], period), lr_max=1.0, lr_min=lr_min_ratio, period=period) \
            if t - steps[i] < period else lr_min_ratio
    return factor


def cyclic_linear_scheduler(optimizer, prune_steps: Sequence[int], max_steps: int, lr_min_ratio: float = 0.02,
                            last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`cyclic_linear_lambda`, positioned at ``last_step`` (for resumed runs)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, cyclic_linear_lambda(prune_steps, max_steps, lr_min_ratio))
    if last_step:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.last_epoch = last_step - 1
            sched.step()
    return sched


# -- knowledge distillation ------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` averaged over all rows (the last dimension is the class axis)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    return nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True) \
        * temperature**2


_LOGIT_KEYS = ("logits", "start_logits", "end_logits")


class DistillationMixin:
    """Trainer mixin: ``loss = (1 - hardness) * task_loss + hardness * KD`` from a frozen dense ``teacher_model``,
    KD averaged over the logits the outputs share (``logits``; ``start_logits``/``end_logits`` for QA), as in the
    oBERT recipe (distillation from the dense model during gradual pruning). ``hardness=0`` or no teacher:
    the plain Trainer loss."""

    def __init__(self, *args, teacher_model: nn.Module | None = None, distill_hardness: float = 1.0,
                 distill_temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= distill_hardness <= 1.0:
            raise ValueError(f"distill_hardness must lie in [0, 1]; got {distill_hardness}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0; got {distill_temperature}")
        self.teacher_model = teacher_model
        self.distill_hardness = float(distill_hardness)
        self.distill_temperature = float(distill_temperature)
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.teacher_model is not None and self.distill_hardness > 0 and model.training:
            with torch.no_grad():
                teacher_out = self.teacher_model(**inputs)
            keys = [k for k in _LOGIT_KEYS if _get(outputs, k) is not None and _get(teacher_out, k) is not None]
            if not keys:
                raise ValueError("distillation needs `logits` (or `start_logits`/`end_logits`) in both outputs")
            kd = sum(distillation_loss(_get(outputs, k), _get(teacher_out, k), self.distill_temperature)
                     for k in keys) / len(keys)
            loss = (1.0 - self.distill_hardness) * loss + self.distill_hardness * kd
        return (loss, outputs) if return_outputs else loss


def _get(out, key):
    return out.get(key) if isinstance(out, dict) else getattr(out, key, None)


class DistillationTrainer(DistillationMixin, Trainer):
    """``Trainer`` with :class:`DistillationMixin` (``teacher_model=``, ``distill_hardness=``,
    ``distill_temperature=``).
    For M-FAC: ``class T(DistillationMixin, MFACTrainer): pass``."""


# -- the callback ----------------------------------------------------------------------------------------
def _unwrap_optimizer(opt):
    while hasattr(opt, "optimizer") and isinstance(getattr(opt, "optimizer"), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class PruningCallback(TrainerCallback):
    """Gradual pruning (cubic schedule, oBERT/WoodFisher recipe) or a sparsity sweep (CAP, seed 004 §3.2).

    Args:
        method: "magnitude", "obert", "mfac", "cap" or a :class:`hf_mfac.pruning.Pruner`; None only enforces
            the given ``masks`` (sparse fine-tuning).
        final_sparsity, initial_sparsity: cubic schedule ``s_t = s_f + (s_i - s_f)(1 - (t - start)/(end - start))^3``
            (:func:`hf_mfac.core.schedules.cubic_sparsity`), pruning at ``start``, ``start + frequency``, ...,
            ``end``. In ``unit="epochs"`` these are epochs (converted with the Trainer's steps per epoch);
            ``end`` defaults to 75% of training.
        sparsities: instead of the cubic schedule, a sweep: prune to ``sparsities[i]`` at ``start + i*frequency``;
            with ``save_at_targets=True`` a checkpoint is saved just before each next pruning step and at the end,
            i.e. one fine-tuned checkpoint per target (its ``hf_mfac_pruning.json`` records the sparsity).
        pattern: None, "N:M" (pruned once at ``start``, ``final_sparsity`` is implied) or "G-block".
        dataloader: calibration batches for the gradients (with labels); default: the Trainer's train dataloader.
        num_grads, block_size, damp, recompute, scope, woodtaylor, fisher_batch_size, include, exclude, types:
            as in :func:`hf_mfac.pruning.prune_oneshot`.
        reset_momentum: after a pruning step, forget momentum (``hf_mfac.MFAC``: ``set_masks`` restarts the window
            and ``reset_momentum()``; torch optimizers: ``momentum_buffer``/``exp_avg`` zeroed). State entries of
            pruned coordinates are always zeroed.
        cyclic_lr: replace the Trainer's scheduler by CAP's cyclic linear one restarting at each pruning step
            (needs :meth:`attach`), decaying to ``lr_min_ratio`` times the learning rate.
        masks: initial masks ``{name: bool}`` (True = kept).
        resume_from: checkpoint folder holding the masks, if not ``checkpoint-<global_step>`` in ``output_dir``
            or ``args.resume_from_checkpoint``.

    Under DDP the pruning steps run distributed (see the module docstring); ``num_grads`` is then the total
    number of gradients over all ranks.

    Metrics (``sparsity``, ``pruning_target``, ``pruning_loss_increase``, ``pruning_time``,
    ``pruning_grad_share``) go through ``trainer.log`` after :meth:`attach` (so TensorBoard/W&B get them), else
    straight into ``state.log_history``. The current masks are in :attr:`masks`.
    """

    def __init__(self, method: str | None = "obert", final_sparsity: float | None = None, *,
                 initial_sparsity: float = 0.0, start: float = 0, end: float | None = None, frequency: float = 1,
                 unit: str = "steps", sparsities: Sequence[float] | None = None, pattern=None, scope: str = "global",
                 num_grads: int | None = None, block_size: int | None = None, damp: float | None = None,
                 recompute: int = 1, woodtaylor: bool = False, dataloader=None, fisher_batch_size: int | None = None,
                 include=None, exclude=DEFAULT_EXCLUDE, types=DEFAULT_TYPES, reset_momentum: bool = True,
                 cyclic_lr: bool = False, lr_min_ratio: float = 0.02, save_at_targets: bool = False,
                 masks: dict | None = None, resume_from: str | None = None, progress: bool = False, trainer=None):
        if unit not in ("steps", "epochs"):
            raise ValueError(f"unit must be 'steps' or 'epochs'; got {unit!r}")
        if frequency <= 0:
            raise ValueError(f"frequency must be > 0; got {frequency}")
        self.pruner = None if method is None else make_pruner(
            method, pattern=pattern, scope=scope, block_size=block_size, damp=damp, woodtaylor=woodtaylor)
        if self.pruner is not None and self.pruner.pattern.kind != "nm" and final_sparsity is None and not sparsities:
            raise ValueError("give final_sparsity (cubic schedule) or sparsities (sweep)")
        if sparsities:
            if any(b <= a for a, b in zip(sparsities, sparsities[1:])):
                raise ValueError(f"sparsities must increase strictly; got {list(sparsities)}")
        for s in [final_sparsity, initial_sparsity, *(sparsities or [])]:
            if s is not None and not 0.0 <= s < 1.0:
                raise ValueError(f"sparsities must lie in [0, 1); got {s}")
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.start, self.end, self.frequency, self.unit = start, end, frequency, unit
        self.sparsities = list(sparsities) if sparsities else None
        self.num_grads, self.recompute, self.fisher_batch_size = num_grads, recompute, fisher_batch_size
        self.dataloader = dataloader
        self.include, self.exclude, self.types = include, exclude, types
        self.reset_momentum, self.cyclic_lr, self.lr_min_ratio = reset_momentum, cyclic_lr, lr_min_ratio
        self.save_at_targets, self.resume_from, self.progress = save_at_targets, resume_from, progress
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self.schedule: list[tuple[int, float | None]] = []
        self.last_pruned_step = -1
        self.history: list[dict] = []
        self.targets: dict[str, nn.Parameter] = {}
        self.trainer = None
        self._train_dataloader = None
        self._warned_log = False
        if trainer is not None:
            self.attach(trainer)

    # -- wiring ------------------------------------------------------------------------------------------
    def attach(self, trainer) -> "PruningCallback":
        """Keep a reference to ``trainer`` (for ``trainer.log`` and the cyclic LR) and add the callback to it
        if it is not there yet. Returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _steps(self, x, spe: float) -> int:
        return int(round(x * spe)) if self.unit == "epochs" else int(x)

    def _build_schedule(self, state) -> list[tuple[int, float | None]]:
        if self.pruner is None:
            return []
        spe = state.max_steps / max(state.num_train_epochs, 1) if self.unit == "epochs" else 1.0
        start, freq = self._steps(self.start, spe), max(1, self._steps(self.frequency, spe))
        if self.pruner.pattern.kind == "nm":
            return [(start, None)]
        if self.sparsities:
            return [(start + i * freq, s) for i, s in enumerate(self.sparsities)]
        end = self._steps(self.end, spe) if self.end is not None else int(0.75 * state.max_steps)
        if end <= start:
            return [(start, self.final_sparsity)]
        steps = list(range(start, end, freq)) + [end]
        out, prev = [], 0.0
        for t in steps:
            s = cubic_sparsity(t, start_step=start, end_step=end, initial_sparsity=self.initial_sparsity,
                               final_sparsity=self.final_sparsity)
            if s > prev:
                out.append((t, s))
                prev = s
        return out

    # -- events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._train_dataloader = train_dataloader
        if not self.targets:
            self.targets = find_prunable(model, include=self.include, exclude=self.exclude, types=self.types)
            if self.pruner is not None:
                self.pruner.check(Layout(self.targets, pad=self.pruner.pad))
        unknown = set(self.masks) - set(self.targets)
        if unknown:
            raise ValueError(f"masks given for tensors that are not pruning targets: {sorted(unknown)[:5]}")
        self.schedule = self._build_schedule(state)
        if state.global_step > 0:
            self._restore(args, state)
        if self.masks:
            self._enforce(optimizer, reset=False)
        if self.cyclic_lr:
            if self.trainer is None:
                raise ValueError("cyclic_lr=True needs the trainer: call callback.attach(trainer) before train()")
            self.trainer.lr_scheduler = cyclic_linear_scheduler(
                self.trainer.optimizer, [t for t, _ in self.schedule], state.max_steps, self.lr_min_ratio,
                last_step=state.global_step)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        due = [(t, s) for t, s in self.schedule if self.last_pruned_step < t <= state.global_step]
        if not due:
            return
        t, target = due[-1]
        if target is not None and target <= self.current_sparsity():
            logger.info("PruningCallback: step %d: masks already at %.4f >= target %.4f, nothing to prune", t,
                        self.current_sparsity(), target)
        else:
            self._prune(model, optimizer, train_dataloader or self._train_dataloader, target, state)
        self.last_pruned_step = t

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, mask in self.masks.items():
            g = self.targets[name].grad
            if g is not None:
                g.mul_(mask)

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.targets[name].mul_(mask)

    def on_step_end(self, args, state, control, **kwargs):
        if self.save_at_targets and self.last_pruned_step >= 0:
            upcoming = [t for t, _ in self.schedule if t > self.last_pruned_step]
            if (upcoming and state.global_step == upcoming[0]) or state.global_step >= state.max_steps:
                control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("PruningCallback: checkpoint folder %s not found; masks not saved", folder)
            return
        self.save_state(folder)

    # -- pruning -----------------------------------------------------------------------------------------
    def _prune(self, model, optimizer, train_dataloader, target, state) -> None:
        data = self.dataloader
        if data is None:
            if train_dataloader is None:
                raise ValueError("PruningCallback needs gradients: pass dataloader=... or train with a train dataset")
            data = getattr(train_dataloader, "base_dataloader", train_dataloader)  # leave accelerate's state alone
        kwargs = dict(method=self.pruner, sparsity=target, num_grads=self.num_grads, recompute=self.recompute,
                      targets=self.targets, masks=self.masks or None, fisher_batch_size=self.fisher_batch_size,
                      progress=self.progress)
        if Comm().distributed:
            # Under DDP every rank computes its share of the gradients (the Trainer's sharded train batches, or
            # batches r, r + N, ... of a given dataloader), owns its share of the Fisher blocks and ends with the
            # same masks and weights (hf_mfac.pruning.distributed); num_grads is the total over the ranks.
            masks, report = prune_oneshot_distributed(model, data, **kwargs)
        else:
            masks, report = prune_oneshot(model, data, **kwargs)
        self.masks = masks
        self._enforce(optimizer, reset=True)
        rec = {"step": state.global_step, "target": report.target_sparsity, "sparsity": report.sparsity,
               "loss_increase": report.loss_increase, "time": report.time_total, "grad_share": report.grad_share,
               "num_grads": report.num_grads}
        self.history.append(rec)
        logs = {"sparsity": report.sparsity, "pruning_target": report.target_sparsity,
                "pruning_time": report.time_total, "pruning_grad_share": report.grad_share}
        if report.loss_increase is not None:
            logs["pruning_loss_increase"] = report.loss_increase
        self._log(logs, state)

    def _enforce(self, optimizer, reset: bool) -> None:
        """Zero pruned weights; tell the optimizer (masks for hf_mfac.MFAC, state of pruned coordinates)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                p = self.targets[name]
                self.masks[name] = mask = mask.to(device=p.device, dtype=torch.bool)
                p.mul_(mask)
        opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
        if opt is None:
            return
        from ..optim import MFAC

        if isinstance(opt, MFAC):
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            new = {self.targets[n]: m for n, m in self.masks.items() if id(self.targets[n]) in owned}
            current = opt.masks
            same = len(current) == len(new) and all(p in current and torch.equal(current[p], m) for p, m in new.items())
            if not same:  # on resume the window and its masks come back with the optimizer state
                opt.set_masks(new)
            if reset and self.reset_momentum:
                opt.reset_momentum()
            return
        for name, mask in self.masks.items():
            st = opt.state.get(self.targets[name])
            if not st:
                continue
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.shape == mask.shape:
                    if reset and self.reset_momentum and key in ("momentum_buffer", "exp_avg"):
                        val.zero_()
                    else:
                        val.mul_(mask)

    def _log(self, logs: dict, state) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(logs))
            return
        if not self._warned_log:
            logger.warning("PruningCallback is not attached to the trainer: its metrics go to state.log_history only, "
                           "not to TensorBoard/W&B. Call callback.attach(trainer).")
            self._warned_log = True
        state.log_history.append({**logs, "step": state.global_step})

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": 1, "last_pruned_step": self.last_pruned_step, "history": self.history,
                "schedule": [[t, s] for t, s in self.schedule],
                "sparsity": self.current_sparsity(), "pruner": None if self.pruner is None else self.pruner.config()}

    def current_sparsity(self) -> float:
        if not self.masks:
            return 0.0
        total = sum(p.numel() for p in self.targets.values()) or 1
        return float(sum((~m).sum().item() for m in self.masks.values())) / total

    def save_state(self, folder: str) -> None:
        """Write the masks (safetensors, bool) and the callback state (json) into ``folder``."""
        from safetensors.torch import save_file

        save_file({n: m.detach().cpu().contiguous() for n, m in self.masks.items()}, os.path.join(folder, MASKS_NAME))
        with open(os.path.join(folder, STATE_NAME), "w") as f:
            json.dump(self.state_dict(), f, indent=2)

    def load_state(self, folder: str) -> None:
        """Read what :meth:`save_state` wrote (masks are checked against the targets' shapes)."""
        from safetensors.torch import load_file

        masks = load_file(os.path.join(folder, MASKS_NAME))
        for n, m in masks.items():
            if n not in self.targets or tuple(m.shape) != tuple(self.targets[n].shape):
                raise ValueError(f"checkpoint mask {n} {tuple(m.shape)} does not match this model's pruning targets")
        self.masks = {n: m.bool() for n, m in masks.items()}
        path = os.path.join(folder, STATE_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                st = json.load(f)
            self.last_pruned_step = int(st.get("last_pruned_step", -1))
            self.history = list(st.get("history", []))

    def _restore(self, args, state) -> None:
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        for c in candidates:
            if isinstance(c, str) and os.path.isfile(os.path.join(c, MASKS_NAME)):
                self.load_state(c)
                logger.info("PruningCallback: restored masks from %s (sparsity %.4f)", c, self.current_sparsity())
                return
        if any(t < state.global_step for t, _ in self.schedule):
            self.masks = masks_from_zeros(self.targets)
            self.last_pruned_step = max(t for t, _ in self.schedule if t < state.global_step)
            logger.warning("PruningCallback: resuming at step %d without %s; masks rebuilt from the zero weights "
                           "(pass resume_from=<checkpoint folder> to restore them exactly)", state.global_step,
                           MASKS_NAME)


# -- command-line arguments ------------------------------------------------------------------------------
@dataclass
class PruningArguments:
    """Pruning flags for ``HfArgumentParser`` scripts (run_qa.py, ``hf-mfac prune``): ``--prune_method obert
    --prune_sparsity 0.8 ...``. :meth:`callback` builds the :class:`PruningCallback` (gradual mode),
    :meth:`oneshot_kwargs` the keyword arguments of :func:`hf_mfac.pruning.prune_oneshot`."""

    prune_method: str | None = field(default=None, metadata={
        "help": "Pruning method: magnitude, obert (WoodFisher/oBERT), mfac (static M-FAC) or cap. None: no pruning.",
        "choices": ["magnitude", "obert", "mfac", "cap"]})
    prune_mode: str = field(default="gradual", metadata={
        "help": "gradual: cubic schedule during training (PruningCallback); oneshot: prune before training "
                "(then sparse fine-tuning with fixed masks, if training).", "choices": ["gradual", "oneshot"]})
    prune_sparsity: float | None = field(default=None, metadata={
        "help": "Final sparsity of the target weights (fraction in [0, 1)); implied by an N:M pattern."})
    prune_initial_sparsity: float = field(default=0.0, metadata={"help": "Gradual: sparsity at --prune_start."})
    prune_sparsities: list[float] | None = field(default=None, metadata={
        "help": "Sparsity sweep: prune to each of these in turn (one checkpoint per target with "
                "--prune_save_at_targets) instead of the cubic schedule."})
    prune_start: float = field(default=0, metadata={"help": "Gradual: first pruning step (or epoch)."})
    prune_end: float | None = field(default=None, metadata={
        "help": "Gradual: last pruning step (or epoch); default 75%% of training."})
    prune_frequency: float = field(default=1, metadata={"help": "Gradual: steps (or epochs) between pruning steps."})
    prune_unit: str = field(default="steps", metadata={
        "help": "Unit of start/end/frequency.", "choices": ["steps", "epochs"]})
    prune_pattern: str | None = field(default=None, metadata={
        "help": "Sparsity pattern: unstructured (default), N:M such as 2:4, or G-block such as 4-block."})
    prune_scope: str = field(default="global", metadata={
        "help": "global (one threshold) or layer (uniform sparsity per layer).", "choices": ["global", "layer"]})
    prune_num_grads: int | None = field(default=None, metadata={"help": "Gradients m per Fisher (method default)."})
    prune_block_size: int | None = field(default=None, metadata={"help": "Fisher block size B (method default)."})
    prune_damp: float | None = field(default=None, metadata={"help": "Fisher dampening λ (method default)."})
    prune_recompute: int = field(default=1, metadata={
        "help": "Fisher recomputations per pruning step (each prunes the same fraction of what remains)."})
    prune_fisher_batch_size: int | None = field(default=None, metadata={
        "help": "Samples per Fisher gradient (default: one training batch; 1 = per-sample gradients)."})
    prune_woodtaylor: bool = field(default=False, metadata={"help": "WoodTaylor (first-order term), obert/mfac."})
    prune_include: list[str] | None = field(default=None, metadata={
        "help": "Regular expressions of module names to prune (default: every Linear/Conv2d)."})
    prune_exclude: list[str] | None = field(default=None, metadata={
        "help": "Regular expressions of module names to keep dense (default: embeddings, pooler, heads)."})
    prune_cyclic_lr: bool = field(default=False, metadata={
        "help": "CAP's cyclic linear learning rate restarting at every pruning step."})
    prune_lr_min_ratio: float = field(default=0.02, metadata={"help": "Cyclic LR: lowest lr / lr."})
    prune_save_at_targets: bool = field(default=False, metadata={
        "help": "Save a checkpoint at the end of each sparsity level (sweeps)."})
    distill_teacher: str | None = field(default=None, metadata={
        "help": "Knowledge distillation from a dense teacher: a model folder, or 'self' for a copy of the starting "
                "model (oBERT recipe)."})
    distill_hardness: float = field(default=1.0, metadata={"help": "Weight of the distillation loss."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Distillation temperature."})

    def _common(self) -> dict:
        kw = dict(pattern=self.prune_pattern, scope=self.prune_scope, num_grads=self.prune_num_grads,
                  block_size=self.prune_block_size, damp=self.prune_damp, recompute=self.prune_recompute,
                  woodtaylor=self.prune_woodtaylor, fisher_batch_size=self.prune_fisher_batch_size,
                  include=self.prune_include)
        if self.prune_exclude is not None:
            kw["exclude"] = self.prune_exclude
        return kw

    def teacher(self, model: nn.Module, model_cls=None) -> nn.Module | None:
        """The distillation teacher ``--distill_teacher`` asks for: None, a copy of ``model`` for "self" (the dense
        starting model, oBERT recipe), or ``model_cls.from_pretrained(path)`` (default: ``model``'s class)."""
        if not self.distill_teacher:
            return None
        if self.distill_teacher == "self":
            return copy.deepcopy(model)
        return (model_cls or type(model)).from_pretrained(self.distill_teacher)

    def save_sparse(self, trainer, callback: PruningCallback | None, masks: dict | None) -> dict | None:
        """After training: the final masks (the callback's, else the one-shot ``masks``), saved with
        :func:`~hf_mfac.integrations.save_sparse_pretrained` into ``trainer.args.output_dir`` by the main process.
        Returns the masks (None when nothing was pruned), e.g. for the model card."""
        if callback is not None and callback.masks:
            masks = callback.masks
        if masks and trainer.is_world_process_zero() and trainer.args.output_dir:
            from .sparse_checkpoint import save_sparse_pretrained

            save_sparse_pretrained(trainer.model, trainer.args.output_dir, masks, method=self.prune_method,
                                   pattern=self.prune_pattern)
        return masks or None

    def oneshot_kwargs(self) -> dict:
        """Keyword arguments for :func:`hf_mfac.pruning.prune_oneshot`."""
        return dict(method=self.prune_method, sparsity=self.prune_sparsity, **self._common())

    def callback(self, dataloader=None, masks=None) -> PruningCallback | None:
        """The :class:`PruningCallback` for these flags (None without a method or masks). In oneshot mode, pass the
        masks it produced: the callback then only keeps them during fine-tuning."""
        if self.prune_mode == "oneshot" or self.prune_method is None:
            return PruningCallback(None, masks=masks) if masks else None
        return PruningCallback(
            self.prune_method, self.prune_sparsity, initial_sparsity=self.prune_initial_sparsity,
            sparsities=self.prune_sparsities, start=self.prune_start, end=self.prune_end,
            frequency=self.prune_frequency, unit=self.prune_unit, dataloader=dataloader,
            cyclic_lr=self.prune_cyclic_lr, lr_min_ratio=self.prune_lr_min_ratio,
            save_at_targets=self.prune_save_at_targets, masks=masks, **self._common())

    def setup(self, trainer, has_train_data: bool) -> tuple[PruningCallback | None, dict | None]:
        """What the example scripts do with these flags: in oneshot mode prune ``trainer.model`` now (gradients
        from the trainer's train dataloader, report logged through ``trainer.log``; under DDP with
        :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed`, so every process gets the same masks);
        then build the callback (gradual pruning, or keeping the one-shot masks during fine-tuning) and attach it
        to ``trainer``.
        Returns ``(callback or None, one-shot masks or None)``."""
        masks = None
        if self.prune_method and self.prune_mode == "oneshot":
            if not has_train_data and self.prune_method != "magnitude":
                raise ValueError("one-shot second-order pruning needs training data (--train_file / --do_train) "
                                 "for its gradients")
            loader = trainer.get_train_dataloader() if has_train_data else None
            # under DDP the loader is this process's shard of the train batches: prune over all processes
            prune = prune_oneshot_distributed if Comm().distributed else prune_oneshot
            masks, report = prune(trainer.model, loader, **self.oneshot_kwargs())
            logger.info("one-shot pruning:\n%s", report.to_markdown())
            trainer.log({"sparsity": report.sparsity, **({"pruning_loss_increase": report.loss_increase}
                                                         if report.loss_increase is not None else {})})
        callback = self.callback(masks=masks)
        if callback is not None:
            callback.attach(trainer)
        return callback, masks
