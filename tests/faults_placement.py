"""Fault rows for the Fisher's placement (run by tests/test_faults.py): a device that does not
exist, an unknown name, a capacity that is not a number of bytes, devices that cannot hold the
Fisher, and targets offloaded by accelerate are refused before any work with the model unchanged;
a placed prune that fails in a later step puts every weight back; a placed prune equals the
one-device prune."""
from __future__ import annotations

import copy

import pytest
import torch

from faults_pruning import INTERRUPT, failing, mlp
from hf_mfac.pruning import prune_oneshot
from test_faults import Fault

TWO = [("cpu", None), ("cpu", None)]  # two equal slots: the blocks split half and half


def _prune(device, **kw):
    def act(ctx):
        settings = dict(method="obert", sparsity=0.5, num_grads=8, block_size=4, progress=False)
        return prune_oneshot(ctx["model"], ctx["data"], device=device, **{**settings, **kw})

    return act


def _equals_one_device(ctx, result):
    one = copy.deepcopy(ctx["reference"])
    ref = prune_oneshot(one, ctx["data"], method="obert", sparsity=0.5, num_grads=8, block_size=4,
                        progress=False)
    assert len(result.report.placement) == 2
    for name, mask in ref.masks.items():
        assert torch.equal(mask, result.masks[name]), name
    for p, q in zip(one.parameters(), ctx["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _with_reference(tmp_path=None):
    ctx = mlp(tmp_path)
    ctx["reference"] = copy.deepcopy(ctx["model"])
    return ctx


def _offloaded(tmp_path=None):
    accelerate = pytest.importorskip("accelerate")
    ctx = mlp(tmp_path)
    model = accelerate.cpu_offload(ctx["model"], execution_device="cpu")
    stored = {n: m._hf_hook.weights_map["weight"] for n, m in model.named_modules()
              if hasattr(m, "_hf_hook") and n}
    return {"model": model, "data": ctx["data"], "stored": stored}


CASES = [
    Fault("placement-device-does-not-exist", mlp, _prune("cuda:7"), ValueError,
          r"device='cuda:7' does not exist"),
    Fault("placement-unknown-device-name", mlp, _prune(["cpu", "gpu0"]), ValueError,
          r"device='gpu0' is not a device"),
    Fault("placement-capacity-not-bytes", mlp, _prune({"cpu": "8G"}), ValueError,
          r"capacity of cpu must be a number of bytes"),
    Fault("placement-devices-cannot-hold-the-fisher", mlp,
          _prune([("cpu", 2048), ("cpu", 2048)]), MemoryError,
          r"the Fisher's \d+ blocks need .*: lower block_size"),
    Fault("placement-offloaded-targets-refused", _offloaded, _prune(None), ValueError,
          r"fc1.weight, fc2.weight.* offloaded by accelerate", watch=("stored",)),
    Fault("placement-failed-second-step-restores", mlp,
          _prune(TWO, recompute=2, loss_fn=failing(11)), ValueError, "on purpose at call 11"),
    Fault("placement-interrupted-gradients-restore", mlp,
          _prune(TWO, loss_fn=failing(5, INTERRUPT)), KeyboardInterrupt),
    Fault("placement-two-slots-equal-one-device", _with_reference, _prune(TWO), None,
          check=_equals_one_device),
]
