"""Fault rows for the optimizer side: the gradient window (DynamicMFAC), MFAC / ShardedMFAC steps
and checkpoints, the window shard files, and MFACTrainingArguments / MFACTrainer.

A gradient the window cannot hold (NaN/inf, values beyond the storage dtype's range, products that
overflow, a factorisation that fails, a non-finite result, an interrupt in the middle) must leave
the window, the momentum and the parameters bit for bit as they were, whether the step raises or
(``nonfinite="skip"``) is skipped; a corrupt checkpoint must be refused before anything changes,
naming what is wrong; a bad argument must be refused when the object is built, naming the argument
or flag.
"""
from __future__ import annotations

import copy
import pathlib
import types
import warnings
from unittest import mock

import torch
from test_faults import Fault

import hf_mfac
from hf_mfac import kernels
from hf_mfac.core import DynamicMFAC, ihvp
from hf_mfac.core.ihvp import GradientRejected
from hf_mfac.integrations.trainer import HubUnreachableError
from hf_mfac.optim import ShardedMFAC
from hf_mfac.optim.distributed import load_mfac_shards, save_mfac_shards

M, D = 4, 29  # d not a multiple of 8: the window rows are padded


def window(tmp, storage=torch.float32, n=6, seed=0):
    """A DynamicMFAC over D coordinates that has seen ``n`` gradients (full when n >= M), factor
    cached."""
    gen = torch.Generator().manual_seed(seed)
    dyn = DynamicMFAC(D, M, 0.05, grad_dtype=storage)
    for _ in range(n):
        dyn.update(torch.randn(D, generator=gen))
    dyn.mul(torch.ones(D))
    return {"window": dyn, "g": torch.randn(D, generator=gen)}


def poisoned(ctx, value, where=-1):
    g = ctx["g"].clone()
    g[where] = value
    return g


def update_row(storage, value, n=6, op="update_mul"):
    return lambda tmp: window(tmp, storage, n), lambda c: getattr(c["window"], op)(
        poisoned(c, value)
    )


def saved_window(tmp, **change):
    """A valid window and a copy of its state with ``change`` applied (values or callables on the
    copy)."""
    ctx = window(tmp, n=3)  # not full: ptr == count == 3
    state = copy.deepcopy(ctx["window"].state_dict())
    for k, v in change.items():
        state[k] = v(state) if callable(v) else v
    target = DynamicMFAC(D, M, 0.05)
    ctx["window"].update(torch.ones(D))  # the target holds something of its own that must stay
    target.load_state_dict(copy.deepcopy(ctx["window"].state_dict()))
    return {"target": target, "state": state}


def scaled_diag(s):
    s["GGt"] = s["GGt"].clone()
    s["GGt"][1, 1] *= 1.5
    return s["GGt"]


def asymmetric(s):
    s["GGt"] = s["GGt"].clone()
    s["GGt"][0, 2] += 1e-3
    return s["GGt"]


def nan_in(name, i=1):
    def fn(s):
        t = s[name].clone()
        t.view(-1)[i] = float("nan")
        return t
    return fn


def load_row(id_, match, **change):
    return Fault(
        id_,
        lambda tmp: saved_window(tmp, **change),
        lambda c: c["target"].load_state_dict(c["state"]),
        ValueError,
        match,
    )


