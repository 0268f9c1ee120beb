"""Fault rows for one-shot pruning (run by tests/test_faults.py): a prune that fails or is
interrupted in any step leaves the model's weights exactly as they were (a sweep: as at its last
saved target), and bad input is refused up front with an error that names the argument or the
weight. Each row prunes a small trained MLP."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.utils.data import DataLoader

from hf_mfac.pruning import (
    FisherCache,
    OBSPruner,
    PruningConfig,
    prune_oneshot,
    prune_oneshot_distributed,
    prune_sweep,
)
from test_faults import Fault


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x, labels):
        h = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": nn.functional.cross_entropy(h, labels)}


def batches(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 8, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4  # learnable in a few dozen steps
    return [{"x": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, 4 * n, 4)]


@functools.lru_cache(maxsize=None)
def _trained() -> MLP:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in batches(40, seed=0):
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.step()
    return model


def mlp(tmp_path=None, **extra) -> dict:
    return {"model": copy.deepcopy(_trained()), "data": batches(16), **extra}


def failing(n: int, exc: BaseException | None = None):
    """A loss_fn whose n-th call raises ``exc`` (default: ValueError)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == n:
            raise exc if exc is not None else ValueError(f"loss failed on purpose at call {n}")
        return model(**batch)["loss"]

    return loss_fn


def nan_at(n: int):
    """A loss_fn whose n-th call returns a NaN loss (its gradient is NaN)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss = model(**batch)["loss"]
        return loss * float("nan") if calls[0] == n else loss

    return loss_fn


OBERT = dict(method="obert", num_grads=4, block_size=16, progress=False)
INTERRUPT = KeyboardInterrupt("interrupted on purpose")


def oneshot(**kw):
    return lambda ctx: prune_oneshot(ctx["model"], ctx["data"], **{**OBERT, "sparsity": 0.6, **kw})


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def sweep_to(sparsities) -> dict:
    """The model's state after an uninterrupted sweep to ``sparsities``."""
    model = copy.deepcopy(_trained())
    prune_sweep(model, batches(16), sparsities, **OBERT)
    return state(model)


def as_after(sparsities, saved: list):
    """check: the model equals the sweep stopped after ``sparsities``, and the note names the saved
    targets."""

    def check(ctx, err):
        now = ctx["model"].state_dict()
        assert all(torch.equal(now[k], v) for k, v in sweep_to(sparsities).items())
        assert any(f"sparsities {saved} were saved" in n for n in getattr(err, "__notes__", [])), (
            err
        )

    return check


def saving(ctx, fail_at: int | None = None):
    """A save_fn writing each target's masks to ctx["out"]; its ``fail_at``-th call raises
    OSError."""
    calls = [0]

    def save_fn(s, model, masks, report):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(f"disk full on purpose at target {s}")
        torch.save(masks, ctx["out"] / f"masks-{s}.pt")

    return save_fn


def with_out(tmp_path) -> dict:
    (tmp_path / "out").mkdir()
    return mlp(out=tmp_path / "out")


def frozen(tmp_path) -> dict:
    ctx = mlp()
    ctx["model"].fc2.weight.requires_grad_(False)
    return ctx


def modes(model) -> dict:
    return {name: m.training for name, m in model.named_modules()}


def part_in_eval(tmp_path=None) -> dict:
    """The MLP training, its fc2 in eval mode (a frozen part, say); ``modes`` records each module's
    mode."""
    ctx = mlp()
    ctx["model"].train()
    ctx["model"].fc2.eval()
    return {**ctx, "modes": modes(ctx["model"])}


def same_modes(ctx, _) -> None:
    assert modes(ctx["model"]) == ctx["modes"], modes(ctx["model"])


def under(manager, act):
    """``act`` run inside ``manager()`` (torch.inference_mode, torch.no_grad)."""

    def run(ctx):
        with manager():
            return act(ctx)

    return run


NOT_A_NUMBER = "sparsity must be a real number"


def _assert(ok: bool) -> None:
    assert ok


def same_as_block(B: int):
    def check(ctx, result):
        ref = copy.deepcopy(_trained())
        masks, _ = prune_oneshot(ref, batches(16), **{**OBERT, "sparsity": 0.6, "block_size": B})
        assert result.report.block_size == B
        assert all(torch.equal(result.masks[n], masks[n]) for n in masks)
        assert all(
            torch.allclose(a, b, atol=1e-6)
            for a, b in zip(ctx["model"].parameters(), ref.parameters())
        )

    return check


