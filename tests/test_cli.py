"""``hf-mfac``: --help and --version, a one-shot sweep with evaluation and model cards, inputs
refused before the model is loaded, and build-kernels."""
import dataclasses
import json
import random

import pytest
import torch
from conftest import save_tiny_text_model

transformers = pytest.importorskip("transformers")

from hf_mfac.integrations import cli  # noqa: E402
from hf_mfac.pruning import PruningConfig  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    """A tiny BERT classifier (labels neg/pos) and a 40-row CSV of its words with string labels."""
    model_dir, words = save_tiny_text_model(tmp_path)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.id2label, config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    config.save_pretrained(model_dir)
    rng = random.Random(0)
    with open(tmp_path / "data.csv", "w", encoding="latin-1") as f:
        f.write("text,label\n")
        for _ in range(40):
            f.write(f"the movie was {rng.choice(words)} {rng.choice(words)} "
                    f"caf\xe9,{rng.choice(['neg', 'pos'])}\n")
    return model_dir, tmp_path / "data.csv"


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(PruningConfig) + dataclasses.fields(cli.PruneCommandArguments):
        assert f"--{f.name}" in text
        help_text = " ".join(f.metadata["help"].split())
        assert (
            f"{help_text} (default: {f.default if f.default is not dataclasses.MISSING else None})"
            in text
        ), f.name
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("hf-mfac ")


