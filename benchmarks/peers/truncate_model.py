"""Keep only the first N decoder layers of a local HF llama-style folder (fast test fixture).
    python benchmarks/peers/truncate_model.py SRC DST --layers 2
"""
import argparse, json, os, re, shutil
from safetensors.torch import load_file, save_file

ap = argparse.ArgumentParser(); ap.add_argument("src"); ap.add_argument("dst"); ap.add_argument("--layers", type=int, default=2)
a = ap.parse_args()
os.makedirs(a.dst, exist_ok=True)
sd = load_file(os.path.join(a.src, "model.safetensors"))
keep = {k: v for k, v in sd.items() if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < a.layers}
save_file(keep, os.path.join(a.dst, "model.safetensors"), metadata={"format": "pt"})
for fn in os.listdir(a.src):
    if not fn.endswith(".safetensors"):
        shutil.copy2(os.path.join(a.src, fn), os.path.join(a.dst, fn))
cfg = json.load(open(os.path.join(a.dst, "config.json"))); cfg["num_hidden_layers"] = a.layers
json.dump(cfg, open(os.path.join(a.dst, "config.json"), "w"), indent=2)
print(a.dst, len(keep), "tensors")
