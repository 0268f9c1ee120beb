"""The Fisher placed over several devices (hf_mfac.pruning.placement): the plan as a pure function
of given capacities, the devices checked before any work, a placed run equal to the one-device run
(several "cpu" slots here: the same code path as several devices), and a model dispatched by
accelerate pruned as it is."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from hf_mfac.pruning import FisherPart, plan_fisher_placement, plan_placement, prune_oneshot
from hf_mfac.pruning.placement import (
    check_device,
    home_placement,
    parse_fisher_device,
    place_fisher,
)

GiB = 1 << 30


# -- the plan, a pure function of the capacities --------------------------------------------------
def _covers(plan, n):
    assert plan[0].start == 0 and plan[-1].stop == n
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(plan, plan[1:]))


def test_accelerators_share_in_proportion_to_their_room_and_the_cpu_gets_nothing():
    caps = {"cpu": 1000, "cuda:0": 100, "cuda:1": 300}
    plan = plan_placement(20, 10, caps)  # rooms: 10 and 30 blocks for 20
    assert plan == [FisherPart("cuda:1", 0, 15), FisherPart("cuda:0", 15, 20)]
    # the same capacities give the same plan, in any order of the mapping
    assert plan_placement(20, 10, dict(reversed(list(caps.items())))) == plan


def test_when_the_accelerators_cannot_hold_all_they_fill_and_the_cpu_takes_the_rest():
    caps = {"cpu": 100, "cuda:0": 30, "cuda:1": 55}
    assert plan_fisher_placement(20, 5, caps) == {
        "cuda:1": (0, 11), "cuda:0": (11, 17), "cpu": (17, 20)}
    # what a device needs besides its blocks comes off its room
    assert plan_fisher_placement(20, 5, caps, per_device_bytes=10) == {
        "cuda:1": (0, 9), "cuda:0": (9, 13), "cpu": (13, 20)}
    assert plan_fisher_placement(0, 5, caps) == {}


def test_several_cpu_slots_and_a_reserve_off_the_first_slot_of_its_device():
    slots = [("cpu", 400), ("cpu", 200), ("cpu", 200)]
    assert plan_placement(8, 50, slots) == [
        FisherPart("cpu", 0, 4), FisherPart("cpu", 4, 6), FisherPart("cpu", 6, 8)]
    # 200 bytes of the work device's vectors come off the first "cpu" slot only
    plan = plan_placement(8, 50, slots, per_device_bytes={"cpu": 200})
    assert [p.stop - p.start for p in plan] == [3, 3, 2] or [p.stop - p.start for p in plan] == [
        2, 3, 3]
    _covers(plan, 8)


def test_the_ranges_follow_the_weights_home_devices():
    caps = {"cuda:0": 10 * GiB, "cuda:1": 30 * GiB}
    # the first half of the blocks belongs to weights on cuda:0: cuda:0 takes the first range
    homes = ["cuda:0"] * 10 + ["cuda:1"] * 10
    plan = plan_placement(20, 1 << 20, caps, homes=homes)
    assert [p.device for p in plan] == ["cuda:0", "cuda:1"]
    assert plan[0] == FisherPart("cuda:0", 0, 5)  # still in proportion to the room (1:3)
    assert home_placement(["cpu", "cpu", "cuda:0", "cuda:0", "cpu"]) == [
        FisherPart("cpu", 0, 2), FisherPart("cuda:0", 2, 4), FisherPart("cpu", 4, 5)]


def test_unknown_capacity_is_unbounded_and_zero_room_gets_nothing():
    assert plan_placement(7, 3, [("cpu", None)]) == [FisherPart("cpu", 0, 7)]
    assert plan_placement(7, 3, {"cuda:0": 2, "cpu": None}) == [FisherPart("cpu", 0, 7)]


@pytest.mark.parametrize("seed", range(40))
def test_random_capacities_give_contiguous_plans_within_every_room(seed):
    rng = random.Random(seed)
    n, size = rng.randint(1, 500), rng.randint(1, 64)
    slots = [(rng.choice(["cpu", "cuda:0", "cuda:1", "cuda:2"]), rng.randint(0, 300 * size))
             for _ in range(rng.randint(1, 5))]
    try:
        plan = plan_placement(n, size, slots)
    except MemoryError:
        assert sum(c // size for _, c in slots) < n
        return
    _covers(plan, n)
    # every slot within its room (the slots of one device counted together)
    for dev in {d for d, _ in slots}:
        room = sum(c // size for d, c in slots if d == dev)
        assert sum(p.stop - p.start for p in plan if p.device == dev) <= room
    # the CPU holds blocks only when the accelerators are full
    acc = sum(c // size for d, c in slots if d != "cpu")
    if any(p.device == "cpu" for p in plan):
        assert sum(p.stop - p.start for p in plan if p.device != "cpu") == acc
    assert plan == plan_placement(n, size, slots)


def test_a_plan_that_cannot_fit_names_the_shortfall():
    with pytest.raises(MemoryError, match=r"need 100\.00 GiB.*hold 60\.00 GiB.*lower block_size"):
        plan_placement(100, GiB, {"cuda:0": 40 * GiB, "cpu": 20 * GiB})
    with pytest.raises(ValueError, match="block_bytes"):
        plan_placement(3, 0, {"cpu": 10})
    with pytest.raises(ValueError, match="no device"):
        plan_placement(3, 1, [])


# -- the devices, checked -------------------------------------------------------------------------
def test_device_specs_are_parsed_and_checked():
    assert parse_fisher_device(None) is None
    assert parse_fisher_device("cpu") == torch.device("cpu")
    assert parse_fisher_device("cpu:3") == torch.device("cpu")
    assert parse_fisher_device({"cpu": 100}) == [(torch.device("cpu"), 100)]
    slots = parse_fisher_device([("cpu", 5), "cpu"])
    assert slots[0] == (torch.device("cpu"), 5) and slots[1][0] == torch.device("cpu")
    auto = parse_fisher_device("auto")
    assert auto[-1][0] == torch.device("cpu")
    assert len(auto) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.parametrize("spec, error, match", [
    ("tpu7", ValueError, r"device='tpu7' is not a device"),
    ("cuda:97", ValueError, r"device='cuda:97' does not exist"),
    (97, ValueError, r"device=97 does not exist"),
    ("meta", ValueError, "meta device"),
    (True, TypeError, "must be a device"),
    ([], ValueError, "names no device"),
    ([("cpu", -1)], ValueError, r"capacity of cpu .* got -1"),
    ([("cpu", "lots")], ValueError, r"capacity of cpu"),
    ([("cpu", 1, 2)], ValueError, r"\(device, capacity bytes\) pair"),
])
def test_bad_device_specs_are_refused(spec, error, match):
    with pytest.raises(error, match=match):
        parse_fisher_device(spec)


def test_check_device_names_what_it_checks():
    with pytest.raises(ValueError, match=r"the pruner's device='cuda:5'"):
        check_device("cuda:5", "the pruner's device")


# -- a run placed over several slots equals the one-device run ------------------------------------
class MLP(nn.Module):
    def __init__(self, dead: bool = False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 8), nn.Linear(8, 3)
        self.d = nn.Linear(8, 8)  # without gradient when ``dead`` (its output is multiplied by 0)
        self.dead = dead

    def forward(self, x, labels):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        if self.dead:
            h = h + 0.0 * self.d(h)
        out = self.c(h)
        return {"loss": nn.functional.cross_entropy(out, labels)}


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, 16, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


SLOTS = [("cpu", 80_000), ("cpu", 40_000), ("cpu", 30_000)]


def _both(model, data, **kw):
    base = dict(num_grads=16, block_size=8, exclude=None, progress=False, **kw)
    if ":" not in kw.get("pattern", ""):
        base.setdefault("sparsity", 0.6)
    one, placed = copy.deepcopy(model), copy.deepcopy(model)
    r1 = prune_oneshot(one, data, **base)
    r2 = prune_oneshot(placed, data, device=SLOTS, **base)
    return one, placed, r1, r2


@pytest.mark.parametrize("kw", [
    dict(method="obert"),
    dict(method="obert", scope="layer"),
    dict(method="cap"),
    dict(method="cap", scope="layer"),
    dict(method="obert", woodtaylor=True),
    dict(method="obert", pattern="2:4"),
    dict(method="obert", pattern="4-block"),
    dict(method="cap", pattern="2:4"),
    dict(method="obert", recompute=3),
    dict(method="obert", damp=1e-4),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_placed_run_equals_the_one_device_run(kw):
    torch.manual_seed(0)
    one, placed, r1, r2 = _both(MLP(), _data(), **kw)
    assert len(r2.report.placement) == 3 and r2.report.work_device == "cpu"
    blocks = [tuple(p["blocks"]) for p in r2.report.placement]
    assert blocks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert blocks[0][1] < 48  # target a (48 blocks) is split between two parts
    assert r1.report.placement == [{"device": "cpu", "blocks": [0, blocks[-1][1]]}]
    for name in r1.masks:
        assert torch.equal(r1.masks[name], r2.masks[name]), name
    for (name, p), q in zip(one.named_parameters(), placed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert "Fisher placed over 3 parts" in r2.report.to_markdown()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_relative_damping_over_all_parts_with_a_target_without_gradient(scope):
    """The relative damping is the mean diagonal over all parts' blocks (per target with
    scope="layer"); a target without gradient takes the smallest damping of all targets, not of
    its part's."""
    torch.manual_seed(1)
    one, placed, r1, r2 = _both(MLP(dead=True), _data(), method="obert", scope=scope)
    assert r2.report.placement[-1]["blocks"][1] == 75 + 8  # d's 8 blocks in the last part
    for name in r1.masks:
        assert torch.equal(r1.masks[name], r2.masks[name]), name
    for p, q in zip(one.parameters(), placed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_one_slot_or_one_part_is_the_one_device_run():
    torch.manual_seed(0)
    model, data = MLP(), _data()
    r = prune_oneshot(copy.deepcopy(model), data, method="obert", sparsity=0.5, num_grads=16,
                      block_size=8, exclude=None, progress=False, device=[("cpu", GiB), ("cpu", 0)])
    assert len(r.report.placement) == 1  # the first slot holds everything
    r = prune_oneshot(copy.deepcopy(model), data, method="mfac", sparsity=0.5, num_grads=16,
                      exclude=None, progress=False, device=["cpu", "cpu"])
    assert r.report.sparsity == pytest.approx(0.5, abs=1e-3)
    r = prune_oneshot(copy.deepcopy(model), data, method="magnitude", sparsity=0.5,
                      exclude=None, progress=False, device=SLOTS)
    assert r.report.placement is None


def test_fisher_cache_keys_on_the_placement():
    from hf_mfac.pruning import FisherCache

    torch.manual_seed(0)
    model, data, cache = MLP(), _data(), FisherCache()
    kw = dict(sparsity=0.5, num_grads=16, block_size=8, exclude=None, progress=False,
              fisher_cache=cache)
    prune_oneshot(copy.deepcopy(model), data, method="obert", device=SLOTS, **kw)
    r = prune_oneshot(copy.deepcopy(model), data, method="cap", device=SLOTS, **kw)
    assert r.report.fisher_reused and cache.hits == 1
    r = prune_oneshot(copy.deepcopy(model), data, method="cap", **kw)  # another placement
    assert not r.report.fisher_reused


def test_the_gradient_chunks_split_by_columns_equal_the_whole_chunks():
    from hf_mfac.pruning import Layout, collect_grads

    torch.manual_seed(0)
    model, data = MLP(), _data(8)
    layout = Layout({n: p for n, p in model.named_parameters() if n.endswith("weight")}, pad=8)
    whole = collect_grads(model, data, 8, params=layout, chunk_size=3, progress=False)
    parts = [(0, 100, "cpu"), (100, 200, "cpu"), (200, layout.dim, "cpu")]
    split = collect_grads(model, data, 8, params=layout, chunk_size=3, progress=False, parts=parts)
    assert torch.equal(whole.G, split.G) and torch.equal(whole.mean, split.mean)
    with pytest.raises(ValueError, match="do not cover"):
        collect_grads(model, data, 8, params=layout, progress=False, parts=parts[:2])


# -- what a placement refuses, before any work ----------------------------------------------------
class _Counting(list):
    """Batches that count how often they were iterated (no work may start on a refused call)."""

    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


@pytest.mark.parametrize("device, error, match", [
    ("cuda:7", ValueError, r"device='cuda:7' does not exist"),
    ("gpu", ValueError, r"device='gpu' is not a device"),
    ([("cpu", 1000), ("cpu", 1000)], MemoryError,
     r"Fisher's 83 blocks need [\d.]+ KiB; the devices hold [\d.]+ KiB .*\(cpu 1\.0 KiB less "
     r"[\d.]+ KiB, cpu 1\.0 KiB\): lower block_size"),
])
def test_bad_devices_are_refused_before_any_work(device, error, match):
    torch.manual_seed(0)
    model, data = MLP(), _Counting(_data())
    before = copy.deepcopy(model.state_dict())
    _Counting.iterations = 0
    with pytest.raises(error, match=match):
        prune_oneshot(model, data, method="obert", sparsity=0.5, num_grads=16, block_size=8,
                      exclude=None, progress=False, device=device)
    assert _Counting.iterations == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_static_mfac_and_ranks_take_one_device():
    from hf_mfac.pruning import Layout, make_pruner

    model = MLP()
    targets = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    two = [(torch.device("cpu"), None), (torch.device("cuda", 0), None)]  # as parsed on a GPU box
    mfac = make_pruner("mfac")
    with pytest.raises(ValueError, match=r"'mfac' keeps its m gradients .* give one device"):
        place_fisher(mfac, Layout(targets, pad=mfac.pad), targets, two, 16)

    class Ranked:  # a pruner sharded over ranks
        runs_over_ranks, uses_fisher, block_size, pad, device, name = True, True, 8, 8, None, "x"

    with pytest.raises(ValueError, match="sharded over the ranks"):
        place_fisher(Ranked(), Layout(targets, pad=8), targets, two, 16)


def test_several_devices_under_several_ranks_are_refused(monkeypatch):
    import hf_mfac.pruning.oneshot as oneshot

    monkeypatch.setattr(oneshot, "_several_ranks", lambda method: True)
    with pytest.raises(ValueError, match="sharded over the ranks; give each rank one device"):
        prune_oneshot(MLP(), _data(), method="obert", sparsity=0.5, device="auto")


def test_targets_on_several_devices_get_their_blocks_at_home():
    """A dispatched model's targets on several devices: each block on its weight's device, the
    selection on the accelerator (a pure plan: the devices here are only labels)."""
    from hf_mfac.pruning import Layout, make_pruner

    targets = {"a": torch.zeros(4, 8), "b": torch.zeros(2, 8, device="meta"),
               "c": torch.zeros(4, 4)}
    pruner = make_pruner("obert", block_size=8)
    layout = Layout(targets, pad=8)
    placement = place_fisher(pruner, layout, targets, None, 16)
    assert placement.plan == [FisherPart("cpu", 0, 4), FisherPart("meta", 4, 6),
                              FisherPart("cpu", 6, 8)]
    assert placement.work_device == torch.device("meta")
    assert placement.coordinate_parts() == [(0, 32, "cpu"), (32, 48, "meta"), (48, 64, "cpu")]
    # one device, or the pruner's own, or static M-FAC: no placement
    assert place_fisher(pruner, layout, targets, torch.device("cpu"), 16) is None
    assert place_fisher(make_pruner("mfac"), Layout(targets), targets, None, 16) is None


# -- a model dispatched by accelerate -------------------------------------------------------------
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (4, 8), generator=g),
             "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(8)]
    return model, data


