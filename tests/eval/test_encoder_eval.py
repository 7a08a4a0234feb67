"""The encoder retrieval protocol: held-apart sentences (distinct, 5+ words, spread over the
split) and nearest-neighbour agreement with and without the reference-margin rule."""

import math

import pytest
import torch

from memfit.errors import UserError
from memfit.eval.encoder import MARGIN, compare, held_apart, neighbour_agreement


def _text(tmp_path, lines):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_held_apart_distinct_sentences_spread_over_the_split(tmp_path):
    lines = [f"sentence number {i} has enough words" for i in range(100)]
    lines[10] = "sentence   number 0 has enough words"  # a repeat up to whitespace
    lines[20] = "four words are here, short"[:21]  # "four words are here," - 4 words
    src = _text(tmp_path, lines)
    got = held_apart(src, "all", n=10)
    assert len(got) == len(set(got)) == 10
    pool = [s for i, s in enumerate(lines) if i not in (10, 20)]
    assert got == [pool[i * 98 // 10] for i in range(10)]  # evenly spaced, first to last tenth
    assert held_apart(src, "all", n=500) == pool  # fewer than n: all of them


def test_held_apart_needs_two_sentences(tmp_path):
    src = _text(tmp_path, ["only one sentence of five words", "too short line here"])
    with pytest.raises(UserError, match="fewer than 2 distinct"):
        held_apart(src, "all")


def test_margin_rule_counts_only_clear_queries():
    # 0 and 1 are a close pair (a tie under the reference); 2 and 3 a clear pair
    ref = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.001, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.5]])
    ref = torch.cat([ref, torch.tensor([[1.0, 0.0, 0.002]])])  # 4: as close to 0 as 1 is
    emb = ref.clone()
    emb[4] = torch.tensor([1.0, 0.0, 0.0005])  # 4 now nearest to 0, and 0 nearest to 4
    strict = neighbour_agreement(emb, ref)
    clear = neighbour_agreement(emb, ref, MARGIN)
    assert strict < 1.0 and clear == 1.0
    rep = compare(emb, ref)
    assert rep["neighbour_agreement"] == strict and rep["neighbour_agreement_clear"] == clear
    assert rep["clear_queries"] == 2  # 2 and 3; 0, 1 and 4 are ties under the reference
    assert math.isnan(neighbour_agreement(emb[:3] * 0 + 1, ref[:3] * 0 + 1, MARGIN))


def test_identical_embeddings_agree_fully():
    e = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    rep = compare(e, e.clone())
    assert rep["neighbour_agreement"] == 1.0 and rep["cosine_min"] > 0.99999
