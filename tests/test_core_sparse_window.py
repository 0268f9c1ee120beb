"""CompressedMFAC: the compressed M-FAC window with error feedback, against a float64 dense
reference."""

import io
import math

import pytest
import torch

from hf_mfac.core import DynamicMFAC, GradientRejected
from hf_mfac.core import sparse_window
from hf_mfac.core.sparse_window import CompressedMFAC, compressed_window_bytes


def _topk_blocks(a: torch.Tensor, density: float, block: int) -> torch.Tensor:
    """The compressed vector: in each block of ``block`` coordinates the ceil(density * len) largest
    |a_i|."""
    c = torch.zeros_like(a)
    for s in range(0, a.numel(), block):
        part = a[s : s + block]
        idx = part.abs().topk(math.ceil(round(density * part.numel(), 6))).indices
        c[s : s + block][idx] = part[idx]
    return c


def _reference(grads, m, damp, density, block, normalize_by_seen=False):
    """The same algorithm in float64, stored densely, F solved exactly: per step (c_t, F_t^{-1} c_t,
    F_t)."""
    d = grads[0].numel()
    e = torch.zeros(d, dtype=torch.float64)
    rows, out = [], []
    for g in grads:
        a = e + g.double()
        c = _topk_blocks(a, density, block)
        e = a - c
        rows = (rows + [c])[-m:]
        G = torch.stack(rows)  # (n, d)
        scale = len(rows) if normalize_by_seen else m
        F = damp * torch.eye(d, dtype=torch.float64) + G.T @ G / scale
        out.append((c, torch.linalg.solve(F, c), F))
    return out, e


def _state(w):
    return [t.clone() for t in (w._I, w._V, w.error, w.GGt)] + [w.ptr, w.count, w.fallbacks]


