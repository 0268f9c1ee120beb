"""Worker of tests/test_optim_sparse.py: ShardedMFAC over a compressed window (density < 1).

Run on every rank (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT). Writes
``<out>/rank<R>.json``:

* ``same_as_reference``: relative difference of the parameters after several steps of ShardedMFAC
  and of a one-process replay with the core window whose top-k blocks are the two ranks' ranges (the
  sharded window compresses each rank's coordinates on their own);
* ``resume_exact``: stopping, saving (optimizer.pt from rank 0 + window shards), loading into fresh
  objects and continuing gives bit-identical parameters;
* ``reshard_error``: the message of loading those shards into a plain MFAC (one process);
* ``nan_unchanged``: a NaN in rank 1's part of the gradient is refused by both ranks, nothing
  changed.
"""
import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from hf_mfac import MFAC
from hf_mfac.core import CompressedMFAC, GradientRejected
from hf_mfac.optim.distributed import ShardedMFAC, load_mfac_shards, save_mfac_shards

KW = dict(lr=5e-2, num_grads=4, damp=1e-2, density=0.2)


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(10, 7, generator=g), torch.randn(10, 2, generator=g)


def grad(model, step):
    for p in model.parameters():
        p.grad = None
    x, y = batch(step)
    torch.nn.functional.mse_loss(model(x), y).backward()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, steps, first=0):
    for s in range(first, first + steps):
        grad(model, s)
        opt.step()


def reference(steps):
    """The same steps replayed with one core window per rank range (the sharded compression)."""
    model = net()
    d = flat(model).numel()
    assert d % 2 == 0  # the two ranks' ranges are then two blocks of d / 2
    win = CompressedMFAC(d, KW["num_grads"], KW["damp"], KW["density"], block_size=d // 2)
    theta = flat(model).clone()
    for s in range(steps):
        with torch.no_grad():
            off = 0
            for p in model.parameters():
                p.copy_(theta[off : off + p.numel()].view_as(p))
                off += p.numel()
        grad(model, s)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        theta = theta - KW["lr"] * win.update_mul(g)
    return theta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    res = {}
    model = net()
    opt = ShardedMFAC(model.parameters(), **KW)
    train(model, opt, 7)
    ref = reference(7)
    res["same_as_reference"] = float((flat(model) - ref).norm() / ref.norm())
    res["local_kind"] = type(opt.window.local).__name__

    ckpt = os.path.join(a.out, "ckpt")
    model = net()
    opt = ShardedMFAC(model.parameters(), **KW)
    train(model, opt, 5)
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
        torch.save(opt.state_dict(), os.path.join(ckpt, "optimizer.pt"))
        torch.save(model.state_dict(), os.path.join(ckpt, "model.pt"))
    save_mfac_shards(opt, ckpt, global_step=5)
    train(model, opt, 4, first=5)
    model2 = net()
    model2.load_state_dict(torch.load(os.path.join(ckpt, "model.pt")))
    opt2 = ShardedMFAC(model2.parameters(), **KW)
    opt2.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True))
    load_mfac_shards(opt2, ckpt, expect_meta={"global_step": 5})
    train(model2, opt2, 4, first=5)
    res["resume_exact"] = torch.equal(flat(model2), flat(model))

    plain = MFAC(net().parameters(), **KW)
    try:
        load_mfac_shards(plain, ckpt)
        res["reshard_error"] = None
    except ValueError as e:
        res["reshard_error"] = str(e)
    res["reshard_unchanged"] = plain.window is None

    before = [flat(model).clone(), opt.window.local.state_dict()]
    before = [before[0], {k: v.clone() if torch.is_tensor(v) else v for k, v in before[1].items()}]
    grad(model, 20)
    params = list(model.parameters())
    params[-1].grad[-1] = float("nan")  # the last coordinates: rank 1's range
    try:
        opt.step()
        res["nan_error"] = None
    except GradientRejected as e:
        res["nan_error"] = str(e)
    after = opt.window.local.state_dict()
    res["nan_unchanged"] = torch.equal(before[0], flat(model)) and all(
        torch.equal(v, after[k]) if torch.is_tensor(v) else v == after[k]
        for k, v in before[1].items())
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
