"""Encoder calibration windows: whole sentence-like lines of the calib split, [CLS] first, no
padding, the same text as the lines tokenized one by one."""

import pytest
import torch

from memfit.calib.data import sentence_windows, sentences
from memfit.errors import UserError


@pytest.fixture
def tok(encoder_tokenizer):
    return encoder_tokenizer


def test_windows_are_full_cls_led_and_in_document_order(tok):
    w = sentence_windows(tok, "builtin", "calib", seq_len=32)
    assert w.shape[1] == 32 and len(w) > 100
    assert (w[:, 0] == tok.cls_token_id).all()
    assert not (w[:, 1:] == tok.cls_token_id).any() and not (w == tok.pad_token_id).any()
    lines = sentences("builtin", "calib", limit=None)
    first = tok(lines[:5], add_special_tokens=False)["input_ids"]
    stream = [t for ids in first for t in (*ids, tok.sep_token_id)]
    assert w[0, 1:].tolist() == stream[:31]
    assert w[1, 1:].tolist() == stream[31:62]


def test_seeded_subset_and_split_apart(tok):
    a = sentence_windows(tok, "builtin", "calib", seq_len=32, max_windows=8, seed=0)
    b = sentence_windows(tok, "builtin", "calib", seq_len=32, max_windows=8, seed=0)
    every = sentence_windows(tok, "builtin", "calib", seq_len=32)
    assert torch.equal(a, b) and len(a) == 8
    assert all(any(torch.equal(x, y) for y in every) for x in a)
    ev = sentence_windows(tok, "builtin", "eval", seq_len=32)
    assert not torch.equal(ev[:8], every[:8])


def test_a_tokenizer_without_cls_is_refused(tok):
    class NoCls:
        cls_token_id, sep_token_id = None, 102

    with pytest.raises(UserError, match="classifier"):
        sentence_windows(NoCls(), "builtin", "calib", seq_len=32)
