"""Plain `transformers.AutoModelForCausalLM.from_pretrained(folder)` on a memfit folder: same logits
as memfit's own loader, bit for bit, with the packed buffers kept packed."""

import pytest
import torch
from torch import nn

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import format_nbytes
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseLinear
from memfit.io import save as io
from memfit.io.hf import register_with_transformers

CONFIGS = {
    "llama": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2),
    "gpt2": dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
}
# module -> replacement; GPT-2's Conv1D weight is (in, out), so it is transposed first
PLANS = {
    "llama": {"model.layers.0.self_attn.q_proj": IntFormat(bits=4, group_size=32),
              "model.layers.1.mlp.down_proj": IntFormat(bits=8, group_size=None, symmetric=True),
              "model.layers.0.mlp.up_proj": "sparse",
              "model.layers.1.self_attn.o_proj": "lowrank"},
    "gpt2": {"transformer.h.0.attn.c_attn": IntFormat(bits=4, group_size=32, zero_point="float"),
             "transformer.h.1.mlp.c_fc": IntFormat(bits=3, group_size=64),
             # GPT-2's _init_weights reaches into c_proj.weight, which packed modules lack
             "transformer.h.0.attn.c_proj": IntFormat(bits=4, group_size=64),
             "transformer.h.1.mlp.c_proj": "sparse"},
}
# a quantized lm_head under tied embeddings: the tie must not come back on load
PLANS["gpt2_head"] = {**PLANS["gpt2"], "lm_head": IntFormat(bits=8, group_size=None)}


def replacement(m: nn.Module, how):
    w = m.weight.detach() if isinstance(m, nn.Linear) else m.weight.detach().t()  # (out, in)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    if how == "sparse":
        with torch.no_grad():
            lin.weight[lin.weight.abs() < lin.weight.abs().median()] = 0.0
        return SparseLinear.from_linear(lin, "bitmask")
    if how == "lowrank":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8], lin.bias)
    scale, zero = grid.round_params(*grid.minmax_params(w, how), how)
    codes = grid.quantize(w, scale, zero, how)
    return QuantLinear.from_linear(lin, codes, scale, None if how.symmetric else zero, how)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt2_head"])
def folder(request, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memfit.models import resolve

    torch.manual_seed(0)
    model_type = request.param.split("_")[0]
    cfg = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, how in PLANS[request.param].items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, replacement(model.get_submodule(name), how))
    out = tmp_path_factory.mktemp(request.param) / "out"
    tokenizer = AutoTokenizer.from_pretrained(resolve("default-encoder")[1])
    io.save(model, tokenizer, out, recipe={}, dense_dtype="keep")
    return request.param, out, logits(model)


def logits(model):
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_register_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    register_with_transformers()
    register_with_transformers()
    assert AUTO_QUANTIZER_MAPPING["memfit"].__name__ == "MemfitHfQuantizer"


def test_from_pretrained_matches_memfit_load(folder):
    from transformers import AutoModelForCausalLM

    register_with_transformers()
    model_type, out, before = folder
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = io.load(out).model
    assert torch.equal(logits(hf), before) and torch.equal(logits(ours), before)
    mine = dict(ours.named_modules())
    for name, m in hf.named_modules():
        assert type(m) is type(mine[name]), name
    if model_type == "gpt2":
        assert hf.lm_head.weight is hf.transformer.wte.weight
    elif model_type == "gpt2_head":  # the lm_head is packed: no dense weight tied back onto it
        assert not list(hf.lm_head.parameters()) and not list(ours.lm_head.parameters())
    else:  # transformers recomputes the rotary buffer; memfit restores it: they agree
        assert torch.equal(hf.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    for name, t in ours.state_dict().items():  # same tensors, same dtypes (no "auto" surprise)
        assert t.dtype == hf.state_dict()[name].dtype and torch.equal(t, hf.state_dict()[name])


def test_from_pretrained_keeps_packed_sizes(folder):
    from transformers import AutoModelForCausalLM

    register_with_transformers()
    model_type, out, _ = folder
    hf = AutoModelForCausalLM.from_pretrained(out)
    quant = {n: m for n, m in hf.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == {n for n, how in PLANS[model_type].items() if isinstance(how, IntFormat)}
    for name, m in quant.items():
        assert m.qdata.dtype == torch.uint8 and not list(m.parameters()), name
        stored = sum(b.numel() * b.element_size() for b in m.buffers())
        bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        assert stored - bias == format_nbytes(m.fmt, m.out_features, m.in_features)
        dense = m.out_features * m.in_features * 4  # float32 weight
        print(f"{name}: {stored - bias} packed bytes vs {dense} dense ({m.fmt.bits}-bit)")
        assert stored - bias < dense / 3


def test_missing_tensor_is_a_user_error(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from memfit.errors import UserError

    register_with_transformers()
    bad = tmp_path / "bad"
    shutil.copytree(folder[1], bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors[next(k for k in tensors if k.endswith(".scale"))]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_plain_transformers_without_memfit_fails_loudly(folder):
    """A process that never imports memfit must not build random layers in silence."""
    import subprocess
    import sys

    _, out, _ = folder
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert 'memfit' not in sys.modules\nprint('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "size mismatch" in r.stderr or "mismatch" in r.stderr.lower(), r.stderr[-2000:]
