"""Fault rows for what hf_mfac writes and reads on disk: sparse checkpoints (dense and compact),
their masks and sparsity record, and model cards.

Saves interrupted while writing (a writer that raises, as a full disk would) or while moving the
files into place (``os.replace`` / ``os.rename`` raising ``KeyboardInterrupt`` before or after its
n-th rename) must leave the folder byte for byte as it was; tampered or truncated files must fail
with the file and the tensor named; user strings that would break a card are refused before anything
is written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from unittest import mock

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_faults import Fault, snapshot
from transformers import BertConfig, BertForSequenceClassification

from hf_mfac.integrations import (
    create_sparse_model_card,
    load_compact_pretrained,
    save_compact_pretrained,
    save_sparse_pretrained,
)
from hf_mfac.integrations.checkpoint import (
    COMPACT_WEIGHTS_NAME,
    MASKS_NAME,
    load_sparse_masks,
    read_sparsity_metadata,
)

CFG = dict(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=32,
           max_position_embeddings=16, num_labels=2)
README = "---\nlicense: mit\n---\n# Mine\n\nWritten by hand.\n"
COMPACT = COMPACT_WEIGHTS_NAME.replace(".", r"\.")


def model_and_masks(seed=0, sparsity=0.5):
    """A tiny BERT classifier with its encoder Linear weights magnitude-pruned in place, and the
    masks."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**CFG)).eval()
    masks = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("bert.encoder") and n.endswith(".weight") and p.dim() == 2:
                k = int(sparsity * p.numel())
                cut = p.abs().flatten().kthvalue(k).values
                masks[n] = p.abs() > cut
                p.mul_(masks[n])
    return model, masks


def old_save(tmp, kind="dense"):
    """``tmp/out`` holding an earlier save (seed 1, 30 % sparse) of ``kind`` — "dense", "sharded"
    (several model-0000x-of-0000y files and an index) or "compact" — and a README the user wrote."""
    model, masks = model_and_masks(seed=1, sparsity=0.3)
    out = tmp / "out"
    if kind == "compact":
        save_compact_pretrained(model, out, masks)
    else:
        save_sparse_pretrained(
            model, out, masks, **({"max_shard_size": "20KB"} if kind == "sharded" else {})
        )
    (out / "README.md").write_text(README)
    return out


def new_save(kind="dense", probe=None):
    """Builds the earlier save and the model to save over it; with ``probe`` (a save function), also
    counts the ``os.replace`` calls that save makes over a copy of the folder
    (``ctx["renames"]``)."""

    def build(tmp):
        model, masks = model_and_masks()
        ctx = {"model": model, "masks": masks, "dir": old_save(tmp, kind)}
        if probe is not None:
            copy = tmp / "probe"
            shutil.copytree(ctx["dir"], copy)
            with fails_on(os, "replace", 0, interrupt) as calls:
                probe({**ctx, "dir": copy})
            ctx["renames"] = calls[0]
        return ctx

    return build


