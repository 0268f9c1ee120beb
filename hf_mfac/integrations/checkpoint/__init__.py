"""Sparse checkpoints: portable dense-with-zeros, a compact values+bitmask form, and 2:4 GPU export.

Every sparse-checkpoint name imports from this package: the portable dense form in :mod:`.sparse`,
masks and the sparsity record in :mod:`.record`, the compact form in :mod:`.compact`, the 2:4 export
in :mod:`.semi_structured`, staged saves in :mod:`.staging`, file names and readers in
:mod:`.files`, and redaction (secrets out of cards and logs) in :mod:`.redaction`.

Three forms, for three uses (compressed-tensors' sparse-bitmask format is gone, so the
portable form is dense safetensors with exact zeros plus our metadata):

* :func:`save_sparse_pretrained` — ``model.save_pretrained`` (dense safetensors, pruned weights
  exactly 0) plus the sparsity metadata under ``config.json["hf_mfac_sparsity"]`` and the masks in
  ``sparsity_masks.safetensors``. Any ``AutoModel*.from_pretrained`` loads it with no extra code;
  the extra config key is kept as a plain attribute of the loaded config.
* :func:`save_compact_pretrained` / :func:`load_compact_pretrained` — hf_mfac's own form: for each
  masked tensor the kept values and a packed bitmask (1 bit per weight), everything else dense, in
  ``hf_mfac_compact.safetensors``. Exact round trip; at sparsity s a float32 tensor takes ``(1 - s)
  + 1/32`` of its dense size. Stock ``from_pretrained`` refuses the folder (no
  ``model.safetensors``) instead of loading random weights.
* :func:`export_semi_structured` — swaps 2:4-sparse ``nn.Linear`` weights for
  ``torch.sparse.to_sparse_semi_structured`` tensors (cuSPARSELt / CUTLASS kernels, CUDA only) and
  leaves every other layer dense, saying why.

Masks follow :mod:`hf_mfac.core.masks`: ``{parameter name as in model.named_parameters(): bool
tensor}``, ``True`` = kept. Every function checks its inputs before writing anything, and the savers
write into a staging folder on the same filesystem and move the files into place
(:func:`staged_save`): an exception leaves the folder as it was; a successful save removes the
weights of the other form (and of a sharded or older save) and stale masks, and keeps every other
file. The loaders check every length, count, shape and dtype against the metadata and name the file
and the tensor; the masks and compact files carry a sha256 of each tensor's bytes in their headers
(the masks file also of each masked dense weight), checked on load, so a change that keeps every
count (two swapped bits) is refused too, and the masks are checked against the zeros of the weights.
Files written before the checksums still load. Secret-looking values in the recorded ``recipe`` /
``extra_metadata`` are redacted (:func:`redact`).
"""
from .compact import load_compact_pretrained, save_compact_pretrained
from .files import COMPACT_WEIGHTS_NAME, FORMAT_VERSION, MASKS_NAME, SPARSITY_KEY
from .record import is_nm_sparse, read_sparsity_metadata, resolve_masks, sparsity_metadata
from .redaction import (
    REDACTED,
    pickled_without_secrets,
    redact,
    redact_argv,
    redact_credentials,
    redact_text,
    secret_name,
    without_secrets,
)
from .semi_structured import export_semi_structured
from .sparse import load_sparse_masks, log_saved, save_sparse_pretrained
from .staging import staged_save

__all__ = [
    "COMPACT_WEIGHTS_NAME", "FORMAT_VERSION", "MASKS_NAME", "SPARSITY_KEY", "REDACTED",
    "export_semi_structured", "is_nm_sparse", "load_compact_pretrained", "load_sparse_masks",
    "log_saved",
    "read_sparsity_metadata", "redact", "redact_argv", "redact_text", "resolve_masks",
    "save_compact_pretrained",
    "save_sparse_pretrained", "secret_name", "sparsity_metadata", "staged_save",
    "redact_credentials", "without_secrets", "pickled_without_secrets",
]
