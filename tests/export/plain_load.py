"""Run as a script, never imported by memfit's tests: load folders with plain transformers (and
the compressed-tensors package) in a process that never imports memfit, and write their logits,
greedy continuations and one dequantized weight to a safetensors file.

    python plain_load.py '{"folders": [...], "inputs": "in.safetensors", "out": "out.safetensors",
                           "new_tokens": 64, "weight": "model.layers.0.self_attn.q_proj",
                           "use_cache": true}'

`"experts": "model.layers.0.mlp.experts"` also writes a mixture's fused gate_up_proj / down_proj.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    spec = json.loads(sys.argv[1])
    inputs = load_file(spec["inputs"])
    out = {}
    for i, folder in enumerate(spec["folders"]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out[f"logits{i}"] = model(inputs["ids"]).logits.float().contiguous()
            if spec.get("new_tokens"):
                n = spec["new_tokens"]
                out[f"greedy{i}"] = model.generate(
                    inputs["prompt"], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    attention_mask=torch.ones_like(inputs["prompt"]),
                    use_cache=spec.get("use_cache", True))
        if spec.get("weight"):
            out[f"weight{i}"] = model.get_submodule(spec["weight"]).weight.detach().float().clone()
        if spec.get("experts"):  # a mixture's fused experts module: its two 3-D tensors
            ex = model.get_submodule(spec["experts"])
            for t in ("gate_up_proj", "down_proj"):
                out[f"{t}{i}"] = getattr(ex, t).detach().float().contiguous().clone()
    assert "memfit" not in sys.modules, "the plain-transformers process imported memfit"
    save_file(out, spec["out"])


if __name__ == "__main__":
    main()
