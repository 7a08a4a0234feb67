"""What a GGUF file of each decoder family holds beyond its tensors, both ways.

Writing (memfit.io.export_gguf): the GGUF architecture a transformers family is written as,
whether q/k rows move into llama.cpp's interleaved rotary layout (the `llama` architecture's
NORM rotary; Qwen's NEOX rotary reads transformers' layout as it is), which linears may carry
biases, the metadata llama.cpp reads (head and expert sizes, rope scaling), the `rope_freqs`
tensor of Llama 3.1-style rope scaling, and the refusals where llama.cpp would compute another
function (a dense MLP block inside a Qwen mixture of experts, top-k weights normalized where
llama.cpp does not, or the other way round). Mixtral is written as llama.cpp writes it: the
`llama` architecture with `expert_count` set.

A mixture of experts' per-expert linears (memfit.moe: `mlp.experts.3.gate_proj`) are one 3-D
GGUF tensor per projection, experts first (`blk.N.ffn_gate_exps`), the router `ffn_gate_inp`,
Qwen2-MoE's shared expert `ffn_*_shexp` and its sigmoid gate `ffn_gate_inp_shexp` (a vector).

Reading (memfit.io.stream.convert_gguf): transformers' GGUF loader drops metadata it has no key
for, so a Qwen3 whose head_dim is not hidden / heads, a Qwen-MoE whose expert sizes are not the
config class's defaults, or any Mixtral (the `llama` architecture with experts) would be built
with the wrong shapes, and a Gemma 2 or Phi-3 whose soft-capping, query scale, partial rotary
or sliding window are not the class defaults with another function. `gguf_config` reads those
fields itself; `processor` undoes a Mixtral's rotary permutation and stacks its experts as
transformers' Mixtral holds them, from stacked tensors or from llama.cpp's first Mixtral
layout (one tensor per expert, `blk.N.ffn_gate.E`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from memfit.errors import UserError


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF general.architecture
    rotary_rows: bool  # q/k rows permuted into llama.cpp's interleaved rotary layout
    biases: tuple[str, ...] = ()  # linears (last name part) that may carry a bias
    moe: bool = False
    norm_plus_one: bool = False  # Gemma's norms scale by 1 + w; llama.cpp stores 1 + w


_QKV = ("q_proj", "k_proj", "v_proj")
FAMILIES = {
    "llama": Family("llama", True),
    "mistral": Family("llama", True),
    "mixtral": Family("llama", True, moe=True),
    "qwen2": Family("qwen2", False, _QKV),
    "qwen3": Family("qwen3", False),
    "qwen2_moe": Family("qwen2moe", False, _QKV, moe=True),
    "qwen3_moe": Family("qwen3moe", False, moe=True),
    "phi3": Family("phi3", False),  # fused qkv_proj / gate_up_proj: llama.cpp's attn_qkv / ffn_up
    "gemma2": Family("gemma2", False, norm_plus_one=True),
    "gemma3_text": Family("gemma3", False, norm_plus_one=True),
}
# llama.cpp's top-k weights per architecture: renormalized to sum 1 (True) or not
_NORM_TOPK = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}
_GEMMA = {"gemma2": (2, 46), "gemma3": (6, 62)}  # arch -> (sliding pattern, 27B's layers)
_EXPERT = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def family(config) -> Family:
    """The GGUF family of a transformers config, or a one-line refusal naming the ones there are."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UserError(f"GGUF export supports {', '.join(FAMILIES)} models, not {kind!r}; "
                        "nothing written")
    return FAMILIES[kind]


def check(model, fam: Family) -> None:
    """Refuse (nothing written) what llama.cpp would compute differently from the model."""
    config = model.config
    for name, p in model.named_parameters():
        if name.endswith(".bias") and name.rpartition(".")[0].rpartition(".")[2] not in fam.biases:
            raise UserError(f"GGUF export of {config.model_type} with a bias in "
                            f"{name.rpartition('.')[0]} is not supported (llama.cpp's "
                            f"{fam.arch} has none there); nothing written")
    rope_type(config)
    if fam.arch in _GEMMA:
        _check_gemma(config, fam.arch)
    if not fam.moe:
        return
    kind = config.model_type
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise UserError(f"GGUF export of {kind} with dense MLP blocks among the expert blocks "
                        "(mlp_only_layers / decoder_sparse_step) is not supported: llama.cpp's "
                        f"{fam.arch} has experts in every block; nothing written")
    want = _NORM_TOPK[kind]
    if kind != "mixtral" and bool(getattr(config, "norm_topk_prob", want)) != want:
        raise UserError(f"GGUF export of {kind} with norm_topk_prob={not want} is not "
                        f"supported: llama.cpp's {fam.arch} {'re' if want else 'does not re'}"
                        "normalize the top-k weights; nothing written")


