"""memfit.parallel.tp_load: a rank's shard read block by block equals the whole model loaded
and split, it never holds the whole model, and what it does not take falls back."""

import json
import os
import subprocess
import sys

import pytest
import torch

from memfit.parallel.tp_load import load_rank, streamable


def splitter(rank: int, world: int = 2):
    """memfit.parallel.tp's split of one block for `rank`, as TPSession.load passes it."""
    from memfit.archs import text_config
    from memfit.parallel.plans import plan_for
    from memfit.parallel.tp import shard_block_

    return lambda block, config: shard_block_(block, plan_for(text_config(config)), config,
                                              rank, world)

GQA = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 144, "head_dim": 16,
       "intermediate_size": 192, "initializer_range": 0.1}


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_shard_equals_load_then_split(tmp_path, save_tiny, tied):
    from memfit.models import load_model
    from memfit.parallel.tp import parallelize_

    path = save_tiny(tmp_path / "m", tie_word_embeddings=tied, **GQA)
    assert streamable(str(path))
    for rank in range(2):
        got, part, sums = load_rank(str(path), splitter(rank))
        whole = load_model(str(path)).model
        report = parallelize_(whole, rank, 2)
        mine, ref = got.model.state_dict(), whole.state_dict()
        assert sorted(mine) == sorted(ref)
        assert all(torch.equal(mine[k], ref[k]) for k in ref)
        assert (part["kv"][1] - part["kv"][0]) // 16 == report["kv_heads"] == (2 - rank)
        assert got.model.get_input_embeddings().weight.device.type == "cpu"
        assert (got.model.lm_head.weight is got.model.get_input_embeddings().weight) == tied
        assert sums.dtype == torch.float64 and sums.numel() > 10


def test_packed_and_encoder_folders_are_not_streamed(tmp_path, save_tiny, tiny_bert_dir):
    from memfit.compress import CompressOptions, compress_to

    path = save_tiny(tmp_path / "m", **GQA)
    compress_to(str(path), "w8", tmp_path / "q", CompressOptions(samples=2, seq_len=32,
                                                                    smoke_windows=1, format="memfit"))
    assert not streamable(str(tmp_path / "q"))
    assert load_rank(str(tmp_path / "q"), splitter(0)) is None
    assert not streamable(str(tiny_bert_dir))


_MEASURE = """
import json, sys
from memfit.eval.memory import steady_malloc
from memfit.models import load_model
from memfit.archs import text_config
from memfit.parallel.plans import plan_for
from memfit.parallel.tp import parallelize_, shard_block_
from memfit.parallel.tp_load import load_rank
import transformers.models.llama.modeling_llama  # imports first
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
steady_malloc()
base = hwm()
if sys.argv[2] == "streamed":
    split = lambda block, c: shard_block_(block, plan_for(text_config(c)), c, 0, 2)
    m = load_rank(sys.argv[1], split)[0].model
else:
    m = load_model(sys.argv[1]).model
    parallelize_(m, 0, 2)
kept = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(json.dumps([hwm() - base, kept]))
"""


def load_growth(path, how: str) -> tuple[int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how], capture_output=True,
                          text=True, env=env, check=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def test_rank_peak_is_its_shard_plus_one_block(tmp_path, save_tiny):
    """24 blocks of 8.9 MB fp32 (306.2 MB of weights with the 30522-row embedding and head):
    loaded whole and split, a rank's load peak holds the whole model; read block by block it
    holds its half, the replicated tensors, about one whole block more and what does not depend
    on the model (the tokenizer: ~25 MB). Each way in a fresh process, VmHWM growth over the
    imports (measured here: 306.4 MB whole then split, 224.9 MB block by block, 200.0 MB kept;
    CI once 305.8 MB whole then split)."""
    from memfit.io.stream import CheckpointIndex

    shape = {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 4,
                 "num_key_value_heads": 2}  # the carried tokenizer's 30522-token vocabulary
    deep = save_tiny(tmp_path / "deep", num_hidden_layers=24, **shape)
    shallow = save_tiny(tmp_path / "shallow", num_hidden_layers=1, **shape)
    total = CheckpointIndex(deep).nbytes(torch.float32)
    block = (total - CheckpointIndex(shallow).nbytes(torch.float32)) // 23
    whole, kept_whole = load_growth(deep, "whole")
    streamed, kept = load_growth(deep, "streamed")
    print(f"weights {total / 1e6:.1f} MB (block {block / 1e6:.2f} MB); rank 0 keeps "
          f"{kept / 1e6:.1f} MB; load peak growth: whole then split {whole / 1e6:.1f} MB, "
          f"block by block {streamed / 1e6:.1f} MB")
    assert kept == kept_whole and kept < total - 10 * block
    # VmHWM growth over the imports can come in a little under the weights' bytes: memory the
    # imports freed is reused before the mark rises (CI once measured 305.8 MB of 306.2 MB).
    assert whole >= total - block
    assert streamed < kept + 3 * block + (24 << 20)


def test_checkpoint_with_other_tensor_names_falls_back(tmp_path, save_tiny):
    """Names transformers' loader would rename (here: a missing `model.` prefix) are not read
    block by block: load_rank declines and the whole-model load takes it."""
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "m", **GQA)
    state = load_file(str(path / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    assert streamable(str(path)) and load_rank(str(path), splitter(0)) is None
