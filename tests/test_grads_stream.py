"""The gradients streamed into the chunk one target at a time: the same rows as
``torch.autograd.grad``, bit for bit; ``.grad`` and the parameters' hooks as they were, whatever
happens."""
import pytest
import torch

from hf_mfac.pruning import collect_grads
from hf_mfac.pruning.targets import Layout


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 10)
        self.b = torch.nn.Linear(10, 10)
        self.c = torch.nn.Linear(10, 3)
        self.unused = torch.nn.Linear(4, 4)  # a target the loss never reaches

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)) + self.a(x))))  # a used twice


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(5, 6, generator=g), "y": torch.randint(0, 3, (5,), generator=g)}
            for _ in range(n)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def _targets(model):
    return {"a": model.a.weight, "b": model.b.weight, "c": model.c.weight,
            "unused": model.unused.weight}


def _reference(model, data, layout, keep):
    params = [layout.params[n] for n in layout.names]
    rows = []
    for batch in data:
        gs = torch.autograd.grad(_loss(model, batch), params, allow_unused=True)
        row = torch.zeros(layout.dim)
        for g, off, n in zip(gs, layout.offsets, layout.numels):
            if g is not None:
                row[off:off + n] = g.reshape(-1)
        rows.append(row * keep)
    return torch.stack(rows)


def _no_hooks(model):
    return all(not p._backward_hooks for p in model.parameters())


def test_streamed_rows_equal_autograd_grad_and_leave_grad_alone(monkeypatch):
    real_grad = torch.autograd.grad
    captured = []

    def spy(*a, **k):  # what autograd hands back: the hooks' zero-stride stand-ins
        out = real_grad(*a, **k)
        captured.extend(g for g in out if g is not None)
        return out

    torch.manual_seed(0)
    model = _Net()
    layout = Layout(_targets(model), pad=4)
    keep = layout.valid() & (torch.rand(layout.dim) > 0.3)
    before = torch.randn_like(model.b.weight)
    model.b.weight.grad = before  # a training loop's gradient: not touched
    data = _data()
    chunks = []
    monkeypatch.setattr(torch.autograd, "grad", spy)
    collect_grads(model, data, 6, params=layout, keep=keep, loss_fn=_loss, chunk_size=4,
                  sink=lambda c: chunks.append(c.clone()), progress=False, mean=False)
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    assert captured and all(g.stride() == (0,) * g.dim() for g in captured)
    got = torch.cat(chunks)
    ref = _reference(model, data, layout, keep)
    assert torch.equal(got, ref)
    assert bool((got[:, layout.offsets[3]:].abs().sum() == 0))  # the unused target: zero rows
    assert model.b.weight.grad is before and model.a.weight.grad is None
    assert _no_hooks(model)


def test_hooks_removed_and_grad_alone_when_the_backward_fails():
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom in backward")

    model = _Net()
    layout = Layout(_targets(model), pad=4)

    def bad_loss(m, batch):
        return Boom.apply(m(batch["x"])).sum()

    with pytest.raises(RuntimeError, match="boom in backward"):
        collect_grads(model, _data(), 6, params=layout, loss_fn=bad_loss, progress=False,
                      sink=lambda c: None)
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())
    # the model still gives the right gradients afterwards (no stale hook writes anywhere)
    chunks = []
    collect_grads(model, _data(), 6, params=layout, loss_fn=_loss, chunk_size=6,
                  sink=lambda c: chunks.append(c.clone()), progress=False)
    assert torch.equal(chunks[0], _reference(model, _data(), layout, layout.valid().float()))


def test_rows_right_where_the_hooks_do_not_run(monkeypatch):
    """A PyTorch whose engine captured the gradients before the tensor hooks ran: the captured
    gradients are copied instead (the same rows)."""

    class _Handle:
        def remove(self):
            pass

    monkeypatch.setattr(torch.Tensor, "register_hook", lambda self, hook: _Handle())
    model = _Net()
    layout = Layout(_targets(model), pad=4)
    chunks = []
    collect_grads(model, _data(), 6, params=layout, loss_fn=_loss, chunk_size=3,
                  sink=lambda c: chunks.append(c.clone()), progress=False)
    assert torch.equal(torch.cat(chunks), _reference(model, _data(), layout,
                                                     layout.valid().float()))
