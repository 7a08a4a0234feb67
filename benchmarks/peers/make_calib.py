"""Make a calibration file (tensor 'input_ids', int64, (n_windows, seq_len)) from
CPython's pydoc_data.topics text, tokenized with the model's tokenizer.
Windows are consecutive, non-overlapping slices of one token stream (no BOS added).

    python benchmarks/peers/make_calib.py --model DIR --out FILE.safetensors [--n 16] [--seq-len 512]
"""
import argparse

import torch
from pydoc_data import topics
from safetensors.torch import save_file
from transformers import AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--offset", type=int, default=0, help="first window index (skip offset windows)")
    a = ap.parse_args()
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = (a.offset + a.n) * a.seq_len
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens, need {need}")
    t = torch.tensor(ids[a.offset * a.seq_len: need], dtype=torch.int64).view(a.n, a.seq_len)
    save_file({"input_ids": t.contiguous()}, a.out)
    print(f"{a.out}: {tuple(t.shape)} from {len(ids)} tokens")


if __name__ == "__main__":
    main()
