"""Mixture-of-experts compression on real text: the embedded model upcycled into a Mixtral.

No mixture-of-experts checkpoint can be downloaded here, so this builds one whose function is
known: every block's MLP of the embedded SmolLM2-135M copied into E experts (sparse
upcycling), a random router picking k of them per token. Mixtral's top-k weights sum to 1 and
the experts are equal, so the upcycled model computes the dense model's function (checked:
its perplexity is printed beside the dense one), while each expert's calibration statistics
come only from the tokens routed to it (about k/E of them). Then the same recipes run through
`memfit compress` and `memfit eval` on both models: the gap between the two compressed
perplexities is what per-expert calibration costs (or gains), on the same function.

    python benchmarks/moe.py [--experts 4] [--top-k 2] [--presets w4g64-gptq w3g64-gptq ...]
                             [--samples 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import families


def upcycle(out: Path, experts: int, top_k: int, seed: int = 0) -> None:
    """The embedded model as a Mixtral with `experts` copies of each MLP, saved to `out`."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from memfit.models import load_model

    dense = load_model("default", dtype=torch.float32)
    c = dense.model.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None)
    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in dense.model.state_dict().items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(dense.model.model.layers):
        p = f"model.layers.{i}.mlp"
        gu = torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight]).detach()
        state[f"{p}.experts.gate_up_proj"] = gu.expand(experts, *gu.shape).clone()
        down = block.mlp.down_proj.weight.detach()
        state[f"{p}.experts.down_proj"] = down.expand(experts, *down.shape).clone()
        state[f"{p}.gate.weight"] = torch.randn(experts, c.hidden_size, generator=gen) * 0.05
    moe.load_state_dict(state, strict=False, assign=True)
    moe.tie_weights()
    moe.generation_config = dense.model.generation_config
    moe.save_pretrained(out)
    dense.tokenizer.save_pretrained(out)


def memfit(*args: str) -> tuple[int, str, float]:
    """benchmarks/families.py's CLI call, and its wall seconds."""
    t0 = time.perf_counter()
    rc, text = families.memfit(*args, timeout=None)  # a large GPTQ run takes its time
    return rc, text, time.perf_counter() - t0


def figures(text: str) -> dict:
    out = {}
    for key, pat in (("ppl", r"perplexity\s+([0-9.]+)"), ("kld", r"KLD ([0-9.]+)"),
                     ("top1", r"top-1 agreement ([0-9.]+)%"),
                     ("ref_ppl", r"reference perplexity ([0-9.]+)")):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--presets", nargs="*", default=["w4g64-gptq", "w3g64-gptq", "wanda-50"])
    ap.add_argument("--samples", default="64")
    ap.add_argument("--eval-tokens", default="32768")
    ap.add_argument("--work", help="keep the folders here (default: a temporary folder)")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        moe = work / f"smollm2-moe{a.experts}x{a.top_k}"
        if not (moe / "config.json").exists():
            upcycle(moe, a.experts, a.top_k)
        ev = ["--max-tokens", a.eval_tokens]
        rc, text, _ = memfit("eval", str(moe), "--ref", "default", *ev)
        base = {"model": "upcycled", "recipe": "none", **figures(text)}
        print(json.dumps(base), flush=True)
        rows.append(base)
        for preset in a.presets:
            for name, src in (("dense", "default"), ("upcycled", str(moe))):
                out = work / f"{name}-{preset}"
                rc, text, secs = memfit("compress", src, "--recipe", preset, "--out", str(out),
                                        "--samples", a.samples, "--overwrite")
                row = {"model": name, "recipe": preset, "compress_rc": rc,
                       "compress_s": round(secs, 1)}
                m = re.search(r"peak RSS ([0-9.]+) GB", text)
                row["compress_peak_rss_gb"] = float(m.group(1)) if m else None
                if rc == 0:
                    row.update(figures(memfit("eval", str(out), "--ref", "default", *ev)[1]))
                else:
                    row["error"] = text.strip().splitlines()[-1]
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