def nth(ctx, n):
    """``n`` as a call number: an int, or "mid" / "last" of the probed rename count."""
    return {"mid": (ctx.get("renames", 0) + 1) // 2, "last": ctx.get("renames", 0)}.get(n, n)


@contextlib.contextmanager
def fails_on(owner, name, n, exc, after=False):
    """``owner.name`` raising ``exc(args)`` on its ``n``-th call (after doing its work when
    ``after``)."""
    real, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            raise exc(args)
        out = real(*args, **kwargs)
        if calls[0] == n:
            raise exc(args)
        return out

    with mock.patch.object(owner, name, wrapper):
        yield calls


def disk_full(args):
    return OSError(
        errno.ENOSPC, "No space left on device", str(args[1] if len(args) > 1 else args[0])
    )


def interrupt(args):
    return KeyboardInterrupt(f"interrupted at {args}")


def dense(ctx, **kw):
    return save_sparse_pretrained(ctx["model"], ctx["dir"], ctx["masks"], **kw)


def compact(ctx, **kw):
    return save_compact_pretrained(ctx["model"], ctx["dir"], ctx["masks"], **kw)


def during(save, owner, name, n, exc, after=False):
    def act(ctx):
        with fails_on(owner, name, n, exc, after):
            save(ctx)

    return act


def st_module():
    import hf_mfac.integrations.checkpoint.sparse as sc

    return sc


def compact_module():
    import hf_mfac.integrations.checkpoint.compact as cm

    return cm


def modeling_utils():
    import transformers.modeling_utils as mu

    return mu


def _write_fails(save, module, name, n=1):
    return lambda ctx: during(save, module(), name, n, disk_full)(ctx)


def _commit_fails(save, n, after=False):
    return lambda ctx: during(save, os, "replace", nth(ctx, n), interrupt, after)(ctx)


def no_leftovers(ctx, _result):
    """No staging folder left behind anywhere under the test's folder."""
    root = ctx["dir"].parent
    left = [p for p in root.rglob("*") if ".hf_mfac-staging-" in p.name]
    assert not left, left


# -- saves
# -------------------------------------------------------------------------------------------------

SAVE_ROWS = []
for old in ("dense", "sharded", "compact"):
    SAVE_ROWS += [
        Fault(
            f"{old}-then-dense:weights-write-fails",
            new_save(old),
            _write_fails(dense, modeling_utils, "safe_save_file"),
            raises=OSError,
            match="model.safetensors",
            check=no_leftovers,
        ),
        Fault(
            f"{old}-then-dense:masks-write-fails",
            new_save(old),
            _write_fails(dense, st_module, "save_file"),
            raises=OSError,
            match=MASKS_NAME,
            check=no_leftovers,
        ),
        Fault(
            f"{old}-then-compact:write-fails",
            new_save(old),
            _write_fails(compact, compact_module, "save_file"),
            raises=OSError,
            match=COMPACT,
            check=no_leftovers,
        ),
    ]
    # os.replace interrupted: the first withdrawal, the middle rename, the last install (before and
    # after it happened: a KeyboardInterrupt can land just after a rename returned)
    for save, what in ((dense, "dense"), (compact, "compact")):
        for n, after in (
            (1, False),
            (1, True),
            ("mid", False),
            ("mid", True),
            ("last", False),
            ("last", True),
        ):
            SAVE_ROWS.append(
                Fault(
                    f"{old}-then-{what}:interrupted-at-rename-{n}{'-after' if after else ''}",
                    new_save(old, probe=save),
                    _commit_fails(save, n, after),
                    raises=KeyboardInterrupt,
                    match="interrupted",
                    check=no_leftovers,
                )
            )


def config_write_fails(ctx):
    from transformers import PretrainedConfig

    with fails_on(PretrainedConfig, "to_json_file", 1, lambda a: disk_full((None, a[1]))):
        compact(ctx)


def fresh_target(tmp):
    model, masks = model_and_masks()
    (tmp / "p").mkdir()
    (tmp / "p" / "keep.txt").write_text("mine")
    return {"model": model, "masks": masks, "parent": tmp / "p", "dir": tmp / "p" / "a" / "b"}


def fresh_rename_fails(ctx):
    with fails_on(os, "rename", 1, interrupt):
        dense(ctx)


def nothing_created(ctx, _result):
    assert sorted(p.name for p in ctx["parent"].iterdir()) == ["keep.txt"]


def a_file(tmp):
    model, masks = model_and_masks()
    (tmp / "out").write_text("a file, not a folder")
    return {"model": model, "masks": masks, "dir": tmp / "out"}


SAVE_ROWS += [
    Fault(
        "dense-then-compact:config-write-fails",
        new_save("dense"),
        config_write_fails,
        raises=OSError,
        match="config.json",
        check=no_leftovers,
    ),
    Fault(
        "new-folder:interrupted-at-rename",
        fresh_target,
        fresh_rename_fails,
        raises=KeyboardInterrupt,
        match="interrupted",
        check=nothing_created,
    ),
    Fault(
        "push-to-hub-kwarg",
        new_save("dense"),
        lambda ctx: dense(ctx, push_to_hub=True),
        raises=TypeError,
        match="push_to_hub",
    ),
    Fault("target-is-a-file:dense", a_file, dense, raises=NotADirectoryError, match="out"),
    Fault("target-is-a-file:compact", a_file, compact, raises=NotADirectoryError, match="out"),
]


# -- tampered or truncated files
# ----------------------------------------------------------------------------


def compact_dir(tmp):
    model, masks = model_and_masks()
    out = tmp / "out"
    save_compact_pretrained(model, out, masks)
    return {"dir": out, "names": sorted(masks)}


def dense_dir(tmp):
    model, masks = model_and_masks()
    out = tmp / "out"
    save_sparse_pretrained(model, out, masks)
    return {"dir": out, "names": sorted(masks)}


def rewrite_compact(edit):
    """compact_dir, then ``edit(tensors, header layout, names)`` applied to its file (re-saved with
    the header)."""

    def build(tmp):
        ctx = compact_dir(tmp)
        path = str(ctx["dir"] / COMPACT_WEIGHTS_NAME)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        tensors, layout = load_file(path), json.loads(meta["hf_mfac_compact"])
        edit(tensors, layout, ctx["names"])
        meta["hf_mfac_compact"] = json.dumps(layout)
        save_file(tensors, path, metadata=meta)
        return ctx

    return build


def rewrite_bytes(name, edit):
    def build(tmp):
        ctx = (compact_dir if name == COMPACT_WEIGHTS_NAME else dense_dir)(tmp)
        p = ctx["dir"] / name
        p.write_bytes(edit(p.read_bytes()))
        return ctx

    return build


def rewrite_config(edit, base=None):
    def build(tmp):
        ctx = (base or compact_dir)(tmp)
        p = ctx["dir"] / "config.json"
        config = json.loads(p.read_text())
        edit(config)
        p.write_text(json.dumps(config))
        return ctx

    return build


def load(ctx):
    return load_compact_pretrained(ctx["dir"])


def first(names):
    return names[0]


def values_len_1(t, layout, names):
    t[f"{first(names)}:values"] = t[f"{first(names)}:values"][:1].clone()


def bitmask_8_short(t, layout, names):
    t[f"{first(names)}:bitmask"] = t[f"{first(names)}:bitmask"][:-8].clone()


def bitmask_flipped(t, layout, names):  # one more kept weight than there are values
    b = t[f"{first(names)}:bitmask"].clone()
    i = int((b != 255).nonzero()[0])
    v = int(b[i])
    b[i] = v | ((v + 1) & ~v)  # set its lowest clear bit
    t[f"{first(names)}:bitmask"] = b


def consistent_but_recorded_otherwise(t, layout, names):
    """Drop one kept weight from both the bitmask and the values: self-consistent, but not what
    config.json says."""
    import numpy as np

    name = first(names)
    bits = np.unpackbits(t[f"{name}:bitmask"].numpy(), bitorder="little")
    i = int(bits.nonzero()[0][0])
    bits[i] = 0
    t[f"{name}:bitmask"] = torch.from_numpy(np.packbits(bits, bitorder="little"))
    t[f"{name}:values"] = t[f"{name}:values"][1:].clone()


def values_float64(t, layout, names):
    t[f"{first(names)}:values"] = t[f"{first(names)}:values"].double()


def dense_wrong_shape(t, layout, names):
    t["classifier.bias"] = t["classifier.bias"][:1].clone()


# header says nothing about dense shapes: the model does
def dense_wrong_shape_consistent(t, layout, names):
    t["classifier.weight"] = torch.zeros(3, CFG["hidden_size"])


def dense_missing(t, layout, names):
    del t["classifier.bias"]
    layout["dtypes"].pop("classifier.bias")


def stray_tensor(t, layout, names):
    t["bert.nope.weight:values"] = torch.zeros(3)


def values_missing(t, layout, names):
    del t[f"{first(names)}:values"]


def bad_alias(t, layout, names):
    layout["aliases"] = {"cls.decoder.weight": "bert.nowhere.weight"}


def bad_shape_header(t, layout, names):
    layout["shapes"][first(names)] = "16x16"


def future_version(t, layout, names):
    layout["format_version"] = 99


def from_another_save(tmp):
    """config.json of one compact save next to the compact file of another (different sparsity)."""
    ctx = compact_dir(tmp)
    model, masks = model_and_masks(sparsity=0.25)
    save_compact_pretrained(model, tmp / "other", masks)
    (ctx["dir"] / COMPACT_WEIGHTS_NAME).write_bytes(
        (tmp / "other" / COMPACT_WEIGHTS_NAME).read_bytes()
    )
    return ctx


def header_garbage(tmp):
    ctx = compact_dir(tmp)
    path = str(ctx["dir"] / COMPACT_WEIGHTS_NAME)
    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "pt", "hf_mfac_compact": "{not json"})
    return ctx


