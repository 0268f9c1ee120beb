"""The compressed M-FAC window (:class:`hf_mfac.core.CompressedMFAC`) on this machine.

1. The memory-bandwidth bound of this CPU, measured in the same run: a large copy and a large sum.
2. The window products ``G x`` (``index_select``) and ``G^T c`` (``index_add_``) at m = 1024,
   density 0.01: time, window bytes streamed per second and the fraction of the bound reached
   (each product reads every stored index and value once); next to them, for scale, the earlier
   formulation (``gather`` / ``scatter_add_`` with the indices copied to int64), the same ``G x``
   as a PyTorch CSR matrix-vector product (int32 columns, built once) and a dense fp32 product of
   as many values.
3. ``update_mul`` (top-k with error feedback, ``G c``, the m x m Cholesky, ``G^T c'``) at
   d = 23M and d = 110M, m = 1024, density 0.01, with its parts.

The window is filled with random rows (the products cost the same whatever the values) and marked
full. Run (heavy: ~8 GiB at d = 110M with fp32 values):
``flock /tmp/brief/heavy.lock python benchmarks/bench_sparse_window.py``.
"""
from __future__ import annotations

import argparse
import datetime
import resource
import time

import torch

from _util import machine, table, timeit
from hf_mfac.core import CompressedMFAC

PARTS = ("top-k select", "G c", "Cholesky m x m", "G^T c'", "update_mul")


