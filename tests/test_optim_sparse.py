"""MFAC(density=k): the optimizer over the compressed window with error feedback."""
import copy
import io

import pytest
import torch

import hf_mfac
from hf_mfac.core import CompressedMFAC, DynamicMFAC, GradientRejected
from hf_mfac.core import sparse_window
from hf_mfac.optim import window_bytes


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return net.to(dtype)


def _data(n=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 9, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype))
            for _ in range(n)]


def _grad(model, x, y):
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()


def _train(model, opt, data):
    for x, y in data:
        _grad(model, x, y)
        opt.step()
    return _flat(model)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _snapshot(model, opt):
    return copy.deepcopy({"params": [p.detach().clone() for p in model.parameters()],
                          "opt": opt.state_dict()})


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_density_one_is_the_dense_window():
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=1e-2, num_grads=4, damp=1e-2)
    _train(model, opt, _data(2))
    assert type(opt.window) is DynamicMFAC and opt.density == 1.0


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.1)])
def test_steps_follow_the_compressed_window(momentum, weight_decay):
    """Each step is p <- p (1 - lr wd) - lr b, b <- momentum b + F^{-1} c, with c the top-k of the
    flat gradient plus the error buffer: replayed with the core window on the same gradients."""
    lr, m, damp, density = 5e-2, 5, 1e-2, 0.2
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=lr, num_grads=m, damp=damp, density=density,
                       momentum=momentum, weight_decay=weight_decay)
    ref = CompressedMFAC(sum(p.numel() for p in model.parameters()), m, damp, density)
    theta, buf = _flat(model).clone(), None
    for x, y in _data(9):
        _grad(model, x, y)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        u = ref.update_mul(g)
        buf = u if buf is None or not momentum else buf * momentum + u
        theta = theta * (1 - lr * weight_decay) - lr * buf
        opt.step()
        torch.testing.assert_close(_flat(model), theta, rtol=1e-5, atol=1e-6)
    assert type(opt.window) is CompressedMFAC
    assert opt.window.count == m and float(opt.window.error.abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(dtype):
    """The error buffer and the window go through state_dict (and torch.save) unchanged, even for
    bf16 parameters (Optimizer.load_state_dict casts floating state to the parameters' dtype)."""
    data = _data(14, dtype=dtype)
    kw = dict(lr=1e-2, num_grads=4, damp=1e-2, density=0.1, momentum=0.5)
    a = _model(dtype=dtype)
    opt_a = hf_mfac.MFAC(a.parameters(), **kw)
    _train(a, opt_a, data[:6])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = copy.deepcopy(a)
    opt_b = hf_mfac.MFAC(b.parameters(), **kw)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.window.error.dtype == torch.float32
    _assert_same(opt_a.window.state_dict(), opt_b.window.state_dict())
    assert torch.equal(_train(a, opt_a, data[6:]), _train(b, opt_b, data[6:]))
    _assert_same(opt_a.window.state_dict(), opt_b.window.state_dict())


@pytest.mark.parametrize("saved, loading", [(1.0, 0.1), (0.1, 1.0), (0.1, 0.2)])
def test_other_window_kind_is_refused_with_nothing_changed(saved, loading):
    data = _data(8)
    src = _model()
    opt_src = hf_mfac.MFAC(src.parameters(), lr=1e-2, num_grads=3, damp=1e-2, density=saved)
    _train(src, opt_src, data[:4])
    dst = _model(seed=5)
    opt = hf_mfac.MFAC(dst.parameters(), lr=1e-2, num_grads=3, damp=1e-2, density=loading,
                       momentum=0.9)
    _train(dst, opt, data[4:])
    before = _snapshot(dst, opt)
    with pytest.raises(ValueError, match=f"density={saved!r} to resume"):
        opt.load_state_dict(opt_src.state_dict())
    _assert_same(before, _snapshot(dst, opt))


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_density_is_refused_naming_it(density):
    with pytest.raises((TypeError, ValueError), match="density"):
        hf_mfac.MFAC(_model().parameters(), density=density)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_gradient_changes_nothing(nonfinite):
    data = _data(6)
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=1e-2, num_grads=3, damp=1e-2, density=0.2,
                       momentum=0.9, nonfinite=nonfinite)
    _train(model, opt, data[:4])
    before = _snapshot(model, opt)
    _grad(model, *data[4])
    next(model.parameters()).grad[0, 0] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(GradientRejected, match="NaN or inf"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="NaN or inf"):
            opt.step()
    _assert_same(before, _snapshot(model, opt))


