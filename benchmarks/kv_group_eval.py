"""Perplexity of a model with memfit's quantized KV cache at a chosen key/value group (the CLI's
--kv int4 uses group 64), same protocol as `memfit eval --seq-len 2048 --max-tokens 16384 --kv int4
--json` (builtin:eval, 64 tokens per forward through the quantized cache, 128 recent tokens
dense). Prints the eval JSON with kv_bits, kv_group and wall_s added; group 0 = the model's own
cache.

    python benchmarks/kv_group_eval.py BITS GROUP [MODEL]
"""
import json
import sys
import time

import memfit.eval.run as R
from memfit.kvcache import KVFormat

bits, g = int(sys.argv[1]), int(sys.argv[2])
model = sys.argv[3] if len(sys.argv) > 3 else "default"
R.kv_format = lambda name: None if name is None else KVFormat(bits, g, 128)
t = time.time()
res = R.run_eval(model, seq_len=2048, max_tokens=16384, kv=f"int{bits}" if g else None,
                 progress=False)
res.update(kv_bits=bits, kv_group=g, wall_s=time.time() - t)
print(json.dumps(res))