DEVICE_MAP = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu",
              "bert.encoder.layer.1": "cpu", "bert.pooler": "cpu", "dropout": "cpu",
              "classifier": "cpu"}


@pytest.mark.parametrize("method", ["obert", "cap"])
def test_a_model_dispatched_by_accelerate_prunes_as_it_is(method):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook

    model, data = _tiny_bert()
    plain = copy.deepcopy(model)
    dispatched = accelerate.dispatch_model(copy.deepcopy(model), device_map=DEVICE_MAP,
                                           force_hooks=True)
    hooks = {n: type(m._hf_hook) for n, m in dispatched.named_modules() if hasattr(m, "_hf_hook")}
    assert AlignDevicesHook in hooks.values() and "bert.encoder.layer.0" in hooks
    kw = dict(method=method, sparsity=0.5, num_grads=8, block_size=16, progress=False)
    r1 = prune_oneshot(plain, data, **kw)
    r2 = prune_oneshot(dispatched, data, **kw)
    for name in r1.masks:
        assert torch.equal(r1.masks[name], r2.masks[name]), name
    for p, q in zip(plain.parameters(), dispatched.parameters()):
        assert torch.equal(p, q)
    # the hooks are as they were, and the model still runs through them
    after = {n: type(m._hf_hook) for n, m in dispatched.named_modules() if hasattr(m, "_hf_hook")}
    assert after == hooks
    with torch.no_grad():
        torch.testing.assert_close(dispatched(**data[0]).logits, plain(**data[0]).logits)


