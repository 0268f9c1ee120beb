"""hf_mfac.MFAC: equivalences with SGD, param groups, masks, state_dict round trip."""
import io

import pytest
import torch

import hf_mfac
from conftest import dense_fisher, rel_err


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
    """With damp -> inf, F^{-1} g -> g / damp: M-FAC is SGD with learning rate lr / damp (STYLE.md)."""
    damp, lr = 1e7, 0.5
    a, b = _model(), _model()
    wa = _train(a, hf_mfac.MFAC(a.parameters(), lr=lr, num_grads=4, damp=damp, momentum=momentum), _data())
    wb = _train(b, torch.optim.SGD(b.parameters(), lr=lr / damp, momentum=momentum), _data())
    assert rel_err(wa, wb) < 1e-5


def test_step_is_inverse_fisher_of_window():
    """One step moves the parameters by -lr * F^{-1} g with F from the last m flattened gradients."""
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
    """Save after 5 steps (through torch.save / weights_only load as the Trainer does), resume, compare."""
    data = _data(10)
    a = _model()
    opt_a = hf_mfac.MFAC(a.parameters(), lr=0.02, num_grads=4, damp=0.1, momentum=0.5, grad_dtype=torch.bfloat16)
    _train(a, opt_a, data[:5])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b = _model(seed=5)
    b.load_state_dict(ck["model"])
    opt_b = hf_mfac.MFAC(b.parameters(), lr=0.02, num_grads=4, damp=0.1, momentum=0.5, grad_dtype=torch.bfloat16)
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
        opt = hf_mfac.MFAC(p, grad_dtype="int8")
        p[0].grad = torch.ones(2)
        opt.step()
