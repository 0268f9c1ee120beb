"""One-shot pruning over tiny BERT models: every method x pattern x scope, exactness, masks, OBS
properties, errors.

Properties checked on a tiny BERT trained for a few hundred steps on a synthetic task (evaluated on
held-out batches): the OBS update beats zeroing the same weights; recomputation does not hurt (it
helps a lot at 80%); second-order methods beat magnitude at high sparsity; CAP removing one weight
is OBS.
"""
import copy

import pytest
import torch
from torch import nn

from hf_mfac.pruning import (PRUNERS, FisherCache, Layout, Pattern, collect_grads, find_prunable,
                             make_pruner,
                             prune_oneshot,
                             prune_sweep)

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402


def tiny_config(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def batches(n=256, bs=8, seed=0, labels=True):
    """Label = how many of the tokens 7 and 9 occur (0, 1, 2): learnable by a tiny BERT in ~200
    steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, 10), generator=g)
    y = (ids == 7).any(1).long() + (ids == 9).any(1).long()
    out = []
    for i in range(0, n, bs):
        b = {"input_ids": ids[i : i + bs], "attention_mask": torch.ones(bs, 10, dtype=torch.long)}
        if labels:
            b["labels"] = y[i : i + bs]
        out.append(b)
    return out


@torch.no_grad()
def eval_loss(model, data):
    model.eval()
    return sum(float(model(**b).loss) for b in data) / len(data)


@pytest.fixture(scope="module")
def random_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config())


@pytest.fixture(scope="module")
def trained_bert():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config())
    data = batches()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for i in range(300):
        loss = model(**data[i % len(data)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


HELDOUT = batches(seed=1)
CALIB = batches(n=256)

# (method, pattern, scope): every supported combination
CASES = [
    (m, p, s)
    for m in sorted(PRUNERS)
    for p in (None, "2:4", "4-block")
    for s in ("global", "layer")
    if not (m == "cap" and p == "4-block")
]


def kwargs_for(method):
    return {} if method == "magnitude" else {"block_size": 16, "num_grads": 16}


def _ids(case):
    return "-".join(str(x) for x in case)


# -- exactness
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_exact_sparsity_and_zeros(case, random_bert):
    method, pattern, scope = case
    model = copy.deepcopy(random_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsity = None if pattern == "2:4" else 0.6
    masks, report = prune_oneshot(
        model,
        CALIB,
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        scope=scope,
        recompute=2,
        progress=False,
        **kwargs_for(method),
    )
    targets = find_prunable(model)
    assert set(masks) == set(targets)
    for name, mask in masks.items():
        w = targets[name].detach()
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert bool((w[~mask] == 0).all()), "pruned weights must be exactly zero"
        n = mask.numel()
        pruned = int((~mask).sum())
        if pattern == "2:4":
            assert bool(((~mask).reshape(-1, 4).sum(1) == 2).all())
        elif pattern == "4-block":
            groups = (~mask).reshape(-1, 4)
            assert bool((groups.all(1) | ~groups.any(1)).all()), "4-blocks are pruned whole"
            if scope == "layer":
                assert pruned == 4 * round(0.6 * n / 4)
        elif scope == "layer":
            assert pruned == round(0.6 * n)
    total = sum(m.numel() for m in masks.values())
    pruned_total = sum(int((~m).sum()) for m in masks.values())
    if pattern is None and scope == "global":
        assert pruned_total == round(0.6 * total)
    if pattern == "4-block" and scope == "global":
        assert pruned_total == 4 * round(0.6 * total / 4)
    assert report.sparsity == pytest.approx(pruned_total / total)
    # only the targets changed: embeddings, biases, norms, pooler and classifier are untouched
    target_names = set(masks)
    for k, v in model.state_dict().items():
        if k not in target_names:
            assert torch.equal(v, before[k]), k
    assert set(report.layers) == target_names
    assert len(report.steps) == 2  # recompute=2 (N:M: 4:4 -> 3:4 -> 2:4)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_masks_never_regrow(case, random_bert):
    method, pattern, scope = case
    model = copy.deepcopy(random_bert)
    kw = dict(method=method, scope=scope, progress=False, **kwargs_for(method))
    if pattern == "2:4":
        first, _ = prune_oneshot(model, CALIB, pattern="3:4", **kw)
        second, _ = prune_oneshot(model, CALIB, pattern="2:4", masks=first, recompute=2, **kw)
        history = [first, second]
    else:
        results = prune_sweep(model, CALIB, [0.3, 0.5, 0.7], pattern=pattern, recompute=2, **kw)
        history = [r.masks for r in results]
    for old, new in zip(history, history[1:]):
        for name in old:
            assert not bool((new[name] & ~old[name]).any()), f"{name} regrew"
            assert int((~new[name]).sum()) >= int((~old[name]).sum())
    targets = find_prunable(model)
    for name, mask in history[-1].items():
        assert bool((targets[name][~mask] == 0).all())


# -- second-order properties (on a trained tiny BERT, held-out loss)
# --------------------------------------------
def _zeroed(model, masks):
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, mask in masks.items():
            params[k].mul_(mask)
    return m


@pytest.mark.parametrize(
    "method,pattern",
    [
        ("obert", None),
        ("obert", "2:4"),
        ("obert", "4-block"),
        ("mfac", None),
        ("mfac", "4-block"),
        ("cap", None),
        ("cap", "2:4"),
    ],
)
def test_obs_update_beats_zeroing(method, pattern, trained_bert):
    model = copy.deepcopy(trained_bert)
    masks, _ = prune_oneshot(
        model,
        CALIB,
        method=method,
        sparsity=None if pattern == "2:4" else 0.6,
        pattern=pattern,
        num_grads=32,
        block_size=16,
        progress=False,
    )
    assert eval_loss(model, HELDOUT) < eval_loss(_zeroed(trained_bert, masks), HELDOUT)


@pytest.mark.parametrize("method,update", [("obert", "joint"), ("obert", "summed"), ("cap", None)])
def test_recompute_does_not_hurt(method, update, trained_bert):
    losses = {}
    for rc in (1, 4):
        model = copy.deepcopy(trained_bert)
        prune_oneshot(
            model,
            CALIB,
            method=make_pruner(method, block_size=16, update=update),
            sparsity=0.8,
            num_grads=32,
            recompute=rc,
            progress=False,
        )
        losses[rc] = eval_loss(model, HELDOUT)
    assert losses[4] <= losses[1] * 1.02
    # at 80% the summed update is far off after one step: recomputing helps a lot
    if update == "summed":
        assert losses[4] < 0.75 * losses[1]


def test_ordering_at_high_sparsity(trained_bert):
    """The papers' ordering on this model at 80%: CAP <= oBERT < magnitude (held-out loss). With
    oBERT's joint block update the two second-order methods are level on this tiny model (0.133
    each, within 2 %), both far below magnitude (0.99); on all-MiniLM-L6-v2 CAP leads by 2.5 points
    (benchmarks/RESULTS.md)."""
    loss = {}
    for method in ("magnitude", "obert", "cap"):
        model = copy.deepcopy(trained_bert)
        kw = {} if method == "magnitude" else {"block_size": 16, "num_grads": 32}
        prune_oneshot(model, CALIB, method=method, sparsity=0.8, progress=False, **kw)
        loss[method] = eval_loss(model, HELDOUT)
    assert loss["cap"] <= 1.02 * loss["obert"] and loss["obert"] < 0.5 * loss["magnitude"]


def test_woodtaylor_runs_and_is_exact(trained_bert):
    for method in ("obert", "mfac"):
        model = copy.deepcopy(trained_bert)
        masks, rep = prune_oneshot(
            model,
            CALIB,
            method=method,
            sparsity=0.5,
            woodtaylor=True,
            num_grads=32,
            block_size=16,
            progress=False,
        )
        assert rep.woodtaylor and rep.sparsity == pytest.approx(0.5, abs=1e-4)
        assert torch.isfinite(torch.tensor(eval_loss(model, HELDOUT)))


def test_mfac_matches_obert_when_blocks_align(trained_bert):
    """Static M-FAC and the block Fisher are the same inverse when blocks coincide (all targets % 16
    == 0): with the same (summed) update they prune and update alike."""
    out = {}
    for method in ("obert", "mfac"):
        model = copy.deepcopy(trained_bert)
        pruner = make_pruner(method, block_size=16, damp=1e-4, update="summed")
        masks, _ = prune_oneshot(
            model, CALIB, method=pruner, sparsity=0.5, num_grads=32, progress=False
        )
        out[method] = (masks, find_prunable(model))
    for name in out["obert"][0]:
        assert torch.equal(out["obert"][0][name], out["mfac"][0][name])
        torch.testing.assert_close(
            out["obert"][1][name], out["mfac"][1][name], rtol=1e-3, atol=1e-5
        )


def test_mfac_paging_gives_the_same_result(trained_bert):
    res = []
    for page in (None, 4096):
        model = copy.deepcopy(trained_bert)
        masks, _ = prune_oneshot(
            model,
            CALIB,
            method="mfac",
            sparsity=0.5,
            num_grads=16,
            block_size=64,
            page_bytes=page,
            progress=False,
        )
        res.append((masks, find_prunable(model)))
    for name in res[0][0]:
        assert torch.equal(res[0][0][name], res[1][0][name])
        torch.testing.assert_close(res[0][1][name], res[1][1][name])


def test_cap_removing_one_weight_is_obs(trained_bert):
    out = {}
    for method in ("obert", "cap"):
        model = copy.deepcopy(trained_bert)
        n = sum(p.numel() for p in find_prunable(model).values())
        masks, _ = prune_oneshot(
            model,
            CALIB,
            method=method,
            sparsity=1.0 / n,
            num_grads=32,
            block_size=16,
            damp=1e-4,
            progress=False,
        )
        assert sum(int((~m).sum()) for m in masks.values()) == 1
        out[method] = (masks, find_prunable(model))
    for name in out["obert"][0]:
        assert torch.equal(out["obert"][0][name], out["cap"][0][name])
        torch.testing.assert_close(out["obert"][1][name], out["cap"][1][name], rtol=1e-3, atol=1e-6)


# -- gradients, targets, report
# ----------------------------------------------------------------------------------
def test_collect_grads_streams_the_same_gradients(random_bert):
    model = copy.deepcopy(random_bert).train()
    layout = Layout(find_prunable(model), pad=16)
    full = collect_grads(model, CALIB, 6, params=layout, progress=False)
    assert full.G.shape == (6, layout.dim) and full.G.device.type == "cpu"
    chunks = []
    stats = collect_grads(
        model,
        CALIB,
        6,
        params=layout,
        sink=lambda c: chunks.append(c.clone()),
        chunk_size=4,
        progress=False,
    )
    assert [c.shape[0] for c in chunks] == [4, 2]
    torch.testing.assert_close(torch.cat(chunks), full.G)
    torch.testing.assert_close(stats.mean, full.G.mean(0))
    assert model.training, "train mode is restored"
    assert all(p.grad is None for p in model.parameters()), ".grad is left alone"
    # padding coordinates carry no gradient
    assert bool((full.G[:, ~layout.valid()] == 0).all())
    per = collect_grads(model, CALIB, 16, params=layout, per_sample=True, progress=False)
    assert per.num_grads == 16 and per.num_samples == 16
    fb = collect_grads(model, CALIB, 8, params=layout, fisher_batch_size=4, progress=False)
    assert fb.num_samples == 32
    # the mean of the per-sample gradients of one batch is that batch's gradient
    torch.testing.assert_close(per.G[:8].mean(0), full.G[0], rtol=1e-4, atol=1e-6)


def test_find_prunable_defaults_and_patterns(random_bert):
    names = list(find_prunable(random_bert))
    assert all(".encoder." in n and n.endswith(".weight") for n in names)
    assert not any(k in n for n in names for k in ("embeddings", "pooler", "classifier"))
    only_q = find_prunable(random_bert, include=r"attention\.self\.query")
    assert list(only_q) == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
    ]
    with_head = find_prunable(random_bert, exclude=None)
    assert "classifier.weight" in with_head and "bert.pooler.dense.weight" in with_head


def test_report(random_bert):
    model = copy.deepcopy(random_bert)
    _, rep = prune_oneshot(
        model,
        CALIB,
        method="obert",
        sparsity=0.5,
        num_grads=8,
        block_size=16,
        recompute=3,
        progress=False,
    )
    assert len(rep.steps) == 3 and [s["sparsity"] for s in rep.steps] == sorted(
        s["sparsity"] for s in rep.steps
    )
    assert rep.time_total >= rep.time_grads + rep.time_prune * 0.99 and 0 < rep.grad_share < 1
    assert rep.loss_increase == pytest.approx(sum(r["loss_increase"] for r in rep.layers.values()))
    md = rep.to_markdown()
    assert "bert.encoder.layer.0.attention.self.query.weight" in md and "obert" in md
    assert rep.to_dict()["grad_share"] == rep.grad_share
    _, mag = prune_oneshot(copy.deepcopy(random_bert), method="magnitude", sparsity=0.5)
    assert mag.loss_increase is None and mag.time_grads == 0


class CountingLoader(list):
    """A list of batches that counts the batches taken from it (a collection of 8 gradients takes
    8)."""

    taken = 0

    def __iter__(self):
        for b in super().__iter__():
            self.taken += 1
            yield b


def test_fisher_cache_reuses_the_first_fisher_exactly(random_bert):
    """A comparison from one dense model: obert and cap at two sparsities share one gradient
    collection (same block Fisher), static M-FAC gets its own; every result is bit-identical to the
    run without the cache; a run from other weights, other masks or another damp misses; recompute >
    1 reuses only its first step."""
    loader = CountingLoader(CALIB)
    cache = FisherCache(max_entries=2)
    runs = [
        ("obert", 0.5),
        ("cap", 0.5),
        ("obert", 0.7),
        ("cap", 0.7),
        ("mfac", 0.5),
        ("mfac", 0.7),
    ]
    for method, sp in runs:
        kw = dict(method=method, sparsity=sp, num_grads=8, block_size=16, damp=1e-4, progress=False)
        a, b = copy.deepcopy(random_bert), copy.deepcopy(random_bert)
        masks_a, rep_a = prune_oneshot(a, loader, fisher_cache=cache, **kw)
        masks_b, _ = prune_oneshot(b, CALIB, **kw)
        assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_b), method
        assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters())), method
        assert rep_a.fisher_reused == ((method, sp) not in [("obert", 0.5), ("mfac", 0.5)])
        assert (rep_a.time_grads == 0) == rep_a.fisher_reused
    assert loader.taken == 2 * 8 and (cache.hits, cache.misses) == (4, 2) and len(cache) == 2
    assert "reused from the cache" in rep_a.to_markdown()
    # anything the Fisher depends on changes: a miss
    other = copy.deepcopy(random_bert)
    with torch.no_grad():
        # an embedding: not a target, but it changes the gradients
        next(other.parameters()).mul_(1.0001)
    _, rep = prune_oneshot(
        other,
        loader,
        method="obert",
        sparsity=0.5,
        num_grads=8,
        block_size=16,
        damp=1e-4,
        fisher_cache=cache,
        progress=False,
    )
    assert not rep.fisher_reused
    _, rep = prune_oneshot(
        copy.deepcopy(random_bert),
        loader,
        method="obert",
        sparsity=0.5,
        num_grads=8,
        block_size=16,
        damp=1e-3,
        fisher_cache=cache,
        progress=False,
    )
    assert not rep.fisher_reused
    # recompute: the first step hits, the second (pruned weights) collects
    before = loader.taken
    _, rep = prune_oneshot(
        copy.deepcopy(random_bert),
        loader,
        method="obert",
        sparsity=0.6,
        num_grads=8,
        block_size=16,
        damp=1e-3,
        recompute=2,
        fisher_cache=cache,
        progress=False,
    )
    assert rep.fisher_reused and loader.taken == before + 8
    assert rep.steps[0]["time_grads"] == 0 and rep.steps[1]["time_grads"] > 0
    cache.clear()
    assert len(cache) == 0


def test_sweep_calls_save_fn(random_bert):
    model = copy.deepcopy(random_bert)
    seen = []
    prune_sweep(
        model,
        CALIB,
        [0.2, 0.4],
        method="obert",
        num_grads=8,
        block_size=16,
        progress=False,
        save_fn=lambda s, m, masks, rep: seen.append((s, round(rep.sparsity, 3))),
    )
    assert seen == [(0.2, 0.2), (0.4, 0.4)]


# -- bad input: clear errors, and no weight touched
# -------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="obert", sparsity=1.0), "sparsity"),
        (dict(method="obert", sparsity=-0.1), "sparsity"),
        (dict(method="nope", sparsity=0.5), "unknown pruning method"),
        (dict(method="obert", sparsity=0.5, include="no_such_module"), "matches no"),
        (dict(method="obert", pattern="2:4", block_size=6), "multiple of 4"),
        (dict(method="obert", pattern="3:5", block_size=10), "divisible by 5"),
        (dict(method="obert", pattern="2:4", sparsity=0.7), "contradicts"),
        (dict(method="obert", pattern="2-of-4", sparsity=0.5), "unknown sparsity pattern"),
        (dict(method="cap", pattern="4-block", sparsity=0.5), "does not support"),
        (dict(method="cap", sparsity=0.5, woodtaylor=True), "woodtaylor"),
        (dict(method="obert", sparsity=0.5, scope="model"), "scope"),
        (dict(method="obert", sparsity=0.5, num_grads=1000), "gives at most 32 gradients"),
        (dict(method="obert", sparsity=0.5, recompute=0), "recompute"),
    ],
)
def test_bad_input_raises_before_touching_weights(kwargs, match, random_bert):
    model = copy.deepcopy(random_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"num_grads": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_oneshot(model, CALIB, progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_runtime_data_errors_leave_weights_alone(random_bert):
    model = copy.deepcopy(random_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no loss"):
        prune_oneshot(
            model,
            batches(n=64, labels=False),
            method="obert",
            sparsity=0.5,
            num_grads=4,
            progress=False,
        )
    # no len(): found while collecting
    with pytest.raises(ValueError, match="ran out after 3 gradients"):
        prune_oneshot(
            model, (b for b in CALIB[:3]), method="obert", sparsity=0.5, num_grads=4, progress=False
        )
    with pytest.raises(ValueError, match="iterated again"):
        prune_oneshot(
            model,
            iter(CALIB),
            method="obert",
            sparsity=0.5,
            num_grads=4,
            recompute=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="needs gradients"):
        prune_oneshot(model, None, method="cap", sparsity=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mask_errors(random_bert):
    model = copy.deepcopy(random_bert)
    masks, _ = prune_oneshot(model, method="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match="below the current sparsity"):
        prune_oneshot(model, method="magnitude", sparsity=0.3, masks=masks)
    name = next(iter(masks))
    with pytest.raises(ValueError, match="shape"):
        prune_oneshot(model, method="magnitude", sparsity=0.6, masks={name: masks[name][:2]})
    with pytest.raises(ValueError, match="not pruning targets"):
        prune_oneshot(
            model,
            method="magnitude",
            sparsity=0.6,
            masks={"classifier.weight": torch.ones(3, 32).bool()},
        )


def test_pattern_parsing():
    assert Pattern.parse("2:4") == Pattern("nm", 2, 4) and Pattern.parse((2, 4)) == Pattern(
        "nm", 2, 4
    )
    for spec in ("4-block", "block4", "1x4", "group:4"):
        assert Pattern.parse(spec) == Pattern("group", 0, 4)
    assert Pattern.parse(None).kind == Pattern.parse("unstructured").kind == "unstructured"
    with pytest.raises(ValueError):
        Pattern.parse("4:2")


def test_conv_targets_and_nm_shape_check():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x, labels):
            logits = self.fc(self.conv(x).mean((2, 3)))
            return {"loss": nn.functional.cross_entropy(logits, labels)}

    torch.manual_seed(0)
    net = Net()
    data = [{"x": torch.randn(4, 3, 6, 6), "labels": torch.randint(0, 4, (4,))} for _ in range(8)]
    masks, rep = prune_oneshot(
        net, data, method="obert", sparsity=0.5, num_grads=8, block_size=8, progress=False
    )
    assert set(masks) == {"conv.weight", "fc.weight"} and rep.sparsity == pytest.approx(
        0.5, abs=1e-3
    )
    with pytest.raises(ValueError, match="conv.weight"):
        prune_oneshot(net, data, method="obert", pattern="2:4", num_grads=8, block_size=8)


def test_pruner_instance(random_bert):
    from hf_mfac.pruning import OBSPruner

    pruner = OBSPruner(block_size=16, pattern="4-block", scope="layer")
    model = copy.deepcopy(random_bert)
    masks, rep = prune_oneshot(
        model, CALIB, method=pruner, sparsity=0.5, num_grads=8, progress=False
    )
    assert rep.pattern == "4-block" and rep.scope == "layer" and rep.block_size == 16
    with pytest.raises(ValueError, match="set on the Pruner instance"):
        prune_oneshot(model, CALIB, method=pruner, sparsity=0.6, pattern="2:4", num_grads=8)


# -- all or nothing, settings from a PruningConfig
# ----------------------------------------------------------------
@pytest.mark.parametrize(
    "exc", [ValueError("bad batch"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_failed_recomputation_leaves_the_model_as_it_was(exc, random_bert):
    """recompute=3 failing in step 2 (after step 1 pruned and updated the weights): every parameter
    comes back bit for bit and the exception propagates."""
    model = copy.deepcopy(random_bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 10:
            raise exc
        return m(**batch).loss

    with pytest.raises(type(exc)):
        prune_oneshot(
            model,
            CALIB,
            method="obert",
            sparsity=0.6,
            num_grads=8,
            block_size=16,
            recompute=3,
            loss_fn=loss_fn,
            progress=False,
        )
    assert len(calls) == 10
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_block_size_beyond_every_target_is_the_largest_target(random_bert, caplog):
    """Every target is padded to whole blocks: a block of 4096 over targets of at most 2048 weights
    is the block of 2048 (same masks and weights), with a note."""
    runs = []
    for B in (4096, 2048):
        model = copy.deepcopy(random_bert)
        with caplog.at_level("INFO", logger="hf_mfac"):
            masks, rep = prune_oneshot(
                model,
                CALIB,
                method="obert",
                sparsity=0.5,
                num_grads=4,
                block_size=B,
                include=r"intermediate|output\.dense",
                progress=False,
            )
        runs.append((masks, find_prunable(model, include=r"intermediate|output\.dense"), rep))
    assert (
        runs[0][2].block_size == 2048
        and "block_size=4096 is larger than every pruning target" in caplog.text
    )
    for name in runs[1][0]:
        assert torch.equal(runs[0][0][name], runs[1][0][name])
        torch.testing.assert_close(runs[0][1][name], runs[1][1][name])


def test_config_fills_what_the_keywords_leave(random_bert, caplog):
    from hf_mfac.pruning import PruningConfig

    config = PruningConfig(method="obert", sparsity=0.5, num_grads=4, block_size=16, recompute=2)
    a, b = copy.deepcopy(random_bert), copy.deepcopy(random_bert)
    # the keyword wins
    masks_a, rep_a = prune_oneshot(a, CALIB, config=config, sparsity=0.6, progress=False)
    masks_b, rep_b = prune_oneshot(
        b,
        CALIB,
        method="obert",
        sparsity=0.6,
        num_grads=4,
        block_size=16,
        recompute=2,
        progress=False,
    )
    assert rep_a.block_size == 16 and rep_a.num_grads == 4 and len(rep_a.steps) == 2
    assert rep_a.sparsity == pytest.approx(0.6, abs=1e-4)
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_b)
    # one config for every method: magnitude notes the Fisher settings it does not use
    with caplog.at_level("INFO", logger="hf_mfac"):
        _, rep = prune_oneshot(
            copy.deepcopy(random_bert), CALIB, config=config, method="magnitude", progress=False
        )
    assert rep.method == "magnitude" and "ignoring" in caplog.text and "num_grads" in caplog.text
    with pytest.raises(ValueError, match="prune_sweep"):
        prune_oneshot(
            copy.deepcopy(random_bert), CALIB, config=PruningConfig(sparsities=[0.3, 0.5])
        )
    with pytest.raises(TypeError, match="PruningConfig"):
        prune_oneshot(copy.deepcopy(random_bert), CALIB, config={"sparsity": 0.5})


def _modes(model) -> dict:
    return {name: m.training for name, m in model.named_modules()}


def test_every_module_keeps_its_train_eval_mode(random_bert):
    """A model in train mode with a part in eval mode (and the reverse) comes back with each
    module's own mode, after a run and after a run that fails in its second step."""
    from hf_mfac.pruning import PruningConfig

    config = PruningConfig(method="obert", sparsity=0.4, num_grads=4, block_size=16)
    model = copy.deepcopy(random_bert).train()
    model.bert.encoder.layer[0].eval()
    before = _modes(model)
    prune_oneshot(model, CALIB, config, progress=False)
    assert _modes(model) == before and not model.bert.encoder.layer[0].attention.self.training

    calls = [0]

    def failing(model, batch):
        calls[0] += 1
        if calls[0] == 6:
            raise ValueError("loss failed on purpose")
        return model(**batch).loss

    model.eval()
    model.classifier.train()
    before = _modes(model)
    with pytest.raises(ValueError, match="on purpose"):
        prune_oneshot(model, CALIB, config, recompute=2, loss_fn=failing, progress=False)
    assert _modes(model) == before and model.classifier.training and not model.bert.training


