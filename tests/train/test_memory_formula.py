"""The per-rank memory formula (memfit.train.memory) against numbers computed by hand."""

import pytest

from memfit.train.memory import (
    Shape,
    activation_bytes,
    checkpointed_blocks,
    model_shape,
    predict,
)

S = Shape(params=1000, root_params=200, block_params=200, layers=4, hidden=8, intermediate=16,
          kv_dim=4, vocab=10)


def test_checkpointed_blocks():
    assert checkpointed_blocks(4, "none") == []
    assert checkpointed_blocks(4, "full") == [0, 1, 2, 3]
    assert checkpointed_blocks(5, "selective") == [0, 2, 4]
    with pytest.raises(ValueError, match="unknown activation checkpointing"):
        checkpointed_blocks(4, "some")


def test_activations_by_hand():
    # 2 x 3 = 6 tokens; one block keeps 6 x (8*8 + 4*4 + 4*16) = 864 elements = 3456 bytes,
    # its input 6 x 8 x 4 = 192 bytes; the head 2 x 6 x 8 x 4 = 384 + 3 x 2 x 3 x 10 x 4 = 720,
    # so 1104; every mode adds one block (3456) of activation gradients in the backward pass
    kw = {"batch": 2, "seq_len": 3, "compute_bytes": 4}
    assert activation_bytes(S, ac="none", **kw) == 4 * 3456 + 3456 + 1104 == 18384
    # full: 4 inputs + one block recomputed + its gradients
    assert activation_bytes(S, ac="full", **kw) == 4 * 192 + 3456 + 3456 + 1104 == 8784
    # selective: blocks 0 and 2 keep inputs, 1 and 3 everything, + recompute + gradients
    assert activation_bytes(S, ac="selective", **kw) == 2 * 192 + 4 * 3456 + 1104 == 15312
    # bf16 halves everything but the float32 logits chunk
    assert activation_bytes(S, ac="none", batch=2, seq_len=3, compute_bytes=2) == \
        (18384 - 720) // 2 + 720


def test_states_by_hand():
    # FSDP2 on 2 ranks, float32 AdamW: 1000 / 2 x (4 weights + 4 grads + 8 moments) = 8000;
    # gathered: root 200 + 2 blocks x 200 in float32 (2400) + one block's float32 grads (800)
    p = predict(S, world=2, engine="fsdp2", optimizer="adamw", offload=False, compute_bytes=4,
                act_bytes=18384)
    assert (p["states_bytes"], p["working_bytes"], p["total_bytes"]) == (8000, 3200, 29584)
    # 8-bit moments: 2 bytes + 2 scales of 4 bytes per 256 = 2.03125 -> 500 x 10.03125
    p8 = predict(S, world=2, engine="fsdp2", optimizer="adamw8bit", offload=False,
                 compute_bytes=4, act_bytes=0)
    assert p8["states_bytes"] == round(500 * 10.03125) == 5016
    # bf16 compute: the gathered weights at 2 bytes, the gradients still float32
    pb = predict(S, world=2, engine="fsdp2", optimizer="adamw", offload=False, compute_bytes=2,
                 act_bytes=0)
    assert pb["working_bytes"] == 600 * 2 + 200 * 4
    # a DDP replica shards nothing and gathers nothing; offload moves the states off the device
    pd = predict(S, world=2, engine="ddp", optimizer="adamw", offload=False, compute_bytes=4,
                 act_bytes=0)
    assert (pd["states_bytes"], pd["working_bytes"]) == (16000, 0)
    po = predict(S, world=4, engine="fsdp2", optimizer="adamw", offload=True, compute_bytes=4,
                 act_bytes=0)
    assert po["states_bytes"] == 0
    # int8 / PowerSGD error feedback: a float32 copy of the whole gradient, on more than one rank
    for gc in ("int8", "powersgd"):
        pr = predict(S, world=2, engine="fsdp2", optimizer="adamw", offload=False,
                     compute_bytes=4, act_bytes=0, grad_comm=gc)
        assert pr["residual_bytes"] == 4000 and pr["total_bytes"] == 8000 + 3200 + 4000
    assert p["residual_bytes"] == 0 and p["weights_bytes"] == 500 * 4
    # one rank gathers nothing
    assert predict(S, world=1, engine="fsdp2", optimizer="adamw", offload=False,
                   compute_bytes=4, act_bytes=0)["total_bytes"] == 16000


def test_model_shape_counts_the_tiny_llama(tiny_llama):
    s = model_shape(tiny_llama.model)
    # embeddings and untied head 2 x 30522 x 64, final norm 64
    assert s.root_params == 2 * 30522 * 64 + 64
    # q, o 64x64; k, v 32x64 (2 of 4 heads); gate, up, down 64x128; two norms of 64
    assert s.block_params == 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64
    assert s.params == s.root_params + 2 * s.block_params == sum(
        p.numel() for p in tiny_llama.model.parameters())
    assert (s.layers, s.hidden, s.intermediate, s.kv_dim, s.vocab) == (2, 64, 128, 32, 30522)
