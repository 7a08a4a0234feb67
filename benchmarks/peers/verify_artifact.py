"""Check that OUT/dense equals the decompressed OUT/artifact (run with /work/venv-peer/bin/python):
    python benchmarks/peers/verify_artifact.py OUT/artifact OUT/dense
"""
import sys, torch
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig
from safetensors.torch import load_file
art, dense = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
sd = m.state_dict(); d = load_file(dense + "/model.safetensors")
mx = 0.0; n = 0
for k, v in d.items():
    if k in sd and sd[k].shape == v.shape:
        mx = max(mx, float((sd[k].float() - v).abs().max())); n += 1
    else:
        print("missing/shape", k, k in sd)
print("compared", n, "max abs diff", mx)
