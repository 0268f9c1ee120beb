"""M-FAC training: ``--optim mfac`` in ``TrainingArguments``, the Trainer that builds the optimizer,
and the per-rank checkpoint files of a sharded window."""

from .arguments import MFACTrainingArguments, check_supported_setup, parse_optim_args
from .mfac_trainer import HubUnreachableError, MFACTrainer, mfac_optimizer_cls_and_kwargs
from .shards import MFACShardCheckpointCallback

__all__ = ["HubUnreachableError", "MFACShardCheckpointCallback", "MFACTrainer",
           "MFACTrainingArguments", "check_supported_setup", "mfac_optimizer_cls_and_kwargs",
           "parse_optim_args"]