# -- MFAC
# ------------------------------------------------------------------------------------------------
def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def backward(model, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def trained(tmp, cls=hf_mfac.MFAC, steps=3, **kw):
    model = net()
    kw = {"lr": 0.02, "num_grads": 3, "damp": 0.1, "momentum": 0.5, **kw}
    opt = cls(model.parameters(), **kw)
    for i in range(steps):
        backward(model, opt, i)
        opt.step()
    return {"model": model, "opt": opt}


def poisoned_step(value):
    def act(c):
        backward(c["model"], c["opt"], 9)
        c["model"][2].bias.grad[1] = value
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c["opt"].step()
        return caught
    return act


def warned(match):
    def check(ctx, caught):
        assert any(
            issubclass(w.category, RuntimeWarning) and match in str(w.message) for w in caught
        ), caught
    return check


def dense_into_compressed(tmp):
    """A dense MFAC's checkpoint, and a trained compressed MFAC (density 0.3) to load it into."""
    saved = copy.deepcopy(trained(tmp)["opt"].state_dict())
    return {**trained(tmp, density=0.3), "saved": saved}


def corrupt_checkpoint(fn):
    def build(tmp):
        ctx = trained(tmp)
        saved = copy.deepcopy(ctx["opt"].state_dict())
        saved["param_groups"][0]["lr"] = 0.5  # would change if the load went half way
        fn(saved)
        return {**ctx, "saved": saved}
    return build


def set_(path, value):
    def fn(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return fn


def nan_row(G):
    G = G.clone()
    G[2, 5] = float("nan")
    return G


def build_args(tmp):
    return {"params": [torch.nn.Parameter(torch.zeros(3))]}


def bad_arg(id_, error, match, **kw):
    return Fault(id_, build_args, lambda c: hf_mfac.MFAC(c["params"], **kw), error, match)


def shard_folder(tmp, corrupt=None):
    """A single-process ShardedMFAC saved to tmp/shards (optionally corrupted), and a trained plain
    MFAC to load into (its own window must stay)."""
    src = trained(tmp, ShardedMFAC)
    folder = tmp / "shards"
    save_mfac_shards(src["opt"], str(folder), global_step=3)
    if corrupt is not None:
        path = folder / "mfac_shard_0.pt"
        state = torch.load(path, weights_only=True)
        corrupt(state["window"])
        torch.save(state, path)
    dst = trained(tmp, steps=2)
    return {**dst, "folder": folder}


# -- training arguments
# ----------------------------------------------------------------------------------------
def args_row(id_, match, **overrides):
    def act(c):
        from hf_mfac.integrations import MFACTrainingArguments

        base = dict(output_dir=str(c["out"]), optim="mfac", use_cpu=True, report_to="none")
        return MFACTrainingArguments(**{**base, **overrides})
    return Fault(id_, lambda tmp: {"out": tmp / "out"}, act, ValueError, match)


def other_shapes(tmp, shapes=((8, 4), (2,)), dtype=torch.float32, momentum=0.0):
    """An MFAC over (4, 8) + (2,) parameters (its state saved) and a trained one over ``shapes``
    to load it into: as many coordinates, the same layout, other shapes or dtype."""
    def make(shapes, dtype, steps):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = hf_mfac.MFAC(params, lr=0.01, num_grads=2, damp=0.1, momentum=momentum)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return params, opt

    _, src = make(((4, 8), (2,)), torch.float32, 3)
    params, opt = make(shapes, dtype, 2)
    return {"params": params, "opt": opt, "saved": copy.deepcopy(src.state_dict())}


def other_shapes_shards(tmp):
    """Window shard files of a ShardedMFAC over (4, 8) + (2,), a trained MFAC over (8, 4) + (2,)."""
    src = ShardedMFAC([torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(2))],
                      lr=0.01, num_grads=2, damp=0.1)
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    save_mfac_shards(src, str(tmp / "shards"))
    return {**other_shapes(tmp), "folder": tmp / "shards"}


def load_saved(c):
    return c["opt"].load_state_dict(c["saved"])


def complex_group(tmp):
    ctx = trained(tmp)
    return {**ctx, "z": torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))}


