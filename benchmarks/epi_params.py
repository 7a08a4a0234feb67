"""M = 1 mma decode kernel with the asm epilogue (EPI): a tile's scale and zero point loaded in
every accumulator slot of a lane (4 loads of each a tile) against only in the slots the
epilogue reads (slot 0, and slot 1 with groups < 128 codes): memfit.kernels.triton_mma's
NEEDED_PARAMS, A/B in one process, rounds alternated. Also the best non-EPI candidate, which
the switch does not touch, as the chooser would see it.

Timed as the chooser times (CUDA graph over weight copies past the L2, best of 3 replays);
every output checked against dequantize + cuBLAS.

    python benchmarks/epi_params.py [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from benchmarks.gemv_limits import setup, t_us
from memfit.kernels import triton_int, triton_mma
from memfit.kernels.weights import tile

SHAPES = ((14336, 4096, 128), (14336, 4096, 64), (4096, 14336, 64), (14336, 4096, 32))


def best(fns_of, cands, want) -> tuple[float, str, float]:
    """(µs, launch shape, worst relative error) of the fastest candidate."""
    res, err = [], 0.0
    for c in cands:
        f = fns_of(c)
        y = f[0]().float()
        err = max(err, ((y - want).norm() / want.norm()).item())
        res.append((t_us(f), c))
    res.sort(key=lambda r: r[0])
    c = res[0][1]
    return res[0][0], f"BN {c.BN} w{c.num_warps} sk {c.SPLIT_K} reps {c.reps}", err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-cands", type=int, default=10, help="EPI launch shapes timed per layout")
    ap.add_argument("--json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k, g in SHAPES:
        ws, x, bf16, want = setup(n, k, g, 1, gen)
        for rb in (64, 0):
            wl = [tile(w, rb) for w in ws] if rb else ws
            cands = triton_int.mma_candidates(1, wl[0])
            epi = [c for c in cands if c.epi][: args.max_cands]
            plain = [c for c in cands if not c.epi][: args.max_cands]
            if not epi:
                continue

            def fns_of(c, x=x, wl=wl):
                return [lambda w=w: triton_int.run(x, w, None, c) for w in wl]

            row = {"n": n, "k": k, "group": g, "rb": rb, "bf16_us": round(bf16, 2)}
            for r in range(args.rounds):
                for on in (True, False) if r % 2 == 0 else (False, True):
                    triton_mma.NEEDED_PARAMS = on
                    t, shape, err = best(fns_of, epi, want)
                    key = "needed" if on else "all4"
                    if t < row.get(key, {}).get("us", 1e9):
                        row[key] = {"us": round(t, 2), "shape": shape, "err": err}
            triton_mma.NEEDED_PARAMS = True
            t, shape, err = best(fns_of, plain, want)
            row["plain"] = {"us": round(t, 2), "shape": shape, "err": err}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__, "rows": rows}, f, indent=1)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
