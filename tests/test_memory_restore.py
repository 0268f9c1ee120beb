"""The host copy that restores the targets on error is taken just before the first weight is written
(not through the gradient phase and the inversion), and still restores them exactly."""
import pytest
import torch

import hf_mfac.pruning.driver as driver
from hf_mfac.pruning import prune_oneshot, prune_sweep
from hf_mfac.pruning.driver import before_update, restore_on_error


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 8, generator=g), "y": torch.randint(0, 4, (4,), generator=g)}
            for _ in range(n)]


def _loss(m, batch):
    return torch.nn.functional.cross_entropy(m(batch["x"]), batch["y"])


KW = dict(method="obert", sparsity=0.5, num_grads=8, block_size=8, exclude=None, progress=False,
          loss_fn=_loss)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_block_copies_only_when_armed():
    t = {"w": torch.arange(4.0)}
    with pytest.raises(KeyError):  # never armed: nothing was copied, nothing to put back
        with restore_on_error(t, lazy=True):
            assert driver._GUARDS.get()[-1].saved is None
            raise KeyError("before any write")
    with pytest.raises(KeyError):
        with restore_on_error(t, lazy=True):
            before_update()
            t["w"].mul_(3)
            raise KeyError("after a write")
    assert torch.equal(t["w"], torch.arange(4.0))
    # nested: the inner block guards nothing of its own, arming reaches the outer lazy block
    with pytest.raises(KeyError):
        with restore_on_error(t, lazy=True) as commit:
            before_update()
            t["w"].add_(1)
            commit()  # (1, 2, 3, 4) is what comes back
            with restore_on_error(t, lazy=True):
                before_update()
                t["w"].zero_()
                raise KeyError("inner")
    assert torch.equal(t["w"], torch.arange(4.0) + 1)
    assert driver._GUARDS.get() == ()


def test_copy_taken_after_the_gradients_and_the_inverse(monkeypatch):
    events = []
    real_collect, real_take = driver.collect_grads, driver._Guard.take

    def collect(*a, **k):
        events.append("gradients")
        return real_collect(*a, **k)

    def take(self):
        events.append("copy" if self.saved is None and self.own else "no copy")
        return real_take(self)

    monkeypatch.setattr(driver, "collect_grads", collect)
    monkeypatch.setattr(driver._Guard, "take", take)
    prune_oneshot(_mlp(), _data(), **KW)
    assert events == ["gradients", "copy"]
    events.clear()
    prune_oneshot(_mlp(), _data(), recompute=2, **KW)
    # the second step's gradients and inverse are taken with the copy held (it is not retaken)
    assert events == ["gradients", "copy", "gradients", "no copy"]


@pytest.mark.parametrize("recompute", [1, 2])
def test_a_failed_write_back_restores_exactly(monkeypatch, recompute):
    model = _mlp()
    before = _state(model)
    real = driver._write_back
    calls = []

    def half_then_fail(targets, layout, weights):
        calls.append(1)
        if len(calls) == recompute:  # the last step: half the targets written, then an error
            name = next(iter(targets))
            targets[name].data.mul_(0)
            raise KeyboardInterrupt
        real(targets, layout, weights)

    monkeypatch.setattr(driver, "_write_back", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prune_oneshot(model, _data(), recompute=recompute, **KW)
    assert _same(_state(model), before)


def test_sweep_restores_to_the_last_save(monkeypatch):
    model = _mlp()
    saved = {}
    calls = []

    def save_fn(s, m, masks, report):
        saved[s] = _state(m)

    def failing_loss(m, batch):  # fails in the second target's gradients
        calls.append(1)
        if len(calls) > 8:
            raise RuntimeError("lost the data")
        return _loss(m, batch)

    kw = {**KW, "loss_fn": failing_loss}
    kw.pop("sparsity")
    with pytest.raises(RuntimeError, match="lost the data"):
        prune_sweep(model, _data(), [0.3, 0.6], save_fn=save_fn, **kw)
    assert list(saved) == [0.3] and _same(_state(model), saved[0.3])
