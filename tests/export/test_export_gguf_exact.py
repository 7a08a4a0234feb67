"""GGUF export without a second rounding (memfit.io.gguf_blocks): a tiny Llama whose linears,
embedding table and head are on a GGUF block grid (int8 symmetric g32 -> Q8_0, int4 symmetric
g32 -> Q4_0, int4 integer-zero g32 with gguf_exact -> Q4_1) is written with memfit's own codes and
float16 scales: read back with `gguf`, every block's codes and scale equal memfit's bit for bit
(q/k rows in llama.cpp's rotary order), gguf's dequantized weights equal memfit's exactly and
transformers' GGUF loader gives memfit's logits. Layouts that do not map are named on stderr, and
`exact=True` / `--exact` refuses them with nothing written."""

import numpy as np
import pytest
import torch

from memfit.api import compress_
from memfit.cli import main
from memfit.configs import RTN
from memfit.errors import UserError
from memfit.formats.grid import IntFormat, minmax_params, round_params
from memfit.io.export_gguf import _permute_rotary, export_gguf
from memfit.models import load_model
from memfit.recipe import Recipe

LAYOUTS = {  # GGUF type -> the memfit format that is its grid
    "Q8_0": IntFormat(bits=8, group_size=32, symmetric=True),
    "Q4_0": IntFormat(bits=4, group_size=32, symmetric=True),
    "Q4_1": IntFormat(bits=4, group_size=32, gguf_exact=True),
}


def _compressed(tiny_llama_dir, fmt: IntFormat, tables: bool = True):
    m = load_model(str(tiny_llama_dir))
    extra = {"embeddings": fmt, "head": fmt} if tables else {}
    compress_(m.model, Recipe(quant=RTN(format=fmt), **extra), None, progress=False)
    return m


