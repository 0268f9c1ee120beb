"""Everything a user can get wrong, in one table: each row is a call that must fail with a clear
error (its type and the argument or file it names) or give the correct result, and leave what it
touched exactly as it was.

The rows live beside the code they exercise, in ``tests/faults_*.py`` modules, each with a list
``CASES`` of :class:`Fault`. ``build(tmp_path)`` makes the objects of a case and returns them in a
dict; everything in that dict that holds state (a module, an optimizer, a ``DynamicMFAC``, a folder
or file on disk, a tensor, a dict of tensors) is snapshotted before ``act`` runs and compared bit
for bit afterwards (for rows that raise, and for rows that set ``unchanged=True``). Interruptions
are injected (a loss or a writer that raises on its n-th call), never timed.
"""
from __future__ import annotations

import copy
import importlib
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch


@dataclass
class Fault:
    """One fault case. ``raises``: the exception type(s) expected (None: the call must succeed);
    ``match``: a regex the message must contain (the argument, tensor or file it names);
    ``check(ctx, result)``: more assertions (for the rows that must give a correct result);
    ``unchanged``: also compare the snapshots when the call succeeds; ``watch``: the keys of ``ctx``
    to snapshot (default: all)."""
    id: str
    build: Callable[[pathlib.Path], dict]
    act: Callable[[dict], Any]
    raises: type | tuple | None = None
    match: str | None = None
    check: Callable[[dict, Any], None] | None = None
    unchanged: bool = False
    watch: tuple | None = None
    marks: tuple = ()


def snapshot(obj):
    """A deep, comparable copy of the state held by ``obj`` (None for objects without state we
    know)."""
    from hf_mfac.core import DynamicMFAC

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach().clone() for k, v in obj.state_dict(keep_vars=False).items()}
    if isinstance(obj, torch.optim.Optimizer):
        return copy.deepcopy(obj.state_dict())
    if isinstance(obj, DynamicMFAC):
        return copy.deepcopy(obj.state_dict())
    if isinstance(obj, pathlib.Path):
        if obj.is_dir():
            return {
                str(p.relative_to(obj)): p.read_bytes()
                for p in sorted(obj.rglob("*"))
                if p.is_file()
            }
        return obj.read_bytes() if obj.exists() else None
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [snapshot(v) for v in obj]
    return None


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(torch.nan_to_num(a.cpu()), torch.nan_to_num(b.cpu())) and torch.equal(
            a.isnan().cpu(), b.isnan().cpu()
        ), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys changed {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where} changed length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where} changed: {a!r} -> {b!r}"


def _cases() -> list:
    out = []
    for path in sorted(pathlib.Path(__file__).parent.glob("faults_*.py")):
        mod = importlib.import_module(path.stem)
        for case in mod.CASES:
            out.append(
                pytest.param(case, id=f"{path.stem[len('faults_') :]}:{case.id}", marks=case.marks)
            )
    return out


@pytest.mark.parametrize("case", _cases())
def test_fault(case: Fault, tmp_path):
    ctx = case.build(tmp_path)
    keys = case.watch if case.watch is not None else tuple(ctx)
    before = {k: snapshot(ctx[k]) for k in keys}
    if case.raises is not None:
        with pytest.raises(case.raises) as info:
            case.act(ctx)
        if case.match is not None:
            assert re.search(case.match, str(info.value)), (
                f"message {str(info.value)!r} lacks {case.match!r}"
            )
        result = info.value
    else:
        result = case.act(ctx)
    if case.raises is not None or case.unchanged:
        for k in keys:
            assert_same(before[k], snapshot(ctx[k]), k)
    if case.check is not None:
        case.check(ctx, result)
