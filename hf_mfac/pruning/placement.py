"""Where the block Fisher lives: one device, several devices of one process, or the weights' own.

``prune_oneshot(..., device=...)`` takes (:func:`parse_fisher_device`):

* ``None`` (default): the targets' device; when the targets lie on several devices (a model
  dispatched by accelerate with a ``device_map``), each target's blocks on its own weight's device
  (:func:`home_placement`).
* one device (``"cuda:1"``, ``torch.device``, a GPU index): the whole Fisher there, as before.
* several devices (``["cuda:0", "cuda:1", "cpu"]``), with optional capacities
  (``{"cuda:0": 30 * 2**30, "cpu": 60 * 2**30}`` or ``[("cuda:0", 30 * 2**30), ...]``: at most that
  many bytes there; otherwise what the device has available), or ``"auto"``: every visible GPU,
  then the CPU. The blocks are planned by :func:`plan_placement`.

The plan is a pure function of the capacities: contiguous ranges of whole blocks (a target's blocks
stay together, and each device's share of a gradient chunk is one slice of columns); the
accelerators share the blocks in proportion to their room, so that each keeps the same fraction of
its memory free and their work runs at once (CUDA launches are asynchronous), and the CPU gets only
what the accelerators cannot hold. sparseml deals blocks out round-robin, which scatters every
target and every chunk over all devices. Among the accelerators the ranges follow the weights: the
device that holds the first targets' weights takes the first blocks (``homes``).

:class:`PlacedFisher` is the gradient sink of a placed Fisher (one block Fisher per part, each
accumulated and inverted on its device; the relative damping is taken over all parts, as on one
device) and :class:`PlacedFisherInverse` the inverse the pruners query: ``diag``/``mul``/
``submatrix`` part by part, and whole blocks a page at a time (``unpack``), so that no device ever
holds another's blocks whole. The selection and the update run on the work device (an accelerator
when one is used, else the CPU) over the flat weights, and are written back in place into each
weight on its own device.

Several devices place the block Fisher of oBERT and CAP; static M-FAC keeps its gradients on
``grads_device`` and takes one device, and under several processes each rank keeps its shard on
its one device (``prune_oneshot_distributed``).

A model whose targets are offloaded by accelerate (weights on the meta device, their values in the
hooks' ``weights_map``: ``cpu_offload``, ``disk_offload``, or "cpu"/"disk" entries of a device_map
under an accelerator main device) is refused before any work (:func:`check_resident`).
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..core._checks import free_bytes
from .footprint import coordinate_bytes  # the memory estimate's table
from .grads import default_chunk_size

__all__ = ["FisherPart", "plan_placement", "plan_fisher_placement", "home_placement",
           "parse_fisher_device", "check_device", "check_resident", "PlacedFisher",
           "PlacedFisherInverse", "describe_plan"]

logger = logging.getLogger("hf_mfac")


def _size(nbytes: float) -> str:
    """``nbytes`` for a message: GiB from 0.25 GiB, else MiB from 1 MiB, else KiB."""
    if nbytes >= 1 << 28:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:.1f} KiB"


class FisherPart(NamedTuple):
    """Blocks ``start .. stop - 1`` of the Fisher on ``device``."""

    device: str
    start: int
    stop: int


# -- devices ------------------------------------------------------------------------------------
def check_device(device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists in this process (a CUDA device without an index
    gets the current one; ``"cpu:N"`` is the CPU), else ``ValueError`` naming it and ``what``."""
    if isinstance(device, bool):
        raise TypeError(f"{what} must be a device, a list of devices or 'auto'; got {device!r}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"{what}={device!r} is not a device: give e.g. 'cpu', 'cuda:0', a GPU index, a list "
            f"of devices, or 'auto' ({e})"
        ) from None
    if dev.type == "meta":
        raise ValueError(f"{what}={device!r}: the Fisher needs memory; the meta device has none")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = dev.index if dev.index is not None else (
            torch.cuda.current_device() if count else 0)
        if index >= count:
            seen = f"{count} CUDA device(s) visible" if count else "no CUDA device is visible"
            raise ValueError(f"{what}={device!r} does not exist: {seen} in this process")
        return torch.device("cuda", index)
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{what}={device!r}: no {dev.type} device is available in this process")
    return dev


def _capacity(device: torch.device, given) -> int | None:
    if given is None:
        return free_bytes(device)
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not given >= 0:
        raise ValueError(f"the capacity of {device} must be a number of bytes >= 0; got {given!r}")
    return int(given)