CASES = [
    # -- a step that fails or is interrupted after earlier steps changed the weights: everything
    # comes back
    Fault(
        "oneshot-obert-step2-raises",
        mlp,
        oneshot(recompute=3, loss_fn=failing(6)),
        ValueError,
        "on purpose",
    ),
    Fault(
        "oneshot-obert-step3-interrupted",
        mlp,
        oneshot(recompute=3, loss_fn=failing(10, INTERRUPT)),
        KeyboardInterrupt,
    ),
    Fault(
        "oneshot-obert-2:4-step2-interrupted",
        mlp,
        lambda ctx: prune_oneshot(
            ctx["model"],
            ctx["data"],
            **OBERT,
            pattern="2:4",
            recompute=2,
            loss_fn=failing(6, INTERRUPT),
        ),
        KeyboardInterrupt,
    ),
    Fault(
        "oneshot-cap-step2-interrupted",
        mlp,
        oneshot(method="cap", recompute=2, loss_fn=failing(5, INTERRUPT)),
        KeyboardInterrupt,
    ),
    Fault(
        "oneshot-mfac-step2-raises",
        mlp,
        oneshot(method="mfac", recompute=2, loss_fn=failing(7)),
        ValueError,
        "on purpose",
    ),
    Fault(
        "oneshot-step2-nan-gradient",
        mlp,
        oneshot(recompute=2, loss_fn=nan_at(6)),
        (ValueError, FloatingPointError),
        "finite|NaN|nan",
    ),
    Fault(
        "oneshot-cached-fisher-step2-interrupted",
        mlp,
        lambda ctx: prune_oneshot(
            ctx["model"],
            ctx["data"],
            **OBERT,
            sparsity=0.6,
            recompute=2,
            fisher_cache=FisherCache(),
            loss_fn=failing(5, INTERRUPT),
        ),
        KeyboardInterrupt,
    ),
    Fault(
        "distributed-one-process-step2-interrupted",
        mlp,
        lambda ctx: prune_oneshot_distributed(
            ctx["model"],
            ctx["data"],
            **OBERT,
            sparsity=0.6,
            recompute=2,
            loss_fn=failing(6, INTERRUPT),
        ),
        KeyboardInterrupt,
    ),
    # -- sweeps: as before the call, or as at the last target save_fn saved
    Fault(
        "sweep-target3-raises",
        mlp,
        lambda ctx: prune_sweep(
            ctx["model"], ctx["data"], [0.3, 0.5, 0.7], **OBERT, loss_fn=failing(10)
        ),
        ValueError,
        "on purpose",
    ),
    Fault(
        "sweep-target2-interrupted",
        mlp,
        lambda ctx: prune_sweep(
            ctx["model"],
            ctx["data"],
            [0.3, 0.5],
            **OBERT,
            recompute=2,
            loss_fn=failing(12, INTERRUPT),
        ),
        KeyboardInterrupt,
    ),
    Fault(
        "sweep-saved-target3-raises",
        with_out,
        lambda ctx: prune_sweep(
            ctx["model"],
            ctx["data"],
            [0.3, 0.5, 0.7],
            **OBERT,
            loss_fn=failing(10),
            save_fn=saving(ctx),
        ),
        ValueError,
        "on purpose",
        check=as_after([0.3, 0.5], [0.3, 0.5]),
        watch=("data",),
    ),
    Fault(
        "sweep-save2-fails",
        with_out,
        lambda ctx: prune_sweep(
            ctx["model"], ctx["data"], [0.3, 0.5, 0.7], **OBERT, save_fn=saving(ctx, 2)
        ),
        OSError,
        "disk full",
        check=as_after([0.3], [0.3]),
        watch=("data",),
    ),
    # -- bad input, refused before any work
    Fault(
        "num_grads-zero",
        mlp,
        oneshot(num_grads=0),
        ValueError,
        "num_grads must be a positive integer; got 0",
    ),
    Fault("num_grads-negative", mlp, oneshot(num_grads=-4), ValueError, "num_grads"),
    Fault("num_grads-fraction", mlp, oneshot(num_grads=2.5), ValueError, "num_grads"),
    Fault(
        "num_grads-zero-distributed",
        mlp,
        lambda ctx: prune_oneshot_distributed(
            ctx["model"], ctx["data"], **{**OBERT, "num_grads": 0}, sparsity=0.6
        ),
        ValueError,
        "num_grads",
    ),
    Fault("recompute-zero", mlp, oneshot(recompute=0), ValueError, "recompute"),
    Fault(
        "chunk_size-zero",
        mlp,
        oneshot(chunk_size=0),
        ValueError,
        "chunk_size must be a positive integer; got 0",
    ),
    Fault("sparsity-one", mlp, oneshot(sparsity=1.0), ValueError, "sparsity"),
    Fault("sparsity-nan", mlp, oneshot(sparsity=float("nan")), ValueError, "sparsity"),
    Fault("sparsity-inf", mlp, oneshot(sparsity=float("inf")), ValueError, "sparsity"),
    Fault("sparsity-missing", mlp, oneshot(sparsity=None), ValueError, "sparsity"),
    Fault(
        "frozen-target",
        frozen,
        oneshot(),
        ValueError,
        r"fc2\.weight.*requires_grad|requires_grad.*fc2\.weight",
    ),
    Fault(
        "frozen-target-distributed",
        frozen,
        lambda ctx: prune_oneshot_distributed(ctx["model"], ctx["data"], **OBERT, sparsity=0.6),
        ValueError,
        r"fc2\.weight",
    ),
    Fault("empty-dataloader", lambda p: {**mlp(), "data": []}, oneshot(), ValueError, "empty"),
    Fault(
        "empty-DataLoader",
        lambda p: {**mlp(), "data": DataLoader([], batch_size=4)},
        oneshot(),
        ValueError,
        "empty",
    ),
    Fault(
        "no-dataloader",
        lambda p: {**mlp(), "data": None},
        oneshot(method="cap"),
        ValueError,
        "needs gradients",
    ),
    Fault(
        "dataloader-short-for-fisher-batches",
        lambda p: {
            **mlp(),
            "data": DataLoader([{"x": torch.randn(8), "labels": 1}] * 10, batch_size=4),
        },
        oneshot(num_grads=6, fisher_batch_size=2),
        ValueError,
        "gives at most 5 gradients",
    ),
    Fault("dataloader-short", mlp, oneshot(num_grads=17), ValueError, "gives at most 16 gradients"),
    Fault(
        "one-shot-iterator-recompute",
        lambda p: {**mlp(), "data": iter(batches(16))},
        oneshot(recompute=2),
        ValueError,
        "iterated again",
        watch=("model",),
    ),
    Fault(
        "fisher_batch_size-zero", mlp, oneshot(fisher_batch_size=0), ValueError, "fisher_batch_size"
    ),
    Fault(
        "per_sample-and-fisher_batch_size",
        mlp,
        oneshot(per_sample=True, fisher_batch_size=2),
        ValueError,
        "per_sample",
    ),
    Fault("include-matches-nothing", mlp, oneshot(include="attention"), ValueError, "matches no"),
    Fault(
        "masks-for-non-target",
        mlp,
        oneshot(masks={"fc9.weight": torch.ones(4, 8, dtype=torch.bool)}),
        ValueError,
        "not pruning targets",
    ),
    Fault(
        "masks-wrong-shape",
        mlp,
        oneshot(masks={"fc1.weight": torch.ones(8, 16, dtype=torch.bool)}),
        ValueError,
        r"fc1\.weight has shape",
    ),
    Fault(
        "settings-beside-pruner-instance",
        mlp,
        lambda ctx: prune_oneshot(
            ctx["model"],
            ctx["data"],
            method=OBSPruner(block_size=16),
            sparsity=0.6,
            num_grads=4,
            block_size=32,
        ),
        ValueError,
        r"\['block_size'\].*Pruner instance",
    ),
    Fault(
        "settings-beside-pruner-instance-distributed",
        mlp,
        lambda ctx: prune_oneshot_distributed(
            ctx["model"],
            ctx["data"],
            method=OBSPruner(block_size=16),
            sparsity=0.6,
            num_grads=4,
            block_size=32,
        ),
        ValueError,
        "Pruner instance",
    ),
    Fault(
        "loss-without-gradient",
        mlp,
        oneshot(loss_fn=lambda model, batch: torch.tensor(1.0)),
        ValueError,
        "does not depend",
    ),
    Fault(
        "config-with-a-sweep",
        mlp,
        oneshot(config=PruningConfig(sparsities=[0.3, 0.5]), sparsity=None),
        ValueError,
        "prune_sweep",
    ),
    Fault(
        "config-not-a-PruningConfig",
        mlp,
        oneshot(config={"sparsity": 0.5}),
        TypeError,
        "PruningConfig",
    ),
    Fault(
        "config-overridden-by-a-bad-keyword",
        mlp,
        lambda ctx: prune_oneshot(
            ctx["model"],
            ctx["data"],
            config=PruningConfig(sparsity=0.5, num_grads=4),
            num_grads=0,
            progress=False,
        ),
        ValueError,
        "num_grads",
    ),
    Fault(
        "config-step2-interrupted-distributed",
        mlp,
        lambda ctx: prune_oneshot_distributed(
            ctx["model"],
            ctx["data"],
            config=PruningConfig(
                method="cap", sparsity=0.6, num_grads=4, block_size=16, recompute=2
            ),
            loss_fn=failing(6, INTERRUPT),
            progress=False,
        ),
        KeyboardInterrupt,
    ),
    # -- modes: every module comes back in its own train/eval mode (not all in the top-level mode)
    Fault("modes-part-in-eval-kept", part_in_eval, oneshot(), check=same_modes),
    Fault(
        "modes-part-in-eval-kept-step2-raises",
        part_in_eval,
        oneshot(recompute=2, loss_fn=failing(6)),
        ValueError,
        "on purpose",
        check=same_modes,
    ),
    # -- autograd off: the error names inference mode and says what to do
    Fault(
        "inference-mode",
        mlp,
        under(torch.inference_mode, oneshot()),
        RuntimeError,
        r"torch\.inference_mode\(\).*call it outside",
    ),
    Fault(
        "no-grad-is-fine",
        mlp,
        under(torch.no_grad, oneshot()),
        check=lambda ctx, r: _assert(abs(r.report.sparsity - 0.6) < 1e-3),
    ),
    # -- numbers only, naming the field
    Fault("sparsity-percent-string", mlp, oneshot(sparsity="80%"), TypeError, NOT_A_NUMBER),
    Fault("sparsity-numeric-string", mlp, oneshot(sparsity="0.8"), TypeError, NOT_A_NUMBER),
    Fault("sparsity-False", mlp, oneshot(sparsity=False), TypeError, NOT_A_NUMBER),
    Fault("damp-string", mlp, oneshot(damp="1e-4"), TypeError, "damp must be a number"),
    Fault(
        "recompute-True",
        mlp,
        oneshot(recompute=True),
        ValueError,
        "recompute must be a positive integer",
    ),
    Fault(
        "woodtaylor-string",
        mlp,
        oneshot(woodtaylor="False"),
        TypeError,
        "woodtaylor must be True or False",
    ),
    Fault(
        "sweep-sparsities-strings",
        mlp,
        lambda ctx: prune_sweep(ctx["model"], ctx["data"], ["0.3", "0.5"], **OBERT),
        TypeError,
        "sparsities",
    ),
    # -- accepted: a block larger than every target is the largest target's block (same result, no
    # padding). The largest target has 128 weights: batched fp64 solves of more than about 150
    # unknowns hang in this torch's MKL with 2 threads (DLASWP "parameter 6" errors), which the
    # joint OBS update would run into
    Fault(
        "block_size-beyond-every-target", mlp, oneshot(block_size=4096), check=same_as_block(128)
    ),
    Fault(
        "magnitude-ignores-fisher-settings",
        mlp,
        lambda ctx: prune_oneshot(
            ctx["model"],
            ctx["data"],
            method="magnitude",
            sparsity=0.5,
            num_grads=4,
            block_size=16,
            damp=1e-4,
        ),
        check=lambda ctx, r: _assert(
            r.report.method == "magnitude" and abs(r.report.sparsity - 0.5) < 1e-3
        ),
    ),
]
