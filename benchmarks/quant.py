"""Weight quantization, memfit vs llm-compressor, side by side in one run.

Same model (the embedded default unless --model), same calibration windows (built-in calib split,
fixed seed), same evaluation windows (built-in eval split, in order). For each setting both tools
compress in their own subprocess (so each peak RSS is its own, model load included), then both
results are scored here by the same streamed evaluator against the unquantized model:
perplexity, KL(ref || quantized), top-1 agreement; plus compress time, peak RSS and artifact bytes.

    python benchmarks/quant.py --peer-python /work/venv-peer/bin/python

The peer runs through benchmarks/peers/llmc_run.py (see benchmarks/peers/SETUP.md); it writes its
compressed-tensors artifact and a dense dequantized copy that plain transformers loads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from memfit.calib.data import token_windows
from memfit.eval.lm import evaluate_lm
from memfit.models import load_model
from peers.llmc import run_llmc

# name -> (memfit quant dict, peer args)
SETTINGS = {
    "rtn-w8": ({"algo": "rtn", "bits": 8, "group_size": None, "symmetric": True},
               ["--method", "rtn", "--bits", "8", "--group", "none", "--sym"]),
    "rtn-w4g64": ({"algo": "rtn", "bits": 4, "group_size": 64},
                  ["--method", "rtn", "--bits", "4", "--group", "64", "--asym"]),
    "gptq-w4g64": ({"algo": "gptq", "bits": 4, "group_size": 64},
                   ["--method", "gptq", "--bits", "4", "--group", "64", "--asym"]),
    "gptq-w4g64-actorder": ({"algo": "gptq", "bits": 4, "group_size": 64, "act_order": True},
                            ["--method", "gptq", "--bits", "4", "--group", "64", "--asym",
                             "--act-order"]),
    "gptq-w4g64-mse-actorder": ({"algo": "gptq", "bits": 4, "group_size": 64, "act_order": True,
                                 "clip": "mse"}, None),
    "awq-w4g64": ({"algo": "rtn", "bits": 4, "group_size": 64, "awq": True},
                  ["--method", "awq", "--bits", "4", "--group", "64", "--asym"]),
    "awq-w3g64": ({"algo": "rtn", "bits": 3, "group_size": 64, "awq": True},
                  ["--method", "awq", "--bits", "3", "--group", "64", "--asym"]),
    "rtn-w3g64": ({"algo": "rtn", "bits": 3, "group_size": 64},
                  ["--method", "rtn", "--bits", "3", "--group", "64", "--asym"]),
    "gptq-w3g64": ({"algo": "gptq", "bits": 3, "group_size": 64},
                   ["--method", "gptq", "--bits", "3", "--group", "64", "--asym"]),
    "gptq-w3g64-actorder": ({"algo": "gptq", "bits": 3, "group_size": 64, "act_order": True},
                            ["--method", "gptq", "--bits", "3", "--group", "64", "--asym",
                             "--act-order"]),
}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def run_memfit(src, quant, args, work: Path) -> dict:
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"quant": quant, "calib": {
        "samples": args.calib_windows, "seq_len": args.seq_len, "seed": 0}}))
    out = work / "memfit"
    cmd = [sys.executable, "-m", "memfit.cli", "compress", src, "--recipe", str(recipe),
           "--out", str(out), "--json", "--max-kld", "100", "--device", args.device, "--dtype", "float32"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"memfit failed: {res.stderr[-2000:]}")
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    return {"dir": out, "compress_seconds": rep["compress_seconds"],
            "peak_rss_bytes": rep["peak_rss_bytes"], "peak_gpu_bytes": rep.get("peak_gpu_bytes"),
            "artifact_bytes": _dir_bytes(out)}


def run_peer(src, peer_args, args, calib_file: Path, work: Path) -> dict:
    out, rep = run_llmc(args.peer_python, src, calib_file, work, peer_args, args.device)
    return {"dir": out / "dense", "compress_seconds": rep["compress_seconds"],
            "peak_rss_bytes": rep["peak_rss_bytes"], "peak_gpu_bytes": rep.get("peak_gpu_bytes"),
            "artifact_bytes": rep["artifact_bytes"], "version": rep.get("llmcompressor_version")}


def score(path, ref, windows, device) -> dict:
    m = load_model(str(path), device=device, dtype="float32")
    r = evaluate_lm(m.model, windows, ref=ref, progress=False)
    return {k: r[k] for k in ("perplexity", "kld", "top1_agreement")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peer-python", help="python of the llm-compressor environment (omit to "
                   "run memfit alone)")
    p.add_argument("--json-out", help="also write all rows as JSON here")
    args = p.parse_args()

    ref = load_model(args.model, device=args.device, dtype="float32")
    src = ref.source
    calib = token_windows(ref.tokenizer, "builtin", "calib", seq_len=args.seq_len,
                          max_windows=args.calib_windows, seed=0)
    evalw = token_windows(ref.tokenizer, "builtin", "eval", seq_len=args.seq_len,
                          max_windows=args.eval_windows)
    base = evaluate_lm(ref.model, evalw, progress=False)["perplexity"]
    rows = [{"tool": "unquantized", "setting": "fp32", "perplexity": base, "kld": 0.0,
             "top1_agreement": 1.0, "artifact_bytes": _dir_bytes(Path(src))}]
    with tempfile.TemporaryDirectory(prefix="memfit-bench-") as tmp:
        calib_file = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, str(calib_file))
        for name in args.settings.split(","):
            quant, peer_args = SETTINGS[name]
            tools = [("memfit", lambda w: run_memfit(src, quant, args, w))]
            if args.peer_python and peer_args is not None:
                tools.append(("llm-compressor",
                              lambda w: run_peer(src, peer_args, args, calib_file, w)))
            for tool, fn in tools:
                work = Path(tmp) / f"{name}-{tool}"
                work.mkdir()
                r = fn(work)
                row = {"tool": tool, "setting": name, **score(r["dir"], ref.model, evalw, args.device),
                       **{k: v for k, v in r.items() if k != "dir"}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows, args, base)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


def print_table(rows, args, base) -> None:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({cpu}, {os.cpu_count()} cores)"
    print(f"\n### Weight quantization, memfit vs llm-compressor ({datetime.date.today()})\n")
    print(f"Device: {dev}; torch {torch.__version__}. Model: {args.model}. Calibration: built-in "
          f"calib split, {args.calib_windows} x {args.seq_len} tokens, seed 0. Evaluation: built-in "
          f"eval split, {args.eval_windows} non-overlapping windows x {args.seq_len}. Command: "
          f"`python benchmarks/quant.py {' '.join(sys.argv[1:])}`\n")
    print("| setting | tool | perplexity | vs fp32 | KLD | top-1 | compress s | peak RSS GB | peak GPU GB | artifact MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['tool']} | {r['perplexity']:.4f} | "
              f"{r['perplexity'] / base:.4f}x | {r['kld']:.5f} | {100 * r['top1_agreement']:.2f}% | "
              f"{r.get('compress_seconds', 0):.1f} | {r.get('peak_rss_bytes', 0) / 1e9:.2f} | "
              f"{(r.get('peak_gpu_bytes') or 0) / 1e9:.2f} | "
              f"{r['artifact_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
