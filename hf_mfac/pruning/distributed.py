"""Distributed one-shot pruning: gradients data-parallel, Fisher blocks owned by ranks.

With N processes (``torchrun``, ``accelerate launch``, the Trainer's DDP) every rank holds the same
model.

1. **Gradients**: rank r computes its share of the m gradients on its shard of the calibration data
   (batches r, r + N, r + 2N, ... of the dataloader, unless it is sharded already). Each chunk of k
   gradients (k, D) is sent through one all-to-all so that every rank receives the columns of the
   Fisher blocks it owns from all ranks' chunks; every gradient is counted once. Per chunk and rank:
   about k·D·(N-1)/N values in and out.
2. **Fisher blocks**: contiguous ranges of whole blocks, balanced in size, one per rank (blocks
   never cross ranks), accumulated and factorised where they live: memory D·B/N values per rank for
   oBERT/CAP (m·D/N gradient columns for static M-FAC, held in host memory).
3. **Scores and updates**: for OBS (oBERT/WoodFisher, M-FAC) :class:`ShardedFisherInverse` answers
   the pruner's ``diag``/``mul``/``submatrix`` by computing the rank's coordinates and all-gathering
   them, so the pruner's own selection (one global threshold or per-layer) runs unchanged and
   identically on every rank; CAP eliminates inside the owned blocks, all-gathers the recorded
   losses (D values) for the global merge, applies the chosen prefixes locally and all-gathers the
   new weights and masks. Every rank ends with the same weights and masks, as tensors; no
   rank-0-only step, no object broadcast of the model.

Failures: before the gradients, the ranks compare their pruning targets (names, shapes, dtypes: one
all-gather of a hash), so a rank holding another model stops every rank with a message naming the
first difference. Each collective is preceded by a one-integer all-reduce of an error flag, and an
exception on any rank (any ``BaseException``: a KeyboardInterrupt too) is caught and reported at the
next such point, so all ranks raise :class:`~hf_mfac.comm.DistributedError` with the failing rank's
message instead of waiting for the timeout (the interrupted rank re-raises its KeyboardInterrupt).
Every rank then copies its target weights back, as :func:`~hf_mfac.pruning.prune_oneshot` does. An
interrupt that lands inside a collective (rather than between two, as an exception in the loss does)
leaves the other ranks to the process group's timeout.

Timeouts: ranks meet once per chunk of ``chunk_size`` gradients during collection, then a handful of
times per pruning step; a collective times out only when one rank is more than the process group's
``timeout`` behind the others. The default is 30 min for gloo and 10 min for NCCL; for very slow
gradients or huge CAP blocks raise it: ``torch.distributed.init_process_group(...,
timeout=datetime.timedelta(hours=2))``,
``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])``, or
``TrainingArguments(ddp_timeout=7200)`` with the Trainer.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch

from ..comm import Comm, DistributedError
from .config import SETTINGS, PruningConfig, oneshot_config
from .driver import _takes_out, restore_on_error, run_oneshot
from .pruners import CAPPruner, MFACPruner, Pruner, StepResult, make_pruner
from .targets import DEFAULT_TYPES

__all__ = ["DistributedPruner", "ShardedFisherInverse", "ShardedBatches",
           "prune_oneshot_distributed",
           "block_bounds", "DistributedError"]


def block_bounds(dim: int, block_size: int | None, world_size: int) -> list[int]:
    """Coordinate boundaries (world_size + 1,) of contiguous ranges of whole Fisher blocks of
    ``block_size`` (``None``: one block), balanced in number of blocks (so in size: all blocks but
    the last are equal)."""
    B = dim if not block_size else min(block_size, dim)
    nb = -(-dim // B)
    return [min(dim, (i * nb // world_size) * B) for i in range(world_size + 1)]


class ShardedBatches:
    """Batches ``rank, rank + N, rank + 2N, ...`` of ``dataloader``: this rank's shard of the
    calibration data. Re-iterable when the dataloader is."""

    def __init__(self, dataloader, rank: int, world_size: int):
        self.dataloader, self.rank, self.world_size = dataloader, rank, world_size

    def __iter__(self):
        for i, batch in enumerate(self.dataloader):
            if i % self.world_size == self.rank:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.dataloader) - self.rank + self.world_size - 1) // self.world_size

    def __getattr__(self, name):  # batch_size and the like, for the size checks
        if name == "dataloader":
            raise AttributeError(name)
        return getattr(self.dataloader, name)


def _is_sharded(dataloader) -> bool:
    """True for loaders that already give each rank its own data (DistributedSampler, accelerate's
    prepared)."""
    from torch.utils.data.distributed import DistributedSampler

    for obj in (getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None),
                dataloader):
        if (
            isinstance(obj, DistributedSampler)
            or type(obj).__module__.split(".")[0] == "accelerate"
        ):
            return True
    return False


class ShardedFisherInverse:
    """A block-diagonal ``F^{-1}`` whose blocks live on different ranks, seen whole from every rank.

    Rank r holds ``local`` (a :class:`~hf_mfac.core.BlockFisherInverse` or
    :class:`~hf_mfac.core.StaticMFAC`) for coordinates ``[bounds[r], bounds[r+1])``, or nothing.
    ``diag()``, ``mul(x)`` and ``submatrix(idx)`` give the same tensors as the unsharded inverse, on
    every rank: each rank computes its part, then one all-gather (D values for ``diag``/``mul``,
    n·g² for ``submatrix``). All ranks must make the same calls in the same order, as a pruner's
    replicated ``prune`` does. ``mean_grad``: the mean gradient over all ranks (WoodTaylor).
    """

    def __init__(
        self,
        comm: Comm,
        local,
        bounds: list[int],
        dim: int,
        dtype: torch.dtype,
        device,
        mean_grad: torch.Tensor | None = None,
    ):
        self.comm, self.local, self.bounds, self.dim = comm, local, bounds, dim
        self.dtype, self.device, self.mean_grad = dtype, torch.device(device), mean_grad
        self.start, self.stop = bounds[comm.rank], bounds[comm.rank + 1]
        self.sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        self._diag = None

    def _empty(self, *shape) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.dtype, device=self.device)

    def _gather(self, local: torch.Tensor | None, sizes) -> torch.Tensor:
        local = self._empty(0) if local is None else local.to(device=self.device, dtype=self.dtype)
        self.comm.check()
        return self.comm.all_gatherv(local.reshape(-1), sizes)

    def diag(self) -> torch.Tensor:
        """``diag(F^{-1})`` (D,), gathered once and cached (the pruners ask for it more than
        once)."""
        if self._diag is None:
            self._diag = self._gather(None if self.local is None else self.local.diag(), self.sizes)
        return self._diag

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^{-1} x`` (D,) for x (D,), identical on all ranks."""
        y = None if self.local is None else self.local.mul(x.reshape(-1)[self.start : self.stop])
        return self._gather(y, self.sizes)

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``[F^{-1}]_QQ`` (n, g, g) for groups ``idx`` (n, g) that each lie inside one rank's
        blocks."""
        idx = torch.as_tensor(idx, device=self.device)
        n, g = idx.shape
        ends = torch.tensor(self.bounds[1:], device=self.device)
        owner = torch.searchsorted(ends, idx, right=True)  # (n, g) rank holding each coordinate
        if bool((owner != owner[:, :1]).any()):
            raise ValueError(
                "a group of weights straddles two ranks' Fisher blocks; groups must "
                "lie inside one block"
            )
        owner = owner[:, 0]
        mine = idx[owner == self.comm.rank] - self.start
        sub = (
            self.local.submatrix(mine)
            if (self.local is not None and mine.numel())
            else self._empty(0, g, g)
        )
        counts = torch.bincount(owner, minlength=self.comm.world_size).tolist()
        flat = self._gather(sub, [c * g * g for c in counts]).view(n, g, g)  # rows grouped by owner
        out = torch.empty_like(flat)
        out[torch.sort(owner, stable=True).indices] = flat
        return out

    def blocks(self) -> torch.Tensor:
        """All inverse blocks (nb, B, B): only in one process (over several ranks, use
        :meth:`block_range`)."""
        if self.comm.distributed:
            raise RuntimeError(
                "the Fisher blocks are spread over the ranks; use block_range() on each rank"
            )
        return self.local.blocks()

    def local_blocks(self):
        """This rank's inverse blocks as a block source (nb_r, B, B): its
        :class:`~hf_mfac.core.BlockFisherInverse` itself, read a page of blocks at a time (no whole
        fp32 copy of the packed blocks), or the local inverse's ``blocks()``; None when it owns
        none."""
        if self.local is None:
            return None
        return self.local if hasattr(self.local, "unpack") else self.local.blocks()

    def block_range(self, block_size: int):
        """What a step that works block by block needs on this rank: ``(hinv, first, gather)``, this
        rank's inverse blocks (nb_r, B, B) (possibly none), the index of the first, and
        ``gather(t)``, which concatenates a per-block tensor (nb_r, ...) over the ranks into (nb,
        ...) in block order (one all-gather)."""
        B = block_size
        hinv = self.local_blocks()
        if hinv is None:
            hinv = torch.zeros(0, B, B, dtype=self.dtype, device=self.device)
        counts = [(b - a) // B for a, b in zip(self.bounds, self.bounds[1:])]  # blocks per rank

        def gather(t: torch.Tensor) -> torch.Tensor:
            per = math.prod(t.shape[1:])
            self.comm.check()
            return self.comm.all_gatherv(t.reshape(-1), [c * per for c in counts]).view(
                sum(counts), *t.shape[1:]
            )

        return hinv, self.start // B, gather


class _ShardSink:
    """Gradient sink of one rank (what ``pruner.new_fisher`` returns): exchanges every chunk so that
    each rank feeds its local Fisher with the columns it owns of all ranks' gradients. Relative
    damping (``rel_damp``) averages the Fisher diagonal over all ranks' blocks (one all-reduce of 2
    values per damping group)."""

    def __init__(self, owner: "DistributedPruner", dim: int, num_grads: int, device, groups=None):
        comm = self.comm = owner.comm
        self.owner, self.dim, self.device = owner, dim, torch.device(device)
        self.bounds = block_bounds(dim, owner.inner.block_size, comm.world_size)
        self.start, self.stop = self.bounds[comm.rank], self.bounds[comm.rank + 1]
        self.widths = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        total = num_grads * comm.world_size
        local_groups = None if groups is None else groups[self.start : self.stop]
        self.local = (
            owner.inner.new_fisher(self.stop - self.start, total, device, groups=local_groups)
            if self.stop > self.start
            else None
        )
        self.num_groups = 1 if groups is None or not groups.numel() else int(groups.max()) + 1
        # the block Fisher calls damp_reduce when it inverts
        self.reduces = owner.inner.rel_damp is not None
        if self.local is not None and self.reduces:
            self.local.damp_reduce = self._reduce_damp
        self.sum = (
            torch.zeros(dim, dtype=torch.float64, device=device) if owner.woodtaylor else None
        )
        self.num_grads = 0

    def _reduce_damp(self, acc: torch.Tensor) -> None:
        """Sum the (2, n) per-group diagonal sums and counts over the ranks, in place (n <=
        num_groups here)."""
        full = torch.zeros(2, self.num_groups, dtype=torch.float64, device=acc.device)
        full[:, : acc.shape[1]] = acc
        self.comm.check()
        self.comm.all_reduce(full)
        acc.copy_(full[:, : acc.shape[1]])

    def add_grads(self, chunk: torch.Tensor) -> None:
        k = chunk.shape[0]
        # (k D,)
        send = torch.cat([chunk[:, a:b].reshape(-1) for a, b in zip(self.bounds, self.bounds[1:])])
        width = self.stop - self.start
        self.comm.check()
        recv = self.comm.all_to_allv(
            send, [k * w for w in self.widths], [k * width] * self.comm.world_size
        )
        if self.local is not None:
            self.local.add_grads(recv.view(self.comm.world_size * k, width))  # (N k, D_r)
        if self.sum is not None:
            self.sum += chunk.sum(0, dtype=torch.float64)
        self.num_grads += k * self.comm.world_size

    def finish(self) -> ShardedFisherInverse:
        local = None if self.local is None else self.local.finish()
        # invert now, so that every rank takes part in the damping's all-reduce here
        if self.reduces:
            if local is None:
                self._reduce_damp(torch.zeros(2, 0, dtype=torch.float64, device=self.device))
            else:  # forming the inverse: no copy of its blocks
                local.invert() if hasattr(local, "invert") else local.blocks()
        dtype = None if local is None else getattr(local, "dtype", None) or local.W.dtype
        self.comm.check()
        dtypes = {
            str(d) for d in self.comm.all_gather_object(None if dtype is None else str(dtype)) if d
        }
        dtype = getattr(torch, dtypes.pop().replace("torch.", ""))
        mean = None
        if self.sum is not None:
            self.comm.check()
            mean = (self.comm.all_reduce(self.sum) / self.num_grads).to(torch.float32)
        return ShardedFisherInverse(
            self.comm, local, self.bounds, self.dim, dtype, self.device, mean
        )


class DistributedPruner(Pruner):
    """Runs a :class:`~hf_mfac.pruning.Pruner` over the ranks of a process group (see the module
    docstring).

    Give it to :func:`~hf_mfac.pruning.prune_oneshot` as ``method=`` on every rank (or use
    :func:`prune_oneshot_distributed`). ``num_grads`` given to ``prune_oneshot`` is then per rank:
    the Fisher uses ``num_grads * world_size`` gradients. Magnitude pruning needs no communication
    (every rank computes the same masks); OBS methods go through :class:`ShardedFisherInverse`; CAP
    has its own distributed step.
    """

    runs_over_ranks = True  # prune_oneshot does not redirect it to prune_oneshot_distributed

    def __init__(self, pruner: Pruner | str, group=None, **kwargs):
        self.inner = make_pruner(pruner, **kwargs)
        if isinstance(self.inner, DistributedPruner):
            raise TypeError("the pruner is already distributed")
        self.comm = Comm(group)
        self._checked = False

    # the configuration prune_oneshot reads, forwarded to the wrapped pruner
    name = property(lambda self: self.inner.name)
    uses_fisher = property(lambda self: self.inner.uses_fisher)
    pattern = property(lambda self: self.inner.pattern)
    scope = property(lambda self: self.inner.scope)
    block_size = property(lambda self: self.inner.block_size)
    damp = property(lambda self: self.inner.damp)
    woodtaylor = property(lambda self: self.inner.woodtaylor)
    device = property(lambda self: self.inner.device)
    pad = property(lambda self: self.inner.pad)
    default_num_grads = property(lambda self: self.inner.default_num_grads)
    grads_device = property(lambda self: getattr(self.inner, "grads_device", None))

    def __getattr__(self, name):  # anything else the driver may read
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def check(self, layout) -> None:
        """The wrapped pruner's checks, then every rank must hold the same targets (before any
        gradient)."""
        error = None
        try:
            self.inner.check(layout)
            if isinstance(self.inner, MFACPruner) and self.inner.rel_damp is not None:
                raise NotImplementedError(
                    "distributed static M-FAC needs an absolute damping: "
                    "pass damp=... (its "
                    "relative damping is not yet averaged over the ranks)"
                )
        except Exception as e:  # noqa: BLE001 - reported on every rank
            error = e
        self.comm.check(error)
        self._agree_on_layout(layout)

    def _agree_on_layout(self, layout) -> None:
        """Raise :class:`DistributedError` on every rank unless all ranks hold the same targets
        (names, shapes, dtypes): one all-gather of a hash and a summary; the whole list is gathered
        only to name a difference."""
        rows = [
            f"{name} {tuple(shape)} {layout.params[name].dtype}"
            for name, shape in zip(layout.names, layout.shapes)
        ]
        digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        summary = f"{len(rows)} targets, {layout.numel} weights"
        self.comm.check()
        seen = self.comm.all_gather_object((digest, summary))
        if all(d == seen[0][0] for d, _ in seen):
            return
        every = self.comm.all_gather_object(rows)
        diffs = []
        for r, other in enumerate(every[1:], 1):
            if other != every[0]:
                i = next(
                    (i for i, (a, b) in enumerate(zip(every[0], other)) if a != b),
                    min(len(other), len(every[0])),
                )
                show = lambda rs: rs[i] if i < len(rs) else "nothing"  # noqa: E731
                diffs.append(
                    f"rank {r} has {seen[r][1]}, target {i} is {show(other)} (rank 0: "
                    f"{show(every[0])})"
                )
        raise DistributedError(
            f"the ranks hold different pruning targets (rank 0: {seen[0][1]}); "
            + "; ".join(diffs)
            + ". Every rank must prune the same model"
        )

    def config(self) -> dict:
        return {**self.inner.config(), "world_size": self.comm.world_size}

    def fisher_bytes(self, dim: int, num_grads: int) -> int:
        """This rank's share: its blocks of the Fisher over ``num_grads * world_size`` gradients."""
        b = block_bounds(dim, self.inner.block_size, self.comm.world_size)
        width = max(y - x for x, y in zip(b, b[1:]))
        return self.inner.fisher_bytes(width, num_grads * self.comm.world_size) if width else 0

    def new_fisher(self, dim: int, num_grads: int, device, groups: torch.Tensor | None = None):
        return _ShardSink(self, dim, num_grads, device, groups)

    def fisher_key(self) -> None:
        """None: ``prune_oneshot(fisher_cache=...)`` does not reuse sharded inverses (a hit on some
        ranks and a miss on others would leave ranks in different collectives); every run collects
        its gradients."""
        return None

    def _agree_on_inputs(self, w: torch.Tensor, keep: torch.Tensor) -> None:
        """Every rank must start from the same weights and masks (else the results would silently
        differ)."""
        pos = torch.arange(1, w.numel() + 1, dtype=torch.float64, device=w.device)
        wd = w.to(torch.float64)
        fp = torch.stack(
            [wd.sum(), (wd * pos).sum(), (wd * wd).sum(), keep.sum().to(torch.float64)]
        )
        self.comm.check()
        fps = self.comm.all_gatherv(fp, [4] * self.comm.world_size).view(-1, 4)
        if not bool((fps == fps[:1]).all()):
            raise DistributedError(
                "the ranks hold different weights or masks of the pruning "
                "targets; every rank "
                "must start from the same model (load it the same way, or "
                "broadcast it first)"
            )

    def prune(
        self, layout, w, keep, *, sparsity=None, zeros=None, finv=None, grad=None, out=None
    ) -> StepResult:
        """The inner pruner's step over all ranks; ``out`` (the new weights may be written there,
        e.g. over ``w``) is passed on where the inner step takes it, CAP's merge over ranks
        returns its own."""
        self._agree_on_inputs(w, keep)
        into = {"out": out} if out is not None and _takes_out(self.inner) else {}
        if not self.uses_fisher:  # magnitude: the same masks on every rank, nothing to exchange
            return self.inner.prune(
                layout, w, keep, sparsity=sparsity, zeros=zeros, finv=finv, grad=grad, **into
            )
        # CAP's own step on this rank's blocks, the merge over all blocks
        if isinstance(self.inner, CAPPruner):
            hinv, first, gather = finv.block_range(self.inner.block_size)
            return self.inner.prune_blocks(
                layout, w, keep, hinv, first, sparsity=sparsity, zeros=zeros, gather=gather
            )
        if self.woodtaylor:
            grad = finv.mean_grad
        return self.inner.prune(
            layout, w, keep, sparsity=sparsity, zeros=zeros, finv=finv, grad=grad, **into
        )