def no_header(tmp):
    ctx = compact_dir(tmp)
    path = str(ctx["dir"] / COMPACT_WEIGHTS_NAME)
    save_file(load_file(path), path, metadata={"format": "pt"})
    return ctx


def set_arch(value):
    def edit(config):
        config["architectures"] = value

    return edit


def set_record(key, value):
    def edit(config):
        config["hf_mfac_sparsity"][key] = value

    return edit


TENSOR = r"'bert\.encoder\.layer\.0\.[\w.]+"
LOAD_ROWS = [
    Fault(
        "compact:values-length-1",
        rewrite_compact(values_len_1),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:values'",
    ),
    Fault(
        "compact:bitmask-8-bytes-short",
        rewrite_compact(bitmask_8_short),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:bitmask'",
    ),
    Fault(
        "compact:bitmask-keeps-more-than-values",
        rewrite_compact(bitmask_flipped),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:values'.*keeps",
    ),
    Fault(
        "compact:consistent-tamper-disagrees-with-record",
        rewrite_compact(consistent_but_recorded_otherwise),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:bitmask'.*config\\.json",
    ),
    Fault(
        "compact:values-dtype",
        rewrite_compact(values_float64),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:values' has dtype float64",
    ),
    Fault(
        "compact:dense-tensor-shape",
        rewrite_compact(dense_wrong_shape),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor 'classifier.bias' has shape",
    ),
    Fault(
        "compact:dense-tensor-shape-vs-model",
        rewrite_compact(dense_wrong_shape_consistent),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor 'classifier.weight' has shape",
    ),
    Fault(
        "compact:dense-tensor-missing",
        rewrite_compact(dense_missing),
        load,
        raises=ValueError,
        match=f"{COMPACT} does not match .*classifier.bias",
    ),
    Fault(
        "compact:stray-tensor",
        rewrite_compact(stray_tensor),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor 'bert.nope.weight:values'",
    ),
    Fault(
        "compact:values-missing",
        rewrite_compact(values_missing),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:values' is missing",
    ),
    Fault(
        "compact:alias-to-nothing",
        rewrite_compact(bad_alias),
        load,
        raises=ValueError,
        match=f"{COMPACT}: alias 'cls.decoder.weight'",
    ),
    Fault(
        "compact:header-shape-not-a-list",
        rewrite_compact(bad_shape_header),
        load,
        raises=ValueError,
        match=f"{COMPACT}: header shape of {TENSOR}'",
    ),
    Fault(
        "compact:header-future-version",
        rewrite_compact(future_version),
        load,
        raises=ValueError,
        match=f"{COMPACT}: compact format_version 99",
    ),
    Fault(
        "compact:header-not-json",
        header_garbage,
        load,
        raises=ValueError,
        match=f"{COMPACT}: .*not valid JSON",
    ),
    Fault(
        "compact:no-header",
        no_header,
        load,
        raises=ValueError,
        match=f"{COMPACT} is not an hf_mfac compact",
    ),
    Fault(
        "compact:file-from-another-save",
        from_another_save,
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:bitmask'.*disagrees with .*config\\.json",
    ),
    Fault(
        "compact:truncated",
        rewrite_bytes(COMPACT_WEIGHTS_NAME, lambda b: b[:-100]),
        load,
        raises=ValueError,
        match=f"{COMPACT} is not a readable safetensors file",
    ),
    Fault(
        "compact:garbage",
        rewrite_bytes(COMPACT_WEIGHTS_NAME, lambda b: b"\x00garbage" * 9),
        load,
        raises=ValueError,
        match=f"{COMPACT} is not a readable safetensors file",
    ),
    Fault(
        "compact:file-missing",
        lambda tmp: {**compact_dir(tmp), "_": (tmp / "out" / COMPACT_WEIGHTS_NAME).unlink()},
        load,
        raises=FileNotFoundError,
        match=COMPACT,
    ),
    Fault(
        "compact:config-truncated",
        rewrite_bytes("config.json", lambda b: b[:200]),
        load,
        raises=ValueError,
        match=r"config\.json is not valid JSON",
    ),
    Fault(
        "compact:record-says-dense",
        rewrite_config(set_record("format", "dense")),
        load,
        raises=ValueError,
        match=r"config\.json holds no compact",
    ),
    Fault(
        "compact:record-per-layer-garbage",
        rewrite_config(set_record("per_layer", {"x": {"shape": "no"}})),
        load,
        raises=ValueError,
        match=r"config\.json: the 'hf_mfac_sparsity' record is malformed",
    ),
    Fault(
        "compact:folder-missing",
        lambda tmp: {"dir": tmp / "nowhere"},
        load,
        raises=FileNotFoundError,
        match="nowhere",
    ),
]
for arch in (
    ["os.system"],
    ["PreTrainedModel"],
    ["BertConfig"],
    ["AutoModel"],
    ["GPT2Model"],
    ["__class__"],
    ["pipeline"],
    [],
    "BertForSequenceClassification",
    [7],
):
    LOAD_ROWS.append(
        Fault(
            f"compact:architectures={arch!r}",
            rewrite_config(set_arch(arch)),
            load,
            raises=ValueError,
            match=r"config\.json: architectures",
        )
    )


