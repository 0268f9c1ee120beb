"""M-FAC under DDP with the gradient window sharded over the ranks.

Under DDP every rank holds the same all-reduced gradient g (D,). :class:`ShardedMFAC` gives rank r a
contiguous, balanced range ``[start_r, stop_r)`` of the D coordinates and keeps the window only for
it: ``G_r`` (m, D_r), D_r ≈ D / N. Woodbury needs ``G x = sum_r G_r x_r``, so the m-vector of
partial products is all-reduced (the ``allreduce`` hook of :class:`~hf_mfac.core.DynamicMFAC`);
every rank then holds the same m x m system and computes its shard of ``F^{-1} g = (g - G^T K^{-1} G
g) / damp``, and the shards are all-gathered so every rank applies the same update. Per step and
rank: one all-reduce of m + 2 values, one all-gather of D values (padded to N * ceil(D / N)), 2 m D
/ N multiply-adds instead of 2 m D. Memory per rank: m D / N window values plus the m x m matrix.

A gradient is accepted or rejected by all ranks together: the two values appended to the all-reduced
vector say whether some rank's shard of g was non-finite or overflowed the window's storage dtype,
the reduced products and the m x m factorisation are the same on every rank, and the finiteness of
``F^{-1} g`` is checked on the gathered vector. A rejected step (``nonfinite="skip"`` skips it,
``"raise"`` raises on every rank) leaves every rank's shard exactly as it was.

Checkpoints: ``optimizer.state_dict()`` holds everything but the window (the Trainer saves it from
the main process only); each rank writes its columns of the window with :func:`save_mfac_shards` to
``mfac_shard_{rank}.pt`` and :func:`load_mfac_shards` reads them back, also into another number of
ranks or into a plain :class:`~hf_mfac.MFAC`.
:class:`~hf_mfac.integrations.distributed.MFACShardCheckpointCallback` does both inside
``transformers.Trainer``.

The collectives go through :class:`hf_mfac.comm.Comm` (shared with
:mod:`hf_mfac.pruning.distributed`); ``Comm`` and ``DistributedError`` are re-exported here for
older imports.
"""
from __future__ import annotations

import os

import torch

from ..comm import Comm, DistributedError
from ..core import CompressedMFAC, DynamicMFAC
from ..core._checks import all_finite, free_bytes
from ..core.ihvp import GradientRejected
from .mfac import MFAC, unwrap_optimizer, window_bytes

__all__ = [
    "ShardedMFAC",
    "Comm",
    "DistributedError",
    "shard_bounds",
    "save_mfac_shards",
    "load_mfac_shards",
    "shard_file",
]

