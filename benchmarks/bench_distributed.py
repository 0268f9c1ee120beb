"""Scale-out: memory per rank and communication volume of the sharded M-FAC window and distributed
pruning.

Starts 1, 2 and 4 processes (gloo on 127.0.0.1, CPU) for each part and prints markdown tables:

* **Sharded M-FAC** (``ShardedMFAC``): window bytes held per rank (G shard + the m x m matrix),
  growth of the peak resident memory while building and using it, bytes received per optimizer step
  (all-reduce of the m-vector + all-gather of the update), median step time.
* **Distributed oBERT / CAP pruning**: Fisher block bytes held per rank, peak resident memory
  growth, bytes received during gradient collection (per gradient) and during the pruning step, time
  of the step.

Bytes are counted by :class:`hf_mfac.comm.Comm` (what this rank receives: an all-reduce's payload,
the other ranks' pieces of all-gathers and all-to-alls). Peak memory is ``ru_maxrss`` growth over
the value after imports and model creation (tracemalloc does not see torch's allocator), so it
includes transient buffers (flat gradient, gather buffers, chunk exchange). Timings on a shared CPU
are indicative only; with N processes on fewer cores they grow with N.

    python benchmarks/bench_distributed.py                 # D = 2^18, m = 64 window; B = 64 Fisher
    python benchmarks/bench_distributed.py --dim 1048576 --procs 1 2 4 8
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import machine, table  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- workers
# --------------------------------------------------------------------------------------------------
def _warm_up(model, loss) -> None:
    """Pay the one-time costs (autograd, thread pools, the ~70 MiB of modules the first torch.optim
    optimizer imports) before the memory baseline."""
    loss().backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    model.zero_grad(set_to_none=True)


def _mfac_worker(a) -> dict:
    from hf_mfac.optim.distributed import ShardedMFAC

    torch.manual_seed(0)
    width = int(round(a.dim ** 0.5))
    model = torch.nn.Linear(width, a.dim // width, bias=False)
    x = torch.randn(8, width)
    _warm_up(model, lambda: model(x).square().mean())
    base = _rss_mib()
    opt = ShardedMFAC(model.parameters(), lr=1e-4, num_grads=a.num_grads, damp=1e-4)
    times, comm_bytes = [], []
    for step in range(a.num_grads + 4):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = opt._comm.bytes_received if opt._comm else 0
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        comm_bytes.append(opt.comm.bytes_received - before)
    local = opt.window.local
    return {"held": local.G.numel() * local.G.element_size() + local.GGt.numel() * 8,
            "rss": _rss_mib() - base, "comm_step": comm_bytes[-1], "time": sorted(times[-4:])[1],
            "dim": opt.window.dim}


class _Net(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x, y):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return {"loss": torch.nn.functional.cross_entropy(x, y)}


def _prune_worker(a) -> dict:
    import hf_mfac.pruning.distributed as pd
    from hf_mfac.pruning import make_pruner

    layers = 4
    width = int(round((a.dim / layers) ** 0.5))
    torch.manual_seed(0)
    model = _Net(width, layers)
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, width, generator=g),
             "y": torch.randint(0, width, (4,), generator=g)}
            for _ in range(a.num_grads)]
    _warm_up(model, lambda: model(**data[0])["loss"])
    base = _rss_mib()
    held, marks = {}, {}

    class Probe(pd.DistributedPruner):  # records what this rank holds when gradient collection ends
        def new_fisher(self, dim, num_grads, device):
            sink = super().new_fisher(dim, num_grads, device)
            finish = sink.finish

            def probed():
                if sink.local is not None:
                    held["fisher"] = sink.local._mat.numel() * sink.local._mat.element_size()
                marks.update(collect=self.comm.bytes_received, t=time.perf_counter())
                return finish()

            sink.finish = probed
            return sink

    pruner = Probe(make_pruner(a.method, block_size=a.block_size))
    comm = pruner.comm
    t0 = time.perf_counter()
    pd.prune_oneshot_distributed(model, data, method=pruner, sparsity=0.5, num_grads=a.num_grads,
                                 chunk_size=8,
                                 progress=False)
    t1 = time.perf_counter()
    return {"held": held.get("fisher", 0), "rss": _rss_mib() - base,
            "collect_per_grad": marks["collect"] / a.num_grads,
            "prune_bytes": comm.bytes_received - marks["collect"], "collect_time": marks["t"] - t0,
            "prune_time": t1 - marks["t"],
            "dim": sum(p.numel() for n, p in model.named_parameters() if "weight" in n)}


def _worker(a) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    out = _mfac_worker(a) if a.part == "mfac" else _prune_worker(a)
    with open(os.path.join(a.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


# -- launcher
# -------------------------------------------------------------------------------------------------
def _launch(argv: list[str], nproc: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "PYTHONPATH": os.pathsep.join(
                [
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    *filter(None, [os.environ.get("PYTHONPATH")]),
                ]
            ),
        }
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", "--out", out, *argv],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r in range(nproc)
        ]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a worker failed: {argv} on {nproc} processes")
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dim", type=int, default=1 << 18, help="coordinates (window) / target weights (pruning)"
    )
    ap.add_argument("--num-grads", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--part", choices=["mfac", "prune"], default=None)
    ap.add_argument("--method", default="obert")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        return _worker(a)
    common = [
        "--dim",
        str(a.dim),
        "--num-grads",
        str(a.num_grads),
        "--block-size",
        str(a.block_size),
    ]
    print(f"# Distributed M-FAC and pruning, {machine()}, {datetime.date.today()}\n")
    print(
        f"gloo on CPU, one torch thread per process, {os.cpu_count()} cores; bytes = received "
        "per rank\n"
    )
    rows = []
    for n in a.procs:
        r = _launch(["--part", "mfac", *common], n)
        rows.append(
            [
                n,
                r[0]["dim"],
                a.num_grads,
                _mib(max(x["held"] for x in r)),
                f"{max(x['rss'] for x in r):.1f}",
                f"{max(x['comm_step'] for x in r) / 1024:.1f}",
                f"{1e3 * max(x['time'] for x in r):.2f}",
            ]
        )
    print("## ShardedMFAC: per rank (max over ranks)\n")
    print(
        table(
            [
                "processes",
                "D",
                "m",
                "window held (MiB)",
                "peak RSS growth (MiB)",
                "received per step (KiB)",
                "step (ms)",
            ],
            rows,
        )
    )
    for method in ("obert", "cap"):
        rows = []
        for n in a.procs:
            r = _launch(["--part", "prune", "--method", method, *common], n)
            rows.append(
                [
                    n,
                    r[0]["dim"],
                    a.block_size,
                    a.num_grads,
                    _mib(max(x["held"] for x in r)),
                    f"{max(x['rss'] for x in r):.1f}",
                    f"{max(x['collect_per_grad'] for x in r) / 1024:.1f}",
                    f"{max(x['prune_bytes'] for x in r) / 1024:.1f}",
                    f"{max(x['collect_time'] for x in r):.2f}",
                    f"{max(x['prune_time'] for x in r):.2f}",
                ]
            )
        print(f"\n## Distributed {method} pruning (50%, one step): per rank (max over ranks)\n")
        print(
            table(
                [
                    "processes",
                    "D",
                    "B",
                    "m",
                    "Fisher blocks held (MiB)",
                    "peak RSS growth (MiB)",
                    "received per gradient (KiB)",
                    "received in prune step (KiB)",
                    "collect (s)",
                    "prune (s)",
                ],
                rows,
            )
        )


if __name__ == "__main__":
    main()