def masks(ctx):
    return load_sparse_masks(ctx["dir"])


def masks_from_another_save(tmp):
    ctx = dense_dir(tmp)
    model, m = model_and_masks(sparsity=0.25)
    save_sparse_pretrained(model, tmp / "other", m)
    (ctx["dir"] / MASKS_NAME).write_bytes((tmp / "other" / MASKS_NAME).read_bytes())
    return ctx


def masks_uint8(tmp):
    ctx = dense_dir(tmp)
    p = str(ctx["dir"] / MASKS_NAME)
    save_file({k: v.to(torch.uint8) for k, v in load_file(p).items()}, p)
    return ctx


def swap_bitmask_bits(t, layout, names):
    """Swap two adjacent differing bits of a bitmask: the same number kept, a different pattern."""
    import numpy as np

    name = f"{first(names)}:bitmask"
    bits = np.unpackbits(t[name].numpy(), bitorder="little")
    i = int(np.nonzero(bits[:-1] != bits[1:])[0][0])
    bits[i], bits[i + 1] = bits[i + 1], bits[i]
    t[name] = torch.from_numpy(np.packbits(bits, bitorder="little"))


def without_checksums(build, name):
    """``build``, then the file ``name`` re-saved without hf_mfac's checksums (a file from before
    them)."""

    def strip(tmp):
        ctx = build(tmp)
        path = str(ctx["dir"] / name)
        with safe_open(path, framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if not k.endswith("_sha256")}
        save_file(load_file(path), path, metadata=meta)
        return ctx

    return strip


def rewrite_safetensors(name, edit, base=None):
    """``base`` (default: the dense save), then ``edit(tensors, first masked name)`` applied to the
    file ``name``, re-saved with its header."""

    def build(tmp):
        ctx = (base or dense_dir)(tmp)
        path = str(ctx["dir"] / name)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        edit(tensors, first(ctx["names"]))
        save_file(tensors, path, metadata=meta)
        return ctx

    return build


def swap_mask_bytes(t, name):
    """Swap one True and one False of a mask: the same pruned count, a different pattern."""
    flat = t[name].flatten().clone()
    kept, pruned = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    flat[kept], flat[pruned] = False, True
    t[name] = flat.reshape(t[name].shape)


def nudge_kept_weight(t, name):
    w = t[name].flatten().clone()
    i = int(w.nonzero()[0])
    w[i] = w[i] * 1.5
    t[name] = w.reshape(t[name].shape)


