"""hf_mfac.MFAC: equivalences with SGD, param groups, masks, state_dict round trip, refused
gradients and arguments, low-precision parameters, the consistent decisions of ShardedMFAC on 2
ranks."""
import copy
import io

import pytest
import torch

import hf_mfac
from conftest import dense_fisher, rel_err
from hf_mfac.optim import ShardedMFAC


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_huge_damp_reproduces_sgd(momentum):
    """With damp -> inf, F^{-1} g -> g / damp: M-FAC is SGD with learning rate lr / damp."""
    damp, lr = 1e7, 0.5
    a, b = _model(), _model()
    wa = _train(
        a, hf_mfac.MFAC(a.parameters(), lr=lr, num_grads=4, damp=damp, momentum=momentum), _data()
    )
    wb = _train(b, torch.optim.SGD(b.parameters(), lr=lr / damp, momentum=momentum), _data())
    assert rel_err(wa, wb) < 1e-5


def test_step_is_inverse_fisher_of_window():
    """One step moves the parameters by -lr * F^{-1} g with F from the last m flattened
    gradients."""
    m, damp, lr = 3, 1e-2, 0.1
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=lr, num_grads=m, damp=damp)
    grads = []
    for x, y in _data(5):
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        grads.append(g)
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        G = torch.stack(grads[-m:])
        expect = -lr * torch.linalg.solve(dense_fisher(G, damp, scale=m), g)
        assert rel_err(after - before, expect) < 1e-4


