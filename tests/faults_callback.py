"""Fault rows for PruningCallback's checkpoint files: interrupted saves keep the previous files
whole, truncated or foreign files are refused with their name, and the callback's masks stay as they
were."""
from __future__ import annotations

from unittest import mock

import torch
from torch import nn

from test_faults import Fault

from hf_mfac.integrations.gradual.callback import (
    CHECKPOINT_MASKS_NAME,
    CHECKPOINT_STATE_NAME,
    PruningCallback,
)


def _callback(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4))
    cb = PruningCallback(method="magnitude", final_sparsity=0.5)
    cb.targets = {"0.weight": model[0].weight}
    cb.masks = {"0.weight": torch.rand(4, 6) > 0.5}
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    cb.save_state(str(folder))
    cb.masks = {"0.weight": torch.rand(4, 6) > 0.5}  # the state after more training
    return {"cb_masks": cb.masks, "folder": folder, "cb": cb}


def _truncate(tmp_path):
    ctx = _callback(tmp_path)
    path = ctx["folder"] / CHECKPOINT_MASKS_NAME
    path.write_bytes(path.read_bytes()[:20])
    return ctx


def _garbage_state(tmp_path):
    ctx = _callback(tmp_path)
    (ctx["folder"] / CHECKPOINT_STATE_NAME).write_text("{not json")
    return ctx


def _interrupted_save(ctx):
    with mock.patch("safetensors.torch.save_file", side_effect=OSError("No space left on device")):
        ctx["cb"].save_state(str(ctx["folder"]))


def _training_callback(tmp_path):
    """A magnitude PruningCallback about to prune a small model trained with hf_mfac.MFAC."""
    from hf_mfac.optim import MFAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    opt = MFAC(model.parameters(), lr=1e-2, num_grads=4)
    cb = PruningCallback(method="magnitude", final_sparsity=0.5, progress=False)
    cb.targets = {"0.weight": model[0].weight}
    cb.masks = {}
    return {"model": model, "opt": opt, "cb": cb, "cb_masks": cb.masks}


def _optimizer_refuses_masks(ctx):
    state = mock.Mock(global_step=3)
    with mock.patch(
        "hf_mfac.optim.MFAC.set_masks", side_effect=RuntimeError("the optimizer refused the masks")
    ):
        ctx["cb"]._prune(ctx["model"], ctx["opt"], [], 0.5, state)


def _obert_callback(tmp_path):
    """An oBERT PruningCallback about to prune the fault table's trained MLP, which trains with its
    fc2 in eval mode (a frozen part, say)."""
    from faults_pruning import modes, part_in_eval

    ctx = part_in_eval()
    cb = PruningCallback(
        method="obert",
        final_sparsity=0.5,
        num_grads=4,
        block_size=16,
        dataloader=ctx["data"],
        progress=False,
    )
    cb.targets = {n: p for n, p in ctx["model"].named_parameters() if n.endswith("weight")}
    return {**ctx, "cb": cb, "modes": modes(ctx["model"])}


def _prune_step(loss_fn=None):
    def act(ctx):
        state = mock.Mock(global_step=3, log_history=[])
        if loss_fn is None:
            return ctx["cb"]._prune(ctx["model"], None, None, 0.5, state)
        with mock.patch("hf_mfac.pruning.grads.default_loss", side_effect=loss_fn):
            return ctx["cb"]._prune(ctx["model"], None, None, 0.5, state)

    return act


def _check_modes(ctx, _):
    from faults_pruning import modes

    assert modes(ctx["model"]) == ctx["modes"], modes(ctx["model"])


def _check_masks_kept(ctx, _):
    assert ctx["cb"].masks is ctx["cb_masks"]  # the callback's masks are the ones before the step


CASES = [
    Fault(
        "optimizer refuses the new masks after pruning",
        _training_callback,
        _optimizer_refuses_masks,
        RuntimeError,
        "refused",
        watch=("model", "opt"),
        check=_check_masks_kept,
    ),
    Fault(
        "pruning step keeps each module's train/eval mode",
        _obert_callback,
        _prune_step(),
        check=_check_modes,
    ),
    Fault(
        "pruning step that fails keeps each module's train/eval mode",
        _obert_callback,
        _prune_step(loss_fn=ValueError("loss failed on purpose")),
        ValueError,
        "on purpose",
        watch=("model",),
        check=_check_modes,
    ),
    Fault(
        "final_sparsity given as a string",
        lambda p: {},
        lambda c: PruningCallback("obert", "0.8"),
        TypeError,
        "sparsity must be a real number",
    ),
    Fault(
        "a schedule number given as a string",
        lambda p: {},
        lambda c: PruningCallback("obert", 0.8, frequency="100"),
        TypeError,
        "frequency must be a real number",
    ),
    Fault(
        "truncated masks file",
        _truncate,
        lambda c: c["cb"].load_state(str(c["folder"])),
        ValueError,
        CHECKPOINT_MASKS_NAME,
        watch=("cb_masks", "folder"),
    ),
    Fault(
        "garbage state file",
        _garbage_state,
        lambda c: c["cb"].load_state(str(c["folder"])),
        ValueError,
        "pruning state",
        watch=("cb_masks", "folder"),
    ),
    Fault(
        "save interrupted by a full disk",
        _callback,
        _interrupted_save,
        OSError,
        "No space",
        watch=("cb_masks", "folder"),
    ),
]
