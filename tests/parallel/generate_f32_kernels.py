"""`memfit generate` with memfit's CPU int kernels kept on their float32 path at decode
(memfit.kernels.cpu.DECODE_MAX_M = 0), so packed layers sum in float32 as dense ones do. Used by
the int4 TP test to separate the split's effect from the bfloat16 decode kernels' rounding."""

import sys

from memfit.cli.main import main
from memfit.kernels import cpu

cpu.DECODE_MAX_M = 0
sys.exit(main(["generate", *sys.argv[1:]]))
