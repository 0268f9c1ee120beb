"""Gradual pruning inside training: the callback, the examples' ``--prune_*`` flags and distillation
from the dense teacher."""

from .arguments import PruningArguments
from .callback import CHECKPOINT_MASKS_NAME, CHECKPOINT_STATE_NAME, PruningCallback
from .distillation import DistillationMixin, DistillationTrainer, distillation_loss

__all__ = ["CHECKPOINT_MASKS_NAME", "CHECKPOINT_STATE_NAME", "DistillationMixin",
           "DistillationTrainer", "PruningArguments", "PruningCallback", "distillation_loss"]
