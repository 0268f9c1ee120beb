"""Sparse checkpoints: stock transformers loads them exactly, compact form round-trips, bad input
fails early."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

import hf_mfac  # noqa: E402
from hf_mfac.core.masks import nm_mask, threshold_masks  # noqa: E402
from hf_mfac.integrations import (  # noqa: E402
    export_semi_structured,
    load_compact_pretrained,
    save_compact_pretrained,
    save_sparse_pretrained,
)
from hf_mfac.integrations.checkpoint import (  # noqa: E402
    COMPACT_WEIGHTS_NAME,
    MASKS_NAME,
    SPARSITY_KEY,
    is_nm_sparse,
    load_sparse_masks,
    read_sparsity_metadata,
)

CFG = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)


def tiny(cls=BertForSequenceClassification, **kw):
    torch.manual_seed(0)
    return cls(BertConfig(**CFG, num_labels=3, **kw)).eval()


def encoder_weights(model):
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith("bert.encoder") and n.endswith(".weight") and p.dim() == 2
    }


def prune(model, sparsity=0.8, pattern=None):
    """Magnitude-prune the encoder's Linear weights in place; returns the masks (True = kept)."""
    weights = encoder_weights(model)
    if pattern == "2:4":
        masks = {n: nm_mask(p.detach().abs(), 2, 4) for n, p in weights.items()}
    else:
        masks = threshold_masks(
            {n: p.detach().abs() for n, p in weights.items()}, sparsity, scope="layer"
        )
    with torch.no_grad():
        for n, p in weights.items():
            p.mul_(masks[n])
    return masks


def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, CFG["vocab_size"], (3, 9), generator=g),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }


