"""The names this module used to hold, re-exported from the files that hold them now:
:mod:`.pruning_callback` (:class:`PruningCallback`), :mod:`.pruning_args` (:class:`PruningArguments`),
:mod:`.distillation` and :mod:`hf_mfac.core.schedules` (CAP's cyclic learning rate)."""
from ..core.schedules import cyclic_linear_lambda, cyclic_linear_scheduler
from .distillation import DistillationMixin, DistillationTrainer, distillation_loss
from .pruning_args import PruningArguments
from .pruning_callback import CHECKPOINT_MASKS_NAME, CHECKPOINT_STATE_NAME, PruningCallback

__all__ = ["PruningCallback", "PruningArguments", "cyclic_linear_lambda", "cyclic_linear_scheduler",
           "distillation_loss", "DistillationMixin", "DistillationTrainer", "CHECKPOINT_MASKS_NAME",
           "CHECKPOINT_STATE_NAME"]
