"""2:4 semi-structured export for GPU inference: :func:`export_semi_structured` swaps the weights of
2:4-sparse ``nn.Linear`` layers for ``torch.sparse.to_sparse_semi_structured`` tensors (cuSPARSELt,
or CUTLASS where cuSPARSELt is missing; CUDA with compute capability >= 8.0 only) and leaves every
other layer dense, reporting why (:func:`_semi_structured_blocker`). Nothing is written to disk; the
model is for inference afterwards.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .record import matching_names, is_nm_sparse

__all__ = ["export_semi_structured"]


def _semi_structured(weight: torch.Tensor):
    """``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt), or the CUTLASS backend where
    cuSPARSELt is missing. Torch checks dtype, shape and contiguity and raises ``RuntimeError``
    otherwise."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    if torch.backends.cusparselt.is_available():
        return to_sparse_semi_structured(weight)
    return SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def _semi_structured_blocker(weight: torch.Tensor) -> str | None:
    if not is_nm_sparse(weight, 2, 4):
        return "not 2:4 sparse (some group of 4 input weights has more than 2 nonzeros)"
    if not weight.is_cuda:
        return f"2:4 sparse kernels need a CUDA GPU; the weight is on {weight.device}"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 sparse kernels need compute capability >= 8.0 (Ampere or newer)"
    return None


def export_semi_structured(model: nn.Module, targets: Iterable[str] | None = None, *,
                           strict: bool = False) -> dict[str, str]:
    """Replace 2:4-sparse ``nn.Linear`` weights by semi-structured sparse tensors for GPU inference,
    in place.

    Each ``nn.Linear`` (those whose name matches ``targets``, names or regular expressions, when
    given) whose weight is 2:4 sparse along the input dimension gets
    ``nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)``; ``F.linear`` then runs on
    the sparse tensor cores (cuSPARSELt, or CUTLASS where cuSPARSELt is missing). Needs CUDA,
    compute capability >= 8.0, and the dtypes and shapes torch's kernels accept (fp16/bf16/int8, and
    fp32 on CUTLASS; both dimensions multiples of 16-64). Cast the model to the dtype you will run
    in first. The model is for inference only afterwards.

    Layers that cannot be converted stay dense. Returns ``{module name: "semi-structured 2:4" or
    "dense: <reason>"}``; a ``UserWarning`` names the layers that are 2:4 sparse but could not be
    converted (CPU, dtype, shape), or says that nothing was. With ``strict=True`` any such layer
    raises ``RuntimeError`` instead and the model is left untouched.
    """
    linears = (n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    wanted = [targets] if isinstance(targets, str) else targets
    names = None if targets is None else set(matching_names(linears, wanted))
    report, converted, missed = {}, {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (names is not None and name not in names):
            continue
        w = mod.weight.detach()
        reason = _semi_structured_blocker(w)
        if reason is None:
            try:
                converted[name] = _semi_structured(w.contiguous())
            except (RuntimeError, ValueError, NotImplementedError) as e:
                reason = str(e).strip().splitlines()[0]
        if reason is not None:
            report[name] = f"dense: {reason}"
            if is_nm_sparse(w, 2, 4):
                missed[name] = reason
    if missed and strict:
        raise RuntimeError("export_semi_structured(strict=True): 2:4 sparse layers that cannot be "
                           "converted:\n  "
                           + "\n  ".join(f"{n}: {r}" for n, r in missed.items()))
    modules = dict(model.named_modules())
    for name, sparse in converted.items():
        modules[name].weight = nn.Parameter(sparse, requires_grad=False)
        report[name] = "semi-structured 2:4"
    if missed:
        first = next(iter(missed.values()))
        warnings.warn(f"export_semi_structured: {len(missed)} 2:4-sparse Linear layer(s) kept "
                      "dense "
                      f"(e.g. {next(iter(missed))}: {first}); see the returned report",
                      stacklevel=2)
    elif not converted:
        warnings.warn("export_semi_structured: no Linear layer is 2:4 sparse; the model is "
                      "unchanged "
                      "(prune with pattern '2:4' first)", stacklevel=2)
    return dict(sorted(report.items()))
