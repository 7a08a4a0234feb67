"""Input Hessian spectrum per group (block inputs of the float model): how much of tr(H) the top
k eigen-directions hold, and diag-dominance (what a per-channel scale can see)."""
import sys, torch
import memfit
import memfit.awq as A
from memfit.api import plan_specs
from memfit.archs import block_list
from memfit.calib.data import calibration_windows
from memfit.calib.engine import capture_inputs, propagate
from memfit.recipe import Calib, load_recipe
torch.manual_seed(0)
L = memfit.load_model(sys.argv[2] if len(sys.argv) > 2 else "default"); model, arch = L.model, L.arch
win = calibration_windows(L.tokenizer, Calib(samples=16))
blocks = block_list(model, arch)
store, kw = capture_inputs(model, blocks, win)
want = [int(b) for b in sys.argv[1].split(",")]
specs = plan_specs(model, load_recipe("w4g64-awq"), arch)
for i, block in enumerate(blocks):
    if i in want:
        todo, _ = A._plan(block, arch, specs[i], tied=True)
        for (names, *_), st in zip(todo, A._collect(block, arch, todo, store, kw[i])):
            H = st.h.hessian.double()
            ev = torch.linalg.eigvalsh(H).flip(0).clamp(min=0)
            c = ev.cumsum(0) / ev.sum()
            n = len(ev)
            eff = float(ev.sum() ** 2 / (ev ** 2).sum())  # participation ratio
            d = H.diagonal()
            corr = H / (d[:, None] * d[None, :]).sqrt()
            off = float((corr - torch.eye(n, dtype=corr.dtype)).abs().sum() / (n * (n - 1)))
            print(f"b{i:2d} {names[0]:18s} in={n} top1% {c[max(0, n // 100 - 1)]:.3f} top10% {c[n // 10 - 1]:.3f} "
                  f"participation {eff:.1f} mean|corr| {off:.3f} cond {float(ev[0] / ev[-1].clamp(min=1e-12)):.2e}", flush=True)
    if i >= max(want): break
    propagate(block, store, kw[i])
