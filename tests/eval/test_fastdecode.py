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


def _to_int4(model, group=32):
    from memfit.formats.grid import IntFormat
    from memfit.formats.quant_linear import QuantLinear
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is not torch.nn.Linear:
                    continue
                fmt = IntFormat(bits=4, group_size=group)
                q = QuantLinear(lin.in_features, lin.out_features, fmt, bias=False,
                                dtype=torch.float32)
                q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, generator=g))
                q.zero.copy_(torch.randint(0, 256, q.zero.shape, generator=g))
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
