"""Peak memory and time split of prune_oneshot on random BERTs, against estimate_memory.

Each run is a fresh subprocess: it builds a random BertForSequenceClassification (hidden size h, L
layers, intermediate 4h) and synthetic batches, takes its resident memory, resets the peak
(``/proc/self/clear_refs``) and runs one prune_oneshot; the extra peak is the peak resident memory
during the call minus the memory before it. The time split reads the Fisher's own clocks
(accumulation, inversion) and the gradient collection's (forward and backward). ``--code DIR`` runs
another checkout of the library (e.g. the code before a change) in the child.

    python benchmarks/bench_memory.py --sizes 256x4 384x4 512x4 --methods obert cap
    python benchmarks/bench_memory.py --shapes   # BERT-base/large estimates on the meta device
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import gc, json, sys, time, torch
torch.manual_seed(0)
from transformers import BertConfig, BertForSequenceClassification
h, L, method, m, B = {h}, {L}, {method!r}, {m}, {B}
cfg = BertConfig(vocab_size=1000, hidden_size=h, num_hidden_layers=L,
                 num_attention_heads=max(1, h // 64), intermediate_size=4 * h,
                 max_position_embeddings=64, num_labels=2)
model = BertForSequenceClassification(cfg)
g = torch.Generator().manual_seed(1)
data = [dict(input_ids=torch.randint(0, 1000, (8, 32), generator=g),
             labels=torch.randint(0, 2, (8,), generator=g)) for _ in range(m)]
import hf_mfac.pruning as P
from hf_mfac.pruning import prune_oneshot
clocks = {{}}
try:
    import hf_mfac.pruning.driver as O
    real = O.collect_grads
    def spy(*a, **k):
        st = real(*a, **k)
        clocks["grads_total"] = st.seconds
        clocks["forward_backward"] = getattr(st, "seconds_model", None)
        clocks["accumulate_sink"] = getattr(st, "seconds_sink", None)
        fisher = getattr(k.get("sink"), "__self__", None)
        clocks["fisher"] = fisher
        return st
    O.collect_grads = spy
except Exception:
    pass
est = None
if hasattr(P, "estimate_memory"):
    est = P.estimate_memory(model, method, sparsity=0.5, num_grads=m, block_size=B)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
peaks = {{}}
def mark(name):
    peaks[name] = max(peaks.get(name, 0), rss("VmHWM:"))
    open("/proc/self/clear_refs", "w").write("5")
try:  # each phase's own peak: the gradients, forming the inverse, the step
    from hf_mfac.core import fisher as F
    real_invert = F.BlockFisherInverse._invert
    def _invert(self):
        if self._inverted:
            return real_invert(self)
        mark("gradients")
        real_invert(self)
        mark("invert")
    F.BlockFisherInverse._invert = _invert
except Exception:
    pass
gc.collect()
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
t0 = time.perf_counter()
res = prune_oneshot(model, data, method=method, sparsity=0.5, num_grads=m, block_size=B,
                    progress=False)
total = time.perf_counter() - t0
mark("step")
peak = max(peaks.values())
fisher = clocks.pop("fisher", None)
sec = getattr(fisher, "seconds", {{}}) if fisher is not None else {{}}
rep = res.report
out = dict(h=h, L=L, method=method, targets=sum(t.numel() for t in P.find_prunable(model).values()),
           extra_peak=peak - base, estimate=None if est is None else max(est.values()),
           parts=None if est is None else est.parts, time_total=total, time_grads=rep.time_grads,
           time_prune=rep.time_prune, invert=sec.get("invert"), accumulate=sec.get("accumulate"),
           chunk=None if est is None else est.settings.get("chunk_size"),
           phase_peaks={{k: v - base for k, v in peaks.items()}}, **clocks)
print("RESULT " + json.dumps(out))
"""


