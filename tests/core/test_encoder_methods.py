"""Every method family on encoder blocks (a tiny random BERT, calibrated on sentence windows):
each lowers the bytes, keeps the embeddings close in proportion to how lossy it is, and the saved
folder reloads to the same embeddings through memfit and through plain transformers."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from memfit.api import compress_
from memfit.calib.data import sentence_windows, sentences
from memfit.eval.encoder import embed
from memfit.eval.memory import weight_table
from memfit.formats.sparse import SparseLinear
from memfit.models import load_model

# (preset, minimum mean cosine to the original on held-apart sentences, packed formats).
# Measured on this model: w8 0.99996, w4g64 RTN 0.990 (4-bit GPTQ/HQQ above it), Wanda 2:4 0.905.
CASES = [
    ("w8-gptq", 0.9995, ["int8 group channel sym, float16 scales"]),
    ("w4g64-hqq", 0.98, None),
    ("w4g32-gptq", 0.985, None),
    ("magnitude-50", 0.8, ["sparse bitmask"]),
    ("wanda-2of4", 0.85, ["sparse 2:4"]),
    ("sparsegpt-2of4", 0.85, ["sparse 2:4"]),
    ("sparsegpt-2of4-w4g64", 0.8, None),
    ("wsvd-80", 0.9, ["low-rank"]),
    ("drop2", 0.5, []),
]


@pytest.fixture(scope="module")
def data(encoder_tokenizer):
    calib = sentence_windows(encoder_tokenizer, "builtin", "calib", seq_len=64, max_windows=16,
                             seed=0)
    return calib, sentences("builtin", "eval", limit=64)


@pytest.mark.parametrize("preset, min_cos, formats", CASES)
def test_method_on_encoder_blocks(preset, min_cos, formats, tiny_encoder, encoder_tokenizer,
                                  data):
    calib, sents = data
    ref = embed(tiny_encoder(num_hidden_layers=3), encoder_tokenizer, sents)
    model = tiny_encoder(num_hidden_layers=3)
    rep = compress_(model, preset, calib, progress=False)
    got = embed(model, encoder_tokenizer, sents)
    cos = F.cosine_similarity(got, ref).mean().item()
    assert rep["bytes_after"] < rep["bytes_before"]
    assert cos >= min_cos, (preset, cos)
    packed = weight_table(model)["packed"]
    if formats is not None:
        assert [p["format"] for p in packed] == formats, packed
    if preset == "drop2":
        assert model.config.num_hidden_layers == 1 and len(model.encoder.layer) == 1
        assert rep["kept_blocks"] is not None and len(rep["kept_blocks"]) == 1


@pytest.mark.parametrize("preset", ["wanda-2of4", "sparsegpt-2of4"])
def test_two_of_four_is_two_of_four(preset, tiny_encoder, data):
    model = tiny_encoder()
    compress_(model, preset, data[0], progress=False)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 12
    for m in sparse:
        w = m.dequantize(torch.float32)
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros >= 2).all() and (zeros == 2).float().mean() > 0.99


def test_int8_embeddings_table_on_an_encoder(tiny_encoder, encoder_tokenizer, data, tmp_path):
    """`embeddings:` (int8 per row) works on an encoder's word embeddings; saved and reloaded by
    memfit and by transformers' AutoModel, the embeddings are the same."""
    from transformers import AutoModel

    import memfit  # noqa: F401 -- registers the quantizer with transformers
    from memfit.formats.embedding import QuantEmbedding
    from memfit.io.save import save
    from memfit.recipe import load_recipe

    recipe = load_recipe("w8")
    recipe = replace(recipe, embeddings=recipe.quant.format)
    model = tiny_encoder()
    ref = embed(tiny_encoder(), encoder_tokenizer, data[1])
    rep = compress_(model, recipe, None, progress=False)
    assert isinstance(model.embeddings.word_embeddings, QuantEmbedding)
    assert rep["bytes_after"] < 0.3 * rep["bytes_before"]
    got = embed(model, encoder_tokenizer, data[1])
    assert F.cosine_similarity(got, ref).mean() > 0.999
    save(model, encoder_tokenizer, tmp_path / "e8", recipe=recipe.to_dict(), dense_dtype="keep")
    ours = load_model(str(tmp_path / "e8"))
    hf = AutoModel.from_pretrained(tmp_path / "e8").eval()
    assert torch.equal(embed(ours.model, encoder_tokenizer, data[1]), got)
    assert torch.equal(embed(hf, encoder_tokenizer, data[1]), got)


@pytest.mark.parametrize("model_type, usable", [("bert", 64), ("roberta", 63), ("mpnet", 62)])
def test_used_length_leaves_out_positions_before_the_padding_index(tmp_path, model_type,
                                                                   usable):
    """RoBERTa numbers positions from its padding index + 1 (here 0 + 1), MPNet from its fixed
    padding index 1 + 1: a window of `used_length` tokens must still have a position row. The
    tokenizer's own limit (512) is longer, so the positions decide."""
    from memfit.encoders import used_length
    from tests.conftest import save_tiny_encoder

    path = save_tiny_encoder(tmp_path / model_type, model_type, max_position_embeddings=64)
    loaded = load_model(str(path))
    assert used_length(loaded) == usable
    ids = torch.full((1, usable), 2000)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).last_hidden_state).all()
    with pytest.raises((IndexError, RuntimeError)):  # one token more has no position row
        loaded.model(input_ids=torch.full((1, usable + 1), 2000))
