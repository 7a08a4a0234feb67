"""Run by test_checkpointing in a fresh process (not a test module): one forward and backward of
a random Llama (hidden 128, 4 blocks, vocabulary 512) with one AC mode; prints JSON with the peak
RSS above the RSS just before the forward, and the predicted activation bytes.

usage: ac_probe.py none|full|selective
"""

import json
import sys

import torch


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.eval.memory import rss_peak_bytes
    from memfit.train.engine import Objective, apply_checkpointing_
    from memfit.train.loop import rss_now
    from memfit.train.memory import activation_bytes, model_shape

    ac = sys.argv[1]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=128, intermediate_size=512,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg).train()
    shape = model_shape(model)
    apply_checkpointing_(model, ac)
    ids = torch.randint(0, 512, (4, 1024))
    obj = Objective(model)
    torch.manual_seed(1)  # warm-up on a short input: kernels and allocator, not the measurement
    obj(ids[:, :16]).backward()
    model.zero_grad(set_to_none=False)
    before = rss_now()
    obj(ids).backward()
    peak = rss_peak_bytes()
    print(json.dumps({"ac": ac, "measured": peak - before,
                      "predicted": activation_bytes(shape, batch=4, seq_len=1024, ac=ac,
                                                    compute_bytes=4)}))


if __name__ == "__main__":
    main()
