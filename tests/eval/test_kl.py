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
