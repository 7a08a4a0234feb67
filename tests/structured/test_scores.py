"""Pure structured-pruning scores: block influence, channel/head/KV-group scores, index choice."""

import math

import pytest
import torch

from memfit.algos import structured as S
from memfit.errors import UserError


def test_block_influence_range_and_extremes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, generator=g)
    assert S.block_influence(x, x) == pytest.approx(0.0, abs=1e-3)
    assert S.block_influence(x, 3.0 * x) == pytest.approx(0.0, abs=1e-3)  # scale does not count
    assert S.block_influence(x, -x) == pytest.approx(1.0, abs=1e-3)
    y = torch.randn(2, 8, 32, generator=g)
    d = S.angular_distances(x, y)
    assert d.shape == (16,) and ((d >= 0) & (d <= 1)).all()
    # per token arccos(cos)/π, averaged
    cos = torch.nn.functional.cosine_similarity(x.reshape(16, 32), y.reshape(16, 32), dim=-1)
    assert S.block_influence(x, y) == pytest.approx(float((torch.arccos(cos) / math.pi).mean()),
                                                    abs=1e-6)


def test_choose_blocks_to_drop_lowest_first_ties_to_earlier():
    assert S.choose_blocks_to_drop([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert S.choose_blocks_to_drop([0.3, 0.1, 0.2, 0.1], 3) == [1, 2, 3]
    assert S.choose_blocks_to_drop([0.5, 0.5], 1) == [0]
    assert S.choose_blocks_to_drop([0.5, 0.5], 0) == []
    for bad in (2, 3, -1, 1.5):
        with pytest.raises(UserError):
            S.choose_blocks_to_drop([0.5, 0.5], bad)


def test_keep_indices_sorted_topk_and_bounds():
    s = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2])
    assert S.keep_indices(s, 2).tolist() == [1, 3]
    assert S.keep_indices(s, 5).tolist() == [0, 1, 2, 3, 4]
    for bad in (0, 6, -1, True):
        with pytest.raises(UserError, match="cannot keep"):
            S.keep_indices(s, bad)


def test_keep_count_fraction_and_count():
    assert S.keep_count(128, 0.5) == 64 and S.keep_count(10, 0.25) == 3
    assert S.keep_count(10, 0.01) == 1
    assert S.keep_count(128, 128) == 128
    for bad in (0, 129, 0.0, 1.5, "half", True):
        with pytest.raises(UserError):
            S.keep_count(128, bad)


def test_mlp_channel_score_is_exact_output_rms():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 12, generator=g) * torch.rand(12, generator=g)  # (tokens, inter)
    W = torch.randn(6, 12, generator=g)                                     # (hidden, inter)
    rms = a.pow(2).mean(0).sqrt()
    got = S.mlp_channel_scores(rms, W)
    # sqrt(E‖a_j W[:, j]‖²) computed directly
    ref = torch.stack([(a[:, j:j + 1] * W[:, j]).pow(2).sum(1).mean().sqrt() for j in range(12)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError):
        S.mlp_channel_scores(rms[:5], W)


def test_head_and_kv_group_scores_follow_gqa_layout():
    heads, kv, hd = 4, 2, 3
    W = torch.ones(5, heads * hd)
    rms = torch.ones(heads * hd)
    rms[2 * hd:3 * hd] = 10.0  # head 2 -> KV group 1 (heads 2, 3 share KV head 1)
    ph = S.head_scores(rms, W, heads, hd)
    assert ph.argmax().item() == 2
    torch.testing.assert_close(ph[0], torch.tensor(math.sqrt(hd * 5.0)))
    g = S.kv_group_scores(ph, kv)
    assert g.shape == (2,) and g.argmax().item() == 1
    q_rows, kv_rows = S.gqa_indices(torch.tensor([1]), heads, kv, hd)
    assert q_rows.tolist() == list(range(2 * hd, 4 * hd))
    assert kv_rows.tolist() == list(range(hd, 2 * hd))


def test_groups_for_heads_requires_whole_groups():
    assert S.groups_for_heads(8, 2, 4) == 1 and S.groups_for_heads(8, 8, 3) == 3
    for bad in (3, 0, 12, 5):
        with pytest.raises(UserError, match="KV groups of 4"):
            S.groups_for_heads(8, 2, bad)