def _same_state(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("normalize_by_seen", [False, True])
def test_matches_float64_reference_with_eviction(normalize_by_seen):
    torch.manual_seed(0)
    d, m, damp, density, block = 1001, 5, 3e-2, 0.1, 64  # 15 blocks of 64 and one of 41
    grads = [torch.randn(d, dtype=torch.float64) * (1 + t % 3) for t in range(17)]
    ref, e_ref = _reference(grads, m, damp, density, block, normalize_by_seen)
    w = CompressedMFAC(
        d,
        m,
        damp,
        density,
        dtype=torch.float64,
        block_size=block,
        normalize_by_seen=normalize_by_seen,
    )
    for g, (c, y_ref, F) in zip(grads, ref):
        y = w.update_mul(g)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        x = torch.randn(d, dtype=torch.float64)
        want = torch.linalg.solve(F, x)
        torch.testing.assert_close(w.mul(x), want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    torch.testing.assert_close(w.error, e_ref, rtol=0, atol=1e-12)
    assert w.count == m and w.k == 15 * 7 + 5


def test_fp32_window_follows_the_reference():
    torch.manual_seed(1)
    d, m, damp, density, block = 777, 7, 1e-1, 0.05, 100
    grads = [torch.randn(d, dtype=torch.float64) for _ in range(25)]
    ref, _ = _reference(grads, m, damp, density, block)
    w = CompressedMFAC(d, m, damp, density, block_size=block)
    for g, (c, y_ref, _) in zip(grads, ref):
        y = w.update_mul(g.float())
        assert y.dtype == torch.float32
        torch.testing.assert_close(
            y.double(), y_ref, rtol=2e-4, atol=1e-5 * float(y_ref.abs().max())
        )


def test_update_then_mul_equals_update_mul():
    torch.manual_seed(2)
    d, m = 333, 4
    a = CompressedMFAC(d, m, 1e-2, 0.2, block_size=50, dtype=torch.float64)
    b = CompressedMFAC(d, m, 1e-2, 0.2, block_size=50, dtype=torch.float64)
    for _ in range(9):
        g = torch.randn(d, dtype=torch.float64)
        y = a.update_mul(g)
        b.update(g)
        c = b.dense_rows()[(b.ptr - 1) % m]  # the compressed vector just stored
        torch.testing.assert_close(y, b.mul(c), rtol=1e-9, atol=1e-12 * float(y.abs().max()))


def test_density_one_is_the_dense_window_over_many_steps():
    """Same parameters (to fp32 rounding) after 60 preconditioned steps on a quadratic."""
    torch.manual_seed(3)
    d, m, damp, lr = 517, 8, 1e-1, 1e-3
    A = torch.randn(d, d) / d**0.5
    H = A @ A.T + 0.1 * torch.eye(d)
    theta0 = torch.randn(d)
    thetas = []
    for w in (CompressedMFAC(d, m, damp, 1.0, block_size=97), DynamicMFAC(d, m, damp)):
        theta = theta0.clone()
        for t in range(60):
            g = H @ theta + 0.01 * torch.randn(d, generator=torch.Generator().manual_seed(t))
            theta -= lr * w.update_mul(g)
        thetas.append(theta)
        if isinstance(w, CompressedMFAC):
            assert float(w.error.abs().max()) == 0.0
    torch.testing.assert_close(thetas[0], thetas[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(thetas[0], theta0)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_error_feedback_keeps_the_dropped_mass(grad_dtype):
    """error + sum of the stored rows == sum of the gradients fed (nothing evicted yet), and the
    error buffer is exactly zero where the last row kept a coordinate's accumulated value (up to its
    rounding)."""
    torch.manual_seed(4)
    d, m = 1003, 12
    w = CompressedMFAC(d, m, 1e-2, 0.03, block_size=128, grad_dtype=grad_dtype)
    total = torch.zeros(d, dtype=torch.float64)
    for _ in range(m):
        g = torch.randn(d)
        total += g.double()
        w.update(g)
    kept = w.dense_rows().double().sum(0)
    torch.testing.assert_close(w.error.double() + kept, total, rtol=0, atol=1e-5)
    assert (
        float(w.error.abs().sum()) > 0.5 * float(total.abs().sum()) / m
    )  # mass really was dropped


def test_selection_keeps_the_largest_in_every_block():
    torch.manual_seed(5)
    d, block, density = 450, 100, 0.07  # 4 blocks keep 7, the last 50 keep 4
    w = CompressedMFAC(d, 3, 1.0, density, block_size=block)
    g = torch.randn(d)
    w.update(g)
    row = w.dense_rows()[0]
    torch.testing.assert_close(row, _topk_blocks(g, density, block))
    assert [int((row[s : s + block] != 0).sum()) for s in range(0, d, block)] == [7, 7, 7, 7, 4]


def test_index_dtype_follows_the_block_size():
    assert CompressedMFAC(40000, 2, 1.0, 0.01).index_dtype == torch.int16  # default blocks of 2^15
    assert CompressedMFAC(40000, 2, 1.0, 0.01, block_size=32768).index_dtype == torch.int16
    assert CompressedMFAC(40000, 2, 1.0, 0.01, block_size=32769).index_dtype == torch.int32
    assert (
        CompressedMFAC(300, 2, 1.0, 0.5, block_size=10**6).index_dtype == torch.int16
    )  # one block of 300
    w = CompressedMFAC(70001, 2, 1.0, 0.01, block_size=40000)
    g = torch.zeros(70001)
    g[39999], g[70000] = 5.0, -7.0
    w.update(g)
    torch.testing.assert_close(w.dense_rows()[0], g)  # indices past 2^15 within a block survive


def test_state_round_trip_is_bit_exact():
    torch.manual_seed(6)
    d, m = 901, 6
    a = CompressedMFAC(d, m, 1e-2, 0.1, block_size=300, grad_dtype=torch.bfloat16)
    for _ in range(8):
        a.update_mul(torch.randn(d))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CompressedMFAC(d, m, 1e-2, 0.1, block_size=300, grad_dtype=torch.bfloat16)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert _same_state(_state(a), _state(b))
    for _ in range(7):
        g = torch.randn(d)
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    assert _same_state(_state(a), _state(b))


def test_load_refuses_bad_states_and_changes_nothing():
    torch.manual_seed(7)
    d, m = 257, 4
    src = CompressedMFAC(d, m, 1e-2, 0.1, block_size=64)
    for _ in range(3):
        src.update(torch.randn(d))
    dst = CompressedMFAC(d, m, 1e-2, 0.1, block_size=64)
    dst.update(torch.randn(d))
    before = _state(dst)
    dense = DynamicMFAC(d, m, 1e-2)
    dense.update(torch.randn(d))
    good = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in src.state_dict().items()
    }
    bad_index = dict(good, I=good["I"].clone())
    bad_index["I"][-1, 0, 0] = 5  # the last block has one coordinate: index 0 only
    bad_spare = dict(good, V=good["V"].clone())
    bad_spare["V"][-1, 1, -1] = 1.0  # an unused slot of the last block with a value
    bad_gram = dict(good, GGt=good["GGt"] * 1.5)
    cases = [
        (dense.state_dict(), "dense window"),
        (dict(good, density=0.2), "density"),
        (bad_index, "outside their blocks"),
        (bad_spare, "outside their blocks"),
        (bad_gram, "GGt does not match"),
        (dict(good, error=torch.full((d,), float("nan"))), "error holds NaN"),
        (dict(good, count=m + 1), "count"),
        (dict(good, V=good["V"][:, :-1]), "V is"),
    ]
    for state, words in cases:
        with pytest.raises(ValueError, match=words):
            dst.load_state_dict(state)
        assert _same_state(before, _state(dst))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradient_leaves_everything_unchanged(bad):
    torch.manual_seed(8)
    d, m = 300, 3
    w = CompressedMFAC(d, m, 1e-2, 0.1, block_size=64)
    for _ in range(4):  # full window: the next update would evict a row
        w.update(torch.randn(d))
    twin = CompressedMFAC(d, m, 1e-2, 0.1, block_size=64)
    twin.load_state_dict(w.state_dict())
    before = _state(w)
    g = torch.randn(d)
    g[17] = bad
    for call in (w.update, w.update_mul):
        with pytest.raises(GradientRejected, match="NaN or inf"):
            call(g)
        assert _same_state(before, _state(w))
    for _ in range(3):  # and the window goes on as if the bad gradient had never come
        g = torch.randn(d)
        assert torch.equal(w.update_mul(g), twin.update_mul(g))


def test_fp16_overflow_and_interrupt_leave_everything_unchanged(monkeypatch):
    torch.manual_seed(9)
    d, m = 200, 3
    w = CompressedMFAC(d, m, 1e-2, 0.1, block_size=64, grad_dtype=torch.float16)
    w.update(torch.randn(d))
    before = _state(w)
    with pytest.raises(GradientRejected, match="range of the window's storage dtype"):
        w.update(torch.full((d,), 1e6))
    assert _same_state(before, _state(w))

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(w, "_factor", interrupt)
    with pytest.raises(KeyboardInterrupt):
        w.update_mul(torch.randn(d))
    assert _same_state(before, _state(w))


@pytest.mark.parametrize(
    "density", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf"), True, "0.1", None]
)
def test_bad_density_is_refused_naming_it(density):
    with pytest.raises((TypeError, ValueError), match="density"):
        CompressedMFAC(100, 2, 1e-2, density)


def test_memory_check_before_allocating(monkeypatch):
    slots = 31 * 328  # 30 blocks of 2^15 keep 328, the last (16960) keeps 170 in 328 slots
    chunk = 12 * 1024 * 328  # 2 workers x 6 blocks of all rows: about 2^22 entries
    # workspace: int32 indices and the values selected / terms added, per worker
    want = 1024 * slots * 6 + 8 * 1024**2 + 3 * 4 * 31 * 32768 + chunk * (4 + 4)
    assert compressed_window_bytes(10**6, 1024, 0.01, workers=2) == want
    need = compressed_window_bytes(10**6, 1024, 0.01)  # this machine's workers
    monkeypatch.setattr(sparse_window, "free_bytes", lambda device: need - 1)
    with pytest.raises(MemoryError, match=f"needs {need / 2**30:.2f} GiB"):
        CompressedMFAC(10**6, 1024, 1e-2, 0.01)
    monkeypatch.setattr(sparse_window, "free_bytes", lambda device: need)
    w = CompressedMFAC(10**6, 1024, 1e-2, 0.01)
    w.update_mul(torch.randn(10**6))  # allocates the products' workspace
    tensors = [w._I, w._V, w._err, w._spare, w._c, w.GGt, *w._work.values()]
    assert sum(t.numel() * t.element_size() for t in tensors) == need


@pytest.mark.parametrize("workers", [1, 3])
def test_products_do_not_depend_on_the_workers(monkeypatch, workers):
    """Threads split the blocks; the products equal the one-worker ones to fp32 rounding, and each
    worker count gives the same bits every time."""
    torch.manual_seed(4)
    d, m = 5000, 6
    windows = []
    for n in (1, workers):
        monkeypatch.setattr(sparse_window, "product_workers", lambda device=None, n=n: n)
        w = CompressedMFAC(d, m, 1e-3, 0.05, block_size=256)  # 20 blocks, 13 kept in each
        assert w._workers == n
        windows.append(w)
    for t in range(9):
        g = torch.randn(d, generator=torch.Generator().manual_seed(t))
        ys = [w.update_mul(g) for w in windows]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-6 * float(ys[0].abs().max()))
    x = torch.randn(d)
    a, b = windows[1]._matvec(m, x), windows[1]._matvec(m, x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, windows[0]._matvec(m, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(windows[1].dense_rows() @ x, a, rtol=1e-4, atol=1e-4)


def test_dense_window_accessor_is_refused():
    w = CompressedMFAC(100, 2, 1e-2, 0.5)
    with pytest.raises(AttributeError, match="dense_rows"):
        w.G  # noqa: B018


def test_dense_window_refuses_a_compressed_state():
    torch.manual_seed(10)
    sparse = CompressedMFAC(64, 2, 1e-2, 0.25)
    sparse.update(torch.randn(64))
    dense = DynamicMFAC(64, 2, 1e-2)
    dense.update(torch.randn(64))
    G, GGt = dense.G.clone(), dense.GGt.clone()
    with pytest.raises(ValueError, match="compressed window"):
        dense.load_state_dict(sparse.state_dict())
    assert torch.equal(dense.G, G) and torch.equal(dense.GGt, GGt) and dense.count == 1


def test_before_the_window_fills_only_lr_times_m_and_m_times_damp_matter():
    """F = damp I + (1/m) G^T G, so lr F^{-1} = (lr m) (m damp I + G^T G)^{-1}: while fewer than m
    rows are held, m = 8 and m = 16 with the same lr * m and m * damp give the same steps."""
    torch.manual_seed(5)
    d, alpha, beta = 600, 0.3, 1e-2
    small = CompressedMFAC(d, 8, beta / 8, 0.05, block_size=100, dtype=torch.float64)
    large = CompressedMFAC(d, 16, beta / 16, 0.05, block_size=100, dtype=torch.float64)
    for _ in range(8):
        g = torch.randn(d, dtype=torch.float64)
        a, b = alpha / 8 * small.update_mul(g), alpha / 16 * large.update_mul(g)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(a.abs().max()))
