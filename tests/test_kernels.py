"""hf_mfac.kernels: the torch references against float64 dense math, the dispatch and loader logic
on CPU, the CUDA kernels against the references (skipped without a GPU), and a compile-only check of
cuda/.

Tolerances: a dot product of length n accumulated in fp32 is off by at most ``n * u32 * sum|a_i
b_i|`` (u32 = 2^-24); storing G in bf16/fp16 adds at most ``u_storage * sum|g_i x_i|``. CUDA results
must be within a small multiple of the reference's own error in the same precision.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_mfac.kernels as K
from hf_mfac.kernels import _dispatch, _loader, _selfcheck, reference

ROOT = Path(__file__).resolve().parents[1]
U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _problem(m, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    return G.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _dense_inverse_apply(G, x, damp, scale):
    """F^{-1} x with F = damp I + G^T G / scale, in float64."""
    G, x = G.double(), x.double()
    F = damp * torch.eye(G.shape[1], dtype=torch.float64) + G.T @ G / scale
    return torch.linalg.solve(F, x)


# --- the references are the specification: check them against dense float64 math
# -------------------

@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("damp", [1e-1, 1e-4])
@pytest.mark.parametrize("scale_kind", ["m", "seen"])
def test_coefficients_apply_match_dense_solve(m, damp, scale_kind):
    """[M-FAC, App. B, Algs. 1 and 2] give F^{-1} x for F = damp I + (1/scale) G^T G; scale = m is
    the paper's choice, a smaller scale (gradients seen so far) must work the same way."""
    d = 101
    G, x = _problem(m, d, seed=m)
    scale = float(m) if scale_kind == "m" else max(1.0, m / 3)
    D, B = reference.mfac_coefficients(G @ G.T, damp, scale)
    got = reference.mfac_apply_coefficients(G, D, B, x, damp, scale)
    want = _dense_inverse_apply(G, x, damp, scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8 * want.abs().max().item())


