"""Session 42's probe (benchmarks/RESULTS.md): does Triton keep a wgmma in flight when a
tile's dot result is folded in one step later? Builds both forms for sm_90 (no GPU) and prints
the PTX's wgmma.wait_group counts and the SASS loop's HGMMA / DEPBAR lines.

    PYTHONPATH=<a Triton 3.6 site>:. python benchmarks/results/s42_gpu/fold_wait_probe.py
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import triton
import triton.language as tl

from tests.kernels import sm90_build


@triton.jit
def fold_now(x_ptr, q_ptr, s_ptr, y_ptr, K, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BM), tl.float32)
    for k in range(0, K, BK):
        q = tl.load(q_ptr + rn[:, None] * K + k + rk[None, :])
        w = (q & 0xF).to(tl.bfloat16)
        x = tl.load(x_ptr + rm[:, None] * K + k + rk[None, :])
        d = tl.dot(w, tl.trans(x))
        s = tl.load(s_ptr + rn * (K // BK) + k // BK)
        acc += s[:, None] * d
    tl.store(y_ptr + rn[:, None] * BM + rm[None, :], acc.to(tl.bfloat16))

@triton.jit
def fold_late(x_ptr, q_ptr, s_ptr, y_ptr, K, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BM), tl.float32)
    d_prev = tl.zeros((BN, BM), tl.float32)
    s_prev = tl.zeros((BN,), tl.float32)
    for k in range(0, K, BK):
        q = tl.load(q_ptr + rn[:, None] * K + k + rk[None, :])
        w = (q & 0xF).to(tl.bfloat16)
        x = tl.load(x_ptr + rm[:, None] * K + k + rk[None, :])
        d = tl.dot(w, tl.trans(x))
        acc += s_prev[:, None] * d_prev
        s_prev = tl.load(s_ptr + rn * (K // BK) + k // BK)
        d_prev = d
    acc += s_prev[:, None] * d_prev
    tl.store(y_ptr + rn[:, None] * BM + rm[None, :], acc.to(tl.bfloat16))

sig = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "y_ptr": "*bf16", "K": "i32"}
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for fn in (fold_now, fold_late):
    k = sm90_build.build(fn, sig, {"BN": 64, "BM": 16, "BK": 128}, 4, 3)
    print(fn.__name__, "wait_group:",
          re.findall(r"wgmma.wait_group.sync.aligned\s+(\d+)", k.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    print("\n".join(line.split(";")[0] for line in sass.splitlines()
                    if "HGMMA" in line or "DEPBAR" in line))
