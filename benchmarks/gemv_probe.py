"""Why the mma decode kernel runs at the speed it does: ablations of its asm block, timed like
benchmarks/kernel_speed.py (CUDA-graph replays over weight copies past the L2, median of 5).

14336x4096 int4 g128, M = 1, bf16 activations, one launch shape per row. Variants (same grid,
same loads, same epilogue; all but `full` compute garbage):
- full: the kernel as shipped;
- no_mma: the mma.sync instructions replaced by two integer adds (keeps the bit tricks);
- no_alu: the shifts/LOP3 that make the bf16 pairs replaced by register moves (keeps the mma);
- load_only: the asm returns the loaded words (no arithmetic, activations unused).

    python benchmarks/gemv_probe.py
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from benchmarks.kernel_speed import copies, graph_time_us, int_weight
from memfit.kernels import mma_ptx, triton_mma

FULL = mma_ptx.mma_asm


def no_mma(f16):
    text = FULL(f16).replace(".reg .f32 a<4>, u, v;", ".reg .f32 a<4>, u, v;\n"
                             ".reg .b32 sink;\nmov.b32 sink, 0;")
    text = re.sub(r"mma\.sync[^;]*\{(p\d), one, (p\d), one\}, \{([^,]+), ([^}]+)\}[^;]*;",
                  r"add.u32 sink, sink, \1;\nadd.u32 sink, sink, \2;\n"
                  r"add.u32 sink, sink, \3;\nadd.u32 sink, sink, \4;", text)
    return text.replace("mov.b32 $0, a0;", "mov.b32 $0, sink;")


def no_alu(f16):
    text = FULL(f16)
    text = re.sub(r"shr\.u32 t, [^;]*;\n", "", text)
    return re.sub(r"lop3\.b32 (p\d), [^,]+, [^;]*;", r"mov.b32 \1, $8;", text)


def load_only(f16):
    return "{\n" + "\n".join([f"mov.b32 ${i}, ${8 + i};" for i in range(4)]
                             + [f"mov.b32 ${4 + i}, 0;" for i in range(4)]) + "\n}"


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 14336, 4096
    ws = [int_weight(n, k, 4, 128, gen) for _ in range(copies(n * k // 2))]
    dense = [torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
             for _ in range(copies(n * k * 2))]
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    print(f"bf16 cuBLAS {graph_time_us([lambda w=w: F.linear(x, w) for w in dense]):.1f} us")
    for bn, sk, warps, ch in ((128, 4, 4, 1), (128, 4, 4, 2), (64, 4, 4, 4), (128, 2, 4, 4),
                              (64, 8, 4, 2), (128, 1, 4, 1)):
        for name, gen_asm in (("full", FULL), ("no_mma", no_mma), ("no_alu", no_alu),
                              ("load_only", load_only)):
            mma_ptx.mma_asm = gen_asm
            try:
                t = graph_time_us([lambda w=w: triton_mma.run_mma(x, w, None, bn, sk, warps, ch)
                                   for w in ws])
                kern = triton_mma.LAST[0]
                print(f"BN={bn} SK={sk} warps={warps} unroll={ch} {name:10s} {t:6.1f} us "
                      f"regs {kern.n_regs} spills {kern.n_spills}", flush=True)
            except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                print(f"BN={bn} SK={sk} unroll={ch} {name}: FAILED {type(e).__name__}: {e}"[:200])
            mma_ptx.mma_asm = FULL


if __name__ == "__main__":
    main()