def test_coefficients_match_algorithm_1_loops():
    """D and B equal a literal transcription of [M-FAC, App. B, Alg. 1] (with scale in place of
    m)."""
    m, damp, scale = 13, 1e-2, 13.0
    G, _ = _problem(m, 29, seed=3)
    D = G @ G.T / damp
    for i in range(1, m):
        row = D[i - 1, i:]
        D[i:, i:] -= torch.outer(row, row) / (scale + D[i - 1, i - 1])
    D = torch.triu(D)
    B = torch.eye(m, dtype=torch.float64) / damp
    for i in range(1, m):
        B[i, :i] = -(D[:i, i] / (scale + torch.diagonal(D)[:i])) @ B[:i, :i]
    D_ref, B_ref = reference.mfac_coefficients(G @ G.T, damp, scale)
    torch.testing.assert_close(D_ref, D, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(B_ref, B, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(reference.mfac_b(D, damp, scale), B, rtol=1e-10, atol=1e-8)


def test_apply_matches_algorithm_2_loop_with_each_q_divided_before_use():
    """[M-FAC, App. B, Alg. 2] as a loop, each q_{i-1} divided by (scale + D_{i-1,i-1}) before it is
    used (the printed algorithm divides only after the loop, which is wrong)."""
    m, d, damp, scale = 9, 40, 1e-2, 9.0
    G, x = _problem(m, d, seed=4)
    D, B = reference.mfac_coefficients(G @ G.T, damp, scale)
    q = G @ x / damp
    for i in range(m):
        q[i] = q[i] / (scale + D[i, i])
        q[i + 1:] -= q[i] * D[i, i + 1:]
    want = x / damp - G.T @ (B.T @ q)
    torch.testing.assert_close(reference.mfac_apply_coefficients(G, D, B, x, damp, scale), want)
    torch.testing.assert_close(want, _dense_inverse_apply(G, x, damp, scale), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,d", [(3, 101), (5, 70001)])  # 70001 > reference._CHUNK: several chunks
def test_window_products_accumulate_in_fp32(storage, m, d):
    """Low-precision storage is rounded once; the sums are fp32 (not rounded to the storage
    dtype)."""
    G64, x64 = _problem(m, d, seed=d)
    c64 = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Gs = G64.to(storage)
    Gr = Gs.double()  # exactly the stored values
    p = reference.window_matvec(Gs, x64.float())
    y = reference.window_rmatvec(Gs, c64.float())
    assert p.dtype == y.dtype == torch.float32
    xr, cr = x64.float().double(), c64.float().double()
    mag_p, mag_y = Gr.abs() @ xr.abs(), Gr.abs().T @ cr.abs()
    # accumulation only: against float64 on the stored values
    assert ((p.double() - Gr @ xr).abs() <= d * U32 * mag_p + 1e-30).all()
    assert ((y.double() - Gr.T @ cr).abs() <= m * U32 * mag_y + 1e-30).all()
    # storage rounding on top, against the unrounded values
    u = UNIT_ROUNDOFF[storage]
    assert ((p.double() - G64 @ xr).abs() <= (u + d * U32) * mag_p + 1e-30).all()
    assert ((y.double() - G64.T @ cr).abs() <= (u + m * U32) * mag_y + 1e-30).all()


def test_window_products_fp64_accumulation_on_request():
    G, x = _problem(4, 33)
    assert reference.window_matvec(G.float(), x.float(), torch.float64).dtype == torch.float64
    torch.testing.assert_close(reference.window_rmatvec(G, x[:4]), G.T @ x[:4])


# --- dispatch and loader on CPU
# ----------------------------------------------------------------------

@pytest.fixture
def fresh_dispatch(monkeypatch):
    """No env override, the once-per-process warning re-armed, the loader's cached checks
    cleared."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_warned", [False])
    _loader.reset()
    yield
    _loader.reset()


@pytest.fixture
def cpu_as_cuda(monkeypatch, fresh_dispatch):
    """Predicates treat CPU tensors as CUDA ones and the loader refuses with a known reason: the
    path a GPU machine without nvcc takes, exercised on CPU."""
    monkeypatch.setattr(_dispatch, "_is_cuda", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(_loader, "_check_environment", lambda: "nvcc not found (test)")


def _all_ops(dtype=torch.float32):
    m, d, damp, scale = 5, 23, 1e-2, 5.0
    G, x = _problem(m, d, seed=7, dtype=dtype)
    GGt = (G @ G.T).double()
    D, B = reference.mfac_coefficients(GGt, damp, scale)
    D, B = D.to(dtype), B.to(dtype)
    return {
        "window_matvec": (G, x, None),
        "window_rmatvec": (G, x[:m], None),
        "mfac_b": (D, damp, scale),
        "mfac_coefficients": (GGt.to(dtype), damp, scale),
        "mfac_apply_coefficients": (G, D, B, x, damp, scale),
    }


def _assert_same(a, b):
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(_dispatch._OPS))
def test_impl_torch_and_auto_on_cpu_run_the_reference_silently(op, fresh_dispatch):
    args = _all_ops()[op]
    want = getattr(reference, op)(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(getattr(K, op)(*args, impl="torch"), want)
        # CPU inputs: outside the kernel's limits, no warning
        _assert_same(getattr(K, op)(*args), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a "
                                                      "GPU")
@pytest.mark.parametrize("op", sorted(_dispatch._OPS))
def test_impl_cuda_without_gpu_raises_with_reason(op, fresh_dispatch):
    with pytest.raises(K.KernelUnavailableError, match=r"torch\.cuda\.is_available\(\) is False"):
        getattr(K, op)(*_all_ops()[op], impl="cuda")


def test_impl_cuda_names_the_loader_reason(cpu_as_cuda):
    with pytest.raises(K.KernelUnavailableError, match=r"window_matvec\(impl='cuda'\).*nvcc not "
                                                       r"found \(test\)"):
        K.window_matvec(*_all_ops()["window_matvec"], impl="cuda")


def test_impl_cuda_names_the_input_reason(monkeypatch, fresh_dispatch):
    monkeypatch.setattr(_dispatch, "_is_cuda", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(_loader, "_check_environment", lambda: None)
    G, x, _ = _all_ops()["window_matvec"]
    with pytest.raises(K.KernelUnavailableError, match="limits: G must be contiguous"):
        K.window_matvec(G.T.contiguous().T, x, impl="cuda")


def test_auto_falls_back_with_exactly_one_warning(cpu_as_cuda):
    ops = _all_ops()
    with pytest.warns(K.KernelFallbackWarning, match="nvcc not found") as record:
        for _ in range(3):
            for op, args in ops.items():
                _assert_same(getattr(K, op)(*args), getattr(reference, op)(*args))
    assert len([w for w in record if issubclass(w.category, K.KernelFallbackWarning)]) == 1


def test_env_var_overrides_auto_only(cpu_as_cuda, monkeypatch):
    args = _all_ops()["window_matvec"]
    want = reference.window_matvec(*args)
    monkeypatch.setenv(K.ENV_VAR, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(K.window_matvec(*args), want)  # forced torch: no fallback warning
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(K.KernelUnavailableError, match="nvcc not found"):
        K.window_matvec(*args)
    _assert_same(K.window_matvec(*args, impl="torch"), want)  # an explicit impl wins
    monkeypatch.setenv(K.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="HF_MFAC_KERNELS"):
        K.window_matvec(*args)
    with pytest.raises(ValueError, match="impl must be one of"):
        K.window_matvec(*args, impl="triton")


def test_supports_predicates(monkeypatch):
    G, x = _problem(6, 40, dtype=torch.float32)
    assert not K.supports("window_matvec", G, x)  # CPU tensors
    assert "CUDA tensor" in K.why_not("window_matvec", G, x)
    monkeypatch.setattr(_dispatch, "_is_cuda", lambda t: isinstance(t, torch.Tensor))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert K.supports("window_matvec", G.to(dt), x)
        assert K.supports("window_rmatvec", G.to(dt), x[:6])
    assert "float32, bfloat16 or float16" in K.why_not("window_matvec", G.double(), x)
    assert "contiguous" in K.why_not("window_matvec", G.T.contiguous().T, x)
    assert "shape (40,)" in K.why_not("window_matvec", G, x[:39])
    assert "shape (6,)" in K.why_not("window_rmatvec", G, x)
    assert "accumulates in float32" in K.why_not("window_matvec", G, x, torch.float64)
    assert "autograd" in K.why_not("window_matvec", G.clone().requires_grad_(), x)
    with torch.no_grad():
        assert K.supports("window_matvec", G.clone().requires_grad_(), x)
    A = torch.eye(33)
    assert K.supports("mfac_b", A, 1e-3, 33.0) and K.supports("mfac_b", A.double(), 1e-3, 33.0)
    assert K.supports("mfac_coefficients", A, 1e-3, 33.0)  # any m: not only multiples of 32
    assert "square" in K.why_not("mfac_b", A[:5], 1e-3, 33.0)
    assert "float32 or float64" in K.why_not("mfac_b", A.half(), 1e-3, 33.0)
    for op in ("mfac_b", "mfac_coefficients"):  # the kernel's damp > 0 and scale >= 0 check
        assert "damp > 0 and scale >= 0" in K.why_not(op, A, 0.0, 33.0)
        assert "damp > 0 and scale >= 0" in K.why_not(op, A, 1e-3, -1.0)
        assert "damp > 0 and scale >= 0" in K.why_not(op, A, float("nan"), 33.0)
        assert K.supports(op, A, 1e-3, 0.0)
    Dm, Bm = torch.eye(6), torch.eye(6)
    assert K.supports("mfac_apply_coefficients", G, Dm, Bm, x, 1e-3, 6.0)
    assert "float32" in K.why_not("mfac_apply_coefficients", G, Dm.double(), Bm, x, 1e-3, 6.0)
    assert "(6, 6)" in K.why_not("mfac_apply_coefficients", G, Dm[:5, :5], Bm, x, 1e-3, 6.0)
    with pytest.raises(ValueError, match="unknown kernel op"):
        K.supports("cap_eliminate", G)


def test_status_reports_reason_without_building(fresh_dispatch):
    st = K.status()
    assert set(st) >= {"available", "reason", "loaded", "failed", "build_root", "sources"}
    assert {"mfac_ext.cpp", "window_gemv.cu", "mfac_b.cu"} <= set(st["sources"])
    assert st["available"] == (st["reason"] is None)
    if not torch.cuda.is_available():
        assert not st["available"] and "torch.cuda.is_available() is False" in st["reason"]
        with pytest.raises(K.KernelUnavailableError, match="is_available"):
            _loader.load()


def test_build_key_depends_on_sources_and_arch(tmp_path, monkeypatch):
    for p in _loader.source_dir().iterdir():
        if p.is_file():
            shutil.copy(p, tmp_path / p.name)
    monkeypatch.setattr(_loader, "source_dir", lambda: tmp_path)
    k90 = _loader.build_key("sm_90")
    assert k90 == _loader.build_key("sm_90") != _loader.build_key("sm_80")
    (tmp_path / "mfac_kernels.h").write_text((tmp_path / "mfac_kernels.h").read_text() + "\n// "
                                                                                         "edit\n")
    assert _loader.build_key("sm_90") != k90  # headers count too


def test_sources_ship_with_the_package():
    src = _loader.source_dir()
    assert (
        (src / "mfac_ext.cpp").is_file()
        and (src / "README.md").is_file()
        and (src / "__init__.py").is_file()
    )


def test_import_compiles_nothing_and_leaves_cuda_alone(tmp_path):
    code = (
        "import sys, torch\n"
        "import hf_mfac.kernels as k\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "from hf_mfac.kernels import _loader\n"
        "assert not _loader._modules and not _loader._precheck\n"
    )
    env = dict(
        os.environ,
        HF_MFAC_BUILD_DIR=str(tmp_path / "build"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and not (tmp_path / "build").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc"
)
def test_cuda_sources_compile():
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_cuda.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("compile_cuda: ok") >= 3


# --- limits in one place: every TORCH_CHECK of cuda/*.cpp has its mirror in why_not
# -----------------


def _strip_cpp_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def torch_check_conditions(text: str) -> list[str]:
    """The first argument of every ``TORCH_CHECK(...)`` call, whitespace collapsed (strings and
    nested parentheses respected)."""
    text = _strip_cpp_comments(text)
    conds = []
    for hit in re.finditer(r"\bTORCH_CHECK\s*\(", text):
        i = j = hit.end()
        depth = 0
        while True:
            ch = text[j]
            if ch == '"':
                j = text.index('"', j + 1)
                while text[j - 1] == "\\":
                    j = text.index('"', j + 1)
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "," and depth == 0:
                break
            j += 1
        conds.append(" ".join(text[i:j].split()))
    return conds


def _cpp_conditions() -> list[str]:
    conds = []
    for p in sorted(_loader.source_dir().glob("*.cpp")):
        conds += torch_check_conditions(p.read_text())
    return conds


def test_torch_check_parser():
    text = ('TORCH_CHECK(a(1, 2) > 0, "x, y", f(3));\n// TORCH_CHECK(commented, "no");\n'
            'TORCH_CHECK(b,\n "\\"q,\\"")')
    assert torch_check_conditions(text) == ["a(1, 2) > 0", "b"]


def test_every_torch_check_has_a_mirror():
    conds = _cpp_conditions()
    assert len(conds) >= 16
    assert sorted(set(conds)) == sorted(K.TORCH_CHECK_MIRRORS), (
        "cuda/*.cpp TORCH_CHECKs and hf_mfac.kernels.TORCH_CHECK_MIRRORS differ: "
        f"unmirrored {sorted(set(conds) - set(K.TORCH_CHECK_MIRRORS))}, "
        f"stale {sorted(set(K.TORCH_CHECK_MIRRORS) - set(conds))}"
    )
    assert {kind for kind, _ in K.TORCH_CHECK_MIRRORS.values()} <= {
        "why_not",
        "converted",
        "runtime",
    }


def _violators() -> dict[str, list[tuple[str, tuple]]]:
    """For each "why_not" mirror: inputs of every op that reaches the check, violating only that
    condition (CPU tensors stand in for CUDA ones, except where the condition is the device
    itself)."""
    m, d, damp, scale = 5, 24, 1e-2, 5.0
    G, x = _problem(m, d, dtype=torch.float32)
    c = x[:m].clone()
    D = torch.eye(m) + torch.triu(torch.rand(m, m), 1)
    Bm = torch.eye(m)
    big = torch.zeros(1).expand(_dispatch._MAX_M + 1, _dispatch._MAX_M + 1)  # no memory behind it

    def window(Gv, xv=x, cv=c):  # the three ops that read G
        return [
            ("window_matvec", (Gv, xv, None)),
            ("window_rmatvec", (Gv, cv, None)),
            ("mfac_apply_coefficients", (Gv, D, Bm, xv, damp, scale)),
        ]

    def square(A, dmp=damp, scl=scale):
        return [("mfac_b", (A, dmp, scl)), ("mfac_coefficients", (A, dmp, scl))]

    meta_x, meta_c = torch.empty(d, device="meta"), torch.empty(m, device="meta")
    return {
        "G.is_cuda()": window(G),
        "G.dim() == 2": window(G.reshape(m, d, 1)) + window(G.reshape(-1)),
        "G.size(0) > 0 && G.size(1) > 0": window(G[:0]) + window(G[:, :0]),
        "G.is_contiguous()": window(G.T.contiguous().T),
        "st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16": window(
            G.double()
        ),
        "v.device() == G.device()": [
            ("window_matvec", (G, meta_x, None)),
            ("window_rmatvec", (G, meta_c, None)),
            ("mfac_apply_coefficients", (G, D, Bm, meta_x, damp, scale)),
        ],
        "v.dim() == 1 && v.size(0) == n": [
            ("window_matvec", (G, x[:-1], None)),
            ("window_rmatvec", (G, x, None)),
            ("mfac_apply_coefficients", (G, D, Bm, x[:, None], damp, scale)),
        ],
        "D.is_cuda()": square(D),
        "D.dim() == 2 && D.size(0) == D.size(1) && D.size(0) > 0": square(D[:3])
        + square(D[:0, :0]),
        "D.scalar_type() == torch::kFloat32 || D.scalar_type() == torch::kFloat64": square(
            D.half()
        ),
        "damp > 0 && scale >= 0": square(D, 0.0)
        + square(D, -1e-3)
        + square(D, damp, -1.0)
        + square(D, float("nan")),
        "hf_mfac::ceil_div(m, hf_mfac::kBTile) <= 65535": square(big),
    }


def test_every_why_not_mirror_rejects_a_violating_input(monkeypatch):
    violators = _violators()
    mirrored = {c for c, (kind, _) in K.TORCH_CHECK_MIRRORS.items() if kind == "why_not"}
    assert set(violators) == mirrored
    for cond, cases in violators.items():
        fragment = K.TORCH_CHECK_MIRRORS[cond][1]
        with monkeypatch.context() as mp:
            if "is_cuda()" not in cond:
                mp.setattr(_dispatch, "_is_cuda", lambda t: isinstance(t, torch.Tensor))
            for op, args in cases:
                why = K.why_not(op, *args)
                assert why is not None and fragment in why, (cond, op, why)


def test_converted_mirrors_hold_at_the_kernel_boundary(monkeypatch):
    """x/c reach the kernel as contiguous fp32, D contiguous, whatever the caller passed."""
    seen = []

    class Ext:
        def window_matvec(self, G, x, stream):
            seen.append(x)
            return reference.window_matvec(G, x)

        def window_rmatvec(self, G, c, stream):
            seen.append(c)
            return reference.window_rmatvec(G, c)

        def mfac_b(self, D, damp, scale, stream):
            seen.append(D)
            return reference.mfac_b(D, damp, scale)

    ext = Ext()
    G, x = _problem(6, 40, dtype=torch.float32)
    xs = torch.randn(80)[::2].half()  # strided and fp16
    _dispatch.launch_window_matvec(ext, G, xs)
    _dispatch.launch_window_rmatvec(ext, G, torch.randn(12)[::2].bfloat16())
    D, B = reference.mfac_coefficients((G @ G.T).double(), 1e-2, 6.0)
    _dispatch.launch_mfac_apply_coefficients(ext, G, D.float(), B.float(), xs, 1e-2, 6.0)
    _dispatch.launch_mfac_b(ext, D.T.contiguous().T, 1e-2, 6.0)
    assert len(seen) == 5
    for v in seen[:4]:
        assert v.dtype == torch.float32 and v.is_contiguous()
    assert seen[4].is_contiguous()


# --- CUDA kernels against the references (GPU only)
# -------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = _loader.environment_reason()
    if reason is not None:
        pytest.fail(f"a GPU is present but the kernels cannot be built: {reason}")
    return _loader.load(torch.device("cuda"))


def _check_close(got, ref_same_precision, exact, floor):
    """|got - exact| within 4x the reference's own error in the same precision, plus a floor (the
    tolerance the kernels' self-check uses too)."""
    ok, err, bound = _selfcheck.within_tolerance(got, ref_same_precision, exact, floor)
    assert ok, f"kernel error {err:.3g} > allowed {bound:.3g}"


WINDOW_SHAPES = [
    (1, 1),
    (7, 101),
    (33, 4099),
    (4, 1 << 20),
    (1024, 8192),
    (100, 70003),
    (1500, 257),
]


@needs_cuda
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,d", WINDOW_SHAPES)
def test_cuda_window_products_match_reference(ext, storage, m, d):
    G, x = _problem(m, d, seed=m + d, dtype=torch.float32, device="cuda")
    c = torch.randn(m, device="cuda")
    Gs = G.to(storage)
    Gr = Gs.double()
    p = K.window_matvec(Gs, x, impl="cuda")
    y = K.window_rmatvec(Gs, c, impl="cuda")
    assert p.dtype == y.dtype == torch.float32 and p.shape == (m,) and y.shape == (d,)
    p64, y64 = Gr @ x.double(), Gr.T @ c.double()
    _check_close(
        p, reference.window_matvec(Gs, x), p64, 8 * U32 * (Gr.abs() @ x.double().abs()).max().item()
    )
    _check_close(
        y,
        reference.window_rmatvec(Gs, c),
        y64,
        8 * U32 * (Gr.abs().T @ c.double().abs()).max().item(),
    )


@needs_cuda
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_cuda_window_products_unaligned_inputs(ext, storage):
    """x at an odd offset, and a row length that breaks 16-byte alignment (scalar path)."""
    m, d = 9, 1001
    G = torch.randn(m, d, device="cuda").to(storage)
    xbuf = torch.randn(d + 1, device="cuda")
    x = xbuf[1:]
    torch.testing.assert_close(
        K.window_matvec(G, x, impl="cuda"), reference.window_matvec(G, x), rtol=1e-5, atol=1e-4
    )
    G2 = torch.randn(m * d + 1, device="cuda").to(storage)[1:].view(m, d)  # misaligned base
    torch.testing.assert_close(
        K.window_rmatvec(G2, x[:m], impl="cuda"),
        reference.window_rmatvec(G2, x[:m]),
        rtol=1e-5,
        atol=1e-4,
    )


@needs_cuda
def test_cuda_window_products_on_side_stream(ext):
    G, x = _problem(64, 100003, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        p = K.window_matvec(G, x, impl="cuda")
    s.synchronize()
    torch.testing.assert_close(p, G @ x, rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_device_guard(ext):
    G, x = _problem(16, 5000, dtype=torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        p = K.window_matvec(G, x, impl="cuda")
        assert torch.cuda.current_device() == 0
    assert p.device == G.device
    torch.testing.assert_close(p, G @ x, rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 31, 32, 33, 100, 1000, 1057, 2085])
def test_cuda_mfac_b_matches_reference(ext, dtype, m):
    damp = 1e-3
    G, _ = _problem(m, 3 * m + 7, seed=m, dtype=torch.float64, device="cuda")
    D64 = reference.mfac_d(G @ G.T, damp, float(m))
    D = D64.to(dtype)
    B = K.mfac_b(D, damp, float(m), impl="cuda")
    assert B.dtype == dtype and torch.equal(torch.triu(B, 1), torch.zeros_like(B))
    exact = reference.mfac_b(D.double(), damp, float(m))
    floor = 16 * torch.finfo(dtype).eps * exact.abs().max().item()
    _check_close(B, reference.mfac_b(D, damp, float(m)), exact, floor)


@needs_cuda
@pytest.mark.parametrize("m", [7, 33, 300])
def test_cuda_coefficients_and_apply_match_reference(ext, m):
    d, damp, scale = 5003, 1e-2, float(m)
    G, x = _problem(m, d, seed=m, dtype=torch.float32, device="cuda")
    GGt = G @ G.T
    D, B = K.mfac_coefficients(GGt, damp, scale, impl="cuda")
    D_ref, B_ref = reference.mfac_coefficients(GGt, damp, scale)
    torch.testing.assert_close(D, D_ref, rtol=0, atol=0)  # same torch Cholesky
    D64, B64 = reference.mfac_coefficients(GGt.double(), damp, scale)
    _check_close(B, B_ref, B64, 16 * U32 * B64.abs().max().item())
    y = K.mfac_apply_coefficients(G, D, B, x, damp, scale, impl="cuda")
    exact = _dense_inverse_apply(G.cpu(), x.cpu(), damp, scale).cuda()
    y_ref = reference.mfac_apply_coefficients(G, D_ref, B_ref, x, damp, scale)
    _check_close(y, y_ref, exact, 64 * U32 * exact.abs().max().item())


@needs_cuda
def test_cuda_auto_uses_kernel(ext, fresh_dispatch):
    G, x = _problem(8, 1000, dtype=torch.bfloat16, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.window_matvec(G, x.float())
    assert K.status()["loaded"]
