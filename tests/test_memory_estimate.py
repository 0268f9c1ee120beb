"""Memory: what the host has available (MemAvailable, not MemFree), read through patched readers so
that the tests do not depend on this machine's state."""

from __future__ import annotations

import sys

import pytest

from hf_mfac.core import _checks


def _no_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError


def test_read_meminfo_parses_kb(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text(
        "MemTotal:       24000000 kB\nMemFree:          1000 kB\nMemAvailable:    7340032 kB\n"
        "HugePages_Total:       0\n"
    )
    info = _checks.read_meminfo(str(p))
    assert info["MemAvailable"] == 7340032 * 1024
    assert info["MemFree"] == 1000 * 1024
    assert info["HugePages_Total"] == 0
    assert _checks.read_meminfo(str(tmp_path / "missing")) == {}


def test_cpu_free_bytes_is_mem_available(monkeypatch):
    _no_psutil(monkeypatch)
    monkeypatch.setattr(
        _checks, "read_meminfo", lambda path=None: {"MemFree": 1 << 20, "MemAvailable": 7 << 30}
    )
    monkeypatch.setattr(
        _checks.os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096
    )
    assert _checks.free_bytes("cpu") == 7 << 30


def test_cpu_free_bytes_falls_back_to_free_pages(monkeypatch):
    _no_psutil(monkeypatch)
    monkeypatch.setattr(_checks, "read_meminfo", lambda path=None: {})
    monkeypatch.setattr(
        _checks.os, "sysconf", lambda name: 3 if name == "SC_AVPHYS_PAGES" else 4096
    )
    assert _checks.free_bytes("cpu") == 3 * 4096


def test_cpu_free_bytes_prefers_psutil(monkeypatch):
    class VM:
        available = 5 << 30

    class FakePsutil:
        @staticmethod
        def virtual_memory():
            return VM()

    monkeypatch.setitem(sys.modules, "psutil", FakePsutil)
    monkeypatch.setattr(_checks, "read_meminfo", lambda path=None: {"MemAvailable": 7 << 30})
    assert _checks.free_bytes("cpu") == 5 << 30


def test_unknown_device_is_none():
    assert _checks.free_bytes("meta") is None


# -- the gradient chunk, sized by the Fisher and the device
# -------------------------------------------------------
def test_chunk_grows_with_the_fisher(monkeypatch):
    from hf_mfac.pruning import grads

    D = 84_900_000  # BERT-base's encoder-linear targets: 340 MB a gradient
    assert grads.default_chunk_size(D, 128) == 1  # within 256 MiB alone: less than one gradient
    acc = D * 33 * 8  # the fp64 packed accumulator at B = 32
    k = grads.default_chunk_size(D, 128, fisher_bytes=acc)
    assert (
        k == int(acc * grads.CHUNK_FISHER_FRACTION) // (4 * D) and k >= 4
    )  # GEMMs over several gradients
    assert grads.default_chunk_size(1000, 128, fisher_bytes=acc) == grads.CHUNK_ROWS
    assert grads.default_chunk_size(1000, 5, fisher_bytes=acc) == 5
    # and never more than a quarter of what the device has available
    monkeypatch.setattr(grads, "free_bytes", lambda device: 8 * 4 * D)
    assert grads.default_chunk_size(D, 128, fisher_bytes=acc, device="cpu") == 2


def test_collect_grads_sizes_its_chunk_by_the_sink_fisher():
    import torch
    from hf_mfac.core import BlockFisherInverse
    from hf_mfac.pruning import grads

    fisher = BlockFisherInverse(10, 4, rel_damp=1e-2)
    assert grads._sink_bytes(fisher.add_grads) == fisher.storage_bytes() > 0
    assert grads._sink_bytes(lambda chunk: None) is None
    assert grads._sink_bytes(torch.Tensor.add_) is None


# -- estimate_memory
# ---------------------------------------------------------------------------------------------
def _meta_bert(hidden=64, layers=2):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=32,
    )
    with torch.device("meta"):
        return BertForSequenceClassification(cfg)


