"""Tiny random Llama models (dense or RTN-quantized into memfit QuantLinear) for the TP tests;
imported by the test files and by the torchrun worker."""

import torch
from torch import nn

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear

# name -> config overrides. "gqa_uneven": 3 KV heads (3 query heads each) on 2 ranks -> 2 + 1.
CONFIGS = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "gqa_uneven": {"hidden_size": 144, "intermediate_size": 192, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "head_dim": 16},
}
FORMATS = {
    "dense": None,
    "int4": IntFormat(bits=4, group_size=16),
    "int8": IntFormat(bits=8, group_size=None, symmetric=True),
}


MOE = {  # mixtures of experts: 4 experts, top 2; Qwen2-MoE with a shared expert and a dense block
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]},
}


def tiny_moe(family: str, seed: int = 0):
    """A tiny random mixture of experts, its experts as memfit's per-expert linears, weights
    spread so every expert gets tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.moe import unfuse_experts_

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, vocab_size=256, num_hidden_layers=2,
                               max_position_embeddings=256, hidden_size=64,
                               intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, **MOE[family])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    unfuse_experts_(model)
    return model


def tiny_llama(config: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, num_hidden_layers=2, max_position_embeddings=256,
                      initializer_range=0.1, **CONFIGS[config])
    return LlamaForCausalLM(cfg).eval()


def rtn_quant_linear(linear: nn.Linear, fmt: IntFormat) -> QuantLinear:
    w = linear.weight.detach()
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    codes = grid.quantize(w, scale, zero, fmt)
    return QuantLinear.from_linear(linear, codes, scale, None if fmt.symmetric else zero, fmt)


def quantize_blocks_(model: nn.Module, fmt: IntFormat | None) -> nn.Module:
    """Replace every linear inside the blocks by its RTN QuantLinear (lm_head stays dense)."""
    if fmt is None:
        return model
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if type(m) is nn.Linear:
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent), attr, rtn_quant_linear(m, fmt))
    return model
