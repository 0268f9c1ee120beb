"""The kernels' self-check, its verdict cache, the build's file lock and build_kernels, on CPU.

A fake compiled module stands in for the CUDA extension: it computes the torch reference (a correct
kernel) or a deliberately wrong variant, and CPU tensors pass for CUDA ones. The real kernels are
checked by the tests marked ``needs_cuda`` at the end (skipped without a GPU).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import hf_mfac.kernels as K
from hf_mfac.kernels import _build, _dispatch, _loader, _selfcheck, reference

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeExt:
    """A stand-in for the compiled module. ``wrong(kernel, inputs, out) -> out`` corrupts results;
    the asserts are the C++ TORCH_CHECKs the Python glue has to satisfy."""

    def __init__(self, build_root: Path, wrong=None, name="hf_mfac_cuda_sm_00_0123456789abcdef"):
        self.__name__ = name
        self.__file__ = str(build_root / name / f"{name}.so")
        self.wrong = wrong or (lambda kernel, inputs, out: out)
        self.calls = Counter()

    def window_matvec(self, G, x, stream):
        assert x.dtype == torch.float32 and x.is_contiguous() and isinstance(stream, int)
        self.calls["window_matvec"] += 1
        return self.wrong("window_matvec", (G, x), reference.window_matvec(G, x))

    def window_rmatvec(self, G, c, stream):
        assert c.dtype == torch.float32 and c.is_contiguous() and isinstance(stream, int)
        self.calls["window_rmatvec"] += 1
        return self.wrong("window_rmatvec", (G, c), reference.window_rmatvec(G, c))

    def mfac_b(self, D, damp, scale, stream):
        assert D.is_contiguous() and damp > 0 and scale >= 0
        self.calls["mfac_b"] += 1
        return self.wrong("mfac_b", (D,), reference.mfac_b(D, damp, scale))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CPU tensors count as CUDA ones, the environment can build, and ``load`` returns
    ``fake_gpu.ext`` (set it in the test; a correct fake by default). Verdicts live under
    ``tmp_path``."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setenv("HF_MFAC_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(_dispatch, "_warned", [False])
    monkeypatch.setattr(_dispatch, "_is_cuda", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(_loader, "_check_environment", lambda: None)
    _loader.reset()
    _selfcheck.reset()
    state = types.SimpleNamespace(root=tmp_path / "build", ext=FakeExt(tmp_path / "build"))
    monkeypatch.setattr(_loader, "load", lambda device=None: state.ext)
    yield state
    _selfcheck.reset()
    _loader.reset()


def _window(m=6, d=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g).to(dtype), torch.randn(d, generator=g)


def _perturb(kernel_name, when=lambda inputs: True, rel=1e-3):
    """A wrong kernel: ``kernel_name``'s first output element off by ``rel`` of the largest, when
    ``when``."""
    def wrong(kernel, inputs, out):
        if kernel == kernel_name and when(inputs):
            out = out.clone()
            out[0] += rel * out.abs().max().clamp_min(1.0)
        return out
    return wrong


def _selfcheck_warnings(record):
    return [w for w in record if issubclass(w.category, K.KernelSelfCheckWarning)]


# --- a correct kernel: checked once, then used
# ---------------------------------------------------------

def test_correct_kernel_is_checked_once_then_used(fake_gpu):
    G, x = _window()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            torch.testing.assert_close(K.window_matvec(G, x), reference.window_matvec(G, x))
    n_check = len(_selfcheck.window_problems(torch.float32, "cpu"))
    # the check's problems, then the 3 real calls
    assert fake_gpu.ext.calls["window_matvec"] == n_check + 3
    assert fake_gpu.ext.calls["window_rmatvec"] == 0  # only what is used is checked
    (v,) = K.status()["selfcheck"]
    assert (
        v["ok"]
        and v["kernel"] == "window_matvec"
        and v["dtype"] == "float32"
        and v["source"] == "run"
    )
    assert 0 <= v["max_err"] <= v["bound"]


def test_checks_are_per_kernel_and_dtype(fake_gpu):
    G, x = _window()
    c = torch.randn(G.shape[0])
    K.window_matvec(G, x)
    K.window_matvec(G.bfloat16(), x)
    K.window_rmatvec(G.half(), c)
    D, B = reference.mfac_coefficients((G @ G.T).double(), 1e-2, 6.0)
    # reuses window_matvec fp32, checks rmatvec
    K.mfac_apply_coefficients(G, D.float(), B.float(), x, 1e-2, 6.0)
    K.mfac_coefficients((G @ G.T).float(), 1e-2, 6.0)  # the B kernel in fp32
    got = {(v["kernel"], v["dtype"]) for v in K.status()["selfcheck"]}
    assert got == {
        ("window_matvec", "float32"),
        ("window_matvec", "bfloat16"),
        ("window_rmatvec", "float16"),
        ("window_rmatvec", "float32"),
        ("mfac_b", "float32"),
    }


def test_check_leaves_global_rng_and_autograd_alone(fake_gpu):
    G, x = _window()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    K.window_matvec(G, x)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.is_grad_enabled()


# --- a wrong kernel: auto falls back with one warning, cuda raises
# -------------------------------------


def test_wrong_kernel_auto_falls_back_with_one_warning(fake_gpu):
    fake_gpu.ext = FakeExt(fake_gpu.root, wrong=_perturb("window_matvec"))
    G, x = _window()
    want = reference.window_matvec(G, x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(K.window_matvec(G, x), want, rtol=0, atol=0)
    (w,) = _selfcheck_warnings(record)
    assert len(record) == 1
    msg = str(w.message)
    assert (
        "window_matvec (float32)" in msg
        and "max error" in msg
        and "> allowed" in msg
        and "m=67" in msg
    )
    assert "HF_MFAC_KERNELS=torch" in msg
    assert w.filename == __file__  # points at the caller
    n_check = fake_gpu.ext.calls["window_matvec"]
    K.window_matvec(G, x)
    assert fake_gpu.ext.calls["window_matvec"] == n_check  # the kernel is not called again
    # other kernels are unaffected
    torch.testing.assert_close(K.window_rmatvec(G, x[:6]), reference.window_rmatvec(G, x[:6]))
    assert fake_gpu.ext.calls["window_rmatvec"] > 0


def test_wrong_kernel_impl_cuda_raises_with_the_numbers(fake_gpu):
    fake_gpu.ext = FakeExt(fake_gpu.root, wrong=_perturb("mfac_b"))
    D = torch.eye(7) + torch.triu(torch.rand(7, 7), 1)
    with pytest.raises(
        K.KernelSelfCheckError,
        match=r"mfac_b\(impl='cuda'\).*mfac_b "
        r"\(float32\).*max error",
    ):
        K.mfac_b(D, 1e-2, 7.0, impl="cuda")
    with pytest.raises(K.KernelSelfCheckError):  # the remembered verdict, same answer
        K.mfac_coefficients(torch.eye(7), 1e-2, 7.0, impl="cuda")
    assert isinstance(K.KernelSelfCheckError("x"), K.KernelUnavailableError)
    with pytest.warns(K.KernelSelfCheckWarning):  # auto: the reference
        torch.testing.assert_close(
            K.mfac_b(D, 1e-2, 7.0), reference.mfac_b(D, 1e-2, 7.0), rtol=0, atol=0
        )


def test_wrong_only_for_one_dtype(fake_gpu):
    fake_gpu.ext = FakeExt(
        fake_gpu.root, wrong=_perturb("window_rmatvec", lambda i: i[0].dtype == torch.bfloat16)
    )
    G, _ = _window()
    c = torch.randn(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.window_rmatvec(G, c)
        K.window_rmatvec(G.half(), c)
    with pytest.warns(K.KernelSelfCheckWarning, match=r"window_rmatvec \(bfloat16\)"):
        K.window_rmatvec(G.bfloat16(), c)


@pytest.mark.parametrize(
    "what, when",
    [
        ("misaligned base of G", lambda i: i[0].storage_offset() % 4 != 0),
        (
            "x misaligned while G is aligned",
            lambda i: i[1].storage_offset() % 4 != 0 and i[0].storage_offset() == 0,
        ),
        ("split reduction over d", lambda i: i[0].shape[1] > 8192),
        ("partial last group of 4 rows", lambda i: i[0].shape[0] % 4 != 0 and i[0].shape[0] > 4),
    ],
)
def test_check_reaches_the_edge_paths(fake_gpu, what, when):
    """A kernel wrong only on one edge path is caught (the problems reach it)."""
    fake_gpu.ext = FakeExt(fake_gpu.root, wrong=_perturb("window_matvec", when))
    G, x = _window(4, 64)  # the caller's own inputs reach none of these paths
    with pytest.warns(K.KernelSelfCheckWarning, match="window_matvec"):
        K.window_matvec(G, x)


def test_kernel_that_raises_or_returns_garbage_fails_its_check(fake_gpu):
    def boom(kernel, inputs, out):
        raise RuntimeError("hf_mfac CUDA window_matvec launch failed: invalid argument")

    fake_gpu.ext = FakeExt(fake_gpu.root, wrong=boom)
    G, x = _window()
    with pytest.warns(
        K.KernelSelfCheckWarning, match="raised RuntimeError: hf_mfac CUDA window_matvec launch"
    ):
        torch.testing.assert_close(K.window_matvec(G, x), reference.window_matvec(G, x))
    _selfcheck.reset()
    fake_gpu.ext = FakeExt(
        fake_gpu.root,
        wrong=lambda k, i, out: torch.full_like(out, float("nan")),
        name="hf_mfac_cuda_sm_00_nan",
    )
    with pytest.warns(K.KernelSelfCheckWarning, match="max error nan"):
        K.window_matvec(G, x)
    _selfcheck.reset()
    fake_gpu.ext = FakeExt(
        fake_gpu.root, wrong=lambda k, i, out: out.double(), name="hf_mfac_cuda_sm_00_f64"
    )
    with pytest.raises(K.KernelSelfCheckError, match="expected float32"):
        K.window_matvec(G, x, impl="cuda")


def test_env_torch_skips_kernels_and_checks(fake_gpu, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    G, x = _window()
    K.window_matvec(G, x)
    assert not fake_gpu.ext.calls and not K.status()["selfcheck"]


# --- the verdict cache next to the build
# ----------------------------------------------------------------


def test_verdict_is_written_next_to_the_build_and_read_back(fake_gpu):
    G, x = _window()
    K.window_matvec(G, x)
    path = fake_gpu.root / fake_gpu.ext.__name__ / _selfcheck.VERDICT_FILE
    data = json.loads(path.read_text())
    assert list(data) == ["cpu|window_matvec|float32"]
    assert data["cpu|window_matvec|float32"]["ok"] is True
    assert data["cpu|window_matvec|float32"]["check_version"] == _selfcheck.CHECK_VERSION
    # a new process (memory forgotten) reads the file instead of running the check again
    _selfcheck.reset()
    n = fake_gpu.ext.calls["window_matvec"]
    K.window_matvec(G, x)
    assert fake_gpu.ext.calls["window_matvec"] == n + 1
    (v,) = K.status()["selfcheck"]
    assert v["ok"] and v["source"] == "file"


def test_failed_verdict_on_disk_is_honoured_and_stale_versions_ignored(fake_gpu):
    fake_gpu.ext = FakeExt(fake_gpu.root, wrong=_perturb("window_matvec"))
    G, x = _window()
    with pytest.warns(K.KernelSelfCheckWarning):
        K.window_matvec(G, x)
    _selfcheck.reset()
    # same build name, now correct: the file still says it failed
    fake_gpu.ext = FakeExt(fake_gpu.root)
    with pytest.warns(K.KernelSelfCheckWarning):
        K.window_matvec(G, x)
    assert fake_gpu.ext.calls["window_matvec"] == 0
    # an entry from another version of the check is ignored: the check runs again
    path = fake_gpu.root / fake_gpu.ext.__name__ / _selfcheck.VERDICT_FILE
    data = json.loads(path.read_text())
    for v in data.values():
        v["check_version"] = _selfcheck.CHECK_VERSION - 1
    path.write_text(json.dumps(data))
    _selfcheck.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.window_matvec(G, x)
    assert fake_gpu.ext.calls["window_matvec"] > 1


def test_other_builds_have_their_own_verdicts(fake_gpu):
    G, x = _window()
    K.window_matvec(G, x)
    fake_gpu.ext = FakeExt(
        fake_gpu.root, wrong=_perturb("window_matvec"), name="hf_mfac_cuda_sm_00_fedcba9876543210"
    )
    with pytest.warns(K.KernelSelfCheckWarning):
        K.window_matvec(G, x)
    assert len(K.status()["selfcheck"]) == 2


def test_unwritable_cache_keeps_the_verdict_in_memory(fake_gpu, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    fake_gpu.ext = FakeExt(blocker)  # its "build folder" cannot be created
    G, x = _window()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.window_matvec(G, x)
        K.window_matvec(G, x)
    assert (
        fake_gpu.ext.calls["window_matvec"]
        == len(_selfcheck.window_problems(torch.float32, "cpu")) + 2
    )


# --- the problems reach the kernels' edge paths (a port of the launch plans in cuda/mfac_kernels.h)
# ------


def _cdiv(a, b):
    return -(-a // b)


def _vec_width(d, elem, base):
    vec = 16 // elem
    while vec > 1 and (d % vec or base % (vec * elem)):
        vec //= 2
    return vec


def _plan_matvec(m, d, vec, sms):
    splits = max(1, min(_cdiv(8 * sms, _cdiv(m, 4)), d // (4 * 256 * vec), 65535))
    chunk = _cdiv(_cdiv(d, splits), vec) * vec
    return _cdiv(d, chunk), chunk


def _plan_rmatvec(m, d, vec, sms):
    splits = max(1, min(_cdiv(8 * sms, _cdiv(d, 256 * vec)), m // 32, 65535))
    chunk = _cdiv(m, splits)
    return _cdiv(m, chunk), chunk


def test_plan_port_matches_the_header():
    """The constants the port above relies on are those of cuda/mfac_kernels.h."""
    text = (_loader.source_dir() / "mfac_kernels.h").read_text()
    for needle in (
        "kGemvThreads = 256",
        "kMatvecRows = 4",
        "kBTile = 32",
        "int64_t{8} * sms",
        "d / (int64_t{4} * kGemvThreads * vec)",
        "const int64_t most = m / 32;",
        "int vec = 16 / elem_bytes;",
    ):
        assert needle in text, needle


@pytest.mark.parametrize("sms", [16, 46, 80, 108, 132, 144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_problems_reach_every_path(sms, dtype):
    elem = torch.empty(0, dtype=dtype).element_size()
    full = 16 // elem
    seen = Counter()
    for m, d, g_off, x_off in _selfcheck.WINDOW_CASES:
        vec = _vec_width(d, elem, 256 + g_off * elem)  # allocations are 256-byte aligned
        ms, _ = _plan_matvec(m, d, vec, sms)
        rs, rchunk = _plan_rmatvec(m, d, vec, sms)
        seen["vector loads"] += vec == full
        seen["scalar loads"] += vec == 1
        seen["x copied"] += (256 + 4 * x_off) % (4 * vec) != 0
        seen["G x split, vector"] += ms > 1 and vec == full
        seen["G x split, scalar"] += ms > 1 and vec == 1
        seen["G^T c split"] += rs > 1
        seen["partial row group"] += m % 4 != 0
        seen["partial column block"] += d % (256 * vec) != 0
        seen["unroll remainder"] += (rchunk % 4 != 0) or ((m - (rs - 1) * rchunk) % 4 != 0)
    missing = [
        k
        for k in (
            "vector loads",
            "scalar loads",
            "x copied",
            "G x split, vector",
            "G x split, scalar",
            "G^T c split",
            "partial row group",
            "partial column block",
            "unroll remainder",
        )
        if not seen[k]
    ]
    assert not missing, missing


def test_mfac_b_problems_reach_every_path():
    ms = _selfcheck.MFAC_B_CASES
    # partial tile, an update launch with 2 tile rows
    assert any(m % 32 and _cdiv(m, 32) >= 3 for m in ms)
    assert 32 in ms and 1 in ms


def test_problem_sizes_keep_the_check_cheap():
    n = sum(m * d for m, d, _, _ in _selfcheck.WINDOW_CASES)
    assert n < 1.5e6  # a few milliseconds on a GPU


# --- build_kernels
# ------------------------------------------------------------------------------------


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the answer on a machine without a GPU"
)
def test_build_kernels_without_gpu_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_MFAC_BUILD_DIR", str(tmp_path / "build"))
    _loader.reset()
    with caplog.at_level("WARNING", logger="hf_mfac"):
        report = K.build_kernels(verbose=False)
    assert report["ok"] is False and report["gpu"] is False and report["devices"] == []
    assert "torch.cuda.is_available() is False" in report["reason"]
    assert "nothing built" in caplog.text
    json.dumps(report, allow_nan=False)
    assert not (tmp_path / "build").exists()


def test_build_kernels_checks_every_kernel_and_dtype(fake_gpu, monkeypatch):
    monkeypatch.setattr(_build, "_devices", lambda: [torch.device("cpu")])
    monkeypatch.setattr(_loader, "device_arch", lambda device=None: "sm_00")
    fake_gpu.ext = FakeExt(
        fake_gpu.root, wrong=_perturb("window_rmatvec", lambda i: i[0].dtype == torch.float16)
    )
    report = K.build_kernels(verbose=True)
    json.dumps(report, allow_nan=False)
    (dev,) = report["devices"]
    assert dev["arch"] == "sm_00" and dev["error"] is None
    checks = {(c["kernel"], c["dtype"]): c for c in dev["checks"]}
    assert set(checks) == {
        (k, str(t).replace("torch.", "")) for k, ts in _selfcheck.KERNEL_DTYPES.items() for t in ts
    }
    assert [k for k, c in checks.items() if not c["ok"]] == [("window_rmatvec", "float16")]
    assert report["ok"] is False and dev["ok"] is False
    # it re-runs the checks (force) and rewrites the file
    data = json.loads((fake_gpu.root / fake_gpu.ext.__name__ / _selfcheck.VERDICT_FILE).read_text())
    assert len(data) == len(checks)
    fake_gpu.ext = FakeExt(fake_gpu.root)
    assert K.build_kernels(verbose=False)["ok"] is True


def test_build_kernels_reports_a_failed_build(fake_gpu, monkeypatch):
    monkeypatch.setattr(_build, "_devices", lambda: [torch.device("cpu")])
    monkeypatch.setattr(_loader, "device_arch", lambda device=None: "sm_00")

    def fail(device=None):
        raise K.KernelUnavailableError("building the CUDA extension for sm_00 failed: nvcc error")

    monkeypatch.setattr(_loader, "load", fail)
    report = K.build_kernels(verbose=False)
    assert report["ok"] is False and "nvcc error" in report["devices"][0]["error"]


# --- the build: visible, locked across processes
# ---------------------------------------------------------

_STUB_BUILD = textwrap.dedent(r"""
    import json, logging, os, sys, time, types
    from pathlib import Path
    if sys.argv[2] == "fcntl":
        sys.modules["filelock"] = None  # import fails: the stdlib fallback
    import torch.utils.cpp_extension as ce
    from hf_mfac.kernels import _loader
    log, barrier = Path(sys.argv[1]), Path(sys.argv[3])

    # the compiler: slow the first time, then a no-op
    def fake_load(name, sources, build_directory, **kw):
        folder = Path(build_directory)
        assert not (folder / "lock").exists(), "stale torch lock file not removed"
        so = folder / f"{name}.so"
        t0 = time.time()
        kind = "noop" if so.exists() else "compile"
        if kind == "compile":
            time.sleep(1.5)
            so.write_text("")
        with open(log, "a") as f:
            entry = {"pid": os.getpid(), "kind": kind, "t0": t0, "t1": time.time()}
            f.write(json.dumps(entry) + "\n")
        return types.SimpleNamespace(__name__=name, __file__=str(so))

    ce.load = fake_load
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    assert _loader.lock_backend() == sys.argv[2]
    (barrier / str(os.getpid())).write_text("")
    while len(list(barrier.iterdir())) < 2:  # start both builds together
        time.sleep(0.01)
    _loader._build("sm_90")
    print(json.dumps(_loader._builds["sm_90"]))
