"""Time QuantLinear on this CPU against nn.Linear (float32 and bfloat16), side by side.

For each weight shape (out x in), activation rows M and format, it times:
  - nn.Linear with float32 and with bfloat16 weights/activations (the dense baselines);
  - QuantLinear.forward with float32 and with bfloat16 activations (the fast CPU path; the
    column says which path ran: `tiled` = dequantize tiles + float32 GEMM, `bf16 tiles` = the
    same rounded to bfloat16 + bfloat16 GEMM (AMX CPUs), `kernel` = torch's bfloat16
    weight-only kernel);
  - the reference (dequantize the whole weight, F.linear), float32.
Each number is the median of repeated calls (at least 2, at most 7, about 0.4 s per cell).
Prints a markdown table with the machine, date, torch version, load average and command.

    python benchmarks/qlinear_cpu.py [--quick] [--threads N] [--shapes 50257x768 ...] [--m 1 16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.kernels import cpu
from memfit.kernels.reference import linear_reference

SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
MS = [1, 16, 512]
FORMATS = {
    "w8 per-channel sym": IntFormat(bits=8, group_size=None, symmetric=True),
    "w4g64": IntFormat(bits=4, group_size=64),
    "w4g32": IntFormat(bits=4, group_size=32),
    "w3g64": IntFormat(bits=3, group_size=64),
}


def timed(fn, budget_s: float = 0.4) -> float:
    """Median milliseconds per call."""
    fn()  # warm-up (and cache preparation)
    times = []
    start = time.perf_counter()
    while len(times) < 2 or (len(times) < 7 and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def quant_layer(lin: torch.nn.Linear, fmt: IntFormat) -> QuantLinear:
    w = lin.weight.detach()
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    codes = grid.quantize(w, scale, zero, fmt)
    return QuantLinear.from_linear(lin, codes, scale, None if fmt.symmetric else zero, fmt)


def path_name(layer: QuantLinear, x: torch.Tensor) -> str:
    """The path memfit.kernels.cpu.cpu_linear takes (its policy, restated)."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    bf16 = x.dtype == torch.bfloat16
    if bf16 and getattr(cpu, "FAST_BF16", False) and rows > cpu.FAST_KERNEL_MAX_M:
        return "bf16 tiles"
    if layer._cpu_cache is not None and ((bf16 and rows <= cpu.KERNEL_MAX_M)
                                         or (not bf16 and rows <= cpu.DECODE_MAX_M)):
        return "kernel"
    return "tiled"


def run(shapes, ms, formats) -> list[str]:
    lines = ["| out x in | M | format | bpw | Linear fp32 | Linear bf16 | QL fp32 in | "
             "QL bf16 in | reference fp32 | QL best vs Linear fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    with torch.inference_mode():
        for out, k in shapes:
            lin = torch.nn.Linear(k, out, bias=False)
            lin_bf = torch.nn.Linear(k, out, bias=False).to(torch.bfloat16)
            layers = {name: quant_layer(lin, fmt) for name, fmt in formats.items()}
            for m in ms:
                x = torch.randn(m, k)
                xb = x.bfloat16()
                dense32 = timed(lambda: lin(x))
                dense_bf = timed(lambda: lin_bf(xb))
                for name, layer in layers.items():
                    q32 = timed(lambda: layer(x))
                    qbf = timed(lambda: layer(xb))
                    ref = timed(lambda: linear_reference(x, layer.kernel_weight()))
                    best = min(q32, qbf)
                    lines.append(
                        f"| {out}x{k} | {m} | {name} | {layer.bits_per_weight():.2f} | "
                        f"{dense32:.3f} | {dense_bf:.3f} | {q32:.3f} ({path_name(layer, x)}) | "
                        f"{qbf:.3f} ({path_name(layer, xb)}) | {ref:.3f} | "
                        f"{dense32 / best:.2f}x |")
                    print(lines[-1], file=sys.stderr, flush=True)
    return lines


def header(args) -> list[str]:
    load = os.getloadavg()
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        "# QuantLinear on CPU vs nn.Linear",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, ISA {torch.backends.cpu.get_cpu_capability()}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "- times: median milliseconds per forward call; bias off; `kernel` / `tiled` / "
        f"`bf16 tiles` = path taken (AMX: {getattr(cpu, 'FAST_BF16', False)})",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable numbers on a shared machine)")
    parser.add_argument("--shapes", nargs="+", metavar="OUTxIN",
                        help="weight shapes (default: 1536x576 576x1536 4096x4096)")
    parser.add_argument("--m", nargs="+", type=int, default=MS, help="activation rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            parser.error(f"--shapes takes OUTxIN, e.g. 50257x768; got {args.shapes}")
    lines = header(args) + run(shapes, args.m, FORMATS)
    load = os.getloadavg()
    lines.append("")
    lines.append(f"- load average at end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
