"""Gradient sources for the empirical Fisher: m gradients of the loss, streamed in chunks.

Each gradient is the mean loss gradient over one *Fisher mini-batch* ([WoodFisher, §5.1]: averaging
over a mini-batch lets the Fisher see mini-batch times more samples at the same cost), by default
one batch of the dataloader; ``fisher_batch_size`` re-cuts the dataloader's batches (``1`` =
per-sample gradients). The model runs in eval mode (no dropout), the gradients are taken with
``torch.autograd.grad`` (the parameters' ``.grad`` is left alone, so this is safe inside a training
loop), cast to fp32, masked, and handed to ``sink`` in chunks of (k, D) rows of a
:class:`~hf_mfac.pruning.targets.Layout`, so the m x D matrix is never held unless the caller wants
it (``sink=None``: the static M-FAC pruner).

Distribution later: each rank can run :func:`iter_grads` over its shard and all-reduce the Fisher
accumulators; nothing here assumes a single process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core._checks import check_positive_int, free_bytes
from .targets import Layout, find_prunable, module_modes

__all__ = ["collect_grads", "iter_grads", "GradStats", "default_loss", "check_dataloader",
           "check_trainable",
           "check_fisher_batch_size"]


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch).loss``; raises a clear error when the batch carries no labels."""
    if not isinstance(batch, Mapping):
        raise TypeError("the dataloader must yield dicts of model inputs (got "
                        f"{type(batch).__name__}); "
                        "pass loss_fn=(model, batch) -> loss for other formats")
    out = model(**batch)
    loss = out.get("loss", None) if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: the dataloader must yield batches with "
                         "labels "
                         f"(got keys {sorted(batch)}), e.g. 'labels', or "
                         "'start_positions'/'end_positions' for "
                         "question answering; or pass loss_fn=(model, batch) -> loss")
    if loss.dim() != 0:
        loss = loss.mean()
    return loss