def parse_fisher_device(spec) -> torch.device | list[tuple[torch.device, int | None]] | None:
    """The Fisher placement ``spec`` of ``prune_oneshot(device=...)``, checked (every device must
    exist here): None, one ``torch.device``, or slots ``[(device, capacity bytes or None)]`` for
    several devices (``"auto"``: the visible GPUs, most free memory first, then the CPU; a list may
    name one device twice, which splits its capacity in two slots). A capacity not given is what
    the device has available now (None when it cannot be told: unbounded)."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
        slots = [(torch.device("cuda", i), free_bytes(torch.device("cuda", i))) for i in gpus]
        slots.sort(key=lambda s: -(s[1] or 0))
        return slots + [(torch.device("cpu"), free_bytes(torch.device("cpu")))]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = [tuple(x) if isinstance(x, (list, tuple)) else (x, None) for x in spec]
        if any(len(x) != 2 for x in items):
            raise ValueError(
                f"device={spec!r}: each entry is a device or a (device, capacity bytes) pair"
            )
    else:
        return check_device(spec)
    if not items:
        raise ValueError("device=[] names no device: give one, several, or 'auto'")
    slots = []
    for dev, cap in items:
        d = check_device(dev)
        slots.append((d, _capacity(d, cap)))
    return slots


# -- the plan -----------------------------------------------------------------------------------
def _shares(n: int, rooms: Sequence[int]) -> list[int]:
    """``n`` items over bins of ``rooms`` (sum >= n), in proportion to the rooms (largest
    remainders), never above a room."""
    total = sum(rooms)
    if n == 0 or total == 0:
        return [0] * len(rooms)
    exact = [n * r / total for r in rooms]
    out = [min(r, math.floor(x)) for r, x in zip(rooms, exact)]
    order = sorted(range(len(rooms)), key=lambda i: (-(exact[i] - out[i]), i))
    left = n - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < rooms[i]:
                out[i] += 1
                left -= 1
    return out


def plan_placement(num_blocks: int, block_bytes: int, slots, *, per_device_bytes=0,
                   homes: Sequence | None = None) -> list[FisherPart]:
    """Contiguous ranges of the Fisher's blocks over devices of given capacities, in block order.

    ``slots``: ``{device: bytes}`` or ``[(device, bytes)]`` (a device may appear twice; bytes None:
    unbounded). ``block_bytes``: what one block takes on its device (its share of the Fisher and of
    the gradient chunk); ``per_device_bytes``: what each device needs besides its blocks (an int
    for every slot, or ``{device: bytes}`` off the device's first slot, e.g. the step's vectors on
    the work device). The accelerators (any
    device but the CPU) share the blocks in proportion to their room; if they cannot hold all of
    them, each fills its room and the CPU slots share the rest, in proportion to theirs. Ranges are
    ordered by the blocks' ``homes`` (the device of each block's weight, when given: the device
    holding the first weights comes first), then accelerators by room, largest first, then the
    CPU. A pure function: the same capacities give the same plan. ``MemoryError`` naming the
    shortfall when all the slots together cannot hold the blocks."""
    if isinstance(num_blocks, bool) or num_blocks < 0 or block_bytes <= 0:
        raise ValueError(
            f"need num_blocks >= 0 and block_bytes > 0; got {num_blocks}, {block_bytes}"
        )
    items = list(slots.items()) if isinstance(slots, Mapping) else [tuple(s) for s in slots]
    if not items:
        raise ValueError("no device to place the Fisher on")

    def reserve(i) -> int:  # a mapping's bytes come off the first slot of the device
        if not isinstance(per_device_bytes, Mapping):
            return int(per_device_bytes)
        dev = str(items[i][0])
        first = next(j for j, (d, _) in enumerate(items) if str(d) == dev)
        return int(per_device_bytes.get(dev, 0)) if i == first else 0

    unbounded = num_blocks  # a slot of unknown capacity can hold everything
    rooms = [
        unbounded if cap is None else max(0, int(cap) - reserve(i)) // block_bytes
        for i, (dev, cap) in enumerate(items)
    ]
    is_cpu = [str(dev).startswith("cpu") for dev, _ in items]
    acc = [i for i in range(len(items)) if not is_cpu[i]]
    cpu = [i for i in range(len(items)) if is_cpu[i]]
    counts = [0] * len(items)
    acc_room = sum(rooms[i] for i in acc)
    if acc_room >= num_blocks:
        for i, c in zip(acc, _shares(num_blocks, [rooms[i] for i in acc])):
            counts[i] = c
    else:
        for i in acc:
            counts[i] = rooms[i]
        rest = num_blocks - acc_room
        if sum(rooms[i] for i in cpu) < rest:
            need = num_blocks * block_bytes + (
                sum(per_device_bytes.values()) if isinstance(per_device_bytes, Mapping)
                else int(per_device_bytes))
            have = ", ".join(
                f"{d} {'unbounded' if c is None else _size(int(c))}"
                + (f" less {_size(reserve(i))}" if reserve(i) else "")
                for i, (d, c) in enumerate(items))
            held = sum(min(r, num_blocks) for r in rooms) * block_bytes
            raise MemoryError(
                f"the Fisher's {num_blocks} blocks need {_size(need)}; the devices hold "
                f"{_size(held)} of them ({have}): lower block_size, prune fewer layers "
                "(include=/exclude=), or add devices (device=[...] or 'auto')"
            )
        for i, c in zip(cpu, _shares(rest, [rooms[i] for i in cpu])):
            counts[i] = c

    def first_home(i):
        if homes is None:
            return math.inf
        dev = str(items[i][0])
        return next((b for b, h in enumerate(homes) if str(h) == dev), math.inf)

    order = sorted(range(len(items)), key=lambda i: (is_cpu[i], first_home(i), -rooms[i], i))
    plan, start = [], 0
    for i in order:
        if counts[i]:
            plan.append(FisherPart(str(items[i][0]), start, start + counts[i]))
            start += counts[i]
    return plan


def plan_fisher_placement(num_blocks: int, block_bytes: int, capacities: Mapping[str, int], *,
                          per_device_bytes: int = 0) -> dict[str, tuple[int, int]]:
    """:func:`plan_placement` over ``{device: capacity}`` as ``{device: (first, stop)}`` (devices
    with no blocks left out)."""
    plan = plan_placement(num_blocks, block_bytes, capacities, per_device_bytes=per_device_bytes)
    return {p.device: (p.start, p.stop) for p in plan}


def home_placement(homes: Sequence) -> list[FisherPart]:
    """Each block on its home device (``homes``: the device of each block, in block order): one
    part per run of equal homes."""
    plan = []
    for b, h in enumerate(homes):
        h = str(h)
        if plan and plan[-1].device == h:
            plan[-1] = plan[-1]._replace(stop=b + 1)
        else:
            plan.append(FisherPart(h, b, b + 1))
    return plan


def describe_plan(plan: Sequence[FisherPart], block_bytes: int | None = None) -> str:
    """One line: each part's device and blocks (and bytes)."""
    def one(p):
        size = f", {(p.stop - p.start) * block_bytes / 2**20:.1f} MiB" if block_bytes else ""
        return f"{p.device}: blocks {p.start}-{p.stop - 1} ({p.stop - p.start}{size})"
    return "; ".join(one(p) for p in plan)


