"""Host-side launch arithmetic for memfit's Triton kernels.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Tritons: called
from Python each goes through Triton's wrapper (~4 µs on this 2-core CPU with Triton 3.9). Timed
in one process on an H200 machine (Triton 3.6; benchmarks/eager_host.py, RESULTS.md session 21),
an eager packed 8B-shaped model (224 packed linears a forward, up to 7 such calls each) took
46.8-54.4 ms for a 512-token prefill with them and 36.9-38.8 ms with these on a slow host, and
3% less decode time on a fast one. Inside `@triton.jit` code use `tl.cdiv`.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceil division of Python integers (the number of blocks of `b` that cover `a`)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
