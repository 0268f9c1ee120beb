"""Worker of tests/test_distributed.py: distributed one-shot pruning vs one process on the same
gradients.

Run on every rank (env RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT); writes
``<out>/rank<R>.json``.

* default: per case, whether the masks equal the single-process masks (computed before the process
  group exists), the largest relative weight difference, and whether all ranks ended with
  bit-identical weights.
* ``--fail-rank R``: rank R's loss raises at its second gradient (the test checks that every rank
  stops with that message), then every rank asks for sparsity 1.5.
* ``--checks`` (2 ranks): plain ``prune_oneshot`` inside the process group on a trained MLP and a
  DataLoader over a ``DistributedSampler`` (it must prune over both ranks, as
  ``prune_oneshot_distributed`` does); a KeyboardInterrupt in rank 1's loss (rank 0 must raise
  DistributedError naming rank 1 at once, not at the timeout); rank 1 holding another model (both
  ranks must raise, naming the targets). Every failed call must leave the weights as they were.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from hf_mfac.pruning import make_pruner, prune_oneshot, prune_oneshot_distributed

PER_RANK = 8  # gradients per rank


class TinyMLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (
            nn.Linear(12, hidden),
            nn.Linear(hidden, 16),
            nn.Linear(16, 8),
        )

    def forward(self, x, y):
        h = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": nn.functional.cross_entropy(h, y)}


def tiny_model():
    torch.manual_seed(0)
    return TinyMLP()


def calibration(n: int):
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(4, 12, generator=g), "y": torch.randint(0, 8, (4,), generator=g)}
        for _ in range(n)
    ]


CASES = [  # method, pattern, scope, recompute, woodtaylor[, block_size (default 16)]
    ("obert", None, "global", 1, False),
    ("obert", None, "layer", 2, True),
    ("obert", "2:4", "global", 1, False),
    ("obert", "4-block", "global", 1, False),
    ("mfac", None, "global", 1, False),
    # one block over all targets: one rank owns it, the others none
    ("mfac", None, "global", 1, False, None),
    ("cap", None, "global", 2, False),
    ("cap", None, "layer", 1, False),
    ("cap", "2:4", "global", 1, False),
    ("magnitude", None, "global", 1, False),
]


def run(case, data, world, distributed: bool):
    method, pattern, scope, recompute, woodtaylor, block_size = (*case, 16)[:6]
    kw = (
        {}
        if method == "magnitude"
        else dict(block_size=block_size, fisher_dtype=torch.float64, woodtaylor=woodtaylor)
    )
    # distributed static M-FAC takes an absolute damp (the others damp relatively)
    if method == "mfac":
        kw["damp"] = 1e-6
    pruner = make_pruner(method, pattern=pattern, scope=scope, **kw)
    model = tiny_model()
    args = dict(
        method=pruner,
        sparsity=None if pattern == "2:4" else 0.6,
        recompute=recompute,
        num_grads=None if method == "magnitude" else PER_RANK * world,
        chunk_size=3,
        progress=False,
    )
    if distributed:
        masks, report = prune_oneshot_distributed(model, data, **args)
    else:
        masks, report = prune_oneshot(model, data, **args)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return masks, flat, report


def trained_mlp(hidden: int = 16):
    """TinyMLP after 30 Adam steps on the calibration data (the same on every rank)."""
    torch.manual_seed(0)
    model = TinyMLP(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in calibration(30):
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.step()
    return model


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def outcome(call, model) -> dict:
    """Run ``call()``; its exception (type and message), seconds taken, and whether the weights are
    unchanged."""
    before = params(model).clone()
    t0 = time.monotonic()
    try:
        call()
        error = None
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included
        error = f"{type(e).__name__}: {e}"
    return {
        "error": error,
        "seconds": time.monotonic() - t0,
        "unchanged": torch.equal(before, params(model)),
    }


def checks(rank: int, world: int) -> dict:
    from torch.utils.data import DataLoader, DistributedSampler

    # 64 samples
    samples = [{"x": b["x"][i], "y": b["y"][i]} for b in calibration(16) for i in range(4)]
    loader = DataLoader(
        samples, batch_size=2, sampler=DistributedSampler(samples, shuffle=True, seed=0)
    )
    kw = dict(method="obert", sparsity=0.6, num_grads=16, block_size=32, damp=1e-5, progress=False)
    res = {}
    plain, reference = trained_mlp(), trained_mlp()
    masks, report = prune_oneshot(plain, loader, **kw)
    ref_masks, _ = prune_oneshot_distributed(reference, loader, **kw)
    flat = params(plain)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    res["plain"] = {
        "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "equals_distributed": torch.equal(flat, params(reference))
        and all(torch.equal(masks[n], ref_masks[n]) for n in masks),
        "num_grads": report.num_grads,
        "sparsity": report.sparsity,
    }
    calls = []

    def interrupted(model, batch):
        calls.append(1)
        # the second step's second gradient: rank 0 has pruned once by then
        if rank == 1 and len(calls) == 10:
            raise KeyboardInterrupt
        return model(**batch)["loss"]

    model = trained_mlp()
    res["interrupt"] = outcome(
        lambda: prune_oneshot(model, loader, **kw, recompute=2, chunk_size=1, loss_fn=interrupted),
        model,
    )
    model = trained_mlp(16 if rank == 0 else 20)
    res["other_model"] = outcome(lambda: prune_oneshot_distributed(model, loader, **kw), model)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--checks", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    data = calibration(PER_RANK * world)
    references = (
        {}
        if a.fail_rank is not None or a.checks
        else {case: run(case, data, world, False) for case in CASES}
    )  # one process: no process group yet
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30 if a.checks else 60))
    rank = dist.get_rank()
    results = {}
    if a.checks:
        results = checks(rank, world)
    elif a.fail_rank is not None:
        calls = []

        def loss_fn(model, batch):
            calls.append(1)
            if rank == a.fail_rank and len(calls) == 2:
                raise ValueError(f"bad batch on purpose on rank {rank}")
            return model(**batch)["loss"]

        try:
            prune_oneshot_distributed(
                tiny_model(),
                data,
                method="obert",
                sparsity=0.5,
                block_size=16,
                num_grads=PER_RANK * world,
                chunk_size=1,
                loss_fn=loss_fn,
                progress=False,
            )
            results["error"] = None
        except Exception as e:  # noqa: BLE001
            results["error"] = f"{type(e).__name__}: {e}"
        try:
            prune_oneshot_distributed(
                tiny_model(), data, method="magnitude", sparsity=1.5, progress=False
            )
            results["all_error"] = None
        except Exception as e:  # noqa: BLE001
            results["all_error"] = f"{type(e).__name__}: {e}"
    else:
        for case in CASES:
            dmasks, dflat, report = run(case, data, world, True)
            rmasks, rflat, _ = references[case]
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
