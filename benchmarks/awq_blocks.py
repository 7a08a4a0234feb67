"""AWQ variants compared block by block (default model), in minutes instead of a full compress.

For each chosen block (its float inputs: the float model's activations, 16 calibration windows
of builtin:calib x 512 tokens, seed 0) the block is compressed by memfit's own per-block step
(memfit.api._compress_block: AWQ, then the recipe's quantizer, true-sequential) under each
variant, and its output is compared with the float block's on the same inputs:

    relative error = sum ||block_q(x) - block(x)||^2 / sum ||block(x) - x||^2

summed over the chosen blocks, on the 16 calibration windows and on 8 held-out windows (the next
8 windows of builtin:calib). A variant is `key=value` pairs joined by `+`:

    awq=0|1  clip=0|1 (awq_clip)  duo=0|1 (awq_duo)  tie=0|1 (GQA-tied o_proj scales)
    insp=0|1 (the MLP's output as gate/up's loss)  maxa=A (awq_max_alpha)  grid=N (awq_grid)
    only=NAME (AWQ on the group whose first linear contains NAME only)
    two=0|1 (clip min and max separately)  joint=0|1 (score each α after its clip search; 1)
    noclip=A/B (no clip search on the linears whose names contain A or B)
    attn=0|1 (q/k/v's scale scored on their own outputs, or on the attention module's output:
             the llama row's default since AWQ round 4)

    OMP_NUM_THREADS=1 python benchmarks/awq_blocks.py w4g64-awq-gptq "awq=0,clip=0,clip=1" 0,14,28
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

import memfit
import memfit.awq as awq
from memfit.api import _compress_block, plan_specs
from memfit.archs import block_list
from memfit.calib.data import calibration_windows
from memfit.calib.engine import _block_output, capture_inputs, propagate
from memfit.recipe import Calib, load_recipe


def _variant(preset: str, arch, text: str):
    """-> (recipe, arch) of one variant string; patches memfit.awq's tie/plan for tie= / only=."""
    opts = dict(x.split("=") for x in text.split("+") if "=" in x)
    rec = load_recipe(preset)
    q = rec.quant
    q = replace(q, awq=opts.get("awq", "1") == "1", awq_duo=opts.get("duo", "0") == "1",
                awq_clip=opts.get("clip", "1" if q.awq_clip else "0") == "1",
                awq_max_alpha=float(opts.get("maxa", "1")), awq_grid=int(opts.get("grid", "20")))
    awq._gqa_tie = _REAL_TIE if opts.get("tie", "1") == "1" else (lambda *a: None)
    awq.TWO_SIDED, awq.JOINT = opts.get("two", "0") == "1", opts.get("joint", "1") == "1"
    noclip = tuple(n for g in arch.groups for n in g
                   if any(x and x in n for x in opts.get("noclip", "").split("/")))
    only = opts.get("only")

    def plan(*a, **k):
        todo, skipped = _REAL_PLAN(*a, **k)
        return [t for t in todo if only is None or only in t[0][0]], skipped
    awq._plan = plan
    arch = arch if opts.get("insp", "1") == "1" else replace(arch, awq_inspect=())
    if "attn" in opts:  # q/k/v scored on the attention's output (1, the default) or their own
        first = "self_attn" if opts["attn"] == "1" else None
        arch = replace(arch, awq_inspect=(first,) + (arch.awq_inspect or (None,) * 4)[1:])
    arch = replace(arch, awq_no_clip=arch.awq_no_clip + noclip)
    return replace(rec, quant=q), arch


_REAL_TIE, _REAL_PLAN = awq._gqa_tie, awq._plan


@torch.inference_mode()
def _error(block, ref_outputs, store, kwargs) -> tuple[float, float]:
    num = den = 0.0
    for b in range(len(store)):
        y = ref_outputs[b]
        num += float(((_block_output(block(store[b], **kwargs)) - y) ** 2).sum())
        den += float(((y - store[b]) ** 2).sum())
    return num, den


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("variants", help="comma-separated variants, e.g. awq=0,clip=0")
    p.add_argument("blocks", help="comma-separated block indices, e.g. 0,14,28")
    p.add_argument("--model", default="default", help="model spec (default: the default model)")
    a = p.parse_args()
    torch.manual_seed(0)
    loaded = memfit.load_model(a.model)
    model, arch = loaded.model, loaded.arch
    windows = calibration_windows(loaded.tokenizer, Calib(samples=24))
    blocks = block_list(model, arch)
    calib, kwargs = capture_inputs(model, blocks, windows[:16])
    held, _ = capture_inputs(model, blocks, windows[16:24])
    wanted = {int(b) for b in a.blocks.split(",")}
    variants = a.variants.split(",")
    sums = {v: [0.0, 0.0, 0.0, 0.0] for v in variants}
    secs = dict.fromkeys(variants, 0.0)
    for i, block in enumerate(blocks):
        if i in wanted:
            with torch.inference_mode():
                yc = [_block_output(block(calib[b], **kwargs[i])) for b in range(len(calib))]
                yh = [_block_output(block(held[b], **kwargs[i])) for b in range(len(held))]
            for v in variants:
                recipe, varch = _variant(a.preset, arch, v)
                bq, t0 = copy.deepcopy(block), time.perf_counter()
                _compress_block(bq, varch, plan_specs(model, recipe, varch)[i], calib, kwargs[i], [])
                secs[v] += time.perf_counter() - t0
                sums[v][0:2] = [s + e for s, e in zip(sums[v][0:2], _error(bq, yc, calib, kwargs[i]))]
                sums[v][2:4] = [s + e for s, e in zip(sums[v][2:4], _error(bq, yh, held, kwargs[i]))]
        propagate(block, calib, kwargs[i])
        propagate(block, held, kwargs[i])
    print(f"{a.model}, preset {a.preset}, blocks {sorted(wanted)}: relative block output error")
    for v, (cn, cd, hn, hd) in sums.items():
        print(f"{v:32s} calib {cn / cd:.5f}  held-out {hn / hd:.5f}  ({secs[v]:.0f} s)")


if __name__ == "__main__":
    main()