def run(h: int, L: int, method: str, m: int, B: int, code: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if code:
        env["PYTHONPATH"] = code
    src = CHILD.format(h=h, L=L, method=method, m=m, B=B)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env,
                       cwd=code or os.getcwd())
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(p.stderr[-3000:])


SHAPES = {  # (hidden, layers, intermediate) of the BERT shapes
    "BERT-base": (768, 12, 3072),
    "BERT-large": (1024, 24, 4096),
}
GPU_GB = (24, 40, 80)


def shape_table(num_grads: int = 128, counts=(1, 2, 4, 8)) -> list[dict]:
    """Estimates at the real BERT shapes, built on the meta device (nothing allocated): each
    method's peak on the GPU against its packed fp32 Fisher, then, with the Fisher's blocks split
    evenly over n GPUs (``estimate_memory(placement=...)``), the largest per-GPU peak and the GPU
    sizes it fits. The model's weights (fp32) and activations on the GPU that runs it are not in
    the estimate; ``model_gb`` gives the weights."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from hf_mfac.core.fisher import block_fisher_bytes
    from hf_mfac.pruning import estimate_memory, find_prunable

    rows = []
    for shape, (h, L, inter) in SHAPES.items():
        cfg = BertConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=h // 64,
                         intermediate_size=inter, num_labels=2)
        with torch.device("meta"):
            model = BertForSequenceClassification(cfg)
        D = sum(t.numel() for t in find_prunable(model).values())
        model_gb = sum(p.numel() for p in model.parameters()) * 4 / 1e9
        for method, B in (("obert", 32), ("obert", 16), ("cap", 32)):
            packed = block_fisher_bytes(D, 32, num_grads=num_grads, rel_damp=1e-2)[1]
            row = dict(shape=shape, method=method, block_size=B, targets=D, model_gb=model_gb,
                       packed_fp32_fisher_b32_gb=packed / 1e9, num_grads=num_grads)
            nb = D // B
            for n in counts:
                cuts = [i * nb // n for i in range(n + 1)]
                placement = [(f"cuda:{i}", cuts[i], cuts[i + 1]) for i in range(n)]
                est = estimate_memory(model, method, device="cuda:0", num_grads=num_grads,
                                      block_size=B, sparsity=0.8, placement=placement)
                gpu = max(v for d, v in est.items() if d.startswith("cuda"))
                if n == 1:
                    row["gpu_gb"] = gpu / 1e9
                    row["over_packed"] = gpu / packed
                    row["host_gb"] = est.get("cpu", 0) / 1e9
                    row["terms"] = {k: round(v / 1e9, 2) for k, v in est.parts["cuda:0"].items()}
                row[f"x{n}_max_gpu_gb"] = gpu / 1e9
                row[f"x{n}_fits"] = [g for g in GPU_GB if gpu + model_gb * 1e9 <= g * 1e9]
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["256x4", "384x4", "512x4"],
                    help="hidden x layers")
    ap.add_argument("--methods", nargs="+", default=["obert", "cap"])
    ap.add_argument("--num-grads", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--code", default=None,
                    help="a checkout of the library to run instead of this one")
    ap.add_argument("--shapes", action="store_true",
                    help="only the estimates at the BERT-base and BERT-large shapes (meta device)")
    args = ap.parse_args()
    if args.shapes:
        for row in shape_table(args.num_grads):
            print(json.dumps(row))
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}, "
          f"code={args.code or 'this checkout'}")
    for size in args.sizes:
        h, L = map(int, size.split("x"))
        for method in args.methods:
            r = run(h, L, method, args.num_grads, args.block_size, args.code)
            D = r["targets"]
            packed = D * 66 if args.block_size == 32 else None
            r["extra_over_packed"] = None if packed is None else r["extra_peak"] / packed
            est = r["estimate"]
            r["estimate_over_measured"] = None if est is None else est / r["extra_peak"]
            print(json.dumps(r))


if __name__ == "__main__":
    main()
