"""Logits of a GGUF export as transformers loads it vs the memfit model it came from, on the first
`--windows` windows of builtin:eval (512 tokens, BOS as `memfit eval` decides: the 4k-window protocol of RESULTS.md).

    OMP_NUM_THREADS=1 python benchmarks/gguf_logits.py default /tmp/default-Q8_0.gguf

Prints one JSON line: max and mean |logit difference|, the logits' range, greedy agreement.
"""

from __future__ import annotations

import argparse
import json

import torch

import memfit
from memfit.calib.data import token_windows


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="the model the GGUF was exported from (e.g. default)")
    p.add_argument("gguf", help="the exported .gguf (loaded through transformers' GGUF loader)")
    p.add_argument("--windows", type=int, default=8)
    a = p.parse_args()
    ref = memfit.load_model(a.source)
    other = memfit.load_model(a.gguf)
    ids = token_windows(ref.tokenizer, "builtin", "eval", seq_len=512, max_windows=a.windows,
                        bos="auto")
    worst = total = agree = n = 0.0
    lo, hi = float("inf"), float("-inf")
    for w in ids:
        x, y = ref.model(w[None]).logits.float(), other.model(w[None]).logits.float()
        d = (x - y).abs()
        worst, total, n = max(worst, float(d.max())), total + float(d.sum()), n + d.numel()
        agree += float((x.argmax(-1) == y.argmax(-1)).float().sum())
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    print(json.dumps({"source": a.source, "gguf": a.gguf, "windows": len(ids),
                      "max_abs_diff": worst, "mean_abs_diff": total / n,
                      "logit_range": [lo, hi], "greedy_agreement": agree / (len(ids) * 512)}))


if __name__ == "__main__":
    main()
