"""Slicing single layers for tensor parallelism (no torch.distributed needed): colwise shards
concatenate to the full output, rowwise partial sums add up to it, for every format; cuts that
a format cannot take, and plans that cannot split, are refused with a UserError."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats.grid import IntFormat
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseIntWeight, SparseLinear
from memfit.parallel.shard import shard_colwise, shard_rowwise
from memfit.parallel.tp import parallelize_, partition, split_even

sys.path.insert(0, str(Path(__file__).parent))
from tiny import quantize_blocks_, rtn_quant_linear, tiny_llama

IN, OUT = 128, 96


def _linear(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _sparse(layout):
    lin = _linear()
    with torch.no_grad():
        if layout == "2:4":  # keep the 2 largest of every 4 inputs
            w = lin.weight.view(OUT, IN // 4, 4)
            drop = w.abs().argsort(-1)[..., :2]
            w.scatter_(-1, drop, 0.0)
        else:
            lin.weight[lin.weight.abs() < 0.05] = 0.0
    return SparseLinear.from_linear(lin, layout)


MODULES = {
    "linear": _linear,
    "int4_g32_asym": lambda: rtn_quant_linear(_linear(), IntFormat(bits=4, group_size=32)),
    "int3_g32_float_zero": lambda: rtn_quant_linear(
        _linear(), IntFormat(bits=3, group_size=32, zero_point="float")),
    "int8_channel_sym": lambda: rtn_quant_linear(
        _linear(), IntFormat(bits=8, group_size=None, symmetric=True)),
    "lowrank": lambda: LowRankLinear.from_factors(torch.randn(OUT, 16), torch.randn(16, IN),
                                                   torch.randn(OUT)),
    "lowrank_int4": lambda: _quantized_lowrank(),
    "sparse_bitmask": lambda: _sparse("bitmask"),
    "sparse_2of4": lambda: _sparse("2:4"),
}


def _quantized_lowrank():
    m = LowRankLinear.from_factors(torch.randn(OUT, 16), torch.randn(16, IN), torch.randn(OUT))
    m.down = rtn_quant_linear(m.down, IntFormat(bits=4, group_size=32))
    m.up = rtn_quant_linear(m.up, IntFormat(bits=4, group_size=16))
    return m


@pytest.mark.parametrize("kind", MODULES)
@torch.no_grad()
def test_colwise_shards_concatenate_to_the_full_output(kind):
    m = MODULES[kind]()
    x = torch.randn(3, 5, IN)
    full = m(x)
    cuts = [(0, 40), (40, 64), (64, OUT)]
    shards = [shard_colwise(m, a, b) for a, b in cuts]
    assert [type(s) for s in shards] == [type(m)] * 3
    got = torch.cat([s(x) for s in shards], -1)
    err = (got - full).abs().max().item()
    print(f"{kind} colwise: max abs error {err:.3g}")
    assert err < 1e-4
    if hasattr(m, "dequantize"):  # stored weights: sliced exactly
        w = torch.cat([s.dequantize(torch.float32) for s in shards], 0)
        assert torch.equal(w, m.dequantize(torch.float32))


@pytest.mark.parametrize("kind", MODULES)
@torch.no_grad()
def test_rowwise_partial_sums_add_to_the_full_output(kind):
    m = MODULES[kind]()
    x = torch.randn(3, 5, IN)
    full = m(x)
    cuts = [(0, 64), (64, 96), (96, IN)]  # group boundaries of 32 (and multiples of 4)
    total, bias = 0, None
    for a, b in cuts:
        shard, bias = shard_rowwise(m, a, b)
        assert type(shard) is type(m) and getattr(shard, "in_features", b - a) == b - a
        total = total + shard(x[..., a:b])
    got = total + (0 if bias is None else bias)
    err = (got - full).abs().max().item()
    print(f"{kind} rowwise: max abs error {err:.3g}")
    assert err < 1e-4
    if hasattr(m, "dequantize"):
        w = torch.cat([shard_rowwise(m, a, b)[0].dequantize(torch.float32) for a, b in cuts], 1)
        assert torch.equal(w, m.dequantize(torch.float32))


def test_rowwise_cut_inside_a_quantization_group_is_refused():
    m = MODULES["int4_g32_asym"]()
    with pytest.raises(UserError, match="group boundary"):
        shard_rowwise(m, 0, 48)
    with pytest.raises(UserError, match="group boundary"):
        shard_rowwise(MODULES["sparse_2of4"](), 0, 42)


def test_sparse_with_integer_values_is_refused():
    lin = _linear()
    fmt = IntFormat(bits=4, group_size=32, symmetric=True)
    q = rtn_quant_linear(lin, fmt)
    w = q.dequantize()
    w[w.abs() < 0.05] = 0.0
    m = SparseLinear(SparseIntWeight.from_dense(w, q.scale.float(), None, fmt, "bitmask"))
    with pytest.raises(UserError, match="not supported yet"):
        shard_colwise(m, 0, 48)


def test_uneven_split_follows_kv_head_groups():
    """The default model's shape: 9 query / 3 KV heads of 64, MLP 1536, int4 groups of 64."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64)
    assert split_even(3, 2) == [(0, 2), (2, 3)]
    p = partition(cfg, 2, mlp_align=64)
    assert p[0] == {"kv": (0, 128), "q": (0, 384), "mlp": (0, 768)}
    assert p[1] == {"kv": (128, 192), "q": (384, 576), "mlp": (768, 1536)}
    with pytest.raises(UserError, match="3 KV heads"):
        partition(cfg, 4)


def test_packed_o_proj_whose_groups_straddle_a_head_group_is_split_by_rows():
    """gqa_uneven: rank 0's query heads end at column 96, inside a group of 64, which a split by
    input columns cannot take (it was refused); packed row-parallel layers are split by output
    rows (GatherParallel), 144 rows as 80 + 64 (multiples of 16), every input column kept."""
    from memfit.parallel.tp import GatherParallel

    model = quantize_blocks_(tiny_llama("gqa_uneven"), IntFormat(bits=4, group_size=64))
    info = parallelize_(model, 0, 2)
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(o, GatherParallel) and o.in_sizes == [96, 48] and o.out_sizes == [80, 64]
    assert (o.local.in_features, o.local.out_features) == (144, 80)
    assert info["q_heads"] == 6
    whole = quantize_blocks_(tiny_llama("gqa_uneven"), IntFormat(bits=4, group_size=64))
    with pytest.raises(UserError, match=r"cannot be split at columns \[0, 96\)"):
        shard_rowwise(whole.model.layers[0].self_attn.o_proj, 0, 96)


def test_architecture_without_a_plan_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="no tensor-parallel plan for architecture 'gpt2'"):
        parallelize_(model, 0, 2)


@torch.no_grad()
def test_parallelize_on_one_rank_changes_nothing():
    model = tiny_llama("gqa_uneven")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    info = parallelize_(model, 0, 1)
    assert (info["q_heads"], info["kv_heads"], info["mlp_channels"]) == (9, 3, 192)
    assert torch.allclose(model(ids).logits, ref, atol=1e-5)
