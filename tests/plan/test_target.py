"""Budget parsing and the pieces of the memory model."""

import pytest
import torch

from memfit.errors import UserError
from memfit.plan.menu import linear_menu, resident_bytes
from memfit.plan.target import Target, kv_bytes, parse_size


@pytest.mark.parametrize("text, value", [("800MB", 800 * 10**6), ("1.5GB", 1.5e9),
                                         ("24GiB", 24 * 2**30), ("512 KiB", 512 * 1024),
                                         ("123456789", 123456789), ("2g", 2e9)])
def test_parse_size(text, value):
    assert parse_size(text) == int(value)


@pytest.mark.parametrize("text", ["12parsecs", "GB", "-1GB", "0MB", "1..5GB", "0.5", "8", "0.1b"])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="size"):
        parse_size(text)


def test_target_refuses_unknown_kv():
    with pytest.raises(UserError, match="KV precision"):
        Target(budget=1, kv="int3")


def test_kv_bytes_are_the_inspect_numbers(tiny_llama):
    from memfit.eval.memory import kv_cache_bytes
    cfg = tiny_llama.model.config
    dense = kv_cache_bytes(cfg, 1024, 2, torch.float32)
    assert kv_bytes(cfg, 1024, 2, torch.float32, "none") == max(dense["kv_bytes"],
                                                                dense["kv_prefill_peak_bytes"])
    assert kv_bytes(cfg, 1024, 2, torch.float32, "int4") < dense["kv_bytes"] / 3


def test_resident_bytes_count_the_cpu_kernel_layout():
    from memfit.methods import replace_group
    lin = torch.nn.Linear(128, 64, bias=False)
    int4 = next(c for c in linear_menu("rtn") if c.name == "int4-g64")
    (q,), _ = replace_group([lin], int4.spec, None)
    stored = q.nbytes()
    resident = resident_bytes(q, "cpu", torch.float32)
    assert resident == stored + q.cache_nbytes() and q.cache_nbytes() > 0
