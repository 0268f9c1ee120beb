"""Hugging Face integration: the only layer that imports transformers, accelerate, huggingface_hub.

One sub-package per concern: :mod:`.trainer` (M-FAC in the Trainer), :mod:`.gradual` (pruning inside
training), :mod:`.checkpoint` (sparse checkpoints), :mod:`.card` (model cards); :mod:`.cli`
(``hf-mfac``) and :mod:`.log_level` sit at the top.

Names are resolved lazily, so ``import hf_mfac.integrations`` stays cheap until one is used.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "MFACTrainingArguments": "trainer",
    "parse_optim_args": "trainer",
    "MFACTrainer": "trainer",
    "mfac_optimizer_cls_and_kwargs": "trainer",
    "check_supported_setup": "trainer",
    "HubUnreachableError": "trainer",
    "MFACShardCheckpointCallback": "trainer",
    "PruningCallback": "gradual",
    "PruningArguments": "gradual",
    "DistillationMixin": "gradual",
    "DistillationTrainer": "gradual",
    "distillation_loss": "gradual",
    "follow_log_level": "log_level",
    "save_sparse_pretrained": "checkpoint",
    "save_compact_pretrained": "checkpoint",
    "load_compact_pretrained": "checkpoint",
    "export_semi_structured": "checkpoint",
    "load_sparse_masks": "checkpoint",
    "CardFields": "card",
    "create_sparse_model_card": "card",
    "write_trainer_model_card": "card",
    "push_sparse_to_hub": "card",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        module = importlib.import_module(f".{_NAMES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
