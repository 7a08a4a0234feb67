"""eval's logits memory is what the README promises: one (batch, chunk, vocab) float32 slab per
model at a time (two with --ref). Measured as the process's peak RSS above its level before the
evaluation (the peak is reset through /proc/self/clear_refs), on a model whose vocabulary makes
one slab 256 MB, far above everything else it allocates."""

import pytest
import torch

from memfit.eval.lm import evaluate_lm
from memfit.eval.memory import reset_peak_rss

VOCAB, CHUNK = 250_000, 256
SLAB = CHUNK * VOCAB * 4


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("with_ref,slabs", [(False, 1), (True, 2)])
def test_eval_holds_one_slab_per_model(tiny_config, with_ref, slabs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(
        "llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, VOCAB, (1, CHUNK + 1), generator=torch.Generator().manual_seed(1))
    evaluate_lm(model, ids, ref=model if with_ref else None, chunk=CHUNK, progress=False)  # warm up
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    base = _rss("VmRSS")
    evaluate_lm(model, ids, ref=model if with_ref else None, chunk=CHUNK, progress=False)
    extra = _rss("VmHWM") - base
    print(f"ref={with_ref}: peak extra {extra / SLAB:.2f} slabs of {SLAB / 1e6:.0f} MB")
    assert slabs - 0.1 < extra / SLAB < slabs + 0.3
