"""Every model family in memfit.archs through the CLI, on tiny random models (this CPU, no
network): a folder per family (tests/conftest.py's tiny configs, the embedded encoder's
tokenizer), then `memfit compress` with a few presets, `memfit eval --ref` (KL divergence and
top-1 agreement for decoders, embedding cosine for encoders), `memfit generate` (decoders) and
`memfit inspect`. Prints one row per family: each command's exit code (0 ok, 2 a one-line
refusal) and the eval figure. Random weights: it checks that the paths run and refuse cleanly,
it says nothing about quality.

    python benchmarks/families.py [--families granite opt ...] [--presets w4g64-gptq ...]
                                  [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import save_tiny, save_tiny_encoder  # noqa: E402

DECODERS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 16}, "phi": {}, "phi3": {},
    "gpt_neox": {}, "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4}, "granite": {},
    "stablelm": {}, "olmo2": {}, "starcoder2": {}, "cohere": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    # mixture of experts (memfit.moe): 8 experts, 2 a token; Qwen2-MoE with a dense block
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "head_dim": 16},
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                    "first_k_dense_replace": 1, "n_shared_experts": 1, "kv_lora_rank": 64,
                    "q_lora_rank": 64, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
}
ENCODERS = {"bert": {}, "roberta": {}, "mpnet": {}, "distilbert": {"hidden_dim": 128},
            "deberta-v2": {}, "modernbert": {"cls_token_id": 101, "sep_token_id": 102},
            "nomic_bert": {}}
PRESETS = ["w4g64-gptq", "w4g64-awq", "wanda-50", "wsvd-80", "w8a8-sq"]


def memfit(*args: str, timeout: float | None = 900) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "memfit", *args], capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="*", default=list(DECODERS) + list(ENCODERS))
    ap.add_argument("--presets", nargs="*", default=PRESETS)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in a.families:
            enc = fam in ENCODERS
            src = Path(tmp) / fam
            if enc:
                save_tiny_encoder(src, fam, **ENCODERS[fam])
            else:
                save_tiny(src, fam, hidden_size=128, **DECODERS[fam])
            row = {"family": fam, "kind": "encoder" if enc else "decoder"}
            for preset in a.presets:
                out = Path(tmp) / f"{fam}-{preset}"
                rc, text = memfit("compress", str(src), "--recipe", preset, "--out", str(out),
                                  "--samples", "8", *([] if enc else ["--seq-len", "64"]))
                row[preset] = rc if rc in (0, 2) else f"{rc}: {text.strip().splitlines()[-1]}"
            first = Path(tmp) / f"{fam}-{a.presets[0]}"
            rc, text = memfit("eval", str(first), "--ref", str(src),
                              *([] if enc else ["--seq-len", "64", "--max-tokens", "512"]))
            row["eval"] = rc
            m = re.search(r"cosine\s+mean ([0-9.]+)" if enc else
                          r"KLD ([0-9.]+), top-1 agreement ([0-9.]+)%", text)
            row["figure"] = m.group(0) if m else ""
            if not enc:
                row["generate"] = memfit("generate", str(first), "--max-new-tokens", "5",
                                         "--prompt", "hello there")[0]
            row["inspect"] = memfit("inspect", str(first))[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
