"""The pruning step in pages: the same masks and weights as the step over whole tensors.

The OBS and CAP steps read the packed inverse a page of blocks at a time, keep their scores in the
inverse's dtype, select with a paged radix selection instead of ``torch.kthvalue`` over a
concatenation, and build CAP's masks per page. Each test runs the step with tiny pages (many pages,
a radix selection even on a few hundred scores) and compares it bit for bit with the step as it
was written over whole tensors (the reference functions below: fp64 scores of the whole vector, a
stable sort for the selection, the whole (nb, B, B) blocks), and the selection itself with a stable
sort on ties, signed zeros, infinities and mixed dtypes.
"""
import pytest
import torch

import hf_mfac.core.masks as masks_mod
import hf_mfac.core.obs as obs_mod
import hf_mfac.pruning.pruners as pruners_mod
from hf_mfac.core.cap import cap_eliminate, order_dtype, prefix_mask
from hf_mfac.core.masks import lowest_k_masks, num_to_prune, threshold_masks
from hf_mfac.core.obs import block_obs_update, obs_scores, obs_update, obs_update_masked
from hf_mfac.pruning.pruners import make_pruner
from hf_mfac.pruning.targets import Layout


@pytest.fixture
def tiny_pages(monkeypatch):
    """Pages of a few entries everywhere: radix selection from 0 entries, 37-entry radix pages,
    13-coordinate score pages, one block per OBS update page."""
    monkeypatch.setattr(masks_mod, "RADIX_MIN", 0)
    monkeypatch.setattr(masks_mod, "_RADIX_PAGE", 37)
    monkeypatch.setattr(pruners_mod, "_SCORE_PAGE", 13)
    monkeypatch.setattr(obs_mod, "_PAGE_BYTES", {"cpu": 1})


def _stable_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[torch.sort(flat, stable=True).indices[:k]] = True
    return out


