"""Streamed perplexity (memfit.eval.lm.evaluate_lm) against the plain transformers loop, side by side.

    python benchmarks/eval_throughput.py [--model default] [--seq-len 2048] [--windows 2]

Both score the SAME windows (built-in evaluation split, in order). The plain loop is what most
scripts do: `model(ids, labels=ids).loss` per window under torch.inference_mode(), which holds the
whole (1, seq_len, vocab) logits plus their log-softmax. Each method runs in its own child process
(the parent only orchestrates and prints), so the peak RSS of one cannot hide inside the other's:
the child reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` (process lifetime peak: it includes
loading the model, so the RSS right after loading is reported beside it), and the peak of the
scoring phase alone (Linux VmHWM, reset through /proc/self/clear_refs after the warm-up).

Both are timed over the same work after the same short warm-up window (128 tokens, not counted):
tokens/s = windows * seq_len / seconds of scoring. Perplexities must agree to 1e-4 relative.
Targets (issue 2): peak RSS at seq_len 2048 <= model weight bytes + 1.5 GB, and memfit's
throughput >= 0.9x the plain loop's. Prints one markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

from memfit.eval.memory import reset_peak_rss

PPL_RTOL = 1e-4
RSS_HEADROOM = 1.5e9
THROUGHPUT_TARGET = 0.9


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def child(method: str, model_spec: str, seq_len: int, n_windows: int) -> dict:
    """Load, build windows, warm up, score with one method; return numbers as a dict."""
    import torch

    from memfit.calib.data import token_windows
    from memfit.eval.lm import evaluate_lm
    from memfit.eval.memory import weight_table
    from memfit.models import load_model

    m = load_model(model_spec)
    model = m.model
    wins = token_windows(m.tokenizer, "builtin", "eval", seq_len=seq_len, max_windows=n_windows)
    if wins.shape[0] < n_windows:
        raise SystemExit(f"only {wins.shape[0]} windows of {seq_len} in the eval split")
    rss_loaded = _rss_now()
    warm = wins[:1, :128]
    if method == "memfit":
        evaluate_lm(model, warm, progress=False)
        reset = reset_peak_rss()
        res = evaluate_lm(model, wins, progress=False)
        nll, seconds = res["nll"], res["seconds"]
    else:
        with torch.inference_mode():
            model(warm, labels=warm)
            reset = reset_peak_rss()
            losses, t0 = [], time.perf_counter()
            for i in range(wins.shape[0]):
                ids = wins[i:i + 1]  # (1, seq_len)
                losses.append(model(ids, labels=ids).loss.item())
            seconds = time.perf_counter() - t0
        nll = sum(losses) / len(losses)  # every window scores seq_len - 1 tokens: equal weights
    return {"method": method, "nll": nll, "perplexity": math.exp(nll), "seconds": seconds,
            "tokens_per_second": wins.numel() / seconds, "windows": wins.shape[0],
            "seq_len": seq_len, "scored_tokens": wins.shape[0] * (seq_len - 1),
            "rss_after_load": rss_loaded,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_scoring": _vm_hwm() if reset else -1,
            "weight_bytes": weight_table(model)["weight_bytes"],
            "threads": torch.get_num_threads()}


def _run_child(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--model", args.model,
           "--seq-len", str(args.seq_len), "--windows", str(args.windows)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {method} failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{method}: done in {time.perf_counter() - t0:.0f}s wall", file=sys.stderr, flush=True)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def report(args, runs: dict, load_start: str) -> str:
    import torch
    import transformers

    mf, pl = runs["memfit"], runs["plain"]
    weights = mf["weight_bytes"]
    ratio = mf["tokens_per_second"] / pl["tokens_per_second"]
    rel = abs(mf["perplexity"] - pl["perplexity"]) / pl["perplexity"]
    budget = weights + RSS_HEADROOM
    cmd = "python benchmarks/eval_throughput.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{cmd.strip()}`",
        f"- device: CPU {_cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} "
        f"usable), torch {torch.__version__} ({mf['threads']} threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; load average at start "
        f"{load_start}",
        f"- model: `{args.model}`, float32, weight bytes {weights:,} ({_gb(weights)})",
        f"- protocol: data builtin:eval, seq_len {args.seq_len}, {mf['windows']} non-overlapping "
        f"windows, {mf['scored_tokens']} scored tokens; 128-token warm-up window first (not "
        "timed); each method in its own process",
        "",
        "| method | perplexity | seconds | tokens/s | RSS after load | peak RSS (ru_maxrss) "
        "| peak RSS - weights | peak RSS while scoring |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("memfit `evaluate_lm` (streamed head)", mf),
                    ("plain `model(ids, labels=ids).loss`", pl)):
        lines.append(f"| {name} | {r['perplexity']:.6f} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_second']:.1f} | {_gb(r['rss_after_load'])} | "
                     f"{_gb(r['peak_rss'])} | {_gb(r['peak_rss'] - weights)} | "
                     f"{_gb(r['peak_rss_scoring']) if r['peak_rss_scoring'] >= 0 else 'n/a'} |")
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    lines += [
        "",
        f"- perplexity agreement: relative difference {rel:.2e} "
        f"({'within' if rel <= PPL_RTOL else 'OUTSIDE'} {PPL_RTOL:g})",
        f"- throughput memfit / plain: {ratio:.3f}x (target >= {THROUGHPUT_TARGET}x: {ok(ratio >= THROUGHPUT_TARGET)})",
        f"- peak RSS memfit: {_gb(mf['peak_rss'])} vs weights + 1.5 GB = {_gb(budget)} "
        f"(target: {ok(mf['peak_rss'] <= budget)}); plain loop: {_gb(pl['peak_rss'])}",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--child", choices=["memfit", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print(json.dumps(child(args.child, args.model, args.seq_len, args.windows)))
        return 0
    load_start = " ".join(open("/proc/loadavg").read().split()[:3])
    runs = {m: _run_child(m, args) for m in ("memfit", "plain")}
    print(report(args, runs, load_start))
    mf, pl = runs["memfit"], runs["plain"]
    rel = abs(mf["perplexity"] - pl["perplexity"]) / pl["perplexity"]
    return 0 if rel <= PPL_RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