def loads_same_masks(ctx, result):
    model, masks_ = model_and_masks()
    assert set(result) == set(masks_) and all(torch.equal(result[k], masks_[k]) for k in masks_)


def loads_same_model(ctx, result):
    model, _ = model_and_masks()
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in result.state_dict().items())


MASKS_SWAPPED = rewrite_safetensors(MASKS_NAME, swap_mask_bytes)
WEIGHT_NUDGED = rewrite_safetensors("model.safetensors", nudge_kept_weight)
LOAD_ROWS += [
    Fault(
        "compact:two-bitmask-bits-swapped",
        rewrite_compact(swap_bitmask_bits),
        load,
        raises=ValueError,
        match=f"{COMPACT}: tensor {TENSOR}:bitmask' does not match its checksum",
    ),
    Fault(
        "compact:no-checksums-still-loads",
        without_checksums(compact_dir, COMPACT_WEIGHTS_NAME),
        load,
        check=loads_same_model,
    ),
    Fault(
        "masks:true-and-false-swapped",
        MASKS_SWAPPED,
        masks,
        raises=ValueError,
        match=f"{MASKS_NAME}: mask {TENSOR}' does not match its checksum",
    ),
    Fault(
        "masks:swapped-in-a-file-without-checksums",
        without_checksums(MASKS_SWAPPED, MASKS_NAME),
        masks,
        raises=ValueError,
        match=f"{MASKS_NAME}: mask {TENSOR}' prunes 1 weights that are nonzero in "
        r".*model\.safetensors",
    ),
    Fault(
        "masks:masked-weight-changed",
        WEIGHT_NUDGED,
        masks,
        raises=ValueError,
        match=f"model\\.safetensors: weight {TENSOR}' does not match its checksum recorded in "
        f".*{MASKS_NAME}",
    ),
    Fault(
        "masks:no-checksums-still-load",
        without_checksums(dense_dir, MASKS_NAME),
        masks,
        check=loads_same_masks,
    ),
]

LOAD_ROWS += [
    Fault(
        "masks:truncated",
        rewrite_bytes(MASKS_NAME, lambda b: b[:-10]),
        masks,
        raises=ValueError,
        match=f"masks file .*{MASKS_NAME} is not a readable",
    ),
    Fault(
        "masks:garbage",
        rewrite_bytes(MASKS_NAME, lambda b: b"{}" * 40),
        masks,
        raises=ValueError,
        match=f"masks file .*{MASKS_NAME} is not a readable",
    ),
    Fault(
        "masks:dtype",
        masks_uint8,
        masks,
        raises=ValueError,
        match=f"{MASKS_NAME}: mask {TENSOR}' has dtype",
    ),
    Fault(
        "masks:from-another-save",
        masks_from_another_save,
        masks,
        raises=ValueError,
        match=f"{MASKS_NAME}: mask {TENSOR}'.*disagrees with .*config\\.json",
    ),
    Fault(
        "masks:record-says-none",
        rewrite_config(set_record("masks_file", None), dense_dir),
        masks,
        raises=ValueError,
        match=f"{MASKS_NAME} does not belong",
    ),
    Fault(
        "masks:missing",
        lambda tmp: {**dense_dir(tmp), "_": (tmp / "out" / MASKS_NAME).unlink()},
        masks,
        raises=FileNotFoundError,
        match=MASKS_NAME,
    ),
    Fault(
        "record:config-garbage",
        rewrite_bytes("config.json", lambda b: b"\xff\xfe garbage"),
        lambda ctx: read_sparsity_metadata(ctx["dir"]),
        raises=ValueError,
        match=r"config\.json "
        r"is not valid "
        r"JSON",
    ),
    Fault(
        "record:not-a-mapping",
        rewrite_config(lambda c: c.__setitem__("hf_mfac_sparsity", [1, 2]), dense_dir),
        lambda ctx: read_sparsity_metadata(ctx["dir"]),
        raises=ValueError,
        match=r"config\.json: "
        r"the 'hf_mfac",
    ),
    Fault(
        "record:num-pruned-too-large",
        rewrite_config(
            lambda c: c["hf_mfac_sparsity"]["per_layer"][
                min(c["hf_mfac_sparsity"]["per_layer"])
            ].update(num_pruned=10**9),
            dense_dir,
        ),
        masks,
        raises=ValueError,
        match=r"config\.json: "
        r".*per_layer\[",
    ),
]


# -- model cards
# ---------------------------------------------------------------------------------------------


def card_dir(tmp):
    ctx = dense_dir(tmp)
    (ctx["dir"] / "README.md").write_text(README)
    return ctx


def card(**kw):
    return lambda ctx: create_sparse_model_card(ctx["dir"], **kw)


def card_commit_fails(n, after=False):
    def act(ctx):
        with fails_on(os, "replace", n, interrupt, after):
            create_sparse_model_card(ctx["dir"], eval_results={"accuracy": 0.5}, datasets="glue")

    return act


def card_with_plot(tmp):
    ctx = card_dir(tmp)
    create_sparse_model_card(ctx["dir"])  # README with our section + the plot
    return ctx