def test_param_groups_lr_weight_decay_and_none_grads():
    model = _model()
    frozen_bias = model[2].bias
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, frozen_bias], "weight_decay": 0.0, "lr": 0.0},
    ]
    opt = hf_mfac.MFAC(groups, lr=0.01, num_grads=4, damp=1.0)
    x, y = _data(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    frozen_bias.grad = None  # skipped this step
    b0 = model[0].bias.detach().clone()
    fb = frozen_bias.detach().clone()
    opt.step()
    assert torch.equal(model[0].bias, b0)  # lr 0 group
    assert torch.equal(frozen_bias, fb)


def test_decoupled_weight_decay_semantics():
    """With a zero gradient the step is pure decoupled decay: p <- p (1 - lr wd)."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = hf_mfac.MFAC([p], lr=0.1, num_grads=2, damp=1.0, weight_decay=0.5)
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(p, torch.full((4,), 0.95))


def test_masks_hold_and_shrink_window():
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=0.05, num_grads=4, damp=0.1)
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    opt.set_masks({w: mask})
    assert (w[~mask] == 0).all()
    _train(model, opt, _data(6))
    assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    total = sum(p.numel() for p in model.parameters())
    assert opt.window.dim == total - int((~mask).sum())


def test_state_dict_roundtrip_resumes_exactly():
    """Save after 5 steps (through torch.save / weights_only load as the Trainer does), resume,
    compare."""
    data = _data(10)
    a = _model()
    opt_a = hf_mfac.MFAC(
        a.parameters(), lr=0.02, num_grads=4, damp=0.1, momentum=0.5, grad_dtype=torch.bfloat16
    )
    _train(a, opt_a, data[:5])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b = _model(seed=5)
    b.load_state_dict(ck["model"])
    opt_b = hf_mfac.MFAC(
        b.parameters(), lr=0.02, num_grads=4, damp=0.1, momentum=0.5, grad_dtype=torch.bfloat16
    )
    opt_b.load_state_dict(ck["opt"])
    assert opt_b.window.G.dtype == torch.bfloat16 and opt_b.window.GGt.dtype == torch.float64
    assert torch.equal(_train(a, opt_a, data[5:]), _train(b, opt_b, data[5:]))


def test_nonfinite_gradients_leave_everything_unchanged():
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=0.05, num_grads=3, damp=0.1)
    _train(model, opt, _data(2))
    w0 = [p.detach().clone() for p in model.parameters()]
    G0 = opt.window.G.clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError, match="unchanged"):
        opt.step()
    opt.nonfinite = "skip"
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert torch.equal(opt.window.G, G0) and opt.window.count == 2


def test_memory_check_fails_early_with_number():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    opt = hf_mfac.MFAC([p], num_grads=1 << 30)  # ~4 PiB window
    p.grad = torch.ones_like(p)
    with pytest.raises(MemoryError, match="GiB"):
        opt.step()


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="damp"):
        hf_mfac.MFAC(p, damp=0)
    with pytest.raises(ValueError, match="momentum"):
        hf_mfac.MFAC(p, momentum=1.0)
    with pytest.raises(ValueError, match="grad_dtype"):
        hf_mfac.MFAC(p, grad_dtype="int8")  # at construction, not at the first step


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, error, name", [
    ({"lr": NAN}, ValueError, "lr"), ({"lr": INF}, ValueError, "lr"), ({"lr": -1e-3}, ValueError,
                                                                       "lr"),
    ({"lr": "0.1"}, TypeError, "lr"), ({"lr": None}, TypeError, "lr"), ({"lr": True}, TypeError,
                                                                        "lr"),
    ({"weight_decay": NAN}, ValueError, "weight_decay"), ({"weight_decay": INF}, ValueError,
                                                          "weight_decay"),
    ({"momentum": NAN}, ValueError, "momentum"), ({"momentum": -INF}, ValueError, "momentum"),
    ({"damp": NAN}, ValueError, "damp"), ({"damp": INF}, ValueError, "damp"),
    ({"damp": "1e-6"}, TypeError, "damp"),
    ({"num_grads": None}, TypeError, "num_grads"), ({"num_grads": "64"}, TypeError, "num_grads"),
    ({"num_grads": 2.5}, ValueError, "num_grads"), ({"num_grads": 0}, ValueError, "num_grads"),
    ({"nonfinite": "ignore"}, ValueError, "nonfinite"), ({"normalize_by_seen": "yes"}, TypeError,
                                                         "normalize_by_seen"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=rf"^{name} must"):
        hf_mfac.MFAC([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_param_group_values_are_named():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr must be a finite number"):
        hf_mfac.MFAC([{"params": [a]}, {"params": [b], "lr": NAN}])
    opt = hf_mfac.MFAC([a])
    with pytest.raises(TypeError, match=r"param_groups\[1\]: weight_decay must be a real number"):
        opt.add_param_group({"params": [b], "weight_decay": "0.1"})
    assert len(opt.param_groups) == 1  # the refused group was not added
    assert (
        hf_mfac.MFAC([a], lr=1, num_grads=8.0, damp=1).num_grads == 8
    )  # ints and integral floats are fine


def _snapshot(model, opt):
    return copy.deepcopy(
        {"params": [p.detach().clone() for p in model.parameters()], "opt": opt.state_dict()}
    )


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("grad_dtype, value, match", [
    (torch.float16, 7e4, "storage dtype torch.float16"),  # above 65504: inf in the window
    (torch.bfloat16, 3.4e38, "storage dtype torch.bfloat16"),
    (torch.float32, 1e20, "products"),  # finite, but |g|^2 overflows fp32
])
def test_poisoned_gradient_never_enters_the_window(grad_dtype, value, match):
    """A finite but huge gradient is refused before it reaches the window: 'raise' raises, 'skip'
    skips with a warning, everything (parameters, momentum, window) stays bit-identical, and the
    following steps train exactly like a run that never saw it (the window is not poisoned for the
    next num_grads steps)."""
    data = _data(6)
    model, twin = _model(), _model()
    kw = dict(lr=0.02, num_grads=3, damp=0.1, momentum=0.5, grad_dtype=grad_dtype)
    opt, opt_twin = hf_mfac.MFAC(model.parameters(), **kw), hf_mfac.MFAC(twin.parameters(), **kw)
    _train(model, opt, data[:2])
    _train(twin, opt_twin, data[:2])
    before = _snapshot(model, opt)
    x, y = data[2]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = value
    with pytest.raises(FloatingPointError, match=match) as info:
        opt.step()
    assert "unchanged" in str(info.value)
    _assert_same(_snapshot(model, opt), before)
    opt.nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match=match):
        opt.step()
    _assert_same(_snapshot(model, opt), before)
    assert torch.equal(_train(model, opt, data[3:]), _train(twin, opt_twin, data[3:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_scale_in_fp32(dtype):
    """F^{-1} g = 66 700 overflows fp16 (max 65504), lr * F^{-1} g = 6.67 does not: the learning
    rate is applied in fp32 and the result rounded once, exactly as an fp32 parameter rounded
    afterwards."""
    a = 2.0 ** -16 * 0.98  # F^{-1} g = a / (damp + a^2) ~ 1 / a = 66 870 for one gradient, m = 1
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    ref = torch.nn.Parameter(torch.zeros(4))
    opts = [hf_mfac.MFAC([q], lr=1e-4, num_grads=1, damp=1e-14, momentum=0.9) for q in (p, ref)]
    for step in range(3):
        g = torch.tensor([a, 0.0, 0.0, a * step]).to(dtype)
        with torch.no_grad():
            ref.copy_(p)  # the fp32 twin starts each step where the low-precision parameter is
        for q, opt in zip((p, ref), opts):
            q.grad = g.to(q.dtype)
            opt.step()
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), ref.detach().to(dtype))
        if step == 0:
            assert abs(float(p.detach()[0]) + 1e-4 / a) < 0.01 * 1e-4 / a  # -6.7, not -inf
    assert opts[0].state[p]["momentum_buffer"].dtype == torch.float32


def test_fp16_momentum_buffer_survives_a_checkpoint():
    """The fp32 momentum buffer of an fp16 parameter comes back as fp32 (torch's load_state_dict
    would cast it to fp16): resuming continues bit for bit."""
    def run(steps, opt=None, p=None):
        if p is None:
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(8).half())
            opt = hf_mfac.MFAC([p], lr=1e-2, num_grads=2, damp=0.1, momentum=0.9)
        for s in range(steps):
            p.grad = torch.full((8,), 0.1 * (s + 1)).half() * torch.arange(8).half()
            opt.step()
        return p, opt

    p, opt = run(3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    opt_q = hf_mfac.MFAC([q], lr=1e-2, num_grads=2, damp=0.1, momentum=0.9)
    opt_q.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_q.state[q]["momentum_buffer"].dtype == torch.float32
    run(3, opt, p)
    run(3, opt_q, q)
    assert torch.equal(p, q)


def test_refused_checkpoint_changes_nothing():
    """A checkpoint whose window is corrupt (a NaN in G) is refused before anything changes: param
    groups, momentum and the current window stay as they were."""
    model = _model()
    opt = hf_mfac.MFAC(model.parameters(), lr=0.02, num_grads=3, damp=0.1, momentum=0.5)
    _train(model, opt, _data(2))
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.5
    saved["mfac"]["window"]["G"][1, 3] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"G holds NaN or inf values \(first in row 1\)"):
        opt.load_state_dict(saved)
    _assert_same(_snapshot(model, opt), before)


def test_zero_gradient_moves_a_parameter_none_does_not():
    """F^{-1} couples the coordinates: a parameter whose .grad is a zero tensor still moves, by
    -lr (F^{-1} g)_p (dense float64 reference), while one whose .grad is None stays where it is.
    The window and the other parameters take the same step either way (g has zeros there in both
    cases)."""
    m, damp, lr = 3, 1e-2, 0.1
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(11, generator=gen) for _ in range(3)]  # a: 7 coordinates, b: 4
    grads[2][7:] = 0.0
    runs = {}
    for last in ("zeros", "none"):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(4))
        opt = hf_mfac.MFAC([a, b], lr=lr, num_grads=m, damp=damp)
        for i, g in enumerate(grads):
            a.grad, b.grad = g[:7].clone(), g[7:].clone()
            if i == 2 and last == "none":
                b.grad = None
            before = torch.cat([a.detach(), b.detach()]).double()
            opt.step()
        after = torch.cat([a.detach(), b.detach()]).double()
        runs[last] = (before, after, opt.window.state_dict())
    F = dense_fisher(torch.stack(grads), damp, scale=m)  # (11, 11), float64
    expect = -lr * torch.linalg.solve(F, grads[2].double())
    assert expect[7:].abs().min() > 1e-4  # the zero gradient's coordinates of F^{-1} g are not zero
    before, after, window = runs["zeros"]
    assert rel_err(after - before, expect) < 1e-4  # b moved
    before, after_none, window_none = runs["none"]
    assert torch.equal(after_none[7:], before[7:])  # b stayed
    assert torch.equal(after_none[:7], after[:7]) and torch.equal(window_none["G"], window["G"])


def _trained(shapes, dtype=torch.float32, steps=3, cls=hf_mfac.MFAC, **kw):
    """An MFAC over parameters of ``shapes`` after ``steps`` steps."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = cls(params, **{"lr": 0.01, "num_grads": 2, "damp": 0.1, **kw})
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("shapes, dtype, match", [
    ([(8, 4), (2,)], torch.float32, r"parameter 0, param_groups\[0\]\['params'\]\[0\]: it was "
                                    r"saved for shape \(4, 8\), float32; this one has shape "
                                    r"\(8, 4\), float32"),
    ([(4, 8), (2,)], torch.float64, r"parameter 0, .* float32; this one has shape \(4, 8\), "
                                    r"float64"),
    ([(4, 8)], torch.float32, r"param groups of \[2\] parameters; this optimizer has \[1\]"),
])
def test_load_over_other_parameters_is_refused(shapes, dtype, match, momentum):
    """A checkpoint of an MFAC over (4, 8) + (2,) parameters loads only into one over the same
    shapes and dtypes: (8, 4) + (2,) has as many coordinates and the same layout, but is refused
    before anything changes (the next step would otherwise fail after the window took the
    gradient)."""
    _, src = _trained([(4, 8), (2,)], momentum=momentum)
    params, opt = _trained(shapes, dtype, steps=2, momentum=momentum)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
    _assert_same(opt.state_dict(), before)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # still steps over its own parameters


def test_load_checks_momentum_of_checkpoints_without_the_record():
    """Checkpoints saved before the parameters' shapes were recorded: the momentum buffers' shapes
    are still checked against the parameters."""
    _, src = _trained([(4, 8), (2,)], momentum=0.5)
    saved = copy.deepcopy(src.state_dict())
    del saved["mfac"]["params"]
    _, opt = _trained([(8, 4), (2,)], steps=2, momentum=0.5)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"momentum buffer of parameter 0, .* has shape "
                                         r"\(4, 8\); the parameter has \(8, 4\)"):
        opt.load_state_dict(saved)
    _assert_same(opt.state_dict(), before)
    params, same = _trained([(4, 8), (2,)], steps=1, momentum=0.5)
    same.load_state_dict(saved)  # the same shapes load as before
    assert same.window.count == 2 and torch.equal(same.window.G, src.window.G)


