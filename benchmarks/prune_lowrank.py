"""Pruning and low-rank on the default model, then healing by distillation (memfit side).

Each preset compresses a fresh copy of the model on the same calibration windows; each result is
scored against the unquantized model on the same evaluation windows (perplexity, KLD, top-1) with
its stored weight bytes. With --distill-steps, the 2:4 SparseGPT model is then distilled toward
the original and scored again; the test asserts the 2:4 pattern after healing.

    python benchmarks/prune_lowrank.py --device cuda --distill-steps 200

llm-compressor's Wanda/SparseGPT are run by benchmarks/peers/llmc_run.py; this script does not
run them yet (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

from memfit.api import compress_
from memfit.data import token_windows
from memfit.distill import distill_
from memfit.eval.lm import evaluate_lm
from memfit.eval.memory import weight_table
from memfit.formats.sparse import SparseLinear
from memfit.models import load_model

PRESETS = ("magnitude-50", "wanda-50", "sparsegpt-50", "wanda-2of4", "sparsegpt-2of4",
           "svd-80", "wsvd-80", "w4g64", "w3g64-gptq")


def score(model, ref, windows) -> dict:
    r = evaluate_lm(model, windows, ref=ref, progress=False)
    return {"perplexity": r["perplexity"], "kld": r["kld"], "top1": r["top1_agreement"],
            "weight_bytes": weight_table(model)["weight_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=57)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--distill-lr", type=float, default=1e-5)
    args = p.parse_args()

    ref = load_model("default", device=args.device, dtype="float32")
    calib = token_windows(ref.tokenizer, "builtin", "calib", seq_len=args.seq_len,
                          max_windows=args.calib_windows, seed=0)
    evalw = token_windows(ref.tokenizer, "builtin", "eval", seq_len=args.seq_len,
                          max_windows=args.eval_windows)
    rows = [{"preset": "fp32", **score(ref.model, ref.model, evalw)}]
    print(json.dumps(rows[-1]), flush=True)
    for preset in args.presets.split(","):
        m = load_model("default", device=args.device, dtype="float32")
        t0 = time.perf_counter()
        compress_(m.model, preset, calib, progress=False)
        rows.append({"preset": preset, "seconds": time.perf_counter() - t0,
                     **score(m.model, ref.model, evalw)})
        print(json.dumps(rows[-1]), flush=True)
        if args.distill_steps and preset == "sparsegpt-2of4":
            rep = distill_(m.model, ref.model, calib, steps=args.distill_steps, lr=args.distill_lr,
                           batch_size=4, progress=False)
            for s in (x for x in m.model.modules() if isinstance(x, SparseLinear)):
                w = s.dense_weight()
                assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), "2:4 broken"
            rows.append({"preset": f"{preset} + distill {args.distill_steps} steps",
                         "seconds": rep["seconds"], **score(m.model, ref.model, evalw)})
            print(json.dumps(rows[-1]), flush=True)
        del m
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n### Pruning / low-rank / healing, memfit ({datetime.date.today()}, {dev}, "
          f"torch {torch.__version__})\n\nCommand: `python benchmarks/prune_lowrank.py "
          f"{' '.join(sys.argv[1:])}`; calibration builtin:calib {args.calib_windows} x "
          f"{args.seq_len} seed 0; evaluation builtin:eval {args.eval_windows} x {args.seq_len}.\n")
    base = rows[0]["perplexity"]
    print("| preset | perplexity | vs fp32 | KLD | top-1 | weight bytes | vs fp32 bytes | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['perplexity']:.4f} | {r['perplexity'] / base:.4f}x | "
              f"{r['kld']:.5f} | {100 * r['top1']:.2f}% | {r['weight_bytes']:,} | "
              f"{r['weight_bytes'] / rows[0]['weight_bytes']:.3f} | {r.get('seconds', 0):.1f} |")


if __name__ == "__main__":
    main()