SHARD_FILE = "mfac_shard_{rank}.pt"
_FORMAT = 1


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Boundaries (world_size + 1,) of contiguous ranges of ``n`` items whose sizes differ by at
    most one."""
    return [i * n // world_size for i in range(world_size + 1)]


def shard_file(folder: str, rank: int) -> str:
    return os.path.join(folder, SHARD_FILE.format(rank=rank))


# -- the sharded window
# ---------------------------------------------------------------------------------------
class _ShardedWindow:
    """This rank's :class:`DynamicMFAC` over coordinates ``[start, stop)``, seen as a window over
    all D.

    ``update_mul(g)`` takes the full gradient (D,), identical on every rank, and returns the full
    ``F^{-1} g`` (D,): the local shard's part (one all-reduce of the m-vector inside) all-gathered.
    It raises :class:`~hf_mfac.core.ihvp.GradientRejected` on every rank or on none, with every
    shard restored.
    """

    def __init__(self, dim: int, num_grads: int, damp: float, device, grad_dtype,
                 normalize_by_seen: bool,
                 comm: Comm, density: float = 1.0):
        if dim < comm.world_size:
            raise ValueError(
                f"ShardedMFAC needs at least one coordinate per rank: D={dim} < {comm.world_size} "
                "ranks"
            )
        self.dim, self.device, self.comm = dim, torch.device(device), comm
        self.bounds = shard_bounds(dim, comm.world_size)
        self.sizes = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        self.start, self.stop = self.bounds[comm.rank], self.bounds[comm.rank + 1]
        hook = comm.all_reduce if comm.distributed else None
        kw = dict(device=device, grad_dtype=grad_dtype, normalize_by_seen=normalize_by_seen,
                  allreduce=hook)
        size = self.stop - self.start
        # compressed: each rank cuts its own coordinates into top-k blocks, from its first one
        self.local = (CompressedMFAC(size, num_grads, damp, density, **kw) if density < 1.0
                      else DynamicMFAC(size, num_grads, damp, **kw))

    @property
    def count(self) -> int:
        return self.local.count

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        shard = self.local._vector("g", g[self.start : self.stop], finite=False)
        d, undo = self.local._update_mul(shard, check=False)  # (D_r,) this shard of F^{-1} g
        try:
            full = self.comm.all_gatherv(d, self.sizes)  # (D,), the same on every rank
            if not all_finite(full):
                raise GradientRejected(
                    "F^{-1} g is not finite for this gradient (damp too small for its scale?); "
                    "the window is unchanged"
                )
        except BaseException:
            self.local._restore(undo)
            raise
        return full

    def state_dict(self) -> dict:
        return {
            **self.local.state_dict(),
            "start": self.start,
            "stop": self.stop,
            "full_dim": self.dim,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a shard saved for the same range, or a full window (plain MFAC's) of which we keep
        our columns. The checks of :meth:`DynamicMFAC.load_state_dict` run on every rank together:
        all load or all refuse."""
        G, problems = state.get("G"), []
        whole = (self.start, self.stop) == (0, self.dim)
        if "I" in state and "start" not in state and not whole:
            problems.append("a compressed window saved by one process cannot be split over ranks "
                            "(its top-k blocks span the whole gradient): resume it in one process")
        elif (isinstance(G, torch.Tensor) and G.dim() == 2 and G.shape[1] == self.dim
                and not whole):
            state = {**state, "G": G[:, self.start : self.stop]}
        elif "start" in state and (int(state["start"]), int(state["stop"])) != (
                self.start, self.stop):
            problems.append(
                f"window shard covers [{state['start']}, {state['stop']}); this rank holds "
                f"[{self.start}, {self.stop}): use load_mfac_shards() to re-shard"
            )
        self.local._load_state(state, problems)


