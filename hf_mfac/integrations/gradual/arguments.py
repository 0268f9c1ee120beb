"""The example scripts' pruning flags: :class:`PruningArguments`, the fields of
:class:`~hf_mfac.pruning.GradualPruningConfig` with a ``prune_`` prefix (``--prune_method obert
--prune_sparsity 0.8
--prune_num_grads 256 ...``, same help and defaults, except that ``--prune_method`` defaults to no
pruning), plus ``--prune_mode`` and the distillation flags."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import field

from torch import nn

from ...pruning import GradualPruningConfig, prune_oneshot, recipes
from ...pruning.config import from_prefixed, prefixed_fields
from ..log_level import follow_log_level
from .callback import PruningCallback

__all__ = ["PruningArguments"]

logger = logging.getLogger("hf_mfac")

PREFIX = "prune_"

_EXTRA_FIELDS = [
    ("prune_mode", str, field(default="gradual", metadata={
        "help": "gradual: prune during training on the schedule (PruningCallback); oneshot: prune "
                "before training "
                "(then sparse fine-tuning with fixed masks, if training).",
                "choices": ["gradual", "oneshot"]})),
    ("distill_teacher", str | None, field(default=None, metadata={
        "help": "Knowledge distillation from a dense teacher: a model folder, or 'self' for a copy "
                "of the starting "
                "model (oBERT recipe)."})),
    ("distill_hardness", float, field(default=1.0, metadata={"help": "Weight of the distillation "
                                                                     "loss."})),
    ("distill_temperature", float,
     field(default=2.0, metadata={"help": "Distillation temperature."})),
]


class _PruningArgumentsMethods:
    """What the example scripts do with the flags (the fields are added by ``make_dataclass``
    below)."""

    def __post_init__(self):
        if self.prune_recipe is not None:  # --prune_recipe chooses the method and the distillation
            self.prune_method = self.prune_method or recipes.get_recipe(self.prune_recipe).method
            kd = recipes.distillation(self.prune_recipe)
            if kd is not None and self.distill_teacher is None:
                self.distill_teacher = kd["teacher"]
                self.distill_hardness, self.distill_temperature = kd["hardness"], kd["temperature"]
        self.config()  # validate at parse time, before any model is loaded

    def config(self) -> GradualPruningConfig:
        """The flags as a :class:`~hf_mfac.pruning.GradualPruningConfig` (``method`` None: no
        pruning)."""
        return from_prefixed(self, PREFIX, GradualPruningConfig)

    def oneshot_kwargs(self) -> dict:
        """Keyword arguments for :func:`hf_mfac.pruning.prune_oneshot`."""
        return self.config().oneshot_kwargs()

    def teacher(self, model: nn.Module, model_cls=None) -> nn.Module | None:
        """The distillation teacher ``--distill_teacher`` asks for: None, a copy of ``model`` for
        "self" (the dense starting model, oBERT recipe), or ``model_cls.from_pretrained(path)``
        (default: ``model``'s class)."""
        if not self.distill_teacher:
            return None
        if self.distill_teacher == "self":
            return copy.deepcopy(model)
        return (model_cls or type(model)).from_pretrained(self.distill_teacher)

    def callback(self, dataloader=None, masks=None) -> PruningCallback | None:
        """The :class:`PruningCallback` for these flags (None without a method or masks). In oneshot
        mode, pass the masks it produced: the callback then only keeps them during fine-tuning."""
        if self.prune_mode == "oneshot" or self.prune_method is None:
            return PruningCallback(None, masks=masks) if masks else None
        return PruningCallback(config=self.config(), dataloader=dataloader, masks=masks)

    def setup(self, trainer, has_train_data: bool) -> tuple[PruningCallback | None, dict | None]:
        """In oneshot mode prune ``trainer.model`` now (gradients from the trainer's train
        dataloader, report logged through ``trainer.log``; under DDP with
        :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed`, so every process gets the
        same masks); then build the callback (gradual pruning, or keeping the one-shot masks during
        fine-tuning) and attach it to ``trainer``. Returns ``(callback or None, one-shot masks or
        None)``."""
        follow_log_level(trainer.args)
        masks = None
        if self.prune_method and self.prune_mode == "oneshot":
            if not has_train_data and self.prune_method != "magnitude":
                raise ValueError("one-shot second-order pruning needs training data (--train_file "
                                 "/ --do_train) "
                                 "for its gradients")
            loader = trainer.get_train_dataloader() if has_train_data else None
            # under DDP the loader is this process's shard of the train batches: prune_oneshot
            # then prunes over all processes (prune_oneshot_distributed)
            progress = trainer.is_world_process_zero() and not trainer.args.disable_tqdm
            logger.info("one-shot pruning with %s to sparsity %s", self.prune_method,
                        self.prune_sparsity)
            masks, report = prune_oneshot(trainer.model, loader, self.config(), progress=progress)
            logger.info("one-shot pruning:\n%s", report.to_markdown())
            trainer.log(
                {
                    "sparsity": report.sparsity,
                    **(
                        {"pruning_saliency": report.loss_increase}
                        if report.loss_increase is not None
                        else {}
                    ),
                }
            )
        callback = self.callback(masks=masks)
        if callback is not None:
            callback.attach(trainer)
        return callback, masks

    def save_sparse(
        self, trainer, callback: PruningCallback | None, masks: dict | None
    ) -> dict | None:
        """After training: the final masks (the callback's, else the one-shot ``masks``), saved with
        :func:`~hf_mfac.integrations.save_sparse_pretrained` into ``trainer.args.output_dir`` by the
        main process. Returns the masks (None when nothing was pruned), e.g. for the model card."""
        if callback is not None and callback.masks:
            masks = callback.masks
        if masks and trainer.is_world_process_zero() and trainer.args.output_dir:
            from ..checkpoint.sparse import save_sparse_pretrained

            save_sparse_pretrained(
                trainer.model,
                trainer.args.output_dir,
                masks,
                method=self.prune_method,
                pattern=self.prune_pattern,
            )
        return masks or None


PruningArguments = dataclasses.make_dataclass(
    "PruningArguments",
    prefixed_fields(GradualPruningConfig, PREFIX, {"method": None}) + _EXTRA_FIELDS,
    bases=(_PruningArgumentsMethods,),
)
PruningArguments.__module__ = __name__
PruningArguments.__doc__ = """Pruning flags for ``HfArgumentParser`` scripts (the examples): every
field of :class:`~hf_mfac.pruning.GradualPruningConfig` as ``--prune_<name>`` with the same help and
default (``--prune_method`` defaults to None: no pruning), plus ``--prune_mode gradual|oneshot`` and
``--distill_teacher``/``--distill_hardness``/ ``--distill_temperature``. :meth:`config` gives the
config, :meth:`setup` prunes (one-shot) and attaches the :class:`PruningCallback`,
:meth:`save_sparse` saves the pruned model, :meth:`teacher` loads the distillation teacher."""
