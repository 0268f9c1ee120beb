"""CAP against brute-force greedy, OBS and the replayed sequential eliminations ([CAP, §3.1, App.
A])."""
import itertools

import pytest
import torch

from hf_mfac.core.cap import cap_apply, cap_eliminate, cap_prune, cap_select



def _blocks(gen, nb=4, B=6, m=24, damp=0.1):
    G = torch.randn(nb, m, B, generator=gen, dtype=torch.float64)
    F = G.mT @ G / m + damp * torch.eye(B, dtype=torch.float64)
    return torch.linalg.inv(F), torch.randn(nb, B, generator=gen, dtype=torch.float64)


def _rho(H, w, Q):
    Q = list(Q)
    return 0.0 if not Q else float(0.5 * w[Q] @ torch.linalg.solve(H[Q][:, Q], w[Q]))


# 19: the delayed downdates are folded into H twice, then 3 are left
@pytest.mark.parametrize("B", [6, 19])
def test_matches_brute_force_greedy(gen, B):
    """Each step removes the weight minimising the joint saliency rho_{Q ∪ q} recomputed from
    scratch."""
    H, w = _blocks(gen, nb=4 if B < 10 else 2, B=B, m=4 * B)
    order, losses = cap_eliminate(w, H)
    for b in range(H.shape[0]):
        Q = []
        for t in range(H.shape[1]):
            q = min((q for q in range(H.shape[1]) if q not in Q),
                    key=lambda q: _rho(H[b], w[b], Q + [q]))
            Q.append(q)
            assert q == order[b, t]
            assert losses[b, t].item() == pytest.approx(_rho(H[b], w[b], Q), rel=1e-8, abs=1e-12)


def test_brute_force_optimum_on_tiny_block_is_lower_bound(gen):
    """Greedy is never better than the exhaustive optimum, and equals it for one weight."""
    H, w = _blocks(gen, nb=2, B=5)
    _, losses = cap_eliminate(w, H)
    for b in range(2):
        for k in range(1, 5):
            best = min(_rho(H[b], w[b], Q) for Q in itertools.combinations(range(5), k))
            assert losses[b, k - 1] >= best - 1e-12
        assert losses[b, 0].item() == pytest.approx(min(_rho(H[b], w[b], [q]) for q in range(5)))


def test_removing_one_weight_is_obs(gen):
    H, w = _blocks(gen, nb=1)
    new, pruned, _ = cap_prune(w, H, 1)
    q = int(pruned[0].nonzero())
    expect = w[0] - w[0, q] * H[0, :, q] / H[0, q, q]
    expect[q] = 0
    assert torch.allclose(new[0], expect, atol=1e-12)
    assert q == int((w[0] ** 2 / H[0].diagonal()).argmin())


def test_joint_apply_equals_sequential_replay(gen):
    H, w = _blocks(gen)
    order, losses = cap_eliminate(w, H)
    counts = cap_select(losses, 11)
    new, pruned = cap_apply(w, H, order, counts)
    for b in range(H.shape[0]):
        wb, Hb = w[b].clone(), H[b].clone()
        for t in range(int(counts[b])):
            j = int(order[b, t])
            col = Hb[:, j].clone()
            wb -= wb[j] / col[j] * col
            wb[j] = 0
            Hb -= torch.outer(col, col) / col[j]
        assert torch.allclose(new[b], wb, atol=1e-10)
    assert int(pruned.sum()) == 11


def test_global_merge_gives_prefixes_and_exact_count(gen):
    H, w = _blocks(gen, nb=5, B=8)
    order, losses = cap_eliminate(w, H)
    for k in (0, 1, 17, 40):
        counts = cap_select(losses, k)
        assert int(counts.sum()) == k
        thr = max((losses[b, c - 1].item() for b, c in enumerate(counts.tolist()) if c), default=-1)
        for b, c in enumerate(counts.tolist()):  # every unselected entry is >= every selected one
            if c < 8:
                assert losses[b, c].item() >= thr - 1e-15


def test_forced_and_padding(gen):
    H, w = _blocks(gen, nb=2, B=6)
    forced = torch.zeros(2, 6, dtype=torch.bool)
    forced[0, 4] = forced[1, 1] = True
    w = w.masked_fill(forced, 0)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 5] = False  # padding
    order, losses = cap_eliminate(w, H, valid=valid, forced=forced)
    assert order[0, 0] == 4 and order[1, 0] == 1 and losses[0, 0] == 0
    assert not torch.isfinite(losses[1, 5]) and 5 not in order[1, :5].tolist()
    new, pruned, _ = cap_prune(w, H, 6, valid=valid, forced=forced)
    assert pruned[forced].all() and not pruned[1, 5] and int(pruned.sum()) == 6