def test_inference_mode_is_named(random_bert):
    """Under torch.inference_mode() autograd is off: the error says so and what to do (it used to
    blame requires_grad); magnitude pruning needs no gradients and runs."""
    model = copy.deepcopy(random_bert)
    named = r"inside torch\.inference_mode\(\).*outside"
    with torch.inference_mode(), pytest.raises(RuntimeError, match=named):
        prune_oneshot(model, CALIB, method="obert", sparsity=0.5, num_grads=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), random_bert.parameters()))
    with torch.inference_mode():
        _, rep = prune_oneshot(model, method="magnitude", sparsity=0.5)
    assert rep.sparsity == pytest.approx(0.5, abs=1e-3)


def test_config_as_a_value(random_bert):
    """``prune_oneshot(model, dataloader, config)`` (keywords override it) and
    ``prune_sweep(..., config=)`` give what the keywords give."""
    from hf_mfac.pruning import PruningConfig

    config = PruningConfig(method="magnitude", sparsity=0.3, scope="layer", include="intermediate")
    a, b, c = (copy.deepcopy(random_bert) for _ in range(3))
    masks_a, rep_a = prune_oneshot(a, None, config, sparsity=0.5)
    masks_b, _ = prune_oneshot(
        b, method="magnitude", sparsity=0.5, scope="layer", include="intermediate"
    )
    assert rep_a.sparsity == pytest.approx(0.5, abs=1e-3) and rep_a.scope == "layer"
    assert masks_a.keys() == masks_b.keys() and all("intermediate" in n for n in masks_a)
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_b)
    sweep = prune_sweep(c, None, config=config.replace(sparsity=None, sparsities=[0.2, 0.5]))
    assert [r.report.target_sparsity for r in sweep] == [0.2, 0.5]
    assert all(torch.equal(sweep[-1].masks[n], masks_b[n]) for n in masks_b)
    with pytest.raises(ValueError, match="give at least one target sparsity"):
        prune_sweep(copy.deepcopy(random_bert), None, config=config)
