"""Benchmarks of hf_mfac.kernels: the CUDA kernels against the best pure-torch paths, measured in
one run.

    python benchmarks/bench_kernels.py                 # GPU if present, else CPU (torch paths only)
    python benchmarks/bench_kernels.py --device cpu --ms 64,128,256

Prints markdown tables (paste them into benchmarks/RESULTS.md with the GPU model and date):

1. Coefficient setup ([M-FAC, App. B, Alg. 1]) for m = 256 .. 4096: D by Cholesky (cuSOLVER), then B
   by the tiled CUDA kernel [M-FAC, App. B] or by ``torch.linalg.solve_triangular`` (cuBLAS trsm);
   the paper reports B in under 2 ms at m = 1024 on an RTX 3090.
2. Window products over G (m, d) (defaults: m = 1024, d = 11,170,560 = BERT-mini), fp32 and bf16
   storage: ``G x``, ``G^T c`` and the whole Algorithm 2 step, as time, GB/s and a fraction of the
   copy bandwidth measured in the same run (the bound: each pass reads G once).
3. ``DynamicMFAC.update_mul`` (the optimizer's per-step work: insert a gradient, ``G g``, the m x m
   solve, ``G^T c``) at the same (m, d), fp32 and bf16 window, with the references
   (``HF_MFAC_KERNELS=torch``) and with the kernels, as time and a fraction of the copy bandwidth
   (bound: two reads of G).

On a machine without a GPU (or without nvcc) the CUDA columns read n/a and the reason is printed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_mfac import kernels as K  # noqa: E402
from hf_mfac.kernels import reference  # noqa: E402

BERT_MINI_D = 11_170_560  # parameters of prajjwal1/bert-mini (L=4, H=256)
PAPER_B_MS = {1024: 2.0}  # [M-FAC, App. B]: "< 2 ms" for m = 1024 on an RTX 3090


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def fmt(v, spec=".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write, the practical bound of a streaming
    kernel."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device, reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def spd_window(m: int, device: torch.device) -> torch.Tensor:
    """A well-conditioned G G^T (m, m) in fp32, as M-FAC keeps it."""
    G = torch.randn(m, 2 * m, device=device) / (2 * m) ** 0.5
    return G @ G.T


def bench_coefficients(ms: list[int], device: torch.device, use_cuda: bool, reps: int) -> str:
    damp = 1e-4
    rows = []
    for m in ms:
        GGt = spd_window(m, device)
        scale = float(m)
        D = reference.mfac_d(GGt, damp, scale)
        t_d = timeit(lambda: reference.mfac_d(GGt, damp, scale), device, reps)
        t_b_torch = timeit(lambda: reference.mfac_b(D, damp, scale), device, reps)
        t_b_cuda = t_all_cuda = err = None
        if use_cuda:
            B_ref = reference.mfac_b(D.double(), damp, scale)
            B = K.mfac_b(D, damp, scale, impl="cuda")
            err = ((B.double() - B_ref).abs().max() / B_ref.abs().max()).item()
            t_b_cuda = timeit(lambda: K.mfac_b(D, damp, scale, impl="cuda"), device, reps)
            t_all_cuda = timeit(lambda: K.mfac_coefficients(GGt, damp, scale, impl="cuda"), device,
                                reps)
        t_all_torch = timeit(lambda: reference.mfac_coefficients(GGt, damp, scale), device, reps)
        speedup = None if t_b_cuda is None else t_b_torch / t_b_cuda
        rows.append([m, fmt(t_d), fmt(t_b_torch), fmt(t_b_cuda), fmt(speedup), fmt(t_all_torch),
                     fmt(t_all_cuda),
                     fmt(PAPER_B_MS.get(m)), fmt(err, ".1e")])
    return table(["m", "D: Cholesky ms", "B: torch trsm ms", "B: CUDA tiled ms", "B speedup",
                  "D+B torch ms",
                  "D+B CUDA ms", "paper B ms (3090)", "B rel. err (CUDA vs fp64)"], rows)


def bench_window(m: int, d: int, device: torch.device, use_cuda: bool, reps: int,
                 copy_gbs: float) -> str:
    rows = []
    for storage in (torch.float32, torch.bfloat16):
        rows += _window_rows(m, d, storage, device, use_cuda, reps, copy_gbs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return table(["op", "storage", "torch ms", "CUDA ms", "torch GB/s", "CUDA GB/s", "torch / copy "
                                                                                     "bw",
                  "CUDA / copy bw"], rows)


def _window_rows(m: int, d: int, storage: torch.dtype, device: torch.device, use_cuda: bool,
                 reps: int,
                 copy_gbs: float) -> list[list]:
    """The rows of one storage dtype; a function of its own so that G (held by the lambdas) is freed
    on return."""
    rows = []
    G = torch.randn(m, d, device=device, dtype=storage)  # (m, d)
    x = torch.randn(d, device=device)
    c = torch.randn(m, device=device)
    GGt = (G.float() @ G.float().T) if G.numel() < 2**28 else _gram_chunked(G)
    D, B = reference.mfac_coefficients(GGt, 1e-4, float(m))
    g_bytes = G.numel() * G.element_size()
    cases = [
        ("G x", g_bytes, lambda: reference.window_matvec(G, x),
         lambda: K.window_matvec(G, x, impl="cuda")),
        ("G^T c", g_bytes, lambda: reference.window_rmatvec(G, c),
         lambda: K.window_rmatvec(G, c, impl="cuda")),
        ("Algorithm 2 (2 passes)", 2 * g_bytes,
         lambda: reference.mfac_apply_coefficients(G, D, B, x, 1e-4, float(m)),
         lambda: K.mfac_apply_coefficients(G, D, B, x, 1e-4, float(m), impl="cuda")),
    ]
    # cuBLAS/native bf16 gemv: accumulates in fp32, rounds the output to bf16
    if storage == torch.bfloat16:
        xb = x.to(storage)
        cases.insert(1, ("G x, torch bf16 mv (bf16 out)", g_bytes, lambda: G @ xb, None))
    for name, nbytes, f_torch, f_cuda in cases:
        t_t = timeit(f_torch, device, reps)
        t_c = timeit(f_cuda, device, reps) if use_cuda and f_cuda is not None else None
        bw_t = nbytes / (t_t * 1e-3) / 1e9
        bw_c = None if t_c is None else nbytes / (t_c * 1e-3) / 1e9
        rows.append([name, str(storage).replace("torch.", ""), fmt(t_t), fmt(t_c), fmt(bw_t, ".0f"),
                     fmt(bw_c, ".0f"), fmt(bw_t / copy_gbs, ".2f"),
                     fmt(None if bw_c is None else bw_c / copy_gbs, ".2f")])
    return rows


def bench_update_mul(m: int, d: int, device: torch.device, use_cuda: bool, reps: int,
                     copy_gbs: float) -> str:
    """``DynamicMFAC.update_mul`` with a full window, torch references vs kernels (switched by
    HF_MFAC_KERNELS)."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    saved = os.environ.get(K.ENV_VAR)
    try:
        for storage in (torch.float32, torch.bfloat16):
            rows.append(_update_mul_row(m, d, storage, gen, device, use_cuda, reps, copy_gbs))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop(K.ENV_VAR, None)
        else:
            os.environ[K.ENV_VAR] = saved
    return table(["window", "torch ms", "CUDA ms", "speed-up", "torch / copy bw", "CUDA / copy bw",
                  "fill (m updates) s"], rows)


