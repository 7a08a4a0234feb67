"""8-bit AdamW on FSDP2 DTensor shards: against float32 AdamW at world size 1, and on 2 ranks
(each rank quantizes its own shard) against one rank."""

import pytest

from memfit.train import TrainOptions, train_to

from .conftest import run_workers

OPTS = {"steps": 6, "lr": 1e-3, "seq_len": 64, "batch_size": 4, "samples": 32}


@pytest.fixture(scope="module")
def one_rank(train_llama_dir):
    return {name: train_to(str(train_llama_dir), None, TrainOptions(**OPTS, optim=name))
            for name in ("adamw", "adamw8bit")}


def test_8bit_on_fsdp_dtensors_matches_float32(one_rank):
    a, b = one_rank["adamw"], one_rank["adamw8bit"]
    rel = max(abs(x - y) / y for x, y in zip(b["loss"], a["loss"], strict=True))
    print(f"FSDP2 world 1: loss {a['loss'][-1]:.5f} (adamw) vs {b['loss'][-1]:.5f} (8-bit), "
          f"max rel diff {rel:.2e}; state {a['optimizer_state_bytes']} vs "
          f"{b['optimizer_state_bytes']} bytes")
    assert rel < 0.005
    assert b["optimizer_state_bytes"] / a["optimizer_state_bytes"] < 0.27


def test_8bit_on_two_ranks_with_checkpointing(one_rank, train_llama_dir, tmp_path):
    opts = {**OPTS, "optim": "adamw8bit", "ac": "full"}
    two = run_workers(2, train_llama_dir, tmp_path / "w", [{"name": "8", "options": opts}])
    one = one_rank["adamw8bit"]
    diff = max(abs(x - y) for x, y in zip(one["loss"], two[0]["8"]["loss"], strict=True))
    print(f"8-bit on 2 ranks (own blocks per shard) vs 1 rank: max loss diff {diff:.2e}")
    assert diff < 1e-3  # block boundaries differ between one shard and two
    per_rank = [r["8"]["optimizer_state_bytes"] for r in two]
    assert abs(sum(per_rank) / one["optimizer_state_bytes"] - 1) < 0.01