# -- the selection
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "ties", "signed zeros", "mixed dtypes", "fp64"])
def test_radix_selection_equals_a_stable_sort(kind, gen, monkeypatch):
    monkeypatch.setattr(masks_mod, "_RADIX_PAGE", 97)
    for trial in range(6):
        sizes = torch.randint(1, 400, (3,), generator=gen).tolist()
        ts = []
        for i, n in enumerate(sizes):
            if kind in ("ties", "signed zeros"):
                t = torch.randint(-3, 4, (n,), generator=gen).float() * 0.5
                if kind == "signed zeros":
                    t[t == 0] = -0.0
            else:
                t = torch.randn(n, generator=gen) * 10.0 ** (6 * trial - 15)
            if kind == "mixed dtypes":
                t = t.to([torch.float32, torch.float64, torch.float16][i])
            elif kind == "fp64":
                t = t.double()
            t[torch.rand(n, generator=gen) < 0.1] = -float("inf")
            t[torch.rand(n, generator=gen) < 0.05] = float("inf")
            ts.append(t)
        flat = torch.cat([t.double() for t in ts])
        total = flat.numel()
        for k in (0, 1, total // 3, total - 1, total):
            ref = _stable_lowest(flat, k).split(sizes)
            for radix_min in (0, 1 << 40):  # the radix selection and torch.kthvalue
                monkeypatch.setattr(masks_mod, "RADIX_MIN", radix_min)
                got = lowest_k_masks(ts, k)
                assert all(torch.equal(a, b) for a, b in zip(got, ref)), (kind, trial, k)


def test_radix_selection_writes_into_views_and_refuses_nan(monkeypatch):
    monkeypatch.setattr(masks_mod, "RADIX_MIN", 0)
    monkeypatch.setattr(masks_mod, "_RADIX_PAGE", 3)
    scores = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 4.0, 1.0])
    out = torch.zeros(9, dtype=torch.bool)
    threshold_masks([scores[:3], scores[3:]], 3 / 7, prune_mask_only=True,
                    out=[out[:3], out[5:]])
    assert out.tolist() == [False, True, False, False, False, True, False, False, True]
    with pytest.raises(FloatingPointError, match="NaN"):
        lowest_k_masks([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError, match="prune_mask_only"):
        threshold_masks([scores], 0.5, out=[out[:7]])


# -- references: the step over whole tensors
# -----------------------------------------------------------------
def _select_ref(layout, sc, sparsity, scope):
    """(D,) bool to prune: the old selection (per target slices, fp64, a stable sort)."""
    out = torch.zeros(layout.dim, dtype=torch.bool)
    sl = list(zip(layout.offsets, layout.numels))
    if scope == "layer":
        for o, c in sl:
            out[o : o + c] = _stable_lowest(sc[o : o + c], num_to_prune(c, sparsity))
        return out
    flat = torch.cat([sc[o : o + c] for o, c in sl])
    sel = _stable_lowest(flat, num_to_prune(flat.numel(), sparsity))
    for (o, c), part in zip(sl, sel.split([c for _, c in sl])):
        out[o : o + c] = part
    return out


def _obs_ref(pruner, layout, w, keep, finv, sparsity, u=None):
    """The unstructured OBS step as written over whole tensors: fp64 scores, the whole blocks."""
    B = pruner.block_size
    nb = layout.dim // B
    valid = layout.valid()
    sc = obs_scores(w, finv.diag(), u).to(torch.float64)
    sc = torch.where(keep, sc, torch.full_like(sc, -float("inf")))
    pruned = (_select_ref(layout, sc, sparsity, pruner.scope) | ~keep) & valid
    if pruner.update == "joint":
        new, _ = block_obs_update(w.view(nb, B), finv.blocks(), (pruned | ~keep).view(nb, B),
                                  None if u is None else u.view(nb, B))
        new_keep = keep & ~(pruned | ~keep)
        return new.view(-1) * new_keep, new_keep
    new = obs_update(finv, w, pruned.nonzero()[:, 0], u=u)
    return new, keep & ~pruned


def _cap_ref(pruner, layout, w, keep, finv, sparsity=None, zeros=None):
    """The CAP step as written over whole tensors: int64 orders, a stable sort of all losses."""
    B = pruner.block_size
    nb = layout.dim // B
    H = finv.blocks()
    W = w.view(nb, B)
    valid = layout.valid().view(nb, B)
    forced = ~keep.view(nb, B) & valid
    if zeros is not None:
        M = pruner.pattern.m
        order, losses = cap_eliminate(W, H, valid=valid, forced=forced, nm=(M - zeros, M))
        counts = torch.isfinite(losses).sum(1)
    else:
        order, losses = cap_eliminate(W, H, valid=valid, forced=forced)
        steps = torch.arange(B)[None, :]
        losses = torch.where(steps < forced.sum(1, keepdim=True), torch.full_like(losses, -1.0),
                             losses)
        if pruner.scope == "global":
            sel = _stable_lowest(losses.reshape(-1), num_to_prune(layout.numel, sparsity))
            counts = sel.view(nb, B).sum(1)
        else:
            block_layer = layout.layer_index().view(nb, B)[:, 0]
            counts = torch.zeros(nb, dtype=torch.long)
            for i, n in enumerate(layout.numels):
                rows = block_layer == i
                sel = _stable_lowest(losses[rows].reshape(-1), num_to_prune(n, sparsity))
                counts[rows] = sel.view(-1, B).sum(1)
    order = order.long()
    steps = torch.arange(B)[None, :] < counts[:, None]
    pruned = torch.zeros(nb, B, dtype=torch.long).scatter_add_(1, order, steps.long()) > 0
    new = block_obs_update(W, H, pruned)[0]
    pruned = pruned & valid | forced
    new_keep = keep & ~pruned.view(-1)
    return new.view(-1) * new_keep, new_keep


def _setup(method, gen, B=8, m=12, pre_pruned=0.3, **kw):
    params = {
        "a": torch.randn(7, 9, generator=gen),
        "b": torch.randn(5, 8, generator=gen),
        "c": torch.randn(3, 13, generator=gen),
    }
    pruner = make_pruner(method, block_size=B, **kw)
    layout = Layout(params, pad=pruner.pad)
    w = layout.flatten(params)
    keep = layout.valid() & (torch.rand(layout.dim, generator=gen) >= pre_pruned)
    w = w * keep
    G = torch.randn(m, layout.dim, generator=gen) * keep.float()
    fisher = pruner.new_fisher(layout.dim, m, "cpu", groups=layout.layer_index())
    fisher.add_grads(G)
    return pruner, layout, w, keep, fisher.finish(), G.mean(0)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("update", ["joint", "summed"])
@pytest.mark.parametrize("woodtaylor", [False, True])
def test_paged_obs_step_equals_the_whole_step(scope, update, woodtaylor, gen, tiny_pages):
    pruner, layout, w, keep, finv, grad = _setup(
        "obert", gen, scope=scope, update=update, woodtaylor=woodtaylor
    )
    w0, keep0 = w.clone(), keep.clone()
    u = finv.mul(grad).to(w.dtype) if woodtaylor else None
    for sparsity in (0.4, 0.75):
        got = pruner.prune(layout, w, keep, sparsity=sparsity, finv=finv, grad=grad)
        ref_w, ref_keep = _obs_ref(pruner, layout, w, keep, finv, sparsity, u)
        assert torch.equal(got.keep, ref_keep)
        assert torch.equal(got.weights, ref_w)
        assert torch.equal(w, w0) and torch.equal(keep, keep0)  # the inputs are not changed


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_paged_mfac_step_equals_the_whole_step(scope, gen, tiny_pages):
    pruner, layout, w, keep, finv, _ = _setup("mfac", gen, B=16, scope=scope)
    got = pruner.prune(layout, w, keep, sparsity=0.6, finv=finv)
    ref_w, ref_keep = _obs_ref(pruner, layout, w, keep, finv, 0.6)
    assert torch.equal(got.keep, ref_keep) and torch.equal(got.weights, ref_w)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_paged_cap_step_equals_the_whole_step(scope, pattern, gen, tiny_pages, monkeypatch):
    import hf_mfac.core.cap as cap_mod

    monkeypatch.setattr(cap_mod, "_PAGE_BYTES", {"cpu": 1})
    if pattern == "2:4":
        params = {"a": torch.randn(6, 8, generator=gen), "b": torch.randn(5, 16, generator=gen)}
        pruner = make_pruner("cap", block_size=8, pattern=pattern, scope=scope)
        layout = Layout(params, pad=pruner.pad)
        w = layout.flatten(params)
        keep = layout.valid().clone()
        G = torch.randn(12, layout.dim, generator=gen) * keep.float()
        fisher = pruner.new_fisher(layout.dim, 12, "cpu", groups=layout.layer_index())
        fisher.add_grads(G)
        finv = fisher.finish()
        got = pruner.prune(layout, w, keep, zeros=2, finv=finv)
        ref_w, ref_keep = _cap_ref(pruner, layout, w, keep, finv, zeros=2)
    else:
        pruner, layout, w, keep, finv, _ = _setup("cap", gen, scope=scope)
        got = pruner.prune(layout, w, keep, sparsity=0.7, finv=finv)
        ref_w, ref_keep = _cap_ref(pruner, layout, w, keep, finv, sparsity=0.7)
    assert torch.equal(got.keep, ref_keep) and torch.equal(got.weights, ref_w)


def test_obs_update_masked_equals_obs_update(gen, monkeypatch):
    _, layout, w, keep, finv, grad = _setup("obert", gen)
    u = finv.mul(grad)
    pruned = (torch.rand(layout.dim, generator=gen) < 0.5) & layout.valid()
    for uu in (None, u):
        a = obs_update(finv, w, pruned.nonzero()[:, 0], u=uu)
        b = obs_update_masked(finv, w, pruned, u=uu, page=7)
        assert torch.equal(a, b)


def test_block_diag_pages_and_compact_orders(gen):
    _, layout, w, keep, finv, _ = _setup("obert", gen)
    whole = finv.diag()
    for a, b in ((0, 5), (3, 21), (8, 16), (layout.dim - 3, layout.dim)):
        assert torch.equal(finv.diag(a, b), whole[a:b])
    assert order_dtype(32) == torch.uint8 and order_dtype(300) == torch.int16
    assert order_dtype(1 << 16) == torch.long
    order = torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]], dtype=torch.uint8)
    got = prefix_mask(order, torch.tensor([2, 0]), page=1)
    assert got.tolist() == [[True, False, True, False], [False] * 4]


