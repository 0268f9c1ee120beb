"""`import hf_mfac` has no side effects (a rule of the layering: docs/architecture.md)."""
import subprocess
import sys

CODE = r"""
import sys, io, contextlib, torch
flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    import hf_mfac, hf_mfac.comm, hf_mfac.core, hf_mfac.kernels, hf_mfac.optim, hf_mfac.pruning, hf_mfac.integrations
assert out.getvalue() == "", out.getvalue()
assert "transformers" not in sys.modules, "hf_mfac imported transformers"
assert "accelerate" not in sys.modules and "huggingface_hub" not in sys.modules
assert not torch.cuda.is_initialized()
assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
import torch.utils.cpp_extension as ce
print("ok")
"""


def test_import_has_no_side_effects():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_core_never_imports_hf():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "hf_mfac"
    for layer in ("core", "kernels", "optim", "comm.py"):
        for f in (root / layer).glob("*.py") if (root / layer).is_dir() else [root / layer]:
            text = f.read_text()
            for mod in ("transformers", "accelerate", "huggingface_hub", "datasets"):
                assert f"import {mod}" not in text and f"from {mod}" not in text, (f, mod)