def test_a_model_offloaded_by_accelerate_is_refused_before_any_work():
    accelerate = pytest.importorskip("accelerate")
    model, data = _tiny_bert()
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    stored = offloaded.bert.encoder.layer[0].attention.self.query._hf_hook.weights_map
    before = stored["weight"].clone()
    data = _Counting(data)
    _Counting.iterations = 0
    with pytest.raises(ValueError, match=r"offloaded by accelerate .* resident"):
        prune_oneshot(offloaded, data, method="obert", sparsity=0.5, num_grads=8, progress=False)
    assert _Counting.iterations == 0
    assert torch.equal(stored["weight"], before)
    with torch.no_grad():  # still runs
        torch.testing.assert_close(offloaded(**data[0]).logits, model(**data[0]).logits)


def test_the_mean_gradient_is_collected_only_when_asked_and_the_masked_rows_are_zero():
    from hf_mfac.pruning import Layout, collect_grads

    torch.manual_seed(0)
    model, data = MLP(), _data(8)
    layout = Layout({n: p for n, p in model.named_parameters() if n.endswith("weight")}, pad=8)
    keep = torch.rand(layout.dim) > 0.3
    full = collect_grads(model, data, 8, params=layout, keep=keep, progress=False)
    bare = collect_grads(model, data, 8, params=layout, keep=keep, progress=False, mean=False)
    assert bare.mean is None and torch.equal(full.G, bare.G)
    assert not bool(full.G[:, ~keep].any()) and bool(full.G[:, keep].any())
    torch.testing.assert_close(full.mean, full.G.double().mean(0).float())