# -- accelerate's offload -----------------------------------------------------------------------
def check_resident(model: nn.Module, targets: Mapping[str, torch.Tensor]) -> None:
    """Refuse targets that hold no values (the meta device), naming them: a model offloaded by
    accelerate keeps such weights in its hooks' ``weights_map`` (CPU memory or disk) and loads them
    only for a forward pass, so neither their gradients nor an in-place update reach them."""
    meta = [name for name, p in targets.items() if p.device.type == "meta"]
    if not meta:
        return
    hooked = any(hasattr(m, "_hf_hook") for m in model.modules())
    shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
    why = (
        "offloaded by accelerate (cpu_offload/disk_offload, or 'cpu'/'disk' entries of a "
        "device_map under an accelerator main device): the values live in the hooks' weights_map "
        "and only visit the device for a forward pass"
        if hooked else "on the meta device (no values)"
    )
    raise ValueError(
        f"pruning targets {shown} are {why}. Pruning needs every target resident on a device: "
        "dispatch without offload (keep CPU layers resident with dispatch_model(model, "
        "device_map, main_device='cpu'), or give the layers to devices that hold them), or prune "
        "fewer layers (include=/exclude=)"
    )


# -- the placed Fisher --------------------------------------------------------------------------
class PlacedFisher:
    """Gradient sink of a block Fisher whose blocks lie in ``plan`` (contiguous block ranges) on
    several devices: one ``pruner.new_fisher`` per part, on its device. ``add_grads`` takes a chunk
    (k, D) (each part takes its columns, moved to its device) or a
    :class:`~hf_mfac.pruning.grads.SplitChunk` whose pieces are the parts' columns already on their
    devices. ``finish()`` forms every part's inverse with the relative damping of the whole Fisher
    (the mean diagonal over all parts' blocks, per damping group, as on one device) and returns a
    :class:`PlacedFisherInverse` whose answers land on ``work_device``."""

    def __init__(self, pruner, plan: Sequence[FisherPart], dim: int, num_grads: int,
                 work_device, groups: torch.Tensor | None = None):
        B = pruner.block_size
        if plan[0].start != 0 or plan[-1].stop * B != dim or any(
                a.stop != b.start for a, b in zip(plan, plan[1:])):
            raise ValueError(f"the plan {list(plan)} does not cover the {dim // B} blocks in order")
        self.plan, self.dim, self.block_size = list(plan), dim, B
        self.bounds = [(p.start * B, p.stop * B) for p in self.plan]
        self.work_device = torch.device(work_device)
        self.rel_damp = pruner.rel_damp
        self.parts = [
            pruner.new_fisher(e - s, num_grads, torch.device(p.device),
                              groups=None if groups is None else groups[s:e])
            for p, (s, e) in zip(self.plan, self.bounds)
        ]
        self.dtype = pruner.fisher_dtype

    def storage_bytes(self) -> int:
        return sum(int(p.storage_bytes()) for p in self.parts)

    def add_grads(self, chunk) -> None:
        pieces = getattr(chunk, "pieces", None)
        if pieces is not None and [(s, e) for s, e, _ in pieces] == self.bounds:
            for part, (_, _, t) in zip(self.parts, pieces):
                part.add_grads(t)
            return
        chunk = chunk if pieces is None else chunk.whole()
        for part, (s, e) in zip(self.parts, self.bounds):
            part.add_grads(chunk[..., s:e].contiguous())

    def _damp_sums(self) -> None:
        """Give every part the per-group diagonal sums and counts of all parts (its
        ``damp_reduce``), so that each damps its blocks as the whole Fisher on one device would."""
        seen = [part.damp_sums() for part in self.parts]
        if any(a is None for a in seen):  # nothing to reduce (an absolute damping after all)
            return
        seen = [a.to("cpu") for a in seen]
        n = max(a.shape[1] for a in seen)
        total = torch.zeros(2, n, dtype=torch.float64)
        for a in seen:
            total[:, : a.shape[1]] += a
        # a group without gradient takes the smallest damping of the others over all groups (on
        # one device the floor is taken over every group, here each part sees only its own)
        lam = torch.where(total[1] > 0, total[0] / total[1].clamp_min(1), torch.zeros(n).double())
        pos = lam > 0
        floor = float(lam[pos].min()) if bool(pos.any()) else 1.0
        empty = ~pos
        total[0][empty], total[1][empty] = floor, 1.0

        def reduce(acc):
            acc.copy_(total[:, : acc.shape[1]].to(acc.device))

        for part in self.parts:
            part.damp_reduce = reduce

    def finish(self) -> "PlacedFisherInverse":
        if self.rel_damp is not None:
            self._damp_sums()
        parts = [p.finish() for p in self.parts]
        for p in parts:
            p.invert()
        return PlacedFisherInverse(parts, self.plan, self.dim, self.block_size, self.dtype,
                                   self.work_device)


