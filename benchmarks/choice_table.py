"""Time every candidate launch shape of memfit's int4 chooser on the linear shapes of common
open models, and make from it the shortlist memfit ships (memfit/kernels/shortlists.json):
for each (M bucket, layer shape, format) the few launch shapes that came within a margin of
the best. On a GPU of the same architecture the chooser then checks and times those few
instead of every candidate (memfit.kernels.choices.shortlisted).

Collect (one GPU; full search, nothing read from or written to the choice file; the JSON is
rewritten after each choice, so a run stopped by a time limit keeps what it timed):

    python benchmarks/choice_table.py --json OUT.json [--ms 1 16] [--groups 128 64]
        [--families llama3-8b qwen2.5-7b ...] [--budget-s 480] [--max-rows N] [--min-rows N]

Build the shipped table from one or more collected files (CPU is enough):

    python benchmarks/choice_table.py --build OUT1.json OUT2.json [--top 4 --margin 0.15]
        [--out memfit/kernels/shortlists.json] [--onto memfit/kernels/shortlists.json]

--onto starts from a table already built: the keys of the files given replace its own, the
rest stay (a few keys re-timed after a change of their candidates).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ["MEMFIT_KERNEL_CHOICES"] = "0"  # time everything; neither read nor write the file
os.environ["MEMFIT_KERNEL_SEARCH"] = "full"  # and never take the shipped shortlist

# (hidden, intermediate, query heads x head dim, key/value heads x head dim) of each family;
# the decode loop fuses q/k/v and gate/up and tiles them (64-row blocks) at batch 1
FAMILIES = {
    "llama3-8b": (4096, 14336, 4096, 1024),      # also Llama-3.1-8B, Mistral-7B-v0.3
    "qwen2.5-7b": (3584, 18944, 3584, 512),
    "llama3.2-3b": (3072, 8192, 3072, 1024),
    "llama3.2-1b": (2048, 8192, 2048, 512),
    "qwen3-8b": (4096, 12288, 4096, 1024),
    "llama3-70b": (8192, 28672, 8192, 1024),
    "llama2-7b": (4096, 11008, 4096, 4096),
}
TABLE = Path(__file__).resolve().parents[1] / "memfit" / "kernels" / "shortlists.json"


def shapes(family: str) -> tuple[list, list]:
    """(out, in) of the unfused linears (transformers' modules) and the decode loop's fused ones."""
    h, f, q, kv = FAMILIES[family]
    plain = [(q, h), (kv, h), (h, q), (f, h), (h, f)]
    fused = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)]
    return list(dict.fromkeys(plain)), list(dict.fromkeys(fused))


def weight(n: int, k: int, group: int, rows: int, gen):
    """A random int4 weight on the GPU (random bytes are random codes and zero points)."""
    import torch

    from memfit.kernels.weights import IntWeight, tile
    ng = -(-k // group)
    dev = "cuda"
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8, device=dev)
    zero = torch.randint(0, 256, (n, -(-ng // 2)), generator=gen, dtype=torch.uint8, device=dev)
    scale = (torch.rand(n, ng, generator=gen, device=dev) * 0.01 + 1e-3).half()
    w = IntWeight(q, scale, zero, (n, k), 4, group, "int")
    return tile(w, rows) if rows else w


def collect(a) -> None:
    import torch
    import triton

    from memfit.kernels import choices, triton_int
    jobs = []  # (M, shape, group, tile rows): every family's M = 1 first, then larger M
    for m in a.ms:
        for g in a.groups:
            for fam in a.families:
                plain, fused = shapes(fam)
                jobs += [(m, s, g, 0) for s in plain if a.min_rows <= s[0] <= a.max_rows]
                if m == 1 or m > 16:  # the loop tiles at batch 1 (its prefill runs on them too)
                    jobs += [(m, s, g, 64) for s in fused
                             if a.min_rows <= s[0] <= a.max_rows]
    out = {"device": torch.cuda.get_device_name(), "device_key": choices.device_key(
               torch.device("cuda")), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "entries": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    t_start = time.perf_counter()
    seen = set()
    for m, (n, k), g, rows in jobs:
        if time.perf_counter() - t_start > a.budget_s:
            out["stopped"] = f"budget of {a.budget_s} s spent"
            break
        w = weight(n, k, g, rows, gen)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        key = triton_int.choice_key(x, w)
        if key in seen:
            continue
        seen.add(key)
        t = time.perf_counter()
        triton_int.choose(x, w, None)
        timed = triton_int.TIMES.get(key, [])
        out["entries"][choices.shape_key(key)] = {
            "seconds": round(time.perf_counter() - t, 2),
            "candidates": len(triton_int.candidates(m, w, x.dtype)),
            "timed": [[us, asdict(c)] for us, c in timed]}
        best = timed[0][0] if timed else None
        print(f"{choices.shape_key(key)}: {len(timed)} timed, best {best} µs, "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        del w, x
        Path(a.json).write_text(json.dumps(out, indent=1))
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    Path(a.json).write_text(json.dumps(out, indent=1))


def build(a) -> None:
    """The shipped table: per key the best launch shape and up to top - 1 others within margin."""
    table: dict = {}
    about = []
    if a.onto:
        old = json.loads(Path(a.onto).read_text())
        table, about = old["arch"], list(old["measured"])
    for src in a.build:
        data = json.loads(Path(src).read_text())
        arch = data["device_key"].split(" | ")[0].split(" ")[-2]  # "sm90"
        about.append(f"{data['device']} ({arch}), torch {data['torch']}, Triton "
                     f"{data['triton']}, {data['date']}: {len(data['entries'])} keys")
        for key, e in data["entries"].items():
            timed = e["timed"]
            if not timed:
                continue
            best = timed[0][0]
            keep = [cfg for us, cfg in timed[:a.top] if us <= best * (1 + a.margin)]
            table.setdefault(arch, {})[key] = {"best_us": best, "of": len(timed),
                                               "configs": keep}
    note = ("memfit's int4 chooser, full search per key (benchmarks/choice_table.py); "
            f"kept: the best and up to {a.top - 1} others within {a.margin:.0%} of it")
    archs = [f"{json.dumps(arch)}: {{\n" + ",\n".join(
                 f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(keys.items()))
             + "\n}" for arch, keys in sorted(table.items())]  # one key a line: readable diffs
    text = (f'{{"about": {json.dumps(note)},\n"measured": {json.dumps(about)},\n"arch": {{\n'
            + ",\n".join(archs) + "\n}}\n")
    json.loads(text)
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"{out}: {sum(len(v) for v in table.values())} keys")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="collect: where to write every candidate's time")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--build", nargs="+", help="collected JSON files -> the shipped table")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.15)
    ap.add_argument("--out", default=str(TABLE), help="--build: the table to write")
    ap.add_argument("--onto", help="--build: a built table whose keys the files' keys replace")
    ap.add_argument("--max-rows", type=int, default=1 << 30,
                    help="collect: only layer shapes of at most this many rows")
    ap.add_argument("--min-rows", type=int, default=0,
                    help="collect: only layer shapes of at least this many rows")
    a = ap.parse_args()
    if a.build:
        build(a)
    elif a.json:
        collect(a)
    else:
        ap.error("give --json OUT (collect on a GPU) or --build FILES (make the table)")


if __name__ == "__main__":
    main()
