"""memfit.fastdecode (memfit's own Llama-family decode step) gives transformers' greedy tokens,
with dense and packed linears, and leaves the model as it found it. CPU: the torch references
(and the Triton kernels under TRITON_INTERPRET=1)."""

import pytest
import torch

from memfit import fastdecode
from memfit.decode import greedy_static


def _tiny(tiny_config, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **kw)).eval()


def _generate(model, ids, new):
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return out[:, ids.shape[1]:]


def _to_int4(model, group=32, bits=4, symmetric=False):
    from memfit.formats.grid import IntFormat
    from memfit.formats.quant_linear import QuantLinear
    from memfit.kernels.packing import pack
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is not torch.nn.Linear:
                    continue
                fmt = IntFormat(bits=bits, group_size=group, symmetric=symmetric)
                q = QuantLinear(lin.in_features, lin.out_features, fmt, bias=False,
                                dtype=torch.float32)
                if bits == 4 and not symmetric:  # random bytes are random codes
                    q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, generator=g))
                    q.zero.copy_(torch.randint(0, 256, q.zero.shape, generator=g))
                else:  # packed codes: the padding bits of a row's last byte zero
                    codes = torch.randint(0, 2 ** bits, (lin.out_features, lin.in_features),
                                          generator=g, dtype=torch.uint8)
                    q.qdata.copy_(pack(codes, bits))
                    if not symmetric:
                        q.zero.copy_(pack(torch.randint(
                            0, 2 ** bits, (lin.out_features, q.scale.shape[1]), generator=g,
                            dtype=torch.uint8), bits))
                q.scale.copy_(torch.rand(q.scale.shape, generator=g) * 0.05)
                setattr(parent, name, q)
    return model


@pytest.mark.parametrize("hidden,heads", [(64, 4), (128, 4)])  # head_dim 16 and 32
@pytest.mark.parametrize("batch", [1, 2])
def test_native_step_matches_generate(tiny_config, hidden, heads, batch):
    model = _tiny(tiny_config, hidden_size=hidden, num_attention_heads=heads)
    assert fastdecode.ineligibility(model) is None
    ids = torch.randint(0, 30000, (batch, 7), generator=torch.Generator().manual_seed(batch))
    got = greedy_static(model, ids, 9, graph=False, native=True)
    assert torch.equal(got, _generate(model, ids, 9))


def test_native_step_with_packed_linears_matches_transformers_forward(tiny_config):
    model = _to_int4(_tiny(tiny_config, hidden_size=128))
    ids = torch.randint(0, 30000, (2, 6), generator=torch.Generator().manual_seed(5))
    native = greedy_static(model, ids, 6, graph=False, native=True)
    generic = greedy_static(model, ids, 6, graph=False, native=False)
    assert torch.equal(native, generic)


@pytest.mark.parametrize("packed", [False, True])
def test_packed_groups_leave_the_model_as_it_was(tiny_config, packed):
    model = _tiny(tiny_config)
    if packed:
        _to_int4(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = fastdecode.NativeStep(model, 1, 8)
    with step.packed_groups():
        assert step.qkv[0].kind == ("int" if packed else "dense")
        rows = step.qkv[0].weight.shape[0]
        attn = model.model.layers[0].self_attn
        assert rows == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ptrs = [t.untyped_storage().data_ptr() for t in after.values()]
    assert len(ptrs) == len(set(ptrs)) + (1 if model.config.tie_word_embeddings else 0)
    assert not any(t.is_inference() for t in after.values())


def test_ineligible_models_say_why(tiny_config):
    from transformers import AutoModelForCausalLM
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=64, n_layer=1, n_head=2))
    assert "model_type" in fastdecode.ineligibility(gpt2)
    biased = _tiny(tiny_config, attention_bias=True)
    assert "bias" in fastdecode.ineligibility(biased)


