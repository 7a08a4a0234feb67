"""w3g64-awq-gptq with q/k/v's AWQ scale scored on the attention output (Arch awq_inspect
'self_attn', the awq_blocks.py attn=1 variant), whole default model; then memfit eval."""
import sys
from dataclasses import replace
import memfit.archs as A
A.ARCHS["llama"] = replace(A.ARCHS["llama"], awq_inspect=("self_attn",) + A.ARCHS["llama"].awq_inspect[1:])
from memfit.cli.main import main
sys.exit(main(["compress", "default", "--recipe", "w3g64-awq-gptq", "--out", sys.argv[1], "--json"]))
