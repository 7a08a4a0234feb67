"""Before/after table for an encoder (default: the embedded all-MiniLM-L6-v2): every setting is
compressed with the `memfit compress` command (2:4 healed with `memfit distill`), then each model
is measured in its own process (so each peak RSS is its own: imports, load and embedding).

Quality is measured against the uncompressed model on held-apart text, `--sentences` distinct
sentence-like lines of 5+ words spread evenly over the built-in `eval` split
(memfit.eval.encoder.held_apart; calibration and healing read the `calib` split only): mean and
minimum cosine of the mean-pooled embeddings, and the retrieval check, top-1 nearest-neighbour
agreement among those sentences, over all queries and over the queries whose reference top-1
beats the runner-up by >= 0.01 ("clear"). The agreement on run 1's set (the first 256 lines of
the split, with repeats) is reported beside it. Speed is sentences per second embedding the
held-apart sentences in batches of `--batch` (padded to the longest in the batch) after one
untimed warm-up batch, with `--threads` torch threads (1 by default: on a shared 2-core machine
two threads stall on each other). Bytes: the weights as held in memory (memfit's weight table)
and the artifact folder on disk.

    python benchmarks/encoder.py                 # writes benchmarks/results/encoder.{md,png,json}

The chart needs matplotlib (a memfit dependency).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPARSE_CALIB = ["--samples", "256"]  # 4x the default: a better start for healing (RESULTS.md)
# name -> (compress arguments or None for the original, heal after compressing)
SETTINGS = {
    "fp32": (None, False),
    "int8 RTN": (["--recipe", "w8"], False),
    "int8 GPTQ": (["--recipe", "w8-gptq"], False),
    "int8 RTN + int8 embeddings": (["--recipe", "@w8e8"], False),
    "W8A8 (int8 activations too)": (["--recipe", "w8a8", "--min-cosine", "0"], False),
    "GPTQ w4 g64": (["--recipe", "w4g64-gptq"], False),
    "GPTQ w4 g32": (["--recipe", "w4g32-gptq"], False),
    "SparseGPT 2:4": (["--recipe", "sparsegpt-2of4", "--min-cosine", "0"] + SPARSE_CALIB, False),
    "SparseGPT 2:4 + healing": (["--recipe", "sparsegpt-2of4", "--min-cosine", "0"]
                                + SPARSE_CALIB, True),
    "whitened SVD 80%": (["--recipe", "wsvd-80", "--min-cosine", "0"], False),
}
W8E8 = ("quant: {algo: rtn, bits: 8, group_size: null, symmetric: true}\n"
        "embeddings: {bits: 8, group_size: null, symmetric: true}\n")
RUN1_SET = 256
HEAL_STEPS, HEAL_LR, HEAL_HIDDEN_MSE = 550, 1e-3, 1.0  # benchmarks/RESULTS.md, issue 14 run 2  # run 1's held-apart set: the first 256 sentence-like lines of the eval split


def measure(spec: str, emb_path: str, n: int, batch: int, threads: int) -> dict:
    """In a child process: load, embed the held-apart sentences (timed) and run 1's set, save
    the embeddings."""
    torch.set_num_threads(threads)
    from safetensors.torch import save_file

    from memfit.calib.data import sentences
    from memfit.eval.encoder import embed, held_apart
    from memfit.eval.memory import weight_table
    from memfit.models import load_model

    m = load_model(spec)
    sents = held_apart("builtin", "eval", n)
    embed(m.model, m.tokenizer, sents[:batch], batch_size=batch)  # warm-up, not timed
    t0 = time.perf_counter()
    emb = embed(m.model, m.tokenizer, sents, batch_size=batch)
    seconds = time.perf_counter() - t0
    old = embed(m.model, m.tokenizer, sentences("builtin", "eval", limit=RUN1_SET),
                batch_size=batch)
    save_file({"emb": emb.contiguous(), "run1": old.contiguous()}, emb_path)
    return {"sentences": len(sents), "seconds": seconds, "sentences_per_s": len(sents) / seconds,
            "threads": torch.get_num_threads(),
            "weight_bytes": weight_table(m.model)["weight_bytes"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _memfit(*args: str) -> dict:
    cmd = [sys.executable, "-m", "memfit", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _child(spec: str, emb_path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", spec, "--emb", str(emb_path),
           "--sentences", str(args.sentences), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measuring {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quality(emb: dict, ref: dict) -> dict:
    from memfit.eval.encoder import compare, neighbour_agreement
    return {**compare(emb["emb"], ref["emb"]),
            "neighbour_agreement_run1_set": neighbour_agreement(emb["run1"], ref["run1"])}


def run(args) -> list[dict]:
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="memfit-encoder-bench-"))
    (work / "w8e8.yaml").write_text(W8E8)
    rows, ref, made = [], None, {}  # made: compress arguments -> (folder, report), reused
    for name, (compress_args, heal) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        row = {"setting": name}
        spec = args.model
        if compress_args is not None:
            cargs = [str(work / "w8e8.yaml") if a == "@w8e8" else a for a in compress_args]
            if tuple(cargs) not in made:
                folder = work / f"m{len(made)}"
                made[tuple(cargs)] = folder, _memfit("compress", args.model, *cargs, "--out",
                                                     str(folder))
            folder, rep = made[tuple(cargs)]
            row["compress_seconds"] = rep["compress_seconds"]
            row["compress_args"] = cargs
            spec = str(folder)
            if heal:
                rep = _memfit("distill", args.model, spec, "--out", str(folder) + "-healed",
                              "--steps", str(args.heal_steps), "--lr", str(args.heal_lr),
                              "--hidden-mse", str(args.heal_hidden_mse))
                row["heal"] = {"steps": args.heal_steps, "lr": args.heal_lr,
                               "hidden_mse": args.heal_hidden_mse, "seconds": rep["seconds"]}
                spec = str(folder) + "-healed"
            row["artifact_bytes"] = sum(f.stat().st_size for f in Path(spec).rglob("*")
                                        if f.is_file())
        else:
            from memfit.models import resolve
            row["artifact_bytes"] = (Path(resolve(args.model)[1]) / "model.safetensors").stat().st_size
        row.update(_child(spec, work / f"{len(rows)}.st", args))
        emb = load_file(str(work / f"{len(rows)}.st"))
        ref = emb if ref is None else ref
        row.update(_quality(emb, ref))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = ("| setting | weights (MB) | artifact (MB) | peak RSS (MB) | sentences/s | speed vs fp32 "
            "| cosine mean | cosine min | top-1 NN agreement | NN agreement, clear queries "
            "| NN agreement, run-1 set |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['weight_bytes'] / 1e6:.2f} | {r['artifact_bytes'] / 1e6:.2f} "
                     f"| {r['peak_rss_bytes'] / 1e6:.0f} | {r['sentences_per_s']:.1f} "
                     f"| {r['sentences_per_s'] / base['sentences_per_s']:.2f}x "
                     f"| {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} "
                     f"| {100 * r['neighbour_agreement']:.2f}% "
                     f"| {100 * r['neighbour_agreement_clear']:.2f}% of {r['clear_queries']} "
                     f"| {100 * r['neighbour_agreement_run1_set']:.2f}% |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in rows]
    panels = [("weights in memory (MB)", [r["weight_bytes"] / 1e6 for r in rows]),
              ("artifact on disk (MB)", [r["artifact_bytes"] / 1e6 for r in rows]),
              ("peak RSS, load + embed (MB)", [r["peak_rss_bytes"] / 1e6 for r in rows]),
              ("sentences / s", [r["sentences_per_s"] for r in rows]),
              ("mean cosine to fp32", [r["cosine_mean"] for r in rows]),
              ("top-1 NN agreement (%)", [100 * r["neighbour_agreement"] for r in rows]),
              ("NN agreement, clear queries (%)",
               [100 * r["neighbour_agreement_clear"] for r in rows]),
              ("compress + heal (s)", [r.get("compress_seconds", 0)
                                       + r.get("heal", {}).get("seconds", 0) for r in rows])]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (title, values) in zip(axes.flat, panels):
        ax.barh(range(len(names)), values, color=["#777"] + ["#3a7"] * (len(names) - 1))
        ax.set_yticks(range(len(names)), names if ax in axes[:, 0] else [""] * len(names),
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        if "cosine" in title:
            ax.set_xlim(min(values) - 0.02, 1.0)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.4g}", va="center", fontsize=7)
    fig.suptitle(f"memfit on {model}: before/after (quality vs fp32 on held-apart sentences)",
                 fontsize=12)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.rename(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default-encoder")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heal-steps", type=int, default=HEAL_STEPS)
    p.add_argument("--heal-lr", type=float, default=HEAL_LR)
    p.add_argument("--heal-hidden-mse", type=float, default=HEAL_HIDDEN_MSE)
    p.add_argument("--only", nargs="*", help="settings to run (fp32 first; default all)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "encoder"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--emb", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.emb, args.sentences, args.batch,
                                 args.threads)))
        return
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    rows = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
           f"{torch.__version__} ({args.threads} thread(s) per measuring process), transformers "
           f"{transformers.__version__}, Python {platform.python_version()}; load average at "
           f"start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    md = (f"- date: {started}\n- command: `python benchmarks/encoder.py "
          f"{' '.join(sys.argv[1:])}`\n- device: {env}\n- protocol: builtin:eval, "
          f"{rows[0]['sentences']} distinct sentence-like lines of 5+ words spread over the "
          f"split, mean pooling, batch {args.batch}, {args.threads} thread(s); clear queries: "
          f"reference top-1 beats top-2 by >= 0.01; run-1 set: the first {RUN1_SET} lines; "
          f"calibration/healing on builtin:calib; healing {args.heal_steps} steps, lr "
          f"{args.heal_lr}, hidden-mse {args.heal_hidden_mse}\n\n{table(rows)}\n")
    for suffix, text in ((".md", md), (".json", json.dumps(rows, indent=1))):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.rename(out.with_name(out.name + suffix))
    try:
        chart(rows, out.with_name(out.name + ".png"), args.model)
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
