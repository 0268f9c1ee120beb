"""Model cards parse back through huggingface_hub, update existing cards, and reach a local fake
Hub; nothing secret reaches them and no user string breaks them."""
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, RepoUrl  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
)

from hf_mfac.core.masks import threshold_masks  # noqa: E402
from hf_mfac.integrations import create_sparse_model_card, save_sparse_pretrained  # noqa: E402
from hf_mfac.integrations.card import PLOT_NAME, push_sparse_to_hub  # noqa: E402
from hf_mfac.integrations.checkpoint.redaction import redacted_command, redact_argv  # noqa: E402
from hf_mfac.integrations.checkpoint import MASKS_NAME, load_sparse_masks  # noqa: E402

CFG = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=2,
)
PNG = b"\x89PNG\r\n\x1a\n"


def pruned_model(sparsity=0.75):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CFG)).eval()
    weights = {
        n: p
        for n, p in model.named_parameters()
        if n.startswith("bert.encoder") and n.endswith("dense.weight")
    }
    masks = threshold_masks(
        {n: p.detach().abs() for n, p in weights.items()}, sparsity, scope="layer"
    )
    with torch.no_grad():
        for n, p in weights.items():
            p.mul_(masks[n])
    return model, masks


def section(text):
    return text[text.index("<!-- hf_mfac:start") : text.index("<!-- hf_mfac:end -->")]


def test_card_metadata_parses_back(tmp_path):
    model, masks = pruned_model()
    save_sparse_pretrained(
        model, tmp_path, masks, method="obert", recipe={"sparsity": 0.75, "block_size": 32}
    )
    card = create_sparse_model_card(
        tmp_path,
        base_model="google/bert_uncased_L-2_H-128_A-2",
        datasets=["glue"],
        dataset_config="sst2",
        dataset_split="validation",
        eval_results={"accuracy": 0.875, "f1": 0.86},
        license="apache-2.0",
        mfac={"num_grads": 64, "damp": 1e-6, "lr": 2e-3},
        command="hf-mfac prune --method obert --sparsity 0.75",
    )
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    data = loaded.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert {"sparse", "pruned", "m-fac", "obert", "hf_mfac"} <= set(data.tags)
    assert data.base_model == "google/bert_uncased_L-2_H-128_A-2" and data.datasets == ["glue"]
    assert data.pipeline_tag == "text-classification" and sorted(data.metrics) == ["accuracy", "f1"]
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == 0.875 and results["f1"].metric_value == 0.86
    assert (
        results["accuracy"].dataset_config == "sst2"
        and results["accuracy"].dataset_split == "validation"
    )
    assert (
        results["accuracy"].task_type == "text-classification" and data.model_name == tmp_path.name
    )
    text = section(loaded.text)
    for name, mask in masks.items():  # one table row per layer, with its exact pruned count
        assert (
            f"| `{name}` | {mask.shape[0]}×{mask.shape[1]} | 75.00% | "
            f"{int((~mask).sum())} / {mask.numel()} |"
        ) in text
    assert "AutoModelForSequenceClassification" in text and f"]({PLOT_NAME})" in text
    assert "block_size: 32" in text and "hf-mfac prune --method obert" in text
    assert "| `num_grads` | 64 |" in text and "| `damp` | 1e-06 |" in text
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(PNG)


def test_card_without_metrics_is_marked_and_valid(tmp_path):
    model, masks = pruned_model()
    create_sparse_model_card(tmp_path / "a", model=model, masks=masks)
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert (
        "model_name" not in card.data.to_dict()
        and "**No evaluation results were provided.**" in card.text
    )
    # metrics but no dataset: shown in the text, kept out of the metadata
    create_sparse_model_card(
        tmp_path / "b", model=model, masks=masks, eval_results={"accuracy": 0.5}
    )
    card = ModelCard.load(tmp_path / "b" / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "| accuracy | 0.5 |" in card.text and "no dataset was named" in card.text
    # explicit EvalResult objects go to model-index as they are
    r = EvalResult(
        task_type="text-classification",
        dataset_type="imdb",
        dataset_name="IMDb",
        metric_type="accuracy",
        metric_value=0.9,
    )
    card = create_sparse_model_card(model=model, masks=masks, eval_results=[r], model_name="x")
    assert ModelCard(card.content).data.eval_results == [r]


def test_dense_model_card(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CFG))
    card = create_sparse_model_card(tmp_path, model=model, mfac={"num_grads": 32})
    assert "sparse" not in card.data.tags and "m-fac" in card.data.tags
    assert "This model is dense" in card.text and not (tmp_path / PLOT_NAME).exists()


