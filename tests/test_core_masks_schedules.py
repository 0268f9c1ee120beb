"""Masks and schedules."""
import pytest
import torch

from hf_mfac.core import masks as M
from hf_mfac.core.schedules import cubic_sparsity, cyclic_linear_lr, equal_fraction_schedule


def test_global_threshold_is_exact_with_ties():
    scores = {"a": torch.zeros(10), "b": torch.zeros(6)}  # all tied
    out = M.threshold_masks(scores, 0.5)
    assert sum(int((~m).sum()) for m in out.values()) == 8


def test_global_vs_layer_scope():
    scores = [torch.arange(10.0), torch.arange(10.0) + 100]
    glob = M.threshold_masks(scores, 0.5)
    assert (~glob[0]).all() and glob[1].all()  # global prunes the low layer entirely
    layer = M.threshold_masks(scores, 0.5, scope="layer")
    assert [int((~m).sum()) for m in layer] == [5, 5]


def test_already_pruned_stay_pruned():
    s = torch.tensor([5.0, -float("inf"), 1.0, 2.0])
    assert M.threshold_masks([s], 0.25)[0].tolist() == [True, False, True, True]


def test_nm_mask_and_errors():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert M.nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="impossible"):
        M.nm_mask(torch.ones(3, 6), 2, 4)
    with pytest.raises(ValueError, match="N < M"):
        M.nm_groups(8, 4, 4)


def test_group_mask():
    s = torch.tensor([3.0, 1.0, 2.0])
    assert M.group_mask(s, 2, 1).tolist() == [True, True, False, False, True, True]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match="sparsity"):
        M.threshold_masks([torch.ones(4)], bad)


def test_sparsity_of_masks():
    assert M.sparsity({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])}) == 0.75


def test_cubic_schedule_endpoints_and_monotone():
    kw = dict(start_step=10, end_step=110, initial_sparsity=0.1, final_sparsity=0.9)
    assert cubic_sparsity(5, **kw) == 0.0
    assert cubic_sparsity(10, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(110, **kw) == pytest.approx(0.9)
    vals = [cubic_sparsity(t, **kw) for t in range(10, 111)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert cubic_sparsity(60, **kw) == pytest.approx(0.9 - 0.8 * 0.125)


def test_equal_fraction_schedule():
    s = equal_fraction_schedule(0.875, 3)
    assert s == pytest.approx([0.5, 0.75, 0.875])  # half of the remaining each time
    s = equal_fraction_schedule(0.9, 2, initial=0.6)
    assert (1 - s[0]) / 0.4 == pytest.approx((1 - s[1]) / (1 - s[0]))
    with pytest.raises(ValueError, match="never regrow"):
        equal_fraction_schedule(0.3, 2, initial=0.5)


def test_cyclic_linear_lr():
    """[CAP, eq. 8]."""
    vals = [cyclic_linear_lr(t, lr_max=1.0, lr_min=0.0, period=4) for t in range(9)]
    assert vals == [1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 1.0]


def _stable_sort_reference(flat, k):
    ref = torch.zeros(flat.numel(), dtype=torch.bool)
    ref[torch.sort(flat.double(), stable=True).indices[:k]] = True
    return ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_lowest_k_matches_stable_sort_tie_break(dtype):
    """The selection (no sort) picks exactly what a stable sort picks: all below the k-th value,
    then the ties at it in position order; -inf first, +inf last."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100, 1001):
        s = torch.randint(0, 5, (n,), generator=g).to(dtype)  # many ties
        s[torch.rand(n, generator=g) < 0.1] = -float("inf")
        s[torch.rand(n, generator=g) < 0.1] = float("inf")
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            got = M.lowest_k_mask(s, k)
            assert int(got.sum()) == k
            assert torch.equal(got, _stable_sort_reference(s, k)), (n, k)


def test_global_threshold_ties_by_position_across_tensors():
    scores = {"a": torch.tensor([1.0, 0.0, 1.0]),
              "b": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)}
    # 2 zeros, then the first 2 ones by position
    out = M.threshold_masks(scores, 4 / 6, prune_mask_only=True)
    assert out["a"].tolist() == [True, True, True] and out["b"].tolist() == [False, False, True]
    layer = M.threshold_masks([torch.zeros(5)], 0.4, scope="layer", prune_mask_only=True)
    assert layer[0].tolist() == [True, True, False, False, False]


def test_nan_scores_raise_even_beside_both_infinities():
    s = torch.tensor([float("inf"), -float("inf"), 1.0])
    # inf + -inf sums to NaN: checked element-wise
    assert M.lowest_k_mask(s, 1).tolist() == [False, True, False]
    with pytest.raises(FloatingPointError, match="NaN"):
        M.lowest_k_mask(torch.tensor([1.0, float("nan")]), 1)
