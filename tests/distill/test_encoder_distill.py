"""Distillation healing for encoders: the embedding loss, a healed 2:4 tiny BERT that gets
closer to its teacher and stays 2:4, and the command line with its refusals."""

import json

import pytest
import torch

from memfit.api import compress_
from memfit.calib.data import sentence_windows, sentences
from memfit.cli import main
from memfit.distill.encoder import distill_encoder_, embedding_loss, lr_factor
from memfit.distill.losses import matched_layers
from memfit.eval.encoder import embed
from memfit.eval.memory import weight_table
from memfit.formats.sparse import SparseLinear


def test_embedding_loss_is_zero_only_at_the_teacher():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    e = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    loss, cos = embedding_loss(h, e, h, e, mask)
    assert loss.abs() < 1e-6 and abs(cos.item() - 1) < 1e-6
    h2 = h.clone()
    h2[0, 4] += 100.0  # a padded position: ignored
    assert embedding_loss(h2, e, h, e, mask)[0].abs() < 1e-6
    h2[0, 1] += 1.0    # a real one: counted
    assert embedding_loss(h2, e, h, e, mask)[0] > 1e-3


def test_healing_a_two_of_four_encoder(tiny_encoder, encoder_tokenizer):
    teacher = tiny_encoder()
    student = tiny_encoder()
    calib = sentence_windows(encoder_tokenizer, "builtin", "calib", seq_len=64, max_windows=16,
                             seed=0)
    compress_(student, "wanda-2of4", calib, progress=False)
    held = sentences("builtin", "eval", limit=64)
    ref = embed(teacher, encoder_tokenizer, held)
    cos = lambda: torch.nn.functional.cosine_similarity(
        embed(student, encoder_tokenizer, held), ref).mean().item()
    before, bytes_before = cos(), weight_table(student)["weight_bytes"]
    rep = distill_encoder_(student, teacher, encoder_tokenizer,
                           sentences("builtin", "calib", limit=None), steps=60, lr=1e-3,
                           batch_size=8)
    after = cos()
    print(f"cosine {before:.4f} -> {after:.4f}, loss {rep['loss'][0]:.4f} -> {rep['loss'][-1]:.4f}")
    assert after > before + 0.02  # measured 0.905 -> 0.988
    assert rep["trained_modules"] == 13  # 12 sparse linears + the (unused) pooler dense
    assert weight_table(student)["weight_bytes"] == bytes_before
    for m in student.modules():
        if isinstance(m, SparseLinear):
            w = m.dequantize(torch.float32)
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_distill_command_on_encoders(capsys, tiny_bert_dir, tmp_path):
    q = tmp_path / "q"
    assert main(["compress", str(tiny_bert_dir), "--recipe", "wanda-2of4", "--out", str(q),
                 "--samples", "8", "--seq-len", "64", "--min-cosine", "0"]) == 0
    capsys.readouterr()
    code = main(["distill", str(tiny_bert_dir), str(q), "--out", str(tmp_path / "h"),
                 "--steps", "20", "--lr", "1e-3", "--hidden-mse", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(out)
    assert rep["after"]["cosine_mean"] > rep["before"]["cosine_mean"]
    assert 0 <= rep["after"]["neighbour_agreement"] <= 1
    assert rep["bytes_after"] == rep["bytes_before"]
    assert "inner-block" in json.loads((tmp_path / "h" / "memfit.json").read_text())[
        "distill"]["loss"]
    code = main(["eval", str(tmp_path / "h"), "--ref", str(tiny_bert_dir), "--json"])
    res = json.loads(capsys.readouterr()[0])
    assert code == 0 and abs(res["cosine_mean"] - rep["after"]["cosine_mean"]) < 1e-4


@pytest.mark.parametrize("flag", [["--temperature", "2"], ["--bos", "never"]])
def test_decoder_only_distill_options_are_refused(capsys, tiny_bert_dir, tmp_path, flag):
    code = main(["distill", str(tiny_bert_dir), str(tiny_bert_dir), "--out",
                 str(tmp_path / "h"), *flag])
    err = capsys.readouterr()[1]
    assert code == 2 and flag[0] in err and "decoder-only" in err, err


def test_negative_hidden_mse_is_refused(capsys, tiny_bert_dir, tmp_path):
    code = main(["distill", str(tiny_bert_dir), str(tiny_bert_dir), "--out",
                 str(tmp_path / "h"), "--hidden-mse", "-1"])
    assert code == 2 and "--hidden-mse" in capsys.readouterr()[1]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(i, 100, "cosine") for i in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0  # 10 warm-up steps
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.001
    assert {lr_factor(i, 7, "constant") for i in range(7)} == {1.0}


def test_inner_block_targets_heal_at_least_as_well(tiny_encoder, encoder_tokenizer):
    """The same 2:4 student healed with and without the inner-block MSE: both improve; the
    inner blocks end closer to the teacher's with it."""
    teacher = tiny_encoder()
    calib = sentence_windows(encoder_tokenizer, "builtin", "calib", seq_len=64, max_windows=16,
                             seed=0)
    held = sentences("builtin", "eval", limit=32)
    enc = encoder_tokenizer(held, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = teacher(**enc, output_hidden_states=True).hidden_states
    errors = []
    for weight in (0.0, 1.0):
        student = tiny_encoder()
        compress_(student, "wanda-2of4", calib, progress=False)
        n = len(ref) - 1
        distill_encoder_(student, teacher, encoder_tokenizer,
                         sentences("builtin", "calib", limit=None), steps=40, lr=1e-3,
                         batch_size=8, hidden_mse=weight,
                         layer_map=matched_layers(n, n) if weight else None)
        with torch.no_grad():
            hs = student(**enc, output_hidden_states=True).hidden_states
        errors.append(sum(((a - b).square().mean() / b.square().mean()).item()
                          for a, b in zip(hs[1:-1], ref[1:-1])))
    print(f"inner-block relative MSE without / with the term: {errors[0]:.4f} / {errors[1]:.4f}")
    assert errors[1] < errors[0]