def card_write_fails(ctx):
    from huggingface_hub import ModelCard

    with fails_on(ModelCard, "save", 1, lambda a: disk_full((None, a[1]))):
        create_sparse_model_card(ctx["dir"])


def two_start_markers(tmp):
    ctx = card_dir(tmp)
    # the user's own text holds a start marker: which one a later update would use is unclear
    (ctx["dir"] / "README.md").write_text(README + "\n<!-- hf_mfac:start (mine) -->\n")
    return ctx


CARD_ROWS = [
    Fault(
        "card:base-model-newline",
        card_dir,
        card(base_model="org/m\n---\nlicense: evil"),
        raises=ValueError,
        match="base_model=",
    ),
    Fault(
        "card:method-newline",
        card_dir,
        card(method="obert\n<!-- hf_mfac:end -->"),
        raises=ValueError,
        match="method=",
    ),
    Fault(
        "card:dataset-name-cr",
        card_dir,
        card(dataset_name="glue\rx", eval_results={"acc": 1.0}),
        raises=ValueError,
        match="dataset_name=",
    ),
    Fault(
        "card:metric-name-newline",
        card_dir,
        card(eval_results={"acc\nx: 1": 1.0}, datasets="glue"),
        raises=ValueError,
        match="metric names",
    ),
    Fault(
        "card:tag-line-separator",
        card_dir,
        card(tags=["ok", "bad\u2028tag"]),
        raises=ValueError,
        match="tags=",
    ),
    Fault(
        "card:repo-id-newline",
        card_dir,
        card(repo_id="me/x\n- y"),
        raises=ValueError,
        match="repo_id=",
    ),
    Fault(
        "card:evalresult-newline",
        card_dir,
        lambda ctx: create_sparse_model_card(
            ctx["dir"],
            eval_results=[
                __import__("huggingface_hub").EvalResult(
                    task_type="text-classification",
                    dataset_type="glue",
                    dataset_name="glue\n---",
                    metric_type="acc",
                    metric_value=1.0,
                )
            ],
        ),
        raises=ValueError,
        match="EvalResult.dataset_name=",
    ),
    Fault(
        "card:second-start-marker-in-user-text",
        two_start_markers,
        card(),
        raises=ValueError,
        match="markers",
    ),
    Fault(
        "card:broken-config",
        rewrite_bytes("config.json", lambda b: b[:30]),
        card(),
        raises=ValueError,
        match=r"config\.json is not valid JSON",
    ),
    Fault(
        "card:readme-write-fails",
        card_with_plot,
        card_write_fails,
        raises=OSError,
        match="README.md",
        check=no_leftovers,
    ),
]


# -- nothing secret reaches a card, in any field or spelling -------------------------------

HF_TOKEN = "hf_" + "Zq7" * 12
SECRETS = ("S3cr3tPw", "S3cr3t", HF_TOKEN)


def no_secret_written(ctx, _result):
    """No file of the folder holds a secret, in any spelling (plain or percent-encoded)."""
    from urllib.parse import quote

    for name, data in snapshot(ctx["dir"]).items():
        for secret in SECRETS:
            for spelling in {secret, quote(secret, safe="")}:
                assert spelling.encode() not in data, f"{secret!r} reached {name}"


def card_with_secret_readme(tmp):
    ctx = dense_dir(tmp)
    (ctx["dir"] / "README.md").write_text(
        "---\nlicense: mit\nsource: https://bob:S3cr3tPw@git.example/x\n---\n# Mine\n\n"
        f"Pull with {HF_TOKEN}.\n"
    )
    return ctx


def eval_result(**kw):
    from huggingface_hub import EvalResult

    return EvalResult(
        **{
            "task_type": "text-classification",
            "dataset_type": "glue",
            "dataset_name": "glue",
            "metric_type": "acc",
            "metric_value": 1.0,
            **kw,
        }
    )


EVERY_FIELD = dict(
    model_name=f"m-{HF_TOKEN}",
    repo_id=f"me/{HF_TOKEN}",
    tags=[HF_TOKEN],
    datasets=[f"d-{HF_TOKEN}"],
    description=f"Made with {HF_TOKEN}",
    license=HF_TOKEN,
    language=HF_TOKEN,
    method=HF_TOKEN,
    eval_results={f"acc-{HF_TOKEN}": 0.5},
)
CARD_ROWS += [
    Fault(
        "card:secret-in-base-model-url",
        dense_dir,
        card(base_model="https://alice:S3cr3tPw@host/x"),
        check=no_secret_written,
    ),
    Fault(
        "card:percent-encoded-userinfo",
        dense_dir,
        card(
            base_model="https%3A//alice%3AS3cr3tPw%40host/x",
            dataset_name="alice%3AS3cr3t%40host",
            datasets="glue",
            eval_results={"accuracy": 0.5},
        ),
        check=no_secret_written,
    ),
    Fault("card:hf-token-in-every-field", dense_dir, card(**EVERY_FIELD), check=no_secret_written),
    Fault(
        "card:hf-token-in-an-eval-result",
        dense_dir,
        lambda ctx: create_sparse_model_card(
            ctx["dir"], eval_results=[eval_result(dataset_name=f"glue {HF_TOKEN}")]
        ),
        check=no_secret_written,
    ),
    Fault(
        "card:secrets-in-an-existing-card", card_with_secret_readme, card(), check=no_secret_written
    ),
]


