"""Hugging Face integration: the only layer that imports transformers, accelerate, huggingface_hub.

Names are resolved lazily, so ``import hf_mfac.integrations`` stays cheap until one is used.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "MFACTrainingArguments": "training_args",
    "parse_optim_args": "training_args",
    "MFACTrainer": "trainer",
    "mfac_optimizer_cls_and_kwargs": "trainer",
    "check_supported_setup": "trainer",
    "PruningCallback": "pruning_callback",
    "PruningArguments": "pruning_args",
    "DistillationMixin": "distillation",
    "DistillationTrainer": "distillation",
    "distillation_loss": "distillation",
    "follow_log_level": "log_level",
    "MFACShardCheckpointCallback": "distributed",
    "save_sparse_pretrained": "sparse_checkpoint",
    "save_compact_pretrained": "sparse_checkpoint",
    "load_compact_pretrained": "sparse_checkpoint",
    "export_semi_structured": "sparse_checkpoint",
    "load_sparse_masks": "sparse_checkpoint",
    "create_sparse_model_card": "model_card",
    "write_trainer_model_card": "model_card",
    "push_sparse_to_hub": "model_card",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        module = importlib.import_module(f".{_NAMES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
