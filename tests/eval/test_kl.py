"""The one KL of memfit: in place (eval, smoke check) and differentiable (distillation) agree
with torch's own KL and with each other."""

import torch
import torch.nn.functional as F

from memfit.eval.lm import kl_sum


def test_kl_sum_matches_torch_in_both_modes():
    g = torch.Generator().manual_seed(0)
    lq = F.log_softmax(torch.randn(7, 3, 501, generator=g) * 3, -1)
    lp = F.log_softmax(torch.randn(7, 3, 501, generator=g) * 3, -1)
    want = F.kl_div(lp, lq, log_target=True, reduction="sum")
    got = kl_sum(lq, lp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fast = kl_sum(lq.clone(), lp.clone(), inplace=True)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    assert kl_sum(lq, lq).abs() < 1e-5 and got > 1.0


def test_kl_sum_gradient_is_q_minus_p_in_logit_space():
    g = torch.Generator().manual_seed(1)
    zq, zp = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g, requires_grad=True)
    lq = F.log_softmax(zq, -1)
    kl_sum(lq, F.log_softmax(zp, -1)).backward()
    torch.testing.assert_close(zp.grad, F.softmax(zp, -1) - lq.exp(), rtol=1e-5, atol=1e-6)


def test_eval_against_the_same_model_with_a_padded_table(tmp_path, tiny_llama_dir, capsys):
    """One tokenizer, the reference's embedding and head padded by 78 rows no token has (as
    models pad their tables for speed): eval compares the columns both have, so the same weights
    give KLD 0 and 100% top-1 (it was a shape error); another tokenizer is still refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memfit.cli.main import main
    from memfit.eval.run import run_eval

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(30600, mean_resizing=False)
    with torch.no_grad():  # rows no token reaches: arbitrary, but they take softmax mass
        model.get_output_embeddings().weight[30522:] = torch.randn(78, 64)
    model.save_pretrained(tmp_path / "padded")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "padded")
    for model_spec, ref_spec in ((tiny_llama_dir, tmp_path / "padded"),
                                 (tmp_path / "padded", tiny_llama_dir)):
        res = run_eval(str(model_spec), ref=str(ref_spec), max_tokens=512, progress=False)
        assert res["kld"] < 1e-6 and res["top1_agreement"] == 1.0, res
    other = tmp_path / "other"
    model.save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_tokens(["<memfit-extra>"])
    tok.save_pretrained(other)
    assert main(["eval", str(tiny_llama_dir), "--ref", str(other), "--max-tokens", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ref uses a different tokenizer (30523 tokens, the model 30522)" in err, err
