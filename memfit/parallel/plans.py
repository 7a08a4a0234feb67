"""Tensor-parallel plans as data, one row per architecture family (keyed like memfit.archs).

A plan names, for the linears of one block, how each is split and in which unit:

- "colwise": the output rows are split; the rank computes its slice of the output and the next
  layer consumes it as is (no communication);
- "rowwise": the input columns are split; each rank computes a partial sum of the full output and
  the partial sums are added with one all-reduce.

The unit says which channels move together: "q" (query heads of `head_dim` channels), "kv"
(key/value heads), "mlp" (intermediate channels), "expert" (each expert's intermediate channels:
every expert of a mixture is split the same way, its down projection's partial sums added by
its own all-reduce), "shared" (a shared expert's). A path with `*` stands for every child of
the module before it (`mlp.experts.*.gate_proj`: each expert); paths under `optional` may be
absent from a block (Qwen-MoE's dense blocks hold `mlp.gate_proj`, its expert blocks
`mlp.experts`). Attention is split by KV-head groups: a rank
holds whole KV heads and the query heads that read them (transformers' repeat_kv maps query head
i to KV head i // (heads / kv_heads)), so the attention kernel runs unchanged on fewer heads.
`head_attrs` lists attention-module attributes that hold head counts, to be set per rank where a
module keeps them (transformers 5 Llama infers the count from the projection output; older or
other modules may not). Model code never looks at any of this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memfit.errors import UserError

COLWISE, ROWWISE = "colwise", "rowwise"
UNITS = ("q", "kv", "mlp", "expert", "shared")


@dataclass(frozen=True, kw_only=True)
class TPPlan:
    linears: dict[str, tuple[str, str]]     # path inside a block -> (style, unit)
    attention: str                           # path of the attention module inside a block
    head_attrs: dict[str, str] = field(default_factory=dict)  # attribute -> unit ("q" or "kv")
    optional: tuple[str, ...] = ()  # path prefixes a block may not have

    def __post_init__(self):
        for path, (style, unit) in self.linears.items():
            assert style in (COLWISE, ROWWISE) and unit in UNITS, (path, style, unit)

    def expand(self, block) -> list[tuple[str, str, str]]:
        """[(path, style, unit)] of the linears `block` holds, `*` expanded to its children."""
        out = []
        for path, (style, unit) in self.linears.items():
            head, star, rest = path.partition(".*.")
            holder = _get(block, head)
            if holder is None:
                if not (self.optional and head.startswith(self.optional)):
                    raise UserError(f"the tensor-parallel plan names {head}, which this block "
                                    "does not have")
                continue
            names = [n for n, c in holder.named_children() if _get(c, rest) is not None] \
                if star else [None]
            out += [(f"{head}.{n}.{rest}" if star else path, style, unit) for n in names]
        return out


def _get(block, path: str):
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


_LLAMA = TPPlan(
    linears={
        "self_attn.q_proj": (COLWISE, "q"),
        "self_attn.k_proj": (COLWISE, "kv"),
        "self_attn.v_proj": (COLWISE, "kv"),
        "self_attn.o_proj": (ROWWISE, "q"),
        "mlp.gate_proj": (COLWISE, "mlp"),
        "mlp.up_proj": (COLWISE, "mlp"),
        "mlp.down_proj": (ROWWISE, "mlp"),
    },
    attention="self_attn",
    head_attrs={"num_heads": "q", "num_attention_heads": "q", "num_key_value_heads": "kv"},
)

# Families whose blocks follow Llama's layout (qwen3's per-head q/k norms act on head_dim and stay
# replicated). Fused projections (phi3 qkv_proj, gpt2 c_attn, gpt_neox query_key_value) need an
# interleaved split that is not written yet.
_EXPERTS = {"mlp.experts.*.gate_proj": (COLWISE, "expert"),
            "mlp.experts.*.up_proj": (COLWISE, "expert"),
            "mlp.experts.*.down_proj": (ROWWISE, "expert")}
_ATTENTION = {k: v for k, v in _LLAMA.linears.items() if k.startswith("self_attn.")}
# Mixtures of experts: the router (`mlp.gate`) and Qwen2-MoE's shared-expert gate stay
# replicated, every rank routes every token the same way and runs its slice of each expert.
_MIXTRAL = TPPlan(linears={**_ATTENTION, **_EXPERTS}, attention="self_attn",
                  head_attrs=_LLAMA.head_attrs)
_QWEN_MOE = TPPlan(
    linears={**_ATTENTION, **_EXPERTS,
             "mlp.shared_expert.gate_proj": (COLWISE, "shared"),
             "mlp.shared_expert.up_proj": (COLWISE, "shared"),
             "mlp.shared_expert.down_proj": (ROWWISE, "shared"),
             **{k: v for k, v in _LLAMA.linears.items() if k.startswith("mlp.")}},
    attention="self_attn", head_attrs=_LLAMA.head_attrs,
    optional=("mlp.experts", "mlp.shared_expert", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj"))

PLANS: dict[str, TPPlan] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
                            "mixtral": _MIXTRAL, "qwen2_moe": _QWEN_MOE, "qwen3_moe": _QWEN_MOE}


def plan_for(config) -> TPPlan:
    model_type = getattr(config, "model_type", None)
    if model_type not in PLANS:
        raise UserError(f"no tensor-parallel plan for architecture {model_type!r}; plans exist for "
                        f"{', '.join(sorted(PLANS))} (add a row to memfit.parallel.plans.PLANS)")
    return PLANS[model_type]