# -- a diverged run still gets its card ------------------------------------------------------


def says_left_out(*pairs):
    """The card was written: each ``(metric, value)`` is named in the text and absent from
    model-index."""

    def check(ctx, _result):
        from huggingface_hub import ModelCard

        card = ModelCard.load(ctx["dir"] / "README.md")
        in_index = {r.metric_type for r in card.data.eval_results or []}
        for metric, value in pairs:
            assert f"{metric} = {value}" in card.text, (metric, card.text)
            assert metric not in in_index, (metric, in_index)

    return check


def trainer_card_with_nan_loss(ctx):
    """``MFACTrainer.create_model_card`` after an evaluation whose loss diverged."""
    from transformers import TrainingArguments

    from hf_mfac.integrations import MFACTrainer

    model, _ = model_and_masks()
    args = TrainingArguments(output_dir=str(ctx["dir"]), report_to=[], use_cpu=True)
    trainer = MFACTrainer(model=model, args=args)
    trainer.state.log_history.append({"eval_loss": float("nan"), "eval_accuracy": 0.5, "step": 1})
    trainer.create_model_card(dataset="glue", tasks="text-classification")


NAN_METRICS = {"loss": float("nan"), "accuracy": 0.5, "perplexity": float("inf")}
CARD_ROWS += [
    Fault(
        "card:nan-and-inf-metrics",
        dense_dir,
        card(eval_results=NAN_METRICS, datasets="glue"),
        check=says_left_out(("loss", "nan"), ("perplexity", "inf")),
    ),
    Fault(
        "card:nan-evalresult",
        dense_dir,
        lambda ctx: create_sparse_model_card(
            ctx["dir"], eval_results=[eval_result(metric_type="f1", metric_value=float("-inf"))]
        ),
        check=says_left_out(("f1", "-inf")),
    ),
    Fault(
        "card:trainer-eval-loss-nan",
        dense_dir,
        trainer_card_with_nan_loss,
        check=says_left_out(("loss", "nan")),
    ),
]
# withdraw plot, README; install plot, README
for n, after in ((1, False), (2, True), (3, False), (4, True)):
    CARD_ROWS.append(
        Fault(
            f"card:interrupted-at-rename-{n}{'-after' if after else ''}",
            card_with_plot,
            card_commit_fails(n, after),
            raises=KeyboardInterrupt,
            match="interrupted",
            check=no_leftovers,
        )
    )


# -- hf-mfac prune's result folders -----------------------------------------------------------


@contextlib.contextmanager
def fails_on_write(n, exc, after=False):
    """Python's ``open`` (``builtins.open`` and ``io.open``, which ``pathlib`` uses) raising
    ``exc(args)`` on its ``n``-th call that opens a file for writing (after opening it when
    ``after``: an empty file is left)."""
    import builtins
    import io

    real, calls = builtins.open, [0]

    def wrapper(file, mode="r", *args, **kwargs):
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        calls[0] += writes
        if writes and calls[0] == n and not after:
            raise exc((file,))
        f = real(file, mode, *args, **kwargs)
        if writes and calls[0] == n:
            f.close()
            raise exc((file,))
        return f

    with mock.patch.object(builtins, "open", wrapper), mock.patch.object(io, "open", wrapper):
        yield calls


def tokenizer(folder):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie"]
    (folder / "vocab.txt").write_text("\n".join(words))
    return BertTokenizer(str(folder / "vocab.txt"))


def prune_result(ctx, seed=0):
    from hf_mfac.integrations.cli import save_prune_result

    if seed == 0:
        model, masks = ctx["model"], ctx["masks"]
    else:
        model, masks = model_and_masks(seed=seed, sparsity=0.3)
    save_prune_result(
        str(ctx["dir"]),
        model,
        masks,
        {"target": 0.5, "seed": seed},
        tokenizer=ctx["tok"],
        method="magnitude",
        pattern=None,
        recipe={"sparsity": 0.5},
        command="hf-mfac prune m",
        eval_results={"accuracy": 0.5},
    )


def result_folder(previous: bool, probe=None):
    """A pruned model, a tokenizer and ``tmp/out``: absent, or (``previous``) holding an earlier
    result of :func:`save_prune_result` with a README edited by hand; with ``probe`` (a context
    manager factory taking the call number), the calls a save over a copy makes are counted
    (``ctx["calls"]``)."""

    def build(tmp):
        model, masks = model_and_masks()
        ctx = {"model": model, "masks": masks, "tok": tokenizer(tmp), "dir": tmp / "out"}
        if previous:
            prune_result(ctx, seed=1)
            readme = ctx["dir"] / "README.md"
            readme.write_text(readme.read_text() + "\nMy own notes.\n")
        if probe is not None:
            copy = tmp / "probe" / "out"
            if previous:
                shutil.copytree(ctx["dir"], copy)
            with probe(0) as calls:
                prune_result({**ctx, "dir": copy})
            ctx["calls"] = calls[0]
        return ctx

    return build


