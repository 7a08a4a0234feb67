"""The calibration windows memfit's w4g64-awq preset uses (its Calib defaults: builtin:calib,
64 x 512, seed 0), written for benchmarks/peers/llmc_run.py: python calib.py OUT.safetensors"""
import sys

from safetensors.torch import save_file

from memfit.calib.data import calibration_windows
from memfit.models import load_model
from memfit.recipe import PRESETS

m = load_model("default")
ids = calibration_windows(m.tokenizer, PRESETS["w4g64-awq"].calib)
save_file({"input_ids": ids.contiguous()}, sys.argv[1])
print(sys.argv[1], tuple(ids.shape), m.source)