def _query_scale(config, arch: str) -> float:
    """The query scaling llama.cpp's Gemma applies: head_dim, or hidden / heads for the 27B
    model (told by its layer count); query_pre_attn_scalar itself is not in the file."""
    if config.num_hidden_layers == _GEMMA[arch][1]:
        return config.hidden_size // config.num_attention_heads
    return head_dim(config)


def _check_gemma(config, arch: str) -> None:
    every = _GEMMA[arch][0]
    kinds = getattr(config, "layer_types", None)
    pattern = ["sliding_attention" if i % every < every - 1 else "full_attention"
               for i in range(config.num_hidden_layers)]
    if kinds is not None and list(kinds) != pattern:
        raise UserError(f"GGUF export of {arch} with layer_types other than a full-attention "
                        f"layer every {every} is not supported (llama.cpp's {arch} fixes that "
                        "pattern); nothing written")
    if config.query_pre_attn_scalar != _query_scale(config, arch):
        raise UserError(f"GGUF export of {arch} with query_pre_attn_scalar "
                        f"{config.query_pre_attn_scalar} is not supported: llama.cpp's {arch} "
                        f"scales queries by {_query_scale(config, arch)} for this shape; "
                        "nothing written")
    if not getattr(config, "tie_word_embeddings", True):
        raise UserError(f"GGUF export of {arch} with an untied head is not supported (llama.cpp "
                        "reads the embedding table as the head); nothing written")
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local is not None and local.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export of {arch} with scaled rope on its sliding layers "
                        f"({local}) is not supported (llama.cpp's gemma3 uses plain rope there); "
                        "nothing written")


def caveats(config, fam: Family) -> list[str]:
    """What the file computes differently from the model without being refused: llama.cpp's
    `llama`, `phi3` and Qwen architectures attend to the whole context, a sliding window beyond it
    is lost (the function is the same up to the window's length; llama-cpp-python 0.3.36's phi3
    checked). Gemma's windows are written and kept."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    slides = "sliding_attention" in kinds if kinds is not None else \
        bool(window) and window < config.max_position_embeddings
    if window and slides and fam.arch not in _GEMMA:
        return [(f"llama.cpp's {fam.arch} attends to the whole context: beyond {window} tokens "
                 "it computes another function than this model's sliding window")]
    return []


def _rope(config) -> dict:
    """The rope parameters of the (full-attention) layers: Gemma 3 keeps one dict per layer kind."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope)


def rope_type(config) -> str:
    """The config's rope scaling kind if GGUF can carry it (default, linear, llama3), else a
    one-line refusal."""
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export of rope scaling {kind!r} is not supported (memfit writes "
                        "default, linear and llama3 rope); nothing written")
    return kind


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def metadata(writer, config, fam: Family) -> None:
    """The hyperparameters llama.cpp and transformers read, under `fam.arch`'s keys."""
    d = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    rope = _rope(config)
    writer.add_rope_dimension_count(int(d * rope.get("partial_rotary_factor", 1.0)))
    if d != config.hidden_size // config.num_attention_heads or \
            fam.arch.startswith(("qwen3", "gemma")):
        writer.add_key_length(d)
        writer.add_value_length(d)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    if rope_type(config) == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None) and fam.arch in _GEMMA:
        writer.add_sliding_window(config.sliding_window)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local is not None:  # Gemma 3's sliding layers' own base
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if fam.arch == "gemma2":  # gemma3 has none
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    if fam.moe:
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def extra_tensors(config) -> list[tuple[str, np.ndarray]]:
    """Tensors no module holds: Llama 3.1-style rope scaling as llama.cpp's `rope_freqs`, the
    divisor of each rotary frequency (transformers' own llama3 frequencies against the plain
    ones)."""
    if rope_type(config) != "llama3":
        return []
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = head_dim(config)
    theta = config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return [("rope_freqs.weight", (plain / scaled.float()).numpy().astype(np.float32))]


def expert_key(key: str) -> tuple[str, int] | None:
    """`...mlp.experts.3.gate_proj.weight` -> (`...mlp.experts.gate_proj.weight`, 3), the name
    gguf's name map knows for the stacked tensor; None for any other key."""
    m = _EXPERT.match(key)
    return (f"{m['pre']}.{m['proj']}.weight", int(m["e"])) if m else None


# ---- reading ---------------------------------------------------------------------------------