class ShardedMFAC(MFAC):
    r""":class:`~hf_mfac.MFAC` for DDP with the gradient window split over the ranks (memory ≈ m·D/N
    each).

    Same arguments and results as ``MFAC`` (up to float rounding of the sharded dot products), plus
    ``process_group`` (default: the whole world). Every rank must call ``step()`` with the same
    gradient, as under DDP (``DistributedDataParallel``, ``accelerate``, ``transformers.Trainer``
    all-reduce it first). Without an initialised process group it is a plain ``MFAC``.

    Per step and rank: all-reduce of m values and all-gather of D values; 2·m·D/N multiply-adds.

    Checkpoints: :meth:`state_dict` has everything except the window (the same on every rank: param
    groups, momentum, masks), so the Trainer's ``optimizer.pt`` from the main process works as
    usual; the window lives in :meth:`sharded_state_dict` per rank (:func:`save_mfac_shards` /
    :func:`load_mfac_shards`, or
    :class:`~hf_mfac.integrations.distributed.MFACShardCheckpointCallback` with the Trainer). A
    plain ``MFAC`` ``state_dict()`` with its window also loads here (each rank keeps its columns).

    With ``density < 1`` each rank keeps a compressed window of its own range
    (:class:`~hf_mfac.core.CompressedMFAC`, error buffer included): its top-k blocks start at the
    rank's first coordinate, so the kept entries equal one process's only where the ranges fall on
    block boundaries, and its shard files resume with the same number of ranks only.
    """

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, **kwargs)  # MFAC's options and defaults
        self.process_group = process_group
        self._comm = None

    @property
    def comm(self) -> Comm:
        """Created on first use: the process group may be initialised after the optimizer."""
        if self._comm is None:
            self._comm = Comm(self.process_group)
        return self._comm

    def _make_window(self, dim: int, device):  # MFAC's layout, with the window sharded
        share = -(-dim // self.comm.world_size)
        need = window_bytes(share, self.num_grads, self.grad_dtype, self.density)
        free = free_bytes(device)
        error = window = None
        try:
            if free is not None and need > free:
                raise MemoryError(
                    f"this rank's share of the M-FAC window needs {need / 2**30:.2f} GiB "
                    f"(num_grads={self.num_grads} "
                    f"x {share} of d={dim} values) but only {free / 2**30:.2f} GiB is free on "
                    f"{device}. Lower "
                    "num_grads, store it in bfloat16 (grad_dtype), or use more processes."
                )
            window = _ShardedWindow(
                dim,
                self.num_grads,
                self.damp,
                device,
                self.grad_dtype,
                self.normalize_by_seen,
                self.comm,
                self.density,
            )
        except Exception as e:  # noqa: BLE001 - one rank short of memory must not leave the others waiting
            error = e
        self.comm.check(error)
        return window

    # -- checkpointing
    # ---------------------------------------------------------------------------------------
    def state_dict(self):
        """Like ``MFAC.state_dict`` without the window (see :meth:`sharded_state_dict`)."""
        sd = super().state_dict()
        sd["mfac"].pop("window", None)
        sd["mfac"]["sharded"] = {"world_size": self.comm.world_size}
        return sd

    def sharded_state_dict(self) -> dict:
        """This rank's columns of the window: ``G`` (m, D_r) with the m x m matrix and ring
        position, its range ``[start, stop)`` of the D coordinates, and the parameter layout.
        Tensors and plain types only."""
        out = {"format": _FORMAT, "rank": self.comm.rank, "world_size": self.comm.world_size}
        if self.window is None:
            return {**out, "window": None}
        index = self._param_index()
        return {
            **out,
            "window": self.window.state_dict(),
            "params": self._param_record(),
            "layout": [index[id(p)] for p, *_ in self._layout],
        }

    def load_sharded_state_dict(self, state: dict) -> None:
        """Restore this rank's window from :meth:`sharded_state_dict` (same range;
        :func:`load_mfac_shards` re-shards between different numbers of ranks). Load
        ``state_dict()`` first: it resets the window."""
        if state.get("window") is None:
            self._layout = self.window = None
            return
        layout, ids, window = self._new_layout(self._masks)
        error = None
        try:
            _check_saved_layout(self, state, layout, window)
        except Exception as e:  # noqa: BLE001 - every rank raises, none waits in the window's checks
            error = e
        self.comm.check(error)
        window.load_state_dict(state["window"])
        self._layout, self._layout_ids, self.window = layout, ids, window


# -- shard files
# ----------------------------------------------------------------------------------------------
_unwrap = unwrap_optimizer  # older name, kept for importers


def save_mfac_shards(optimizer, folder: str, **meta) -> str:
    """Write this rank's window shard to ``folder/mfac_shard_{rank}.pt`` (call on every rank;
    returns the path).

    ``meta`` (plain values, e.g. ``global_step``) is stored alongside. The write is atomic
    (temporary file, then rename); all ranks then agree that every write succeeded (else all raise
    :class:`DistributedError`).
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, ShardedMFAC):
        raise TypeError(f"save_mfac_shards needs a ShardedMFAC; got {type(opt).__name__}")
    path = shard_file(folder, opt.comm.rank)
    error = None
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save({**opt.sharded_state_dict(), "meta": dict(meta)}, tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - reported on every rank
        error = e
    opt.comm.check(error)
    return path


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _raise_together(opt, sharded: bool, error) -> None:
    """Raise ``error`` on every rank of a :class:`ShardedMFAC` if any rank has one (one collective),
    else raise it where it is."""
    if sharded:
        opt.comm.check(error)
    elif error is not None:
        raise error


def _read_first_shard(folder: str, rank: int, expect_meta: dict | None) -> tuple[dict, dict]:
    """This rank's shard file (rank 0's where the saving run had fewer ranks), checked for its
    format and ``expect_meta``; returns it with its ``meta``."""
    own = shard_file(folder, rank)
    if not os.path.isfile(own):  # more ranks than the saving run: start from rank 0's file
        own = shard_file(folder, 0)
        if not os.path.isfile(own):
            raise FileNotFoundError(f"no M-FAC window shards (mfac_shard_*.pt) in {folder}")
    first = _load(own)
    if int(first.get("format", 0)) != _FORMAT:
        raise ValueError(f"{own} is not an M-FAC window shard of format {_FORMAT}")
    meta = dict(first.get("meta", {}))
    for k, v in (expect_meta or {}).items():
        if k in meta and meta[k] != v:
            raise ValueError(
                f"the M-FAC shards in {folder} were saved at {k}={meta[k]}, expected {v}"
            )
    return first, meta


def _check_saved_layout(opt, first: dict, layout, window) -> int:
    """The saved window's number of coordinates, after checking that it, its parameters (their
    shapes and dtypes, where the file records them) and its layout are this optimizer's."""
    opt._check_param_record(first.get("params"))
    full_dim = int(first["window"]["full_dim"])
    if full_dim != window.dim:
        raise ValueError(
            f"the saved window covers {full_dim} coordinates; this optimizer has {window.dim}"
        )
    index = opt._param_index()
    if [index[id(p)] for p, *_ in layout] != list(first["layout"]):
        raise ValueError(
            "the saved M-FAC window was built over other parameters than this optimizer's"
        )
    return full_dim