def result_interrupted(ctx_manager, n, after=False):
    def act(ctx):
        with ctx_manager(nth({"renames": ctx.get("calls", 0)}, n), interrupt, after):
            prune_result(ctx)

    return act


def nothing_or_previous(ctx, _result):
    """No staging folder left, and a folder that did not exist still does not."""
    no_leftovers(ctx, _result)
    left = sorted(p.name for p in ctx["dir"].parent.iterdir())
    assert ctx["dir"].exists() == ctx["previous"], left


def with_previous(build, previous):
    return lambda tmp: {**build(tmp), "previous": previous}


def os_call(name):
    return lambda n, exc, after=False: fails_on(os, name, n, exc, after)


def tokenizer_save(n, exc, after=False):
    from transformers import PreTrainedTokenizerBase

    return fails_on(PreTrainedTokenizerBase, "save_pretrained", n, exc, after)


def weights_save(n, exc, after=False):
    return fails_on(modeling_utils(), "safe_save_file", n, exc, after)


def masks_save(n, exc, after=False):
    return fails_on(st_module(), "save_file", n, exc, after)


def counting(manager):
    return lambda k: manager(k, interrupt)


CLI_ROWS = []
for previous in (False, True):
    where = "over-a-result" if previous else "new-folder"
    # every write: config, tokenizer_config.json, report, (the README copied in,) plot, README
    probes = [
        ("write", fails_on_write, n, after) for n in (1, 2, 3, 4, "last") for after in (False, True)
    ]
    probes += [
        ("weights", weights_save, 1, False),
        ("masks", masks_save, 1, True),
        ("tokenizer", tokenizer_save, 1, False),
        ("tokenizer", tokenizer_save, 1, True),
    ]
    if previous:
        probes += [
            ("replace", os_call("replace"), n, a) for n in (1, "mid", "last") for a in (False, True)
        ]
    else:
        probes += [("rename", os_call("rename"), 1, a) for a in (False, True)]
    for what, manager, n, after in probes:
        probe = counting(manager) if n in ("mid", "last") else None
        name = f"cli-result:{where}:interrupted-at-{what}-{n}{'-after' if after else ''}"
        CLI_ROWS.append(
            Fault(
                name,
                with_previous(result_folder(previous, probe), previous),
                result_interrupted(manager, n, after),
                raises=KeyboardInterrupt,
                match="interrupted",
                check=nothing_or_previous,
                watch=("model", "masks", "dir"),
            )
        )


def cli_run(tmp):
    """A saved tiny model, a CSV of its words and ``tmp/out`` (absent) for ``hf-mfac prune``."""
    from conftest import save_tiny_text_model

    model_dir, words = save_tiny_text_model(tmp)
    rows = "".join(f"the {w} movie,{i % 2}\n" for i, w in enumerate(words * 2))
    (tmp / "data.csv").write_text("text,label\n" + rows)
    return {"model_dir": model_dir, "data": tmp / "data.csv", "dir": tmp / "out", "previous": False}


def cli_interrupted(manager, n=1, after=False):
    def act(ctx):
        from hf_mfac.integrations import cli

        with manager(n, interrupt, after):
            cli.main(
                [
                    "prune",
                    str(ctx["model_dir"]),
                    "--data",
                    str(ctx["data"]),
                    "--method",
                    "magnitude",
                    "--sparsity",
                    "0.5",
                    "--output_dir",
                    str(ctx["dir"]),
                    "--no_progress",
                ]
            )

    return act


def card_save(n, exc, after=False):
    from huggingface_hub import ModelCard

    return fails_on(ModelCard, "save", n, exc, after)


CLI_ROWS += [
    Fault(
        "cli:interrupted-at-tokenizer-save",
        cli_run,
        cli_interrupted(tokenizer_save),
        raises=KeyboardInterrupt,
        match="interrupted",
        check=nothing_or_previous,
    ),
    Fault(
        "cli:interrupted-at-card-save",
        cli_run,
        cli_interrupted(card_save),
        raises=KeyboardInterrupt,
        match="interrupted",
        check=nothing_or_previous,
    ),
]


def trainer_saves_with_hub_token(ctx):
    """``MFACTrainer.save_model`` with a hub token in its arguments (``push_to_hub`` uploads it)."""
    from transformers import TrainingArguments

    from hf_mfac.integrations import MFACTrainer

    model, _ = model_and_masks()
    args = TrainingArguments(
        output_dir=str(ctx["dir"]), report_to=[], use_cpu=True, hub_token=HF_TOKEN
    )
    trainer = MFACTrainer(model=model, args=args)
    trainer.save_model()
    assert trainer.args.hub_token == HF_TOKEN  # still there for the upload


CARD_ROWS += [
    Fault(
        "trainer:training-args-without-hub-token",
        lambda tmp: {"dir": tmp / "run"},
        trainer_saves_with_hub_token,
        check=no_secret_written,
    ),
]


CASES = SAVE_ROWS + LOAD_ROWS + CARD_ROWS + CLI_ROWS