def prune_oneshot_distributed(
    model,
    dataloader=None,
    config: PruningConfig | None = None,
    *,
    shard_data: bool | str = "auto",
    group=None,
    **kwargs,
):
    """:func:`~hf_mfac.pruning.prune_oneshot` over all ranks of ``group`` (call it on every rank).

    Same arguments and result as ``prune_oneshot`` (``config`` and its keyword overrides, the
    runtime keywords; every rank gets the same masks and report, and ends with the same model),
    except:

    * ``num_grads``: the total number of gradients; each rank computes ``ceil(num_grads / N)`` of
      them (the report gives the total used).
    * ``shard_data``: ``"auto"`` (default) gives rank r the batches r, r + N, ... of ``dataloader``,
      unless the dataloader is already sharded (a ``DistributedSampler``, or prepared by
      accelerate); ``True`` / ``False`` force it. The same dataloader can thus be passed on every
      rank.
    * ``method``: a name with the pruner settings (``pattern``, ``block_size``, ...), a
      :class:`Pruner`, or a :class:`DistributedPruner` (then ``group`` is its own).

    Works without a process group too (then it is ``prune_oneshot``). Errors on any rank
    (KeyboardInterrupt included) raise :class:`~hf_mfac.comm.DistributedError` on every rank (the
    interrupted rank re-raises its KeyboardInterrupt), and every rank copies its target weights
    back, as ``prune_oneshot`` does (one host copy of the target weights). A rank whose targets
    (names, shapes, dtypes), weights, masks or settings differ from the others' stops every rank
    before the gradients. See the module docstring for the process-group ``timeout`` to use with
    long gradient collections.
    """
    settings = {k: kwargs.pop(k) for k in SETTINGS if k in kwargs}
    method = settings.get("method", getattr(config, "method", None))
    comm = method.comm if isinstance(method, DistributedPruner) else Comm(group)
    error = agreed = None
    try:
        config, dataloader, agreed = _setup(
            model, dataloader, config, settings, shard_data, group, comm, kwargs
        )
    except BaseException as e:  # noqa: BLE001 - reported on every rank
        error = e
    comm.check(error)
    comm.agree("the pruning settings", agreed)
    # a rank done before another failed puts its weights back too; the host copy is taken only
    # when the run first writes the weights (before_update), not through the gradients
    with restore_on_error(kwargs["targets"], lazy=True):
        try:
            result = run_oneshot(model, dataloader, config, **kwargs)
        except DistributedError:  # raised on every rank already
            raise
        except BaseException as e:  # noqa: BLE001
            error = e
        comm.check(error)
    if config.method.uses_fisher:
        result.report.num_grads = config.num_grads * comm.world_size
    return result


