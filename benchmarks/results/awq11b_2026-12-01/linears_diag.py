"""Per-linear output errors (full H) on float block inputs: RTN, AWQ(RTN), AWQ+clip, GPTQ."""
import sys, torch
import memfit
import memfit.awq as A
from memfit.algos.awq import alphas, search_scale, search_clip, scaled_rtn, output_error
from memfit.api import plan_specs
from memfit.archs import block_list
from memfit.calib.data import calibration_windows
from memfit.calib.engine import capture_inputs, propagate
from memfit.recipe import Calib, load_recipe
from memfit.algos.gptq import gptq
from memfit.formats.grid import dequantize
torch.manual_seed(0)
L = memfit.load_model("default"); model, arch = L.model, L.arch
win = calibration_windows(L.tokenizer, Calib(samples=16))
blocks = block_list(model, arch)
store, kw = capture_inputs(model, blocks, win)
want = [int(b) for b in sys.argv[1].split(",")]
rec = load_recipe("w4g64-awq")
fmt = rec.quant.format
specs = plan_specs(model, rec, arch)
for i, block in enumerate(blocks):
    if i in want:
        todo, _ = A._plan(block, arch, specs[i], tied=True)
        stats = A._collect(block, arch, todo, store, kw[i])
        for (names, fold, tie, insp), st in zip(todo, stats):
            H = st.h.hessian
            ws = [block.get_submodule(n).weight.detach().float() for n in names]
            src = block.get_submodule(fold)
            res = search_scale([(w, fmt) for w in ws], st.mean_abs, H, alphas(20), tie=tie,
                               width=None if tie is None else src.out_features)
            s = res.scale; Hs = H / (s[:, None] * s[None, :])
            for n, w in zip(names, ws):
                energy = output_error(w, torch.zeros_like(w), H)
                e_rtn = output_error(w, scaled_rtn(w, torch.ones(()), fmt), H)
                e_awq = output_error(w, scaled_rtn(w, s, fmt), H)
                cw, after, before = search_clip(w * s, fmt, Hs)
                e_clip = output_error(w, scaled_rtn(cw, torch.ones(()), fmt) / s, H)
                r = gptq(w, H.clone(), fmt, act_order=True, clip="mse")
                e_g = output_error(w, dequantize(r.codes, r.scale, r.zero, fmt), H)
                print(f"b{i:2d} {n:18s} a={res.alpha:.2f} rel: rtn {e_rtn/energy:.5f} awq {e_awq/energy:.5f} "
                      f"awq+clip {e_clip/energy:.5f} (diag {after/energy:.5f}<-{before/energy:.5f}) gptq {e_g/energy:.5f}", flush=True)
            st.kept.clear()
    if i >= max(want): break
    propagate(block, store, kw[i])
