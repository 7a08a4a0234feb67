"""W8A8 (int8 weights x int8 activations) and the compressed-tensors export on the default model.

Three parts, side by side in one run each (ratios), printed as markdown with device, date, load
average and command:

- `ppl`: perplexity on the built-in eval split, every 512-token window (29,127 scored tokens),
  of the float32 model, W8A8 (per-token activations, RTN per-channel weights), and W8A8 with
  SmoothQuant at α 0.5 and 0.8 (calibration: `--samples` (16) x 512 built-in calib windows;
  max|x| per channel needs few).
- `speed`: the int8 CPU product against float32 F.linear on the default model's four linear
  shapes at M = 1, 16, 64, 256, 1024 rows: `W8A8Linear.forward` (activation quantization
  included) and the bare `torch._int_mm`; one torch thread, the median of the calling thread's
  CPU time over repeated calls (robust to other jobs on a shared machine; wall time is not).
- `ct`: w4g64 (RTN) saved in memfit's format and exported to compressed-tensors; perplexity of
  the memfit folder through memfit, and of the compressed-tensors folder through plain
  transformers in a process that never imports memfit, on the same windows.

    python benchmarks/w8a8.py --part ppl|speed|ct [--max-windows N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from memfit.api import compress_
from memfit.calib.data import token_windows
from memfit.eval.lm import evaluate_lm
from memfit.models import load_model
from memfit.recipe import PRESETS, Recipe

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536)}
ROWS = (1, 16, 64, 256, 1024)


def _windows(tok, max_windows):
    return token_windows(tok, "builtin", "eval", seq_len=512, max_windows=max_windows, bos="auto")


def part_ppl(args) -> list[dict]:
    sq = {"algo": "rtn", "bits": 8, "group_size": None, "symmetric": True, "act_bits": 8}
    calib = {"samples": args.samples, "seq_len": 512}
    settings = {"float32": None, "w8a8": PRESETS["w8a8"],
                "w8a8-sq a=0.5": Recipe.from_dict({"quant": {**sq, "smoothquant": 0.5},
                                                   "calib": calib}),
                "w8a8-sq a=0.8": Recipe.from_dict({"quant": {**sq, "smoothquant": 0.8},
                                                   "calib": calib})}
    if args.settings:
        settings = {k: v for k, v in settings.items() if k in args.settings.split(",")}
    rows = []
    for name, recipe in settings.items():
        m = load_model("default")
        windows = _windows(m.tokenizer, args.max_windows)
        t0 = time.perf_counter()
        if recipe is not None:
            compress_(m.model, recipe, tokenizer=m.tokenizer, progress=False)
        t1 = time.perf_counter()
        r = evaluate_lm(m.model, windows, progress=False)
        rows.append({"setting": name, "perplexity": r["perplexity"], "tokens": r["tokens"],
                     "windows": r["windows"], "compress_s": t1 - t0,
                     "eval_s": time.perf_counter() - t1})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["perplexity"]  # the first setting run (float32 when it is among them)
    print("\n| setting | perplexity | x float32 | compress s | eval s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['perplexity']:.4f} | {r['perplexity'] / base:.4f} | "
              f"{r['compress_s']:.0f} | {r['eval_s']:.0f} |")
    return rows


def _median_us(fn, budget=0.3) -> float:
    """Median CPU time of the calling thread per call (torch runs on this one thread here):
    on a machine shared with other jobs, wall time mostly measures waiting for a core."""
    fn()
    times, start = [], time.thread_time()
    while len(times) < 5 or (time.thread_time() - start < budget and len(times) < 25):
        t = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - t)
    return statistics.median(times) / 1e3


@torch.inference_mode()
def part_speed(args) -> None:
    from memfit.formats import grid
    from memfit.formats.grid import IntFormat
    from memfit.formats.intq import PackedIntWeight
    from memfit.formats.w8a8 import W8A8Linear

    torch.set_num_threads(1)  # CPU time of one thread is what is measured
    fmt = IntFormat(bits=8, group_size=None, symmetric=True)
    print("one thread, median thread CPU time per call\n| shape (out x in) | M | float32 F.linear us | W8A8Linear us | _int_mm only us | "
          "fp32 / W8A8 |\n|---|---|---|---|---|---|")
    for name, (out, k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out, k, generator=g) * 0.02
        scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
        lin = W8A8Linear.from_packed(PackedIntWeight.from_codes(
            grid.quantize(w, scale, zero, fmt), scale, None, fmt), None)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            f32 = _median_us(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            w8 = _median_us(lambda x=x, lin=lin: lin(x))
            mm = _median_us(lambda xq=xq, lin=lin: torch._int_mm(xq, lin.qdata.t()))
            print(f"| {name} {out}x{k} | {m} | {f32:.0f} | {w8:.0f} | {mm:.0f} | {f32 / w8:.2f} |",
                  flush=True)


PLAIN = r'''
import json, math, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, path = sys.argv[1], sys.argv[2]
ids = load_file(path)["windows"]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
nll, n = 0.0, 0
with torch.no_grad():
    for w in ids:
        logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
        nll -= logp.gather(-1, w[1:, None]).sum().item()
        n += w.numel() - 1
assert "memfit" not in sys.modules
print(json.dumps({"perplexity": math.exp(nll / n), "tokens": n}))
'''


def part_ct(args) -> None:
    from memfit.io.export_ct import save_ct
    from memfit.io.save import save

    m = load_model("default")
    windows = _windows(m.tokenizer, args.max_windows)
    compress_(m.model, "w4g64", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save(m.model, m.tokenizer, tmp / "mf", recipe={"preset": "w4g64"})
        save_ct(m.model, m.tokenizer, tmp / "ct", recipe={"preset": "w4g64"})
        del m
        mf = evaluate_lm(load_model(str(tmp / "mf")).model, windows, progress=False)
        print(json.dumps({"memfit": mf["perplexity"]}), flush=True)
        save_file({"windows": windows.contiguous()}, str(tmp / "w.safetensors"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PLAIN, str(tmp / "ct"), str(tmp / "w.safetensors")],
                             capture_output=True, text=True, env=env, cwd=tmp, check=True)
        plain = json.loads(out.stdout.strip().splitlines()[-1])
        sizes = {p: sum(f.stat().st_size for f in (tmp / p).rglob("*.safetensors")) for p in ("mf", "ct")}
    print("| w4g64 (RTN) artifact | loaded by | perplexity | scored tokens | safetensors bytes |\n"
          "|---|---|---|---|---|")
    print(f"| memfit format | memfit | {mf['perplexity']:.4f} | {mf['tokens']} | {sizes['mf']:,} |")
    print(f"| compressed-tensors | plain transformers, no memfit ({time.perf_counter() - t0:.0f} s) "
          f"| {plain['perplexity']:.4f} | {plain['tokens']} | {sizes['ct']:,} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["ppl", "speed", "ct"], required=True)
    p.add_argument("--max-windows", type=int, default=None, help="default: every window")
    p.add_argument("--settings", help="ppl: a comma-separated subset of: float32, w8a8, "
                   "w8a8-sq a=0.5, w8a8-sq a=0.8 (default all)")
    p.add_argument("--samples", type=int, default=16, help="ppl: SmoothQuant calibration "
                   "windows of 512 tokens (default 16)")
    args = p.parse_args()
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
          f"command: python {' '.join(sys.argv)}", flush=True)
    {"ppl": part_ppl, "speed": part_speed, "ct": part_ct}[args.part](args)


if __name__ == "__main__":
    main()
