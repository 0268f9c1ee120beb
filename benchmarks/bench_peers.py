"""Side by side with the research implementations: same inputs, same process, one thread, turns
taken.

Nothing is fetched and no peer code lives in this project: each peer is imported at run time from a
local checkout (or unpacked wheel) given on the command line, and skipped when not given.

  --sparseml PATH  a folder holding the ``sparseml`` package (e.g. the unpacked sparseml 1.8 wheel):
its
                   EmpiricalBlockFisherInverse, OBSPruningParamsScorer (oBERT) and unstructured mask
creator
  --ista PATH      a folder holding ``ista_daslab_optimizers``: DenseCoreMFAC (dynamic M-FAC)
  --mfac PATH      a checkout of the official M-FAC repository (IST-DASLab/M-FAC): ``optim.py``
                   (HInvFastUpMulti, dynamic) and ``prun.py`` (HInvFastBlock, static), loaded by
path
  --cap PATH       a checkout of the official CAP repository (IST-DASLab/CAP):
                   ``src/sparseml/pytorch/sparsification/pruning/pruning_handle.py`` (CAPHandle),
loaded by path

Printed per operation: agreement (max relative difference of the results, and of each against an
fp64 reference where the operation has one), time ratio peer / hf_mfac (median of interleaved
repeats) and the peak extra memory of each side (RSS high-water mark of a fresh subprocess, above
its inputs).

Shims, all here, none in hf_mfac (each says what it replaces):
- sparseml's package ``__init__`` files import most of sparseml (and sparsezoo, onnx, ...). Only
  three files are loaded, with ``importlib`` from their paths: ``pytorch/utils/helpers.py``
  (``memory_aware_threshold``), ``pytorch/sparsification/pruning/mask_creator.py`` and
  ``.../modifier_pruning_obs.py``. Their other sparseml imports are stubs: ``sparseml.utils`` (file
  helpers, ``interpolate``; unused on these paths), ``sparsezoo.Model`` (unused), the modifier base
  classes and YAML decorators (the modifier class is not used), ``GradSampler`` and ``BaseLogger``
  (unused), and ``PruningParamsGradScorer``, replaced by a one-process base that keeps the params
  and broadcasts nothing (what the real base does without torch.distributed).
- ISTA's DenseCoreMFAC and the official HInvFastUpMulti call ``torch.lu(..., pivot=False)``,
  CUDA-only: replaced on CPU by the unpivoted LU of the same (symmetric positive definite) matrix
  from its Cholesky factor; and ``nn.parallel.parallel_apply`` (an accelerator per shard): replaced
  by calling the functions in turn. The official ``optim.py`` tries ``import hinv_cuda`` (its CUDA
  extension, not built): it then runs its own pure-PyTorch loops, which is what is measured.
- The official CAPHandle.run calls ``torch.cuda.synchronize()``, which raises without CUDA: a no-op
  then. Its file imports only torch and numpy: nothing of the CAP repository's sparseml fork is
  loaded or stubbed.
- The official ``prun.py`` needs no shim on CPU (``torch.cuda.empty_cache`` is a no-op without
  CUDA).

Usage: python benchmarks/bench_peers.py --sparseml /tmp/peers/sparseml --ista /tmp/peers/ista
[--quick]
       python benchmarks/bench_peers.py --mfac /tmp/peers/mfac --cap /tmp/peers/cap
           --sections mfac_dynamic,mfac_static,cap [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _util import machine, table  # noqa: E402
from hf_mfac.core import BlockFisherInverse, DynamicMFAC, StaticMFAC  # noqa: E402
from hf_mfac.core.cap import cap_eliminate, cap_prune  # noqa: E402
from hf_mfac.core.masks import threshold_masks  # noqa: E402
from hf_mfac.core.obs import obs_scores, obs_update  # noqa: E402


# -- loading the peers
# -------------------------------------------------------------------------------------
def _module(name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_sparseml(root: str):
    """sparseml's OBS file and mask creator, without the rest of sparseml (stubs described in the
    module doc)."""
    pkg = os.path.join(root, "sparseml")
    for name in ("sparseml", "sparseml.pytorch", "sparseml.pytorch.sparsification",
                 "sparseml.pytorch.sparsification.pruning"):
        _module(name, __path__=[])
    _module("sparseml.utils", create_dirs=None, save_numpy=None, interpolate=None)
    _module("sparsezoo", Model=None)
    helpers = _load_file("sparseml.pytorch.utils.helpers", os.path.join(pkg, "pytorch", "utils",
                                                                        "helpers.py"))
    _module(
        "sparseml.pytorch.utils",
        memory_aware_threshold=helpers.memory_aware_threshold,
        MEMORY_BOUNDED=helpers.MEMORY_BOUNDED
        if hasattr(helpers, "MEMORY_BOUNDED")
        else "MEMORY_BOUNDED",
        GradSampler=None,
    )
    _module("sparseml.pytorch.utils.logger", BaseLogger=None)
    mc = _load_file(
        "sparseml.pytorch.sparsification.pruning.mask_creator",
        os.path.join(pkg, "pytorch", "sparsification", "pruning", "mask_creator.py"),
    )

    # ModifierProp() / PyTorchModifierYAML(): identity (the modifier is not used)
    def decorator(*a, **k):
        return lambda f: property(f) if callable(f) and not isinstance(f, type) else f

    _module(
        "sparseml.pytorch.sparsification.modifier",
        ModifierProp=decorator,
        PyTorchModifierYAML=decorator,
    )
    _module(
        "sparseml.pytorch.sparsification.pruning.modifier_pruning_base",
        BaseGradualPruningModifier=object,
    )

    class OneProcessScorer:  # stands for PruningParamsGradScorer without torch.distributed
        def __init__(self, params, dist_backend=None):
            self._params, self._is_main_proc, self._pickle_exclude_params = params, True, []

        def _broadcast_list_from_main(self, xs):
            return xs

    _module(
        "sparseml.pytorch.sparsification.pruning.scorer", PruningParamsGradScorer=OneProcessScorer
    )
    obs = _load_file(
        "sparseml.pytorch.sparsification.pruning.modifier_pruning_obs",
        os.path.join(pkg, "pytorch", "sparsification", "pruning", "modifier_pruning_obs.py"),
    )
    return obs, mc


def _lu_no_pivot(A, pivot=True, get_infos=False):
    """CPU stand-in for ``torch.lu(A, pivot=False)`` (CUDA-only) on a symmetric positive definite A:
    from A = C C^T, L = C diag(C)^-1 (unit lower) and U = diag(C) C^T, packed as torch.lu packs
    them."""
    C = torch.linalg.cholesky(A)
    dg = C.diagonal(dim1=-2, dim2=-1)
    L = C / dg.unsqueeze(-2)
    U = (C * dg.unsqueeze(-2)).mT
    packed = torch.tril(L, -1) + torch.triu(U)
    piv = torch.arange(1, A.shape[-1] + 1, dtype=torch.int32).expand(A.shape[:-1])
    return (
        (packed, piv)
        if not get_infos
        else (packed, piv, torch.zeros(A.shape[:-2], dtype=torch.int32))
    )


def _cpu_shims():
    """``torch.lu(..., pivot=False)`` -> :func:`_lu_no_pivot` on CPU tensors (CUDA-only otherwise),
    and ``nn.parallel.parallel_apply`` (one accelerator per shard) -> the functions called in turn.
    Idempotent."""
    if getattr(torch.lu, "_bench_shim", False):
        return
    orig_lu = torch.lu

    def lu(A, pivot=True, get_infos=False):
        return (
            _lu_no_pivot(A)
            if not pivot and A.device.type == "cpu"
            else orig_lu(A, pivot=pivot, get_infos=get_infos)
        )

    lu._bench_shim = True
    torch.lu = lu
    torch.nn.parallel.parallel_apply = lambda fns, args, *a, **k: [f(x) for f, x in zip(fns, args)]


def load_ista(root: str):
    mod = _load_file(
        "ista_dense_core_mfac",
        os.path.join(root, "ista_daslab_optimizers", "dense_mfac", "dense_core_mfac.py"),
    )
    _cpu_shims()
    return mod.DenseCoreMFAC


def load_mfac(root: str):
    """The official M-FAC repository's ``optim.py`` (HInvFastUpMulti) and ``prun.py``
    (HInvFastBlock), loaded by path. ``optim.py`` tries ``import hinv_cuda`` (the repository's CUDA
    extension, not built here) and falls back to its pure-PyTorch loops; it calls
    ``torch.lu(pivot=False)`` and ``parallel_apply``: the CPU shims of :func:`_cpu_shims`.
    ``prun.py`` needs none on CPU (``torch.cuda.empty_cache`` is a no-op without CUDA)."""
    optim = _load_file("mfac_optim", os.path.join(root, "optim.py"))
    prun = _load_file("mfac_prun", os.path.join(root, "prun.py"))
    _cpu_shims()
    return optim, prun


def load_cap(root: str):
    """The official CAP repository's ``pruning_handle.py`` (CAPHandle), loaded by path: it imports
    only torch and numpy, so none of the repository's sparseml fork is loaded. CAPHandle.run ends
    each batch of blocks with ``torch.cuda.synchronize()``, which raises without CUDA: replaced by a
    no-op when CUDA is absent."""
    mod = _load_file(
        "cap_pruning_handle",
        os.path.join(
            root, "src", "sparseml", "pytorch", "sparsification", "pruning", "pruning_handle.py"
        ),
    )
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
    return mod.CAPHandle


# -- measuring
# ---------------------------------------------------------------------------------------------
def turns(fns: dict, repeats: int = 3) -> dict:
    """Median seconds of each function, run in turns (a, b, a, b, ...) after one warm-up each. A
    value may be a pair ``(prepare, f)``: ``prepare()`` runs untimed before each call and ``f`` gets
    its result (fresh copies for code that works in place on its inputs)."""
    fns = {
        k: v if isinstance(v, tuple) else (lambda: None, lambda _, f=v: f()) for k, v in fns.items()
    }
    for prep, f in fns.values():
        f(prep())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (prep, f) in fns.items():
            x = prep()
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
            del x
    return {k: statistics.median(v) for k, v in times.items()}


def rel(a, b) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def peak_extra(case: str, args: dict, paths: dict, runs: int = 1) -> float:
    """MB of RSS high-water mark above the inputs, in a fresh one-thread subprocess (median of
    ``runs`` of them: where many large temporaries are freed and reallocated, the allocator's reuse
    makes the peak vary by +-20 % from process to process)."""
    spec = json.dumps({"case": case, "args": args, "paths": paths})
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem", spec]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [
        subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        for _ in range(runs)
    ]
    return statistics.median(float(o.strip().splitlines()[-1]) for o in outs)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the RSS high-water mark (Linux: ``5 > /proc/self/clear_refs``) and return the current
    RSS, so that earlier transients (imports, input creation) do not hide the operation's own
    peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _maxrss() -> int:
    return _status("VmHWM")


def _inputs(m, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    G = torch.empty(m, d).normal_(generator=g).mul_(scale / d**0.5 * 30)
    w = torch.empty(d).normal_(generator=g)
    return G, w


def _fisher_ours(G, B, damp, chunk=32):
    bf = BlockFisherInverse(G.shape[1], B, damp)
    for c in G.split(chunk):
        bf.add_grads(c)
    bf.blocks()
    return bf


def _fisher_peer(obs, G, B, damp):
    f = obs.EmpiricalBlockFisherInverse(G.shape[0], B, G.shape[1], damp, torch.device("cpu"))
    for g in G:
        f.add_grad(g)
    return f


def _obert_ours(bf, w, sparsity):
    s = obs_scores(w, bf.diag())
    pruned = threshold_masks([s], sparsity, prune_mask_only=True)[0]
    return obs_update(bf, w, pruned.nonzero()), ~pruned


def _obert_peer(obs, mc, finv, w, sparsity):
    p = torch.nn.Parameter(w.clone(), requires_grad=False)
    sc = obs.OBSPruningParamsScorer([p], 1, 1.0, finv.B, "unstructured")
    sc._finvs, sc._masks = [finv], [torch.ones_like(w)]
    scores = sc.score_parameters()
    mask = mc.UnstructuredPruningMaskCreator().create_sparsity_masks(
        scores, sparsity, global_sparsity=True
    )[0]
    sc.mask_update([mask], [mask - 1])  # -1 where newly pruned
    return p.data, mask.bool()


def _woodbury64(G, x, damp):
    """fp64 ``F^{-1} x`` for ``F = damp I + G^T G / m``: ``(x - G^T (m damp I + G G^T)^{-1} G x) /
    damp``."""
    G, x = G.double(), x.double()
    K = G @ G.T
    K.diagonal().add_(G.shape[0] * damp)
    return (x - G.T @ torch.linalg.solve(K, G @ x)) / damp


def _static_diag64(G, B, damp, chunk=1 << 15):
    """fp64 diag(F^{-1}) of the block-diagonal F (blocks of B consecutive coordinates), per block
    from ``(1 - colsum(G_b * K_b^{-1} G_b)) / damp`` with ``K_b = m damp I + G_b G_b^T`` (LU solve,
    column chunks)."""
    m, d = G.shape
    out = torch.empty(d, dtype=torch.float64)
    for s in range(0, d, B):
        e = min(d, s + B)
        K = m * damp * torch.eye(m, dtype=torch.float64)
        for c in range(s, e, chunk):
            Gc = G[:, c : min(e, c + chunk)].double()
            K += Gc @ Gc.T
        lu = torch.linalg.lu_factor(K)
        for c in range(s, e, chunk):
            Gc = G[:, c : min(e, c + chunk)].double()
            out[c : c + Gc.shape[1]] = (1 - (Gc * torch.linalg.lu_solve(*lu, Gc)).sum(0)) / damp
    return out


def _cap_inputs(d, m, B, damp):
    """Weights (d/B, B) and fp32 inverse-Fisher blocks (d/B, B, B) from m gradients (hf_mfac's
    build, copied out of its buffer so that the tensor holds exactly the blocks)."""
    G, w = _inputs(m, d)
    H = _fisher_ours(G, B, damp).blocks().clone()
    return w.view(-1, B), H


def _cap_peer_eliminate(Handle, W, H):
    """CAPHandle on one layer: W (nb, B) and H (nb, B, B) are worked on in place (callers pass
    copies)."""
    h = Handle(W)
    h.set_Finv(H)
    h.run()
    return h


def _cap_peer_prune(Handle, W, H, sparsity):
    """CAPHandle.run + get_pruning_database: the pruned weights (nb, B) and the losses by position
    (nb, B)."""
    h = _cap_peer_eliminate(Handle, W, H)
    losses = h.losses  # get_pruning_database frees it
    return h.get_pruning_database([sparsity])[0], losses


def _mem_case(spec):
    torch.set_num_threads(1)
    case, a, paths = spec["case"], spec["args"], spec["paths"]
    if case.startswith("fisher"):
        G, _ = _inputs(a["m"], a["d"])
        small, _ = _inputs(4, 256)
        if case == "fisher_peer":
            obs, _ = load_sparseml(paths["sparseml"])
            _fisher_peer(obs, small, 16, a["damp"])
            base = _reset_peak()
            _fisher_peer(obs, G, a["B"], a["damp"])
        else:
            _fisher_ours(small, 16, a["damp"])
            base = _reset_peak()
            _fisher_ours(G, a["B"], a["damp"])
    elif case.startswith("obert"):
        G, w = _inputs(a["m"], a["d"])
        small, ws = _inputs(4, 256)
        if case == "obert_peer":
            obs, mc = load_sparseml(paths["sparseml"])
            f = _fisher_peer(obs, G, a["B"], a["damp"])
            _obert_peer(obs, mc, _fisher_peer(obs, small, 16, a["damp"]), ws, 0.5)
            base = _reset_peak()
            _obert_peer(obs, mc, f, w, a["sparsity"])
        else:
            bf = _fisher_ours(G, a["B"], a["damp"])
            _obert_ours(_fisher_ours(small, 16, a["damp"]), ws, 0.5)
            base = _reset_peak()
            _obert_ours(bf, w, a["sparsity"])
    elif case == "static":
        G, _ = _inputs(a["m"], a["d"])
        StaticMFAC(_inputs(4, 256)[0], 1e-4, 16).diag()
        base = _reset_peak()
        StaticMFAC(G, 1e-4, a["B"]).diag()  # G handed over: W = L^{-1} G is written in its memory
        print((_maxrss() - base) / G.nbytes)
        return
    elif case == "static_peer":
        G, _ = _inputs(a["m"], a["d"])
        _, prun = load_mfac(paths["mfac"])
        prun.HInvFastBlock(_inputs(4, 256)[0], 16, 10000, "cpu", damp=1e-4).diag()
        base = _reset_peak()
        prun.HInvFastBlock(G, a["B"], 10000, "cpu", damp=a["damp"]).diag()
        print((_maxrss() - base) / G.nbytes)
        return
    elif case.startswith("cap"):
        W, H = _cap_inputs(a["d"], a["m"], a["B"], a["damp"])
        ws, hs = _cap_inputs(1024, 32, a["B"], a["damp"])
        k = int(a["k"])
        if case.endswith("_peer"):
            Handle = load_cap(paths["cap"])
            _cap_peer_prune(Handle, ws, hs, 0.5)
            base = _reset_peak()
            if case == "cap_elim_peer":
                _cap_peer_eliminate(Handle, W, H)  # in place: no copies of the inputs
            else:
                _cap_peer_prune(Handle, W, H, a["sparsity"])
        else:
            cap_prune(ws, hs, 512)
            base = _reset_peak()
            if case == "cap_elim_ours":
                cap_eliminate(W, H)
            else:
                cap_prune(W, H, k)
    elif case in ("mfac_peer", "hinv_peer", "mfac_ours"):
        G, _ = _inputs(a["m"], a["d"])
        g = G[0].clone()
        if case == "mfac_peer":
            Core = load_ista(paths["ista"])
            peer = Core(G, "cpu", ["cpu"], damp=a["damp"])
            peer.integrate_gradient_and_precondition(g, g)
            base = _reset_peak()
            peer.integrate_gradient_and_precondition(g * 1.01, g * 1.01)
        elif case == "hinv_peer":
            optim, _ = load_mfac(paths["mfac"])
            peer = optim.HInvFastUpMulti(G, "cpu", ["cpu"], damp=a["damp"])
            peer.update_mul(g)
            gg = g * 1.01
            base = _reset_peak()
            peer.update_mul(gg)
        else:
            ours = DynamicMFAC(a["d"], a["m"], a["damp"])
            for r in G:
                ours.update(r)
            ours.update_mul(g)
            gg = g * 1.01
            base = _reset_peak()
            ours.update_mul(gg)
    print((_maxrss() - base) / 2**20)


# -- the comparisons
# ---------------------------------------------------------------------------------------
def bench_fisher(obs, shapes, damp, paths):
    rows = []
    for d, m, B in shapes:
        G, _ = _inputs(m, d)
        nb = -(-d // B)
        Gp = torch.nn.functional.pad(G.double(), (0, nb * B - d)).view(m, nb, B).transpose(0, 1)
        ref = torch.linalg.inv(Gp.mT @ Gp / m + damp * torch.eye(B, dtype=torch.float64)).diagonal(
            dim1=-2, dim2=-1
        )
        ref = ref.reshape(-1)[:d]
        t = turns(
            {
                "peer": lambda: _fisher_peer(obs, G, B, damp),
                "ours": lambda: _fisher_ours(G, B, damp),
            }
        )
        ours, peer = _fisher_ours(G, B, damp).diag(), _fisher_peer(obs, G, B, damp).diag()
        e_o = float(((ours.double() - ref).abs() / ref).max())
        e_p = float(((peer.double() - ref).abs() / ref).max())
        args = {"m": m, "d": d, "B": B, "damp": damp}
        mo, mp = peak_extra("fisher_ours", args, paths), peak_extra("fisher_peer", args, paths)
        inv_mb = nb * B * B * 4 / 2**20
        rows.append(
            (
                d,
                m,
                B,
                f"{damp:g}",
                f"{rel(ours, peer):.1e}",
                f"{e_o:.1e}",
                f"{e_p:.1e}",
                f"{t['peer'] / t['ours']:.2f}",
                f"{mo:.0f} ({mo / inv_mb:.2f}x)",
                f"{mp:.0f} ({mp / inv_mb:.2f}x)",
            )
        )
    return table(
        [
            "d",
            "m",
            "B",
            "damp",
            "ours vs peer (diag)",
            "ours vs fp64",
            "peer vs fp64",
            "peer time / ours",
            "ours peak extra MB (x inverse)",
            "peer peak extra MB (x inverse)",
        ],
        rows,
    )


def bench_obert(obs, mc, shapes, damp, paths, sparsity=0.5):
    rows = []
    for d, m, B in shapes:
        G, w = _inputs(m, d)
        bf, finv = _fisher_ours(G, B, damp), _fisher_peer(obs, G, B, damp)
        t = turns(
            {
                "peer": lambda: _obert_peer(obs, mc, finv, w, sparsity),
                "ours": lambda: _obert_ours(bf, w, sparsity),
            }
        )
        (wo, ko), (wp, kp) = _obert_ours(bf, w, sparsity), _obert_peer(obs, mc, finv, w, sparsity)
        same = float((ko == kp).double().mean())
        args = {"m": m, "d": d, "B": B, "damp": damp, "sparsity": sparsity}
        # median of 3 processes each: at a few MB the peak varies by +-25 % between processes (the
        # peer's 6.8-10.0 MB in five runs of one case, ours 8.0-8.2)
        mo, mp = (
            peak_extra("obert_ours", args, paths, runs=3),
            peak_extra("obert_peer", args, paths, runs=3),
        )
        rows.append(
            (
                d,
                m,
                B,
                f"{same:.6f}",
                f"{rel(wo, wp):.1e}",
                f"{t['peer'] / t['ours']:.2f}",
                f"{mo:.0f}",
                f"{mp:.0f}",
                f"{mo / max(mp, 1e-9):.2f}",
            )
        )
    return table(
        [
            "d",
            "m",
            "B",
            "same mask",
            "weights ours vs peer",
            "peer time / ours",
            "ours peak extra MB",
            "peer peak extra MB",
            "ours / peer memory",
        ],
        rows,
    )


def bench_dynamic(make_peer, peer_step, mem_case, shapes, damp, paths):
    """DynamicMFAC.update_mul vs a peer's (``make_peer(G)`` builds it on the window G,
    ``peer_step(peer, g)`` is its update + product), both on the same window and vector; the fp64
    reference is the Woodbury solve on the window after the update (checked against a dense fp64
    solve of F where d <= 4096)."""
    rows = []
    for d, m in shapes:
        G, _ = _inputs(m, d, scale=1.0)
        g = torch.empty(d).normal_(generator=torch.Generator().manual_seed(1)).div_(d**0.5)
        peer = make_peer(G.clone())
        ours = DynamicMFAC(d, m, damp)
        for r in G:
            ours.update(r)
        yo, yp = ours.update_mul(g), peer_step(peer, g)
        Gn = G.clone()
        Gn[0] = g
        ref = _woodbury64(Gn, g, damp)
        if d <= 4096:
            F = damp * torch.eye(d, dtype=torch.float64) + Gn.double().T @ Gn.double() / m
            assert rel(ref, torch.linalg.solve(F, g.double())) < 1e-9
        k = [1.0]

        def step_ours():
            k[0] *= 1.0001
            ours.update_mul(g * k[0])

        def step_peer():
            k[0] *= 1.0001
            peer_step(peer, g * k[0])

        t = turns({"peer": step_peer, "ours": step_ours}, repeats=5)
        args = {"m": m, "d": d, "damp": damp}
        mo, mp = peak_extra("mfac_ours", args, paths), peak_extra(mem_case, args, paths)
        vec = d * 4 / 2**20
        rows.append(
            (
                d,
                m,
                f"{rel(yo, yp):.1e}",
                f"{rel(yo, ref):.1e} / {rel(yp, ref):.1e}",
                f"{t['peer'] / t['ours']:.2f}",
                f"{t['ours'] * 1e3:.1f}",
                f"{mo / vec:.1f}",
                f"{mp / vec:.1f}",
            )
        )
    return table(
        [
            "d",
            "m",
            "ours vs peer",
            "ours / peer vs fp64 solve",
            "peer time / ours",
            "ours ms",
            "ours peak extra (d-vectors)",
            "peer peak extra (d-vectors)",
        ],
        rows,
    )


def bench_static_peer(prun, shapes, damp, paths, perbatch=10000):
    """StaticMFAC build + diag vs the official HInvFastBlock build + diag (``perbatch`` blocks at a
    time: 10000, the default of the official main_prun.py, i.e. all blocks at once here). Both may
    overwrite G: ours always (W = L^-1 G in its memory), HInvFastBlock at B = d (one block: its
    transposes are views of G, so ``.contiguous()`` copies nothing and HInvFastBatch works in G) but
    not at B < d (it copies each batch of blocks). Each side therefore gets a fresh copy of G, made
    untimed."""
    rows = []
    for d, m, B in shapes:
        G, _ = _inputs(m, d)
        Bq = B or d
        t = turns(
            {
                "peer": (
                    G.clone,
                    lambda Gc: prun.HInvFastBlock(Gc, Bq, perbatch, "cpu", damp=damp).diag(),
                ),
                "ours": (G.clone, lambda Gc: StaticMFAC(Gc, damp, Bq).diag()),
            }
        )
        dp = prun.HInvFastBlock(G.clone(), Bq, perbatch, "cpu", damp=damp).diag()
        do = StaticMFAC(G.clone(), damp, Bq).diag()
        ref = _static_diag64(G, Bq, damp)
        e_o = float(((do.double() - ref).abs() / ref).max())
        e_p = float(((dp.double() - ref).abs() / ref).max())
        args = {"m": m, "d": d, "B": Bq, "damp": damp}
        mo, mp = peak_extra("static", args, paths), peak_extra("static_peer", args, paths)
        rows.append(
            (
                d,
                m,
                B or "d (one block)",
                f"{rel(do, dp):.1e}",
                f"{e_o:.1e}",
                f"{e_p:.1e}",
                f"{t['peer'] / t['ours']:.2f}",
                f"{t['ours'] * 1e3:.0f}",
                f"{t['peer'] * 1e3:.0f}",
                f"{mo:.2f}",
                f"{mp:.2f}",
            )
        )
    return table(
        [
            "d",
            "m",
            "B",
            "diag ours vs peer",
            "ours vs fp64",
            "peer vs fp64",
            "peer time / ours",
            "ours ms",
            "peer ms",
            "ours peak extra (x G)",
            "peer peak extra (x G)",
        ],
        rows,
    )


def bench_cap(Handle, shapes, damp, paths, sparsity=0.5):
    """cap_eliminate / cap_prune vs the official CAPHandle (run; run + get_pruning_database) on one
    layer, same fp32 inverse-Fisher blocks and weights. CAPHandle works in place on both: fresh
    copies are made untimed. Its elimination order is the stable argsort of its per-position
    cumulative losses. Times: median of 5 interleaved repeats; memory: median of 3 subprocesses."""
    rows = []
    for d, m, B in shapes:
        W, H = _cap_inputs(d, m, B, damp)
        h = _cap_peer_eliminate(Handle, W.clone(), H.clone())
        lp = h.losses
        po = torch.sort(lp, dim=1, stable=True)[1]
        order, losses = cap_eliminate(W, H)
        lo = torch.empty_like(losses).scatter_(1, order, losses)  # ours by position
        same_order = float((po == order).all(1).double().mean())
        same_steps = float((po == order).double().mean())
        Wp, _ = _cap_peer_prune(Handle, W.clone(), H.clone(), sparsity)
        # the peer prunes ceil(s d) + 1: its threshold is sorted_losses[ceil(s d)], <=
        kp = int((Wp == 0).sum())
        Wo, pruned, _ = cap_prune(W, H, kp)
        same_mask = float((pruned == (Wp == 0)).double().mean())
        k = int(-(-d * sparsity // 1))
        t = turns(
            {
                "peer": (lambda: (W.clone(), H.clone()), lambda x: _cap_peer_eliminate(Handle, *x)),
                "ours": lambda: cap_eliminate(W, H),
            },
            repeats=5,
        )
        tp = turns(
            {
                "peer": (
                    lambda: (W.clone(), H.clone()),
                    lambda x: _cap_peer_prune(Handle, *x, sparsity),
                ),
                "ours": lambda: cap_prune(W, H, kp),
            },
            repeats=5,
        )
        args = {"m": m, "d": d, "B": B, "damp": damp, "sparsity": sparsity, "k": kp}
        mem = {
            c: peak_extra(c, args, paths, runs=3)
            for c in ("cap_elim_ours", "cap_elim_peer", "cap_prune_ours", "cap_prune_peer")
        }
        inv_mb = H.nbytes / 2**20
        rows.append(
            (
                d,
                m,
                B,
                f"{same_order:.4f} ({same_steps:.4f})",
                f"{rel(lo, lp):.1e}",
                f"{kp - k:+d}",
                f"{same_mask:.6f}",
                f"{rel(Wo, Wp):.1e}",
                f"{t['peer'] / t['ours']:.2f}",
                f"{tp['peer'] / tp['ours']:.2f}",
                f"{t['ours'] * 1e3:.0f} / {tp['ours'] * 1e3:.0f}",
                *(f"{mem[c]:.0f} ({mem[c] / inv_mb:.2f}x)" for c in mem),
            )
        )
    return table(
        [
            "d",
            "m",
            "B",
            "same order: blocks (steps)",
            "losses ours vs peer",
            "peer k - ceil(sd)",
            "same mask (50 %)",
            "weights ours vs peer",
            "peer time / ours: eliminate",
            "peer time / ours: + select + apply",
            "ours ms (eliminate / prune)",
            "ours eliminate peak MB (x inverse)",
            "peer eliminate peak MB (x inverse)",
            "ours prune peak MB (x inverse)",
            "peer prune peak MB (x inverse)",
        ],
        rows,
    )


def bench_static(shapes, paths):
    """hf_mfac only (the official HInvFastBlock needs --mfac): build + diag time and peak extra
    memory."""
    rows = []
    for d, m, B in shapes:
        G, _ = _inputs(m, d)
        t = turns({"ours": lambda: StaticMFAC(G.clone(), 1e-4, B).diag()}, repeats=3)
        mem = peak_extra("static", {"m": m, "d": d, "B": B}, paths)
        rows.append((d, m, B or "d (full)", f"{t['ours'] * 1e3:.0f}", f"{mem:.2f}"))
    return table(
        ["d", "m", "B", "build + diag ms (incl. one clone of G)", "peak extra memory (x G)"], rows
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sparseml")
    ap.add_argument("--ista")
    ap.add_argument("--mfac")
    ap.add_argument("--cap")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--damp", type=float, default=1e-5)
    ap.add_argument(
        "--sections",
        default="fisher,obert,dynamic,static,mfac_dynamic,mfac_static,cap",
        help="comma list of: fisher, obert (both need --sparseml), dynamic (--ista), "
        "static, "
        "mfac_dynamic, mfac_static (both --mfac), cap (--cap)",
    )
    ap.add_argument("--_mem", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._mem:
        return _mem_case(json.loads(a._mem))
    torch.set_num_threads(1)
    paths = {"sparseml": a.sparseml, "ista": a.ista, "mfac": a.mfac, "cap": a.cap}
    print(f"# peers side by side — {machine()} — {time.strftime('%Y-%m-%d')}\n")
    print("$ " + " ".join(["python", "benchmarks/bench_peers.py", *sys.argv[1:]]) + "\n")
    for name, path in (("official M-FAC (--mfac)", a.mfac), ("official CAP (--cap)", a.cap)):
        print(f"- {name}: " + ("not given, skipped" if path is None else path))
    sections = set(a.sections.split(","))
    if a.sparseml and sections & {"fisher", "obert"}:
        obs, mc = load_sparseml(a.sparseml)
        d0 = 1 << 16
        fshapes = (
            [(d0, 32, 32), (d0, 256, 32)]
            if a.quick
            else [
                (d0, 256, 32),
                (1 << 15, 256, 32),
                (1 << 17, 256, 32),  # d
                (d0, 32, 32),
                (d0, 512, 32),  # m
                (d0, 256, 16),
                (d0, 256, 64),
            ]
        )  # B
        if "fisher" in sections:
            print(
                "\n## Block-Fisher inverse from m gradients: BlockFisherInverse vs sparseml "
                "EmpiricalBlockFisherInverse\n"
            )
            for damp in (a.damp,) if a.quick else (1e-4, a.damp, 1e-8):
                print(
                    bench_fisher(obs, fshapes if damp == a.damp else fshapes[:2], damp, paths)
                    + "\n"
                )
    if a.sparseml and "obert" in sections:
        print(
            "\n## oBERT selection + summed OBS update: hf_mfac vs sparseml "
            "OBSPruningParamsScorer + mask creator "
            "(50 %)\n"
        )
        oshapes = (
            [(d0, 32, 32), (d0, 32, 64)]
            if a.quick
            else [
                (1 << 16, 32, 32),
                (1 << 18, 32, 32),
                (1 << 20, 32, 32),  # d
                (1 << 18, 32, 16),
                (1 << 18, 32, 64),
            ]
        )  # B
        print(bench_obert(obs, mc, oshapes, a.damp, paths))
    if not a.sparseml:
        print("- sparseml (--sparseml): not given, skipped")
    if a.ista and "dynamic" in sections:
        Core = load_ista(a.ista)
        print("\n## Dynamic M-FAC update_mul: DynamicMFAC vs ISTA-DASLab DenseCoreMFAC (fp32)\n")
        dshapes = (
            [(4096, 32), (1 << 18, 32)]
            if a.quick
            else [(4096, 32), (1 << 18, 32), (1 << 20, 32), (1 << 20, 64), (1 << 20, 128)]
        )
        print(
            bench_dynamic(
                lambda G: Core(G, "cpu", ["cpu"], damp=1e-4),
                lambda p, g: p.integrate_gradient_and_precondition(g, g),
                "mfac_peer",
                dshapes,
                1e-4,
                paths,
            )
        )
    if not a.ista:
        print("- ISTA-DASLab-Optimizers (--ista): not given, skipped")
    if a.mfac and sections & {"mfac_dynamic", "mfac_static"}:
        optim, prun = load_mfac(a.mfac)
        if "mfac_dynamic" in sections:
            print(
                "\n## Dynamic M-FAC update_mul: DynamicMFAC vs the official HInvFastUpMulti "
                "(optim.py, fp32, "
                "its PyTorch path)\n"
            )
            dshapes = (
                [(4096, 32), (1 << 18, 32)]
                if a.quick
                else [(4096, 32), (1 << 18, 32), (1 << 20, 32), (1 << 20, 64), (1 << 20, 128)]
            )
            print(
                bench_dynamic(
                    lambda G: optim.HInvFastUpMulti(G, "cpu", ["cpu"], damp=1e-4),
                    lambda p, g: p.update_mul(g),
                    "hinv_peer",
                    dshapes,
                    1e-4,
                    paths,
                )
            )
        if "mfac_static" in sections:
            print(
                "\n## Static M-FAC build + diag: StaticMFAC vs the official HInvFastBlock "
                "(prun.py, fp32)\n"
            )
            sshapes = (
                [(1 << 16, 64, 2048), (1 << 16, 64, 0)]
                if a.quick
                else [
                    (1 << 19, 64, 2048),
                    (1 << 20, 64, 2048),
                    (1 << 21, 64, 2048),  # d
                    (1 << 19, 64, 0),
                    (1 << 20, 64, 0),
                    (1 << 21, 64, 0),  # d at B = d
                    (1 << 20, 32, 2048),
                    (1 << 20, 128, 2048),  # m
                    (1 << 20, 64, 512),
                    (1 << 20, 64, 8192),
                ]
            )  # B
            print(bench_static_peer(prun, sshapes, 1e-4, paths))
    if a.cap and "cap" in sections:
        Handle = load_cap(a.cap)
        print(
            "\n## CAP elimination of one layer: cap_eliminate / cap_prune vs the official "
            "CAPHandle (fp32), "
            "50 %\n"
        )
        cshapes = (
            [(1 << 14, 64, 16), (1 << 14, 64, 32), (1 << 14, 128, 64)]
            if a.quick
            else [
                (1 << 18, 128, 16),
                (1 << 18, 128, 32),
                (1 << 18, 128, 64),
                (1 << 19, 128, 32),
                (1 << 20, 128, 32),
            ]
        )
        print(bench_cap(Handle, cshapes, a.damp, paths))
    if "static" in sections:
        print(
            "\n## Static M-FAC build + diag (hf_mfac only; vs the official HInvFastBlock: "
            "section mfac_static)\n"
        )
        sshapes = (
            [(1 << 18, 64, 2048)]
            if a.quick
            else [
                (1 << 19, 64, 2048),
                (1 << 20, 64, 2048),
                (1 << 21, 64, 2048),
                (1 << 20, 32, 2048),
                (1 << 20, 128, 2048),
                (1 << 20, 64, 0),
            ]
        )
        print(bench_static([(d, m, B or None) for d, m, B in sshapes], paths))


if __name__ == "__main__":
    main()
