"""Model cards: hf_mfac's marked section in a Hub card (YAML metadata with model-index, sparsity
table and plot, M-FAC hyperparameters), what a Trainer tells it, and pushing a sparse model to the
Hub."""

from .model_card import (
    PLOT_NAME,
    CardFields,
    create_sparse_model_card,
    push_sparse_to_hub,
    write_trainer_model_card,
)

__all__ = ["PLOT_NAME", "CardFields", "create_sparse_model_card", "push_sparse_to_hub",
           "write_trainer_model_card"]
