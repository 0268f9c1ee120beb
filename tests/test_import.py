"""`import hf_mfac` has no side effects (a rule of the layering: docs/architecture.md)."""
import subprocess
import sys

CODE = r"""
import sys, io, contextlib, torch
flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.get_float32_matmul_precision())
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    import hf_mfac, hf_mfac.comm, hf_mfac.core, hf_mfac.kernels, hf_mfac.optim, hf_mfac.pruning
    import hf_mfac.integrations
assert out.getvalue() == "", out.getvalue()
assert "transformers" not in sys.modules, "hf_mfac imported transformers"
assert "accelerate" not in sys.modules and "huggingface_hub" not in sys.modules
assert not torch.cuda.is_initialized()
assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_float32_matmul_precision())
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


def _import_graph():
    """{module: {hf_mfac modules it imports, at any depth of the file (function-level imports
    included)}}."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "hf_mfac"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = mod if parts[-1] == "__init__" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n.startswith("hf_mfac")}
        graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_layers_point_down_and_no_module_imports_in_a_circle():
    graph = _import_graph()
    order = [
        "hf_mfac.kernels",
        "hf_mfac.core",
        "hf_mfac.optim",
        "hf_mfac.pruning",
        "hf_mfac.integrations",
    ]
    rank = {
        "hf_mfac.kernels": 0,
        "hf_mfac.core": 1,
        "hf_mfac.comm": 1,
        "hf_mfac.optim": 2,
        "hf_mfac.pruning": 2,
        "hf_mfac.integrations": 3,
    }

    def layer(m):
        return next(
            (p for p in sorted(rank, key=len, reverse=True) if m == p or m.startswith(p + ".")),
            None,
        )

    for m, deps in graph.items():
        lm = layer(m)
        for d in deps:
            ld = layer(d)
            if lm is None or ld is None or lm == ld:
                continue
            assert rank[ld] < rank[lm], (
                f"{m} imports {d}: imports must point down {' -> '.join(reversed(order))}"
            )
    # no circle between modules (package __init__ re-exports excluded: they only gather names)
    inner = graph
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            cycle = stack[stack.index(m) :] + [m]
            if not any(c in ("hf_mfac", *order) for c in cycle):
                raise AssertionError("import circle: " + " -> ".join(cycle))
            return
        if m in seen:
            return
        stack.append(m)
        for d in inner[m]:
            visit(d)
        stack.pop()
        seen.add(m)

    for m in inner:
        visit(m)


def test_every_package_ships_in_the_wheel():
    """pyproject lists its packages by hand: every folder of hf_mfac with an __init__.py must be in
    the list, or an installed wheel lacks it (an editable install would not show it)."""
    import pathlib
    import tomllib

    repo = pathlib.Path(__file__).resolve().parents[1]
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(repo).parts)
             for p in (repo / "hf_mfac").rglob("__init__.py")}
    assert found <= set(setup["packages"]), sorted(found - set(setup["packages"]))