def test_tiled_loop_gives_the_same_tokens_and_puts_the_model_back(tiny_config):
    """tile_rows: the int4 weights are reordered in place for the GPU decode kernel while the
    loop runs (here forced on the CPU, where the reference kernel reads them through `untile`:
    so every module's slice of a fused tiled tensor must be a valid tiled weight of its own)."""
    model = _to_int4(_tiny(tiny_config, hidden_size=128, intermediate_size=256))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 30000, (2, 6), generator=torch.Generator().manual_seed(5))
    step = fastdecode.NativeStep(model, 2, 12, tile_rows=16)  # the first forward runs tiled
    with step.packed_groups():
        attn = model.model.layers[0].self_attn
        assert step.tiling.rows == 16 and step.qkv[0].weight.tile_rows == 16 and attn.k_proj.tile_rows == 16
        assert attn.o_proj.tile_rows == 16 and model.model.layers[1].mlp.down_proj.tile_rows == 16
        down = model.model.layers[0].mlp.down_proj  # 256 codes a row: 2 tiles, reordered
        assert not torch.equal(down.qdata, before["model.layers.0.mlp.down_proj.qdata"])
        from memfit.decode import _greedy
        got = _greedy(step, lambda position: None, ids, 6, graph=False, on_token=None,
                      eos_token_id=None, timings=None)
    want = greedy_static(model, ids, 6, graph=False, native=True)  # stored layout (CPU kernels)
    assert torch.equal(got, want)
    assert attn.o_proj.tile_rows == 0 and attn.k_proj.tile_rows == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_3bit_weights_run_widened_in_the_loop_and_are_put_back(tiny_config, native, symmetric):
    """3-bit codes: the decode loop holds them as 4-bit codes (the 4-bit kernels read them on
    CUDA; forced here on the CPU, tiled too), memfit's step and transformers' forward alike:
    the stored 3-bit model's tokens, and the model put back bit for bit."""
    model = _to_int4(_tiny(tiny_config, hidden_size=128, intermediate_size=256), bits=3,
                     symmetric=symmetric)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 30000, (1, 6), generator=torch.Generator().manual_seed(7))
    attn = model.model.layers[0].self_attn
    want = greedy_static(model, ids, 6, graph=False, native=native)  # stored 3-bit (CPU kernels)
    if native:
        step = fastdecode.NativeStep(model, 1, 12, tile_rows=16)
        with step.packed_groups():
            w = step.qkv[0].weight
            assert (w.bits, w.tile_rows, attn.o_proj.held_bits, attn.k_proj.held_bits) == \
                (4, 16, 4, 4)
            assert attn.o_proj.kernel_weight().zero_point == ("sym" if symmetric else "int")
            from memfit.decode import _greedy
            got = _greedy(step, lambda position: None, ids, 6, graph=False, on_token=None,
                          eos_token_id=None, timings=None)
    else:
        with fastdecode.tiled_linears(model, fastdecode.Tiling(model, 1, 16)):
            assert attn.o_proj.held_bits == 4 and attn.o_proj.tile_rows == 16
            got = greedy_static(model, ids, 6, graph=False, native=False)
    assert torch.equal(got, want)
    assert attn.o_proj.held_bits == 0 and attn.k_proj.held_bits == 0
    assert attn.o_proj.kernel_weight().bits == 3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_3bit_weights_stay_3bit_where_widening_would_not_fit(tiny_config):
    """Widening adds a third of the 3-bit bytes: past the room `Tiling` allows, the rest keep
    their stored 3-bit layout (the dequantize kernel's), and the loop still gives its tokens."""
    model = _to_int4(_tiny(tiny_config, hidden_size=128, intermediate_size=256), bits=3)
    ids = torch.randint(0, 30000, (1, 5), generator=torch.Generator().manual_seed(4))
    want = greedy_static(model, ids, 4, graph=False, native=False)
    tiling = fastdecode.Tiling(model, 1, 16)
    layer0 = model.model.layers[0]
    from memfit.kernels.weights import widen_bytes
    tiling.room = widen_bytes(layer0.self_attn.q_proj.kernel_weight())  # for q_proj alone
    with fastdecode.tiled_linears(model, tiling):
        held = [m.held_bits for m in model.modules() if hasattr(m, "held_bits")]
        assert held[0] == 4 and set(held[1:]) == {0} and tiling.room == 0
        got = greedy_static(model, ids, 4, graph=False, native=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("group", [32, 16])  # 4 or 8 groups a row: zero points +0 / +1 byte
def test_inspect_counts_the_bytes_widening_adds(tiny_config, group):
    """`memfit inspect`'s figure for the decode loop's widened 3-bit weights is the growth the
    loop really makes (and what `Tiling` charges against its room)."""
    from memfit.eval.memory import weight_table
    model = _to_int4(_tiny(tiny_config, hidden_size=128, intermediate_size=256), group=group,
                     bits=3)
    (row,) = weight_table(model)["packed"]

    def held():
        return sum(t.numel() for n, t in model.state_dict().items()
                   if n.endswith((".qdata", ".zero")))
    before = held()
    tiling = fastdecode.Tiling(model, 1, 16)
    tiling.room = row["decode_widen_bytes"]  # exactly enough for every 3-bit weight
    with fastdecode.tiled_linears(model, tiling):
        assert held() - before == row["decode_widen_bytes"] > 0 and tiling.room == 0
        assert all(m.held_bits == 4 for m in model.modules() if hasattr(m, "held_bits"))


def test_widen_is_exact_and_narrow_undoes_it():
    from memfit.kernels.weights import dequantize, narrow, widen
    from tests.kernels.test_triton_int import make_weight
    for zp in ("int", "sym", "float"):
        w = make_weight(24, 200, 3, 48, zp, seed=1)  # 75 bytes a row, zero points cross bytes
        v = widen(w)
        assert v.bits == 4 and v.zero_point == zp and v.qdata.shape == (24, 100)
        assert torch.equal(dequantize(v), dequantize(w))
        back = narrow(v)
        assert torch.equal(back.qdata, w.qdata) and back.bits == 3
        assert (back.zero is None) == (w.zero is None)
        assert back.zero is None or torch.equal(back.zero, w.zero)


def test_tiled_linears_serve_transformers_forward_too(tiny_config):
    """The generic loop (any architecture, transformers' forward) with its 4-bit linears tiled:
    same tokens, the model put back bit for bit."""
    model = _to_int4(_tiny(tiny_config, hidden_size=128, intermediate_size=256))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 30000, (1, 5), generator=torch.Generator().manual_seed(2))
    tiling = fastdecode.Tiling(model, 1, 16)
    with fastdecode.tiled_linears(model, tiling):  # the first forward runs tiled
        assert all(m.tile_rows == 16 for m in model.modules() if hasattr(m, "qdata"))
        got = greedy_static(model, ids, 5, graph=False, native=False)
    want = greedy_static(model, ids, 5, graph=False, native=False)
    assert torch.equal(got, want)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fastdecode.Tiling(model, 1).rows == 0  # on the CPU: off unless asked