def _gather_columns(folder: str, first: dict, full_dim: int, start: int, stop: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of the saved window (m, stop - start), copied from the shard files
    that hold them (``first`` is already loaded; the others are memory-mapped, and each is checked
    for its range)."""
    win, saved = first["window"], shard_bounds(full_dim, int(first["world_size"]))
    G = torch.empty(win["G"].shape[0], stop - start, dtype=win["G"].dtype)  # (m, columns held here)
    for r, (a, b) in enumerate(zip(saved, saved[1:])):
        lo, hi = max(a, start), min(b, stop)
        if lo >= hi:
            continue
        shard = first if int(first["rank"]) == r else _load(shard_file(folder, r))
        if (int(shard["window"]["start"]), int(shard["window"]["stop"])) != (a, b):
            raise ValueError(
                f"{shard_file(folder, r)} does not hold the columns [{a}, {b}) it should"
            )
        G[:, lo - start : hi - start] = shard["window"]["G"][:, lo - a : hi - a]
    return G


def _compressed_shard(first: dict, world_size: int, start: int, stop: int) -> dict:
    """The saved compressed window of this rank: its top-k blocks start at the first coordinate of
    each rank's range, so it is only read back into the same ranges (the saving run's number of
    ranks)."""
    saved = int(first["world_size"])
    win = first["window"]
    if saved != world_size or (int(win["start"]), int(win["stop"])) != (start, stop):
        raise ValueError(
            f"the compressed M-FAC window was saved by {saved} ranks; it can only be "
            f"resumed by {saved} ranks (this run has {world_size}): its top-k blocks "
            "start at each rank's first coordinate"
        )
    return (
        dict(win)
        if world_size > 1
        else {k: v for k, v in win.items() if k not in ("start", "stop")}
    )


def load_mfac_shards(optimizer, folder: str, *, expect_meta: dict | None = None) -> dict:
    """Restore the window from ``mfac_shard_*.pt`` in ``folder`` into a :class:`ShardedMFAC` (any
    number of ranks: each reads the columns it now holds from the files that have them; with the
    saving run's number of ranks that is its own file only, so no shared file system is needed) or
    into a plain ``MFAC`` (the whole window is put together). Load
    ``optimizer.load_state_dict(...)`` first. ``expect_meta``: values the files' ``meta`` must match
    (e.g. ``{"global_step": 10}``). Returns the files' ``meta``. Memory: the files are memory-mapped
    and only the needed columns are copied.

    All or nothing, on all ranks together: a missing or mismatched file on any rank, or a window
    that :meth:`~hf_mfac.core.DynamicMFAC.load_state_dict` refuses, raises on every rank (the error
    itself where every rank failed the same way, else :class:`DistributedError`) and leaves the
    optimizer as it was."""
    opt = unwrap_optimizer(optimizer)
    sharded = isinstance(opt, ShardedMFAC)
    first = meta = error = None
    try:
        first, meta = _read_first_shard(folder, opt.comm.rank if sharded else 0, expect_meta)
    except Exception as e:  # noqa: BLE001 - reported on every rank
        error = e
    _raise_together(opt, sharded, error)
    if first["window"] is None:
        if sharded:
            opt.load_sharded_state_dict(first)
        else:
            opt.reset_window()
        return meta
    layout, ids, window = opt._new_layout(
        opt._masks
    )  # collective for ShardedMFAC: every rank gets here
    state = None
    try:
        start, stop = (window.start, window.stop) if sharded else (0, window.dim)
        full_dim = _check_saved_layout(opt, first, layout, window)
        if "I" in first["window"]:  # compressed: this rank's own shard, as saved
            state = _compressed_shard(first, opt.comm.world_size if sharded else 1, start, stop)
        else:
            G = _gather_columns(folder, first, full_dim, start, stop)
            state = {k: v for k, v in first["window"].items() if k not in ("G", "start", "stop")}
            state["G"] = G
            if sharded:
                state.update(start=start, stop=stop)
    except Exception as e:  # noqa: BLE001 - reported on every rank
        error = e
    _raise_together(opt, sharded, error)
    window.load_state_dict(state)  # checks the window (on all ranks together when sharded)
    opt._layout, opt._layout_ids, opt.window = layout, ids, window
    return meta
