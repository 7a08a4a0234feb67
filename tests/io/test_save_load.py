"""memfit.io.save: a compressed tiny Llama / GPT-2 saved and loaded back gives bit-identical logits;
the folder layout, refusals (existing folder, damaged folder, full disk) and load_model dispatch."""

import errno
import json

import pytest
import torch
from torch import nn

from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseLinear
from memfit.io import save as io

CONFIGS = {  # the vocabulary of the embedded encoder's tokenizer, which the folders carry
    "llama": dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2),
    "gpt2": dict(vocab_size=30522, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
}


def as_linear(m: nn.Module) -> nn.Linear:
    """An nn.Linear view of an nn.Linear or a GPT-2 Conv1D (whose weight is (in, out))."""
    if isinstance(m, nn.Linear):
        return m
    w = m.weight.detach().t()  # Conv1D (in, out) -> (out, in)
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(m.bias)
    return lin


def to_int(m, fmt):
    lin = as_linear(m)
    w = lin.weight.detach()
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    codes = grid.quantize(w, scale, zero, fmt)
    return QuantLinear.from_linear(lin, codes, scale, None if fmt.symmetric else zero, fmt)


def to_sparse(m, layout):
    lin = as_linear(m)
    w = lin.weight.detach().clone()
    groups = w.view(w.shape[0], -1, 4)  # (out, in/4, 4): drop the 2 smallest of every 4
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)
    with torch.no_grad():
        lin.weight.copy_(w)
    return SparseLinear.from_linear(lin, layout)


def to_lowrank(m, rank=8):
    lin = as_linear(m)
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    bias = None if lin.bias is None else lin.bias.detach()
    return LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], bias)