def test_the_placed_inverse_answers_as_the_one_device_inverse():
    from hf_mfac.pruning import Layout, make_pruner
    from hf_mfac.pruning.placement import PlacedFisher

    torch.manual_seed(0)
    model = MLP()
    layout = Layout({n: p for n, p in model.named_parameters() if n.endswith("weight")}, pad=8)
    pruner = make_pruner("obert", block_size=8)
    G = torch.randn(16, layout.dim) * (torch.rand(layout.dim) > 0.1)
    one = pruner.new_fisher(layout.dim, 16, "cpu", groups=layout.layer_index())
    one.add_grads(G)
    plan = [FisherPart("cpu", 0, 30), FisherPart("cpu", 30, 31), FisherPart("cpu", 31, 83)]
    placed = PlacedFisher(pruner, plan, layout.dim, 16, "cpu", groups=layout.layer_index())
    placed.add_grads(G[:5])
    placed.add_grads(G[5:])
    finv = placed.finish()
    torch.testing.assert_close(finv.diag(), one.diag())
    torch.testing.assert_close(finv.diag(235, 250), one.diag()[235:250])  # across two parts
    x = torch.randn(layout.dim)
    torch.testing.assert_close(finv.mul(x), one.mul(x))
    idx = torch.tensor([[0, 1], [238, 239], [240, 241], [239, 240], [600, 663]])
    torch.testing.assert_close(finv.submatrix(idx), one.submatrix(idx))
    torch.testing.assert_close(finv.unpack(28, 33), one.unpack(28, 33))
    out = torch.empty(5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(finv.unpack(28, 33, out=out), one.unpack(28, 33).double(),
                               rtol=1e-5, atol=1e-6)
    assert finv.blocks() is finv and finv.num_blocks == 83
    assert finv.storage_bytes() == one.storage_bytes()


def test_auto_on_a_machine_without_gpu_is_the_cpu_and_the_cache_says_its_bytes():
    from hf_mfac.pruning import FisherCache, make_pruner

    torch.manual_seed(0)
    model, data = MLP(), _data()
    kw = dict(method="obert", sparsity=0.5, num_grads=16, block_size=8, exclude=None,
              progress=False)
    cache = FisherCache()
    r1 = prune_oneshot(copy.deepcopy(model), data, fisher_cache=cache, **kw)
    # the cached inverse: the packed fp32 blocks (83 blocks of 8 x 9 / 2 values), no mean gradient
    assert cache.storage_bytes() == 83 * 36 * 4
    assert cache.storage_bytes() < make_pruner("obert", block_size=8).fisher_bytes(664, 16) * 2
    if torch.cuda.is_available():
        return
    r2 = prune_oneshot(copy.deepcopy(model), data, device="auto", **kw)
    assert r2.report.placement == r1.report.placement == [{"device": "cpu", "blocks": [0, 83]}]
    for name in r1.masks:
        assert torch.equal(r1.masks[name], r2.masks[name])
    assert "Fisher placed" not in r2.report.to_markdown()


def test_targets_on_the_meta_device_are_refused_naming_them():
    from hf_mfac.pruning.placement import check_resident

    model = MLP()
    targets = {"a.weight": torch.zeros(24, 16, device="meta"), "b.weight": model.b.weight}
    with pytest.raises(ValueError, match=r"a\.weight are on the meta device \(no values\)"):
        check_resident(model, targets)
    check_resident(model, {"b.weight": model.b.weight})  # resident: passes


@pytest.mark.parametrize("method, woodtaylor", [("obert", False), ("obert", True), ("cap", False)])
def test_the_plan_keeps_each_device_within_its_capacity_by_the_memory_estimate(method, woodtaylor):
    """The plan sizes blocks as the estimate counts them: every accelerator's estimated peak fits
    the capacity it was given (a pure computation: the devices are labels)."""
    from hf_mfac.pruning import Layout, make_pruner
    from hf_mfac.pruning.memory import estimate_pruner

    model = MLP()
    targets = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    pruner = make_pruner(method, block_size=8, woodtaylor=woodtaylor)
    layout = Layout(targets, pad=8)
    caps = {"cuda:0": 30_000, "cuda:1": 20_000}  # together less than the Fisher
    spec = [(torch.device(d), c) for d, c in caps.items()] + [(torch.device("cpu"), None)]
    placement = place_fisher(pruner, layout, targets, spec, 16)
    assert sorted(p.device for p in placement.plan) == ["cpu", "cuda:0", "cuda:1"]
    assert placement.work_device == torch.device("cuda:0")  # the first accelerator given
    est = estimate_pruner(pruner, targets, 16, placement=placement.plan,
                          work_device=placement.work_device)
    for dev, cap in caps.items():
        assert est[dev] <= cap, (dev, est[dev], cap, est.describe())
    # and it uses the room it has (less what it keeps for the step's vectors on the work device,
    # counted on top of the gradient phase, where the estimate takes the larger of the two)
    assert est["cuda:0"] > 0.4 * caps["cuda:0"] and est["cuda:1"] > 0.8 * caps["cuda:1"]
