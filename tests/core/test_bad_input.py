"""Bad input, as a user meets it through the CLI: one `memfit: error:` line, exit code 2,
nothing written, no `.partial` left behind (issue 9's list)."""

import errno
import json
import tempfile
from pathlib import Path

import pytest
import torch

from memfit.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("memfit: error:")]
    assert len(errors) == 1 and needle in errors[0], err


def _nothing_written(tmp_path, *names):
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in names)
    assert not left, left


def test_out_under_a_file_fails_before_loading(capsys, tmp_path, monkeypatch):
    import memfit.compress as c

    monkeypatch.setattr(c, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "file.txt").write_text("x")
    code, _, err = _run(capsys, "compress", "/does/not/matter", "--out", tmp_path / "file.txt" / "o")
    assert code == 2
    _one_error_line(err, "is a file, not a folder")


def _no_folder_in(monkeypatch, where, error: OSError) -> None:
    """Making a folder in `where` fails with `error` (a read-only mount, a permission)."""
    real = tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == where:
            raise error
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def test_out_where_no_folder_can_be_made_fails_before_loading(capsys, tmp_path, monkeypatch):
    """Refused by trying, not by permission bits (which root passes): a parent in which making
    a folder fails, here read-only, gives one line before the model loads, and nothing stays."""
    import memfit.compress as c

    monkeypatch.setattr(c, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    _no_folder_in(monkeypatch, tmp_path, OSError(errno.EROFS, "Read-only file system"))
    code, _, err = _run(capsys, "compress", "/does/not/matter", "--out", tmp_path / "a" / "o")
    assert code == 2
    _one_error_line(err, f"no folder can be made in {tmp_path} (read-only file system)")
    _nothing_written(tmp_path)


def test_gguf_out_that_is_a_folder_or_cannot_be_made_fails_before_loading(capsys, tmp_path,
                                                                         monkeypatch):
    import memfit.models

    monkeypatch.setattr(memfit.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = _run(capsys, "export", "default", "--format", "gguf", "--out", tmp_path,
                        "--overwrite")
    assert code == 2
    _one_error_line(err, "is a folder; --out names the file")
    _no_folder_in(monkeypatch, tmp_path, OSError(errno.EACCES, "Permission denied"))
    code, _, err = _run(capsys, "export", "default", "--format", "gguf", "--out",
                        tmp_path / "m.gguf")
    assert code == 2
    _one_error_line(err, "(permission denied)")
    _nothing_written(tmp_path)


def test_a_folder_with_a_broken_config_is_named_as_such(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"')
    code, _, err = _run(capsys, "inspect", tmp_path)
    assert code == 2
    _one_error_line(err, f"could not load {tmp_path}: ")
    assert "config.json" in err and "offline" not in err and "PosixPath" not in err


def test_out_equal_to_the_input_is_refused_even_with_overwrite(capsys, tiny_llama_dir):
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--out", tiny_llama_dir, "--overwrite")
    assert code == 2
    _one_error_line(err, "input model's own folder")
    assert (tiny_llama_dir / "config.json").exists()


@pytest.mark.parametrize("device,needle", [("tpu", "device"), ("cuda", "CUDA"), ("cuda:x", "device")])
def test_bad_devices(capsys, tiny_llama_dir, tmp_path, device, needle):
    import torch
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["eval", tiny_llama_dir, "--device", device],
                 ["compress", tiny_llama_dir, "--out", tmp_path / "o", "--device", device]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        _one_error_line(err, needle)
    _nothing_written(tmp_path)


def test_binary_jsonl(capsys, tiny_llama_dir, tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(bytes(range(256)) * 4)
    code, _, err = _run(capsys, "eval", tiny_llama_dir, "--data", bad)
    assert code == 2
    _one_error_line(err, "not UTF-8")


@pytest.mark.parametrize("line,needle", [('{"text": 5}', "data.jsonl:2: its 'text' is not a string"),
                                          ('{"text": null}', "its 'text' is not a string"),
                                          ('{"txt": "a"}', "data.jsonl:2 is not a JSON object"),
                                          ('{"messages": [{"role": "user"}]}',
                                           "data.jsonl:2: 'messages' is not a list of"),
                                          ('{"messages": "hi"}', "data.jsonl:2: 'messages'")])
def test_jsonl_lines_without_a_text_string(capsys, tiny_llama_dir, tmp_path, line, needle):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "one good line"}\n' + line + "\n")
    code, _, err = _run(capsys, "eval", tiny_llama_dir, "--data", bad)
    assert code == 2
    _one_error_line(err, needle)


def test_compressing_a_compressed_folder_says_so(capsys, tiny_llama_dir, tmp_path):
    assert _run(capsys, "compress", tiny_llama_dir, "--recipe", "w8", "--out", tmp_path / "q",
                "--samples", "2", "--seq-len", "32")[0] == 0
    code, _, err = _run(capsys, "compress", tmp_path / "q", "--recipe", "w8", "--out", tmp_path / "qq")
    assert code == 2
    _one_error_line(err, "already compressed by memfit")
    assert str(tiny_llama_dir) in err  # names the dense source
    _nothing_written(tmp_path, "q")


@pytest.mark.parametrize("recipe,needle", [
    ({"quant": {"bits": 4}, "ignore": ["lm_head", "*.q_prj"]}, "q_proj"),
    ({"quant": {"bits": 4}, "overrides": {"*.down_prj": {"bits": 8}}}, "down_proj"),
    ({"quant": {"bits": 4}, "ignore": ["lm_head", "*_proj"]}, "selects no module"),
    ({"prune": {"method": "magnitude", "nm": "2:5"}}, "not a multiple of 5"),
])
def test_recipe_problems_fail_before_the_weights_load(capsys, tiny_llama_dir, tmp_path,
                                                      monkeypatch, recipe, needle):
    import memfit.compress as c

    monkeypatch.setattr(c, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    f = tmp_path / "r.json"
    f.write_text(json.dumps(recipe))
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", f, "--out", tmp_path / "o")
    assert code == 2
    _one_error_line(err, needle)
    _nothing_written(tmp_path, "r.json")


def test_short_calibration_text_warns_with_the_number_used(capsys, tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i}" for i in range(400)))
    code, _, err = _run(capsys, "compress", tiny_llama_dir, "--recipe", "w4g64-gptq", "--data",
                        text, "--samples", "64", "--seq-len", "64", "--out", tmp_path / "o")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "fewer than the 64 asked" in warning[0]


def test_failed_smoke_check_leaves_no_partial(capsys, tiny_llama_dir, tmp_path):
    argv = ["compress", tiny_llama_dir, "--recipe", "w2g32-gptq", "--samples", "2", "--seq-len",
            "32", "--max-kld", "0"]
    code, _, err = _run(capsys, *argv, "--out", tmp_path / "o")
    assert code == 3 and "smoke check failed" in err
    _nothing_written(tmp_path)
    code, _, err = _run(capsys, *argv, "--out", tmp_path / "k", "--keep-partial")
    assert code == 3 and (tmp_path / "k.partial").exists() and not (tmp_path / "k").exists()


def test_pickle_weights_are_never_loaded(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    """A folder whose weights are a pytorch_model.bin only: refused in one line by every path
    that loads weights (eval, inspect, compress, --place), and torch.load is never called (a
    pickle can run any code it holds; transformers would have loaded it)."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(tiny_llama_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()

    def no_pickles(*a, **k):
        raise AssertionError("torch.load was called on a user's file")
    monkeypatch.setattr(torch, "load", no_pickles)
    for argv in (["eval", folder], ["inspect", folder], ["generate", folder, "--place", "cpu"],
                 ["compress", folder, "--recipe", "w8", "--out", tmp_path / "o"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, err
        _one_error_line(err, "holds its weights as pickles (pytorch_model.bin), which memfit "
                             "does not load")
    assert not (tmp_path / "o").exists()


def test_a_missing_shard_is_named(capsys, tiny_llama_dir, tmp_path):
    """A sharded folder whose index lists a file that is not there (an interrupted download):
    one line naming it on every load path; --low-memory's streaming reader died of a
    FileNotFoundError traceback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder,
                                                                         max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    for argv in (["eval", folder], ["inspect", folder],
                 ["compress", folder, "--recipe", "w8", "--low-memory", "on", "--out",
                  tmp_path / "o"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, err
        _one_error_line(err, f"lacks 1 of the {len(shards)} weight files its "
                             f"model.safetensors.index.json lists ({shards[1].name})")
    assert not (tmp_path / "o").exists()
