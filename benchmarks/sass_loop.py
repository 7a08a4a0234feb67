"""Instruction counts of the mma decode kernel's main loop, compiled ahead of time for sm_90 on
any machine (no GPU: Triton's bundled ptxas and cuobjdump; tests/kernels/sm90_build.py builds the
kernel as a GPU launch would specialize it). A proxy for what a change does to the inner loop,
not a timing: the loop's SASS opcodes per tile and thread.

    python benchmarks/sass_loop.py --mt 16 --bn 128 --warps 4 --reps 1 2 4
    python benchmarks/sass_loop.py --mt 1 --nsub 2 --epi 0 1 --pf 1 2

Run it without TRITON_INTERPRET; PYTHONPATH=DIR with another Triton (pip install --target DIR
triton==X) builds with that version.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

from tests.kernels import sm90_build


def loop_ops(cubin: bytes, inner: str = "") -> collections.Counter:
    """Opcode counts of the longest backward branch's body (the main loop); with `inner` (an
    opcode, e.g. "HGMMA"), of the shortest one that holds it (the K loop inside an outer loop)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(.*?);", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2).split()))
    loops = [(int(b.group(1), 16), at) for at, words in rows
             if (b := re.search(r"BRA (0x[0-9a-f]+)", " ".join(words)))
             and int(b.group(1), 16) < at]
    if inner:
        loops = [lp for lp in loops if any(lp[0] <= at <= lp[1] and inner in " ".join(words)
                                           for at, words in rows)]
        loop = min(loops, key=lambda p: p[1] - p[0])
    else:
        loop = max(loops, key=lambda p: p[1] - p[0])
    ops = collections.Counter()
    for at, words in rows:
        if loop[0] <= at <= loop[1]:
            op = words[1] if words[0].startswith("@") else words[0]
            ops[op.split(".")[0]] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mt", type=int, default=1, help="1, 8 or 16 token columns")
    ap.add_argument("--nsub", type=int, default=1, help="groups per 128-code tile (M = 1)")
    ap.add_argument("--bn", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--rb", type=int, default=64, help="tiled rows (0: stored layout)")
    ap.add_argument("--epi", type=int, nargs="*", default=[0])
    ap.add_argument("--reps", type=int, nargs="*", default=[1])
    ap.add_argument("--pf", type=int, nargs="*", default=[1], help="tiles in flight (M = 1)")
    args = ap.parse_args()
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    print(f"Triton {triton.__version__}, sm_90")
    for epi, reps, pf in itertools.product(args.epi, args.reps, args.pf):
        k = sm90_build.mma_kernel(args.mt, args.nsub, 1, "f16", False, args.rb, bool(epi),
                                  args.bn, args.warps, 1, reps, pf)
        ops = loop_ops(k.asm["cubin"])
        top = ", ".join(f"{o} {n}" for o, n in ops.most_common(10))
        print(f"M-tile {args.mt} nsub {args.nsub} BN {args.bn} warps {args.warps} RB {args.rb} "
              f"epi {epi} reps {reps} pf {pf}: {sum(ops.values())} instructions a tile ({top})")


if __name__ == "__main__":
    main()
