"""benchmarks/gpu_check.sh: the dry run lists its parts without a GPU, and the driver's report is
complete (formatted here from a synthetic GPU run, and produced for real without a GPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "build", "tests", "bench_kernels", "bench_optim", "bench_core", "sparse24",
         "split")


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_part_and_exits_0(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_VENV=str(tmp_path / "venv"))
    env.pop("PYTHON", None)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                         env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in PARTS:
        assert f" {name} " in res.stdout
    assert "MISSING" not in res.stdout
    assert "setup: create" in res.stdout and "pip install -e" in res.stdout
    assert "budget 470 s" in res.stdout
    # nothing installed or written
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()


def test_budgets_fit_in_eight_minutes():
    plan = _driver().parts("python")
    assert [p.name for p in plan] == list(PARTS)
    assert sum(p.minimum for p in plan) < 470 < 8 * 60
    assert [p.name for p in plan if p.essential] == ["env", "build", "tests"]


def _part(name, stdout="", status="ok"):
    return {"name": name, "title": name, "status": status, "rc": 0, "seconds": 1.0, "budget": 60,
            "cmd": "x",
            "stdout": stdout, "stderr": ""}


def test_markdown_of_a_gpu_run():
    drv = _driver()
    checks = [{"kernel": k, "dtype": t, "ok": True, "max_err": 1e-6, "bound": 4e-6,
               "case": "m=67 d=4099",
               "error": None, "seconds": 0.002} for k, t in (("window_matvec", "float32"),
                                                             ("mfac_b", "float64"))]
    checks[1].update(ok=False, max_err=0.5)
    results = {
        "date": "2025-01-01", "total_s": 300.0, "setup_error": None,
        "env": {"gpu": "NVIDIA H200", "gpus": 1, "sm": "sm_90", "memory_gib": 139.8, "sms": 132,
                "torch": "2.9.0",
                "torch_cuda": "12.8", "nvcc": "V12.8", "ninja": True, "nvidia_smi": "NVIDIA H200, "
                                                                                    "570",
                "commit": "abc"},
        "build_kernels": {"ok": False, "reason": None, "lock": "filelock", "devices": [
            {"index": 0, "name": "NVIDIA H200", "arch": "sm_90", "compiled": True, "seconds": 71.2,
             "error": None,
             "checks": checks}]},
        "parts": [_part("env"), _part("build"), _part("tests", "== 120 passed, 3 skipped in 40.0s "
                                                               "=="),
                  _part("bench_kernels", "# hf_mfac kernel benchmarks\n## Coefficient setup\n| m "
                                         "|\n|---|\n| 1024 |"),
                  _part("bench_optim", "('mini', 1)\n| params |\n|---|\n| mini |"),
                  _part("bench_core", "# core benchmarks\n\n| d | m | B |\n|---|\n| 4194304 | 256 "
                                      "| 32 |"),
                  _part("sparse24", "2:4 inference ...\n| tokens |", status="timeout"),
                  _part("split", "split: 4 BERT layers\n\n| run | Fisher placement |\n|---|---|\n"
                                 "| dispatched (device_map) | cuda:0 0-95; cpu 96-191 |\n"
                                 "split: hooks intact: True\n@@GPU_CHECK_JSON {}")],
    }
    md = drv.markdown(results)
    assert md.startswith("### GPU check: NVIDIA H200 (x1, sm_90, 139.8 GiB, 132 SMs), 2025-01-01")
    assert "compiled in 71.2 s" in md and "Self-check: 1/2 passed" in md
    assert "120 passed, 3 skipped" in md
    assert "| cuda:0 | mfac_b | float64 | FAIL | 0.5 |" in md
    # nested under ###
    assert "#### hf_mfac kernel benchmarks" in md and "##### Coefficient setup" in md
    assert "('mini', 1)" not in md and "| mini |" in md  # progress lines left out
    assert "(sparse24: timeout after 1 s of a 60 s budget" in md
    assert (
        "#### Block-Fisher add_grads + invert vs the bare fp32 batched GEMM" in md
        and "| 4194304 | 256 | 32 |" in md
    )
    assert "# core benchmarks" not in md
    assert "| bench_optim | ok |" in md and "| sparse24 | timeout |" in md
    assert "#### A model split between the GPU and the CPU" in md
    assert "| dispatched (device_map) | cuda:0 0-95; cpu 96-191 |" in md
    assert "split: hooks intact: True" in md and "@@GPU_CHECK_JSON" not in md


def test_split_part_runs_on_the_cpu_alone():
    """The split part's own code, with the CPU standing in for the GPU: the dispatched model and the
    placed Fisher give the CPU run's masks, the hooks stay, the report is complete."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--split-check", "--device",
         "cpu", "--layers", "2", "--hidden", "32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "| dispatched (device_map) |" in out and "| CPU model, Fisher placed |" in out
    assert out.count("| yes |") == 3 and "hooks intact: True" in out and "; ok" in out
    data = _driver().marked_json(out)
    assert data["failures"] == []
    assert len(data["runs"]["CPU model, Fisher placed"]["placement"]) == 2


def test_split_part_without_a_gpu_says_so():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--split-check"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    import torch

    if torch.cuda.is_available():
        return
    assert res.returncode == 1 and "torch sees no CUDA device" in res.stdout


def test_driver_without_gpu_writes_its_report(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--python",
            sys.executable,
            "--parts",
            "build",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_MFAC_BUILD_DIR=str(tmp_path / "build")),
    )
    if res.returncode == 0:  # a GPU machine: the build passed
        return
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Build: nothing built: torch.cuda.is_available() is False" in md
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["build_kernels"]["ok"] is False and data["parts"][0]["status"] == "ok"
    assert (tmp_path / "gpu_check.log").read_text().startswith("===== build: ok")
