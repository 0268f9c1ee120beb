"""Core math benchmarks: ratios measured in the same run.

1. DynamicMFAC.update_mul throughput as a fraction of the copy bandwidth of a same-size tensor.
2. BlockFisherInverse.add_grads as a fraction of plain batched-matmul throughput on the same shapes.
3. CAP elimination+apply time over oBERT-style selection (scores + global threshold + summed OBS
   update) at the same block size.
4. threshold_masks (global, exact count, ties by position) over 2^21 scores against a bare
   torch.kthvalue on the same scores, interleaved.
5. BlockFisherInverse add_grads of m gradients + invert against the bare fp32 batched GEMMs of the
   same accumulation, interleaved.
Usage: python benchmarks/bench_core.py [--quick] [--sections build --device cuda --build-dims
4194304]
"""
from __future__ import annotations

import argparse
import time

import torch

from _util import copy_bandwidth, machine, table, timeit
from hf_mfac.core import BlockFisherInverse, DynamicMFAC
from hf_mfac.core.cap import cap_prune
from hf_mfac.core.masks import threshold_masks
from hf_mfac.core.obs import obs_scores, obs_update


def bench_update_mul(dims, ms, dtype=torch.float32, device="cpu"):
    rows = []
    for d in dims:
        for m in ms:
            win = DynamicMFAC(d, m, 1e-6, device=device, grad_dtype=dtype)
            # unit-norm-ish gradients
            gs = [torch.randn(d, device=device) / d**0.5 for _ in range(8)]
            # Fill the window synthetically (random rows, their exact diagonal Gram part,
            # off-diagonal ~0 for random high-dimensional rows): a step's cost does not depend on
            # the values.
            for i in range(m):
                win.G[i] = torch.randn(d, device=device).to(dtype) / d**0.5
            win.GGt.copy_(torch.diag((win.G.float() ** 2).sum(1).double()))
            win.count, win.ptr = m, 0
            k = iter(range(10**9))
            t = timeit(lambda: win.update_mul(gs[next(k) % 8] * 1.01), repeats=5)
            elem = torch.empty((), dtype=dtype).element_size()
            read = 2 * m * d * elem  # two passes over G
            # 512 MiB+ buffers: past every cache
            bw = copy_bandwidth(min(m * d, 1 << 27), dtype, device)
            gemv = timeit(lambda: win.G @ gs[0].to(dtype),
                          repeats=5) if dtype == torch.float32 else float("nan")
            rows.append((d, m, str(dtype).replace("torch.", ""), f"{t * 1e3:.1f}",
                         f"{read / t / 1e9:.1f}",
                         f"{bw / 1e9:.1f}", f"{read / t / bw:.2f}", f"{2 * gemv / t:.2f}"))
    return table(["d", "m", "storage", "update_mul ms", "GB/s read", "copy GB/s", "fraction of "
                                                                                  "copy bw",
                  "2 x gemv time / update_mul time"], rows)


def bench_block_fisher(dims, Bs, k=32):
    rows = []
    for d in dims:
        for B in Bs:
            G = torch.randn(k, d)
            bf = BlockFisherInverse(d, B, 1e-6)
            t_add = timeit(lambda: bf.add_grads(G), repeats=3)
            nb = bf.num_blocks
            Gb = torch.randn(nb, k, B)
            out = torch.zeros(nb, B, B)
            t_bmm = timeit(lambda: out.baddbmm_(Gb.mT, Gb), repeats=3)
            t0 = time.perf_counter()
            bf.diag()
            t_inv = time.perf_counter() - t0
            rows.append((d, B, k, f"{t_add * 1e3:.1f}", f"{t_bmm * 1e3:.1f}",
                         f"{t_bmm / t_add:.2f}",
                         f"{2 * k * d * B / t_add / 1e9:.1f}", f"{t_inv * 1e3:.0f}"))
    return table(["d", "B", "k grads/chunk", "add_grads ms", "bare baddbmm ms", "fraction of bmm "
                                                                                "throughput",
                  "GFLOP/s", "invert ms (once)"], rows)


def bench_cap_vs_obert(dims, Bs, sparsity=0.5, m=64):
    """Solver-only ratio, and the ratio of full pruning steps without gradient collection
    (accumulate m gradients + invert + solver), which is what the paper's 23 vs 20 minutes compares
    apart from the (dominant, model-dependent) gradient collection."""
    rows = []
    for d in dims:
        for B in Bs:
            grads = torch.randn(m, d)
            t0 = time.perf_counter()
            bf = BlockFisherInverse(d, B, 1e-4)
            for chunk in grads.split(16):
                bf.add_grads(chunk)
            H = bf.blocks()
            t_build = time.perf_counter() - t0
            w = torch.randn(d)
            k = int(sparsity * d)

            def obert():
                s = obs_scores(w, bf.diag())
                pruned = ~threshold_masks([s], sparsity)[0]
                return obs_update(bf, w, pruned.nonzero())

            def cap():
                return cap_prune(w.view(-1, B), H, k)

            t_ob = timeit(obert, repeats=3)
            t_cap = timeit(cap, repeats=3, warmup=1)
            rows.append((d, B, m, f"{t_build * 1e3:.0f}", f"{t_ob * 1e3:.0f}", f"{t_cap * 1e3:.0f}",
                         f"{t_cap / t_ob:.1f}", f"{(t_build + t_cap) / (t_build + t_ob):.2f}"))
    return table(["d", "B", "m", "Fisher build+invert ms", "oBERT select+update ms", "CAP ms",
                  "CAP / oBERT (solver)", "CAP / oBERT (step w/o grad collection)"], rows)