def test_shards_over_other_parameters_are_refused(tmp_path):
    """The window shard files record the parameters' shapes too: loading them into an MFAC or a
    ShardedMFAC over (8, 4) + (2,) instead of (4, 8) + (2,) is refused with nothing changed."""
    from hf_mfac.optim.distributed import load_mfac_shards, save_mfac_shards

    _, src = _trained([(4, 8), (2,)], cls=ShardedMFAC)
    save_mfac_shards(src, str(tmp_path))
    for cls in (hf_mfac.MFAC, ShardedMFAC):
        _, opt = _trained([(8, 4), (2,)], steps=2, cls=cls)
        before = [copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.window.state_dict())]
        with pytest.raises(ValueError, match=r"parameter 0, .* saved for shape \(4, 8\)"):
            load_mfac_shards(opt, str(tmp_path))
        _assert_same([copy.deepcopy(opt.state_dict()), opt.window.state_dict()], before)
        if cls is ShardedMFAC:
            with pytest.raises(ValueError, match=r"saved for shape \(4, 8\)"):
                opt.load_sharded_state_dict(src.sharded_state_dict())
            _assert_same([copy.deepcopy(opt.state_dict()), opt.window.state_dict()], before)


def test_complex_parameters_are_refused():
    """A complex parameter would lose its imaginary part (the window is real): refused when the
    optimizer is built or the group added, naming the parameter and view_as_real."""
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is complex "
                                        r"\(torch.complex64, shape \(3,\)\).*view_as_real"):
        hf_mfac.MFAC([r, z])
    with pytest.raises(TypeError, match=r"\['params'\]\[0\] \(w\) is complex"):
        hf_mfac.MFAC([("w", z)])  # named parameters are named
    opt = hf_mfac.MFAC([r])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    real = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())  # what the message says to do
    hf_mfac.MFAC([real])


