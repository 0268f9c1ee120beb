"""Collectives for hf_mfac's distributed code (sharded M-FAC and distributed pruning), on
``torch.distributed``.

:class:`Comm` is the small set of collectives hf_mfac uses: it counts the bytes it moves, works as a
no-op in one process (no process group, or a group of one), moves tensors to the current CUDA device
for NCCL, and turns an exception on any rank into the same :class:`DistributedError` on every rank
(:meth:`Comm.check`), so an error on one rank stops all ranks with its message instead of leaving
the others in a collective.

It lives here, outside :mod:`hf_mfac.optim` and :mod:`hf_mfac.pruning`, because both use it.
Importing this module starts nothing: a ``Comm`` reads the process group when it is created.
"""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

__all__ = ["Comm", "DistributedError"]

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single",
                             None) or getattr(dist, "all_gather_into_tensor", None)


class DistributedError(RuntimeError):
    """Raised on every rank when one or more ranks failed; the message names the ranks and their
    errors."""


class Comm:
    """Collectives on one process group (``None``: the default group), counting the bytes they move.

    Without an initialised process group (or in a group of one) every operation is local, so the
    same code runs in one process. ``bytes_received`` adds up what this rank receives: the payload
    of an all-reduce, the other ranks' pieces of an all-gather (padding included) or an all-to-all.
    Tensors are moved to the current CUDA device for NCCL and back.
    """

    def __init__(self, group=None):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.device = None
        if self.active and "nccl" in str(dist.get_backend(group)).lower():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bytes_received = 0
        self.calls = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None or t.device == self.device else t.to(self.device)

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) ``t`` over the ranks, in place; returns ``t``."""
        if not self.distributed:
            return t
        buf = self._dev(t)
        dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=self.group)
        if buf is not t:
            t.copy_(buf)
        self.bytes_received += t.numel() * t.element_size()
        self.calls += 1
        return t

    def all_gatherv(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenation (sum(sizes),) of every rank's 1-D ``t`` of ``sizes[rank]`` elements (padded
        gather)."""
        t = t.reshape(-1)
        if t.numel() != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} gives {t.numel()} elements; sizes say "
                             f"{sizes[self.rank]}")
        if not self.distributed:
            return t
        width = max(sizes)
        src = self._dev(t)
        if t.numel() < width:
            src = torch.cat([src, src.new_zeros(width - t.numel())])
        out = src.new_empty(self.world_size * width)
        _all_gather_single(out, src, group=self.group)
        self.bytes_received += (self.world_size - 1) * width * t.element_size()
        self.calls += 1
        if width * self.world_size != sum(sizes):
            out = torch.cat([out[r * width : r * width + s] for r, s in enumerate(sizes)])
        return out.to(t.device)

    def all_to_allv(self, t: torch.Tensor, send_sizes: list[int],
                    recv_sizes: list[int]) -> torch.Tensor:
        """Send ``t[sum(send_sizes[:s]):...]`` to rank s, return what every rank sent here, in rank
        order."""
        if not self.distributed:
            return t
        out = t.new_empty(sum(recv_sizes), device=self.device or t.device)
        dist.all_to_all_single(out, self._dev(t.contiguous()), recv_sizes, send_sizes,
                               group=self.group)
        self.bytes_received += (sum(recv_sizes) - recv_sizes[self.rank]) * t.element_size()
        self.calls += 1
        return out.to(t.device)

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        self.bytes_received += (self.world_size - 1) * len(pickle.dumps(obj))
        self.calls += 1
        return out

    def check(self, error: BaseException | None = None) -> None:
        """Agree on failure: every rank calls this at the same point, ``error`` set on the ranks
        that failed. If any did, every rank raises :class:`DistributedError` naming the failed ranks
        and their messages (when all ranks failed with the same message, each re-raises its own
        exception instead; a rank whose ``error`` is not an ``Exception``, e.g. a KeyboardInterrupt,
        re-raises it after telling the others). Cost: one all-reduce of one integer (plus an
        all-gather of the messages on failure)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        self.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 0:
            return
        msgs = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        by_msg: dict[str, list[int]] = {}
        for r, m in enumerate(msgs):
            if m is not None:
                by_msg.setdefault(m, []).append(r)
        if error is not None and (not isinstance(error, Exception) or
                                  list(by_msg.values()) == [list(range(self.world_size))]):
            # an interrupt stays one; every rank failed the same way: the error as in one process
            raise error
        failed = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
                           for m, rs in by_msg.items())
        raise DistributedError(
            f"stopped on all {self.world_size} ranks because {failed}"
        ) from error

    def agree(self, what: str, value) -> None:
        """Raise on every rank unless all ranks hold the same (picklable, comparable) ``value``."""
        values = self.all_gather_object(value)
        if any(v != values[0] for v in values):
            shown = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise DistributedError(f"{what} differs between ranks ({shown})")
