"""Optimizer step time: hf_mfac.MFAC over torch.optim.AdamW on BERT-tiny / BERT-mini parameter sets.

The window is filled synthetically (random rows, a consistent diagonal Gram matrix) so that the
steady-state step (window full) is timed without first running m real steps; the cost of a step does
not depend on the window's values. Ratios are measured in the same run. Usage: python
benchmarks/bench_optim.py [--ms 32,128,512] [--sizes tiny,mini] [--bf16] [--device cuda] (default
device: the GPU when there is one). On a GPU the window products run the CUDA kernels when they
build (impl="auto"; the line "kernels:" says which path ran).
"""
from __future__ import annotations

import argparse
import time

import torch

from _util import copy_bandwidth, machine, table, timeit
import hf_mfac

SIZES = {"tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                      intermediate_size=512),
         "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                      intermediate_size=1024)}


def bert_params(size: str, device):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**SIZES[size])).to(device)
    return [p for p in model.parameters()]


def fill_window(opt: hf_mfac.MFAC, seed: int = 0):
    """Random rows in the first ``dim`` columns of each window row (padding columns stay as they
    are) and a diagonal Gram matrix of their norms, filled on the window's device."""
    w = opt.window
    gen = torch.Generator(device=w.G.device).manual_seed(seed)
    G = w.G[:, : w.dim]  # (m, d) view
    G.normal_(generator=gen)
    norms = torch.stack([G[i].float().pow(2).sum() for i in range(w.num_grads)]).double()
    w.GGt.zero_()
    w.GGt.diagonal().copy_(norms)
    w.count, w.ptr, w._chol = w.num_grads, 0, None


def bench(size: str, m: int, grad_dtype, device):
    params = bert_params(size, device)
    d = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(device) for p in params]

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g

    adam = torch.optim.AdamW(params, lr=1e-4)
    set_grads()
    t_adam = timeit(adam.step, repeats=5)
    opt = hf_mfac.MFAC(params, lr=1e-6, num_grads=m, damp=1e-6, grad_dtype=grad_dtype)
    set_grads()
    try:
        opt._build_layout()
    except MemoryError as e:
        return (size, d, m, str(grad_dtype).replace("torch.", ""), f"{t_adam * 1e3:.1f}", "does "
                                                                                          "not fit",
                str(e)[:60], "", "")
    fill_window(opt)
    t_mfac = timeit(opt.step, repeats=3)
    elem = opt.window.G.element_size()
    bw = copy_bandwidth(min(m * d, 1 << 27), device=device)
    bound = 2 * m * d * elem / bw  # two passes over m*d stored values at the copy traffic rate
    del opt
    return (size, d, m, str(grad_dtype).replace("torch.", ""), f"{t_adam * 1e3:.1f}",
            f"{t_mfac * 1e3:.0f}",
            f"{t_mfac / t_adam:.0f}", f"{bound * 1e3:.0f}", f"{bound / t_mfac:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="32,128,512")
    ap.add_argument("--sizes", default="tiny,mini")
    ap.add_argument("--bf16", action="store_true", help="also time a bf16 window")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    print(f"# optimizer step benchmark — {machine()} — {time.strftime('%Y-%m-%d')}\n")
    if device.type == "cuda":
        from hf_mfac.kernels import status

        st = status()
        how = "CUDA (impl=auto)" if st["available"] else f"torch references: {st['reason']}"
        print(f"kernels: {how}\n")
    rows = []
    for size in a.sizes.split(","):
        for m in map(int, a.ms.split(",")):
            for dt in [torch.float32, torch.bfloat16] if a.bf16 else [torch.float32]:
                rows.append(bench(size, m, dt, device))
                print(rows[-1], flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print()
    print(
        table(
            [
                "params",
                "d",
                "m",
                "window",
                "AdamW step ms",
                "MFAC step ms",
                "MFAC / AdamW",
                "bandwidth bound ms",
                "bound / MFAC (fraction of bound)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