def _update_mul_row(m: int, d: int, storage: torch.dtype, gen: torch.Generator,
                    device: torch.device, use_cuda: bool,
                    reps: int, copy_gbs: float) -> list:
    """One window dtype's row; a function of its own so that the window (held by the lambda) is
    freed on return."""
    from hf_mfac.core.ihvp import DynamicMFAC

    w = DynamicMFAC(d, m, 1e-4, device=device, grad_dtype=storage)
    g = torch.randn(d, device=device, generator=gen)
    os.environ[K.ENV_VAR] = "auto"
    t0 = time.perf_counter()
    for _ in range(m):  # fill the window through the public API
        w.update(torch.randn(d, device=device, generator=gen))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fill_s = time.perf_counter() - t0
    times = {}
    for impl in ("torch", "cuda") if use_cuda else ("torch",):
        os.environ[K.ENV_VAR] = impl
        times[impl] = timeit(lambda: w.update_mul(g), device, reps)
    nbytes = 2 * m * d * torch.empty(0, dtype=storage).element_size()
    frac = {k: nbytes / (v * 1e-3) / 1e9 / copy_gbs for k, v in times.items()}
    return [str(storage).replace("torch.", ""), fmt(times["torch"]), fmt(times.get("cuda")),
            fmt(None if "cuda" not in times else times["torch"] / times["cuda"], ".2f"),
            fmt(frac["torch"], ".2f"), fmt(frac.get("cuda"), ".2f"), fmt(fill_s, ".1f")]


