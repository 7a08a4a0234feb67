"""The CLI around the compressed-tensors export on a tiny Llama: `memfit compress --format
auto|compressed-tensors|memfit` and `memfit export DIR --format compressed-tensors --out OUT`."""

import json

import torch

from memfit.cli import main
from memfit.models import load_model

FAST = ["--samples", "2", "--seq-len", "32"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _quant_method(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]


def test_auto_picks_compressed_tensors_or_says_why_not(capsys, tmp_path, tiny_llama_dir):
    code, out, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64", "--out",
                          tmp_path / "a", *FAST)
    assert code == 0, err
    assert "compressed-tensors format" in out and _quant_method(tmp_path / "a") == "compressed-tensors"
    code, _, err = _run(capsys, "export", tmp_path / "a", "--out", tmp_path / "a2")
    assert code == 2 and "is already a compressed-tensors folder: it loads as it is" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a2").exists()
    code, out, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w3g64", "--out",
                          tmp_path / "b", *FAST)
    assert code == 0, err
    assert (tmp_path / "b" / "memfit.json").exists() and _quant_method(tmp_path / "b") == "memfit"
    note = next(line for line in out.splitlines() if line.startswith("format"))
    assert "compressed-tensors cannot hold model.layers.0.self_attn.q_proj and 13 more: 3-bit" in note
    code, out, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64", "--format",
                          "memfit", "--out", tmp_path / "c", *FAST)
    assert code == 0 and (tmp_path / "c" / "memfit.json").exists()


def test_explicit_compressed_tensors_refuses_what_it_cannot_hold(capsys, tmp_path, tiny_llama_dir):
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w3g64", "--format",
                        "compressed-tensors", "--out", tmp_path / "o", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.layers.0.self_attn.q_proj: 3-bit codes" in err and "nothing written" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o*"))


def test_export_a_memfit_folder(capsys, tmp_path, tiny_llama_dir):
    src, out = tmp_path / "mf", tmp_path / "ct"
    assert _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64", "--format", "memfit",
                "--out", src, *FAST)[0] == 0
    code, stdout, err = _run(capsys, "export", src, "--format", "compressed-tensors", "--out", out)
    assert code == 0, err
    assert _quant_method(out) == "compressed-tensors" and "wrote" in stdout
    made = json.loads((out / "memfit_recipe.json").read_text())
    assert made["source"] == str(tiny_llama_dir) and made["exported_from"] == str(src)
    ids = torch.randint(0, 30522, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(str(out)).model(ids).logits,
                           load_model(str(src)).model(ids).logits)
    code, _, err = _run(capsys, "export", src, "--out", out)
    assert code == 2 and "already exists" in err


def test_export_refusals(capsys, tmp_path, tiny_llama_dir):
    src = tmp_path / "w3"
    assert _run(capsys, "compress", tiny_llama_dir, "--recipe", "w3g64", "--out", src, *FAST)[0] == 0
    code, _, err = _run(capsys, "export", src, "--out", tmp_path / "o")
    assert code == 2 and "model.layers.0.self_attn.q_proj: 3-bit codes" in err
    assert not (tmp_path / "o").exists()
    code, _, err = _run(capsys, "export", tiny_llama_dir, "--out", tmp_path / "o")
    assert code == 2 and "not a memfit folder" in err
    code, _, err = _run(capsys, "compress", tmp_path / "w3", "--out", tmp_path / "o")
    assert code == 2 and "already compressed by memfit" in err
