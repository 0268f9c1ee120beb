"""Memory: what the host has available (MemAvailable, not MemFree), read through patched readers so that the
tests do not depend on this machine's state."""
from __future__ import annotations

import sys

import pytest

from hf_mfac.core import _checks


def _no_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError


def test_read_meminfo_parses_kb(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       24000000 kB\nMemFree:          1000 kB\nMemAvailable:    7340032 kB\n"
                 "HugePages_Total:       0\n")
    info = _checks.read_meminfo(str(p))
    assert info["MemAvailable"] == 7340032 * 1024
    assert info["MemFree"] == 1000 * 1024
    assert info["HugePages_Total"] == 0
    assert _checks.read_meminfo(str(tmp_path / "missing")) == {}


def test_cpu_free_bytes_is_mem_available(monkeypatch):
    _no_psutil(monkeypatch)
    monkeypatch.setattr(_checks, "read_meminfo", lambda path=None: {"MemFree": 1 << 20, "MemAvailable": 7 << 30})
    monkeypatch.setattr(_checks.os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)
    assert _checks.free_bytes("cpu") == 7 << 30


def test_cpu_free_bytes_falls_back_to_free_pages(monkeypatch):
    _no_psutil(monkeypatch)
    monkeypatch.setattr(_checks, "read_meminfo", lambda path=None: {})
    monkeypatch.setattr(_checks.os, "sysconf", lambda name: 3 if name == "SC_AVPHYS_PAGES" else 4096)
    assert _checks.free_bytes("cpu") == 3 * 4096


def test_cpu_free_bytes_prefers_psutil(monkeypatch):
    class VM:
        available = 5 << 30

    class FakePsutil:
        @staticmethod
        def virtual_memory():
            return VM()

    monkeypatch.setitem(sys.modules, "psutil", FakePsutil)
    monkeypatch.setattr(_checks, "read_meminfo", lambda path=None: {"MemAvailable": 7 << 30})
    assert _checks.free_bytes("cpu") == 5 << 30


def test_unknown_device_is_none():
    assert _checks.free_bytes("meta") is None
