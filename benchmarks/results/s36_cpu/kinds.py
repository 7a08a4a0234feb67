import torch, time, sys
sys.path.insert(0, "/work/main/tests/formats")
from memfit.eval.memory import steady_malloc
steady_malloc()
torch.set_num_threads(2)
from test_sparse_rows import _module
from memfit.formats import sparse
for layout, bits in [("bitmask", None), ("2:4", None), ("bitmask", 4), ("2:4", 4)]:
    m = _module(layout, bits, 1536, 576)
    x = torch.randn(512, 576)
    with torch.inference_mode():
        for _ in range(3): m(x)
        t = time.perf_counter()
        for _ in range(10): m(x)
        ts = (time.perf_counter() - t) / 10
        w = m.dequantize()
        t = time.perf_counter()
        for _ in range(10): torch.nn.functional.linear(x, w)
        td = (time.perf_counter() - t) / 10
    print(layout, bits, f"sparse {ts*1e3:.2f} ms dense {td*1e3:.2f}")