def test_estimate_on_the_meta_device_is_the_fisher_plus_the_vectors():
    import torch
    from hf_mfac.pruning import estimate_memory, find_prunable

    model = _meta_bert()
    D = sum(
        t.numel() for t in find_prunable(model).values()
    )  # 12 h^2 per layer: no padding at B = 32
    est = estimate_memory(model, "obert", num_grads=64)
    assert set(est) == {"cpu"} and all(p.is_meta for p in model.parameters())  # nothing allocated
    acc = (
        D // 32 * 33 * 16 * 4
    )  # packed fp32 sums (m = 64 at rel_damp 1e-2), the inverse written over them
    assert est.parts["cpu"]["fisher accumulator"] == acc
    tiny = estimate_memory(
        model, "obert", num_grads=64, rel_damp=1e-6
    )  # fp64 sums by the error bound
    assert tiny.parts["cpu"]["fisher accumulator"] == 2 * acc
    assert est.parts["cpu"]["gradient chunk"] == 32 * 4 * D  # 32 gradients: small beside 256 MiB
    assert est["cpu"] == sum(est.parts["cpu"].values())
    assert (
        acc + 32 * 4 * D < est["cpu"] < acc + 32 * 4 * D + 64 * D
    )  # the restore copy and O(D) vectors
    # the restore copy is taken when the first step writes its result, not in the phases before
    # it; with recompute > 1 it is held through the later steps' phases
    assert "restore copy" not in est.parts["cpu"]
    again = estimate_memory(model, "obert", num_grads=64, recompute=2)
    assert again.parts["cpu"]["restore copy"] == 4 * D and again["cpu"] == est["cpu"] + 4 * D
    assert est.settings["block_size"] == 32 and est.settings["num_grads"] == 64
    assert "MiB" in est.describe()
    # more layers, more memory in proportion; an fp64 inverse keeps whole fp64 blocks
    assert estimate_memory(_meta_bert(layers=4), "obert", num_grads=64)["cpu"] == 2 * est["cpu"]
    f64 = estimate_memory(model, "obert", num_grads=64, fisher_dtype=torch.float64)
    assert f64.parts["cpu"]["fisher accumulator"] == D * 32 * 8
    assert estimate_memory(model, "obert", num_grads=64, block_size=16)["cpu"] < est["cpu"]


def test_estimate_static_mfac_holds_its_gradients_and_cap_its_orders():
    from hf_mfac.pruning import estimate_memory, find_prunable

    model = _meta_bert()
    D = sum(t.numel() for t in find_prunable(model).values())
    mfac = estimate_memory(model, "mfac", num_grads=32)
    assert mfac.parts["cpu"]["gradients G"] == 32 * D * 4 and mfac["cpu"] > 32 * D * 4
    cap, obert = (
        estimate_memory(model, "cap", num_grads=64),
        estimate_memory(model, "obert", num_grads=64),
    )
    assert cap["cpu"] >= obert["cpu"]
    assert estimate_memory(model, "magnitude")["cpu"] < obert["cpu"] / 5


