"""Worker of tests/test_distributed.py: ShardedMFAC vs MFAC, and resuming from window shards.

Run on every rank (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT). Writes
``<out>/rank<R>.json``:

* ``same_grads``: relative difference of the parameters after several steps of ShardedMFAC and of
  MFAC in one process, both given the same full-batch gradients (momentum, weight decay, two param
  groups, a parameter without gradient);
* ``ddp``: the same with the model in DistributedDataParallel, each rank on its slice of the batch;
* ``resume_exact``: stopping, saving (optimizer.pt from rank 0 + window shards), loading into fresh
  objects and continuing gives bit-identical parameters;
* ``reshard`` (with ``--resume-from DIR`` written by another number of ranks): continuing from those
  shards vs a plain MFAC restored from the same shards in one process.
Also ``window_numel``: elements of this rank's window.

With ``--faults`` (2 ranks) it checks instead that the ranks reject together: an fp16 window gets a
gradient that overflows fp16 only in rank 1's shard (``skip_*``, ``raise_*``: skipped / raised on
both ranks, nothing changed, ``after_skip``: training on matches one process that skipped the same
step), and rank 1 loads a corrupt window shard (``load_*``: refused on both ranks, nothing changed);
``final``: the parameters at the end.
"""
import argparse
import copy
import datetime
import json
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from hf_mfac import MFAC
from hf_mfac.optim.distributed import ShardedMFAC, load_mfac_shards, save_mfac_shards

KW = dict(lr=5e-3, num_grads=4, damp=1e-2, momentum=0.5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(9, 7), nn.Linear(7, 3)
        self.unused = nn.Parameter(torch.ones(5))  # never gets a gradient

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def net():
    torch.manual_seed(0)
    return Net()


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 9, generator=g), torch.randn(12, 3, generator=g)


def groups(model):
    return [{"params": [model.a.weight, model.b.weight, model.unused], "weight_decay": 0.1},
            {"params": [model.a.bias, model.b.bias], "weight_decay": 0.0, "lr": 2e-3}]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, steps, first=0, rows=slice(None)):
    for s in range(first, first + steps):
        x, y = data(s)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def error_text(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported
        return f"{type(e).__name__}: {e}"
    return None


def state_of(model, opt):
    return copy.deepcopy(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "opt": opt.state_dict(),
            "window": opt.sharded_state_dict() if isinstance(opt, ShardedMFAC) else None,
        }
    )


def same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def poisoned_step(model, opt, step):
    x, y = data(step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.b.bias.grad[0] = 7e4  # above fp16's 65504; the coordinate is in the last rank's shard
    opt.step()


def faults(a, rank):
    res = {}
    kw = dict(KW, grad_dtype=torch.float16, nonfinite="skip")
    model, ref = net(), net()
    opt, ref_opt = ShardedMFAC(groups(model), **kw), MFAC(groups(ref), **kw)
    train(model, opt, 3)
    train(ref, ref_opt, 3)
    before = state_of(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        poisoned_step(model, opt, 3)
    res["skip_warned"] = any("beyond the range" in str(w.message) for w in caught)
    res["skip_unchanged"] = same(state_of(model, opt), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        poisoned_step(ref, ref_opt, 3)
    opt.nonfinite = "raise"
    res["raise_error"] = error_text(lambda: poisoned_step(model, opt, 3))
    res["raise_unchanged"] = same(state_of(model, opt), before)
    train(model, opt, 3, first=4)
    train(ref, ref_opt, 3, first=4)
    res["after_skip"] = rel(flat(model), flat(ref))

    good = opt.sharded_state_dict()
    before = state_of(model, opt)
    for key, corrupt in (
        ("load_error", lambda G: G[0].mul_(2.0)),
        ("load_nan_error", lambda G: G[1].fill_(float("nan"))),
    ):
        state = copy.deepcopy(good)
        if rank == 1:
            corrupt(state["window"]["G"])
        res[key] = error_text(lambda: opt.load_sharded_state_dict(state))
    res["load_unchanged"] = same(state_of(model, opt), before)
    train(model, opt, 1, first=7)
    res["final"] = flat(model).tolist()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--faults", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.faults:
        with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
            json.dump(faults(a, rank), f)
        dist.destroy_process_group()
        return
    res = {}

    ref = net()
    train(ref, MFAC(groups(ref), **KW), 7)
    model = net()
    opt = ShardedMFAC(groups(model), **KW)
    train(model, opt, 7)
    res["same_grads"] = rel(flat(model), flat(ref))
    res["window_numel"] = opt.window.local.G.numel()

    ddp_model = net()
    ddp = nn.parallel.DistributedDataParallel(ddp_model, find_unused_parameters=True)
    per = 12 // world
    train(ddp, ShardedMFAC(groups(ddp_model), **KW), 7, rows=slice(rank * per, (rank + 1) * per))
    ref_part = net()
    train(ref_part, MFAC(groups(ref_part), **KW), 7, rows=slice(0, per * world))
    res["ddp"] = rel(flat(ddp_model), flat(ref_part))

    ckpt = os.path.join(a.out, "ckpt")
    model = net()
    opt = ShardedMFAC(groups(model), **KW)
    train(model, opt, 5)
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
        torch.save(opt.state_dict(), os.path.join(ckpt, "optimizer.pt"))
        torch.save(model.state_dict(), os.path.join(ckpt, "model.pt"))
    save_mfac_shards(opt, ckpt, global_step=5)
    train(model, opt, 4, first=5)
    model2 = net()
    model2.load_state_dict(torch.load(os.path.join(ckpt, "model.pt")))
    opt2 = ShardedMFAC(groups(model2), **KW)
    opt2.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True))
    load_mfac_shards(opt2, ckpt, expect_meta={"global_step": 5})
    train(model2, opt2, 4, first=5)
    res["resume_exact"] = torch.equal(flat(model2), flat(model))

    if a.resume_from:
        # the 2-rank checkpoint, read into this world size (sharded) or a plain MFAC
        def resumed(cls):
            m = net()
            m.load_state_dict(torch.load(os.path.join(a.resume_from, "model.pt")))
            o = cls(groups(m), **KW)
            o.load_state_dict(
                torch.load(os.path.join(a.resume_from, "optimizer.pt"), weights_only=True)
            )
            load_mfac_shards(o, a.resume_from)
            train(m, o, 4, first=5)
            return flat(m)

        res["reshard"] = rel(resumed(ShardedMFAC), resumed(MFAC))

    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