def bench_selection(n=1 << 21, pieces=8, repeats=7):
    scores = [torch.rand(n // pieces) for _ in range(pieces)]
    flat = torch.cat(scores)
    k = n // 2
    t = {"kth": [], "global": [], "layer": []}
    for _ in range(repeats + 1):  # turns taken; the first round is a warm-up
        for name, fn in (("kth", lambda: torch.kthvalue(flat, k)),
                         ("global", lambda: threshold_masks(scores, 0.5)),
                         ("layer", lambda: threshold_masks(scores, 0.5, scope="layer"))):
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    med = {k_: sorted(v[1:])[len(v[1:]) // 2] for k_, v in t.items()}
    return table(["scores", "torch.kthvalue ms", "threshold_masks global ms", "global / kthvalue",
                  "per-layer ms", "per-layer / kthvalue"],
                 [(n, f"{med['kth'] * 1e3:.0f}", f"{med['global'] * 1e3:.0f}",
                   f"{med['global'] / med['kth']:.2f}",
                   f"{med['layer'] * 1e3:.0f}", f"{med['layer'] / med['kth']:.2f}")])


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_fisher_build(shapes, chunk=32, repeats=3, device="cpu"):
    rows = []
    for d, m, B in shapes:
        G = torch.randn(m, d, device=device)
        nb = -(-d // B)
        Gb = torch.randn(nb, chunk, B, device=device)
        acc = torch.zeros(nb, B, B, device=device)

        def ours():
            bf = BlockFisherInverse(d, B, 1e-5, device=device)
            for c in G.split(chunk):
                bf.add_grads(c)
            bf.blocks()

        def bare():
            for _ in range(m // chunk):
                acc.baddbmm_(Gb.mT, Gb)

        ts = {"ours": [], "bare": []}
        ours(), bare()
        for _ in range(repeats):
            for name, fn in (("ours", ours), ("bare", bare)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                ts[name].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        rows.append((d, m, B, f"{med['ours'] * 1e3:.0f}", f"{med['bare'] * 1e3:.0f}",
                     f"{med['bare'] / med['ours']:.2f}"))
    return table(["d", "m", "B", "add_grads + invert ms (fp64 accumulation)",
                  "bare fp32 baddbmm ms",
                  "fraction of bare GEMM throughput"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="mfac,fisher,cap,select,build",
                    help="comma list of: mfac, fisher, cap, select, build")
    ap.add_argument("--device", default="cpu", help="device of the build section (e.g. cuda); the "
                                                    "others run on CPU")
    ap.add_argument("--build-dims", default=None,
                    help="comma list of d for the build section (default 2^18, --quick 2^16; a GPU "
                         "wants 2^22+)")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    try:
        dev = torch.device(a.device)
        torch.empty(0, device=dev)
    # unknown type; a CUDA device without a CUDA build or GPU
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {a.device}: torch cannot use it here ({str(e).splitlines()[0]})")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the bare GEMM is plain fp32, as on the CPU
    print(f"# core benchmarks — {machine()} — {time.strftime('%Y-%m-%d')} — build on {a.device}\n")
    dims = [1 << 18, 1 << 20] if a.quick else [1 << 18, 1 << 20, 1 << 22]
    if "mfac" in sections:
        print("## DynamicMFAC.update_mul vs copy bandwidth\n")
        print(bench_update_mul(dims, [32, 128] if a.quick else [32, 128, 512]))
        print(bench_update_mul([1 << 20], [128], dtype=torch.bfloat16))
    if "fisher" in sections:
        print("\n## BlockFisherInverse.add_grads vs batched matmul\n")
        print(bench_block_fisher([1 << 18] if a.quick else [1 << 18, 1 << 20], [16, 32, 64]))
    if "cap" in sections:
        print("\n## CAP vs oBERT-style selection at the same block size (50% sparsity)\n")
        print(bench_cap_vs_obert([1 << 16] if a.quick else [1 << 16, 1 << 18], [8, 16, 32, 64]))
    if "select" in sections:
        print("\n## Selection without a sort: threshold_masks vs torch.kthvalue\n")
        print(bench_selection())
    if "build" in sections:
        print("\n## BlockFisherInverse add_grads + invert vs bare batched GEMM\n")
        dims = (
            [int(x) for x in a.build_dims.split(",")]
            if a.build_dims
            else [1 << 16 if a.quick else 1 << 18]
        )
        print(
            bench_fisher_build(
                [(d, m, B) for d in dims for m, B in ((256, 32), (1024, 32), (256, 64))],
                device=a.device,
            )
        )


if __name__ == "__main__":
    main()