def test_options_are_defined_once():
    """MFAC's keyword defaults are MFACOptions' defaults; ShardedMFAC takes the same; aliases
    resolve."""
    import dataclasses
    import inspect

    from hf_mfac.optim.options import OPTION_ALIASES, MFACOptions, parse_optim_args

    sig = inspect.signature(hf_mfac.MFAC)
    defaults = {f.name: f.default for f in dataclasses.fields(MFACOptions)}
    assert {k: sig.parameters[k].default for k in defaults} == defaults
    assert set(sig.parameters) == {"params", *defaults}
    assert OPTION_ALIASES["ngrads"] == OPTION_ALIASES["m"] == "num_grads"
    parsed = parse_optim_args("m=16,grad_dtype=torch.bfloat16")
    assert parsed == {"num_grads": 16, "grad_dtype": "bfloat16"}
    assert MFACOptions(num_grads=8.0).num_grads == 8
    opt = ShardedMFAC([torch.nn.Parameter(torch.zeros(2))], 0.5, 3, grad_dtype="bfloat16")
    got = (opt.defaults["lr"], opt.num_grads, opt.grad_dtype, opt.damp)
    assert got == (0.5, 3, torch.bfloat16, 1e-6)
    with pytest.raises(ValueError, match="window_device must be a device"):
        hf_mfac.MFAC([torch.nn.Parameter(torch.zeros(2))], window_device="gpu0")