def bandwidth(numel: int) -> tuple[float, float]:
    """(copy, sum) bytes/s over ``numel`` fp32 values: a copy counts read + write, a sum the
    read."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    copy = 2 * 4 * numel / timeit(lambda: dst.copy_(src), repeats=5)
    total = 4 * numel / timeit(lambda: src.sum(), repeats=5)
    return copy, total


def filled(dim: int, m: int, density: float, grad_dtype) -> CompressedMFAC:
    """A full window of random rows (indices inside their blocks) with a valid m x m system."""
    w = CompressedMFAC(dim, m, 1e-6, density, grad_dtype=grad_dtype)
    w._V.normal_()
    if w._rest:
        w._I[:-1].random_(0, w._block)
        w._I[-1, :, : w._k_rest].random_(0, w._rest)
        w._V[-1, :, w._k_rest :] = 0
    else:
        w._I.random_(0, w._block)
    w.GGt.copy_(torch.eye(m, dtype=torch.float64) * w.k)
    w.count, w.ptr, w._chol = m, 0, None
    return w


def csr(w: CompressedMFAC) -> torch.Tensor:
    """The window as a PyTorch CSR matrix (m, padded d) with int32 columns, for comparison."""
    m, nblk, kb = w.num_grads, w._nblk, w._k_block
    base = (torch.arange(nblk, dtype=torch.int32) * w._block).view(nblk, 1, 1)
    cols = (w._I.to(torch.int32) + base).permute(1, 0, 2).reshape(m, -1)  # (m, blocks * k_block)
    vals = w._V.to(torch.float32).permute(1, 0, 2).reshape(m, -1)
    cols, order = cols.sort(1)
    vals = vals.gather(1, order)
    crow = torch.arange(0, m * nblk * kb + 1, nblk * kb, dtype=torch.int32)
    size = (m, nblk * w._block)
    return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), size=size)


def gather_matvec(w: CompressedMFAC, x: torch.Tensor) -> torch.Tensor:
    """``G x`` the earlier way: int16 -> int64 indices, ``gather``, multiply, sum."""
    xb, kb, m = w._pad(x).view(w._nblk, w._block), w._k_block, w.num_grads
    p = torch.zeros(m)
    step = max(1, (1 << 22) // (m * kb))
    for b in range(0, w._nblk, step):
        e = min(w._nblk, b + step)
        idx = w._I[b:e].view(e - b, -1).long()
        vals = torch.gather(xb[b:e], 1, idx).view(e - b, m, kb).mul_(w._V[b:e])
        p += vals.sum(2).sum(0)
    return p


def scatter_rmatvec(w: CompressedMFAC, c: torch.Tensor) -> torch.Tensor:
    """``G^T c`` the earlier way: int16 -> int64 indices, ``scatter_add_``."""
    y, m = torch.zeros(w._nblk, w._block), w.num_grads
    step = max(1, (1 << 22) // (m * w._k_block))
    for b in range(0, w._nblk, step):
        e = min(w._nblk, b + step)
        terms = (w._V[b:e] * c.view(1, m, 1)).view(e - b, -1)
        y[b:e].scatter_add_(1, w._I[b:e].view(e - b, -1).long(), terms)
    return y.view(-1)[: w.dim]


def row(size: str, name: str, t: float, entries: int, nbytes: int, bound: float) -> list:
    return [size, name, f"{t * 1e3:.0f}", f"{t / entries * 1e9:.2f}", f"{nbytes / t / 1e9:.2f}",
            f"{nbytes / t / bound:.2f}"]


def products(w: CompressedMFAC, bound: float, repeats: int, compare: bool) -> list:
    m = w.num_grads
    entries = w._I.numel()
    nbytes = entries * (w._I.element_size() + w._V.element_size())
    x, c = torch.randn(w.dim), torch.randn(m)
    size = f"d={w.dim / 1e6:.1f}M"
    rows = []
    workers = w._workers
    for name, fn in ((f"G x (index_select, {workers} threads)", lambda: w._matvec(m, x)),
                     (f"G^T c (index_add_, {workers} threads)", lambda: w._rmatvec(m, c))):
        rows.append(row(size, name, timeit(fn, repeats=repeats), entries, nbytes, bound))
    if workers > 1:  # the same on one thread
        w._workers = 1
        for name, fn in (("G x (index_select, 1 thread)", lambda: w._matvec(m, x)),
                         ("G^T c (index_add_, 1 thread)", lambda: w._rmatvec(m, c))):
            rows.append(row(size, name, timeit(fn, repeats=repeats), entries, nbytes, bound))
        w._workers = workers
        w._work.clear()
    if not compare:
        return rows
    for name, fn in (("G x (earlier: gather, int64)", lambda: gather_matvec(w, x)),
                     ("G^T c (earlier: scatter_add_, int64)", lambda: scatter_rmatvec(w, c))):
        rows.append(row(size, name, timeit(fn, repeats=repeats), entries, nbytes, bound))
    G, xp = csr(w), w._pad(x).clone()
    t = timeit(lambda: G @ xp, repeats=repeats)
    rows.append(row(size, "G x (CSR matrix, MKL)", t, entries, nbytes, bound))

    dense = torch.randn(entries // w.dim + 1, w.dim)  # as many fp32 values in a dense window
    t = timeit(lambda: dense @ x, repeats=repeats)
    name = f"dense fp32 G x, {dense.shape[0]} rows"
    rows.append(row(size, name, t, dense.numel(), 4 * dense.numel(), bound))
    return rows


def update_mul_parts(w: CompressedMFAC, repeats: int) -> dict:
    g = torch.randn(w.dim) * 1e-3
    a = w._pad(w.error + g)
    m = w.num_grads
    eye = torch.eye(m, dtype=torch.float64)
    parts = {
        "top-k select": timeit(lambda: w._select(a), repeats=repeats),
        "G c": timeit(lambda: w._matvec(m, a), repeats=repeats),
        "Cholesky m x m": timeit(lambda: torch.linalg.cholesky(w.GGt + eye), repeats=repeats),
        "G^T c'": timeit(lambda: w._rmatvec(m, torch.randn(m)), repeats=repeats),
    }
    parts["update_mul"] = timeit(lambda: w.update_mul(g), repeats=repeats, warmup=1)
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[23_000_000, 110_000_000])
    ap.add_argument("--num_grads", type=int, default=1024)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--grad_dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth_numel", type=int, default=1 << 28)
    ap.add_argument("--compare_max_dim", type=int, default=30_000_000,
                    help="the CSR and dense comparisons only up to this d (they need the memory)")
    args = ap.parse_args()
    grad_dtype = getattr(torch, args.grad_dtype)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC; {machine()}", flush=True)
    copy_bw, sum_bw = bandwidth(args.bandwidth_numel)
    print(f"bandwidth: copy {copy_bw / 1e9:.2f} GB/s (read + write), sum {sum_bw / 1e9:.2f} GB/s "
          "(read)", flush=True)
    heads = ["size", "product", "ms", "ns/entry", "GB/s", "of bound"]
    prod_rows, step_rows = [], []
    for dim in args.dims:
        t0 = time.perf_counter()
        w = filled(dim, args.num_grads, args.density, grad_dtype)
        held = sum(t.numel() * t.element_size() for t in (w._I, w._V, w.error, w.GGt))
        print(f"d={dim}: k={w.k} per row, window {held / 2**30:.2f} GiB, filled in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        rows = products(w, sum_bw, args.repeats, dim <= args.compare_max_dim)
        prod_rows += rows
        print(table(heads, rows), flush=True)
        parts = update_mul_parts(w, args.repeats)
        step_rows.append([f"{dim / 1e6:.1f}M", w.k, f"{held / 2**30:.2f}"]
                         + [f"{parts[p]:.2f}" for p in PARTS])
        print(step_rows[-1], flush=True)
        del w
    print()
    print(f"m = {args.num_grads}, density = {args.density}, values {args.grad_dtype}, indices "
          f"int16; bound: the sum's read bandwidth {sum_bw / 1e9:.2f} GB/s (copy "
          f"{copy_bw / 1e9:.2f} GB/s read + write)")
    print(table(heads, prod_rows))
    print()
    print(table(["d", "k per row", "window GiB"] + [f"{p} s" for p in PARTS], step_rows))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
