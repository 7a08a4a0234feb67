"""`memfit compress` on an encoder (a tiny random BERT): the artifact, its smoke check, reloads
through memfit and plain transformers, `memfit eval --ref` on it, and the refusals."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from memfit.cli import main
from memfit.eval.encoder import embed
from memfit.formats.quant_linear import QuantLinear
from memfit.models import load_model

FAST = ["--samples", "8", "--seq-len", "64"]
SENTS = ["The assert statement checks a condition.", "A list comprehension builds a list.",
         "Classes bundle data and functionality together.", "x"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_int8_encoder_artifact_reloads_and_evaluates(capsys, tiny_bert_dir, tmp_path):
    out = tmp_path / "w8"
    code, stdout, err = _run(capsys, "compress", tiny_bert_dir, "--recipe", "w8-gptq",
                             "--out", out, "--json", *FAST)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["smoke"]["cosine_mean"] >= 0.999 and rep["smoke"]["sentences"] == 64
    assert rep["calib_windows"] == 8 and rep["calib_seq_len"] == 64
    assert rep["bytes_after"] < rep["bytes_before"]
    ours = load_model(str(out))
    assert ours.kind == "encoder"
    assert sum(isinstance(m, QuantLinear) for m in ours.model.modules()) == 12
    from transformers import AutoModel, AutoTokenizer

    import memfit  # noqa: F401 -- registers the quantizer with transformers
    hf = AutoModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    a, b = embed(ours.model, ours.tokenizer, SENTS), embed(hf, tok, SENTS)
    assert torch.equal(a, b)
    ref = load_model(str(tiny_bert_dir))
    assert F.cosine_similarity(a, embed(ref.model, ref.tokenizer, SENTS)).min() > 0.999
    code, stdout, err = _run(capsys, "eval", out, "--ref", tiny_bert_dir, "--json")
    res = json.loads(stdout)
    assert code == 0 and res["kind"] == "encoder" and res["cosine_mean"] >= 0.999, err


def test_the_smoke_check_compares_embeddings(capsys, tiny_bert_dir, tmp_path):
    """2-bit RTN moves the tiny model's embeddings (cosine 0.78): the default 0.8 refuses it."""
    out = tmp_path / "w2"
    recipe = tmp_path / "w2.yaml"
    recipe.write_text("quant: {algo: rtn, bits: 2, group_size: 32}\n")
    code, _, err = _run(capsys, "compress", tiny_bert_dir, "--recipe", recipe, "--out", out)
    assert code == 3 and "mean embedding cosine" in err and not out.exists(), err
    code, stdout, err = _run(capsys, "compress", tiny_bert_dir, "--recipe", recipe, "--out", out,
                             "--min-cosine", "0.5")
    assert code == 0 and "embedding cosine mean 0.7" in stdout, (stdout, err)


def test_sentence_transformers_files_travel(capsys, tiny_bert_dir, tmp_path):
    src = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, src)
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (src / "sentence_bert_config.json").write_text('{"max_seq_length": 40}')
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    code, stdout, err = _run(capsys, "compress", src, "--recipe", "w4g64-gptq", "--out",
                             tmp_path / "q", "--samples", "4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["calib_seq_len"] == 40  # capped at the length the model is used at
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (tmp_path / "q" / name).read_text() == (src / name).read_text()


@pytest.mark.parametrize("recipe, option", [
    (("quant: {algo: rtn, bits: 8, group_size: null, symmetric: true}\n"
      "head: {bits: 8, group_size: null, symmetric: true}\n"), "'head'"),
    ("quant: {algo: gptq, bits: 4, group_size: 64}\ncalib: {bos: always}\n", "calib.bos"),
    ("structured: {mlp_keep: 0.5}\n", "structured.mlp_keep"),
])
def test_decoder_only_options_are_refused(capsys, tiny_bert_dir, tmp_path, recipe, option):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    code, _, err = _run(capsys, "compress", tiny_bert_dir, "--recipe", path, "--out", tmp_path / "o")
    assert code == 2 and option in err and "encoder" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_bos_flag_is_refused_on_an_encoder(capsys, tiny_bert_dir, tmp_path):
    code, _, err = _run(capsys, "compress", tiny_bert_dir, "--recipe", "w8", "--bos", "never",
                        "--out", tmp_path / "o")
    assert code == 2 and "--bos" in err and "decoder-only" in err, err


def test_an_encoder_without_tokenizer_is_refused(capsys, tiny_bert_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, bare / name)
    for argv in (("eval", bare), ("compress", bare, "--recipe", "w8", "--out", tmp_path / "o")):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "without a tokenizer" in err, err
