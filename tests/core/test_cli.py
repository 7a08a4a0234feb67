"""CLI contract: exit 0 on success, 2 with one line on user error."""

import json

import pytest

from memfit.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json(capsys, tiny_llama_dir):
    code, out, _ = _run(capsys, "eval", str(tiny_llama_dir), "--seq-len", "32", "--max-tokens", "64",
                        "--json", "--ref", str(tiny_llama_dir))
    assert code == 0
    res = json.loads(out)
    for key in ("perplexity", "tokens", "seq_len", "windows", "kld", "top1_agreement"):
        assert key in res
    assert res["windows"] == 2 and res["tokens"] == 62 and res["kld"] == 0.0
    assert res["model"] == str(tiny_llama_dir) and res["ref"] == str(tiny_llama_dir)


def test_inspect_json(capsys, tiny_llama_dir):
    code, out, _ = _run(capsys, "inspect", str(tiny_llama_dir), "--context", "64", "--json")
    res = json.loads(out)
    assert code == 0 and res["kv_bytes"] == 64 * res["kv_bytes_per_token"] > 0
    assert res["weight_bytes"] > res["parameters"]  # float32: 4 bytes each


@pytest.mark.parametrize("argv, message", [
    (["eval", "/does/not/exist"], "does not exist"),
    (["eval", "{tiny}", "--seq-len", "1"], "seq_len=1 is too short"),
    (["eval", "{tiny}", "--data", "{empty}"], "holds no text"),
    (["eval", "{tiny}", "--data", "{short}", "--seq-len", "512"], "fewer than one window"),
    (["eval", "{tiny}", "--dtype", "int3"], "unknown dtype"),
    (["inspect", "{tiny}", "--kv-dtype", "int3"], "unknown --kv-dtype"),
    (["generate", "{tiny}", "--prompt", ""], "prompt is empty"),
    (["eval", "{tiny}", "--seq-len", "100000"], "--seq-len 100000 is longer than the model"),
    # settings are checked before the model is read (a path that is no model comes second)
    (["generate", "/does/not/exist", "--temperature", "-1"], "--temperature >= 0"),
    (["generate", "/does/not/exist", "--top-p", "1.5"], "--top-p <= 1"),
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, tiny_llama_dir, argv, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("just a few words")
    subs = {"{tiny}": str(tiny_llama_dir), "{empty}": str(tmp_path / "empty.txt"),
            "{short}": str(tmp_path / "short.txt")}
    code, out, err = _run(capsys, *[subs.get(a, a) for a in argv])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("memfit: error:")


@pytest.mark.parametrize("argv,message", [
    (["eval", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["compress", "--out", "x", "--max-kld", "-1"], "--max-kld must be at least 0, got -1"),
    (["compress", "--out", "x", "--max-kld", "nan"], "--max-kld must be at least 0, got nan"),
    (["compress", "--out", "x", "--min-cosine", "2"], "--min-cosine must be in [-1, 1]"),
    (["compress", "--out", "x", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["fit", "--samples", "0"], "--samples must be at least 1"),
    (["fit", "--context", "0"], "--context must be at least 1"),
    (["distill", "t", "s", "--out", "x", "--steps", "0"], "--steps must be at least 1"),
    (["distill", "t", "s", "--out", "x", "--lr", "-1"], "--lr must be above 0, got -1"),
    (["distill", "t", "s", "--out", "x", "--temperature", "abc"], "must be a number, got 'abc'"),
    (["inspect", "--place", "cpu", "--batch", "0"], "--batch must be at least 1"),
])
def test_bad_flag_value_exits_2(capsys, argv, message):
    """Out-of-range numbers are refused by the parser, before any model is read."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_streams_text(capsys, tiny_llama_dir):
    code, out, _ = _run(capsys, "generate", str(tiny_llama_dir), "--prompt", "hello there",
                        "--max-new-tokens", "5")
    assert code == 0 and len(out.strip()) > 0


def test_every_flag_has_help_with_its_default_and_version(capsys):
    import argparse

    from memfit.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for act in sp._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            assert act.help, f"{name} {act.option_strings or act.dest} has no help"
            if not isinstance(act, argparse._StoreTrueAction) and act.option_strings:
                assert "default" in act.help or "required" in act.help, (name, act.option_strings)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("memfit ")


def test_kv_flag_on_eval_inspect_generate(capsys, tiny_llama_dir):
    from transformers import AutoConfig

    from memfit.kvcache import KV_FORMATS, quantized_kv_bytes
    code, out, _ = _run(capsys, "eval", str(tiny_llama_dir), "--seq-len", "200", "--max-tokens",
                        "400", "--kv", "int8", "--json")
    res = json.loads(out)
    assert code == 0 and "KV cache int8" in res["protocol"]
    _, plain, _ = _run(capsys, "eval", str(tiny_llama_dir), "--seq-len", "200", "--max-tokens",
                       "400", "--json")
    assert abs(res["perplexity"] / json.loads(plain)["perplexity"] - 1) < 1e-3
    code, out, err = _run(capsys, "inspect", str(tiny_llama_dir), "--context", "4096", "--kv",
                          "int4", "--json")
    info = json.loads(out)
    assert "past the model's 512 positions" in err  # counted all the same, with a note
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    one = quantized_kv_bytes(KV_FORMATS["int4"], tokens=4096, batch=1, kv_heads=2, head_dim=16,
                             dtype_bytes=4)
    assert code == 0 and info["kv_bytes"] == cfg.num_hidden_layers * one
    assert info["kv_bytes"] < 0.2 * 4096 * info["kv_bytes_per_token"]  # vs float32 states
    assert KV_FORMATS["int4"].group == 64  # int4 is int4-g64
    got = {}
    for name in ("int4-g32", "int4-g64", "int4-g128"):
        _, out, _ = _run(capsys, "inspect", str(tiny_llama_dir), "--context", "4096", "--kv",
                         name, "--json")
        got[name] = json.loads(out)["kv_bytes"]
        assert got[name] == cfg.num_hidden_layers * quantized_kv_bytes(
            KV_FORMATS[name], tokens=4096, batch=1, kv_heads=2, head_dim=16, dtype_bytes=4)
    # fewer key groups, fewer scales: fewer bytes
    assert got["int4-g32"] > got["int4-g64"] == info["kv_bytes"] > got["int4-g128"]
    code, out, _ = _run(capsys, "generate", str(tiny_llama_dir), "--prompt", "hello there",
                        "--max-new-tokens", "5", "--kv", "int4")
    assert code == 0 and len(out.strip()) > 0


def test_inspect_an_encoder_reports_no_kv_cache(capsys, tiny_bert_dir):
    """An encoder has no KV cache: none counted, --kv refused, the context held to its inputs."""
    from transformers import AutoConfig
    code, out, _ = _run(capsys, "inspect", str(tiny_bert_dir), "--json")
    res = json.loads(out)
    limit = AutoConfig.from_pretrained(tiny_bert_dir).max_position_embeddings
    assert code == 0 and res["kv_bytes"] == 0 and res["kv_bytes_per_token"] == 0
    assert res["context"] <= limit < 2048
    code, _, err = _run(capsys, "inspect", str(tiny_bert_dir), "--kv", "int4")
    assert code == 2 and "an encoder has none" in err


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # rotary and learned positions
def test_generate_stops_at_the_models_positions(capsys, tmp_path, save_tiny, model_type):
    from memfit.generate import generate
    from memfit.models import load_model

    m = load_model(str(save_tiny(tmp_path / "m", model_type, max_position_embeddings=24)))
    prompt = "one two three four five six seven"
    n = len(m.tokenizer(prompt)["input_ids"])  # with the special tokens generate adds
    assert n < 24
    steps = []  # one forward a new token: the prompt's, then one a step
    m.model.register_forward_hook(lambda mod, args, out: steps.append(1))
    m.model.generation_config.eos_token_id = None  # a random model could stop early
    generate(m.model, m.tokenizer, prompt, max_new_tokens=100, stream=lambda s: None)
    assert f"generating {24 - n} tokens, not 100" in capsys.readouterr().err
    assert len(steps) == 24 - n
    assert main(["generate", str(tmp_path / "m"), "--prompt", "word " * 30]) == 2
    err = capsys.readouterr().err.strip()
    assert "positions (max_position_embeddings): none is left" in err and "\n" not in err, err
