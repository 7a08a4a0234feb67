"""A compressed encoder folder reloads with sentence-transformers (`pip install -e '.[st]'`;
skipped without it): `import memfit`, then `SentenceTransformer(DIR)` gives memfit's embeddings
(sentence-transformers normalizes them: its all-MiniLM-L6-v2 pipeline ends with Normalize).
Tested on memfit's own format (`--format memfit`); a compressed-tensors folder of this encoder
fails at sentence-transformers' first forward (benchmarks/RESULTS.md, issue 14)."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow


def test_sentence_transformers_loads_a_memfit_folder(tmp_path, monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import memfit  # noqa: F401 -- registers memfit's quantizer with transformers
    from memfit.compress import CompressOptions, compress_to
    from memfit.eval.encoder import embed, held_apart
    from memfit.models import load_model

    out = tmp_path / "w8"
    compress_to("default-encoder", "w8", out, CompressOptions(progress=False, format="memfit"))
    sents = held_apart("builtin", "eval", 32)
    got = st.SentenceTransformer(str(out), device="cpu").encode(sents, convert_to_tensor=True)
    m = load_model(str(out))
    want = F.normalize(embed(m.model, m.tokenizer, sents), dim=1)
    err = (got.cpu().float() - want).abs()
    print(f"max |diff| {err.max():.2e}, mean {err.mean():.2e}")
    assert err.max() < 1e-5
    assert torch.isfinite(got).all()