def test_stock_from_pretrained_loads_exact_zeros_and_same_outputs(tmp_path):
    model = tiny()
    masks = prune(model, 0.8)
    meta = save_sparse_pretrained(
        model, tmp_path, masks, method="obert", recipe={"sparsity": 0.8, "num_grads": 64}
    )
    assert not hasattr(model.config, SPARSITY_KEY)  # the user's config is left as it was
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not [
        w for w in caught if "hf_mfac" in str(w.message) or "config" in str(w.message).lower()
    ]
    assert type(loaded) is BertForSequenceClassification
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, loaded(**inputs()).logits)
    state, disk = loaded.state_dict(), load_file(os.path.join(tmp_path, "model.safetensors"))
    for name, mask in masks.items():
        assert torch.equal(state[name], model.state_dict()[name])
        assert bool((state[name][~mask] == 0).all()) and bool((disk[name][~mask] == 0).all())
    rec = loaded.config.hf_mfac_sparsity
    assert rec == json.loads(json.dumps(meta)) == read_sparsity_metadata(tmp_path)
    assert rec["library_version"] == hf_mfac.__version__ and rec["method"] == "obert"
    assert rec["pattern"] == "unstructured" and rec["recipe"] == {"sparsity": 0.8, "num_grads": 64}
    assert rec["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert set(rec["per_layer"]) == set(masks)
    for name, mask in masks.items():
        assert rec["per_layer"][name]["num_pruned"] == int((~mask).sum())
        assert rec["per_layer"][name]["shape"] == list(mask.shape)
    saved = load_sparse_masks(tmp_path)
    assert set(saved) == set(masks) and all(torch.equal(saved[n], masks[n]) for n in masks)


def test_masks_derived_from_exact_zeros_and_targets(tmp_path):
    model = tiny()
    masks = prune(model, 0.5)
    meta = save_sparse_pretrained(model, tmp_path / "a")
    # every encoder Linear weight, not the dense head/pooler
    assert set(meta["per_layer"]) == set(masks)
    assert all(torch.equal(load_sparse_masks(tmp_path / "a")[n], masks[n]) for n in masks)
    meta = save_sparse_pretrained(
        model, tmp_path / "b", targets=[r"attention\.self\.query"], save_masks=False
    )
    assert sorted(meta["per_layer"]) == sorted(n for n in masks if "query" in n)
    assert (
        meta["targets"] == [r"attention\.self\.query"]
        and not (tmp_path / "b" / MASKS_NAME).exists()
    )


def test_nm_pattern_detected_and_checked(tmp_path):
    model = tiny()
    masks = prune(model, pattern="2:4")
    assert all(is_nm_sparse(m) for m in masks.values())
    assert save_sparse_pretrained(model, tmp_path / "a", masks)["pattern"] == "2:4"
    unstructured = tiny()
    m2 = prune(unstructured, 0.5)
    with pytest.raises(ValueError, match="2:4"):
        save_sparse_pretrained(unstructured, tmp_path / "b", m2, pattern="2:4")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "case", ["dense", "all_kept", "disagree", "unknown", "shape", "not01", "recipe", "no_match"]
)
def test_bad_input_raises_before_writing(tmp_path, case):
    model = tiny()
    masks = prune(model, 0.5) if case not in ("dense",) else None
    name = next(iter(masks or {"x": 0}))
    kwargs, exc, match = {}, ValueError, None
    if case == "dense":
        match = "no sparsity"
    elif case == "all_kept":
        masks = {n: torch.ones_like(m) for n, m in masks.items()}
        with torch.no_grad():
            for p in encoder_weights(model).values():
                p.add_(1.0)  # no zero left anywhere
        match = "no sparsity"
    elif case == "disagree":
        with torch.no_grad():
            encoder_weights(model)[name][~masks[name]] = 0.5
        match = "disagree"
    elif case == "unknown":
        masks["bert.nope.weight"] = masks[name]
        exc, match = KeyError, "not a parameter"
    elif case == "shape":
        masks[name] = masks[name][:-1]
        match = "shape"
    elif case == "not01":
        masks[name] = masks[name].float() * 2
        match = "0/1"
    elif case == "recipe":
        kwargs, exc, match = {"recipe": {"damp": torch.tensor(1.0)}}, TypeError, "JSON"
    elif case == "no_match":
        masks, kwargs, match = None, {"targets": ["does_not_exist"]}, "matches no candidate"
    out = tmp_path / "out"
    for save in (save_sparse_pretrained, save_compact_pretrained):
        with pytest.raises(exc, match=match):
            save(model, out, masks, **kwargs)
        assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_round_trip_exact(tmp_path, dtype):
    model = tiny().to(dtype)
    masks = prune(model, 0.9)
    report = save_compact_pretrained(model, tmp_path, masks, method="magnitude")
    assert sorted(os.listdir(tmp_path)) == ["config.json", COMPACT_WEIGHTS_NAME]
    assert report["compact_bytes"] == os.path.getsize(tmp_path / COMPACT_WEIGHTS_NAME)
    assert report["compact_bytes"] < report["dense_bytes"] and report["saving"] == pytest.approx(
        1 - report["ratio"]
    )
    assert read_sparsity_metadata(tmp_path)["format"] == "compact"
    loaded, loaded_masks = load_compact_pretrained(tmp_path, return_masks=True)
    assert type(loaded) is BertForSequenceClassification
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(torch.equal(loaded_masks[n], masks[n]) for n in masks) and set(loaded_masks) == set(
        masks
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, loaded(**inputs()).logits)
    # stock loaders refuse the folder instead of loading random weights
    with pytest.raises(OSError):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_compact_keeps_tied_weights(tmp_path):
    model = tiny(BertForMaskedLM)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    masks = prune(model, 0.8)
    save_compact_pretrained(model, tmp_path, masks)
    loaded = load_compact_pretrained(tmp_path)
    assert (
        loaded.cls.predictions.decoder.weight.data_ptr()
        == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, emb)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, loaded(**inputs()).logits)


def test_is_nm_sparse():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])
    assert (
        is_nm_sparse(w, 2, 4)
        and is_nm_sparse(w, 1, 4) is False
        and not is_nm_sparse(w[:, :6], 2, 4)
    )
    assert is_nm_sparse(torch.tensor([[True, False, True, False]]))


def test_export_semi_structured_falls_back_on_cpu():
    model = tiny()
    masks = prune(model, pattern="2:4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="kept dense"):
        report = export_semi_structured(model)
    assert set(report) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in (n[: -len(".weight")] for n in masks):
        assert "CUDA" in report[name]
    assert "not 2:4" in report["classifier"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="strict"):
        export_semi_structured(model, strict=True)
    with pytest.warns(UserWarning, match="no Linear layer is 2:4"):
        export_semi_structured(tiny())


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0",
)
def test_export_semi_structured_on_gpu():
    torch.manual_seed(0)
    lin = (
        torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
        .cuda()
        .half()
    )
    with torch.no_grad():
        for m in (lin[0], lin[2]):
            m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = lin(x)
        report = export_semi_structured(lin, strict=True)
        assert set(report.values()) == {"semi-structured 2:4"}
        torch.testing.assert_close(lin(x), ref, rtol=1e-2, atol=1e-2)


# -- a save replaces the previous one whole, and keeps what it did not write
# ---------------------------------