def _blocks(tensor, qtype: str):
    """A read-back GGUF tensor -> (codes (out, in) uint8 as memfit stores them, d, m or None)."""
    raw = np.asarray(tensor.data).view(np.uint8)
    out = raw.shape[0]
    width = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    b = raw.reshape(out, -1, width)
    head = 4 if qtype == "Q4_1" else 2
    d = torch.from_numpy(b[..., :2].copy().view("<f2")[..., 0].astype(np.float32))
    m = torch.from_numpy(b[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)) \
        if qtype == "Q4_1" else None
    q = b[..., head:]
    if qtype == "Q8_0":
        codes = q.view(np.int8).astype(np.int16) + 128
    else:
        codes = np.concatenate([q & 0x0F, q >> 4], axis=-1)
    return torch.from_numpy(codes.reshape(out, -1).astype(np.uint8)), d, m


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_codes_and_scales_survive_bit_for_bit(qtype, tiny_llama_dir, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM

    m = _compressed(tiny_llama_dir, LAYOUTS[qtype])
    path = export_gguf(m.model, tmp_path / "m.gguf", qtype, exact=True)
    assert "16 of 16 matrices keep memfit's codes" in capsys.readouterr().err
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    config = m.model.config
    checked = {"blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj", 4),
               "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj", 2),
               "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj", None),
               "token_embd.weight": ("model.embed_tokens", None),
               "output.weight": ("lm_head", None)}
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    for gname, (name, n_head) in checked.items():
        assert tensors[gname].tensor_type.name == qtype, gname
        packed = m.model.get_submodule(name).packed()
        rows = torch.arange(packed.shape[0])
        if n_head is not None:
            rows = _permute_rotary(rows, n_head)
        codes, d, mins = _blocks(tensors[gname], qtype)
        assert torch.equal(codes, packed.codes()[rows]), gname
        assert torch.equal(d, packed.scale.float()[rows]), gname
        if mins is not None:
            assert torch.equal(mins, (-packed.zeros() * packed.scale.float())[rows]), gname
        back = gguf.quants.dequantize(np.asarray(tensors[gname].data), tensors[gname].tensor_type)
        assert torch.equal(torch.from_numpy(back), packed.dequantize()[rows]), gname
    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    with torch.no_grad():
        diff = (loaded(ids).logits - m.model(ids).logits).abs().max().item()
    print(f"{qtype}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_gguf_exact_scales_make_the_float16_minimum_exact():
    w = torch.randn(256, 64) * torch.logspace(-7, 2, 256)[:, None]
    for bits in (2, 3, 4, 8):
        fmt = IntFormat(bits=bits, group_size=32, gguf_exact=True)
        s, z = round_params(*minmax_params(w, fmt), fmt)
        assert torch.equal(s.half().float(), s) and torch.equal((-z * s).half().float(), -z * s)
        usual = IntFormat(bits=bits, group_size=32)
        plain, _ = round_params(*minmax_params(w, usual), usual)
        normal = plain >= 2.0**-14  # float16 normals; tinier scales are raised to a floor
        moved = ((s - plain).abs() / plain)[normal]  # 11 - bits significant bits, not 11
        assert moved.max() <= 2.0 ** -(11 - bits) + 2.0 ** -11 and (moved > 0).any()
    with pytest.raises(UserError, match="gguf_exact needs scale_dtype float16"):
        IntFormat(bits=4, group_size=32, gguf_exact=True, scale_dtype="bfloat16")
    with pytest.raises(UserError, match="gguf_exact needs"):
        IntFormat(bits=4, group_size=32, gguf_exact=True, zero_point="float")


def test_a_rounded_q4_1_minimum_is_said_and_exact_refuses(tiny_llama_dir, tmp_path, capsys):
    m = _compressed(tiny_llama_dir, IntFormat(bits=4, group_size=32), tables=False)
    with pytest.raises(UserError, match="minimum -zero\\*scale is rounded.*gguf_exact"):
        export_gguf(m.model, tmp_path / "a.gguf", "Q4_1", exact=True)
    assert not list(tmp_path.iterdir())
    export_gguf(m.model, tmp_path / "b.gguf", "Q4_1")
    err = capsys.readouterr().err
    assert "14 of 16 matrices keep memfit's codes and scales as GGUF blocks (14 Q4_1)" in err
    assert "14 Q4_1 matrices keep memfit's codes but their float16 minimum" in err
    assert "2 float matrices are rounded to the requested type" in err  # embedding and head


def test_layouts_gguf_cannot_hold_are_named_and_exact_refuses(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "w4g64"
    assert main(["compress", str(tiny_llama_dir), "--recipe", "w4g64", "--format", "memfit",
                 "--out", str(src)]) == 0
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--format", "gguf", "--type", "Q4_0", "--out", str(out),
                 "--exact"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing written" in err
    assert "quantized again, e.g. blk.0.attn_q.weight (int4 asymmetric group 64; Q4_0 is int4 " \
           "symmetric group 32)" in err
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
    assert main(["export", str(src), "--format", "gguf", "--type", "Q4_K", "--out", str(out)]) == 0
    assert "(int4 asymmetric group 64 is no GGUF block type)" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "gguf", "--type", "F32", "--out",
                 str(tmp_path / "f.gguf"), "--exact"]) == 0  # float32 holds every weight


def test_file_type_is_what_most_matrices_are(tiny_llama_dir, tmp_path, capsys):
    import gguf

    m = _compressed(tiny_llama_dir, LAYOUTS["Q4_1"], tables=False)
    path = export_gguf(m.model, tmp_path / "m.gguf", "Q8_0")  # asked Q8_0, 14 of 16 stay Q4_1
    field = gguf.GGUFReader(str(path)).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == 3  # llama.cpp's MOSTLY_Q4_1
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"


def test_bfloat16_scales_keep_codes_and_say_what_rounds(tiny_llama_dir, tmp_path, capsys):
    fmt = IntFormat(bits=8, group_size=32, symmetric=True, scale_dtype="bfloat16")
    m = _compressed(tiny_llama_dir, fmt, tables=False)
    q = m.model.model.layers[0].self_attn.q_proj
    q.scale[0, 0] = 2.0**-20 + 2.0**-27  # a bfloat16 value float16 cannot hold (its subnormals)
    export_gguf(m.model, tmp_path / "a.gguf", "Q8_0")
    err = capsys.readouterr().err
    assert "14 of 16 matrices keep memfit's codes" in err
    assert "1 matrix keeps memfit's codes but their bfloat16 scales are rounded to GGUF's " \
           "float16 (max weight change" in err and "in blk.0.attn_q.weight" in err
    with pytest.raises(UserError, match="bfloat16 scales are rounded"):
        export_gguf(m.model, tmp_path / "b.gguf", "Q8_0", exact=True)
