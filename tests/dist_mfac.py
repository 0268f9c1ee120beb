"""Worker of tests/test_distributed.py: ShardedMFAC vs MFAC, and resuming from window shards.

Run on every rank (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT). Writes ``<out>/rank<R>.json``:

* ``same_grads``: relative difference of the parameters after several steps of ShardedMFAC and of MFAC in one
  process, both given the same full-batch gradients (momentum, weight decay, two param groups, a parameter
  without gradient);
* ``ddp``: the same with the model in DistributedDataParallel, each rank on its slice of the batch;
* ``resume_exact``: stopping, saving (optimizer.pt from rank 0 + window shards), loading into fresh objects
  and continuing gives bit-identical parameters;
* ``reshard`` (with ``--resume-from DIR`` written by another number of ranks): continuing from those shards vs
  a plain MFAC restored from the same shards in one process.
Also ``window_numel``: elements of this rank's window.
"""
import argparse
import datetime
import json
import os

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume-from", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
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
        def resumed(cls):  # the 2-rank checkpoint, read into this world size (sharded) or a plain MFAC
            m = net()
            m.load_state_dict(torch.load(os.path.join(a.resume_from, "model.pt")))
            o = cls(groups(m), **KW)
            o.load_state_dict(torch.load(os.path.join(a.resume_from, "optimizer.pt"), weights_only=True))
            load_mfac_shards(o, a.resume_from)
            train(m, o, 4, first=5)
            return flat(m)

        res["reshard"] = rel(resumed(ShardedMFAC), resumed(MFAC))

    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