class PlacedFisherInverse:
    """``F^{-1}`` of blocks spread over devices (``parts[i]`` holds blocks ``plan[i]``), seen whole
    from ``device`` (the work device): ``diag()``, ``mul(x)``, ``submatrix(idx)`` give the tensors
    of the one-device inverse there, each part computing its own coordinates; ``unpack(s, e, out)``
    copies whole blocks a page at a time (a block source for the per-block steps, as
    :class:`~hf_mfac.core.BlockFisherInverse` is; :meth:`blocks` returns this object for them, so
    that the blocks are never gathered whole on one device)."""

    def __init__(self, parts, plan: Sequence[FisherPart], dim: int, block_size: int,
                 dtype: torch.dtype, device):
        self.parts, self.plan, self.dim = list(parts), list(plan), dim
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.num_blocks = self.plan[-1].stop
        self.bounds = [(p.start * block_size, p.stop * block_size) for p in self.plan]

    @property
    def seconds(self) -> dict:
        """The parts' clocks, summed."""
        out = {"accumulate": 0.0, "invert": 0.0}
        for p in self.parts:
            for k in out:
                out[k] += p.seconds.get(k, 0.0)
        return out

    def storage_bytes(self) -> int:
        return sum(int(p.storage_bytes()) for p in self.parts)

    def diag(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``diag(F^{-1})`` (D,), or its coordinates ``[start, stop)``, from the parts that hold
        them, on the work device."""
        stop = self.dim if stop is None else min(stop, self.dim)
        out = []
        for p, (s, e) in zip(self.parts, self.bounds):
            a, b = max(start, s), min(stop, e)
            if a < b:
                try:
                    piece = p.diag(a - s, b - s)
                except TypeError:  # an inverse that gives its diagonal whole
                    piece = p.diag()[a - s : b - s]
                out.append(piece.to(self.device))
        if not out:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return out[0] if len(out) == 1 else torch.cat(out)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1)
        if x.numel() != self.dim:
            raise ValueError(f"x has {x.numel()} elements; expected dim={self.dim}")
        return torch.cat([
            p.mul(x[s:e]).to(self.device) for p, (s, e) in zip(self.parts, self.bounds)
        ])

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``[F^{-1}]_QQ`` (n, g, g) for index sets ``idx`` (n, g): each entry from the part that
        holds both coordinates (zero between parts, whose blocks differ)."""
        idx = torch.as_tensor(idx, device=self.device)
        n, g = idx.shape
        out = torch.zeros(n, g, g, dtype=self.dtype, device=self.device)
        for p, (s, e) in zip(self.parts, self.bounds):
            inside = (idx >= s) & (idx < e)
            rows = inside.any(1).nonzero()[:, 0]
            if not rows.numel():
                continue
            mine = inside[rows]
            local = torch.where(mine, idx[rows] - s, torch.zeros_like(idx[rows]))
            sub = p.submatrix(local.to(p.device)).to(self.device, self.dtype)
            out[rows] += sub * (mine[:, :, None] & mine[:, None, :])
        return out

    def unpack(self, s: int = 0, e: int | None = None, out: torch.Tensor | None = None):
        """Whole inverse blocks [s, e) (e - s, B, B), into ``out`` (any float dtype and device) or
        a new tensor on the work device."""
        e = self.num_blocks if e is None else e
        B = self.block_size
        if out is None:
            out = torch.empty(e - s, B, B, dtype=self.dtype, device=self.device)
        for p, part in zip(self.parts, self.plan):
            a, b = max(s, part.start), min(e, part.stop)
            if a >= b:
                continue
            dst = out[a - s : b - s]
            if dst.device == torch.device(part.device):
                p.unpack(a - part.start, b - part.start, out=dst)
            else:
                dst.copy_(p.unpack(a - part.start, b - part.start))
        return out

    def blocks(self):
        """This object: the blocks as a source read a page at a time (``unpack``), never one
        tensor."""
        return self

    def block_range(self, block_size: int):
        """``(blocks, first, gather)`` for the per-block update: every block, from block 0, nothing
        to gather (one process)."""
        return self, 0, (lambda t: t)


# -- one run's placement ------------------------------------------------------------------------
class Placement(NamedTuple):
    """Where one run's block Fisher lives: ``plan`` (block ranges per device, in block order) and
    the ``work_device`` of the selection and the update."""

    plan: list
    work_device: torch.device
    block_size: int

    def coordinate_parts(self) -> list[tuple[int, int, str]]:
        """``[(start, stop, device)]`` in coordinates, for :func:`~hf_mfac.pruning.iter_grads`."""
        B = self.block_size
        return [(p.start * B, p.stop * B, p.device) for p in self.plan]

    def to_list(self, part_bytes=None) -> list[dict]:
        """The plan for the report: ``[{"device", "blocks": [first, stop], "bytes"}]``."""
        return [
            {"device": p.device, "blocks": [p.start, p.stop],
             **({} if part_bytes is None else {"bytes": int(part_bytes[i])})}
            for i, p in enumerate(self.plan)
        ]


def _block_fisher(pruner) -> bool:
    """True for the pruners whose Fisher is a block Fisher inside each target (oBERT, CAP)."""
    return bool(pruner.uses_fisher and pruner.block_size and pruner.pad == pruner.block_size)


def _homes(layout, targets, B: int) -> list[str]:
    """The device of each block's weight, in block order."""
    owner = layout.layer_index()[::B].tolist()
    devs = [str(targets[name].device) for name in layout.names]
    return [devs[i] for i in owner]


def _work_device(devices) -> torch.device:
    """The first accelerator among ``devices``, else the CPU."""
    for d in devices:
        if torch.device(d).type != "cpu":
            return torch.device(d)
    return torch.device("cpu")


def placement_sizes(pruner, dim: int, num_grads: int, chunk_size: int | None = None
                    ) -> tuple[int, int]:
    """``(bytes per block, bytes on the work device)`` of a placed block Fisher of ``dim``
    coordinates: a block's share of the larger phase on its device (the accumulator, its columns of
    the gradient chunk and the gradient phase's vectors; or its inverse), and the step's vectors
    over all coordinates, which the work device holds besides its blocks."""
    B = pruner.block_size
    nb = -(-dim // B)
    grads, step = coordinate_bytes(pruner)
    acc = pruner.fisher_bytes(dim, num_grads)
    k = chunk_size or default_chunk_size(dim, num_grads, fisher_bytes=acc)
    build = -(-acc // nb) + B * (4 * k + grads)
    return build, dim * step


def place_fisher(pruner, layout, targets: Mapping[str, torch.Tensor], spec, num_grads: int, *,
                 chunk_size: int | None = None) -> Placement | None:
    """The placement of one run's Fisher, or None when it lives on one device as always
    (``pruner.device``, else the targets' device).

    ``spec`` is :func:`parse_fisher_device`'s result. Slots (a list of devices, ``"auto"``) give
    :func:`plan_placement` over their capacities, each block sized by its share of the Fisher's
    build, of the gradient chunk and of the gradient-phase vectors, with the step's vectors
    reserved on the work device; a plan of one part means that device alone (the driver makes it
    the pruner's). No ``spec`` with targets on several devices (a model dispatched with a
    device_map) gives each block its weight's device (:func:`home_placement`). Static M-FAC (its
    gradients stay on ``grads_device``, paged through one device) and a pruner distributed over
    ranks (each rank places its own shard) take one device: several distinct ones are refused."""
    several = isinstance(spec, list)
    if not pruner.uses_fisher:
        if several:
            logger.info("%s pruning uses no Fisher: ignoring device=%s", pruner.name,
                        [str(d) for d, _ in spec])
        return None
    if not several:
        if (spec is not None or pruner.device is not None or not _block_fisher(pruner)
                or getattr(pruner, "runs_over_ranks", False)
                or len({str(t.device) for t in targets.values()}) <= 1):
            return None
        B = pruner.block_size
        plan = home_placement(_homes(layout, targets, B))
        return Placement(plan, _work_device(p.device for p in plan), B)
    if not _block_fisher(pruner) or getattr(pruner, "runs_over_ranks", False):
        if len({str(d) for d, _ in spec}) == 1:
            return Placement([FisherPart(str(spec[0][0]), 0, 1)], spec[0][0], layout.dim)
        if getattr(pruner, "runs_over_ranks", False):
            raise ValueError(
                "the Fisher is already sharded over the ranks of the process group; give one "
                "device per rank (device='cuda:<local rank>'), not several"
            )
        raise ValueError(
            f"method {pruner.name!r} keeps its m gradients on grads_device and pages them through "
            "one device: give one device (several devices place the block Fisher of 'obert' and "
            "'cap')"
        )
    B = pruner.block_size
    nb = layout.dim // B
    wdev = _work_device(d for d, _ in spec)
    per_block, reserve = placement_sizes(pruner, layout.dim, num_grads, chunk_size)
    plan = plan_placement(nb, per_block, [(str(d), c) for d, c in spec],
                          per_device_bytes={str(wdev): reserve}, homes=_homes(layout, targets, B))
    return Placement(plan, wdev, B)  # the step's vectors were kept room for there


def check_placed(est, available: Mapping[str, int | None] | None = None) -> None:
    """Refuse, before any work, a placed run whose estimated peak
    (:func:`~hf_mfac.pruning.memory.estimate_pruner` with the placement) exceeds what a device has
    available (``available``: ``{device: bytes}``, default :func:`free_bytes`; unknown passes),
    naming the device, the need, what is available and what to change."""
    for dev, need in est.items():
        have = available.get(dev) if available is not None else free_bytes(torch.device(dev))
        if have is not None and need > have:
            raise MemoryError(
                f"{est.settings['method']} pruning with the Fisher placed over several devices "
                f"needs an estimated {_size(need)} on {dev} ({est.describe()}), but only "
                f"{_size(have)} is available there: give that device a smaller capacity "
                "(device={'cuda:0': bytes, ...}) so that other devices take more blocks, add "
                "devices, lower block_size, or prune fewer layers (include=/exclude=)"
            )
