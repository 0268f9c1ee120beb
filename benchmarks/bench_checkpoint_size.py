"""Checkpoint size, dense vs compact, and (on a GPU) 2:4 semi-structured inference speed vs dense.

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint_size.py                 # BERT-base,
    50/80/90% + 2:4 python benchmarks/bench_checkpoint_size.py --size tiny --sparsities 0.5 0.9  #
    quick check

Sizes: a randomly initialised BertForSequenceClassification (BERT-base: 12 layers, hidden 768, 109M
parameters) whose encoder Linear weights (85M, the ones the papers prune) are magnitude-pruned per
layer; embeddings, pooler and classifier stay dense. For each sparsity it writes
``save_sparse_pretrained`` (the dense ``model.safetensors`` stock transformers loads, plus the bool
masks file) and ``save_compact_pretrained`` (values + packed bitmask), checks the compact round trip
is exact, and prints a markdown table of file sizes. Sizes do not depend on the weights' values,
only on the shapes and sparsity.

Speed (CUDA, compute capability >= 8.0 only; skipped otherwise): a BERT-base Linear stack (12 x [Q,
K, V, O 768x768, FFN 768->3072->768]) in fp16 on ``--tokens`` tokens, dense vs 2:4 after
``export_semi_structured``, timed with CUDA events (median of ``--repeats``), reported as a ratio
measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512),
}


def prune_encoder(model, sparsity: float | None):
    """Magnitude-prune the encoder Linear weights in place (per layer; ``None`` = 2:4); returns the
    masks."""
    from hf_mfac.core.masks import nm_mask, threshold_masks

    weights = {n: p for n, p in model.named_parameters()
               if n.startswith("bert.encoder") and n.endswith(".weight") and p.dim() == 2}
    scores = {n: p.detach().abs() for n, p in weights.items()}
    masks = ({n: nm_mask(s, 2, 4) for n, s in scores.items()} if sparsity is None
             else threshold_masks(scores, sparsity, scope="layer"))
    with torch.no_grad():
        for n, p in weights.items():
            p.mul_(masks[n])
    return masks


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def size_table(size: str, sparsities, dtype: torch.dtype, workdir: str) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    from hf_mfac.integrations import (
        load_compact_pretrained,
        save_compact_pretrained,
        save_sparse_pretrained,
    )
    from hf_mfac.integrations.checkpoint import COMPACT_WEIGHTS_NAME, MASKS_NAME

    rows = []
    for s in sparsities:
        torch.manual_seed(0)
        model = (
            BertForSequenceClassification(BertConfig(**SIZES[size], num_labels=2)).to(dtype).eval()
        )
        masks = prune_encoder(model, None if s == "2:4" else float(s))
        dense_dir, compact_dir = (
            os.path.join(workdir, f"dense-{s}"),
            os.path.join(workdir, f"compact-{s}"),
        )
        meta = save_sparse_pretrained(model, dense_dir, masks, method="magnitude")
        t = time.perf_counter()
        save_compact_pretrained(model, compact_dir, masks, method="magnitude")
        t_save = time.perf_counter() - t
        t = time.perf_counter()
        back = load_compact_pretrained(compact_dir)
        t_load = time.perf_counter() - t
        ref = model.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items()), (
            "compact round trip not exact"
        )
        dense = os.path.getsize(os.path.join(dense_dir, "model.safetensors"))
        masks_file = os.path.getsize(os.path.join(dense_dir, MASKS_NAME))
        compact = os.path.getsize(os.path.join(compact_dir, COMPACT_WEIGHTS_NAME))
        rows.append(
            f"| {s if s == '2:4' else f'{100 * float(s):.0f}%'} | "
            f"{100 * meta['model_sparsity']:.1f}% | "
            f"{mb(dense)} | {mb(masks_file)} | {mb(compact)} | {compact / dense:.3f} | "
            f"{t_save:.1f} / {t_load:.1f} |"
        )
        del model, back
    n_params = sum(int(torch.Size(r["shape"]).numel()) for r in meta["per_layer"].values())
    head = (
        f"BERT-{size} ({dtype}), {len(meta['per_layer'])} encoder Linear weights pruned "
        f"({n_params / 1e6:.1f}M values); sizes in MB (1e6 bytes)\n\n"
        "| encoder sparsity | model sparsity | dense model.safetensors | masks file (bool) | "
        "compact | "
        "compact / dense | compact save / load (s) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    return head + "\n" + "\n".join(rows)


def bert_linear_stack(hidden=768, ffn=3072, layers=12):
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden) for _ in range(4)]
        mods += [torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden)]
    return torch.nn.ModuleList(mods)


def run_stack(stack, x):
    h = x
    for i in range(0, len(stack), 6):
        q, k, v, o, up, down = stack[i : i + 6]
        # the attention products are left out: only the Linear layers are timed
        a = o(q(h) + k(h) + v(h))
        h = down(torch.relu(up(a)))
    return h


def time_cuda(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def speed_table(tokens_list, repeats: int) -> str:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return "2:4 inference speed: skipped (needs a CUDA GPU with compute capability >= 8.0)"
    from hf_mfac.core.masks import nm_mask
    from hf_mfac.integrations import export_semi_structured

    torch.manual_seed(0)
    stack = bert_linear_stack().cuda().half().eval()
    with torch.no_grad():
        for lin in stack:
            lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    sparse = bert_linear_stack().cuda().half().eval()
    sparse.load_state_dict(stack.state_dict())
    report = export_semi_structured(sparse, strict=True)
    backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, 768, device="cuda", dtype=torch.half)
        with torch.inference_mode():
            err = (run_stack(sparse, x) - run_stack(stack, x)).abs().max().item()
            t_dense = time_cuda(lambda: run_stack(stack, x), repeats)
            t_sparse = time_cuda(lambda: run_stack(sparse, x), repeats)
        rows.append(
            f"| {tokens} | {t_dense:.3f} | {t_sparse:.3f} | {t_dense / t_sparse:.2f}x | {err:.2e} |"
        )
    return (
        f"2:4 inference, BERT-base Linear stack ({len(report)} layers, fp16, {backend}) on "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; "
        f"median of {repeats}\n\n"
        "| tokens | dense (ms) | 2:4 (ms) | speed-up | max abs diff "
        "|\n|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--sparsities", nargs="+", default=["0.5", "0.8", "0.9", "2:4"])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument(
        "--workdir",
        default=None,
        help="where to write the checkpoints (default: a temporary folder)",
    )
    args = p.parse_args(argv)
    if not args.skip_size:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            print(
                size_table(args.size, args.sparsities, getattr(torch, args.dtype), tmp), end="\n\n"
            )
    if not args.skip_speed:
        print(speed_table(args.tokens, args.repeats))


if __name__ == "__main__":
    main()