def test_prune_sweep_with_eval_and_model_cards(tiny, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification

    from hf_mfac.integrations.checkpoint import load_sparse_masks

    model_dir, data = tiny
    out = tmp_path / "pruned"
    rc = cli.main(
        [
            "prune",
            str(model_dir),
            "--data",
            str(data),
            "--encoding",
            "latin-1",
            "--method",
            "obert",
            "--sparsities",
            "0.3",
            "0.6",
            "--num-grads",
            "4",
            "--batch-size",
            "4",
            "--block_size",
            "16",
            "--eval_data",
            str(data),
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "dense: eval loss" in text and "sparsity-0.60: sparsity 0.60" in text
    for s in (0.3, 0.6):
        d = out / f"sparsity-{s:.2f}"
        masks = load_sparse_masks(d)
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
        # stock transformers loads it
        reloaded = AutoModelForSequenceClassification.from_pretrained(d)
        w = dict(reloaded.named_parameters())
        assert all(bool((w[n][~m] == 0).all()) for n, m in masks.items())
        report = json.load(open(d / "pruning_report.json"))
        assert report["method"] == "obert" and "eval_accuracy" in report
        card = ModelCard.load(d / "README.md")
        assert "hf_mfac" in card.data.tags and "obert" in card.data.tags
        assert "--sparsities 0.3 0.6" in card.text
        assert card.data.eval_results[0].dataset_name == data.name  # the eval file names them
        assert "dataset_name=" not in card.text


def test_dispatched_model_and_fisher_over_two_slots_prune_as_on_one_device(tiny, tmp_path):
    """--device_map auto (accelerate's hooks, here all on the CPU) and --fisher_device cpu,cpu (the
    block Fisher in two parts) give the masks and weights of the plain run."""
    from hf_mfac.integrations.checkpoint import load_sparse_masks
    from safetensors.torch import load_file

    model_dir, data = tiny
    base = ["prune", str(model_dir), "--data", str(data), "--encoding", "latin-1", "--method",
            "obert", "--sparsity", "0.6", "--num_grads", "4", "--batch_size", "4",
            "--block_size", "16", "--no_progress"]
    outs = {}
    for name, extra in [("plain", []), ("placed", ["--device_map", "auto", "--fisher_device",
                                                   "cpu,cpu"])]:
        outs[name] = tmp_path / name
        assert cli.main([*base, "--output_dir", str(outs[name]), *extra]) == 0, name
    a, b = load_sparse_masks(outs["plain"]), load_sparse_masks(outs["placed"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa = load_file(outs["plain"] / "model.safetensors")
    wb = load_file(outs["placed"] / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)
    report = json.load(open(outs["placed"] / "pruning_report.json"))
    assert len(report.get("placement") or []) == 2, report.get("placement")


LOADED = AssertionError("the model was loaded before the inputs were checked")


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("sparsity out of range", ["--sparsity", "1.5"], "sparsity must lie in [0, 1)"),
        ("no sparsity", [], "give --sparsity"),
        ("no model folder", ["--sparsity", "0.5", "@no-model"], "is not a folder"),
        ("folder without weights", ["--sparsity", "0.5", "@empty-model"], "has no weights"),
        ("missing data", ["--sparsity", "0.5", "--data", "@missing.csv"], "not found"),
        (
            "wrong label column",
            ["--sparsity", "0.5", "--label_column", "sentiment"],
            "label column 'sentiment'",
        ),
        (
            "wrong text column",
            ["--sparsity", "0.5", "--text_column", "tweet"],
            "column 'tweet' not found",
        ),
        ("Latin-1 read as UTF-8", ["--sparsity", "0.5", "--encoding", "utf-8"], "--encoding"),
        ("unknown pattern", ["--pattern", "3x"], "unknown sparsity pattern"),
        (
            "labels the model has no class for",
            ["--sparsity", "0.5", "--data", "@three-labels.csv"],
            "cannot be mapped",
        ),
        ("device and device_map", ["--sparsity", "0.5", "--device", "cpu", "--device_map",
                                   "auto"], "not both"),
        ("unknown device_map", ["--sparsity", "0.5", "--device_map", "everywhere"],
         "is not one of auto"),
        ("a GPU that is not there", ["--sparsity", "0.5", "--device", "cuda:7"], "does not exist"),
        ("a Fisher device that is not there", ["--sparsity", "0.5", "--fisher_device",
                                               "cpu,cuda:7"], "--fisher_device"),
        (
            "per_sample with a fisher_batch_size",
            ["--sparsity", "0.5", "--per_sample", "--fisher_batch_size", "4"],
            "per_sample=True means",
        ),
    ],
)
def test_bad_inputs_fail_before_loading(tiny, tmp_path, capsys, monkeypatch, case, extra, message):
    model_dir, data = tiny
    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(LOADED))
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    (tmp_path / "three-labels.csv").write_text(
        "text,label\n" + "".join(f"the movie,{c}\n" for c in "abc" * 4)
    )
    model = next((str(tmp_path / e[1:]) for e in extra if e.endswith("model")), str(model_dir))
    extra = [
        str(tmp_path / e[1:]) if e.startswith("@") else e for e in extra if not e.endswith("model")
    ]
    args = [
        "prune",
        model,
        "--output_dir",
        str(tmp_path / "out"),
        "--encoding",
        "latin-1",
        "--data",
        str(data),
        *extra,
    ]
    assert cli.main(args) == 2, case
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_build_kernels_prints_the_report(monkeypatch, capsys):
    import hf_mfac.kernels as kernels

    calls = []

    def fake(verbose=True):
        calls.append(verbose)
        return {"ok": False, "gpu": True, "reason": "no nvcc", "devices": []}

    monkeypatch.setattr(kernels, "build_kernels", fake)
    assert cli.main(["build-kernels"]) == 1 and calls == [True]
    assert json.loads(capsys.readouterr().out)["reason"] == "no nvcc"


def tree(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "case,output,extra,message",
    [
        ("output is the model folder", "@tiny-bert", [], "is the model folder"),
        ("with a trailing slash", "@tiny-bert/", [], "is the model folder"),
        ("through dot-dot", "@tiny-bert/../tiny-bert", [], "is the model folder"),
        ("relative to the working folder", "./tiny-bert/", [], "is the model folder"),
        ("through a symlink", "@link", [], "is the model folder"),
        (
            "a sweep folder is the model folder",
            "@",
            ["--sparsities", "0.3", "0.5"],
            "is the model folder",
        ),
        ("output is an existing file", "@data.csv", [], "exists and is not a folder"),
        ("output under a file", "@data.csv/out", [], "is a file, not a folder"),
        ("data is a folder", "@out", ["--data", "@tiny-bert"], "is not a file"),
        ("eval data missing", "@out", ["--eval_data", "@nowhere.csv"], "--eval_data"),
    ],
)
def test_paths_checked_first_and_model_never_overwritten(
    tiny, tmp_path, capsys, monkeypatch, case, output, extra, message
):
    """The model folder under any spelling, or a sweep folder that is it, is refused before any
    work, as are an output path that is (or lies under) a file and data paths that are not readable
    files; nothing changes."""
    model_dir, data = tiny
    (tmp_path / "link").symlink_to(model_dir)
    monkeypatch.chdir(tmp_path)
    if "--sparsities" in extra:  # the model lives where the sweep would write its 0.30 result
        model_dir = model_dir.rename(tmp_path / "sparsity-0.30")
    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(LOADED))
    before = tree(tmp_path)

    def at(p):  # "@name" is tmp_path / name (a trailing slash kept)
        if not p.startswith("@"):
            return p
        return str(tmp_path / p[1:]) + ("/" if p.endswith("/") else "")

    target = [] if "--sparsities" in extra else ["--sparsity", "0.5"]
    args = [
        "prune",
        str(model_dir),
        "--data",
        str(data),
        "--encoding",
        "latin-1",
        "--method",
        "magnitude",
        "--output_dir",
        at(output),
        *target,
        *map(at, extra),
    ]
    assert cli.main(args) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("hf-mfac prune: error: ") and message in err, err
    assert tree(tmp_path) == before


def test_a_result_saved_over_an_earlier_one_keeps_the_hand_written_card_text(tiny, tmp_path):
    """``save_prune_result`` replaces the checkpoint, tokenizer and report as one folder and updates
    the card: what the user wrote in README.md outside hf_mfac's section stays."""
    from hf_mfac.integrations.checkpoint import load_sparse_masks

    model_dir, _ = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    out = tmp_path / "out"
    for i, keep in enumerate((0.6, 0.3)):  # the second result prunes more
        masks = {}
        for n, p in model.named_parameters():
            if n.endswith("dense.weight"):
                masks[n] = p.detach().abs() >= p.detach().abs().flatten().quantile(1 - keep)
                p.data.mul_(masks[n])
        cli.save_prune_result(
            str(out),
            model,
            masks,
            {"run": i},
            tokenizer=tokenizer,
            method="magnitude",
            pattern=None,
            recipe={"run": i},
            command=f"hf-mfac prune run{i}",
        )
        if i == 0:
            with open(out / "README.md", "a") as f:
                f.write("\nMy own notes.\n")
    text = (out / "README.md").read_text()
    assert "My own notes." in text and "hf-mfac prune run1" in text and "run0" not in text
    assert json.load(open(out / "pruning_report.json")) == {"run": 1}
    assert all(torch.equal(m, masks[n]) for n, m in load_sparse_masks(out).items())


def test_unreadable_data_is_refused_before_loading(tiny, tmp_path, capsys, monkeypatch):
    """A data file that cannot be opened (permissions; simulated, as tests may run as root) exits 2
    naming the flag and the file, before the model is loaded."""
    import builtins

    model_dir, data = tiny
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(data):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(LOADED))
    monkeypatch.setattr(builtins, "open", guarded)
    rc = cli.main(
        [
            "prune",
            str(model_dir),
            "--data",
            str(data),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hf-mfac prune: error: --data "), err
    assert "cannot be read" in err, err
    assert not (tmp_path / "out").exists()
