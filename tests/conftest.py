import os

import pytest
import torch

# Keep the suite light on the 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def dense_fisher(G: torch.Tensor, damp: float, scale: float | None = None) -> torch.Tensor:
    """F = damp*I + (1/scale) G^T G in float64 (scale defaults to the number of rows)."""
    G = G.to(torch.float64)
    scale = G.shape[0] if scale is None else scale
    return damp * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / scale


def block_fisher(G: torch.Tensor, damp: float, B: int) -> torch.Tensor:
    """Dense block-diagonal F with blocks of B consecutive coordinates (last block shorter)."""
    d = G.shape[1]
    return torch.block_diag(*[dense_fisher(G[:, s : s + B], damp) for s in range(0, d, B)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def woodbury_tol(G: torch.Tensor, damp: float, dtype: torch.dtype, scale=None) -> float:
    """Relative tolerance for a dtype-precision Woodbury solve: c * eps(dtype) * cond(K),
    K = scale*damp*I + G G^T, the system the O(m^3) part solves."""
    G = G.to(torch.float64)
    scale = G.shape[0] if scale is None else scale
    K = G @ G.T + scale * damp * torch.eye(G.shape[0], dtype=torch.float64)
    return 50 * torch.finfo(dtype).eps * float(torch.linalg.cond(K))


def save_tiny_text_model(folder, num_hidden_layers: int = 1):
    """A tiny random BERT classifier with a word-level tokenizer over a 14-word vocabulary, saved in
    ``folder/tiny-bert``; returns (that path, the words)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = "the a good bad movie film great awful plot acting is was not very".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    path = folder / "tiny-bert"
    BertTokenizer(vocab=vocab).save_pretrained(path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16,
                                             num_hidden_layers=num_hidden_layers,
                                             num_attention_heads=2,
                                             intermediate_size=32,
                                             max_position_embeddings=32)).save_pretrained(path)
    return path, words


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
