"""`memfit compress` end to end on a tiny model: artifact, reload, refusals, nothing half-written."""

import json

import pytest
import torch

from memfit.cli import main
from memfit.eval.lm import evaluate_lm
from memfit.formats.quant_linear import QuantLinear
from memfit.models import load_model

FAST = ["--samples", "4", "--seq-len", "64"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_writes_a_folder_every_command_accepts(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    code, stdout, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64-gptq",
                             "--out", out, "--json", *FAST)
    assert code == 0, err
    rep = json.loads(stdout)
    # the tiny model is mostly its (unquantized) 30522-token embeddings; linears shrink ~7x
    linear_fp32 = 2 * 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # 2 layers, q o k v gate up down
    assert rep["bytes_before"] - rep["bytes_after"] > 0.8 * linear_fp32
    assert rep["smoke"]["kld"] >= 0
    assert not (tmp_path / "q.partial").exists()
    m = load_model(str(out))
    assert sum(isinstance(x, QuantLinear) for x in m.model.modules()) == 14
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["weight_bytes"] == rep["bytes_after"]
    assert all(3.9 < f["bits_per_weight"] < 4.6 for f in info["packed"])
    code, stdout, _ = _run(capsys, "eval", out, "--seq-len", "32", "--max-tokens", "64", "--json")
    assert code == 0 and json.loads(stdout)["perplexity"] > 1


def test_reloaded_logits_equal_before_save(tmp_path, tiny_llama_dir):
    from memfit.api import compress_
    from memfit.io.save import save
    m = load_model(str(tiny_llama_dir))
    compress_(m.model, "w3g64", progress=False)
    ids = torch.randint(0, 30522, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m.model(ids).logits
    save(m.model, m.tokenizer, tmp_path / "o", recipe={"quant": "w3g64"}, dense_dtype="keep")
    with torch.no_grad():
        after = load_model(str(tmp_path / "o")).model(ids).logits
    assert torch.equal(before, after)


def test_existing_out_is_refused_and_overwrite_replaces(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w8", "--out", out)
    assert code == 2 and "already exists" in err and (out / "keep.txt").exists()
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w8", "--out", out,
                        "--overwrite")  # not a model folder: never deleted
    assert code == 2 and "not an empty or model folder" in err and (out / "keep.txt").exists()
    (out / "config.json").write_text("{}")  # an earlier output folder may be replaced
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w8", "--out", out,
                        "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    # the CLI's default --format auto: compressed-tensors, which can hold int8 per channel
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_collapse_is_refused_and_nothing_written(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w2g32-gptq", "--out", out,
                        "--max-kld", "0", *FAST)
    assert code == 3 and "smoke check failed" in err and "nothing written" in err
    assert "Try: more bits. Or raise --max-kld" in err  # the hint fits the recipe
    assert not out.exists()


@pytest.mark.parametrize("preset, hint", [
    ("magnitude-50", "a lower sparsity or a calibrated method (wanda, sparsegpt)"),
    ("svd-80", "keep more of each matrix (a higher keep) or the activation-whitened SVD (wsvd)"),
    ("sparsegpt-2of4-w4g64", "unstructured sparsity instead of N:M; more bits"),
    ("drop2", "drop fewer blocks"),
    ("w4g64", "more bits or GPTQ"),
    ("w8a8", "SmoothQuant (w8a8-sq) or weight-only int8 (w8)"),
    ("w8-gptq", "a gentler recipe"),
])
def test_a_failed_smoke_check_names_what_to_change_in_that_recipe(preset, hint):
    """It said "more bits, GPTQ" to every recipe, a pruned or factorized one included."""
    from memfit.compress import gentler
    from memfit.recipe import load_recipe

    assert gentler(load_recipe(preset)) == hint


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "w5"], "unknown recipe 'w5'"),
    (["--recipe", "{bad_yaml}"], "unknown quant key"),
    (["--recipe", "w4g64-gptq", "--data", "{short}"], "fewer than one window"),
    ([], "--out is required"),
    (["--recipe", "drop2"], "cannot drop 2 of 2 blocks"),  # refused once the model is loaded
])
def test_bad_compress_inputs(capsys, tmp_path, tiny_llama_dir, argv, message):
    bad = tmp_path / "r.yaml"
    bad.write_text("quant: {bits: 4, grp: 64}\n")
    short = tmp_path / "s.txt"
    short.write_text("too short for a window")
    subs = {"{bad_yaml}": str(bad), "{short}": str(short)}
    argv = [subs.get(a, a) for a in argv]
    if "--out" not in argv and message != "--out is required":
        argv += ["--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, "compress", tiny_llama_dir, *argv)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_killed_run_resumes_to_identical_files(tmp_path, tiny_llama_dir, monkeypatch):
    import memfit.api as api
    from memfit.compress import CompressOptions, compress_to

    kw = CompressOptions(samples=4, seq_len=64, progress=False)
    compress_to(str(tiny_llama_dir), "w4g64-gptq", tmp_path / "whole", kw)
    real, calls = api._compress_block, {"n": 0}

    def killed_in_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(api, "_compress_block", killed_in_second_block)
    with pytest.raises(KeyboardInterrupt):
        compress_to(str(tiny_llama_dir), "w4g64-gptq", tmp_path / "resumed", kw)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial").exists()
    monkeypatch.setattr(api, "_compress_block", real)
    rep = compress_to(str(tiny_llama_dir), "w4g64-gptq", tmp_path / "resumed", kw)
    assert rep["resumed_blocks"] == 1
    for name in ("model.safetensors", "memfit.json", "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_list_presets_describes_every_preset(capsys):
    from memfit.recipe import PRESETS
    code, out, _ = _run(capsys, "compress", "--list-presets")
    assert code == 0 and len(out.splitlines()) == len(PRESETS)
    line = next(x for x in out.splitlines() if x.startswith("w4g32-gguf "))
    assert "GGUF-exact scales" in line and "embeddings int8, group 32" in line
    assert "hqq 4-bit, group 64, float zero" in out and "int8 activations" in out


def test_windows_fit_the_models_positions(capsys, tmp_path, tiny_llama_dir, save_tiny):
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64-gptq",
                        "--out", tmp_path / "x", "--samples", "2", "--seq-len", "600")
    assert code == 2 and "--seq-len 600 is longer than the model supports (512 positions" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # learned positions (GPT-2) of 64: the smoke check's 256-token windows would index past them
    short = save_tiny(tmp_path / "gpt2", "gpt2", n_embd=64, n_layer=2, n_head=4,
                      max_position_embeddings=64)
    code, stdout, err = _run(capsys, "compress", short, "--recipe", "w8", "--out", tmp_path / "q",
                             "--json")
    assert code == 0, err
    assert json.loads(stdout)["smoke"]["seq_len"] == 64
