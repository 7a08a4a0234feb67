"""FSDP2 on 4 gloo ranks (one window each) reproduces one rank; a batch that does not split and
model copies that differ across ranks are refused on every rank."""

import pytest

from memfit.train import TrainOptions, train_to

from .conftest import run_workers

OPTS = {"steps": 4, "lr": 1e-3, "seq_len": 64, "batch_size": 4, "samples": 64}


def test_four_ranks_match_one_rank(train_llama_dir, tmp_path):
    one = train_to(str(train_llama_dir), None, TrainOptions(**OPTS))
    four = run_workers(4, train_llama_dir, tmp_path / "w4", [{"name": "fp32", "options": OPTS}])[0]
    assert four["fp32"]["world_size"] == 4
    diffs = [abs(a - b) for a, b in zip(one["loss"], four["fp32"]["loss"], strict=True)]
    print(f"4 ranks vs 1: max loss diff {max(diffs):.2e}")
    assert max(diffs) <= 1e-4


def test_batch_that_does_not_split_is_refused(train_llama_dir, tmp_path):
    with pytest.raises(AssertionError, match="does not split over 2 ranks"):
        run_workers(2, train_llama_dir, tmp_path / "bad", [{"name": "x", "options": {
            **OPTS, "batch_size": 3}}])


def test_different_model_copies_are_refused(train_llama_dir, save_tiny, tmp_path):
    other = save_tiny(tmp_path / "other", seed=7)
    with pytest.raises(AssertionError, match="differs across ranks") as e:
        run_workers(2, f"{train_llama_dir},{other}", tmp_path / "mm",
                    [{"name": "x", "options": OPTS}])
    assert str(e.value).count("differs across ranks") >= 2  # both ranks say so
