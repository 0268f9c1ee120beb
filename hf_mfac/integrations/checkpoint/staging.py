"""Staged saves: every checkpoint and model card is written into a staging folder on the same
filesystem and then moved into place, so that an exception (``KeyboardInterrupt`` included) leaves
the target folder as it was.

Owns :func:`staged_save` (the context manager the savers write through), the move into an existing
folder and its rollback (:func:`_commit`, :class:`_RollbackFailed`), and the ``fsync`` calls that
make the moved files durable. Which files a save owns, and in which order they move, comes from
:mod:`.files`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .files import process_rank

__all__ = ["staged_save"]


_STAGE_PREFIX = ".hf_mfac-staging-"
_PREVIOUS = ".hf_mfac-previous"


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            _fsync(os.path.join(d, n))
        _fsync(d, directory=True)


class _RollbackFailed(RuntimeError):
    """Moving the previous files back failed too; they are kept in the staging folder named in the
    message."""


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(text)


@contextlib.contextmanager
def staged_save(save_directory: str | os.PathLike, stale=None):
    """Context manager yielding an empty staging folder; on a clean exit its files replace those of
    ``save_directory``, on an exception nothing in ``save_directory`` changes and the staging folder
    is removed.

    The staging folder is on the same filesystem: beside ``save_directory`` when that does not exist
    yet (then one ``rename`` makes the whole folder appear), else inside it
    (``.hf_mfac-staging-*``). Committing into an existing folder moves, with one ``os.replace`` per
    entry: first out (into the staging folder, weights first) every entry that a new file replaces
    and every existing entry for which ``stale(name)`` is true, then in every new entry, the weights
    last (shards, then ``model.safetensors`` / the index / ``hf_mfac_compact.safetensors``). So at
    every instant the folder holds the old save, the new save, or a save without weights that every
    loader refuses; never new weights with old metadata or masks. (POSIX has no atomic rename of
    several files: a reader that opens ``config.json`` before the move and the weights after it can
    still pair them.) Entries that neither the new save writes nor ``stale`` names are never
    touched. Any exception during the moves, ``KeyboardInterrupt`` included (also one that lands
    just after the last move), moves everything back; a process killed while moving leaves the old
    files in ``.hf_mfac-staging-*/.hf_mfac-previous``."""
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a folder")
    fresh = not os.path.isdir(target)
    # made: parent folders this call creates, removed on failure
    made, stage, keep_stage = [], None, False
    try:
        if fresh:
            parent = os.path.dirname(target)
            missing = parent
            while missing and not os.path.isdir(missing):
                made.append(missing)
                missing = os.path.dirname(missing)
            os.makedirs(parent, exist_ok=True)
            stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_STAGE_PREFIX}",
                                     dir=parent)
        else:
            stage = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=target)
        yield stage
        _fsync_tree(stage)
        if fresh:
            os.rename(stage, target)
            _fsync(os.path.dirname(target), directory=True)
        else:
            _commit(stage, target, stale)
    except _RollbackFailed:
        keep_stage = True
        raise
    except BaseException as e:
        # An interrupt that lands just after the folder was renamed into place: take it back.
        if fresh and stage is not None and not os.path.lexists(stage) and os.path.isdir(target):
            os.rename(target, stage)
        _note(e, f"hf_mfac: nothing was changed in {target}")
        raise
    finally:
        if stage is not None and not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
        if fresh and not os.path.isdir(target):
            for d in made:
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def _commit(stage: str, target: str, stale) -> None:
    """Move the entries of ``stage`` into ``target`` (see :func:`staged_save`); on failure move them
    back."""
    new = sorted(os.listdir(stage), key=lambda n: (process_rank(n), n))
    backup = os.path.join(stage, _PREVIOUS)
    os.mkdir(backup)
    own = os.path.basename(stage)
    old = [n for n in os.listdir(target) if n != own and not n.startswith(_STAGE_PREFIX)
           and (n in new or (stale is not None and stale(n)))]
    old.sort(key=lambda n: (-process_rank(n), n))
    try:
        for n in old:
            os.replace(os.path.join(target, n), os.path.join(backup, n))
        for n in new:
            os.replace(os.path.join(stage, n), os.path.join(target, n))
    except BaseException as e:
        # Decide from the filesystem, not from counters: an interrupt may land after a rename
        # returned.
        try:
            for n in reversed(new):
                if not os.path.lexists(os.path.join(stage, n)) and os.path.lexists(
                    os.path.join(target, n)
                ):
                    os.replace(os.path.join(target, n), os.path.join(stage, n))
            for n in reversed(old):
                if os.path.lexists(os.path.join(backup, n)):
                    os.replace(os.path.join(backup, n), os.path.join(target, n))
        except BaseException as undo:
            raise _RollbackFailed(
                f"saving into {target} failed ({e!r}) and so did restoring the "
                "previous files "
                f"({undo!r}); they are in {backup}"
            ) from e
        raise
    _fsync(target, directory=True)