def test_existing_card_is_updated_not_clobbered(tmp_path):
    model, masks = pruned_model()
    save_sparse_pretrained(model, tmp_path, masks, method="cap")
    readme = tmp_path / "README.md"
    readme.write_text(
        "---\nlicense: mit\nlanguage: en\ntags:\n- my-tag\n---\n\n# My model\n\nMy own notes.\n"
    )
    create_sparse_model_card(tmp_path, eval_results={"accuracy": 0.7}, datasets="glue")
    first = readme.read_text()
    create_sparse_model_card(tmp_path, eval_results={"accuracy": 0.8}, datasets="glue")
    card = ModelCard.load(readme)
    assert card.data.license == "mit" and card.data.language == "en"
    assert (
        card.data.tags[0] == "my-tag"
        and "sparse" in card.data.tags
        and card.data.tags.count("sparse") == 1
    )
    assert card.data.eval_results[0].metric_value == 0.8
    assert (
        card.text.startswith("\n# My model\n\nMy own notes.\n")
        and card.text.count("<!-- hf_mfac:start") == 1
    )
    assert "0.8" in section(card.text) and "0.7" in section(first)
    # text the user adds after our section survives regeneration too
    readme.write_text(readme.read_text() + "\n## Citation\n\nPlease cite us.\n")
    create_sparse_model_card(tmp_path)
    text = ModelCard.load(readme).text
    assert text.rstrip().endswith("Please cite us.") and "My own notes." in text


def test_broken_existing_yaml_is_refused_untouched(tmp_path):
    model, masks = pruned_model()
    save_sparse_pretrained(model, tmp_path, masks)
    broken = "---\ntags: [sparse\n---\n# hand-written\n"
    (tmp_path / "README.md").write_text(broken)
    with pytest.raises(Exception):
        create_sparse_model_card(tmp_path)
    assert (tmp_path / "README.md").read_text() == broken


def test_redacted_command():
    cmd = redacted_command(
        ["run.py", "--hub_token", "hf_abc", "--lr", "1e-3", "--api_secret=xyz", "--x", "1"]
    )
    assert (
        "hf_abc" not in cmd
        and "xyz" not in cmd
        and "--lr 1e-3" in cmd
        and "--hub_token '***'" in cmd
    )