@pytest.mark.parametrize("n,m", [(2, 4), (1, 3)])
def test_nm_constraint(n, m, gen):
    H, w = _blocks(gen, nb=3, B=12)
    new, pruned, losses = cap_prune(w, H, 0, nm=(n, m))
    groups = pruned.view(3, -1, m)
    assert (groups.sum(-1) == m - n).all()
    assert (new[pruned] == 0).all()


def test_per_group_uniform_merge(gen):
    H, w = _blocks(gen, nb=4, B=6)
    groups = torch.tensor([0, 0, 1, 1])
    _, pruned, _ = cap_prune(w, H, 0, block_groups=groups, k_per_group={0: 3, 1: 7})
    assert int(pruned[:2].sum()) == 3 and int(pruned[2:].sum()) == 7


def test_errors(gen):
    H, w = _blocks(gen, nb=1, B=6)
    with pytest.raises(ValueError, match="multiple of M"):
        cap_eliminate(w, H, nm=(2, 4))
    _, losses = cap_eliminate(w, H)
    with pytest.raises(ValueError, match="cannot prune"):
        cap_select(losses, 7)
    with pytest.raises(ValueError, match="one \\(6, 6\\) inverse per block"):
        cap_eliminate(w, H[:, :4, :4])
    with pytest.raises(ValueError, match="valid must have"):
        cap_eliminate(w, H, valid=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block size"):
        cap_eliminate(w[:, :0], H[:, :0, :0])


def _eliminate_stepwise(w, H, valid=None, forced=None, nm=None):
    """Plain OBC loop, one block at a time: score, OBS update, explicit rank-1 downdate of the whole
    inverse."""
    nb, B = w.shape
    order = torch.zeros(nb, B, dtype=torch.long)
    losses = torch.full((nb, B), float("inf"), dtype=torch.float64)
    for b in range(nb):
        W, Hb = w[b].clone(), H[b].clone()
        cand = torch.ones(B, dtype=torch.bool) if valid is None else valid[b].clone()
        force = torch.zeros(B, dtype=torch.bool) if forced is None else forced[b] & cand
        cum = 0.0
        for t in range(B):
            score = W**2 / (2 * Hb.diagonal().clamp_min(1e-300))
            score = torch.where(force, -1.0, score)
            score = torch.where(cand, score, float("inf"))
            j = int(score.argmin())
            order[b, t] = j
            if not cand[j]:
                continue
            cum += max(float(score[j]), 0.0)
            losses[b, t] = cum
            col = Hb[:, j].clone()
            W -= W[j] / col[j] * col
            W[j] = 0
            Hb -= torch.outer(col, col) / col[j]
            cand[j], force[j] = False, False
            if nm is not None:
                n, m = nm
                g = j // m
                if (
                    int(
                        (
                            ~cand[g * m : (g + 1) * m]
                            & ~(
                                valid[b, g * m : (g + 1) * m]
                                if valid is not None
                                else torch.zeros(m, dtype=torch.bool)
                            )
                        ).sum()
                    )
                    >= m - n
                ):
                    cand[g * m : (g + 1) * m] = False
    return order, losses


@pytest.mark.parametrize("B,nm", [(24, None), (33, None), (24, (2, 4))])
def test_delayed_downdates_equal_the_stepwise_loop(gen, B, nm):
    """The vectorised elimination (rank-1 downdates folded every few steps) against the plain
    per-block loop, with padding, forced weights and an N:M constraint: same order, same losses to
    rounding."""
    nb = 40
    H, w = _blocks(gen, nb=nb, B=B, m=2 * B)
    valid = torch.rand(nb, B, generator=gen) > 0.1 if nm is None else None
    forced = torch.rand(nb, B, generator=gen) > 0.8
    order, losses = cap_eliminate(w, H, valid=valid, forced=forced, nm=nm)
    ref_order, ref_losses = _eliminate_stepwise(w, H, valid, forced, nm)
    fin = torch.isfinite(ref_losses)
    assert torch.equal(torch.isfinite(losses), fin)
    assert torch.equal(order[fin], ref_order[fin])
    assert torch.allclose(losses[fin], ref_losses[fin], rtol=1e-9, atol=1e-12)
