"""compressed-tensors export of mixtures of experts (memfit.io.export_ct): each expert's
projections are compressed linears under the family's checkpoint names (Qwen3-MoE: memfit's own,
Mixtral and PhiMoE: the Mixtral-era `block_sparse_moe.experts.E.w1`), which plain transformers (no memfit in
the process) loads into its fused experts with memfit's weights bit for bit, and memfit reads
back into its packed modules with the same bytes. What does not load (zero points on experts,
families whose checkpoints fuse their experts) is refused in one line, nothing written."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from memfit.api import compress_
from memfit.io.export_ct import load_ct, save_ct
from memfit.moe import unfuse_experts_
from memfit.recipe import Recipe

sys.path.insert(0, str(Path(__file__).parent))
from test_export_ct import run_plain

FAMILIES = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},  # a router that is a Linear
}
SYM = Recipe.from_dict({"quant": {"algo": "rtn", "bits": 4, "group_size": 32, "symmetric": True}})


def _tiny(tiny_config, family, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **FAMILIES[family], **kw)).eval()
    with torch.no_grad():  # spread the router's logits: every expert gets tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    unfuse_experts_(model)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_transformers_loads_memfits_experts(family, tiny_config, encoder_tokenizer,
                                                  tmp_path, monkeypatch):
    model = _tiny(tiny_config, family)
    compress_(model, SYM, None, progress=False)
    out = save_ct(model, encoder_tokenizer, tmp_path / "ct", dense_dtype="keep",
                  scale_dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expert = "model.layers.0.block_sparse_moe.experts.2.w3" if family != "qwen3_moe" else \
        "model.layers.0.mlp.experts.2.up_proj"
    assert f"{expert}.weight_packed" in keys and f"{expert}.weight_scale" in keys
    g = torch.Generator().manual_seed(0)
    inputs = {"ids": torch.randint(0, 30522, (2, 32), generator=g),
              "prompt": torch.randint(0, 30522, (1, 8), generator=g)}
    plain = run_plain([out], inputs, tmp_path, new_tokens=0, weight=None,
                      extra={"experts": "model.layers.0.mlp.experts"})
    experts = model.model.layers[0].mlp.experts
    for e in range(4):
        ex = experts.get_submodule(str(e))
        gate, up, down = (getattr(ex, n).dequantize(torch.float32)
                          for n in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(plain["gate_up_proj0"][e], torch.cat([gate, up])), e
        assert torch.equal(plain["down_proj0"][e], down), e
    # an expert reached by <= 4 rows would take memfit's bfloat16 decode kernels
    # (memfit.kernels.cpu); float32 throughout, the logits compare as float32 sums do
    monkeypatch.setattr("memfit.kernels.cpu.DECODE_MAX_M", 0)
    with torch.no_grad():
        ref = model(inputs["ids"]).logits
        mine = load_ct(out).model(inputs["ids"]).logits
    assert torch.equal(mine, ref)  # memfit reads its own bytes back
    diff = (plain["logits0"] - ref).abs().max().item()
    print(f"{family}: plain transformers max |logit diff| {diff:.2e} (logits up to "
          f"{ref.abs().max():.2f})")
    assert diff < 1e-5


def test_what_does_not_load_is_refused_before_any_work(tmp_path, save_tiny, capsys):
    from memfit.cli.main import main

    src = save_tiny(tmp_path / "mixtral", "mixtral", **FAMILIES["mixtral"])
    args = ["--format", "compressed-tensors", "--samples", "4", "--seq-len", "32"]
    assert main(["compress", str(src), "--recipe", "w4g64-gptq", "--out", str(tmp_path / "a"),
                 *args]) == 2  # zero points on the experts
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "an expert with asymmetric (zero-point) codes" in err[0]
    granite = save_tiny(tmp_path / "granite", "granitemoe", num_local_experts=4,
                        num_experts_per_tok=2)
    assert main(["compress", str(granite), "--recipe", "w4g64-gptq", "--out",
                 str(tmp_path / "b"), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "hold the experts fused" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
