"""`memfit distill` end to end on tiny models, and the refusal of mismatched tokenizers."""

import json

import pytest

from memfit.api import compress_
from memfit.cli import main
from memfit.eval.memory import weight_table
from memfit.formats.quant_linear import QuantLinear
from memfit.io.save import save
from memfit.models import load_model

FAST = ["--steps", "3", "--seq-len", "32", "--samples", "4", "--batch-size", "2"]


def _main(argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def student_dir(tiny_llama_dir, tmp_path_factory):
    s = load_model(str(tiny_llama_dir))
    rep = compress_(s.model, "w4g64", progress=False)
    return save(s.model, s.tokenizer, tmp_path_factory.mktemp("student") / "w4",
                recipe=rep["recipe"])


def test_a_w8a8_student_distills_and_stays_w8a8(capsys, tiny_llama_dir, tmp_path):
    from memfit.formats.w8a8 import W8A8Linear

    student = tmp_path / "sq"
    assert _main(["compress", tiny_llama_dir, "--recipe", "w8a8-sq", "--samples", "4",
                  "--out", student]) == 0
    capsys.readouterr()
    code = _main(["distill", tiny_llama_dir, student, "--out", tmp_path / "o", "--json", *FAST])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["bytes_after"] == rep["bytes_before"] and len(rep["loss"]) == 3
    healed = load_model(str(tmp_path / "o")).model
    assert sum(type(m) is W8A8Linear for m in healed.modules()) == 14


def test_cli_distills_and_writes_a_loadable_folder(capsys, tiny_llama_dir, student_dir, tmp_path):
    out = tmp_path / "healed"
    code = _main(["distill", tiny_llama_dir, student_dir, "--out", out, "--json", *FAST])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(stdout)
    print(f"\nCLI: KLD {rep['before']['kld']:.3e} -> {rep['after']['kld']:.3e}")
    assert rep["bytes_after"] == rep["bytes_before"] and len(rep["loss"]) == 3
    healed = load_model(str(out))
    assert sum(isinstance(m, QuantLinear) for m in healed.model.modules()) == 14
    assert weight_table(healed.model)["weight_bytes"] == rep["bytes_after"]
    meta = json.loads((out / "memfit.json").read_text())
    assert meta["recipe"]["quant"]["bits"] == 4 and meta["distill"]["steps"] == 3
    from memfit.recipe import Recipe
    assert Recipe.from_dict(meta["recipe"]).quant.format.bits == 4  # still a valid recipe
    code = _main(["distill", tiny_llama_dir, student_dir, "--out", out, *FAST])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_different_tokenizers_are_refused(capsys, tiny_llama_dir, save_tiny, tmp_path):
    from transformers import AutoTokenizer

    other = save_tiny(tmp_path / "other", vocab_size=30523)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<memfit-extra>"])
    tok.save_pretrained(other)
    code = _main(["distill", tiny_llama_dir, other, "--out", tmp_path / "x", *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "30522" in err and "30523" in err and "different tokenizers" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_student_with_dropped_blocks_is_matched_through_the_blocks_it_kept(capsys, save_tiny,
                                                                          tmp_path):
    """memfit compress records which blocks it kept; --hidden-mse then pairs student block j with
    teacher block kept[j] (not an even spread), and the hidden MSE is part of what is trained."""
    teacher = save_tiny(tmp_path / "t", num_hidden_layers=4)
    recipe = tmp_path / "drop.json"
    recipe.write_text(json.dumps({"structured": {"drop_blocks": 1}}))
    student = tmp_path / "s"
    code = _main(["compress", teacher, "--recipe", recipe, "--out", student, "--samples", "4",
                  "--seq-len", "32", "--max-kld", "100", "--json"])
    assert code == 0, capsys.readouterr().err
    kept = json.loads((student / "memfit.json").read_text())["report"]["kept_blocks"]
    assert len(kept) == 3 and set(kept) < {0, 1, 2, 3}
    capsys.readouterr()

    out = tmp_path / "healed"
    code = _main(["distill", teacher, student, "--out", out, "--hidden-mse", "1.0", "--json",
                  *FAST])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(stdout)
    # hidden-state index i = output of block i - 1; the student's last block is left to the KL
    meta = json.loads((out / "memfit.json").read_text())
    want = {str(kept[j] + 1): j + 1 for j in range(2)}
    assert meta["distill"]["layer_map"] == want and meta["distill"]["hidden_mse_weight"] == 1.0
    assert meta["report"]["kept_blocks"] == kept  # carried forward for a later distill
    assert all(loss > kl for loss, kl in zip(rep["loss"], rep["kl"]))  # the MSE term is in the loss
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_negative_hidden_mse_is_refused(capsys, tiny_llama_dir, student_dir, tmp_path):
    code = _main(["distill", tiny_llama_dir, student_dir, "--out", tmp_path / "x",
                  "--hidden-mse", "-1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--hidden-mse -1.0 is negative" in err
    assert len(err.strip().splitlines()) == 1


def test_windows_past_the_positions_are_refused(capsys, tiny_llama_dir, student_dir, tmp_path):
    code = _main(["distill", tiny_llama_dir, student_dir, "--out", tmp_path / "x",
                  *FAST, "--seq-len", "513"])  # the tiny models hold 512 positions
    err = capsys.readouterr().err
    assert code == 2 and "--seq-len 513 is longer than the model supports (512 positions" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_run_that_makes_the_student_worse_says_so(capsys, tiny_llama_dir, student_dir,
                                                     tmp_path):
    code = _main(["distill", tiny_llama_dir, student_dir, "--out", tmp_path / "o", *FAST,
                  "--lr", "0.5"])  # a step far too large for a 4-bit student
    out, err = capsys.readouterr()
    assert code == 0, err
    kld = next(line for line in out.splitlines() if line.startswith("KLD"))
    before, after = (float(v.rstrip(",")) for v in kld.split()[1:4:2])
    assert after > before, kld
    assert f"this run made the student worse, and {student_dir} is still the better" in out


def test_a_teacher_with_a_padded_table_distills_like_the_original(capsys, tiny_llama_dir,
                                                                   student_dir, tmp_path):
    """One tokenizer, the teacher's embedding and head padded by 78 rows no token has: the KL
    compares the columns both heads have, so the run is the original teacher's (it was refused
    as another tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(30600, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[30522:] = torch.randn(78, 64)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(padded)
    reps = []
    for teacher in (tiny_llama_dir, padded):
        code = _main(["distill", teacher, student_dir, "--out", tmp_path / f"o-{teacher.name}",
                      "--json", *FAST])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        reps.append(json.loads(stdout))
    for when in ("before", "after"):
        assert abs(reps[0][when]["kld"] - reps[1][when]["kld"]) < 1e-6, (when, reps)
    assert reps[0]["loss"] == pytest.approx(reps[1]["loss"], rel=1e-4)
