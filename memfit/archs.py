"""Architecture facts as data: where the block list is, which linears form calibration groups,
and how the KV cache is shaped. No copied model classes, no class-name checks: a family is one
`Arch` row keyed by the config's `model_type`.

`groups` lists the linears of one block in true-sequential order: the members of a group see the
same input (q/k/v), and a later group's input depends on the earlier groups' compressed outputs.
`layout` names the linears structured pruning slices (memfit.structured); families without one
support every method but structured pruning.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

import torch.nn as nn

from memfit.errors import UserError


@dataclass(frozen=True)
class Layout:
    """Paths (inside one block) of the linears structured pruning slices."""

    q: str | None
    k: str | None
    v: str | None
    o: str | None
    mlp_in: tuple[str, ...]   # output rows = intermediate channels (gate, up)
    mlp_out: str              # input columns = intermediate channels (down)
    mlp: str                  # the MLP module (its `intermediate_size` attribute, if any)


@dataclass(frozen=True)
class Arch:
    kind: str                        # "decoder" or "encoder"
    layers: tuple[str, ...]          # candidate attribute paths of the block list, first match wins
    groups: tuple[tuple[str, ...], ...]
    conv1d: bool = False             # GPT-2 stores linears as Conv1D with a transposed weight
    layout: Layout | None = None     # for structured pruning; None: not supported
    # AWQ, per group (aligned with `groups`): the op that produces the group's input, into which
    # 1/s folds: a norm (its weight and bias divided by s) or a linear (its output rows divided);
    # None: this group's input has no foldable producer. Empty: AWQ is not supported.
    awq_fold: tuple[str | None, ...] = ()
    awq_no_clip: tuple[str, ...] = ()  # linears AWQ's clip search leaves alone (query, key: their
                                       # output error says little through the softmax)
    # AWQ, per group: a module fed by the group's input whose output the scale search measures
    # (the MLP for gate/up: the product of their outputs is what matters; the attention for
    # q/k/v: q and k act through the softmax); None: the linears' own outputs (exact from the
    # input Hessian). Empty: None for every group.
    awq_inspect: tuple[str | None, ...] = ()
    awq_mixing: tuple[str, ...] = ()  # inspected modules that mix tokens (attention): measured
                                      # on whole kept windows, with the block's keyword arguments
    norm_offset: float = 0.0  # the norms scale by (norm_offset + weight): Gemma's 1 + w
    positions_after_pad: bool = False  # position ids start after the padding index (RoBERTa,
                                       # MPNet): max_position_embeddings - pad - 1 usable
    # Mixture of experts (memfit.moe): a name may be absent from a block (dense and sparse
    # blocks mix), `*` stands for an expert's index, and a stage's names form one group per
    # parent module (an expert's gate/up; the shared expert's) collected in one pass.
    experts: bool = False

    def stages(self, block: nn.Module) -> list[list[tuple[str, ...]]]:
        """The block's linear groups in true-sequential order, as stages: the groups of one
        stage read inputs that none of them changes (the experts of one layer), so one
        calibration pass collects them all. Without experts: one group a stage, `groups`."""
        if not self.experts:
            return [[g] for g in self.groups]
        present = [n for n, _ in block.named_modules()]  # linears, or what replaced them
        out = []
        for template in self.groups:
            by_parent: dict[str, list[str]] = {}
            for pattern in template:
                names = [n for n in present if fnmatch.fnmatchcase(n, pattern)
                         and all(p.isdigit() for p, q in zip(n.split("."), pattern.split("."))
                                 if q == "*")] if "*" in pattern else \
                    [pattern] if pattern in present else []
                for n in sorted(names, key=_natural):
                    by_parent.setdefault(n.rpartition(".")[0], []).append(n)
            out.append([tuple(g) for g in by_parent.values()])
        return out

    def block_groups(self, block: nn.Module) -> list[tuple[str, ...]]:
        """Every linear group of `block`, in true-sequential order."""
        return [g for stage in self.stages(block) for g in stage]


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_LAYOUT = Layout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp")
_LLAMA = Arch("decoder", ("model.layers", "model.language_model.layers"), _LLAMA_GROUPS,
              layout=_LLAMA_LAYOUT,
              awq_fold=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                        "mlp.up_proj"),
              awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),
              awq_inspect=("self_attn", None, "mlp", None), awq_mixing=("self_attn",))
# Gemma's RMSNorm scales by (1 + weight): a fold divides (1 + w) by s. Gemma 2/3 normalise the
# attention's output (post_attention_layernorm) and feed the MLP from pre_feedforward_layernorm.
_GEMMA = replace(_LLAMA, norm_offset=1.0)
_GEMMA2 = replace(_GEMMA, awq_fold=("input_layernorm", "self_attn.v_proj",
                                    "pre_feedforward_layernorm", "mlp.up_proj"))
# Granite (its multipliers act outside the linears) and StableLM (LayerNorm norms, with biases)
# keep Llama's linears and norms; StableLM's optional per-head q/k norms (one module a head)
# would have to be sliced with the heads, so structured width pruning is not offered there.
# OLMo 2 normalises after attention and MLP, not before: q/k/v read the residual stream itself,
# so only v -> o and up -> down fold; its q/k norms span all heads (not offered either).
# Starcoder 2 and OPT: one MLP input linear behind a GELU/ReLU (nothing folds into the output
# linear). Cohere (attention and MLP in parallel from one norm, whose fold would scale both
# groups' inputs) and Falcon (fused query_key_value, parallel blocks) take every method but
# AWQ / SmoothQuant and structured width pruning.
_OLMO2 = replace(_LLAMA, layout=None, awq_fold=(None, "self_attn.v_proj", None, "mlp.up_proj"))
_STARCODER2 = Arch(
    "decoder", ("model.layers",),
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
     ("mlp.c_fc",), ("mlp.c_proj",)),
    layout=Layout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  ("mlp.c_fc",), "mlp.c_proj", "mlp"),
    awq_fold=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", None),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    awq_inspect=("self_attn", None, "mlp", None), awq_mixing=("self_attn",))
_OPT = Arch(
    "decoder", ("model.decoder.layers",),
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
     ("fc1",), ("fc2",)),
    awq_fold=("self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", None),
    awq_no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    awq_inspect=("self_attn", None, None, None), awq_mixing=("self_attn",))


# DeepSeek's multi-head latent attention: q (or its low-rank q_a) and the joint kv_a read the
# block's input; q_b and kv_b read their own normalised latents.
_MLA = (("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
_MLA_FOLD = ("input_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", None)


def _moe(mlp: str = "mlp", attention=_LLAMA_GROUPS[:2],
         attention_fold=("input_layernorm", "self_attn.v_proj"),
         down_fold: str | None = "^up_proj") -> Arch:
    """A mixture-of-experts decoder (memfit.moe): its dense blocks' MLP, shared expert(s) and
    routed experts, whichever a block has. The routers stay in float. AWQ / SmoothQuant fold
    into the attention's producers and each expert's down projection into its own up projection
    (`^`: the group's sibling), not into an up projection that passes a non-linear gate (gpt-oss
    clamps it and adds 1: `down_fold` None). The MLP's norm feeds the router and every expert:
    AWQ searches one scale for all experts' and the shared expert's gate/up together, scored on
    the MoE module's output, and folds it into the norm and, exactly, into the router's (and a
    shared-expert gate's) input columns (memfit.awq); SmoothQuant leaves those groups alone.
    Structured width pruning narrows the routed experts (memfit.structured.prune_expert_width_),
    not the attention heads."""
    parts = ("", "shared_expert.", "shared_experts.", "experts.*.")
    up = tuple(f"{mlp}.{p}{n}" for p in parts for n in ("gate_proj", "up_proj"))
    down = tuple(f"{mlp}.{p}down_proj" for p in parts)
    mla = attention is _MLA
    return Arch("decoder", ("model.layers",), attention + (up, down), experts=True,
                awq_fold=tuple(attention_fold) + ("post_attention_layernorm", down_fold),
                awq_no_clip=() if mla else ("self_attn.q_proj", "self_attn.k_proj"),
                awq_inspect=(None,) * len(attention) + (mlp, None) if mla else
                ("self_attn", None, mlp, None), awq_mixing=() if mla else ("self_attn",))

_BERT = Arch(
    "encoder",
    ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer"),
    (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
)

# Other encoders behind sentence-transformers models (MPNet: all-mpnet-base-v2; DistilBERT;
# DeBERTa v2/v3; ModernBERT and NomicBERT, whose MLP input is gated): the same four groups.
_ROBERTA = replace(_BERT, positions_after_pad=True)
_MPNET = Arch("encoder", ("encoder.layer", "mpnet.encoder.layer"), (
    ("attention.attn.q", "attention.attn.k", "attention.attn.v"), ("attention.attn.o",),
    ("intermediate.dense",), ("output.dense",)), positions_after_pad=True)
_DISTILBERT = Arch("encoder", ("transformer.layer", "distilbert.transformer.layer"), (
    ("attention.q_lin", "attention.k_lin", "attention.v_lin"), ("attention.out_lin",),
    ("ffn.lin1",), ("ffn.lin2",)))
_DEBERTA2 = Arch("encoder", ("encoder.layer", "deberta.encoder.layer"), (
    ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
    ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)))
_MODERNBERT = Arch("encoder", ("layers", "model.layers"), (
    ("attn.Wqkv",), ("attn.Wo",), ("mlp.Wi",), ("mlp.Wo",)))
_NOMIC = Arch("encoder", ("layers", "model.layers"), (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)))

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi": Arch("decoder", ("model.layers",), (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.dense",), ("mlp.fc1",), ("mlp.fc2",))),
    "phi3": Arch("decoder", ("model.layers",), (
        ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))),
    "gpt2": Arch("decoder", ("transformer.h",), (
        ("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)), conv1d=True),
    "gpt_neox": Arch("decoder", ("gpt_neox.layers",), (
        ("attention.query_key_value",), ("attention.dense",),
        ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
    "granite": _LLAMA,
    "stablelm": replace(_LLAMA, layout=None),
    "olmo2": _OLMO2,
    "starcoder2": _STARCODER2,
    "opt": _OPT,
    "cohere": Arch("decoder", ("model.layers",), _LLAMA_GROUPS),
    "falcon": Arch("decoder", ("transformer.h",), (
        ("self_attention.query_key_value",), ("self_attention.dense",),
        ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
    "mixtral": _moe(),
    "qwen2_moe": _moe(),
    "qwen3_moe": _moe(),
    "olmoe": _moe(),
    "phimoe": _moe(),
    "gpt_oss": _moe(down_fold=None),
    "granitemoe": _moe("block_sparse_moe"),
    "deepseek_v3": _moe(attention=_MLA, attention_fold=_MLA_FOLD),
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "electra": _BERT,
    "camembert": _ROBERTA,
    "mpnet": _MPNET,
    "distilbert": _DISTILBERT,
    "deberta-v2": _DEBERTA2,
    "modernbert": _MODERNBERT,
    "nomic_bert": _NOMIC,
}


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserError(
            f"unknown architecture {model_type!r}; memfit supports {', '.join(sorted(ARCHS))}. "
            "Add a row to memfit.archs.ARCHS for a new family")
    return ARCHS[model_type]


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def block_list(model: nn.Module, arch: Arch) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    for path in arch.layers:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise UserError(f"could not find the block list of {type(model).__name__} at {arch.layers}")


def text_config(config):
    """The language part of a config (multimodal configs nest it under text_config)."""
    return getattr(config, "text_config", None) or config


def check_positions(config, length: int, flag: str) -> None:
    """Refuse windows of `length` tokens past the model's positions (max_position_embeddings):
    positions it never learned, an index error for learned position tables. `flag` is the option
    that set the length, named in the one-line error."""
    limit = getattr(text_config(config), "max_position_embeddings", None)
    if limit and length > limit:
        raise UserError(f"{flag} {length} is longer than the model supports ({limit} positions, "
                        f"max_position_embeddings); use {flag} {limit} or less")


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the KV cache, GQA-aware."""
    c = text_config(config)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim
