"""Gradient sources for the empirical Fisher: m gradients of the loss, streamed in chunks.

Each gradient is the mean loss gradient over one *Fisher mini-batch* ([WoodFisher, §5.1]: averaging
over a mini-batch lets the Fisher see mini-batch times more samples at the same cost), by default
one batch of the dataloader; ``fisher_batch_size`` re-cuts the dataloader's batches (``1`` =
per-sample gradients). The model runs in eval mode (no dropout), the gradients are taken with
``torch.autograd.grad`` (the parameters' ``.grad`` is left alone, so this is safe inside a training
loop), each target's gradient copied into its chunk row (fp32) as the backward pass produces it and
then freed, masked, and handed to ``sink`` in chunks of (k, D) rows of a
:class:`~hf_mfac.pruning.targets.Layout`, so the m x D matrix is never held unless the caller wants
it (``sink=None``: the static M-FAC pruner).

Distribution later: each rank can run :func:`iter_grads` over its shard and all-reduce the Fisher
accumulators; nothing here assumes a single process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core._checks import check_positive_int, free_bytes
from .targets import Layout, find_prunable, module_modes

__all__ = ["collect_grads", "iter_grads", "GradStats", "default_loss", "check_dataloader",
           "check_trainable", "check_fisher_batch_size", "SplitChunk", "model_input_device"]


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
    """What a gradient collection produced: ``G`` (m, D) when kept, the mean gradient (D,) when
    asked (else None), counts,
    time: ``seconds`` in all, ``seconds_model`` in the forward and backward passes, ``seconds_sink``
    in the sink (the Fisher's accumulation)."""

    G: torch.Tensor | None
    mean: torch.Tensor | None
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


class SplitChunk(NamedTuple):
    """A chunk of k gradients whose columns lie on several devices: ``pieces`` ``[(start, stop,
    tensor (k, stop - start))]``, covering the layout's D coordinates in order (what
    :func:`iter_grads` yields with ``parts``)."""

    pieces: list

    @property
    def shape(self) -> tuple[int, int]:
        return (self.pieces[0][2].shape[0], self.pieces[-1][1])

    def whole(self, device=None) -> torch.Tensor:
        """The chunk (k, D) on ``device`` (default: the first piece's)."""
        device = self.pieces[0][2].device if device is None else device
        return torch.cat([t.to(device) for _, _, t in self.pieces], dim=1)


def _pieces(chunk) -> list:
    """``[(start, stop, tensor)]`` of a chunk: a :class:`SplitChunk`'s pieces, or one piece."""
    return chunk.pieces if isinstance(chunk, SplitChunk) else [(0, chunk.shape[1], chunk)]


def model_input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the execution device of accelerate's hook on the model itself
    (a dispatched model), else the device of its first parameter that is not on the meta device."""
    hook = getattr(model, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        dev = getattr(h, "execution_device", None)
        if dev is not None and not isinstance(dev, Mapping):
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return next(model.parameters()).device


def _sink_bytes(sink) -> int | None:
    """The bytes held by the Fisher a sink feeds (``fisher.add_grads``), when it says
    (``storage_bytes()``)."""
    owner = getattr(sink, "__self__", None)
    size = getattr(owner, "storage_bytes", None)
    return int(size()) if callable(size) else None


def _fill(g: torch.Tensor, route, rows) -> None:
    """Copy one target's gradient ``g`` into its columns of the chunk's ``rows`` (fp32)."""
    flat = g.reshape(-1)
    for j, a, b, ga, gb in route:
        rows[j][a:b] = flat[ga:gb].to(device=rows[j].device, dtype=torch.float32)


def _streamed_grads(loss: torch.Tensor, params, routes, rows) -> None:
    """The gradients of ``loss`` with respect to ``params`` written into the chunk's ``rows`` as the
    backward pass produces them, one target at a time.

    ``torch.autograd.grad`` would hold every target's gradient until the pass ends (4 bytes a
    target weight, 0.32 GiB at BERT-base, while the activations are still being freed). Here a
    hook on each target (``register_hook``: it runs before autograd captures the gradient) copies
    the gradient into its columns and hands autograd a zero-stride stand-in of the same shape
    instead, so each target's gradient is freed as soon as it is copied. The parameters' ``.grad``
    is not touched (``autograd.grad``, not ``backward``, and so no gradient-accumulation hooks,
    e.g. DDP's, run), and the hooks are removed whatever happens. Where a hook did not run (a
    PyTorch whose engine captures before the hooks), the captured gradient is copied instead."""
    filled = [False] * len(params)

    def hook_for(i):
        def hook(g):
            if g is None:
                return None
            _fill(g, routes[i], rows)
            filled[i] = True
            return g.new_zeros(()).expand(g.shape)  # what autograd captures: no storage

        return hook

    handles = []
    try:
        for i, p in enumerate(params):
            if p.requires_grad:
                handles.append(p.register_hook(hook_for(i)))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for i, g in enumerate(grads):
        if g is not None and not filled[i]:
            _fill(g, routes[i], rows)


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
    parts: Sequence[tuple[int, int, object]] | None = None,
):
    """Yield chunks (k, D) fp32 of flattened, masked gradients until ``num_grads`` rows were
    produced.

    ``keep`` (D,) bool zeroes the pruned coordinates (the Fisher of the remaining sub-network: its
    inverse is then block-diagonal between pruned and kept weights, so OBS updates never touch
    pruned weights). The model is put in eval mode and every module's mode restored afterwards.
    Chunks are reused buffers: consume them before asking for the next one. ``fisher_bytes``: the
    size of the Fisher the chunks feed, which sizes the default chunk (:func:`default_chunk_size`).
    ``stats`` gets the counts and ``seconds_model``, the time of the forward and backward passes and
    of flattening the gradients. ``parts``: ``[(start, stop, device)]`` ranges of coordinates that
    cover [0, D) in order (a Fisher placed on several devices): each range's columns are filled on
    its device, straight from the weight's gradient, and the chunks are :class:`SplitChunk` s
    (``device`` is then unused). The inputs go to the model's own input device
    (:func:`model_input_device`; accelerate's hooks move them on from there)."""
    loss_fn = loss_fn or default_loss
    params = [layout.params[n] for n in layout.names]
    model_device = model_input_device(model)
    device = torch.device(device) if device is not None else model_device
    split = parts is not None
    spec = [(0, layout.dim, device)] if not split else [
        (int(s), int(e), torch.device(d)) for s, e, d in parts]
    if split and (spec[0][0] != 0 or spec[-1][1] != layout.dim
                  or any(a[1] != b[0] for a, b in zip(spec, spec[1:]))):
        raise ValueError(f"parts {parts} do not cover the {layout.dim} coordinates in order")
    if chunk_size is None:  # each device's slice within its own bounds
        chunk_size = min(
            default_chunk_size(e - s, num_grads, device=d, fisher_bytes=None if fisher_bytes is None
                               else fisher_bytes * (e - s) // max(1, layout.dim))
            for s, e, d in spec
        )
    else:
        chunk_size = min(check_positive_int("chunk_size", chunk_size), num_grads)
    bufs = [torch.zeros(chunk_size, e - s, dtype=torch.float32, device=d) for s, e, d in spec]
    # the kept coordinates of each range: views of ``keep`` where it is a bool mask on the range's
    # device (no copy, not its negation, not an fp32 copy)
    keeps = [None if keep is None else keep[s:e].to(device=d, dtype=torch.bool)
             for s, e, d in spec]
    zero = [torch.zeros((), dtype=torch.float32, device=d) for _, _, d in spec]
    # where each target's gradient goes: (piece, its columns, the gradient's elements)
    routes = []
    for off, n in zip(layout.offsets, layout.numels):
        routes.append([
            (j, max(off, s) - s, min(off + n, e) - s, max(off, s) - off, min(off + n, e) - off)
            for j, (s, e, _) in enumerate(spec) if max(off, s) < min(off + n, e)
        ])
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
                rows = [b[k] for b in bufs]
                for row in rows:
                    row.zero_()
                with torch.enable_grad():
                    loss = loss_fn(model, micro)
                    if not loss.requires_grad:
                        raise ValueError(
                            "the loss does not depend on the target weights (requires_grad is off?)"
                        )
                    _streamed_grads(loss, params, routes, rows)
                del loss
                for row, kp, z in zip(rows, keeps, zero):
                    if kp is not None:  # the pruned coordinates set to zero, in place
                        torch.where(kp, row, z, out=row)
                t_model += time.perf_counter() - t0
                samples += _batch_len(micro) if isinstance(micro, Mapping) else 1
                k += 1
                done += 1
                bar.update(1)
                if k == chunk_size or done == num_grads:
                    if split:
                        yield SplitChunk([(s, e, b[:k]) for (s, e, _), b in zip(spec, bufs)])
                    else:
                        yield bufs[0][:k]
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
    parts: Sequence[tuple[int, int, object]] | None = None,
    mean: bool = True,
) -> GradStats:
    """Collect ``num_grads`` (m) loss gradients of the target weights.

    ``params``: a :class:`Layout`, a ``{name: parameter}`` mapping, or None (:func:`find_prunable`
    defaults). ``sink``: called with each fp32 chunk (k, D), e.g. ``BlockFisherInverse.add_grads``;
    with ``sink=None`` the gradients are returned as ``G`` (m, D) on ``out_device`` (host memory by
    default, as the static M-FAC pruner needs them). ``per_sample=True`` is ``fisher_batch_size=1``.
    The mean gradient (D,) is returned with ``mean=True`` (WoodTaylor needs it; its fp64 running
    sum costs 8 bytes per coordinate during the collection), else ``GradStats.mean`` is None.
    Cost: m forward/backward passes; memory ``chunk_size * D`` values on ``device`` (default: the
    model's device; ``chunk_size`` defaults to :func:`default_chunk_size`, sized by the Fisher the
    sink feeds), one target's gradient at a time (streamed into the chunk), ``keep`` itself (a
    copy only where it is not a bool mask on the chunk's device), plus ``m * D`` on
    ``out_device`` when ``sink`` is None. ``parts`` (a Fisher on several devices, see
    :func:`iter_grads`): the chunks are :class:`SplitChunk` s, each range of coordinates (its
    slice of the chunk and of the running sum) on its own device; the mean gradient is on the first
    range's device."""
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
        parts=parts,
    ):
        pieces = _pieces(chunk)
        if total is None and mean:
            total = [torch.zeros(e - s, dtype=torch.float64, device=t.device) for s, e, t in pieces]
        for (s, e, t), tot in zip(pieces, total or ()):
            for g in t:  # the fp64 sum in place: no (D,) fp64 temporary per chunk
                tot.add_(g)
        if sink is not None:
            t1 = time.perf_counter()
            sink(chunk)
            t_sink += time.perf_counter() - t1
        else:
            for s, e, t in pieces:
                G[row : row + t.shape[0], s:e] = t.to(G.device)
        row += chunk.shape[0]
    avg = None
    if total is not None:
        first = total[0].device
        avg = [t.div_(num_grads).to(device=first, dtype=torch.float32) for t in total]
        avg = avg[0] if len(avg) == 1 else torch.cat(avg)
    return GradStats(
        G=G,
        mean=avg,
        num_grads=info["num_grads"],
        num_samples=info["num_samples"],
        seconds=time.perf_counter() - t0,
        seconds_model=info["seconds_model"],
        seconds_sink=t_sink,
    )
