"""Integration tests on the two embedded defaults, the models a user gets with no arguments.

They load real weights (SmolLM2-135M-Instruct from its GGUF, all-MiniLM-L6-v2), so they are
marked `slow`; they still run by default (CI runs them): deselect with `-m "not slow"` for a quick
loop. Each default loads once per session. The first load of `default` on a machine converts the
GGUF into the cache (~40-70 s); later loads take seconds.

Perplexity band, measured on 2026-11-28 (AMD EPYC, 2 cores, torch 2.13.0+cpu, transformers 5.24.0,
float32) with

    python -c "from memfit.models import load_model; from memfit.calib.data import token_windows; \
from memfit.eval.lm import evaluate_lm; m = load_model('default'); \
w = token_windows(m.tokenizer, 'builtin', 'eval', seq_len=256, max_windows=4); \
print(evaluate_lm(m.model, w, progress=False)['perplexity'])"

which printed 15.8946 (1020 scored tokens). The band is ±15% around it: wide enough for another
CPU, thread count or transformers release, tight enough to catch a wrong dequantization, tokenizer
or loss (a broken loader gives perplexities in the hundreds or thousands).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

SEQ_LEN, WINDOWS = 256, 4
MEASURED_PPL = 15.8946  # see the module docstring for the command that measured it
PPL_BAND = (MEASURED_PPL * 0.85, MEASURED_PPL * 1.15)


@pytest.fixture(scope="session")
def default_lm():
    from memfit.models import load_model
    return load_model("default")


@pytest.fixture(scope="session")
def default_encoder():
    from memfit.models import load_model
    return load_model("default-encoder")


@pytest.fixture(scope="session")
def self_eval(default_lm):
    """One streamed pass of `default` against itself: perplexity, KLD and top-1 in one run."""
    from memfit.calib.data import token_windows
    from memfit.eval.lm import evaluate_lm

    wins = token_windows(default_lm.tokenizer, "builtin", "eval", seq_len=SEQ_LEN,
                         max_windows=WINDOWS)
    assert wins.shape == (WINDOWS, SEQ_LEN)
    return evaluate_lm(default_lm.model, wins, ref=default_lm.model, progress=False)


def test_default_loads_as_decoder(default_lm):
    assert default_lm.kind == "decoder"
    assert type(default_lm.model).__name__ == "LlamaForCausalLM"
    assert next(default_lm.model.parameters()).dtype == torch.float32  # auto on CPU
    assert len(default_lm.tokenizer) == default_lm.model.config.vocab_size == 49152


def test_default_perplexity_in_measured_band(self_eval):
    ppl = self_eval["perplexity"]
    assert self_eval["tokens"] == WINDOWS * (SEQ_LEN - 1)
    assert math.isfinite(ppl) and PPL_BAND[0] <= ppl <= PPL_BAND[1], \
        f"perplexity {ppl:.4f} outside {PPL_BAND[0]:.2f}..{PPL_BAND[1]:.2f} (measured {MEASURED_PPL})"


def test_default_kld_against_itself_is_zero(self_eval):
    assert self_eval["kld"] == 0.0
    assert self_eval["top1_agreement"] == 1.0
    assert self_eval["ref_perplexity"] == self_eval["perplexity"]


def test_default_generates_text(default_lm):
    from memfit.generate import generate

    pieces = []
    text = generate(default_lm.model, default_lm.tokenizer, "What is a Python list?",
                    max_new_tokens=8, stream=pieces.append)
    assert text.strip() and text == "".join(pieces)


def test_inspect_weight_bytes_equal_distinct_tensor_bytes(default_lm):
    from memfit.eval.memory import inspect_model

    model = default_lm.model
    info = inspect_model(model, context=2048)
    seen, expected = set(), 0
    for t in model.state_dict().values():  # embed_tokens and lm_head are tied: one storage
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            expected += t.numel() * t.element_size()
    assert info["weight_bytes"] == expected == 538_060_032  # float32, tied head counted once


def test_inspect_parameters_count_tied_weights_once(default_lm):
    from memfit.eval.memory import inspect_model

    model = default_lm.model
    info = inspect_model(model, context=2048)
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) == 134_515_008
    assert info["bits_per_weight"] == 32.0


def test_default_encoder_cosine_against_itself(default_encoder):
    from memfit.calib.data import sentences
    from memfit.eval.encoder import evaluate_encoder

    assert default_encoder.kind == "encoder"
    assert type(default_encoder.model).__name__ == "BertModel"
    sents = sentences("builtin", "eval", limit=16)
    assert len(sents) == 16
    res = evaluate_encoder(default_encoder.model, default_encoder.tokenizer, sents,
                           ref=(default_encoder.model, default_encoder.tokenizer), progress=False)
    assert res["embedding_dim"] == 384
    assert len(res["cosine_per_sentence"]) == 16
    assert abs(res["cosine_mean"] - 1.0) <= 1e-6 and abs(res["cosine_min"] - 1.0) <= 1e-6


def test_cli_eval_default_json():
    exe = shutil.which("memfit", path=os.path.dirname(sys.executable)) or shutil.which("memfit")
    assert exe, "the memfit console script is not installed; run the README's set-up command"
    proc = subprocess.run([exe, "eval", "default", "--max-tokens", "512", "--seq-len", "256",
                           "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("perplexity", "tokens", "seq_len", "windows"):
        assert key in res, key
    assert res["seq_len"] == 256 and res["windows"] == 2 and res["tokens"] == 2 * 255
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
