"""Gradual pruning inside ``transformers.Trainer``: :class:`PruningCallback`.

```python
callback = PruningCallback("obert", final_sparsity=0.8, start=0, end=600, frequency=100,
                           num_grads=256)
# or: PruningCallback(config=GradualPruningConfig(...), num_grads=256)  (keywords override it)
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
callback.attach(trainer)  # metrics through trainer.log (TensorBoard/W&B), optional cyclic LR
trainer.train()           # resume_from_checkpoint=... keeps the masks
```

What happens each optimizer step (transformers' callback order):
``on_step_begin`` prunes when the step is on the schedule (fresh gradients from ``dataloader`` or
the Trainer's train dataloader; :func:`hf_mfac.pruning.prune_oneshot` with the current masks) and
resets the optimizer's momentum; ``on_pre_optimizer_step`` zeroes the pruned gradients;
``on_optimizer_step`` re-zeroes the pruned weights. ``on_save`` writes
``hf_mfac_pruning.safetensors`` (masks) and ``hf_mfac_pruning.json`` (schedule position, history)
into every ``checkpoint-N`` folder; ``on_train_begin`` reads them back on resume.

A pruning step logs (``"hf_mfac"`` logger, at the Trainer's ``--log_level``) when it starts and what
it did, and shows a progress bar over the gradients on the main process unless ``--disable_tqdm``.

Under DDP (``torchrun`` / ``accelerate launch``) a pruning step is one
:func:`hf_mfac.pruning.distributed.prune_oneshot_distributed` over all ranks: each rank computes the
gradients of its own batches (``num_grads`` counts them over all ranks), factorises and scores the
Fisher blocks it owns, and every rank ends with the same masks and weights; an error on one rank
stops all ranks with its message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...core.schedules import cubic_sparsity, cyclic_linear_scheduler
from ...optim import MFAC, unwrap_optimizer
from ...pruning import DEFAULT_TYPES, GradualPruningConfig, Layout, prune_oneshot
from ...pruning.driver import masks_from_zeros, restore_on_error
from ...pruning.recipes import lr_restarts
from ..log_level import follow_log_level

__all__ = ["PruningCallback", "CHECKPOINT_MASKS_NAME", "CHECKPOINT_STATE_NAME"]

logger = logging.getLogger("hf_mfac")

CHECKPOINT_MASKS_NAME = "hf_mfac_pruning.safetensors"
CHECKPOINT_STATE_NAME = "hf_mfac_pruning.json"
# (the sparse checkpoints' own masks file is hf_mfac.integrations.checkpoint.MASKS_NAME)

_UNSET = object()


class PruningCallback(TrainerCallback):
    """Gradual pruning (cubic schedule, oBERT/WoodFisher recipe) or a sparsity sweep ([CAP, §3.2]).

    The settings are a :class:`~hf_mfac.pruning.GradualPruningConfig` (``config=``), whose fields
    are also accepted as keywords, overriding it: ``PruningCallback(config=cfg, num_grads=64)``. The
    two positional arguments are the most used ones:

    Args:
        method: "magnitude", "obert", "mfac", "cap" or a :class:`hf_mfac.pruning.Pruner`; None only
            enforces the given ``masks`` (sparse fine-tuning). Default: the config's ("obert").
        final_sparsity: the config's ``sparsity``, reached by the cubic schedule
            ``s_t = s_f + (s_i - s_f)(1 - (t - start)/(end - start))^3`` from ``initial_sparsity``
            (:func:`hf_mfac.core.schedules.cubic_sparsity`), pruning at ``start``, ``start +
            frequency``, ..., ``end``. In ``unit="epochs"`` these are epochs (converted with the
            Trainer's steps per epoch); ``end`` defaults to 75% of training. With ``sparsities``
            instead: a sweep, pruning to ``sparsities[i]`` at ``start + i*frequency``; with
            ``save_at_targets=True`` a checkpoint is saved just before each next pruning step and at
            the end (its ``hf_mfac_pruning.json`` records the sparsity). An N:M ``pattern`` is
            pruned once at ``start``.
        config: the other settings (see :class:`~hf_mfac.pruning.GradualPruningConfig` for each);
            ``**settings`` override them by field name.
        dataloader: calibration batches for the gradients (with labels); default: the Trainer's
            train dataloader.
        types: module types to prune (with the config's ``include``/``exclude``).
        masks: initial masks ``{name: bool}`` (True = kept).
        resume_from: checkpoint folder holding the masks, if not ``checkpoint-<global_step>`` in
            ``output_dir`` or ``args.resume_from_checkpoint``.
        progress: progress bar over the gradients of a pruning step; None: on the main process
            unless ``args.disable_tqdm``.

    With the config's ``recipe`` (``PruningCallback(recipe="obert", final_sparsity=0.9)``), the
    recipe's pruning steps for the run's ``max_steps`` (:mod:`hf_mfac.pruning.recipes`); with
    ``cyclic_lr`` (a recipe sets it) the learning rate restarts at its peak at each pruning step and
    decays linearly to ``lr_min_ratio`` before the next (and, for the oBERT and magnitude recipes,
    over the dense steps before the first: :func:`~hf_mfac.pruning.recipes.lr_restarts`). It needs
    :meth:`attach`.

    Under DDP the pruning steps run distributed (see the module docstring); ``num_grads`` is then
    the total number of gradients over all ranks.

    Metrics (``sparsity``, ``pruning_target``, ``pruning_saliency`` (the OBS saliency of the step, a
    relative score), ``pruning_time``,
    ``pruning_grad_share``) go through ``trainer.log`` after :meth:`attach` (so TensorBoard/W&B get
    them), else straight into ``state.log_history``. The current masks are in :attr:`masks`; the
    settings in :attr:`config` (readable as attributes too: ``callback.num_grads``).
    """

    def __init__(self, method=_UNSET, final_sparsity: float | None = None, *,
                 config: GradualPruningConfig | None = None, dataloader=None, types=DEFAULT_TYPES,
                 masks: dict | None = None, resume_from: str | None = None,
                 progress: bool | None = None,
                 trainer=None, **settings):
        overrides = dict(settings)
        if method is not _UNSET:
            overrides["method"] = method
        if final_sparsity is not None:
            overrides["sparsity"] = final_sparsity
        self.config = (config or GradualPruningConfig()).replace(**overrides)
        c = self.config
        self.pruner = None if c.method is None else c.pruner()
        if (
            self.pruner is not None
            and self.pruner.pattern.kind != "nm"
            and c.sparsity is None
            and not c.sparsities
        ):
            raise ValueError("give final_sparsity (cubic schedule) or sparsities (sweep)")
        self.dataloader, self.types, self.resume_from, self.progress = (
            dataloader,
            types,
            resume_from,
            progress,
        )
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self.schedule: list[tuple[int, float | None]] = []
        self.last_pruned_step = -1
        self.history: list[dict] = []
        self.targets: dict[str, nn.Parameter] = {}
        self.trainer = None
        self._train_dataloader = None
        self._show_progress = bool(progress)
        self._warned_log = False
        if trainer is not None:
            self.attach(trainer)

    # the settings read as attributes: callback.num_grads, callback.final_sparsity
    def __getattr__(self, name):
        config = self.__dict__.get("config")
        if config is not None:
            if name == "final_sparsity":
                return config.sparsity
            if name in {f.name for f in dataclasses.fields(config)}:
                return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- wiring
    # ------------------------------------------------------------------------------------------
    def attach(self, trainer) -> "PruningCallback":
        """Keep a reference to ``trainer`` (for ``trainer.log`` and the cyclic LR) and add the
        callback to it if it is not there yet. Returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _steps(self, x, spe: float) -> int:
        return int(round(x * spe)) if self.config.unit == "epochs" else int(x)

    def _build_schedule(self, state) -> list[tuple[int, float | None]]:
        c = self.config
        if self.pruner is None:
            return []
        spe = state.max_steps / max(state.num_train_epochs, 1) if c.unit == "epochs" else 1.0
        if c.recipe is not None:  # the recipe's pruning steps for this run's length, in steps
            c = self.config = c.for_run(state.max_steps, spe)
            spe = 1.0
        start, freq = self._steps(c.start, spe), max(1, self._steps(c.frequency, spe))
        if self.pruner.pattern.kind == "nm":
            return [(start, None)]
        if c.sparsities:
            return [(start + i * freq, s) for i, s in enumerate(c.sparsities)]
        end = self._steps(c.end, spe) if c.end is not None else int(0.75 * state.max_steps)
        if end <= start:
            return [(start, c.sparsity)]
        out, prev = [], 0.0
        for t in [*range(start, end, freq), end]:
            s = cubic_sparsity(
                t,
                start_step=start,
                end_step=end,
                initial_sparsity=c.initial_sparsity,
                final_sparsity=c.sparsity,
            )
            if s > prev:
                out.append((t, s))
                prev = s
        return out

    # -- events
    # ------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        follow_log_level(args)

    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        follow_log_level(args)
        self._show_progress = (
            self.progress
            if self.progress is not None
            else (state.is_world_process_zero and not args.disable_tqdm)
        )
        self._train_dataloader = train_dataloader
        if not self.targets:
            self.targets = self.config.find_targets(model, self.types)
            if self.pruner is not None:
                self.pruner.check(Layout(self.targets, pad=self.pruner.pad))
        unknown = set(self.masks) - set(self.targets)
        if unknown:
            raise ValueError(
                f"masks given for tensors that are not pruning targets: {sorted(unknown)[:5]}"
            )
        self.schedule = self._build_schedule(state)
        if self.schedule:
            logger.info(
                "PruningCallback: %s, %d pruning step(s) at steps %s to sparsities %s",
                self.pruner.name,
                len(self.schedule),
                [t for t, _ in self.schedule],
                [None if s is None else round(s, 4) for _, s in self.schedule],
            )
        if state.global_step > 0:
            self._restore(args, state)
        if self.masks:
            self._enforce(optimizer, reset=False)
        if self.config.cyclic_lr:
            if self.trainer is None:
                raise ValueError(
                    "cyclic_lr=True needs the trainer: call callback.attach(trainer) before train()"
                )
            self.trainer.lr_scheduler = cyclic_linear_scheduler(
                self.trainer.optimizer,
                lr_restarts(self.config.recipe, [t for t, _ in self.schedule]),
                state.max_steps,
                self.config.lr_min_ratio,
                last_step=state.global_step,
            )

    def on_step_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        due = [(t, s) for t, s in self.schedule if self.last_pruned_step < t <= state.global_step]
        if not due:
            return
        t, target = due[-1]
        if target is not None and target <= self.current_sparsity():
            logger.info(
                "PruningCallback: step %d: masks already at %.4f >= target %.4f, nothing to prune",
                t,
                self.current_sparsity(),
                target,
            )
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
        if self.config.save_at_targets and self.last_pruned_step >= 0:
            upcoming = [t for t, _ in self.schedule if t > self.last_pruned_step]
            if (
                upcoming and state.global_step == upcoming[0]
            ) or state.global_step >= state.max_steps:
                control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning(
                "PruningCallback: checkpoint folder %s not found; masks not saved", folder
            )
            return
        self.save_state(folder)

    # -- pruning
    # -----------------------------------------------------------------------------------------
    def _prune(self, model, optimizer, train_dataloader, target, state) -> None:
        c = self.config
        data = self.dataloader
        if data is None:
            if train_dataloader is None:
                raise ValueError(
                    "PruningCallback needs gradients: pass dataloader=... or train "
                    "with a train dataset"
                )
            # leave accelerate's state alone
            data = getattr(train_dataloader, "base_dataloader", train_dataloader)
        step = c.with_pruner(self.pruner).replace(sparsity=target, sparsities=None)  # this step
        grads = (
            f", {c.num_grads or self.pruner.default_num_grads} gradients"
            if self.pruner.uses_fisher
            else ""
        )
        logger.info(
            "PruningCallback: step %d: pruning with %s from sparsity %.4f to %s%s%s",
            state.global_step,
            self.pruner.name,
            self.current_sparsity(),
            "the pattern" if target is None else f"{target:.4f}",
            grads,
            f", {c.recompute} recomputations" if c.recompute > 1 else "",
        )
        previous = self.masks
        # a failure up to the optimizer's masks leaves the model as it was
        with restore_on_error(self.targets):
            # Under DDP this is prune_oneshot_distributed: every rank computes its share of the
            # gradients (the Trainer's sharded train batches, or batches r, r + N, ... of a given
            # dataloader), owns its share of the Fisher blocks and ends with the same masks and
            # weights; num_grads is the total over the ranks.
            masks, report = prune_oneshot(
                model,
                data,
                step,
                targets=self.targets,
                masks=self.masks or None,
                progress=self._show_progress,
            )
            try:
                self.masks = masks
                self._enforce(optimizer, reset=True)
            except BaseException:
                self.masks = previous
                raise
        rec = {
            "step": state.global_step,
            "target": report.target_sparsity,
            "sparsity": report.sparsity,
            "loss_increase": report.loss_increase,
            "time": report.time_total,
            "grad_share": report.grad_share,
            "num_grads": report.num_grads,
        }
        self.history.append(rec)
        loss = (
            ""
            if report.loss_increase is None
            else f", OBS saliency {report.loss_increase:.4g} (relative)"
        )
        logger.info(
            "PruningCallback: step %d: sparsity %.4f (target %.4f)%s in %.1f s (%.0f%% "
            "collecting "
            "gradients)",
            state.global_step,
            report.sparsity,
            report.target_sparsity,
            loss,
            report.time_total,
            100 * report.grad_share,
        )
        logs = {
            "sparsity": report.sparsity,
            "pruning_target": report.target_sparsity,
            "pruning_time": report.time_total,
            "pruning_grad_share": report.grad_share,
        }
        if report.loss_increase is not None:
            logs["pruning_saliency"] = report.loss_increase
        self._log(logs, state)

    def _enforce(self, optimizer, reset: bool) -> None:
        """Zero pruned weights; tell the optimizer (masks for hf_mfac.MFAC, state of pruned
        coordinates)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                p = self.targets[name]
                self.masks[name] = mask = mask.to(device=p.device, dtype=torch.bool)
                p.mul_(mask)
        opt = unwrap_optimizer(optimizer)
        if opt is None:
            return
        reset = reset and self.config.reset_momentum
        if isinstance(opt, MFAC):
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            new = {
                self.targets[n]: m for n, m in self.masks.items() if id(self.targets[n]) in owned
            }
            current = opt.masks
            same = len(current) == len(new) and all(
                p in current and torch.equal(current[p], m) for p, m in new.items()
            )
            if not same:  # on resume the window and its masks come back with the optimizer state
                opt.set_masks(new)
            if reset:
                opt.reset_momentum()
            return
        for name, mask in self.masks.items():
            st = opt.state.get(self.targets[name])
            if not st:
                continue
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.shape == mask.shape:
                    if reset and key in ("momentum_buffer", "exp_avg"):
                        val.zero_()
                    else:
                        val.mul_(mask)

    def _log(self, logs: dict, state) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(logs))
            return
        if not self._warned_log:
            logger.warning(
                "PruningCallback is not attached to the trainer: its metrics go to "
                "state.log_history only, "
                "not to TensorBoard/W&B. Call callback.attach(trainer)."
            )
            self._warned_log = True
        state.log_history.append({**logs, "step": state.global_step})

    # -- checkpoints
    # -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "last_pruned_step": self.last_pruned_step,
            "history": self.history,
            "schedule": [[t, s] for t, s in self.schedule],
            "sparsity": self.current_sparsity(),
            "pruner": None if self.pruner is None else self.pruner.config(),
        }

    def current_sparsity(self) -> float:
        if not self.masks:
            return 0.0
        total = sum(p.numel() for p in self.targets.values()) or 1
        return float(sum((~m).sum().item() for m in self.masks.values())) / total

    def save_state(self, folder: str) -> None:
        """Write the masks (safetensors, bool) and the callback state (json) into ``folder``; each
        file is written beside its final name and moved into place, so an interrupted save leaves
        the previous file whole."""
        from safetensors.torch import save_file

        def atomic(name, write):
            path = os.path.join(folder, name)
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)

        def write_state(tmp):
            with open(tmp, "w") as f:
                json.dump(self.state_dict(), f, indent=2)

        masks = {n: m.detach().cpu().contiguous() for n, m in self.masks.items()}
        atomic(CHECKPOINT_MASKS_NAME, lambda tmp: save_file(masks, tmp))
        atomic(CHECKPOINT_STATE_NAME, write_state)

    def load_state(self, folder: str) -> None:
        """Read what :meth:`save_state` wrote (masks are checked against the targets' shapes); a
        truncated or foreign file raises ``ValueError`` naming it, and nothing changes."""
        from safetensors.torch import load_file

        mpath = os.path.join(folder, CHECKPOINT_MASKS_NAME)
        try:
            masks = load_file(mpath)
        # safetensors raises its own error types for truncated or garbage files
        except Exception as e:
            raise ValueError(f"cannot read the pruning masks {mpath}: {e}") from e
        for n, m in masks.items():
            if n not in self.targets or tuple(m.shape) != tuple(self.targets[n].shape):
                raise ValueError(
                    f"checkpoint mask {n} {tuple(m.shape)} in {mpath} does not match "
                    "this model's "
                    "pruning targets"
                )
        st = {}
        path = os.path.join(folder, CHECKPOINT_STATE_NAME)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    st = json.load(f)
                last, history = int(st.get("last_pruned_step", -1)), list(st.get("history", []))
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"cannot read the pruning state {path}: {e}") from e
        else:
            last, history = self.last_pruned_step, self.history
        self.masks = {n: m.bool() for n, m in masks.items()}
        self.last_pruned_step, self.history = last, history

    def _restore(self, args, state) -> None:
        candidates = [
            self.resume_from,
            getattr(args, "resume_from_checkpoint", None),
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
        ]
        for c in candidates:
            if isinstance(c, str) and os.path.isfile(os.path.join(c, CHECKPOINT_MASKS_NAME)):
                self.load_state(c)
                logger.info(
                    "PruningCallback: restored masks from %s (sparsity %.4f)",
                    c,
                    self.current_sparsity(),
                )
                return
        if any(t < state.global_step for t, _ in self.schedule):
            self.masks = masks_from_zeros(self.targets)
            self.last_pruned_step = max(t for t, _ in self.schedule if t < state.global_step)
            logger.warning(
                "PruningCallback: resuming at step %d without %s; masks rebuilt from "
                "the zero weights "
                "(pass resume_from=<checkpoint folder> to restore them exactly)",
                state.global_step,
                CHECKPOINT_MASKS_NAME,
            )