def _batch_len(batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError("cannot infer the batch size: the batch holds no tensor or list")


def _split(batch, size: int | None):
    """Cut a dict batch into micro-batches of ``size`` samples along dim 0 (None: the batch
    itself)."""
    if size is None:
        yield batch
        return
    n = _batch_len(batch)
    for s in range(0, n, size):
        yield {
            k: (
                v[s : s + size]
                if isinstance(v, (torch.Tensor, list, tuple))
                and (not isinstance(v, torch.Tensor) or v.dim() > 0)
                else v
            )
            for k, v in batch.items()
        }


def _to(batch, device):
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def check_fisher_batch_size(fisher_batch_size, per_sample: bool = False) -> int | None:
    """The samples per gradient: ``fisher_batch_size`` (a positive integer, or None for one batch),
    1 with ``per_sample=True``."""
    if per_sample:
        if fisher_batch_size not in (None, 1):
            raise ValueError("per_sample=True means fisher_batch_size=1; do not give both")
        return 1
    if fisher_batch_size is None:
        return None
    if (
        isinstance(fisher_batch_size, bool)
        or int(fisher_batch_size) != fisher_batch_size
        or fisher_batch_size < 1
    ):
        raise ValueError(f"fisher_batch_size must be a positive integer; got {fisher_batch_size!r}")
    return int(fisher_batch_size)


def check_trainable(params: Mapping[str, torch.Tensor]) -> None:
    """Refuse targets that autograd cannot differentiate (``requires_grad=False``), naming them."""
    frozen = [name for name, p in params.items() if not p.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
        raise ValueError(
            f"frozen pruning targets (requires_grad=False): {shown}. The Fisher needs "
            "their gradients: "
            "unfreeze them (param.requires_grad_(True)) or leave them out of the "
            "targets "
            "(exclude=... or targets=...)"
        )


def _num_gradients(dataloader, fisher_batch_size: int | None) -> int | None:
    """How many gradients one pass over ``dataloader`` gives, when its length says (else None): its
    batches, or with ``fisher_batch_size`` the Fisher mini-batches of its batches (the last batch
    may be shorter)."""
    try:
        n = len(dataloader)
    except TypeError:
        return None
    if fisher_batch_size is None or n == 0:
        return n
    bs = getattr(dataloader, "batch_size", None)
    if bs is None:
        return None
    last = bs
    if not getattr(dataloader, "drop_last", False):
        try:
            last = len(dataloader.sampler) - (n - 1) * bs
        except (AttributeError, TypeError):
            pass
    last = min(bs, max(1, last))
    return (n - 1) * -(-bs // fisher_batch_size) + -(-last // fisher_batch_size)


def check_dataloader(
    dataloader, num_grads: int, fisher_batch_size: int | None = None, repeats: int = 1
) -> None:
    """Fail early when ``dataloader`` cannot give ``num_grads`` gradients ``repeats`` times: none,
    empty, shorter than ``num_grads`` (when its length says), or a one-shot iterator asked to
    repeat."""
    if dataloader is None:
        raise ValueError(
            "this pruning method needs gradients: pass a dataloader that yields batches with labels"
        )
    if repeats > 1 and iter(dataloader) is dataloader:
        raise ValueError(
            "recomputations need a dataloader that can be iterated again (a "
            "DataLoader or a list), "
            "not a one-shot iterator"
        )
    fisher_batch_size = check_fisher_batch_size(fisher_batch_size)
    have = _num_gradients(dataloader, fisher_batch_size)
    if have == 0:
        raise ValueError(
            "the dataloader is empty: the Fisher needs gradients, give it calibration batches"
        )
    if have is not None and have < num_grads:
        per = "" if fisher_batch_size is None else f" of {fisher_batch_size} sample(s)"
        raise ValueError(
            f"the dataloader gives at most {have} gradients ({len(dataloader)} batches"
            f"{'' if not per else f', in Fisher mini-batches{per}'}) but "
            f"num_grads={num_grads}: "
            "lower num_grads, use a smaller batch size or fisher_batch_size, or give "
            "more data"
        )


@dataclass
class GradStats:
    """What a gradient collection produced: ``G`` (m, D) when kept, the mean gradient (D,), counts,
    time: ``seconds`` in all, ``seconds_model`` in the forward and backward passes, ``seconds_sink``
    in the sink (the Fisher's accumulation)."""

    G: torch.Tensor | None
    mean: torch.Tensor
    num_grads: int
    num_samples: int
    seconds: float
    seconds_model: float = 0.0
    seconds_sink: float = 0.0


CHUNK_BYTES = 1 << 28  # the smallest bound of a gradient chunk (k x D fp32)
CHUNK_ROWS = 32  # at most this many gradients per chunk (one GEMM per block and chunk)
CHUNK_FISHER_FRACTION = 1 / 8  # a chunk may take this fraction of the Fisher's bytes ...
CHUNK_FREE_FRACTION = 1 / 4  # ... and at most this fraction of the device's available memory


def default_chunk_size(
    dim: int, num_grads: int, *, fisher_bytes: int | None = None, device=None
) -> int:
    """Rows per chunk: up to :data:`CHUNK_ROWS` gradients, within the larger of :data:`CHUNK_BYTES`
    and :data:`CHUNK_FISHER_FRACTION` of the Fisher's bytes (each chunk costs one pass over the
    accumulator, so the chunk grows with it: at BERT-base, 85M targets, an 11 GB accumulator takes
    chunks of 4 gradients of 340 MB, not one), and within :data:`CHUNK_FREE_FRACTION` of what
    ``device`` has available (when it can be told)."""
    per = 4 * max(dim, 1)
    cap = max(CHUNK_BYTES, int((fisher_bytes or 0) * CHUNK_FISHER_FRACTION))
    free = free_bytes(device) if device is not None else None
    if free is not None:
        cap = min(cap, int(free * CHUNK_FREE_FRACTION))
    return max(1, min(CHUNK_ROWS, num_grads, cap // per))


def _sink_bytes(sink) -> int | None:
    """The bytes held by the Fisher a sink feeds (``fisher.add_grads``), when it says
    (``storage_bytes()``)."""
    owner = getattr(sink, "__self__", None)
    size = getattr(owner, "storage_bytes", None)
    return int(size()) if callable(size) else None


def iter_grads(
    model: nn.Module,
    dataloader,
    layout: Layout,
    num_grads: int,
    *,
    keep: torch.Tensor | None = None,
    fisher_batch_size: int | None = None,
    chunk_size: int | None = None,
    loss_fn: Callable | None = None,
    device=None,
    progress: bool = True,
    stats: dict | None = None,
    fisher_bytes: int | None = None,
):
    """Yield chunks (k, D) fp32 of flattened, masked gradients until ``num_grads`` rows were
    produced.

    ``keep`` (D,) bool zeroes the pruned coordinates (the Fisher of the remaining sub-network: its
    inverse is then block-diagonal between pruned and kept weights, so OBS updates never touch
    pruned weights). The model is put in eval mode and every module's mode restored afterwards.
    Chunks are reused buffers: consume them before asking for the next one. ``fisher_bytes``: the
    size of the Fisher the chunks feed, which sizes the default chunk (:func:`default_chunk_size`).
    ``stats`` gets the counts and ``seconds_model``, the time of the forward and backward passes and
    of flattening the gradients."""
    loss_fn = loss_fn or default_loss
    params = [layout.params[n] for n in layout.names]
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    chunk_size = (
        default_chunk_size(layout.dim, num_grads, fisher_bytes=fisher_bytes, device=device)
        if chunk_size is None
        else min(check_positive_int("chunk_size", chunk_size), num_grads)
    )
    buf = torch.zeros(chunk_size, layout.dim, dtype=torch.float32, device=device)
    keep_f = None if keep is None else keep.to(device=device, dtype=torch.float32)
    restore_modes = module_modes(model)  # every submodule's own mode comes back
    model.eval()
    done = k = samples = 0
    t_model = 0.0
    bar = tqdm(
        total=num_grads, desc="collecting gradients", unit="grad", disable=not progress, leave=False
    )
    try:
        for batch in dataloader:
            for micro in _split(batch, fisher_batch_size):
                t0 = time.perf_counter()
                micro = _to(micro, model_device)
                with torch.enable_grad():
                    loss = loss_fn(model, micro)
                    if not loss.requires_grad:
                        raise ValueError(
                            "the loss does not depend on the target weights (requires_grad is off?)"
                        )
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                row = buf[k]
                row.zero_()
                for g, off, n in zip(grads, layout.offsets, layout.numels):
                    if g is not None:
                        row[off : off + n] = g.reshape(-1).to(device=device, dtype=torch.float32)
                del grads  # the model's gradients are not held while the chunk is consumed
                if keep_f is not None:
                    row.mul_(keep_f)
                t_model += time.perf_counter() - t0
                samples += _batch_len(micro) if isinstance(micro, Mapping) else 1
                k += 1
                done += 1
                bar.update(1)
                if k == chunk_size or done == num_grads:
                    yield buf[:k]
                    k = 0
                if done == num_grads:
                    return
        raise ValueError(
            f"the dataloader ran out after {done} gradients but "
            f"num_grads={num_grads}: lower "
            "num_grads, use a smaller batch size or fisher_batch_size, or give more "
            "data"
        )
    finally:
        bar.close()
        restore_modes()
        if stats is not None:
            stats.update(num_grads=done, num_samples=samples, seconds_model=t_model)


def collect_grads(
    model: nn.Module,
    dataloader,
    num_grads: int,
    *,
    params: Layout | Mapping | None = None,
    keep: torch.Tensor | None = None,
    sink: Callable[[torch.Tensor], None] | None = None,
    fisher_batch_size: int | None = None,
    per_sample: bool = False,
    chunk_size: int | None = None,
    loss_fn: Callable | None = None,
    device=None,
    out_device="cpu",
    progress: bool = True,
) -> GradStats:
    """Collect ``num_grads`` (m) loss gradients of the target weights.

    ``params``: a :class:`Layout`, a ``{name: parameter}`` mapping, or None (:func:`find_prunable`
    defaults). ``sink``: called with each fp32 chunk (k, D), e.g. ``BlockFisherInverse.add_grads``;
    with ``sink=None`` the gradients are returned as ``G`` (m, D) on ``out_device`` (host memory by
    default, as the static M-FAC pruner needs them). ``per_sample=True`` is ``fisher_batch_size=1``.
    The mean gradient (D,) is always returned (WoodTaylor needs it). Cost: m forward/backward
    passes; memory ``chunk_size * D`` values on ``device`` (default: the model's device;
    ``chunk_size`` defaults to :func:`default_chunk_size`, sized by the Fisher the sink feeds) plus
    ``m * D`` on ``out_device`` when ``sink`` is None."""
    fisher_batch_size = check_fisher_batch_size(fisher_batch_size, per_sample)
    num_grads = check_positive_int("num_grads", num_grads)
    layout = params if isinstance(params, Layout) else Layout(params or find_prunable(model))
    check_trainable(layout.params)
    check_dataloader(dataloader, num_grads, fisher_batch_size)
    t0 = time.perf_counter()
    G = (
        None
        if sink is not None
        else torch.empty(num_grads, layout.dim, dtype=torch.float32, device=out_device)
    )
    total = None
    row, info = 0, {}
    t_sink = 0.0
    for chunk in iter_grads(
        model,
        dataloader,
        layout,
        num_grads,
        keep=keep,
        fisher_batch_size=fisher_batch_size,
        chunk_size=chunk_size,
        loss_fn=loss_fn,
        device=device,
        progress=progress,
        stats=info,
        fisher_bytes=_sink_bytes(sink),
    ):
        if total is None:
            total = torch.zeros(layout.dim, dtype=torch.float64, device=chunk.device)
        for g in chunk:  # the fp64 sum in place: no (D,) fp64 temporary per chunk
            total.add_(g)
        if sink is not None:
            t1 = time.perf_counter()
            sink(chunk)
            t_sink += time.perf_counter() - t1
        else:
            G[row : row + chunk.shape[0]] = chunk.to(G.device)
        row += chunk.shape[0]
    mean = total.div_(num_grads).to(torch.float32)
    return GradStats(
        G=G,
        mean=mean,
        num_grads=info["num_grads"],
        num_samples=info["num_samples"],
        seconds=time.perf_counter() - t0,
        seconds_model=info["seconds_model"],
        seconds_sink=t_sink,
    )