# -- CAP's losses stored in fp32, the ties at the threshold broken in fp64
# ----------------------------------------------------------------------------------------------
def test_fp32_losses_with_exact_ties_select_as_fp64(gen):
    """Sorted rows of fp64 losses that collide in fp32 (differences far below fp32's resolution),
    with forced -1 entries and infinities: the counts from the fp32 values plus the fp64 values of
    the tied blocks are those of the fp64 selection, for every k, globally and per group."""
    from hf_mfac.core.cap import cap_select, stored_losses

    nb, B = 9, 6
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    vals = base[torch.randint(0, 3, (nb, B), generator=gen)]
    vals = vals + torch.randint(0, 4, (nb, B), generator=gen).double() * 1e-12  # fp32 ties
    vals, _ = vals.sort(1)
    vals[0, :2] = -1.0  # forced
    vals[3, 4:] = float("inf")  # no candidate left
    vals[5, 2:] = 1e300  # beyond fp32's range, still prunable
    vals[6] = vals[2]  # exact fp64 ties too: by position
    l32 = stored_losses(vals, torch.float32)
    assert l32.dtype == torch.float32 and torch.equal(torch.isfinite(l32), torch.isfinite(vals))
    calls = []

    def exact(blocks):
        calls.append(blocks.numel())
        return vals[blocks]

    finite = int(torch.isfinite(vals).sum())
    for k in range(finite + 1):
        assert torch.equal(cap_select(l32, k, exact=exact), cap_select(vals, k)), k
    assert calls  # the ties were resolved in fp64 at least once
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    for k in range(0, 12):
        per = {0: min(k, 14), 1: min(k, 19)}
        assert torch.equal(cap_select(l32, 0, groups, per, exact=exact),
                           cap_select(vals, 0, groups, per))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_cap_step_with_coarse_stored_losses_equals_the_fp64_step(scope, gen, tiny_pages,
                                                                 monkeypatch):
    """The CAP step with its losses stored far more coarsely than fp32 (a power of two: many ties
    at the threshold, all broken in fp64 by eliminating the tied blocks' pages again) gives the
    masks and weights of the step over fp64 losses, bit for bit."""
    import hf_mfac.core.cap as cap_mod

    monkeypatch.setattr(cap_mod, "_PAGE_BYTES", {"cpu": 1 << 11})  # pages of 4 blocks at B = 8
    real = cap_mod.stored_losses

    def coarse(x, dtype):  # a power of two below each positive value: monotone, many ties
        x = real(x, dtype)
        if dtype == torch.float64:  # the reference's losses
            return x
        p2 = torch.exp2(torch.floor(torch.log2(x.clamp_min(1e-30))))
        return torch.where((x > 0) & torch.isfinite(x), p2, x)

    monkeypatch.setattr(cap_mod, "stored_losses", coarse)
    spy = []
    real_blocks = cap_mod.cap_block_losses

    def counted(*a, **k):
        spy.append(a[2].numel())
        return real_blocks(*a, **k)

    monkeypatch.setattr(pruners_mod, "cap_block_losses", counted)
    pruner, layout, w, keep, finv, _ = _setup("cap", gen, scope=scope)
    for sparsity in (0.5, 0.7):
        got = pruner.prune(layout, w, keep, sparsity=sparsity, finv=finv)
        ref_w, ref_keep = _cap_ref(pruner, layout, w, keep, finv, sparsity=sparsity)
        assert torch.equal(got.keep, ref_keep) and torch.equal(got.weights, ref_w)
    assert spy  # the fp64 tie-break ran


