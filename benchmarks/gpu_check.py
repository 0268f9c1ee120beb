"""Driver of ``benchmarks/gpu_check.sh``: runs each part of the GPU check in a subprocess under its
own time budget and a deadline for the whole, then writes one Markdown block ready for
``benchmarks/RESULTS.md`` (``gpu_check.md``), the same results as JSON (``gpu_check.json``) and
every part's output (``gpu_check.log``) into the output folder.

    python3 benchmarks/gpu_check.py --python .venv/bin/python --out outputs/gpu_check
    python3 benchmarks/gpu_check.py --dry-run          # list the parts, run nothing

Standard library only (it runs before, and independently of, the environment it checks). Parts, in
order of priority (a part that would not get its minimum time before the deadline is skipped):

1. ``env``: GPU, driver, torch/CUDA, nvcc, ninja, ``hf_mfac.kernels.status()``.
2. ``build``: ``hf_mfac.kernels.build_kernels()``: the JIT build (timed) and the self-check of every
   kernel and storage dtype on every visible GPU.
3. ``tests``: the kernel tests (CUDA ones included; the compile-only test is left out) and the 2:4
   export test on the GPU.
4. ``bench_kernels``: coefficient setup for m = 256..4096 (CUDA B kernel vs torch trsm, and the
   paper's 2 ms at m = 1024), ``G x`` / ``G^T c`` / Algorithm 2 and ``DynamicMFAC.update_mul`` at
   BERT-mini d and m = 1024 in fp32 and bf16, against the copy bandwidth measured in the same run.
5. ``bench_optim``: the M-FAC optimizer step against the AdamW step on BERT-mini.
6. ``bench_core``: ``BlockFisherInverse`` add_grads of m = 256 / 1024 gradients + inversion (fp64
   products) at d = 2^22 against the bare fp32 batched GEMMs of the same accumulation (TF32 off), as
   a fraction of the GEMM's throughput.
7. ``sparse24``: 2:4 export of a BERT-base Linear stack and its speed against dense.
8. ``split``: a small BERT dispatched by accelerate between the GPU and the CPU (embeddings and the
   first half of the layers on ``cuda:0``, the rest on the CPU, resident: ``main_device="cpu"``)
   pruned as it is (each target's Fisher on its weight's device), and the CPU model's Fisher placed
   over ``[cuda:0 with a capacity for about half of it, cpu]``: the plans, the estimated and
   measured peak per device, whether the masks equal a CPU-only run's, the hooks intact, the
   forward. ``python3 benchmarks/gpu_check.py --split-check --device cpu`` runs the same code on
   the CPU alone (the tests do).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_MARK = "@@GPU_CHECK_JSON "

ENV_CODE = r"""
import json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
query = "--query-gpu=name,driver_version,memory.total"
info["nvidia_smi"] = run(["nvidia-smi", query, "--format=csv,noheader"])
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    sm=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    from torch.utils import cpp_extension
    info["cuda_home"] = cpp_extension.CUDA_HOME
    info["ninja"] = cpp_extension.is_ninja_available()
    home = cpp_extension.CUDA_HOME
    nvcc = (home and shutil.which(home + "/bin/nvcc")) or shutil.which("nvcc")
    version = (run([nvcc, "--version"]).splitlines() or ["?"])[-1] if nvcc else None
    info["nvcc"] = f"{version} ({nvcc})" if nvcc else "not found"
    import hf_mfac.kernels as K
    st = K.status()
    info["kernels_available"], info["kernels_reason"] = st["available"], st["reason"]
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
try:
    git = ["git", "rev-parse", "--short", "HEAD"]
    info["commit"] = subprocess.run(git, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
except Exception:
    info["commit"] = None
print("@@GPU_CHECK_JSON " + json.dumps(info))
"""

BUILD_CODE = (
    "import json, hf_mfac.kernels as K; "
    "print('@@GPU_CHECK_JSON ' + json.dumps(K.build_kernels(verbose=True)), flush=True)"
)


def split_check(argv=None) -> int:
    """The ``split`` part (run with the environment's python): prune a BERT split between
    ``--device`` (default cuda:0) and the CPU, and the CPU model with its Fisher placed over both;
    compare with a CPU-only run. Prints a Markdown table and one JSON line; exit 1 when the masks
    of a run differ from the CPU run's in more than 0.1 % of the weights, a hook is lost, or the
    forward fails."""
    import argparse as _argparse
    import copy as _copy
    import resource

    import torch
    from accelerate import dispatch_model
    from transformers import BertConfig, BertForSequenceClassification

    from hf_mfac.pruning import Layout, find_prunable, make_pruner, prune_oneshot
    from hf_mfac.pruning.placement import placement_sizes

    ap = _argparse.ArgumentParser(prog="gpu_check.py --split-check")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("split: torch sees no CUDA device (pass --device cpu to run it on the CPU alone)")
        return 1
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=a.hidden, num_hidden_layers=a.layers,
                     num_attention_heads=4, intermediate_size=4 * a.hidden,
                     max_position_embeddings=64, num_labels=2)
    base = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 1000, (8, 32), generator=g),
             "attention_mask": torch.ones(8, 32, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(32)]
    settings = dict(method="obert", sparsity=0.5, num_grads=32, block_size=32, progress=False)
    half = a.layers // 2
    device_map = {"bert.embeddings": str(dev), "bert.pooler": "cpu", "dropout": "cpu",
                  "classifier": "cpu"}
    device_map.update({f"bert.encoder.layer.{i}": str(dev) if i < half else "cpu"
                       for i in range(a.layers)})

    def peak_reset():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            return torch.cuda.memory_allocated(dev)
        return 0

    def peak_read(start):
        if dev.type != "cuda":
            return None
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - start

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    reference = _copy.deepcopy(base)
    t0 = time.perf_counter()
    ref = prune_oneshot(reference, data, **settings)
    rows, failures, report = [("CPU alone", ref, None, time.perf_counter() - t0, rss())], [], {}

    split = dispatch_model(_copy.deepcopy(base), device_map=device_map, main_device="cpu",
                           force_hooks=True)
    hooks = {n: type(m._hf_hook).__name__ for n, m in split.named_modules()
             if hasattr(m, "_hf_hook")}
    start = peak_reset()
    t0 = time.perf_counter()
    res = prune_oneshot(split, data, **settings)
    rows.append(("dispatched (device_map)", res, peak_read(start), time.perf_counter() - t0,
                 rss()))
    after = {n: type(m._hf_hook).__name__ for n, m in split.named_modules()
             if hasattr(m, "_hf_hook")}
    if after != hooks:
        failures.append("the dispatched model's hooks changed")
    with torch.no_grad():
        out_split = split(**data[0]).logits.float().cpu()
        out_ref = reference(**data[0]).logits.float()
    forward_err = float((out_split - out_ref).abs().max())
    if not forward_err <= 1e-3 * max(1.0, float(out_ref.abs().max())):
        failures.append(f"the dispatched model's forward differs from the CPU run's by "
                        f"{forward_err}")

    # a capacity on the device for about half of the Fisher (and the step's vectors): the CPU
    # takes the rest
    placed = _copy.deepcopy(base)
    layout = Layout(find_prunable(base), pad=32)
    per_block, reserve = placement_sizes(make_pruner("obert", block_size=32), layout.dim, 32)
    room = layout.dim // 32 // 2 * per_block + reserve  # as the plan counts
    start = peak_reset()
    t0 = time.perf_counter()
    rest = None if dev.type != "cpu" else room  # CPU alone: two equal slots
    res2 = prune_oneshot(placed, data, device=[(str(dev), room), ("cpu", rest)], **settings)
    rows.append(("CPU model, Fisher placed", res2, peak_read(start), time.perf_counter() - t0,
                 rss()))

    total = sum(m.numel() for m in ref.masks.values())
    print(f"split: {a.layers} BERT layers of {a.hidden}, {total} target weights; layers "
          f"0-{half - 1} on {dev}, the rest on the CPU; obert 50 %, 32 gradients, B = 32")
    print("")
    print("| run | Fisher placement | work device | estimate per device | measured peak on "
          f"{dev} | peak RSS | seconds | masks = CPU run | weights max diff |")
    print("|---|---|---|---|---:|---:|---:|---|---:|")
    for name, r, peak, sec, rss_b in rows:
        diff = sum(int((r.masks[k].cpu() != ref.masks[k].cpu()).sum()) for k in ref.masks)
        wdiff = 0.0
        plan = "; ".join(f"{p['device']} {p['blocks'][0]}-{p['blocks'][1] - 1}"
                         for p in r.report.placement or [])
        est = ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in
                        (r.report.memory_estimate or {}).items())
        if r is not ref:
            model = split if r is res else placed
            wdiff = max(float((p.detach().cpu() - q.detach()).abs().max())
                        for p, q in zip(model.parameters(), reference.parameters()))
            if diff > 1e-3 * total:
                failures.append(f"{name}: {diff} mask entries differ from the CPU run's")
        report[name] = {"placement": r.report.placement, "work_device": r.report.work_device,
                        "estimate": r.report.memory_estimate, "peak_device": peak,
                        "peak_rss": rss_b, "seconds": round(sec, 2), "mask_diffs": diff,
                        "weights_max_diff": wdiff}
        shown = "n/a" if peak is None else f"{peak / 2**20:.0f} MiB"
        same = "yes" if diff == 0 else f"no ({diff} of {total} differ)"
        print(f"| {name} | {plan} | {r.report.work_device} | {est} | {shown} | "
              f"{rss_b / 2**20:.0f} MiB | {sec:.1f} | {same} | {wdiff:.2e} |")
    print("")
    print(f"split: hooks intact: {after == hooks} ({len(after)} modules); forward after pruning "
          f"vs the CPU run: max |diff| {forward_err:.2e}; "
          + ("ok" if not failures else "FAILED: " + "; ".join(failures)))
    print(JSON_MARK + json.dumps({"runs": report, "failures": failures}, default=str))
    return 1 if failures else 0


class Part:
    """One step of the check: ``budget`` seconds at most, skipped when fewer than ``minimum`` are
    left. An ``essential`` part (env, build, tests) holds back time only for the essential parts
    after it."""

    def __init__(self, name, title, argv, budget, minimum, paths=(), essential=False):
        self.name, self.title, self.argv, self.budget, self.minimum = (
            name,
            title,
            argv,
            budget,
            minimum,
        )
        self.paths, self.essential = paths, essential  # files the part needs (checked by --dry-run)


def parts(py: str) -> list[Part]:
    tests = [
        "tests/test_kernels.py",
        "tests/test_kernel_selfcheck.py",
        "tests/test_sparse_checkpoint.py::test_export_semi_structured_on_gpu",
    ]
    return [
        Part("env", "environment", [py, "-c", ENV_CODE], 40, 10, essential=True),
        Part(
            "build",
            "JIT build and self-check (hf_mfac.kernels.build_kernels)",
            [py, "-c", BUILD_CODE],
            240,
            45,
            essential=True,
        ),
        Part(
            "tests",
            "CUDA tests",
            [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "not slow", *tests],
            150,
            40,
            [t.split("::")[0] for t in tests],
            essential=True,
        ),
        Part(
            "bench_kernels",
            "kernel benchmarks",
            [py, "benchmarks/bench_kernels.py", "--reps", "10"],
            120,
            40,
            ["benchmarks/bench_kernels.py"],
        ),
        Part(
            "bench_optim",
            "optimizer step",
            [py, "benchmarks/bench_optim.py", "--sizes", "mini", "--ms", "256,1024", "--bf16"],
            75,
            25,
            ["benchmarks/bench_optim.py"],
        ),
        Part(
            "bench_core",
            "block-Fisher build vs bare GEMM",
            [
                py,
                "benchmarks/bench_core.py",
                "--sections",
                "build",
                "--device",
                "cuda",
                "--build-dims",
                "4194304",
            ],
            60,
            20,
            ["benchmarks/bench_core.py"],
        ),
        Part(
            "sparse24",
            "2:4 export and speed",
            [
                py,
                "benchmarks/bench_checkpoint_size.py",
                "--skip-size",
                "--tokens",
                "4096",
                "16384",
                "--repeats",
                "20",
            ],
            50,
            20,
            ["benchmarks/bench_checkpoint_size.py"],
        ),
        Part(
            "split",
            "a model split between the GPU and the CPU, pruned as it is",
            [py, "benchmarks/gpu_check.py", "--split-check"],
            90,
            30,
            ["benchmarks/gpu_check.py"],
        ),
    ]


def run_part(part: Part, timeout: float, env: dict) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        part.argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    status = "ok"
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    return {
        "name": part.name,
        "title": part.title,
        "status": status,
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "budget": round(timeout),
        "cmd": shlex.join(part.argv[:2] + (["<code>"] if part.argv[1] == "-c" else part.argv[2:])),
        "stdout": out or "",
        "stderr": err or "",
    }


def marked_json(text: str):
    for line in reversed(text.splitlines()):
        if line.startswith(JSON_MARK):
            try:
                return json.loads(line[len(JSON_MARK) :])
            except ValueError:
                return None
    return None


def demote(text: str, levels: int = 3) -> str:
    """Markdown headers one level under this block's ``###``."""
    return "\n".join(
        ("#" * levels + line) if line.startswith("#") else line for line in text.splitlines()
    )


def tail(text: str, n: int = 15) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _num(v, spec=".3g"):
    return "n/a" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    env, rep, parts_ = results.get("env") or {}, results.get("build_kernels"), results["parts"]
    byname = {p["name"]: p for p in parts_}
    gpu = env.get("gpu") or "no CUDA GPU visible to torch"
    head = (
        f"### GPU check: {gpu}"
        + (
            f" (x{env['gpus']}, {env.get('sm')}, {env.get('memory_gib')} GiB, {env.get('sms')} SMs)"
            if env.get("gpu")
            else ""
        )
        + f", {results['date']}"
    )
    lines = [
        head,
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), nvcc: {env.get('nvcc')}, "
        f"ninja: {env.get('ninja')}, nvidia-smi: {env.get('nvidia_smi')}; hf_mfac commit "
        f"{env.get('commit')}; "
        f"`bash benchmarks/gpu_check.sh` took {results['total_s']:.0f} s.",
        "",
    ]
    if results.get("setup_error"):
        lines += [f"- Setup failed: {results['setup_error']}", ""]
    if rep is None:
        b = byname.get("build")
        lines.append(f"- Build and self-check: {b['status'] if b else 'not run'}.")
    elif rep.get("reason"):
        lines.append(f"- Build: nothing built: {rep['reason']}.")
    for dev in (rep or {}).get("devices", []):
        if dev.get("error"):
            lines.append(
                f"- Build for cuda:{dev['index']} ({dev['arch']}): FAILED: {tail(dev['error'], 3)}"
            )
            continue
        how = "compiled" if dev["compiled"] else "loaded from the cache"
        checks = dev["checks"]
        n_ok = sum(c["ok"] for c in checks)
        slow = max((c["seconds"] for c in checks), default=0)
        lines.append(
            f"- Build for cuda:{dev['index']} ({dev['name']}, {dev['arch']}): {how} in "
            f"{dev['seconds']:.1f} s "
            f"(lock: {rep.get('lock')}). Self-check: {n_ok}/{len(checks)} passed, slowest "
            f"{1e3 * slow:.1f} ms."
        )
    t = byname.get("tests")
    if t:
        summary = next(
            (
                ln.strip("= ")
                for ln in reversed(t["stdout"].splitlines())
                if re.search(r"\d+ (passed|failed|error)", ln)
            ),
            t["status"],
        )
        lines.append(
            f"- Tests (kernels, self-check, 2:4 export on the GPU; `-m 'not slow'`): {summary}."
        )
    lines.append("")
    devs = [d for d in (rep or {}).get("devices", []) if d.get("checks")]
    if devs:
        lines += [
            "#### Kernel self-check (before first use; per kernel and storage dtype)",
            "",
            "| GPU | kernel | dtype | verdict | max error | allowed | closest case | ms |",
            "|---|---|---|---|---:|---:|---|---:|",
        ]
        for dev in devs:
            for c in dev["checks"]:
                verdict = (
                    "pass" if c["ok"] else f"FAIL{': ' + c['error'] if c.get('error') else ''}"
                )
                lines.append(
                    f"| cuda:{dev['index']} | {c['kernel']} | {c['dtype']} | {verdict} | "
                    f"{_num(c['max_err'])} | {_num(c['bound'])} | {c['case']} | "
                    f"{1e3 * c['seconds']:.1f} |"
                )
        lines.append("")
    for name, title, keep in (
        ("bench_kernels", "Kernels: coefficient setup, window products, update_mul", None),
        (
            "bench_optim",
            "Optimizer step: M-FAC vs AdamW (BERT-mini)",
            lambda ln: ln.startswith("|") or ln.startswith("kernels:"),
        ),
        (
            "bench_core",
            "Block-Fisher add_grads + invert vs the bare fp32 batched GEMM",
            lambda ln: ln.startswith("|"),
        ),
        ("sparse24", "2:4 export and speed vs dense", None),
        (
            "split",
            "A model split between the GPU and the CPU (accelerate device_map), pruned as it is",
            lambda ln: ln.startswith("|") or ln.startswith("split:"),
        ),
    ):
        p = byname.get(name)
        if p is None:
            continue
        lines += [f"#### {title}", ""]
        body = p["stdout"].strip()
        if keep is not None:
            body = "\n".join(ln for ln in body.splitlines() if keep(ln))
        if body:
            lines += [demote(body), ""]
        if p["status"] != "ok":
            lines += [
                f"({name}: {p['status']} after {p['seconds']:.0f} s of a {p['budget']} s "
                "budget; "
                "last lines:)",
                "",
                "```",
                tail(p["stderr"] or p["stdout"]),
                "```",
                "",
            ]
    lines += ["#### Parts", "", "| part | status | seconds | budget |", "|---|---|---:|---:|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} | {p['budget']} |" for p in parts_]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--split-check"]:  # the split part itself, in the environment under test
        return split_check(argv[1:])
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--python", default=sys.executable, help="interpreter of the environment under test"
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"))
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="epoch seconds by which everything must be done (default: now + --budget)",
    )
    ap.add_argument(
        "--budget", type=float, default=470.0, help="seconds for all parts (default 470)"
    )
    ap.add_argument(
        "--parts", default=None, help="comma-separated subset of the parts, in their order"
    )
    ap.add_argument(
        "--setup-error",
        default=None,
        help="the environment could not be set up: record why, run nothing",
    )
    ap.add_argument(
        "--started", type=float, default=None, help="epoch seconds the whole check started"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="list the parts and their budgets, run nothing"
    )
    a = ap.parse_args(argv)
    started = a.started or time.time()
    deadline = a.deadline or (time.time() + a.budget)
    plan = parts(a.python)
    if a.parts:
        wanted = [p.strip() for p in a.parts.split(",") if p.strip()]
        unknown = sorted(set(wanted) - {p.name for p in plan})
        if unknown:
            ap.error(f"unknown parts {unknown}; expected some of {[p.name for p in plan]}")
        plan = [p for p in plan if p.name in wanted]

    if a.dry_run:
        missing = []
        print(
            f"gpu_check (dry run): {len(plan)} parts with {a.python}, "
            f"{max(0, deadline - time.time()):.0f} s left "
            f"of the deadline; results into {a.out}/gpu_check.md, .json, .log"
        )
        for i, p in enumerate(plan, 1):
            shown = p.argv[:2] + (["<code>"] if p.argv[1] == "-c" else p.argv[2:])
            lacks = [f for f in p.paths if not (ROOT / f).is_file()]
            missing += lacks
            print(
                f"  {i}. {p.name:<13} budget {p.budget:>3} s (min {p.minimum:>2} s)  {p.title}\n"
                f"     $ {shlex.join(shown)}"
                + (f"\n     MISSING: {', '.join(lacks)}" if lacks else "")
            )
        print(
            f"  then: {a.out}/gpu_check.md (the block for benchmarks/RESULTS.md), "
            "gpu_check.json, gpu_check.log"
        )
        return 1 if missing else 0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = str(Path(a.python).parent) + os.pathsep + env.get("PATH", "")  # the venv's ninja
    results = {
        "version": 1,
        "date": datetime.date.today().isoformat(),
        "python": a.python,
        "setup_error": a.setup_error,
        "env": None,
        "build_kernels": None,
        "parts": [],
    }
    logs = []
    for i, p in enumerate([] if a.setup_error else plan):
        reserve = sum(q.minimum for q in plan[i + 1 :] if q.essential or not p.essential)
        left = deadline - time.time()
        timeout = min(p.budget, left - reserve)
        if timeout < p.minimum:
            # the later parts get nothing anyway if this one is skipped
            timeout = min(p.budget, left)
            if timeout < p.minimum:
                results["parts"].append(
                    {
                        "name": p.name,
                        "title": p.title,
                        "status": "skipped (out of time)",
                        "rc": None,
                        "seconds": 0,
                        "budget": max(0, round(timeout)),
                        "cmd": "",
                        "stdout": "",
                        "stderr": "",
                    }
                )
                continue
        print(
            f"gpu_check: {p.name} ({p.title}), up to {timeout:.0f} s ...",
            file=sys.stderr,
            flush=True,
        )
        r = run_part(p, timeout, env)
        print(
            f"gpu_check: {p.name}: {r['status']} in {r['seconds']} s", file=sys.stderr, flush=True
        )
        results["parts"].append(r)
        logs.append(
            f"===== {p.name}: {r['status']} (rc {r['rc']}) in {r['seconds']} s: "
            f"{r['cmd']}\n"
            f"----- stdout\n{r['stdout'][-2_000_000:]}\n----- "
            f"stderr\n{r['stderr'][-2_000_000:]}\n"
        )
        if p.name == "env":
            results["env"] = marked_json(r["stdout"])
        elif p.name == "build":
            results["build_kernels"] = marked_json(r["stdout"])
    results["total_s"] = round(time.time() - started, 1)
    md = markdown(results)
    results["markdown"] = md
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.log").write_text("\n".join(logs))
    slim = dict(
        results,
        parts=[
            {k: v for k, v in p.items() if k not in ("stdout", "stderr")}
            | {"output_tail": tail(p["stdout"] + "\n" + p["stderr"], 40)}
            for p in results["parts"]
        ],
    )
    (out / "gpu_check.json").write_text(json.dumps(slim, indent=1, default=str))
    print(md)
    print(f"gpu_check: wrote {out}/gpu_check.md, gpu_check.json, gpu_check.log", file=sys.stderr)
    rep = results["build_kernels"] or {}
    good = (
        not a.setup_error
        and all(p["status"] == "ok" for p in results["parts"])
        and (rep.get("ok", False) or "build" not in [p.name for p in plan])
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
