"""CPU benchmark of the weight-quantization algorithms on synthetic correlated statistics.

Times GPTQ (block 128) on a 1536x576 and a 4096x4096 weight, and compares the relative output
error sqrt(tr(ΔHΔᵀ) / tr(WHWᵀ)) = ‖(W − Ŵ)Xᵀ‖ / ‖WXᵀ‖ of RTN, MSE-clipped RTN, HQQ, GPTQ and
GPTQ act-order at 4-bit and 3-bit, group 64. The Hessian is built from factors,
H = D (F Fᵀ / r + ε I) D, with F a shared low-rank block plus noise (correlated inputs) and D a
per-channel scale with a few 10x outlier channels, so the output error of a 4096-wide layer is
computed as ‖Δ D F‖²/r + ε‖Δ D‖² without ever forming X.

    python benchmarks/algos_cpu.py [--threads 1] [--quality-shapes 1536x576,4096x4096]

On a shared, busy 2-core machine use --threads 1: GPTQ's column loop launches many small ops,
and with 2 intra-op threads each op waits on a descheduled peer thread (~10 ms per op seen).

Prints a markdown table (device, date, command included).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from memfit.algos.gptq import gptq
from memfit.algos.hqq import hqq
from memfit.algos.rtn import rtn
from memfit.formats.grid import IntFormat

EPS = 0.05


def synthetic(out: int, k: int, seed: int = 0):
    """(W, H, D, F): heavy-tailed weights and a correlated Hessian with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    r = min(256, k)
    F = torch.randn(k, r, generator=g)
    F[:, :16] += 3.0 * torch.randn(k, 1, generator=g)  # a shared direction: correlated inputs
    D = torch.exp(0.5 * torch.randn(k, generator=g))
    D[torch.randperm(k, generator=g)[: max(4, k // 256)]] *= 10.0  # outlier channels
    H = D[:, None] * (F @ F.T / r + EPS * torch.eye(k)) * D[None, :]
    torch.manual_seed(seed)  # torch.distributions draws from the global generator
    W = 0.02 * torch.distributions.StudentT(4.0).sample((out, k))
    return W, H, D, F


def out_err(W, Wq, D, F) -> float:
    def quad(M):  # tr(M H Mᵀ) through the factors
        MD = M * D
        return (MD @ F).pow(2).sum() / F.shape[1] + EPS * MD.pow(2).sum()
    return (quad(W - Wq) / quad(W)).sqrt().item()


def quality_rows(shape: str):
    out, k = map(int, shape.split("x"))
    W, H, D, F = synthetic(out, k)
    rows = []
    for bits in (4, 3):
        fmt = IntFormat(bits=bits, group_size=64)
        ffmt = IntFormat(bits=bits, group_size=64, zero_point="float")
        runs = {
            "RTN min-max": (fmt, lambda: rtn(W, fmt)),
            "RTN MSE-clip (diag H weighted)": (fmt, lambda: rtn(W, fmt, clip="mse",
                                                                col_weight=H.diagonal())),
            "HQQ (float zero)": (ffmt, lambda: hqq(W, ffmt)),
            "GPTQ": (fmt, lambda: gptq(W, H, fmt)),
            "GPTQ act-order": (fmt, lambda: gptq(W, H, fmt, act_order=True)),
        }
        for name, (f, run) in runs.items():
            t = time.perf_counter()
            res = run()
            dt = time.perf_counter() - t
            bpw = f.bits_per_weight(out, k)
            rows.append(f"| {shape} | {bits}-bit g64 ({bpw:.3f} bpw) | {name} | "
                        f"{out_err(W, res.dequantize(f), D, F):.4f} | {dt:.2f} |")
    return rows


def timing_rows(shapes):
    rows = []
    fmt = IntFormat(bits=4, group_size=64)
    for shape in shapes:
        out, k = map(int, shape.split("x"))
        W, H, _, _ = synthetic(out, k)
        for act in (False, True):
            gptq(W[:8, :], H, fmt, act_order=act)  # warm-up
            t = time.perf_counter()
            gptq(W, H, fmt, block_size=128, act_order=act)
            rows.append(f"| {shape} | act_order={act} | {time.perf_counter() - t:.2f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timing-shapes", default="1536x576,4096x4096")
    ap.add_argument("--quality-shapes", default="1536x576")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"# algos_cpu ({datetime.date.today().isoformat()})\n")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- device: CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    print("- data: synthetic correlated Hessian with outlier channels, Student-t(4) weights, "
          "seed 0; error = ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖\n")
    print("## GPTQ wall time (4-bit g64, block 128, float32, CPU)\n")
    print("| weight (out x in) | mode | seconds |\n|---|---|---|")
    print("\n".join(timing_rows(args.timing_shapes.split(","))))
    print("\n## Relative output error\n")
    print("| weight | format | method | rel. output error | seconds |\n|---|---|---|---|---|")
    for shape in args.quality_shapes.split(","):
        print("\n".join(quality_rows(shape)))


if __name__ == "__main__":
    main()