def _setup(model, dataloader, config, settings: dict, shard_data, group, comm: Comm, runtime: dict):
    """This rank's settings (the pruner distributed, ``num_grads`` per rank), data shard and the
    settings every rank must agree on; ``runtime`` (the ``prune_oneshot`` keywords that are not
    settings) gets the targets, resolved once."""
    config = oneshot_config(config, **settings)
    pruner = config.pruner(
        device=runtime.pop("device", None), page_bytes=runtime.pop("page_bytes", None)
    )
    if not isinstance(pruner, DistributedPruner):
        pruner = DistributedPruner(pruner, group)
        pruner.comm = comm
    config = config.with_pruner(pruner)
    if pruner.uses_fisher:  # the total over the ranks; each rank computes its share
        config = config.replace(
            num_grads=math.ceil((config.num_grads or pruner.default_num_grads) / comm.world_size)
        )
    if (
        dataloader is not None
        and comm.distributed
        and (shard_data is True or (shard_data == "auto" and not _is_sharded(dataloader)))
    ):
        dataloader = ShardedBatches(dataloader, comm.rank, comm.world_size)
    types = runtime.pop("types", DEFAULT_TYPES)
    if runtime.get("targets") is None:
        runtime["targets"] = config.find_targets(model, types)
    values = {**{k: getattr(config, k) for k in SETTINGS if k != "method"}, **runtime}
    plain = (int, float, str, bool, type(None), tuple)
    agreed = {
        k: tuple(v) if isinstance(v, list) else v if isinstance(v, plain) else str(type(v))
        for k, v in values.items()
        if not isinstance(v, Mapping) and k != "progress"
    }
    agreed["pruner"] = repr(pruner.inner)
    runtime["progress"] = runtime.get("progress", True) and comm.rank == 0
    return config, dataloader, agreed
