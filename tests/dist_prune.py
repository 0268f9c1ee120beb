"""Worker of tests/test_distributed.py: distributed one-shot pruning vs one process on the same gradients.

Run on every rank (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT); writes ``<out>/rank<R>.json``
with, per case, whether the masks equal the single-process masks, the largest relative weight difference,
and whether all ranks ended with bit-identical weights. ``--fail-rank R``: rank R's loss raises at its second
gradient (the test checks that every rank stops with that message), then every rank asks for sparsity 1.5.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from hf_mfac.pruning import make_pruner, prune_oneshot
from hf_mfac.pruning.distributed import prune_oneshot_distributed

PER_RANK = 8  # gradients per rank


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x, y):
        h = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": nn.functional.cross_entropy(h, y)}


def tiny_model():
    torch.manual_seed(0)
    return TinyMLP()


def calibration(n: int):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 12, generator=g), "y": torch.randint(0, 8, (4,), generator=g)} for _ in range(n)]


CASES = [  # method, pattern, scope, recompute, woodtaylor[, block_size (default 16)]
    ("obert", None, "global", 1, False),
    ("obert", None, "layer", 2, True),
    ("obert", "2:4", "global", 1, False),
    ("obert", "4-block", "global", 1, False),
    ("mfac", None, "global", 1, False),
    ("mfac", None, "global", 1, False, None),  # one block over all targets: one rank owns it, the others none
    ("cap", None, "global", 2, False),
    ("cap", None, "layer", 1, False),
    ("cap", "2:4", "global", 1, False),
    ("magnitude", None, "global", 1, False),
]


def run(case, data, world, distributed: bool):
    method, pattern, scope, recompute, woodtaylor, block_size = (*case, 16)[:6]
    kw = {} if method == "magnitude" else dict(block_size=block_size, fisher_dtype=torch.float64,
                                                 woodtaylor=woodtaylor)
    pruner = make_pruner(method, pattern=pattern, scope=scope, **kw)
    model = tiny_model()
    args = dict(method=pruner, sparsity=None if pattern == "2:4" else 0.6, recompute=recompute,
                num_grads=None if method == "magnitude" else PER_RANK * world, chunk_size=3, progress=False)
    if distributed:
        masks, report = prune_oneshot_distributed(model, data, **args)
    else:
        masks, report = prune_oneshot(model, data, **args)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return masks, flat, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fail-rank", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    data = calibration(PER_RANK * world)
    results = {}
    if a.fail_rank is not None:
        calls = []

        def loss_fn(model, batch):
            calls.append(1)
            if rank == a.fail_rank and len(calls) == 2:
                raise ValueError(f"bad batch on purpose on rank {rank}")
            return model(**batch)["loss"]

        try:
            prune_oneshot_distributed(tiny_model(), data, method="obert", sparsity=0.5, block_size=16,
                                      num_grads=PER_RANK * world, chunk_size=1, loss_fn=loss_fn, progress=False)
            results["error"] = None
        except Exception as e:  # noqa: BLE001
            results["error"] = f"{type(e).__name__}: {e}"
        try:
            prune_oneshot_distributed(tiny_model(), data, method="magnitude", sparsity=1.5, progress=False)
            results["all_error"] = None
        except Exception as e:  # noqa: BLE001
            results["all_error"] = f"{type(e).__name__}: {e}"
    else:
        for case in CASES:
            dmasks, dflat, report = run(case, data, world, True)
            rmasks, rflat, _ = run(case, data, world, False)
            gathered = [torch.empty_like(dflat) for _ in range(world)]
            dist.all_gather(gathered, dflat)
            results["-".join(map(str, case))] = {
                "masks_equal": all(torch.equal(dmasks[k], rmasks[k]) for k in rmasks),
                "rel_err": float((dflat - rflat).norm() / rflat.norm()),
                "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
                "sparsity": report.sparsity,
                "num_grads": report.num_grads,
            }
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