TOKEN = "hf_" + "Ab3xYz9Q" * 5  # shaped like a Hugging Face token (hf_ + 40 letters and digits)
# (argv, what must not appear, what must stay)
ARGV = [
    (["--hub_token", TOKEN], [TOKEN], ["--hub_token"]),
    (["--hub-token=s3cr3t"], ["s3cr3t"], ["--hub-token=***"]),
    (["--HUB_TOKEN", "s3cr3t"], ["s3cr3t"], []),
    ([f"HF_TOKEN={TOKEN}", "run.py"], [TOKEN], ["HF_TOKEN=***", "run.py"]),
    (["WANDB_API_KEY=abc123", "run.py"], ["abc123"], ["WANDB_API_KEY=***"]),
    (["--api_key", "abc123"], ["abc123"], ["--api_key"]),
    (["--apiKey=abc123"], ["abc123"], []),
    (["--auth", "user:pw"], ["user:pw"], ["--auth"]),
    (["--credentials", "/secure/creds.json"], ["creds.json"], ["--credentials"]),
    (["--passwd=hunter2"], ["hunter2"], ["--passwd=***"]),
    (["--db-password", "hunter2"], ["hunter2"], []),
    (["--client_secret", "qqq-777"], ["qqq-777"], []),
    (["--aws-secret-access-key", "AKIAxyz"], ["AKIAxyz"], []),
    (
        ["--model_name_or_path", "https://alice:pw123@host.example/m.bin"],
        ["alice", "pw123"],
        ["https://***@host.example/m.bin"],
    ),
    (["--data", "git+https://ghp_tok@github.com/o/r.git"], ["ghp_tok"], ["github.com/o/r.git"]),
    (["--url", "https://host.example/p?access_token=zzz&split=train"], ["zzz"], ["split=train"]),
    (
        ["--optim_args", '{"num_grads": 64, "api_key": "zzz", "damp": 1e-06}'],
        ["zzz"],
        ["num_grads", "damp"],
    ),
    (['--optim_args={"Token": "zzz", "lr": 0.1}'], ["zzz"], ["lr"]),
    (
        ["--optim_args", '{"nested": {"password": "zzz"}, "list": ["' + TOKEN + '"]}'],
        ["zzz", TOKEN],
        ["nested"],
    ),
    (
        ["--optim_args", "num_grads=64,auth_token=zzz,damp=1e-6"],
        ["zzz"],
        ["num_grads=64", "damp=1e-6"],
    ),
    (["--optim_args", "{'secret': 'zzz', 'x': 1}"], ["zzz"], ["'x': 1"]),
    (["--note", f"token is {TOKEN} ok"], [TOKEN], ["token is"]),
    (["--run_name", f"x{TOKEN}"], [TOKEN], []),
    (
        ["--use_auth_token", "--do_train", "--output_dir", "out"],
        [],
        ["--use_auth_token --do_train --output_dir out"],
    ),
    (["--lr", "1e-3", "--hub_token"], [], ["--lr 1e-3 --hub_token"]),
    (
        ["--push_to_hub", "--hub_model_id", "me/m", "--report_to", "none"],
        [],
        ["--push_to_hub --hub_model_id me/m --report_to none"],
    ),
    (["--learning_rate=2e-5", "--max_steps", "10"], [], ["--learning_rate=2e-5 --max_steps 10"]),
]


@pytest.mark.parametrize("argv,hidden,kept", ARGV, ids=[" ".join(a)[:40] for a, _, _ in ARGV])
def test_redaction_by_rule(argv, hidden, kept, tmp_path):
    cmd = redacted_command(["run.py", *argv])
    words = shlex.split(cmd)
    assert len(words) == len(argv) + 2  # one word per argv word
    for h in hidden:
        assert h not in cmd, cmd
    for k in kept:
        assert k in " ".join(words), cmd
    # the same rule for a command given as one string, and wherever the card shows it
    model, masks = pruned_model()
    card = create_sparse_model_card(
        model=model, masks=masks, model_name="x", command=shlex.join(["python", *argv])
    )
    for h in hidden:
        assert h not in card.content
    assert redact_argv(argv) == shlex.split(cmd)[2:]


def test_secrets_in_recipe_and_hyperparameters_are_redacted(tmp_path):
    model, masks = pruned_model()
    recipe = {
        "sparsity": 0.75,
        "hub_token": TOKEN,
        "source": "https://u:p@host.example/d",
        "note": f"k {TOKEN}",
    }
    save_sparse_pretrained(
        model, tmp_path, masks, recipe=recipe, extra_metadata={"api_key": "zzz", "ok": 1}
    )
    create_sparse_model_card(
        tmp_path,
        mfac={"num_grads": 4, "secret": "zzz"},
        training={"auth": "zzz"},
        description=f"Made with {TOKEN}.",
    )
    for name in ("README.md", "config.json"):
        text = (tmp_path / name).read_text()
        assert TOKEN not in text and "zzz" not in text and "u:p@" not in text, name
    rec = json.loads((tmp_path / "config.json").read_text())["hf_mfac_sparsity"]
    assert (
        rec["recipe"]["sparsity"] == 0.75 and rec["recipe"]["hub_token"] == "***" and rec["ok"] == 1
    )
    assert rec["recipe"]["source"] == "https://***@host.example/d"


