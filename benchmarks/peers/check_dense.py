"""Sanity-check a dense folder written by llmc_run.py, with plain transformers
(run with memfit's venv, e.g. /work/venv/bin/python):

    python benchmarks/peers/check_dense.py DENSE_DIR [--report R.json] [--calib FILE] [--ref DIR]

Checks: loads with AutoModelForCausalLM (no quantization_config), logits on the first
calibration window are finite; for quantized runs, the max number of distinct values
per group (group = `group` of the report, or per output row for per-channel) is
<= 2**bits; for pruned runs, the zero fraction of the pruned Linear weights (and the
N:M pattern if any). Prints one JSON line.
"""
import argparse
import json
import math

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def max_distinct_per_group(w: torch.Tensor, group: int | None) -> int:
    rows, cols = w.shape
    if group is None:
        g = w
    else:
        g = w.reshape(rows * (cols // group), group)
    s, _ = torch.sort(g, dim=1)
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
    return int(distinct.max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dense")
    ap.add_argument("--report")
    ap.add_argument("--calib")
    ap.add_argument("--ref", help="original model dir: report mean |ΔW| and ppl of both")
    a = ap.parse_args()
    rep = json.load(open(a.report)) if a.report else {}
    out = {"dense": a.dense}

    model = AutoModelForCausalLM.from_pretrained(a.dense, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    model.eval()
    if a.calib:
        ids = load_file(a.calib)["input_ids"][:1]
    else:
        ids = torch.arange(1, 129).unsqueeze(0)
    with torch.no_grad():
        o = model(input_ids=ids, labels=ids)
    out["logits_finite"] = bool(torch.isfinite(o.logits).all())
    out["loss_window0"] = round(float(o.loss), 4)
    out["ppl_window0"] = round(math.exp(float(o.loss)), 3)

    sd = load_file(f"{a.dense}/model.safetensors")
    lin = {k: v for k, v in sd.items() if k.endswith(LINEAR_SUFFIXES)}
    out["n_linear"] = len(lin)
    out["lm_head_in_file"] = "lm_head.weight" in sd
    method = rep.get("method")
    if method in ("rtn", "gptq"):
        grp = rep.get("group")
        mx = max(max_distinct_per_group(w, grp) for w in lin.values())
        out["max_distinct_per_group"] = mx
        out["levels_ok"] = mx <= 2 ** rep["bits"]
    if method in ("wanda", "sparsegpt"):
        z = sum(int((w == 0).sum()) for w in lin.values())
        n = sum(w.numel() for w in lin.values())
        out["zero_fraction"] = round(z / n, 5)
        per = [float((w == 0).float().mean()) for w in lin.values()]
        out["zero_fraction_min_max"] = [round(min(per), 5), round(max(per), 5)]
        if rep.get("nm"):
            nn, mm = (int(x) for x in rep["nm"].split(":"))
            ok = True
            for w in lin.values():
                blocks = (w.reshape(w.shape[0], -1, mm) != 0).sum(-1)
                ok &= bool((blocks <= nn).all())
            out["nm_ok"] = ok
    if a.ref:
        ref = load_file(f"{a.ref}/model.safetensors")
        other = [k for k in ref if not k.endswith(LINEAR_SUFFIXES)]
        out["non_linear_unchanged"] = all(torch.equal(ref[k], sd[k]) for k in other)
        out["mean_abs_dW"] = float(sum((ref[k] - sd[k]).abs().mean() for k in lin) / len(lin))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
