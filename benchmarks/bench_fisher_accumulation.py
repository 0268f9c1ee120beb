#!/usr/bin/env python
"""Accuracy of three ways to build the fp32 block-Fisher inverse, against an fp64 reference.

* ``hf_mfac``: :class:`hf_mfac.core.BlockFisherInverse` itself (fp64 sum of ``G_b^T G_b``, fp64
  Cholesky, one rounding to fp32 at the end);
* ``fp32 chunks``: fp32 batched GEMMs over chunks of 32 gradients, summed in fp64 (the faster build
  that was considered: it would run at fp32 GEMM speed);
* ``fp32 Woodbury``: m fp32 rank-1 Sherman-Morrison updates of ``I / damp`` (what sparseml's
  EmpiricalBlockFisherInverse does, written here from the formula [WoodFisher, eq. 12]).

Printed: the largest relative error of ``diag(F^{-1})`` over all blocks. Gradients x 30 / sqrt(d):
``random`` N(0, 1), or ``correlated``: per block, N(0, 1) coordinates scaled by a spectrum decaying
from 1 to 1e-2 in a random orthonormal basis, so that each block's covariance spans four decades, as
real gradients' do.

    python benchmarks/bench_fisher_accumulation.py --ms 32,64,256,1024 --damps 1e-4,1e-5,1e-8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import machine, table  # noqa: E402

from hf_mfac.core import BlockFisherInverse  # noqa: E402


def _inv_diag(F: torch.Tensor, damp: float) -> torch.Tensor:
    F = F.clone()
    F.diagonal(dim1=-2, dim2=-1).add_(damp)
    return torch.cholesky_inverse(torch.linalg.cholesky(F)).diagonal(dim1=-2, dim2=-1)


def _woodbury_fp32(Gb: torch.Tensor, damp: float) -> torch.Tensor:
    nb, m, B = Gb.shape
    Finv = torch.eye(B).repeat(nb, 1, 1) / damp
    for i in range(m):
        g = Gb[:, i, :, None]
        Fg = Finv @ g
        Finv = Finv - Fg @ Fg.mT / (m + g.mT @ Fg)
    return Finv.diagonal(dim1=-2, dim2=-1)


def _grads(kind: str, m: int, nb: int, B: int) -> torch.Tensor:
    if kind == "random":
        return torch.randn(m, nb * B) * 30 / (nb * B) ** 0.5
    basis = torch.linalg.qr(torch.randn(nb, B, B, dtype=torch.float64))[0]
    Z = torch.randn(nb, m, B, dtype=torch.float64) * torch.logspace(0, -2, B, dtype=torch.float64)
    return (Z @ basis.mT).transpose(0, 1).reshape(m, nb * B).float() * 30 / (nb * B) ** 0.5


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--block_size", type=int, default=32)
    ap.add_argument("--num_blocks", type=int, default=64)
    ap.add_argument("--ms", default="32,64,256")
    ap.add_argument("--damps", default="1e-4,1e-5,1e-8")
    ap.add_argument("--gradients", default="random,correlated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    B, nb = args.block_size, args.num_blocks
    d = B * nb
    rows = []
    for kind in args.gradients.split(","):
        for m in (int(x) for x in args.ms.split(",")):
            G = _grads(kind, m, nb, B)
            Gb = G.view(m, nb, B).transpose(0, 1)
            exact = Gb.double().mT @ Gb.double() / m
            chunks = (
                sum((Gb[:, s : s + 32].mT @ Gb[:, s : s + 32]).double() for s in range(0, m, 32))
                / m
            )
            for damp in (float(x) for x in args.damps.split(",")):
                ref = _inv_diag(exact, damp)

                def err(x):
                    x, r = x.double().reshape(-1), ref.reshape(-1)
                    return f"{float(((x - r).abs() / r.abs()).max()):.1e}"

                bf = BlockFisherInverse(d, B, damp)
                for c in G.split(32):
                    bf.add_grads(c)
                rows.append(
                    [
                        kind,
                        m,
                        B,
                        f"{damp:g}",
                        err(bf.diag()),
                        err(_inv_diag(chunks, damp).float()),
                        err(_woodbury_fp32(Gb, damp)),
                    ]
                )
    print(machine())
    print(
        table(
            [
                "gradients",
                "m",
                "B",
                "damp",
                "hf_mfac (fp64 sum)",
                "fp32 chunks + fp64 sum",
                "fp32 Woodbury",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