# user strings that look like markdown, YAML or hf_mfac's markers: quoted in the metadata, escaped
# in the text
HOSTILE = {
    "method": "obert <!-- hf_mfac:end --> | **x**",
    "base_model": "org/m: 'q' \"d\" --- #x",
    "datasets": ["glue: x", "---", "<!-- hf_mfac:start -->"],
    "dataset_name": "name | with <b>html</b> <!-- hf_mfac:end -->",
    "dataset_split": "'split'",
    "tags": ["- item", "{a: 1}", "<!-- hf_mfac:end -->"],
    "repo_id": 'me/x"y`z',
    "model_name": "# title <!-- hf_mfac:start",
    "recipe": "```\n<!-- hf_mfac:end -->\n```",
    "mfac": {"num_grads`|": "<!-- hf_mfac:end -->", "lr": 0.1},
    "eval_results": {"acc <!-- hf_mfac:end -->": 0.5, "f1: x": 0.25},
    "command": "python run.py --sep '<!-- hf_mfac:end -->' --fence '````'",
}


def test_hostile_strings_cannot_break_the_card(tmp_path):
    model, masks = pruned_model()
    save_sparse_pretrained(model, tmp_path, masks)
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: mit\n---\n# Mine\n\nBefore.\n")
    for _ in range(2):  # the second run updates the card the first one wrote
        create_sparse_model_card(tmp_path, **HOSTILE)
        readme.write_text(readme.read_text() + "\nAfter, by hand.\n")
    text = readme.read_text()
    card = ModelCard.load(readme)
    assert (
        card.text.count("<!-- hf_mfac:start") == 1 and card.text.count("<!-- hf_mfac:end -->") == 1
    )
    assert "Before." in card.text and card.text.count("After, by hand.") == 2
    data = card.data
    assert data.base_model == HOSTILE["base_model"] and data.license == "mit"
    assert set(HOSTILE["datasets"]) <= set(data.datasets) and set(HOSTILE["tags"]) <= set(data.tags)
    assert {r.metric_type for r in data.eval_results} == set(HOSTILE["eval_results"])
    assert data.eval_results[0].dataset_name == HOSTILE["dataset_name"]
    assert 'from_pretrained("me/x\\"y\\u0060z")' in text  # a valid Python string literal
    body = section(card.text)
    assert "obert &lt;!-- hf_mfac:end --&gt; \\| **x**" in body
    for row in body.splitlines():  # every table row has exactly its columns
        if (
            row.startswith("| ")
            and "Tensor" not in row
            and "Hyperparameter" not in row
            and "Metric" not in row
        ):
            cells = re.split(r"(?<!\\)\|", row)[1:-1]
            assert len(cells) in (2, 4, 5), row


@pytest.mark.parametrize(
    "field,value",
    [
        ("base_model", "a\nb"),
        ("model_name", "x\r\n---"),
        ("license", "mit\n"),
        ("language", ["en", "fr\n"]),
        ("pipeline_tag", "x\u2029y"),
        ("dataset_config", "c\x00"),
    ],
)
def test_line_breaks_in_metadata_are_refused(tmp_path, field, value):
    model, masks = pruned_model()
    with pytest.raises(ValueError, match=f"{field}="):
        create_sparse_model_card(
            tmp_path / "card",
            model=model,
            masks=masks,
            datasets="glue",
            eval_results={"acc": 1.0},
            **{field: value},
        )
    assert not (tmp_path / "card").exists()


_SUBPROCESS = r"""
import json, os, sys, types
if sys.argv[1] == "checkout":  # a source checkout on sys.path, nothing installed
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, sys.argv[2])
    import importlib.util
    assert importlib.util.find_spec("hf_mfac._model_cards") is None
import torch
from hf_mfac.integrations.card import create_sparse_model_card
from hf_mfac.integrations.card.trainer_info import mfac_hparams
from hf_mfac.optim import MFAC

optimizer = MFAC([torch.nn.Parameter(torch.zeros(3))], lr=0.1, num_grads=2)
trainer = types.SimpleNamespace(args=types.SimpleNamespace(optim="sgd"), optimizer=optimizer)
hp = mfac_hparams(trainer)
rec = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, "model_sparsity": 0.25,
       "per_layer": {"w": {"shape": [2, 2], "num_pruned": 2, "sparsity": 0.5}}}
card = create_sparse_model_card(sparsity=rec, mfac=hp, model_name="tiny")
hf = sys.modules["hf_mfac"]
print(json.dumps({"package": getattr(hf, "__file__", None), "num_grads": hp["num_grads"],
                  "section": "<!-- hf_mfac:start" in card.text
                             and "| `num_grads` | 2 |" in card.text}))
"""