def test_one_module_says_what_is_mfac():
    """hf_mfac.optim owns "is this M-FAC?": wrapped optimizers (accelerate, the Trainer) and optim
    names."""
    from hf_mfac.optim import is_mfac_optimizer, selects_mfac, unwrap_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = ShardedMFAC(p)

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt and is_mfac_optimizer(Wrapper(opt))
    assert not is_mfac_optimizer(torch.optim.SGD(p, lr=0.1)) and not is_mfac_optimizer(None)
    assert (
        selects_mfac("MFAC")
        and selects_mfac(type("Args", (), {"optim": "mfac"})())
        and not selects_mfac("sgd")
    )


@pytest.mark.distributed
def test_sharded_ranks_reject_together(tmp_path):
    """2 ranks, fp16 window: a gradient that overflows fp16 only in rank 1's shard is skipped (or
    raised) by both ranks, which stay in step and end identical to one process that skipped it; a
    shard file with a corrupt window on rank 1 only is refused on both ranks."""
    from test_distributed import launch, results

    launch("dist_mfac.py", 2, tmp_path, "--faults")
    r0, r1 = results(tmp_path, 2)
    for r in (r0, r1):
        assert r["skip_warned"] and r["skip_unchanged"] and r["raise_unchanged"], r
        assert r["raise_error"].startswith(
            "GradientRejected: MFAC: g has values beyond the range"
        ), r["raise_error"]
        assert r["after_skip"] < 1e-6, r  # matches one process that skipped the same step
        assert r["load_error"].startswith("ValueError: cannot load the DynamicMFAC window"), r[
            "load_error"
        ]
        assert r["load_unchanged"], r
        assert "GGt does not match G" in r["load_error"], r[
            "load_error"
        ]  # found from the summed row norms
    assert "G holds NaN or inf values (first in row 1)" in r1["load_nan_error"], r1[
        "load_nan_error"
    ]
    assert "another shard's window is invalid (non-finite values)" in r0["load_nan_error"], r0[
        "load_nan_error"
    ]
    assert r0["final"] == r1["final"]