def swap(model, name, new):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def compressed(model_type: str):
    """A tiny random model with a few modules replaced, like compress_ would leave it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **CONFIGS[model_type])).eval()
    get = model.get_submodule
    if model_type == "llama":
        plan = {
            "model.layers.0.self_attn.q_proj": lambda m: to_int(m, IntFormat(bits=4, group_size=32)),
            "model.layers.0.self_attn.v_proj": lambda m: to_int(
                m, IntFormat(bits=4, group_size=32, zero_point="float")),
            "model.layers.1.mlp.down_proj": lambda m: to_int(
                m, IntFormat(bits=8, group_size=None, symmetric=True)),
            "model.layers.0.mlp.up_proj": lambda m: to_sparse(m, "bitmask"),
            "model.layers.1.self_attn.o_proj": to_lowrank,
        }
    else:
        plan = {
            "transformer.h.0.attn.c_attn": lambda m: to_int(m, IntFormat(bits=4, group_size=32)),
            "transformer.h.1.mlp.c_fc": lambda m: to_int(m, IntFormat(bits=3, group_size=64)),
            "transformer.h.0.mlp.c_proj": lambda m: to_sparse(m, "2:4"),
        }
    for name, make in plan.items():
        swap(model, name, make(get(name)))
    return model


def logits(model, seed=1):
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from memfit.models import resolve
    return AutoTokenizer.from_pretrained(resolve("default-encoder")[1])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory, tokenizer):
    model = compressed(request.param)
    out = tmp_path_factory.mktemp(request.param) / "out"
    io.save(model, tokenizer, out, recipe={"algo": "rtn", "bits": 4}, extra={"note": "test"},
            dense_dtype="keep")
    return request.param, model, out


def test_round_trip_is_bit_exact(saved):
    model_type, model, out = saved
    loaded = io.load(out)
    assert torch.equal(logits(loaded.model), logits(model))
    want = dict(model.named_modules())
    for name, m in loaded.model.named_modules():
        assert type(m) is type(want[name]), name
    for name, t in model.state_dict().items():
        got = loaded.model.state_dict()[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert loaded.arch.kind == "decoder" and loaded.tokenizer is not None
    if model_type == "gpt2":  # tied embeddings are saved once and tied again
        assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_nonpersistent_buffers_are_real(saved):
    model_type, model, out = saved
    loaded = io.load(out).model
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert not t.is_meta, name
    if model_type == "llama":
        inv = loaded.model.rotary_emb.inv_freq
        assert torch.equal(inv, model.model.rotary_emb.inv_freq)


def test_folder_layout(saved):
    model_type, model, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "memfit.json", io.BUFFERS,
            "tokenizer_config.json"} <= names
    assert not list(out.parent.glob("*.tmp-*"))
    meta = json.loads((out / "memfit.json").read_text())
    assert meta["format"] == "memfit/1" and meta["arch"] == model_type
    assert meta["recipe"] == {"algo": "rtn", "bits": 4} and meta["note"] == "test"
    assert meta["modules"] == io.describe_modules(model)
    kinds = {d["kind"] for d in meta["modules"].values()}
    assert kinds == ({"int", "sparse", "lowrank"} if model_type == "llama" else {"int", "sparse"})
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == {"quant_method": "memfit", "format": "memfit/1", "modules": meta["modules"],
                     **({"tied": meta["tied"]} if meta["tied"] else {}),
                     **({"guards": meta["guards"]} if meta["guards"] else {})}
    if model_type == "gpt2":
        from safetensors import safe_open
        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
        assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}


def test_load_model_returns_the_compressed_model(saved):
    from memfit.models import load_model

    _, model, out = saved
    loaded = load_model(str(out))
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert torch.equal(logits(loaded.model), logits(model))


def test_dtype_casts_dense_tensors_but_not_the_format(saved):
    _, model, out = saved
    loaded = io.load(out, dtype="bfloat16").model
    q = next(m for m in loaded.modules() if isinstance(m, QuantLinear))
    assert q.scale.dtype == q.fmt.torch_scale_dtype and q.qdata.dtype == torch.uint8
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16


def test_existing_folder_refused_and_overwrite_replaces(saved, tmp_path, tokenizer):
    _, model, _ = saved
    out = tmp_path / "out"
    io.save(model, tokenizer, out, recipe={"v": 1})
    with pytest.raises(UserError, match="already exists"):
        io.save(model, tokenizer, out, recipe={"v": 2})
    io.save(model, tokenizer, out, recipe={"v": 2}, overwrite=True)
    assert json.loads((out / "memfit.json").read_text())["recipe"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp-/.old- left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        io.save(model, tokenizer, other, recipe={}, overwrite=True)
    assert (other / "todo.txt").exists()


def test_full_disk_leaves_nothing(saved, tmp_path, tokenizer, monkeypatch):
    import safetensors.torch

    _, model, _ = saved

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="no space left on the device"):
        io.save(model, tokenizer, tmp_path / "out", recipe={})
    assert list(tmp_path.iterdir()) == []


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_a_user_error(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, out = saved
    bad = _copy(out, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("qdata"))
    del tensors[key]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(UserError, match="missing tensors"):
        io.load(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda m: next(iter(m["modules"].values())).update(kind="ternary"), "unknown module kind"),
    (lambda m: m.update(format="memfit/9"), "format 'memfit/9'"),
    (lambda m: next(iter(m["modules"].values())).pop("in_features"), "incomplete"),
])
def test_bad_description_is_a_user_error(saved, tmp_path, edit, message):
    _, _, out = saved
    bad = _copy(out, tmp_path / "bad")
    meta = json.loads((bad / "memfit.json").read_text())
    edit(meta)
    (bad / "memfit.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        io.load(bad)


def test_stale_quantization_config_is_replaced(tmp_path, tokenizer):
    model = compressed("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    io.save(model, tokenizer, tmp_path / "out", recipe={})
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "memfit"
    assert model.config.quantization_config == {"quant_method": "gguf"}  # the model is untouched


def test_reserved_extra_keys_refused(tmp_path, tokenizer):
    with pytest.raises(UserError, match="reserved"):
        io.save(compressed("gpt2"), tokenizer, tmp_path / "out", recipe={},
                extra={"modules": {}})


def test_dense_tensors_are_stored_at_16_bits_by_default(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = compressed("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6  # beyond float16's range: stored as bfloat16
    io.save(model, tokenizer, tmp_path / "16", recipe={})
    io.save(model, tokenizer, tmp_path / "32", recipe={}, dense_dtype="keep")
    with safe_open(str(tmp_path / "16" / io.WEIGHTS), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "F16"
    assert dtypes["model.norm.weight"] == "BF16"
    assert all(dtypes[k] == "F16" for k in dtypes if k.endswith(".scale"))  # the format's own
    assert all(dtypes[k] == "U8" for k in dtypes if k.endswith(".qdata"))
    size = {d: (tmp_path / d / io.WEIGHTS).stat().st_size for d in ("16", "32")}
    dense = sum(t.numel() for k, t in model.state_dict().items()
                if t.is_floating_point() and t.dtype == torch.float32)
    assert abs(size["32"] - size["16"] - 2 * dense) < 256  # every float32 dense tensor halved (header aside)
    before = logits(model)
    for loaded in (io.load(tmp_path / "16").model, AutoModelForCausalLM.from_pretrained(tmp_path / "16")):
        assert loaded.model.embed_tokens.weight.dtype == torch.float32  # computes in float32
        after = logits(loaded)
        err = (after - before).abs().max().item()
        print("max logit change from 16-bit dense storage:", err)
        assert 0 < err < 1e-2 * before.abs().max().item()