def test_estimate_takes_the_larger_phase_and_splits_a_placed_fisher():
    from hf_mfac.core.fisher import block_fisher_bytes
    from hf_mfac.pruning import estimate_memory, find_prunable
    from hf_mfac.pruning.memory import _GRAD_PHASE, _OBS_STEP

    model = _meta_bert()
    D = sum(t.numel() for t in find_prunable(model).values())
    nb = D // 32
    whole = estimate_memory(model, "obert", num_grads=64)
    # the gradient phase: accumulator + chunk + its vectors (the step's vectors are fewer)
    assert set(whole.parts["cpu"]) == {"fisher accumulator", "gradient chunk", "gradient phase"}
    assert _OBS_STEP < _GRAD_PHASE + 4 * whole.settings["chunk_size"]
    # an fp64 sum is twice the packed fp32 inverse written over its first half
    acc, inv = block_fisher_bytes(D, 32, num_grads=64, rel_damp=1e-6)
    assert acc == 2 * inv
    placement = [("cuda:1", 0, nb // 4), ("cuda:0", nb // 4, nb)]
    est = estimate_memory(model, "obert", num_grads=64, device="cuda:0", placement=placement,
                          chunk_size=4)
    assert set(est) == {"cpu", "cuda:0", "cuda:1"}
    assert est["cpu"] == est.parts["cpu"]["restore copy"] == 4 * D
    quarter = est.parts["cuda:1"]
    assert quarter["fisher accumulator"] == whole.parts["cpu"]["fisher accumulator"] // 4
    assert quarter["gradient chunk"] == 4 * 4 * (D // 4)
    # the step's vectors go to the work device only: there the step is the larger phase
    step = estimate_memory(model, "obert", num_grads=64, device="cuda:0", chunk_size=1,
                           placement=[("cuda:1", 0, nb - 1), ("cuda:0", nb - 1, nb)])
    assert step.parts["cuda:0"]["step"] == _OBS_STEP * D
    assert "step" not in step.parts["cuda:1"]
    # device as prune_oneshot takes it: one device with its room is the plain estimate
    assert estimate_memory(model, "obert", num_grads=64, device={"cpu": 1 << 40}) == whole
    # the same device twice (two slots, the first too small for every block): the parts add up
    # on it, to the same need as one part (the step's vectors are the smaller phase here)
    two = estimate_memory(model, "obert", num_grads=64, chunk_size=32,
                          device=[("cpu", whole["cpu"] // 3), ("cpu", 1 << 40)])
    assert set(two) == {"cpu"} and two["cpu"] == estimate_memory(
        model, "obert", num_grads=64, chunk_size=32)["cpu"]


# -- placement plan over given capacities
# ------------------------------------------------------------------------
def test_placement_fills_the_largest_accelerator_first_then_the_cpu():
    from hf_mfac.pruning.memory import plan_fisher_placement

    caps = {"cpu": 100, "cuda:0": 30, "cuda:1": 55}
    plan = plan_fisher_placement(20, 5, caps)  # 100 bytes of blocks
    assert plan == {"cuda:1": (0, 11), "cuda:0": (11, 17), "cpu": (17, 20)}
    # the ranges cover every block once, contiguously, within each device's capacity
    spans = sorted(plan.values())
    assert (
        spans[0][0] == 0
        and spans[-1][1] == 20
        and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    )
    assert all((e - s) * 5 <= caps[d] for d, (s, e) in plan.items())
    # what each device needs besides its blocks comes off its room; unused devices are left out
    assert plan_fisher_placement(20, 5, caps, per_device_bytes=10) == {
        "cuda:1": (0, 9),
        "cuda:0": (9, 13),
        "cpu": (13, 20),
    }
    assert plan_fisher_placement(4, 5, caps) == {"cuda:1": (0, 3), "cuda:0": (3, 4)}
    assert plan_fisher_placement(0, 5, caps) == {}


def test_placement_that_cannot_fit_names_the_shortfall():
    from hf_mfac.pruning.memory import plan_fisher_placement

    with pytest.raises(MemoryError, match=r"need .* GiB.*lower block_size"):
        plan_fisher_placement(100, 1 << 30, {"cuda:0": 40 << 30, "cpu": 20 << 30})
    with pytest.raises(ValueError, match="block_bytes"):
        plan_fisher_placement(3, 0, {"cpu": 10})


def test_check_estimate_refuses_with_the_need_and_what_fits():
    from hf_mfac.pruning import find_prunable
    from hf_mfac.pruning.memory import check_estimate, estimate_pruner
    from hf_mfac.pruning.pruners import make_pruner

    model = _meta_bert()
    targets = find_prunable(model)
    pruner = make_pruner("obert", block_size=32)
    est = estimate_pruner(pruner, targets, 64)
    check_estimate(est, pruner, targets, 64, available={"cpu": est["cpu"]})  # fits exactly: passes
    check_estimate(est, pruner, targets, 64, available={"cpu": None})  # unknown: passes
    half = estimate_pruner(make_pruner("obert", block_size=16), targets, 64)["cpu"]
    with pytest.raises(
        MemoryError,
        match=r"needs an estimated .* MiB on cpu .* only .* MiB is available "
        r"there; settings that fit: block_size=16",
    ):
        check_estimate(est, pruner, targets, 64, available={"cpu": half})
    with pytest.raises(MemoryError, match="no smaller block size fits"):
        check_estimate(est, pruner, targets, 64, available={"cpu": 1000})
    mfac = make_pruner("mfac")
    est = estimate_pruner(mfac, targets, 64)
    with pytest.raises(MemoryError, match=r"num_grads=32"):
        check_estimate(est, mfac, targets, 64, available={"cpu": est["cpu"] - 1})


# -- prune_oneshot: the estimate and the time split in the report
# ---------------------------------------------------
@pytest.mark.parametrize("method", ["obert", "cap", "mfac"])
def test_report_splits_the_time_and_records_the_estimate(method):
    import copy

    import torch
    from hf_mfac.pruning import estimate_memory, prune_oneshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch["x"]), batch["y"])

    g = torch.Generator().manual_seed(1)
    data = [
        {"x": torch.randn(4, 8, generator=g), "y": torch.randint(0, 4, (4,), generator=g)}
        for _ in range(8)
    ]
    kw = dict(method=method, sparsity=0.5, num_grads=8, exclude=None, progress=False,
              recompute=2)
    r = prune_oneshot(copy.deepcopy(model), data, loss_fn=loss_fn, **kw).report
    assert r.memory_estimate == dict(
        estimate_memory(model, **{k: v for k, v in kw.items() if k != "progress"})
    )
    assert (
        0 < r.time_forward_backward and r.time_forward_backward + r.time_accumulate <= r.time_grads
    )
    assert r.time_invert > 0  # the block Fisher's inversion or static M-FAC's precomputation
    assert r.time_invert + r.time_select_update == pytest.approx(r.time_prune)
    assert sum(s["time_invert"] for s in r.steps) == pytest.approx(r.time_invert)
    if method != "mfac":
        assert r.time_accumulate > 0
    assert "inversion" in r.to_markdown()


def test_trim_host_heap_is_harmless():
    from hf_mfac.core._checks import trim_host_heap

    first = trim_host_heap()
    assert isinstance(first, bool) and trim_host_heap() == first  # callable again, same answer