@pytest.mark.parametrize("mode", ["namespace", "checkout"])
def test_card_renders_from_a_checkout_and_beside_a_folder_named_hf_mfac(tmp_path, mode):
    """``namespace``: run from a folder holding a directory ``hf_mfac`` (with an editable install,
    ``hf_mfac`` then resolves as a namespace package); ``checkout``: the repository on ``sys.path``
    without installing, so ``hf_mfac._model_cards`` does not exist and the templates come from
    ``model_cards/``."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "hf_mfac").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, mode, str(repo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_grads"] == 2 and result["section"]
    if mode == "checkout":
        assert result["package"] == str(repo / "hf_mfac" / "__init__.py")


# -- a local fake of the Hub API
# -----------------------------------------------------------------------------


class FakeHub:
    """Stores repositories as folders under ``root``; patches the HfApi methods hf_mfac and Trainer
    use."""

    def __init__(self, root, monkeypatch):
        self.root, self.calls = root, []
        for name in ("create_repo", "upload_folder", "file_exists", "hf_hub_download"):
            monkeypatch.setattr(HfApi, name, getattr(self, name.replace("create_repo", "create")))
        monkeypatch.setattr(HfApi, "create_commit", self.refuse)

    def repo(self, repo_id):
        return self.root / repo_id.replace("/", "--")

    def create(self, repo_id, *, private=None, exist_ok=False, **_):
        repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"
        self.calls.append(("create_repo", repo_id, private))
        self.repo(repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        commit_message=None,
        ignore_patterns=None,
        allow_patterns=None,
        path_in_repo=None,
        **_,
    ):
        self.calls.append(("upload_folder", repo_id, commit_message))
        files = [
            os.path.relpath(os.path.join(d, f), folder_path)
            for d, _, fs in os.walk(folder_path)
            for f in fs
        ]
        ignore = list(ignore_patterns or []) + [".git/*", ".cache/huggingface/*"]
        for rel in filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=ignore
        ):
            dst = self.repo(repo_id) / (path_in_repo or "") / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(folder_path, rel), dst)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message=commit_message or "",
            commit_description="",
            oid="0" * 40,
        )

    def file_exists(self, repo_id, filename, **_):
        return (self.repo(repo_id) / filename).is_file()

    def hf_hub_download(self, repo_id, filename, **_):
        return str(self.repo(repo_id) / filename)

    def refuse(self, *a, **k):
        raise AssertionError("create_commit would contact the Hub")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hub", monkeypatch)


def test_push_sparse_to_hub(hub):
    model, masks = pruned_model()
    repo = hub.repo("me/tiny-sparse")
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# Tiny\n\nWritten by hand.\n")
    info = push_sparse_to_hub(
        model,
        "me/tiny-sparse",
        masks,
        method="magnitude",
        private=True,
        datasets="glue",
        eval_results={"accuracy": 0.6},
    )
    assert info.commit_url.endswith("/commit/0")
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][2] is True
    assert sorted(os.listdir(repo)) == sorted(
        ["README.md", "config.json", "model.safetensors", MASKS_NAME, PLOT_NAME]
    )
    card = ModelCard.load(repo / "README.md")
    assert (
        card.data.license == "mit"
        and "Written by hand." in card.text
        and "sparse" in card.data.tags
    )
    assert 'from_pretrained("me/tiny-sparse")' in card.text
    loaded = AutoModelForSequenceClassification.from_pretrained(repo).eval()
    x = torch.randint(0, CFG["vocab_size"], (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.config.hf_mfac_sparsity["method"] == "magnitude"


def test_push_refuses_dense_model_before_contacting_hub(hub):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no sparsity"):
        push_sparse_to_hub(BertForSequenceClassification(BertConfig(**CFG)), "me/dense")
    assert hub.calls == []


class MaskCallback(TrainerCallback):
    """Stand-in for a pruning callback: exposes ``masks``/``method``/``recipe`` and keeps pruned
    weights at 0."""

    method, recipe = "obert", {"sparsity": 0.75, "schedule": "cubic"}

    def __init__(self, model, masks):
        self.params = dict(model.named_parameters())
        self.masks = masks

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            for n, m in self.masks.items():
                self.params[n].mul_(m)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, CFG["vocab_size"], (n, 8), generator=g)
        self.y = (self.x[:, 0] % 2).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_trainer_push_to_hub_writes_hf_mfac_card(hub, tmp_path, monkeypatch):
    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "run_glue.py",
            f"HF_TOKEN={TOKEN}",
            "--hub_token",
            "s3cr3t",
            "--optim_args",
            '{"num_grads": 4, "api_key": "k3y"}',
            "--data",
            "https://u:pw@host.example/d",
        ],
    )
    model, masks = pruned_model()
    out = tmp_path / "run"
    args = MFACTrainingArguments(
        output_dir=str(out),
        optim="mfac",
        optim_args="num_grads=4,damp=1e-4",
        learning_rate=1e-3,
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        push_to_hub=True,
        hub_model_id="me/tiny-mfac",
        save_strategy="no",
        use_cpu=True,
    )
    acc = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    trainer = MFACTrainer(
        model=model,
        args=args,
        train_dataset=Pairs(),
        eval_dataset=Pairs(8),
        compute_metrics=acc,
        callbacks=[MaskCallback(model, masks)],
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub(
        dataset="local pairs", dataset_tags="pairs", finetuned_from="bert-tiny-local"
    )
    repo = hub.repo("me/tiny-mfac")
    assert {"README.md", "config.json", "model.safetensors", MASKS_NAME, PLOT_NAME} <= set(
        os.listdir(repo)
    )
    card = ModelCard.load(repo / "README.md")
    assert {"sparse", "pruned", "m-fac", "obert"} <= set(card.data.tags)
    assert card.data.base_model == "bert-tiny-local" and card.data.datasets == ["pairs"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert (
        results["accuracy"] == metrics["eval_accuracy"] and results["loss"] == metrics["eval_loss"]
    )
    assert "runtime" not in results and "samples_per_second" not in results
    assert "| `num_grads` | 4 |" in card.text and "schedule: cubic" in card.text
    assert 'from_pretrained("me/tiny-mfac")' in card.text
    readme = (repo / "README.md").read_text()
    assert "run_glue.py" in readme and all(
        x not in readme for x in (TOKEN, "s3cr3t", "k3y", "u:pw")
    )
    loaded = AutoModelForSequenceClassification.from_pretrained(repo)
    assert loaded.config.hf_mfac_sparsity["method"] == "obert"
    saved = load_sparse_masks(repo)
    for n, m in masks.items():
        assert torch.equal(saved[n], m) and bool((loaded.state_dict()[n][~m] == 0).all())


def test_trainer_push_with_pruning_callback(hub, tmp_path):
    from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments, PruningCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CFG))
    args = MFACTrainingArguments(
        output_dir=str(tmp_path / "run"),
        optim="mfac",
        optim_args="num_grads=4,damp=1e-4",
        learning_rate=1e-3,
        max_steps=3,
        per_device_train_batch_size=8,
        report_to=[],
        push_to_hub=True,
        hub_model_id="me/gradual",
        save_strategy="no",
        use_cpu=True,
    )
    callback = PruningCallback("magnitude", final_sparsity=0.5, start=0, end=2, frequency=1)
    trainer = MFACTrainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback])
    callback.attach(trainer)
    trainer.train()
    trainer.push_to_hub()
    repo = hub.repo("me/gradual")
    card = ModelCard.load(repo / "README.md")
    assert {"sparse", "pruned", "magnitude", "m-fac"} <= set(card.data.tags)
    assert (
        "final_sparsity: 0.5" in card.text
        and "**No evaluation results were provided.**" in card.text
    )
    record = AutoModelForSequenceClassification.from_pretrained(repo).config.hf_mfac_sparsity
    assert record["method"] == "magnitude" and record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert record["recipe"]["final_sparsity"] == 0.5 and record["pattern"] == "unstructured"
    saved = load_sparse_masks(repo)
    assert set(saved) == set(callback.masks) and all(
        torch.equal(saved[n], callback.masks[n].cpu()) for n in saved
    )


def test_trainer_card_logs_the_output_folder_not_the_staging_one(tmp_path, caplog):
    """The checkpoint and the card are written to a staging folder and moved into place; the "saved"
    line names the output folder, once, after the move."""
    import logging

    from hf_mfac.integrations import write_trainer_model_card

    model, masks = pruned_model()
    out = tmp_path / "run"
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    with caplog.at_level(logging.INFO, logger="hf_mfac"):
        write_trainer_model_card(trainer, masks=masks, method="magnitude")
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saved == [f"saved {out}: 75.00% sparsity over {len(masks)} tensors (unstructured)"]
    assert (out / "README.md").is_file() and (out / MASKS_NAME).is_file()


def test_card_of_a_compact_save_says_how_to_load_it(tmp_path):
    from hf_mfac.integrations import save_compact_pretrained

    model, masks = pruned_model()
    save_compact_pretrained(model, tmp_path, masks, method="magnitude")
    text = create_sparse_model_card(tmp_path, repo_id="me/compact").text
    assert (
        'load_compact_pretrained(snapshot_download("me/compact"))' in text
        and "from_pretrained(" not in text
    )


def test_card_fields_are_the_main_form_and_keywords_override_them(tmp_path):
    """``CardFields`` says what the card holds; keywords set single fields on top; an unknown one is
    refused."""
    from hf_mfac.integrations.card import CardFields

    model, masks = pruned_model()
    save_sparse_pretrained(model, tmp_path, masks, method="obert")
    fields = CardFields(
        base_model="org/base", datasets="glue", eval_results={"accuracy": 0.9}, license="mit"
    )
    by_value = create_sparse_model_card(None, fields, model=model, masks=masks)
    by_keywords = create_sparse_model_card(
        None,
        model=model,
        masks=masks,
        base_model="org/base",
        datasets="glue",
        eval_results={"accuracy": 0.9},
        license="mit",
    )
    assert by_value.content == by_keywords.content
    overridden = create_sparse_model_card(
        None, fields, model=model, masks=masks, license="apache-2.0"
    )
    assert overridden.data.license == "apache-2.0" and overridden.data.base_model == "org/base"
    assert fields.license == "mit"  # the caller's value is not changed
    with pytest.raises(TypeError, match="base_modle"):
        create_sparse_model_card(tmp_path, fields, base_modle="org/other")


def test_training_arguments_pickled_without_the_hub_token(tmp_path):
    """``pickled_without_secrets``: what ``torch.save(trainer.args, ...)`` writes holds no hub token
    (nor any other secret-named string), while the arguments in memory keep it for the upload."""
    from hf_mfac.integrations.checkpoint.redaction import pickled_without_secrets

    token = "hf_" + "Zq7" * 12
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), hub_token=token, report_to=[], include_num_input_tokens_seen=True
    )
    with pickled_without_secrets(args):
        torch.save(args, tmp_path / "training_args.bin")
    assert args.hub_token == token and "__reduce_ex__" not in vars(args)
    assert token.encode() not in (tmp_path / "training_args.bin").read_bytes()
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert type(loaded) is type(args) and loaded.hub_token is None
    assert loaded.include_num_input_tokens_seen == args.include_num_input_tokens_seen == "all"
    assert loaded.output_dir == args.output_dir


@pytest.mark.parametrize("zeros, start", [(410, "An 80.08% sparse"), (409, "A 79.88% sparse")])
def test_default_description_article(zeros, start):
    """'An 80.08%', 'A 79.88%': the article follows the number as it is read."""
    m = BertForSequenceClassification(
        BertConfig(
            vocab_size=20,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    w = m.bert.encoder.layer[0].intermediate.dense.weight  # (32, 16): 512 weights
    with torch.no_grad():
        w.view(-1)[:zeros] = 0
    masks = {"bert.encoder.layer.0.intermediate.dense.weight": w != 0}
    assert start in create_sparse_model_card(model=m, masks=masks).text
