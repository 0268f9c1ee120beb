"""DynamicMFAC and StaticMFAC against float64 dense references; DynamicMFAC's all-or-nothing updates
and checked loads."""
import math

import pytest
import torch

from hf_mfac import kernels
from hf_mfac.core import DynamicMFAC, StaticMFAC, ihvp
from hf_mfac.core.ihvp import GradientRejected
from conftest import block_fisher, dense_fisher, rel_err, woodbury_tol

SIZES = [(1, 17), (5, 33), (7, 101), (13, 61)]


@pytest.mark.parametrize("m,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dynamic_mul_matches_dense_solve(m, d, dtype, gen):
    damp = 0.05
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    dyn = DynamicMFAC(d, m, damp, dtype=dtype)
    for g in G:
        dyn.update(g.to(dtype))
    ref = torch.linalg.solve(dense_fisher(G, damp), x)
    tol = 1e-10 if dtype == torch.float64 else woodbury_tol(G, damp, dtype)
    assert rel_err(dyn.mul(x.to(dtype)), ref) < tol


def test_dynamic_sliding_window_after_3m_updates(gen):
    """After 3m updates the window holds exactly the last m gradients."""
    m, d, damp = 6, 29, 0.1
    G = torch.randn(3 * m + 2, d, generator=gen, dtype=torch.float64)
    dyn = DynamicMFAC(d, m, damp, dtype=torch.float64)
    for g in G:
        dyn.update(g)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(dense_fisher(G[-m:], damp), x)
    assert rel_err(dyn.mul(x), ref) < 1e-10


def test_update_mul_equals_update_then_mul(gen):
    m, d, damp = 5, 41, 0.01
    a = DynamicMFAC(d, m, damp, dtype=torch.float64)
    b = DynamicMFAC(d, m, damp, dtype=torch.float64)
    for _ in range(2 * m + 1):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        y = a.update_mul(g)
        b.update(g)
        assert rel_err(y, b.mul(g)) < 1e-11


@pytest.mark.parametrize("normalize_by_seen", [False, True])
def test_partial_window_normalisation(normalize_by_seen, gen):
    """Before the window is full: divide by m (paper) or by the number seen (n)."""
    m, n, d, damp = 8, 3, 23, 0.02
    G = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dyn = DynamicMFAC(d, m, damp, dtype=torch.float64, normalize_by_seen=normalize_by_seen)
    for g in G:
        dyn.update(g)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(dense_fisher(G, damp, scale=n if normalize_by_seen else m), x)
    assert rel_err(dyn.mul(x), ref) < 1e-10


def test_empty_window_is_scaled_identity(gen):
    x = torch.randn(11, generator=gen)
    assert torch.allclose(DynamicMFAC(11, 4, 0.5).mul(x), x / 0.5)


def test_huge_damp_is_scaled_sgd(gen):
    m, d, damp = 4, 19, 1e8
    dyn = DynamicMFAC(d, m, damp, dtype=torch.float64)
    for _ in range(m):
        dyn.update(torch.randn(d, generator=gen, dtype=torch.float64))
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    assert rel_err(dyn.mul(x), x / damp) < 1e-7


def test_one_gradient_is_sherman_morrison(gen):
    d, damp, m = 31, 0.3, 1
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    dyn = DynamicMFAC(d, m, damp, dtype=torch.float64)
    dyn.update(g)
    sm = x / damp - g * (g @ x) / (damp * (damp + g @ g))  # (λI + g g^T)^{-1} x
    assert rel_err(dyn.mul(x), sm) < 1e-12


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_low_precision_storage_accumulates_in_fp32(storage, gen):
    """With bf16/fp16 storage the result equals the fp64 solve for the *rounded* gradients."""
    m, d, damp = 6, 300, 0.1
    G = torch.randn(m, d, generator=gen)
    dyn = DynamicMFAC(d, m, damp, grad_dtype=storage)
    for g in G:
        dyn.update(g)
    x = torch.randn(d, generator=gen)
    Gr = G.to(storage).to(torch.float64)
    ref = torch.linalg.solve(dense_fisher(Gr, damp), x.to(torch.float64))
    assert rel_err(dyn.mul(x), ref) < woodbury_tol(Gr, damp, torch.float32)
    assert dyn.G.dtype == storage


def test_state_roundtrip_continues_exactly(gen):
    m, d = 4, 21
    a = DynamicMFAC(d, m, 0.01)
    for _ in range(6):
        a.update(torch.randn(d, generator=gen))
    b = DynamicMFAC(d, m, 0.01)
    b.load_state_dict(
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    )
    for _ in range(3):
        g = torch.randn(d, generator=gen)
        assert torch.equal(a.update_mul(g), b.update_mul(g))


def test_dynamic_bad_inputs():
    with pytest.raises(ValueError, match="damp"):
        DynamicMFAC(4, 2, 0.0)
    with pytest.raises(ValueError, match="num_grads"):
        DynamicMFAC(4, 0, 1.0)
    dyn = DynamicMFAC(4, 2, 1.0)
    with pytest.raises(ValueError, match="dim=4"):
        dyn.update(torch.ones(5))
    with pytest.raises(TypeError, match="floating"):
        dyn.update(torch.ones(4, dtype=torch.long))
    dyn.update(torch.ones(4))
    before = dyn.G.clone()
    with pytest.raises(FloatingPointError, match="NaN"):
        dyn.update(torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    assert torch.equal(dyn.G, before) and dyn.count == 1


def test_tiny_damp_stays_finite(gen):
    """damp = 1e-8 with large gradients: cond(F) ~ 1e14, so a dense solve is no reference; check
    instead that the result is finite and backward stable (small residual ||F y - x|| relative to
    ||F|| ||y||)."""
    m, d, damp = 16, 64, 1e-8
    G = 100 * torch.randn(m, d, generator=gen, dtype=torch.float64)
    dyn = DynamicMFAC(d, m, damp, dtype=torch.float64)
    for g in G:
        dyn.update(g)
    x = G[3] + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)
    y = dyn.mul(x)
    assert torch.isfinite(y).all()
    F = dense_fisher(G, damp)
    residual = (F @ y - x).norm() / (torch.linalg.matrix_norm(F, 2) * y.norm())
    assert residual < 1e-9  # fp64 backward error; ~1e-11 observed


# --------------------------------------------------------------------------------------- StaticMFAC
@pytest.mark.parametrize("m,d", SIZES)
def test_static_mul_diag_elements(m, d, gen):
    damp = 0.05
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    Finv = torch.linalg.inv(dense_fisher(G, damp))
    s = StaticMFAC(G.clone(), damp)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    assert rel_err(s.mul(x), Finv @ x) < 1e-10
    assert rel_err(s.diag(), Finv.diagonal()) < 1e-10
    i = torch.randint(0, d, (9,), generator=gen)
    j = torch.randint(0, d, (9,), generator=gen)
    assert torch.allclose(s.element(i, j), Finv[i, j], rtol=1e-9, atol=1e-12)
    assert rel_err(s.column(d // 2), Finv[:, d // 2]) < 1e-10


@pytest.mark.parametrize("B", [1, 4, 10, 16])
def test_static_blockwise(B, gen):
    m, d, damp = 6, 45, 0.1
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    Finv = torch.linalg.inv(block_fisher(G, damp, B))
    s = StaticMFAC(G.clone(), damp, block_size=B)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    assert rel_err(s.mul(x), Finv @ x) < 1e-10
    assert rel_err(s.diag(), Finv.diagonal()) < 1e-10
    idx = torch.tensor([[0, 1, 2], [3, 9, 44], [40, 41, 44]])
    assert torch.allclose(s.submatrix(idx), Finv[idx[:, :, None], idx[:, None, :]], atol=1e-10)


def test_static_block_size_one_is_diagonal_fisher(gen):
    m, d, damp = 5, 12, 0.2
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    s = StaticMFAC(G.clone(), damp, block_size=1)
    assert rel_err(s.diag(), 1.0 / (damp + (G**2).mean(0))) < 1e-12


@pytest.mark.parametrize("B", [None, 8])
def test_static_paging_equals_unpaged(B, gen):
    """A small page budget (a few columns at a time) gives the same W as one pass."""
    m, d, damp = 7, 83, 0.05
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    full = StaticMFAC(G.clone(), damp, block_size=B)
    # 10 fp64 columns per page
    paged = StaticMFAC(G.clone(), damp, block_size=B, page_bytes=m * 8 * 10)
    assert torch.allclose(full.W, paged.W, atol=1e-12)


def test_static_reuses_grad_memory_unless_copy(gen):
    G = torch.randn(4, 10, generator=gen)
    s = StaticMFAC(G, 0.1)
    assert s.W.data_ptr() == G.data_ptr()
    H = torch.randn(4, 10, generator=gen)
    H0 = H.clone()
    StaticMFAC(H, 0.1, copy=True)
    assert torch.equal(H, H0)


def test_static_float32_within_derived_tolerance(gen):
    m, d, damp = 9, 77, 0.05
    G = torch.randn(m, d, generator=gen)
    s = StaticMFAC(G.clone(), damp)
    x = torch.randn(d, generator=gen)
    ref = torch.linalg.solve(dense_fisher(G, damp), x.double())
    assert rel_err(s.mul(x), ref) < woodbury_tol(G, damp, torch.float32)


def test_static_bad_inputs():
    with pytest.raises(ValueError, match="2 dimension"):
        StaticMFAC(torch.ones(5), 0.1)
    with pytest.raises(FloatingPointError):
        StaticMFAC(torch.tensor([[1.0, float("inf")]]), 0.1)
    with pytest.raises(ValueError, match="damp"):
        StaticMFAC(torch.ones(2, 3), -1.0)


def test_sharded_window_equals_unsharded(gen):
    """Coordinates split in 3 shards whose partial products are summed give the same F^{-1} x."""
    m, d, damp = 5, 40, 0.05
    cuts = [0, 13, 27, 40]
    full = DynamicMFAC(d, m, damp, dtype=torch.float64)
    shards = [
        DynamicMFAC(cuts[i + 1] - cuts[i], m, damp, dtype=torch.float64, allreduce=lambda p: None)
        for i in range(3)
    ]
    for step in range(2 * m):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        # Shards run one after the other here, so the "all_reduce" of shard i adds the other shards'
        # products of their (new) windows with their parts of g.
        parts = [g[cuts[i] : cuts[i + 1]] for i in range(3)]
        ys = []
        for i, s in enumerate(shards):

            def reduce(v, i=i):
                if v.numel() == 1:  # the agreement on a finite result: every shard's is finite here
                    return
                # the partial products; the two flags after them are 0 on every shard here
                p = v[:-2]
                total = torch.zeros_like(p)
                for j, sh in enumerate(shards):
                    Gj = sh.G[: p.numel()].to(torch.float64)
                    if j < i:  # already updated shards hold the new row
                        total += Gj @ parts[j]
                    elif j == i:
                        total += p
                    else:  # not yet updated: emulate the row replacement
                        Gj = Gj.clone()
                        Gj[sh.ptr] = parts[j]
                        total += Gj @ parts[j]
                p.copy_(total)

            s.allreduce = reduce
            ys.append(s.update_mul(parts[i]))
        assert rel_err(torch.cat(ys), full.update_mul(g)) < 1e-10


# --------------------------------------------------------------------- DynamicMFAC: all or nothing
def _filled(gen, m=4, d=29, n=6, **kw):
    dyn = DynamicMFAC(d, m, 0.05, **kw)
    for _ in range(n):
        dyn.update(torch.randn(d, generator=gen))
    return dyn


def _state(dyn):
    return {
        "G": dyn.G.clone(),
        "_G": dyn._G.clone(),
        "GGt": dyn.GGt.clone(),
        "ptr": dyn.ptr,
        "count": dyn.count,
        "chol": dyn._chol,
        "fallbacks": dyn.fallbacks,
    }


def _assert_unchanged(dyn, before):
    after = _state(dyn)
    for k in ("G", "_G", "GGt"):
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert (after["ptr"], after["count"], after["fallbacks"]) == (
        before["ptr"],
        before["count"],
        before["fallbacks"],
    )
    assert after["chol"] is before["chol"]


@pytest.mark.parametrize(
    "storage, value, match",
    [
        (torch.float32, 1e20, "products"),  # finite, but |g|^2 overflows the fp32 products
        (torch.float16, 7e4, "range of the window's storage dtype torch.float16"),  # > 65504
        # rounds to inf in bf16
        (torch.bfloat16, 3.4e38, "range of the window's storage dtype torch.bfloat16"),
        (torch.float32, float("nan"), "NaN"),
    ],
)
@pytest.mark.parametrize("full", [False, True])
def test_poisoned_gradient_leaves_window_unchanged(storage, value, match, full, gen):
    """A gradient the window cannot hold is refused before anything changes, by update and
    update_mul, in a window that is filling up or full (the row it would replace stays); the next
    good gradient gives exactly what a window that never saw the bad one gives."""
    m, d = 4, 29
    dyn = _filled(gen, m, d, n=6 if full else 2, grad_dtype=storage)
    twin = DynamicMFAC(d, m, 0.05, grad_dtype=storage)
    twin.load_state_dict(
        {k: v.clone() if torch.is_tensor(v) else v for k, v in dyn.state_dict().items()}
    )
    dyn.mul(torch.ones(d))  # the factor is cached
    before = _state(dyn)
    bad = torch.randn(d, generator=gen)
    bad[d - 1] = value
    for op in (dyn.update, dyn.update_mul):
        with pytest.raises(GradientRejected, match=match) as info:
            op(bad)
        assert isinstance(info.value, FloatingPointError) and "unchanged" in str(info.value)
        _assert_unchanged(dyn, before)
    g = torch.randn(d, generator=gen)
    assert torch.equal(dyn.update_mul(g), twin.update_mul(g))


def test_failed_factorisation_is_undone(gen, monkeypatch):
    """The factorisation fails after the row was written: G, G G^T, ptr, count, the factor come back
    exactly."""
    dyn = _filled(gen)
    dyn.mul(torch.ones(29))
    before = _state(dyn)

    def fail(*a, **k):
        raise FloatingPointError("Cholesky failed even after adding 1e+08 times the damping")

    monkeypatch.setattr(ihvp, "damped_cholesky", fail)
    for op in (dyn.update, dyn.update_mul):
        with pytest.raises(GradientRejected, match="could not be factorised"):
            op(torch.randn(29, generator=gen))
        _assert_unchanged(dyn, before)


def test_nonfinite_result_and_interrupt_are_undone(gen, monkeypatch):
    """A non-finite F^{-1} g (here forced) is refused; an interrupt in the middle of an update
    (after the row was written) restores the window too and propagates."""
    dyn = _filled(gen)
    before = _state(dyn)
    real = kernels.window_rmatvec
    monkeypatch.setattr(
        kernels, "window_rmatvec", lambda G, c, acc=None: real(G, c, acc) * float("inf")
    )
    with pytest.raises(GradientRejected, match="not finite"):
        dyn.update_mul(torch.randn(29, generator=gen))
    _assert_unchanged(dyn, before)

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "window_matvec", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dyn.update(torch.randn(29, generator=gen))
    _assert_unchanged(dyn, before)


def test_kernel_path_damps_at_the_accumulation_error(gen, monkeypatch):
    """Where the CUDA kernels compute G G^T (emulated here: the padded rows go to the kernels'
    dispatch, which takes the reference on CPU), a damping below their accumulation error (~1e-4
    relative at m = 1024, d = 1.1e8) is raised to that level by powers of 10, once per
    factorisation, counted in ``fallbacks``."""
    terms = ihvp.kernel_matvec_terms(1024, 110_000_000, 2, 132)  # bf16 window, 132 multiprocessors
    assert 80_000 < terms < 90_000 and 1e-4 < ihvp.accumulation_error(terms) < 2e-4
    m, d, damp = 3, 64, 1e-12
    G = torch.randn(m, d, generator=gen)
    plain = DynamicMFAC(d, m, damp)
    for g in G:
        plain.update(g)
    assert plain.fallbacks == 0 and plain._shift_floor(m) == 0.0  # CPU / PyTorch path: no floor
    monkeypatch.setattr(DynamicMFAC, "_kernel_rows", lambda self: True)
    monkeypatch.setattr(ihvp, "_multiprocessors", lambda device: 132)
    dyn = DynamicMFAC(d, m, damp)
    for g in G:
        dyn.update(g)
    floor = dyn._shift_floor(m)
    assert floor > m * damp and dyn.fallbacks == m
    raised = m * damp * 10.0 ** math.ceil(math.log10(floor / (m * damp)))
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    K = G.double() @ G.double().T + raised * torch.eye(m, dtype=torch.float64)
    expect = (x - G.double().T @ torch.linalg.solve(K, G.double() @ x)) / damp
    assert rel_err(dyn.mul(x.float()), expect) < 1e-4


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_row_padding_changes_no_result(storage, gen, monkeypatch):
    """d = 29: the padded window (rows of 32, padding kept zero) gives the results of an unpadded
    one on the PyTorch path: bit-identical with bf16/fp16 storage; with fp32 storage the BLAS
    matrix-vector product may order a row's sum by the row's alignment, so within a few fp32 ulps
    of the largest entry. ``G`` and ``state_dict`` show (m, d), and states load across the two."""
    m, d = 4, 29

    def same(a, b):
        if storage != torch.float32:
            return torch.equal(a, b)
        return bool((a - b).abs().max() <= 8 * torch.finfo(torch.float32).eps * a.abs().max())

    gs = [torch.randn(d, generator=gen) for _ in range(7)]
    padded = DynamicMFAC(d, m, 0.05, grad_dtype=storage)
    monkeypatch.setattr(ihvp, "_ROW_ALIGN", 1)
    plain = DynamicMFAC(d, m, 0.05, grad_dtype=storage)
    assert padded._G.shape == (m, 32) and plain._G.shape == (m, d) and padded.G.shape == (m, d)
    for g in gs[:5]:
        assert same(padded.update_mul(g), plain.update_mul(g))
    assert same(padded.mul(gs[5]), plain.mul(gs[5]))
    assert bool((padded._G[:, d:] == 0).all())
    sd = padded.state_dict()
    assert sd["G"].shape == (m, d) and torch.equal(sd["G"], plain.state_dict()["G"])
    across = DynamicMFAC(d, m, 0.05, grad_dtype=storage)  # unpadded (_ROW_ALIGN still 1)
    across.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in sd.items()})
    monkeypatch.setattr(ihvp, "_ROW_ALIGN", 8)
    back = DynamicMFAC(d, m, 0.05, grad_dtype=storage)
    back.load_state_dict(plain.state_dict())
    expect = plain.update_mul(gs[6])
    for w in (padded, across, back):
        assert same(w.update_mul(gs[6]), expect)
        assert w.G.shape == (m, d) and w.grad_dtype == storage


def test_load_accepts_ggt_of_unrounded_gradients(gen):
    """Older code could form G G^T from the gradients before their rounding to a bf16 window: the
    diagonal check tolerates the storage precision, and still refuses a G G^T of other gradients."""
    m, d = 4, 300
    G = torch.randn(m, d, generator=gen)
    state = {"G": G.to(torch.bfloat16), "GGt": (G @ G.T).double(), "ptr": 0, "count": m}
    dyn = DynamicMFAC(d, m, 0.05, grad_dtype=torch.bfloat16)
    dyn.load_state_dict(state)
    assert dyn.count == m and torch.equal(dyn.G, state["G"])
    other = torch.randn(m, d, generator=gen)
    with pytest.raises(ValueError, match=r"GGt does not match G: GGt\[0, 0\]"):
        DynamicMFAC(d, m, 0.05, grad_dtype=torch.bfloat16).load_state_dict(
            {**state, "GGt": (other @ other.T).double()}
        )


@pytest.mark.parametrize("block_size", [None, 8])
def test_static_pages_bound_the_work_without_page_bytes(block_size, gen, monkeypatch):
    """Without page_bytes the precomputation still runs in small working pages (bounded
    temporaries); the result is the one of a single page, and W stays in the caller's memory."""
    m, d = 6, 53
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    one = StaticMFAC(G.clone(), 1e-2, block_size)
    # 16 columns (2 blocks of 8) per page
    monkeypatch.setitem(StaticMFAC.work_bytes, "cpu", 8 * m * 16)
    calls = []
    orig = StaticMFAC._load
    monkeypatch.setattr(
        StaticMFAC, "_load", lambda self, s, e: calls.append(e - s) or orig(self, s, e)
    )
    H = G.clone()
    paged = StaticMFAC(H, 1e-2, block_size)
    assert paged.W.data_ptr() == H.data_ptr() and max(calls) <= 16 and len(calls) > 2
    assert torch.allclose(paged.diag(), one.diag(), rtol=1e-12, atol=0)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    assert torch.allclose(paged.mul(x), one.mul(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_update_mul_in_span_part_cancels_exactly(storage, gen):
    """update_mul forms ``F^{-1} g = G^T (e_slot - c) / damp`` with ``e_slot - c`` in fp64 (g is the
    window's row ``slot``), so the in-span part of g cancels before the fp32 rounding: ~eps32
    relative to the fp64 Woodbury solve on the stored window at every step (filling up and full),
    where ``(g - G^T c) / damp`` in fp32 is off by ~eps32 |c| |G| / |y| (7e-4 here)."""
    m, d, damp = 8, 1000, 1e-5
    dyn = DynamicMFAC(d, m, damp, grad_dtype=storage)
    for _ in range(2 * m + 3):
        g = torch.randn(d, generator=gen) / d**0.5
        y = dyn.update_mul(g)
        Gw, x = dyn.G.double(), g.to(storage).double()
        K = Gw @ Gw.T + m * damp * torch.eye(m, dtype=torch.float64)
        ref = (x - Gw.T @ torch.linalg.solve(K, Gw @ x)) / damp
        assert rel_err(y, ref) < 2e-6  # ~2e-7 observed


def test_update_mul_result_is_a_fresh_tensor_and_g_is_untouched(gen):
    """The gradient is written straight into its row and the product reuses that row: the caller's g
    and the returned vector share no memory with the window, and the padding columns stay zero."""
    m, d = 3, 29
    dyn = _filled(gen, m, d, n=4)
    g = torch.randn(d, generator=gen)
    keep = g.clone()
    y = dyn.update_mul(g)
    assert torch.equal(g, keep) and torch.equal(dyn.G[(dyn.ptr - 1) % m], keep)
    assert y.untyped_storage().data_ptr() != dyn._G.untyped_storage().data_ptr()
    assert bool((dyn._G[:, d:] == 0).all())
    y.zero_()
    assert torch.equal(dyn.G[(dyn.ptr - 1) % m], keep)


def test_mul_finish_is_the_plain_formula_bit_for_bit(gen):
    """mul (x not in the window) keeps ``(x - G^T c) / damp`` bit for bit, finished in place."""
    dyn = _filled(gen, 4, 29, n=6)
    x = torch.randn(29, generator=gen)
    c = dyn._solve(dyn._matvec(dyn.count, x)).to(torch.float32)
    assert torch.equal(dyn.mul(x), (x - c @ dyn.G) / dyn.damp)


@pytest.mark.parametrize("block_size, rel", [(None, False), (8, False), (8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_static_diag_row_accumulation_equals_chunk_reduction(
    block_size, rel, dtype, gen, monkeypatch
):
    """diag on the CPU adds the rows one by one into a small fp64 accumulator; with several chunks
    (and a short last one), one λ or one per block, it agrees with the fp64 reduction of whole
    chunks (the accelerator path) to fp64 rounding and with the dense inverse."""
    m, d, damp = 6, 53, 1e-2
    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
    kw = {"rel_damp": 0.1} if rel else {"damp": damp}
    s = StaticMFAC(G.to(dtype), block_size=block_size, copy=True, **kw)
    monkeypatch.setitem(StaticMFAC.diag_columns, "cpu", 16)  # 4 chunks, the last of 5 columns
    rows = s.diag()
    monkeypatch.delitem(StaticMFAC.diag_columns, "cpu")
    chunks = s.diag()
    assert rows.dtype == chunks.dtype == dtype
    assert torch.allclose(rows, chunks, rtol=1e-14, atol=0)
    lam = s.block_damp.repeat_interleave(s._block_widths())
    Finv = torch.zeros(d, d, dtype=torch.float64)
    B = block_size or d
    for b in range(0, d, B):
        Gb = G[:, b : b + B]
        Finv[b : b + B, b : b + B] = torch.linalg.inv(
            lam[b] * torch.eye(Gb.shape[1], dtype=torch.float64) + Gb.T @ Gb / m
        )
    assert rel_err(rows, Finv.diagonal()) < (1e-10 if dtype == torch.float64 else 1e-5)