def _gram_chunked(G: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    out = torch.zeros(G.shape[0], G.shape[0], device=G.device)
    for s in range(0, G.shape[1], chunk):
        g = G[:, s : s + chunk].float()
        out += g @ g.T
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ms", default=None, help="comma-separated m for the coefficient setup")
    ap.add_argument(
        "--m",
        type=int,
        default=None,
        help="window size for the products (default 1024 GPU, 32 CPU)",
    )
    ap.add_argument(
        "--d", type=int, default=None, help="dimension (default BERT-mini on GPU, 1M on CPU)"
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--skip-coefficients", action="store_true")
    ap.add_argument("--skip-window", action="store_true")
    ap.add_argument("--skip-update-mul", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    ms = (
        [int(v) for v in args.ms.split(",")]
        if args.ms
        else ([256, 512, 1024, 2048, 4096] if gpu else [64, 128, 256, 512])
    )
    m = args.m or (1024 if gpu else 32)
    d = args.d or (BERT_MINI_D if gpu else 1_000_000)
    reps = args.reps or (20 if gpu else 3)

    reason = K.status()["reason"] if gpu else "CPU run: torch paths only"
    name = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    print(
        f"# hf_mfac kernel benchmarks\n\n- date: {datetime.date.today().isoformat()}\n- device: "
        f"{name}"
        f"\n- torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    if reason is None:
        t0 = time.perf_counter()
        try:
            K.mfac_b(torch.eye(8, device=device), 1.0, 1.0, impl="cuda")  # JIT build or cache load
            print(f"- CUDA kernels: built/loaded in {time.perf_counter() - t0:.1f} s")
        except K.KernelUnavailableError as exc:  # includes a failed self-check
            reason = str(exc)
    use_cuda = reason is None
    if not use_cuda:
        print(f"- CUDA kernels: not used ({reason})")
    if gpu:
        need = m * d * 4 * 1.1
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            m_new = max(32, int(m * free / need) // 32 * 32)
            print(
                f"- note: G fp32 ({m}x{d}) does not fit in {free / 2**30:.0f} GiB free; using m "
                f"= {m_new}"
            )
            m = m_new
    copy_gbs = copy_bandwidth(device, min(2**31, m * d * 2), reps)
    print(f"- copy bandwidth (read + write, same run): {copy_gbs:.0f} GB/s\n", flush=True)
    if not args.skip_coefficients:
        print("## Coefficient setup ([M-FAC, App. B, Alg. 1]), fp32\n", flush=True)
        print(bench_coefficients(ms, device, use_cuda, reps), flush=True)
    if not args.skip_window:
        print(
            f"\n## Window products, m = {m}, d = {d:,} (bound: one read of G per pass)\n",
            flush=True,
        )
        print(bench_window(m, d, device, use_cuda, reps, copy_gbs), flush=True)
    if not args.skip_update_mul:
        print(
            f"\n## DynamicMFAC.update_mul, m = {m}, d = {d:,} (bound: two reads of G)\n", flush=True
        )
        print(bench_update_mul(m, d, device, use_cuda, reps, copy_gbs), flush=True)


if __name__ == "__main__":
    main()
