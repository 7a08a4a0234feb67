"""distill_ end to end on tiny random Llamas, and the 8-bit AdamW."""

import pytest
import torch
from torch import nn

from memfit.algos.prune import nm_mask
from memfit.api import compress_
from memfit.calib.data import token_windows
from memfit.distill.loop import (AdamW8bit, dequantize_blockwise, distill_, quantize_blockwise,
                                 state_nbytes)
from memfit.eval.lm import evaluate_lm
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.sparse import SparseLinear
from memfit.io.save import save
from memfit.models import load_model


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_distilling_a_3bit_student_lowers_kld_and_repacks_exactly(teacher, tiny_llama_dir, tmp_path):
    student = load_model(str(tiny_llama_dir))
    compress_(student.model, "w3g64", progress=False)
    nbytes = {n: m.nbytes() for n, m in student.model.named_modules()
              if isinstance(m, QuantLinear)}
    calib = token_windows(teacher.tokenizer, "builtin", "calib", seq_len=32, max_windows=64, seed=0)
    held_out = token_windows(teacher.tokenizer, "builtin", "eval", seq_len=32, max_windows=16)
    before = evaluate_lm(student.model, held_out, ref=teacher.model, progress=False)
    rep = distill_(student.model, teacher.model, calib, steps=30, lr=1e-4, batch_size=2, seed=0)
    after = evaluate_lm(student.model, held_out, ref=teacher.model, progress=False)
    print(f"\nw3g64 tiny llama, 30 steps: held-out KLD {before['kld']:.3e} -> {after['kld']:.3e} "
          f"({after['kld'] / before['kld']:.3f}x), ppl {before['perplexity']:.1f} -> "
          f"{after['perplexity']:.1f}, loss {rep['loss'][0]:.3e} -> {rep['loss'][-1]:.3e}, "
          f"{rep['seconds']:.1f} s")
    assert after["kld"] < 0.9 * before["kld"]
    quant = {n: m for n, m in student.model.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.nbytes() for n, m in quant.items()} == nbytes
    assert all(int(m.packed().codes().max()) <= m.fmt.qmax for m in quant.values())
    assert not any(p.requires_grad for p in student.model.parameters())
    out = save(student.model, student.tokenizer, tmp_path / "healed", recipe={"distill": {}},
               dense_dtype="keep")
    again = load_model(str(out))
    ids = held_out[:2]
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, student.model(ids).logits)


def test_two_four_pattern_holds_in_every_matrix_after_distilling(teacher, tiny_llama_dir):
    student = load_model(str(tiny_llama_dir))
    for name, m in list(student.model.model.layers.named_modules()):
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
            parent, _, attr = name.rpartition(".")
            setattr(student.model.model.layers.get_submodule(parent), attr,
                    SparseLinear.from_linear(m, "2:4"))
    calib = token_windows(teacher.tokenizer, "builtin", "calib", seq_len=16, max_windows=8, seed=0)
    before = {n: m.dequantize().clone() for n, m in student.model.named_modules()
              if isinstance(m, SparseLinear)}
    distill_(student.model, teacher.model, calib, steps=3, lr=1e-3, batch_size=2,
             freeze=("lm_head",))
    after = {n: m for n, m in student.model.named_modules() if isinstance(m, SparseLinear)}
    assert after.keys() == before.keys() and len(after) == 14
    changed = 0
    for n, m in after.items():
        w = m.dequantize()
        assert m.layout == "2:4"
        assert (w.view(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2, n
        assert not ((w != 0) & (before[n] == 0)).any(), n
        changed += not torch.equal(w, before[n])
    assert changed == len(after)


def test_blockwise_quantization_round_trip():
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)
    codes, absmax = quantize_blockwise(x, signed=True)
    back = dequantize_blockwise(codes, absmax, x)
    per_block = absmax.repeat_interleave(256)[:1000]
    assert codes.dtype == torch.int8 and ((back - x).abs() <= per_block / 254 + 1e-7).all()
    codes, absmax = quantize_blockwise(x.abs(), signed=False)
    assert codes.dtype == torch.uint8


def _toy_regression(make_opt, steps=300):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16))
    x = torch.randn(512, 64)
    y = torch.sin(x[:, :16] * 2) + 0.1 * torch.randn(512, 16)
    opt = make_opt(model.parameters())
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), state_nbytes(opt)


def test_adamw8bit_trains_nearly_as_well_in_a_quarter_of_the_state():
    loss32, bytes32 = _toy_regression(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    loss8, bytes8 = _toy_regression(lambda p: AdamW8bit(p, lr=3e-3))
    print(f"\ntoy regression: AdamW loss {loss32:.5f} ({bytes32} state bytes), AdamW8bit loss "
          f"{loss8:.5f} ({bytes8} bytes, {bytes8 / bytes32:.3f}x)")
    assert bytes8 <= 0.3 * bytes32
    assert loss8 <= 1.1 * loss32