""")


@pytest.mark.parametrize("backend", ["filelock", "fcntl"])
def test_concurrent_builds_into_one_folder_are_serialised(tmp_path, backend):
    if backend == "filelock":
        pytest.importorskip("filelock")
    root = tmp_path / "build"
    (tmp_path / "barrier").mkdir()
    # a torch lock file left behind by a killed build: removed under our lock instead of waited on
    # forever
    folder = root / _loader.build_name("sm_90")
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")
    script = tmp_path / "stub_build.py"
    script.write_text(_STUB_BUILD)
    env = dict(os.environ, HF_MFAC_BUILD_DIR=str(root), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = tmp_path / "calls.jsonl"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(log), backend, str(tmp_path / "barrier")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    calls = sorted(
        (json.loads(line) for line in log.read_text().splitlines()), key=lambda c: c["t0"]
    )
    # one compiles, the other loads its result
    assert [c["kind"] for c in calls] == ["compile", "noop"]
    assert calls[1]["t0"] >= calls[0]["t1"]  # never at the same time
    infos = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(i["compiled"] for i in infos) == [False, True]
    logs = {i["compiled"]: err for i, (_, err) in zip(infos, outs)}
    assert "WARNING hf_mfac: compiling the CUDA kernels for sm_90" in logs[True]
    assert "WARNING hf_mfac: compiled the CUDA kernels for sm_90 in" in logs[True]
    assert "hf-mfac build-kernels" in logs[True]
    assert "waiting for another process's build" in logs[False]
    assert "INFO hf_mfac: loading the CUDA kernels for sm_90" in logs[False]


def test_file_lock_times_out_with_a_reason(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT)!r})
        from hf_mfac.kernels import _loader
        with _loader.file_lock({str(path)!r}):
            print("held", flush=True)
            time.sleep(30)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            K.KernelUnavailableError, match="gave up after 0 s waiting for the test lock"
        ):
            with _loader.file_lock(path, timeout=0.3, what="the test lock"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with _loader.file_lock(path, timeout=5):  # released when its holder died
        pass


def test_build_lock_timeout_env(monkeypatch):
    monkeypatch.setenv("HF_MFAC_BUILD_LOCK_TIMEOUT", "12.5")
    assert _loader._lock_timeout() == 12.5
    monkeypatch.setenv("HF_MFAC_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HF_MFAC_BUILD_LOCK_TIMEOUT"):
        _loader._lock_timeout()


# --- on a GPU: the real kernels
# ------------------------------------------------------------------------


@needs_cuda
def test_cuda_build_kernels_passes_every_check():
    report = K.build_kernels(verbose=False)
    assert report["ok"], json.dumps(report, indent=1)
    for dev in report["devices"]:
        for c in dev["checks"]:
            assert c["ok"] and math.isfinite(c["max_err"]) and c["seconds"] < 5


@needs_cuda
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_dynamic_mfac_auto_matches_torch(grad_dtype, monkeypatch):
    """DynamicMFAC on a GPU with the kernels (auto) against the same steps with the references."""
    from hf_mfac.core.ihvp import DynamicMFAC

    d, m = 40_013, 9
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(d, generator=gen).cuda() for _ in range(13)]
    outs = {}
    for impl in ("torch", "auto"):
        monkeypatch.setenv(K.ENV_VAR, impl)
        w = DynamicMFAC(d, m, 1e-3, device="cuda", grad_dtype=grad_dtype)
        outs[impl] = torch.stack([w.update_mul(g) for g in grads])
    assert K.status()["loaded"]
    torch.testing.assert_close(
        outs["auto"], outs["torch"], rtol=1e-3, atol=1e-3 * outs["torch"].abs().max().item()
    )
