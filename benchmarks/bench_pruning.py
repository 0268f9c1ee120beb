"""One-shot pruning step: time, peak memory and the share spent collecting gradients, against model
size.

Random ``BertConfig`` models from tiny to all-MiniLM-L6-v2-sized (hidden 384, 6 layers, 10.6M
prunable encoder weights), random token batches with labels; one pruning step (``recompute=1``) to
50% per method. Each case runs in its own process so that its peak memory is its own: host peak RSS
growth over the model and data (``ru_maxrss``), and on CUDA ``torch.cuda.max_memory_allocated``
growth.

Usage: python benchmarks/bench_pruning.py [--quick] [--device cuda] [--sizes tiny,small,mini,minilm]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch

SIZES = {  # name: (hidden, layers, intermediate, heads)
    "tiny": (64, 2, 256, 2),
    "small": (128, 4, 512, 4),
    "mini": (256, 4, 1024, 4),
    "minilm": (384, 6, 1536, 12),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _case(q, size, method, opts):
    torch.set_num_threads(opts["threads"])
    from transformers import BertConfig, BertForSequenceClassification

    from hf_mfac.pruning import find_prunable, prune_oneshot

    hidden, layers, inter, heads = SIZES[size]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=inter,
                     num_attention_heads=heads, max_position_embeddings=opts["seq_len"],
                     num_labels=3)
    dev = torch.device(opts["device"])
    model = BertForSequenceClassification(cfg).to(dev)
    g = torch.Generator().manual_seed(0)
    bs, L = opts["batch_size"], opts["seq_len"]
    data = [
        {
            "input_ids": torch.randint(0, 1000, (bs, L), generator=g).to(dev),
            "attention_mask": torch.ones(bs, L, dtype=torch.long, device=dev),
            "labels": torch.randint(0, 3, (bs,), generator=g).to(dev),
        }
        for _ in range(opts["num_grads"])
    ]
    d = sum(p.numel() for p in find_prunable(model).values())
    kw = (
        {}
        if method == "magnitude"
        else {
            "num_grads": opts["num_grads"],
            "block_size": opts["mfac_block"] if method == "mfac" else opts["block"],
        }
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    _, rep = prune_oneshot(model, data, method=method, sparsity=0.5, progress=False, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    peak_dev = (torch.cuda.max_memory_allocated() - cuda0) / 2**20 if dev.type == "cuda" else None
    q.put(
        {
            "size": size,
            "method": method,
            "d": d,
            "time": wall,
            "grads": rep.time_grads,
            "share": rep.grad_share,
            "host_mb": max(peak_host, 0.0),
            "dev_mb": peak_dev,
            "B": kw.get("block_size"),
        }
    )


def run(size, method, opts):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(q, size, method, opts))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"size": size, "method": method, "error": f"exit code {p.exitcode}"}
    return q.get()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small,mini,minilm")
    ap.add_argument("--methods", default="magnitude,obert,mfac,cap")
    ap.add_argument("--num-grads", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64, help="Fisher block size of obert and cap")
    ap.add_argument("--mfac-block-size", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="tiny and small models, 8 gradients")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.num_grads = "tiny,small", 8
    opts = {
        "num_grads": a.num_grads,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "block": a.block_size,
        "mfac_block": a.mfac_block_size,
        "device": a.device,
        "threads": a.threads,
    }
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _util import machine, table

    print(
        f"# One-shot pruning step (50%, recompute=1)\n\n{machine()}; {a.threads} torch thread(s) "
        "per case; "
        f"device {a.device}; m={a.num_grads} gradients "
        f"of batch {a.batch_size} x {a.seq_len} tokens; B={a.block_size} (obert, cap), "
        f"{a.mfac_block_size} "
        f"(mfac); {time.strftime('%Y-%m-%d')}\n"
    )
    results = []
    for s in a.sizes.split(","):
        for m in a.methods.split(","):
            results.append(run(s, m, opts))
            print(f"done: {s} {m}", file=sys.stderr, flush=True)
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["size"], "-", r["method"], r["error"], "", "", "", ""))
            continue
        dev = "" if r["dev_mb"] is None else f"{r['dev_mb']:.0f}"
        rows.append(
            (
                r["size"],
                f"{r['d'] / 1e6:.2f}M",
                r["method"],
                f"{r['time']:.2f}",
                f"{r['grads']:.2f}",
                f"{100 * r['share']:.0f}%",
                f"{r['host_mb']:.0f}",
                dev,
            )
        )
    print(
        table(
            [
                "model",
                "prunable d",
                "method",
                "step s",
                "gradients s",
                "grad share",
                "host peak +MB",
                "device peak +MB",
            ],
            rows,
        )
    )
    # the k-th run of each method against the k-th oBERT run (a method repeated in --methods is
    # paired in turn)
    ratio_rows = []
    for s in a.sizes.split(","):
        runs = [r for r in results if r["size"] == s and "error" not in r]
        bases = [r for r in runs if r["method"] == "obert"]
        if not bases:
            continue
        seen: dict = {}
        cells = []
        for m in a.methods.split(","):
            mine = [r for r in runs if r["method"] == m]
            k = seen.get(m, 0)
            seen[m] = k + 1
            if k >= len(mine):
                cells.append("-")
                continue
            r, b = mine[k], bases[min(k, len(bases) - 1)]
            after, base_after = r["time"] - r["grads"], b["time"] - b["grads"]
            cells.append(
                f"{r['time'] / b['time']:.2f} ({after / base_after:.2f})"
                if base_after > 0
                else f"{r['time'] / b['time']:.2f}"
            )
        ratio_rows.append((s, *cells))
    print(
        "\nStep time relative to obert, the k-th run of each method against the k-th obert run "
        "(in brackets: the time after the gradients, relative to obert's):\n"
    )
    print(table(["model", *a.methods.split(",")], ratio_rows))


if __name__ == "__main__":
    main()
