import copy
import json

import pytest
import torch

from memfit.calib.data import load_text, sentences, tokenize, windows
from memfit.errors import UserError


def test_builtin_splits_are_disjoint_documents():
    calib, ev, whole = (load_text("builtin", s) for s in ("calib", "eval", "all"))
    assert len(calib) > 2.5 * len(ev) > 100_000
    assert len(calib) + len(ev) <= len(whole)
    paras_eval = [p for p in ev.split("\n\n") if len(p) > 200]
    assert len(paras_eval) > 50 and not any(p in calib for p in paras_eval)


def test_windows_fixed_seed_and_order():
    ids = torch.arange(1000)
    w = windows(ids, 100)
    assert w.shape == (10, 100) and torch.equal(w[0], torch.arange(100))
    a, b = windows(ids, 100, seed=3, max_windows=4), windows(ids, 100, seed=3, max_windows=4)
    assert torch.equal(a, b) and not torch.equal(a, w[:4])
    assert len(set(a[:, 0].tolist())) == 4  # distinct, non-overlapping windows


def test_window_errors():
    with pytest.raises(UserError, match="seq_len=1 is too short"):
        windows(torch.arange(10), 1)
    with pytest.raises(UserError, match="fewer than one window"):
        windows(torch.arange(10), 64)


def test_files(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="holds no text"):
        load_text(str(empty))
    with pytest.raises(UserError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(f"line {i} of some text" for i in range(100)))
    calib, ev = load_text(str(txt), "calib"), load_text(str(txt), "eval")
    assert calib + ev == load_text(str(txt), "all") and 0.8 < len(calib) / (len(calib) + len(ev)) < 0.95
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert load_text(str(jl), "all") == "alpha\n\nbeta"
    jl.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="d.jsonl:1"):
        load_text(str(jl), "all")


def test_conversation_lines_are_rendered_with_the_chat_template(tmp_path, tiny_llama):
    """.jsonl lines of {"messages": [...]} (the common chat-dataset shape) are calibration and
    evaluation text too: through the tokenizer's chat template where it has one, else their
    contents a message a line; 'text' lines beside them stay as they are."""
    from memfit.calib.data import chat_renderer, token_windows

    jl = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Rayleigh scattering."}]}]
    jl.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    tok = tiny_llama.tokenizer
    assert chat_renderer(tok) is None  # this tokenizer has no chat template
    assert load_text(str(jl), "all") == "Why is the sky blue?\nRayleigh scattering.\n\nplain"
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                         "{% endfor %}")
    assert load_text(str(jl), "all", chat_renderer(tok)) == \
        "<user>Why is the sky blue?</s><assistant>Rayleigh scattering.</s>\n\nplain"
    ids = tokenize(tok, load_text(str(jl), "all", chat_renderer(tok)))
    w = token_windows(tok, str(jl), "all", seq_len=8, bos="never")
    assert torch.equal(w.flatten(), ids[: w.numel()])  # windows take the rendered text


def test_tokenize_and_sentences(tiny_llama):
    ids = tokenize(tiny_llama.tokenizer, "hello world " * 10)
    assert ids.dtype == torch.long and ids.numel() >= 20
    s = sentences(limit=10)
    assert len(s) == 10 and all(len(x) >= 20 for x in s)


class _Tok:
    """A tokenizer stand-in: one id per character, with or without a BOS it adds itself."""

    def __init__(self, bos_token_id, adds_bos):
        self.bos_token_id, self.adds_bos = bos_token_id, adds_bos

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.adds_bos else [])
                + ids}


def test_bos_auto_follows_the_tokenizer_and_windows_start_with_it():
    from memfit.calib.data import bos_id

    gemma_like, smol_like = _Tok(2, adds_bos=True), _Tok(1, adds_bos=False)
    assert bos_id(gemma_like, "auto") == 2 and bos_id(smol_like, "auto") is None
    assert bos_id(smol_like, "always") == 1 and bos_id(gemma_like, "never") is None
    with pytest.raises(UserError, match="--bos never"):
        bos_id(_Tok(None, adds_bos=False), "always")
    with pytest.raises(UserError, match="unknown bos"):
        bos_id(gemma_like, "sometimes")
    ids = torch.arange(100, 120)
    w = windows(ids, 5, bos=2)  # [BOS] + 4 text tokens each, text consecutive across windows
    assert w.shape == (5, 5) and (w[:, 0] == 2).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids)
    assert torch.equal(windows(ids, 5), ids.view(4, 5))  # no BOS: unchanged


def test_eval_states_bos_in_its_protocol(tiny_llama):
    from memfit.eval.run import run_eval

    res = run_eval(tiny_llama, seq_len=64, max_tokens=128, progress=False)
    assert res["bos"] is False and res["protocol"].endswith("no BOS")
    with pytest.raises(UserError, match="no beginning-of-sequence"):
        run_eval(tiny_llama, seq_len=64, max_tokens=128, bos="always", progress=False)