def offline_push(tmp):
    import transformers.trainer as hf_trainer
    from transformers import BertConfig, BertForSequenceClassification

    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=2,
        )
    )
    args = MFACTrainingArguments(
        output_dir=str(tmp / "out"),
        optim="mfac",
        mfac_num_grads=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = MFACTrainer(model=model, args=args)
    from huggingface_hub.errors import OfflineModeIsEnabled

    def refuse(*a, **k):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    patch = mock.patch.object(
        hf_trainer,
        "hf_api",
        lambda: types.SimpleNamespace(create_repo=refuse, upload_folder=refuse),
    )
    return {"model": model, "trainer": trainer, "patch": patch}


def push(c):
    with c["patch"]:
        c["trainer"].push_to_hub()


def pushed_locally(ctx, error):
    out = ctx["trainer"].args.output_dir
    assert "HF_HUB_OFFLINE" in str(error) and f"saved locally in {out!r}" in str(error)
    assert (pathlib.Path(out) / "config.json").is_file()


def _with_patch(target, name, value, call):
    with mock.patch.object(target, name, value):
        return call()


def failing_cholesky(*a, **k):
    raise FloatingPointError("Cholesky failed even after adding 1e+08 times the damping")


def interrupted(*a, **k):
    raise KeyboardInterrupt


CASES = [
    # -- DynamicMFAC: gradients the window refuses
    # --------------------------------------------------------------
    Fault(
        "window_update_fp16_overflow",
        *update_row(torch.float16, 7e4, op="update"),
        GradientRejected,
        r"range of the window's storage dtype torch\.float16 \(\|x\| > 65504\)",
    ),
    Fault(
        "window_update_mul_fp16_overflow_filling",
        *update_row(torch.float16, -7e4, n=2),
        GradientRejected,
        r"torch\.float16",
    ),
    Fault(
        "window_update_mul_bf16_overflow",
        *update_row(torch.bfloat16, 3.4e38),
        GradientRejected,
        r"torch\.bfloat16",
    ),
    Fault(
        "window_update_mul_fp32_huge",
        *update_row(torch.float32, 1e20),
        GradientRejected,
        r"products G g",
    ),
    Fault(
        "window_update_mul_nan",
        *update_row(torch.float32, float("nan")),
        GradientRejected,
        r"NaN or inf",
    ),
    Fault(
        "window_update_mul_inf",
        *update_row(torch.bfloat16, float("inf"), n=2),
        GradientRejected,
        r"NaN or inf",
    ),
    Fault(
        "window_update_failed_factorisation",
        lambda tmp: window(tmp),
        lambda c: _with_patch(
            ihvp, "damped_cholesky", failing_cholesky, lambda: c["window"].update(c["g"])
        ),
        GradientRejected,
        r"could not be factorised",
    ),
    Fault(
        "window_update_mul_nonfinite_result",
        lambda tmp: window(tmp),
        lambda c: _with_patch(
            kernels,
            "window_rmatvec",
            lambda G, x, a=None: torch.full((G.shape[1],), float("inf")),
            lambda: c["window"].update_mul(c["g"]),
        ),
        GradientRejected,
        r"F\^\{-1\} g is not finite",
    ),
    Fault(
        "window_update_interrupted_after_write",
        lambda tmp: window(tmp),
        lambda c: _with_patch(
            kernels, "window_matvec", interrupted, lambda: c["window"].update_mul(c["g"])
        ),
        KeyboardInterrupt,
    ),
    Fault(
        "window_update_wrong_size",
        lambda tmp: window(tmp),
        lambda c: c["window"].update(torch.ones(D + 1)),
        ValueError,
        r"dim=29",
    ),
    # -- DynamicMFAC: checkpoints it refuses
    # --------------------------------------------------------------------
    load_row("load_nonfinite_G", r"G holds NaN or inf values \(first in row 0\)", G=nan_in("G")),
    load_row("load_nonfinite_GGt", r"GGt holds NaN or inf values", GGt=nan_in("GGt")),
    load_row("load_count_too_large", r"count=5 is outside \[0, num_grads=4\]", count=5),
    load_row("load_count_negative", r"count=-1 is outside", count=-1),
    load_row("load_ptr_out_of_range", r"ptr=4 is outside \[0, num_grads=4\)", ptr=4, count=4),
    load_row("load_ptr_not_after_count", r"ptr=1 does not follow count=3", ptr=1),
    load_row("load_count_not_an_integer", r"count and ptr must be integers", count=2.5),
    load_row("load_ggt_diagonal_mismatch", r"GGt does not match G: GGt\[1, 1\]", GGt=scaled_diag),
    load_row("load_ggt_asymmetric", r"GGt\[:count, :count\] is not symmetric", GGt=asymmetric),
    load_row(
        "load_G_wrong_shape",
        r"G has shape \(4, 30\); this DynamicMFAC holds \(4, 29\)",
        G=lambda s: torch.zeros(M, D + 1),
    ),
    load_row("load_GGt_missing", r"GGt is missing", GGt=None),
    load_row(
        "load_G_integer",
        r"G has dtype torch\.int64",
        G=lambda s: torch.zeros(M, D, dtype=torch.long),
    ),
    # -- MFAC / ShardedMFAC steps
    # ------------------------------------------------------------------------------
    Fault(
        "mfac_step_fp16_window_overflow_raises",
        lambda tmp: trained(tmp, grad_dtype=torch.float16),
        poisoned_step(7e4),
        GradientRejected,
        r"MFAC: g has values beyond the range .*torch\.float16",
    ),
    Fault(
        "mfac_step_fp16_window_overflow_skipped",
        lambda tmp: trained(tmp, grad_dtype=torch.float16, nonfinite="skip"),
        poisoned_step(7e4),
        check=warned("torch.float16"),
        unchanged=True,
    ),
    Fault(
        "mfac_step_huge_gradient_skipped",
        lambda tmp: trained(tmp, nonfinite="skip"),
        poisoned_step(1e20),
        check=warned("products G g"),
        unchanged=True,
    ),
    Fault(
        "mfac_step_nan_skipped_bf16",
        lambda tmp: trained(tmp, grad_dtype=torch.bfloat16, nonfinite="skip"),
        poisoned_step(float("nan")),
        check=warned("NaN or inf"),
        unchanged=True,
    ),
    Fault(
        "mfac_step_inf_raises",
        lambda tmp: trained(tmp),
        poisoned_step(float("-inf")),
        FloatingPointError,
        r"NaN or inf.*unchanged",
    ),
    Fault(
        "sharded_mfac_step_fp16_overflow_skipped",
        lambda tmp: trained(tmp, ShardedMFAC, grad_dtype=torch.float16, nonfinite="skip"),
        poisoned_step(-1e5),
        check=warned("torch.float16"),
        unchanged=True,
    ),
    Fault(
        "mfac_compressed_step_nan_skipped",
        lambda tmp: trained(tmp, density=0.3, nonfinite="skip"),
        poisoned_step(float("nan")),
        check=warned("NaN or inf"),
        unchanged=True,
    ),
    Fault(
        "mfac_compressed_step_fp16_overflow_raises",
        lambda tmp: trained(tmp, density=0.3, grad_dtype=torch.float16),
        poisoned_step(7e4),
        GradientRejected,
        r"kept values of g exceed the range .*torch\.float16",
    ),
    # -- MFAC checkpoints
    # --------------------------------------------------------------------------------------
    Fault(
        "mfac_load_dense_window_into_compressed",
        dense_into_compressed,
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"window is dense \(density=1\.0\) but this optimizer's is compressed \(density=0\.3\)",
    ),
    Fault(
        "mfac_load_nonfinite_window",
        corrupt_checkpoint(set_(("mfac", "window", "G"), nan_row)),
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"G holds NaN or inf values \(first in row 2\)",
    ),
    Fault(
        "mfac_load_window_count_out_of_range",
        corrupt_checkpoint(set_(("mfac", "window", "count"), 7)),
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"count=7 is outside",
    ),
    Fault(
        "mfac_load_other_layout",
        corrupt_checkpoint(set_(("mfac", "layout"), lambda v: v[::-1])),
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"built over other parameters",
    ),
    Fault(
        "mfac_load_mask_wrong_shape",
        corrupt_checkpoint(set_(("mfac", "masks"), {0: torch.ones(2, 2)})),
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"mask for parameter 0 has shape \(2, 2\)",
    ),
    Fault(
        "mfac_load_mask_unknown_parameter",
        corrupt_checkpoint(set_(("mfac", "masks"), {9: torch.ones(3)})),
        lambda c: c["opt"].load_state_dict(c["saved"]),
        ValueError,
        r"mask for parameter 9",
    ),
    Fault(
        "mfac_load_other_shapes",
        other_shapes,
        load_saved,
        ValueError,
        r"parameter 0, param_groups\[0\]\['params'\]\[0\]: it was saved for shape \(4, 8\), "
        r"float32; this one has shape \(8, 4\)",
    ),
    Fault(
        "mfac_load_other_dtype",
        lambda tmp: other_shapes(tmp, ((4, 8), (2,)), torch.float64, momentum=0.5),
        load_saved,
        ValueError,
        r"saved for shape \(4, 8\), float32; this one has shape \(4, 8\), float64",
    ),
    Fault(
        "shards_load_other_shapes",
        other_shapes_shards,
        lambda c: load_mfac_shards(c["opt"], str(c["folder"])),
        ValueError,
        r"parameter 0, .*saved for shape \(4, 8\)",
    ),
    Fault(
        "shards_load_corrupt_window",
        lambda tmp: shard_folder(tmp, lambda w: w.update(count=9)),
        lambda c: load_mfac_shards(c["opt"], str(c["folder"])),
        ValueError,
        r"count=9 is outside",
    ),
    Fault(
        "shards_load_ggt_of_other_window",
        lambda tmp: shard_folder(tmp, lambda w: w.update(GGt=w["GGt"] * 2)),
        lambda c: load_mfac_shards(c["opt"], str(c["folder"])),
        ValueError,
        r"GGt does not match G",
    ),
    Fault(
        "shards_load_missing_folder",
        lambda tmp: {**trained(tmp), "folder": tmp / "none"},
        lambda c: load_mfac_shards(c["opt"], str(c["folder"])),
        FileNotFoundError,
        r"no M-FAC window shards",
    ),
    Fault(
        "shards_load_wrong_step",
        lambda tmp: shard_folder(tmp),
        lambda c: load_mfac_shards(c["opt"], str(c["folder"]), expect_meta={"global_step": 4}),
        ValueError,
        r"global_step=3, expected 4",
    ),
    # -- MFAC arguments
    # ----------------------------------------------------------------------------------------
    bad_arg("mfac_lr_nan", ValueError, r"^lr must be a finite number; got nan", lr=float("nan")),
    bad_arg("mfac_lr_inf", ValueError, r"^lr must be a finite number", lr=float("inf")),
    bad_arg(
        "mfac_lr_string", TypeError, r"^lr must be a real number; got '0\.1' \(str\)", lr="0.1"
    ),
    bad_arg(
        "mfac_weight_decay_nan",
        ValueError,
        r"^weight_decay must be a finite",
        weight_decay=float("nan"),
    ),
    bad_arg(
        "mfac_weight_decay_inf",
        ValueError,
        r"^weight_decay must be a finite",
        weight_decay=float("inf"),
    ),
    bad_arg("mfac_momentum_nan", ValueError, r"^momentum must be a finite", momentum=float("nan")),
    bad_arg("mfac_damp_inf", ValueError, r"^damp must be a finite", damp=float("inf")),
    bad_arg("mfac_damp_nan", ValueError, r"^damp must be a finite", damp=float("nan")),
    bad_arg(
        "mfac_num_grads_none", TypeError, r"^num_grads must be an integer; got None", num_grads=None
    ),
    bad_arg(
        "mfac_num_grads_fraction",
        ValueError,
        r"^num_grads must be an integer; got 2\.5",
        num_grads=2.5,
    ),
    bad_arg("mfac_density_zero", ValueError, r"^density must be > 0; got 0", density=0),
    bad_arg(
        "mfac_density_nan", ValueError, r"^density must be a finite number", density=float("nan")
    ),
    bad_arg(
        "mfac_density_bool", TypeError, r"^density must be a real number; got True", density=True
    ),
    bad_arg(
        "mfac_grad_dtype_int8",
        ValueError,
        r"grad_dtype must be float16, bfloat16",
        grad_dtype="int8",
    ),
    Fault(
        "mfac_param_group_lr_nan",
        lambda tmp: trained(tmp),
        lambda c: c["opt"].add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": float("nan")}
        ),
        ValueError,
        r"param_groups\[1\]: lr must be a finite number",
    ),
    Fault(
        "mfac_complex_parameter",
        complex_group,
        lambda c: hf_mfac.MFAC([c["z"]]),
        TypeError,
        r"param_groups\[0\]\['params'\]\[0\] is complex.*view_as_real",
    ),
    Fault(
        "mfac_param_group_complex",
        complex_group,
        lambda c: c["opt"].add_param_group({"params": [c["z"]]}),
        TypeError,
        r"param_groups\[1\]\['params'\]\[0\] is complex \(torch\.complex64",
    ),
    # -- MFACTrainingArguments / MFACTrainer
    # -------------------------------------------------------------------
    args_row(
        "args_num_grads_negative",
        r"--mfac_num_grads must be an integer >= 1; got -4",
        mfac_num_grads=-4,
    ),
    args_row("args_damp_negative", r"--mfac_damp must be > 0", mfac_damp=-1.0),
    args_row(
        "args_grad_dtype_int8",
        r"--mfac_grad_dtype must be one of float32, bfloat16, float16; got 'int8'",
        mfac_grad_dtype="int8",
    ),
    args_row("args_density_above_one", r"--mfac_density must be <= 1; got 1\.5", mfac_density=1.5),
    args_row(
        "args_learning_rate_nan",
        r"--learning_rate must be a finite number",
        learning_rate=float("nan"),
    ),
    args_row(
        "args_optim_args_not_an_integer",
        r"--optim_args ngrads must be an integer; got 'abc'",
        optim_args="ngrads=abc",
    ),
    args_row(
        "args_optim_args_bad_json", r"--optim_args is not valid JSON", optim_args='{"ngrads": 64,}'
    ),
    args_row(
        "args_optim_args_unknown_key",
        r"--optim_args: unknown M-FAC key 'beta1'",
        optim_args="beta1=0.9",
    ),
    args_row(
        "args_optim_typo_lists_choices",
        r"--optim 'mfca' is not a known optimizer; choose one of: mfac, ",
        optim="mfca",
    ),
    Fault(
        "trainer_push_to_hub_offline",
        offline_push,
        push,
        raises=HubUnreachableError,
        match=r"could not reach the Hugging Face Hub to create the repository "
              r"\(OfflineModeIsEnabled",
        check=pushed_locally,
        watch=("model",),
    ),
]