@pytest.mark.parametrize("bits,group,hidden", [
    (8, 16, 128),  # head_dim 32
    pytest.param(4, 64, 256, marks=pytest.mark.skipif(  # head_dim 64
        not torch.cuda.is_available(), reason="130 s interpreted; the 4-bit static cache's CPU "
        "tests are tests/kernels/test_kv_static.py")),
])
def test_native_step_with_a_quantized_kv_cache_matches_generate(tiny_config, bits, group,
                                                                hidden):
    """memfit's step over the static quantized cache (memfit.kvstatic) gives the tokens
    of transformers' generate with QuantizedKVCache (fused: the same flush-then-attend steps),
    through prompt tokens packed at prefill and groups packed during the decode."""
    from memfit.decode import _greedy, kv_ineligibility
    from memfit.kvcache import (
        KVFormat,
        QuantizedKVCache,
        cache_kwarg,
        dequantize_store,
        enable_fused_kv_attention,
    )
    fmt = KVFormat(bits, group, 2 * group)
    model = _tiny(tiny_config, hidden_size=hidden)
    assert kv_ineligibility(model, fmt) is None
    prompt = 3 * group + group // 2 + 3  # one group packed at prefill
    ids = torch.randint(0, 30000, (1, prompt), generator=torch.Generator().manual_seed(7))
    new = group + 4                      # one more during the decode
    step = fastdecode.NativeStep(model, 1, prompt + new, kv=fmt)
    with step.packed_groups():
        got = _greedy(step, lambda position: None, ids, new, graph=False, on_token=None,
                      eos_token_id=None, timings=None)
    enable_fused_kv_attention(model)
    cache = QuantizedKVCache(model.config, fmt, fused=True)
    want = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0, **{cache_kwarg(model): cache})[:, prompt:]
    assert torch.equal(got, want)
    packed = cache.layers[0].quantized_tokens
    assert packed == 2 * group
    for mine, theirs in zip(step.kv, cache.layers):  # the same tokens packed the same way
        store = [t[:, :, :n] for t, n in zip(mine.store, (packed, 2, 2, packed, packed, packed))]
        assert [t.shape for t in store] == [t.shape for t in theirs.store]
        k, v = dequantize_store(store, fmt, 32 if hidden == 128 else 64)
        k0, v0 = dequantize_store(theirs.store, fmt, k.shape[-1])
        same = (store[0] == theirs.store[0]).float().mean()  # states from other matmul blockings
        assert same > 0.97, same
        assert (k - k0).abs().max() <= 1.01 * theirs.store[1].float().max()
        assert (v - v0).abs().max() <= 1.01 * theirs.store[4].float().max()


