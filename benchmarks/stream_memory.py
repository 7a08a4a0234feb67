"""Issue 13 part 0: compress a model whose weights exceed the memory the process is given.

Writes a random-weight Llama (float32 safetensors shards) to --dir once, then runs
`compress_to(..., w4g64)` in fresh processes:

1. streamed (`low_memory=True`) under RLIMIT_AS = --limit-gib (the address space, which bounds
   the resident memory too; stricter than a resident-memory limit because torch, the tokenizer
   and glibc reserve address space they never touch);
2. the normal path without a limit (the reference artifact);
3. the normal path under the same limit (expected to fail: it loads the whole model).

Each prints its peak RSS (VmHWM), peak address space (VmPeak) and wall time; the script
compares the streamed folder with the reference byte for byte and prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/stream_memory.py --dir /tmp/memfit-big --limit-gib 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_RUN = """
import json, sys, time
from memfit.compress import CompressOptions, compress_to
import memfit.stream, memfit.api, transformers.models.llama.modeling_llama
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
src, out, low, recipe = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
t0 = time.perf_counter()
rep = compress_to(src, recipe, out, CompressOptions(low_memory=low, format="memfit",
                  overwrite=True, progress=False))
print(json.dumps({"seconds": time.perf_counter() - t0, "hwm": status("VmHWM"),
                  "vmpeak": status("VmPeak"), "kld": rep["smoke"]["kld"],
                  "artifact": rep["artifact_bytes"]}))
"""


def make_model(folder: Path, layers: int, hidden: int, intermediate: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memfit.models import resolve

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
        max_position_embeddings=2048, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, max_shard_size="500MB")
    AutoTokenizer.from_pretrained(resolve("default-encoder")[1]).save_pretrained(folder)


def run(src: Path, out: Path, low: bool, recipe: str, limit: int | None) -> dict:
    # (TOKENIZERS_PARALLELISM=false is left out: with it set, the address space grew by 3 GiB
    # at the model's build, measured with VmSize; glibc arenas capped at 2 per process)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}

    def cap():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, str(src), str(out), "1" if low else "0",
                           recipe], capture_output=True, text=True, env=env, preexec_fn=cap)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": tail[:160], "seconds": time.perf_counter() - t0}
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_folder(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(_same_file(a / n, b / n) for n in names)


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/memfit-big", help="model folder (default /tmp/memfit-big)")
    p.add_argument("--layers", type=int, default=48, help="blocks (default 48)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--intermediate", type=int, default=4096, help="MLP width (default 4096)")
    p.add_argument("--limit-gib", type=float, default=1.5, help="RLIMIT_AS of the limited runs "
                   "(default 1.5)")
    p.add_argument("--recipe", default="w4g64", help="recipe (default w4g64)")
    p.add_argument("--keep", action="store_true", help="keep the model and the outputs")
    a = p.parse_args()
    src = Path(a.dir)
    make_model(src, a.layers, a.hidden, a.intermediate)
    import torch

    from memfit.io.stream import CheckpointIndex

    weights = CheckpointIndex(src).nbytes(torch.float32)
    limit = int(a.limit_gib * 2**30)
    outs = {k: src.with_name(f"{src.name}-{k}") for k in ("stream", "normal", "normal-limited")}
    rows = {"streamed, limited": run(src, outs["stream"], True, a.recipe, limit),
            "normal, unlimited": run(src, outs["normal"], False, a.recipe, None),
            "normal, limited": run(src, outs["normal-limited"], False, a.recipe, limit)}
    identical = "stream" in outs and (outs["stream"] / "config.json").exists() and \
        same_folder(outs["stream"], outs["normal"])
    print(f"fp32 weights {weights / 2**30:.3f} GiB, RLIMIT_AS {limit / 2**30:.2f} GiB "
          f"(weights / limit = {weights / limit:.2f}); streamed folder byte-identical to the "
          f"normal one: {identical}")
    print("| run | peak RSS (VmHWM) | peak address space (VmPeak) | wall s | smoke KLD |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        if "failed" in r:
            print(f"| {name} | failed after {r['seconds']:.1f} s: {r['failed']} | | | |")
        else:
            print(f"| {name} | {r['hwm'] / 2**30:.3f} GiB | {r['vmpeak'] / 2**30:.3f} GiB | "
                  f"{r['seconds']:.1f} | {r['kld']:.5f} |")
    print(json.dumps({"weights": weights, "limit": limit, "identical": identical, "runs": rows}))
    if not a.keep:
        for path in (src, *outs.values()):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