def test_cap_block_losses_are_those_of_the_elimination(gen, monkeypatch):
    import hf_mfac.core.cap as cap_mod
    from hf_mfac.core.cap import cap_block_losses

    monkeypatch.setattr(cap_mod, "_PAGE_BYTES", {"cpu": 1 << 11})
    _, layout, w, keep, finv, _ = _setup("cap", gen)
    nb = layout.dim // 8
    W, valid = w.view(nb, 8), layout.valid().view(nb, 8)
    forced = ~keep.view(nb, 8) & valid
    _, ref = cap_eliminate(W, finv, valid=valid, forced=forced)
    _, l32 = cap_eliminate(W, finv, valid=valid, forced=forced, loss_dtype=torch.float32)
    assert l32.dtype == torch.float32 and torch.equal(l32, ref.float())
    blocks = torch.tensor([nb - 1, 0, 5, 6, 2])
    assert torch.equal(cap_block_losses(W, finv, blocks, valid=valid, forced=forced), ref[blocks])
    with pytest.raises(ValueError, match="loss_dtype"):
        cap_eliminate(W, finv, loss_dtype=torch.float16)


@pytest.mark.parametrize("method", ["obert", "cap"])
def test_step_written_over_its_input_weights(method, gen, tiny_pages):
    """``out=w``: the joint updates write the new weights over the flat weights they read (page by
    page, each page read first): the same weights and masks as into a new tensor."""
    pruner, layout, w, keep, finv, _ = _setup(method, gen)
    ref = pruner.prune(layout, w, keep, sparsity=0.6, finv=finv)
    w2 = w.clone()
    got = pruner.prune(layout, w2, keep, sparsity=0.6, finv=finv, out=w2)
    assert got.weights.data_ptr() == w2.data_ptr()
    assert torch.equal(got.weights, ref.weights) and torch.equal(got.keep, ref.keep)
    assert torch.equal(got.loss, ref.loss)
