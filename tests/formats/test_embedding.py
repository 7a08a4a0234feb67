"""Embedding tables and output heads on the integer grid: accuracy, ties kept, save/load."""

import json

import pytest
import torch
from safetensors import safe_open

from memfit.api import compress_
from memfit.formats.embedding import QuantEmbedding
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.io import save as io
from memfit.methods import quantize_embeddings_
from memfit.recipe import Recipe

INT8 = IntFormat(bits=8, group_size=None, symmetric=True)
INT4 = IntFormat(bits=4, group_size=32)


def _model(tiny_config, model_type="llama", **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **kw)).eval()


def _ids():
    return torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(1))


def _sqnr(w, w_hat):
    return 10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()).item()


@pytest.mark.parametrize("fmt,min_db", [(INT8, 35), (INT4, 15)], ids=["int8", "int4g32"])
def test_rows_are_read_exactly_from_the_packed_table(tiny_config, fmt, min_db):
    m = _model(tiny_config, tie_word_embeddings=False)
    dense = m.get_input_embeddings().weight.detach().clone()
    quantize_embeddings_(m, fmt, None)
    qe = m.get_input_embeddings()
    assert isinstance(qe, QuantEmbedding)
    table = qe.dequantize()
    db = _sqnr(dense, table)
    print(f"{fmt}: SQNR {db:.1f} dB, {qe.nbytes()} bytes vs {dense.numel() * 4} float32")
    assert db > min_db and qe.nbytes() < dense.numel() * 4 * (0.27 if fmt.bits == 8 else 0.2)
    ids = _ids()
    assert torch.equal(qe(ids), table[ids])  # only the gathered rows, same values


def test_tied_head_shares_the_packed_table_and_saves_once(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memfit.models import resolve

    m = _model(tiny_config, tie_word_embeddings=True)
    rep = quantize_embeddings_(m, INT8, INT8)
    qe, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.qdata is qe.qdata and head.scale is qe.scale
    ids = _ids()
    with torch.no_grad():
        before = m(ids).logits
    tok = AutoTokenizer.from_pretrained(resolve("default-encoder")[1])
    io.save(m, tok, tmp_path / "t", recipe={}, dense_dtype="keep")
    with safe_open(str(tmp_path / "t" / io.WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("qdata") and ("embed" in k or "lm_head" in k) for k in keys) == 1
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # no loader ties a dense weight back
    for loaded in (io.load(tmp_path / "t").model, AutoModelForCausalLM.from_pretrained(tmp_path / "t")):
        assert loaded.lm_head.qdata is loaded.model.embed_tokens.qdata
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, before)
    assert rep["embeddings"] == rep["head"] == qe.nbytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_packed_embedding_returns_the_compute_dtype(tiny_config, tmp_path, dtype):
    """A folder loaded in bfloat16 computes in bfloat16 from its packed embedding on (its rows
    came back float32, and the residual stream with them), and in float32 when asked."""
    from transformers import AutoTokenizer

    from memfit.models import resolve

    m = _model(tiny_config, tie_word_embeddings=False)
    quantize_embeddings_(m, INT8, INT8)
    tok = AutoTokenizer.from_pretrained(resolve("default-encoder")[1])
    io.save(m, tok, tmp_path / "t", recipe={})
    loaded = io.load(tmp_path / "t", dtype=dtype).model
    ids = _ids()
    assert loaded.get_input_embeddings()(ids).dtype == dtype
    seen = []
    block = loaded.model.layers[0]
    block.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    with torch.no_grad():
        loaded(ids)
    assert seen == [dtype]


def test_one_side_quantized_unties(tiny_config, tmp_path):
    m = _model(tiny_config, tie_word_embeddings=True)
    dense_head = m.get_output_embeddings().weight.detach().clone()
    quantize_embeddings_(m, INT4, None)
    assert torch.equal(m.get_output_embeddings().weight, dense_head)  # the head stays dense
    ids = _ids()
    with torch.no_grad():
        before = m(ids).logits
    io.save(m, None, tmp_path / "u", recipe={}, dense_dtype="keep")
    with torch.no_grad():
        assert torch.equal(io.load(tmp_path / "u").model(ids).logits, before)


def test_scaled_embeddings_keep_their_scale(tiny_config):
    m = _model(tiny_config, "gemma3_text", head_dim=16)
    ids = _ids()
    ref = m.get_input_embeddings()(ids)
    quantize_embeddings_(m, INT8, None)
    got = m.get_input_embeddings()(ids)
    assert _sqnr(ref, got) > 35  # Gemma multiplies by sqrt(hidden): kept


def test_recipe_embeddings_and_head(tiny_llama_dir):
    from memfit.models import load_model

    calib = torch.randint(0, 30522, (4, 32), generator=torch.Generator().manual_seed(2))
    recipe = Recipe.from_dict({"quant": {"algo": "rtn", "bits": 4, "group_size": 32},
                               "embeddings": {"bits": 8, "group_size": None, "symmetric": True},
                               "head": {"bits": 4, "group_size": 32}})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    plain = load_model(str(tiny_llama_dir)).model
    m = load_model(str(tiny_llama_dir)).model
    base = compress_(plain, "w4g64", calib, progress=False)
    rep = compress_(m, recipe, calib, progress=False)
    assert set(rep["embedding_bytes"]) == {"embeddings", "head"}
    assert rep["bytes_after"] < base["bytes_after"] / 2  # the tables were most of the bytes
    with torch.no_grad():
        assert torch.isfinite(m(calib[:1]).logits).all()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_only_folder_refuses_plain_transformers(tiny_config, tmp_path, tied):
    """Only the tables compressed: transformers without `import memfit` must not build a model
    from a random embedding (the `<table>.weight` guards give a size mismatch)."""
    import subprocess
    import sys

    m = _model(tiny_config, tie_word_embeddings=tied)
    quantize_embeddings_(m, INT8, INT8 if tied else None)
    io.save(m, None, tmp_path / "e", recipe={}, dense_dtype="keep")
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'e')!r})\n"
            "assert 'memfit' not in sys.modules\nprint('LOADED')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "mismatch" in r.stderr.lower(), r.stderr[-2000:]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(io.load(tmp_path / "e").model(ids).logits, m(ids).logits)