def previous_save(out, kind):
    """An earlier save of another model (seed 1, 30 % sparse) in ``out``, plus files the user put
    there."""
    torch.manual_seed(1)
    old = BertForSequenceClassification(BertConfig(**CFG, num_labels=3)).eval()
    masks = prune(old, 0.3)
    if kind == "compact":
        save_compact_pretrained(old, out, masks)
    elif kind == "sharded":  # an earlier, larger save: model-0000x-of-0000y.safetensors + index
        save_sparse_pretrained(old, out, masks, max_shard_size="40KB")
        assert len([f for f in os.listdir(out) if "-of-" in f]) > 1
    elif kind == "bin":
        old.save_pretrained(out)
        torch.save(old.state_dict(), out / "pytorch_model.bin")
    else:
        save_sparse_pretrained(old, out, masks)
    (out / "README.md").write_text("# mine\n")
    (out / "tokenizer.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("kept")


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("old", ["dense", "sharded", "compact", "bin"])
@pytest.mark.parametrize("new", ["dense", "dense-no-masks", "dense-sharded", "compact"])
def test_save_replaces_previous_save(tmp_path, old, new):
    out = tmp_path / "out"
    previous_save(out, old)
    model = tiny()
    masks = prune(model, 0.8)
    if new == "compact":
        save_compact_pretrained(model, out, masks)
    else:
        save_sparse_pretrained(
            model,
            out,
            masks,
            save_masks=new != "dense-no-masks",
            **({"max_shard_size": "40KB"} if new == "dense-sharded" else {}),
        )
    files = set(os.listdir(out))
    assert {"README.md", "tokenizer.json", "notes"} <= files and (
        out / "notes" / "a.txt"
    ).read_text() == "kept"
    assert not [f for f in files if f.startswith(".")]  # no staging folder left
    weights = {
        f
        for f in files
        if f.endswith((".safetensors", ".bin", ".json"))
        and f not in ("config.json", "tokenizer.json", MASKS_NAME)
    }
    if new == "compact":
        assert weights == {COMPACT_WEIGHTS_NAME} and MASKS_NAME not in files
        assert_same_state(load_compact_pretrained(out), model)
        with pytest.raises(OSError):  # the earlier dense weights are gone, not loaded
            AutoModelForSequenceClassification.from_pretrained(out)
        return
    if new == "dense-sharded":
        shards = {f for f in weights if "-of-" in f}
        assert len(shards) > 1 and weights == shards | {"model.safetensors.index.json"}
        assert json.loads((out / "model.safetensors.index.json").read_text())[
            "weight_map"
        ].keys() <= set(model.state_dict())
    else:
        assert weights == {"model.safetensors"}
    assert (MASKS_NAME in files) == (new != "dense-no-masks")
    assert_same_state(AutoModelForSequenceClassification.from_pretrained(out).eval(), model)
    rec = read_sparsity_metadata(out)
    assert rec["format"] == "dense" and rec["sparsity"] == pytest.approx(0.8, abs=1e-3)
    if new == "dense":
        saved = load_sparse_masks(out)
        assert set(saved) == set(masks) and all(torch.equal(saved[n], masks[n]) for n in masks)
    with pytest.raises(ValueError, match="holds no compact"):
        load_compact_pretrained(out)


def test_save_into_a_new_nested_folder_leaves_nothing_beside_it(tmp_path):
    model = tiny()
    masks = prune(model, 0.5)
    save_sparse_pretrained(model, tmp_path / "a" / "b", masks)
    assert os.listdir(tmp_path) == ["a"] and os.listdir(tmp_path / "a") == ["b"]
    assert sorted(os.listdir(tmp_path / "a" / "b")) == sorted(
        ["config.json", "model.safetensors", MASKS_NAME]
    )


def test_save_through_a_symlinked_folder(tmp_path):
    real = tmp_path / "real"
    previous_save(real, "dense")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model = tiny()
    save_compact_pretrained(model, tmp_path / "link", prune(model, 0.5))
    assert (tmp_path / "link").is_symlink() and (real / COMPACT_WEIGHTS_NAME).exists()
    assert not (real / "model.safetensors").exists() and (real / "README.md").exists()


def test_compact_loader_refuses_lookalike_classes(tmp_path):
    """architectures must name a transformers model class taking this config; anything else is never
    looked up."""
    model = tiny()
    save_compact_pretrained(model, tmp_path, prune(model, 0.5))
    config = json.loads((tmp_path / "config.json").read_text())
    for arch in (
        ["os.system"],
        ["eval"],
        ["PreTrainedModel"],
        ["BertConfig"],
        ["GPT2Model"],
        ["AutoModel"],
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": arch}))
        with pytest.raises(ValueError, match="architectures"):
            load_compact_pretrained(tmp_path)
    # model_cls= still chooses the class explicitly
    assert (
        type(load_compact_pretrained(tmp_path, BertForSequenceClassification))
        is BertForSequenceClassification
    )