def test_memory_check_before_allocating(monkeypatch):
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), num_grads=1024, density=0.01)
    d = sum(p.numel() for p in model.parameters())
    need = window_bytes(d, 1024, density=0.01)
    assert need == sparse_window.compressed_window_bytes(d, 1024, 0.01)
    assert need < window_bytes(d, 1024) + 3 * 4 * d + 16 * 1024  # no larger than the dense one
    monkeypatch.setattr(sparse_window, "free_bytes", lambda device: need - 1)
    _grad(model, *_data(1)[0])
    before = _flat(model).clone()
    with pytest.raises(MemoryError, match=f"needs {need / 2**30:.2f} GiB"):
        opt.step()
    assert torch.equal(before, _flat(model)) and opt.window is None


def test_masks_and_reset_keep_working():
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=1e-2, num_grads=3, damp=1e-2, density=0.3)
    first = next(model.parameters())
    mask = torch.rand(first.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt.set_masks({first: mask})
    _train(model, opt, _data(5))
    assert not bool(first[~mask].any())
    assert opt.window.dim == sum(p.numel() for p in model.parameters()) - int((~mask).sum())
    opt.reset_window()
    _train(model, opt, _data(2))
    assert opt.window.count == 2


def test_sharded_compressed_window_on_two_ranks(tmp_path):
    """ShardedMFAC(density < 1) on 2 ranks: each rank compresses its own range (a one-process replay
    with those ranges as blocks gives the same parameters), resumes bit-exactly from its shard file,
    refuses to be re-sharded into one process, and both ranks refuse a NaN in rank 1's part."""
    from test_distributed import launch, results

    launch("dist_sparse_mfac.py", 2, tmp_path)
    for r in results(tmp_path, 2):
        assert r["local_kind"] == "CompressedMFAC"
        assert r["same_as_reference"] < 1e-5, r
        assert r["resume_exact"], r
        assert "saved by 2 ranks; it can only be resumed by 2" in r["reshard_error"], r
        assert r["reshard_unchanged"], r
        assert "NaN or inf values (on at least one shard)" in r["nan_error"], r
        assert r["nan_unchanged"], r


@pytest.mark.parametrize("argv", [["--mfac_density", "0.01"], ["--optim_args", "density=0.01"]])
def test_command_line_and_training_arguments_set_the_density(argv):
    transformers = pytest.importorskip("transformers")
    from hf_mfac.integrations import MFACTrainingArguments, mfac_optimizer_cls_and_kwargs

    (args,) = transformers.HfArgumentParser(MFACTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", "unused", "--use_cpu", "--report_to", "none", "--optim", "mfac",
              *argv])
    cls, kwargs = mfac_optimizer_cls_and_kwargs(args)
    assert kwargs["density"] == 0.01
    opt = cls(_model().parameters(), **kwargs)
    assert opt.density == 0.01
    direct = MFACTrainingArguments(output_dir="unused", optim="mfac", mfac_density=0.05,
                                   report_to="none", use_cpu=True)
    assert mfac_optimizer_cls_and_kwargs(direct)[1]["density"] == 0.05
    with pytest.raises(ValueError, match="mfac_density must be > 0"):
        MFACTrainingArguments(output_dir="unused", optim="mfac", mfac_density=0.0,
                              report_to="none", use_cpu=True)