def test_quantized_kv_cache_refuses_what_the_static_cache_cannot_take(tiny_config):
    from memfit.decode import kv_ineligibility
    from memfit.kvcache import KVFormat
    model = _tiny(tiny_config)
    why = kv_ineligibility(model, KVFormat(2, 32, 128))
    assert "2-bit" in why
    with pytest.raises(ValueError, match="2-bit"):
        greedy_static(model, torch.zeros(1, 3, dtype=torch.long), 2, graph=False,
                      kv=KVFormat(2, 32, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_quantized_kv_cache_in_a_cuda_graph_gives_the_eager_tokens(tiny_config):
    """Captured once and replayed, the static cache's step (flushes inside the graph, the packed
    count read from the position tensor) gives the tokens of the same step run eagerly."""
    from memfit.kvcache import KVFormat
    fmt = KVFormat(4, 64, 64)
    model = _tiny(tiny_config, hidden_size=256).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 30000, (1, 150), generator=torch.Generator().manual_seed(9)).cuda()
    eager = greedy_static(model, ids, 140, graph=False, kv=fmt)
    graphed = greedy_static(model, ids, 140, graph=True, kv=fmt)
    assert torch.equal(eager, graphed)


def test_fused_groups_keep_launch_plans_on_cuda_only(tiny_config):
    """A fused q/k/v or gate/up group holds launch plans (memfit.kernels.replay) for its
    packed weight on CUDA, none on the CPU (there `prepare` would repack the weight for the CPU
    kernels: extra memory the loop does not want)."""
    model = _to_int4(_tiny(tiny_config, hidden_size=128))
    step = fastdecode.NativeStep(model, 1, 8)
    with step.packed_groups():
        step(torch.tensor([[1, 2, 3]]), torch.arange(3))
        assert step.qkv[0].kind == "int" and step.qkv[0].plans is None
    assert step.qkv[0].plans is False  # dropped with the fused tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launch plans are made on CUDA")
@pytest.mark.parametrize("prompt", [5, 150])  # a decode-sized and a prefill-sized forward
def test_fused_groups_launch_plans_give_the_ordinary_paths_ids(tiny_config, prompt, monkeypatch):
    from memfit.kernels import replay
    model = _to_int4(_tiny(tiny_config, hidden_size=256), group=64).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 30000, (1, prompt), generator=torch.Generator().manual_seed(2)).cuda()
    pos = torch.arange(prompt, device="cuda")
    got = {}
    for plans in (True, False):
        monkeypatch.setattr(replay, "ENABLED", plans)
        for m in model.modules():
            if hasattr(m, "_drop_cache"):
                m._drop_cache()
        step = fastdecode.NativeStep(model, 1, prompt + 4)
        with step.packed_groups():
            got[plans] = [step(ids, pos) for _ in range(3)]  # the first call builds the plans
            g = step.gate_up[0]
            assert isinstance(g.plans, replay.Plans) == plans
            assert not plans or g.plans.by_shape
    assert all(torch.equal(a, got[False][0]) for a in got[True] + got[False])
