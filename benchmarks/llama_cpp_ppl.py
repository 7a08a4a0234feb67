"""llama.cpp's own perplexity of a GGUF file on memfit's evaluation windows.

Two steps, because llama-cpp-python lives in its own virtual environment (no torch, no memfit):

    python benchmarks/llama_cpp_ppl.py ids eval_ids.json                      # memfit's venv
    OMP_NUM_THREADS=1 /tmp/llamavenv/bin/python benchmarks/llama_cpp_ppl.py ppl model.gguf eval_ids.json

`ids` writes the token ids of the first `--windows` windows of builtin:eval (512 tokens, BOS as
`memfit eval` decides: the 4k-window protocol of benchmarks/RESULTS.md) from the default model's
tokenizer. `ppl` runs each window in a fresh llama.cpp context (n_ctx = the window), takes the
logits of every position and prints one JSON line: windows, scored tokens (every position but
the first of each window, as memfit scores them) and perplexity. `memfit` scores the same ids
with any model memfit loads (a compressed folder, the GGUF itself through memfit's loader), the
same way, so the two perplexities differ only by what computed the logits.

    python benchmarks/llama_cpp_ppl.py memfit MODEL eval_ids.json                # memfit's venv
"""

from __future__ import annotations

import argparse
import json
import math


def write_ids(out: str, windows: int) -> None:
    import memfit
    from memfit.calib.data import token_windows

    tok = memfit.load_model("default").tokenizer
    ids = token_windows(tok, "builtin", "eval", seq_len=512, max_windows=windows, bos="auto")
    with open(out, "w") as f:
        json.dump([w.tolist() for w in ids], f)


def perplexity(gguf: str, ids_file: str, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    with open(ids_file) as f:
        wins = json.load(f)
    llm = Llama(model_path=gguf, n_ctx=max(map(len, wins)), logits_all=True, n_threads=threads,
                verbose=False)
    nll, n = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[:len(w)], dtype=np.float64)  # (T, vocab)
        top = logits.max(1)
        lse = np.log(np.exp(logits - top[:, None]).sum(1)) + top
        nll -= float((logits[np.arange(len(w) - 1), w[1:]] - lse[:-1]).sum())
        n += len(w) - 1
    return {"gguf": gguf, "windows": len(wins), "tokens": n, "perplexity": math.exp(nll / n)}


def memfit_perplexity(spec: str, ids_file: str) -> dict:
    """The same windows and scoring as `perplexity`, with memfit's model in float32."""
    import torch

    import memfit

    with open(ids_file) as f:
        wins = json.load(f)
    model = memfit.load_model(spec, dtype="float32").model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(torch.tensor([w])).logits[0, :-1].double()
            target = torch.tensor(w[1:])
            nll -= float(logits.log_softmax(-1)[torch.arange(len(target)), target].sum())
            n += len(target)
    return {"model": spec, "windows": len(wins), "tokens": n, "perplexity": math.exp(nll / n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("ids", help="write memfit's evaluation windows as token ids (memfit's venv)")
    i.add_argument("out")
    i.add_argument("--windows", type=int, default=8)
    q = sub.add_parser("ppl", help="llama.cpp's perplexity of a GGUF on those ids")
    q.add_argument("gguf")
    q.add_argument("ids")
    q.add_argument("--threads", type=int, default=1)
    m = sub.add_parser("memfit", help="memfit's perplexity of any model it loads on those ids")
    m.add_argument("model")
    m.add_argument("ids")
    a = p.parse_args()
    if a.cmd == "ids":
        write_ids(a.out, a.windows)
    elif a.cmd == "memfit":
        print(json.dumps(memfit_perplexity(a.model, a.ids)))
    else:
        print(json.dumps(perplexity(a.gguf, a.ids, a.threads)))


if __name__ == "__main__":
    main()
