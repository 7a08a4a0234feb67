"""memfit: make language models fit the memory you have, for inference and training, and measure it.

The public API (everything else is an implementation detail):

    loaded = memfit.load_model("default")                 # hub id, folder, .gguf, memfit output
    report = memfit.compress_(loaded.model, "w4g64-gptq", tokenizer=loaded.tokenizer)
    memfit.evaluate("default", ref=None, seq_len=512)     # perplexity / KLD / speed / memory
    memfit.inspect_model(loaded.model, context=4096)      # where the bytes go
    memfit.save(loaded.model, loaded.tokenizer, "out", recipe=report["recipe"])
    memfit.load("out")                                     # or transformers' from_pretrained
    plan = memfit.fit("default", budget="700MB")           # the best plan within a memory budget
    plan.build("out"); plan.report("out")                  # measured, then written
"""

from memfit.api import compress_
from memfit.compress import compress_to
from memfit.errors import UserError
from memfit.eval.memory import inspect_model
from memfit.eval.run import run_eval as evaluate
from memfit.formats.grid import IntFormat
from memfit.io.hf import register_with_transformers
from memfit.io.save import load, save
from memfit.models import Loaded, load_model
from memfit.plan import FitOptions, Plan, fit
from memfit.recipe import PRESETS, Calib, Quant, Recipe, load_recipe

register_with_transformers()  # AutoModelForCausalLM.from_pretrained(memfit folder) after `import memfit`

__all__ = ["compress_", "load", "save", "register_with_transformers", "compress_to", "UserError", "inspect_model", "evaluate", "IntFormat",
           "Loaded", "load_model", "fit", "FitOptions", "Plan", "PRESETS", "Calib", "Quant", "Recipe", "load_recipe"]
__version__ = "0.1.0"