def gguf_config(reader, config):
    """`config` as transformers built it from the GGUF `reader` reads, with what its loader leaves
    out: attention.key_length (head_dim), the experts' sizes, and a `llama` file with experts as
    the Mixtral it is. -> the config to build the model from."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    arch = read_field(reader, "general.architecture")[0]

    def field(key):
        v = read_field(reader, f"{arch}.{key}")
        return int(v[0]) if v else None

    experts = field("expert_count")
    if arch == "llama" and experts:
        from transformers import MixtralConfig

        kw = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version")}
        config = MixtralConfig(**kw, num_local_experts=experts,
                               num_experts_per_tok=field("expert_used_count"))
    key_length = field("attention.key_length")
    if key_length and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = key_length
    for key, attr in (("expert_feed_forward_length", "moe_intermediate_size"),
                      ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
                      ("attention.sliding_window", "sliding_window")):
        value = field(key)
        if value and hasattr(config, attr):
            setattr(config, attr, value)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= config.vocab_size:  # a class default the file never set
        config.pad_token_id = None
    rot = field("rope.dimension_count")
    rope = getattr(config, "rope_parameters", None)
    if arch == "phi3" and rot and isinstance(rope, dict):
        rope["partial_rotary_factor"] = rot / head_dim(config)
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            v = read_field(reader, f"{arch}.{key}")
            setattr(config, key, float(v[0]) if v and v[0] else None)
    if arch in _GEMMA:
        config.query_pre_attn_scalar = _query_scale(config, arch)  # what llama.cpp applies
    swa = read_field(reader, f"{arch}.rope.freq_base_swa")
    if swa and isinstance(rope, dict) and "sliding_attention" in rope:
        rope["sliding_attention"]["rope_theta"] = float(swa[0])
    scaling = read_field(reader, f"{arch}.rope.scaling.type")
    if scaling and scaling[0] == "linear" and isinstance(rope, dict):
        full = rope.get("full_attention", rope)
        full.update(rope_type="linear",
                    factor=float(read_field(reader, f"{arch}.rope.scaling.factor")[0]))
    return config


# llama.cpp's first Mixtral files (before April 2024, many still on the hub): one tensor per expert
_OLD_EXPERT = re.compile(r"blk\.(?P<bid>\d+)\.ffn_(?P<w>gate|up|down)\.(?P<e>\d+)\.weight")


def _put_old_expert(weights, m, config: dict, *, tensor_key_mapping, parsed_parameters,
                    **_) -> None:
    """One expert's matrix of an old-layout file into the stacked tensor transformers' Mixtral
    holds: gate_up_proj (experts, 2 * inter, hidden), gate rows first; down_proj."""
    w = torch.from_numpy(np.copy(weights))
    stacked = "down" if m["w"] == "down" else "gate"
    name = tensor_key_mapping[f"blk.{m['bid']}.ffn_{stacked}_exps"]
    tensors = parsed_parameters["tensors"]
    if name not in tensors:
        rows = w.shape[0] * (1 if m["w"] == "down" else 2)
        tensors[name] = torch.zeros(config["num_local_experts"], rows, w.shape[1], dtype=w.dtype)
    rows = slice(w.shape[0], 2 * w.shape[0]) if m["w"] == "up" else slice(0, w.shape[0])
    tensors[name][int(m["e"]), rows] = w


def processor(arch: str, config: dict):
    """transformers' tensor processor for `arch`; for a `llama` file with experts one that
    undoes the rotary permutation (as llama's does) and stacks the experts (as Qwen-MoE's), from
    stacked tensors or from the first files' one tensor per expert; for Qwen2-MoE one that takes
    the shared expert's gate as llama.cpp's converter writes it, (1, hidden), as well as 1-D."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        GGUFTensor,
        LlamaTensorProcessor,
        Qwen2MoeTensorProcessor,
        TensorProcessor,
    )

    if arch == "llama" and config.get("num_local_experts"):
        class MixtralProcessor(Qwen2MoeTensorProcessor):
            def process(self, weights, name, **kwargs):
                if ".attn_q." in name or ".attn_k." in name:
                    return LlamaTensorProcessor(self.config).process(weights, name, **kwargs)
                if m := _OLD_EXPERT.fullmatch(name):
                    _put_old_expert(weights, m, self.config, **kwargs)
                    return GGUFTensor(weights, None, {})
                return super().process(weights, name, **kwargs)
        return MixtralProcessor(config=config)
    if arch == "qwen2moe":
        class Qwen2MoeProcessor(Qwen2MoeTensorProcessor):
            def process(self, weights, name, **kwargs):
                out = super().process(weights, name, **kwargs)
                if "ffn_gate_inp_shexp" in name:  # llama.cpp's converter writes it (1, hidden),
                    out = out._replace(weights=out.weights.reshape(1, -1))  # transformers adds
                return out                                               # a dimension anyway
        return Qwen2MoeProcessor(config=config)
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
