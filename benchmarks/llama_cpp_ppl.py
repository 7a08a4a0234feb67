"""llama.cpp (llama-cpp-python) perplexity of a GGUF on given token windows (ids from memfit's
tokenizer, so the windows are memfit's): one window per context, every position scored."""
import json, sys, math
import numpy as np
from llama_cpp import Llama
path, ids_file = sys.argv[1], sys.argv[2]
wins = json.load(open(ids_file))
llm = Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=1, verbose=False)
nll = n = 0
for w in wins:
    llm.reset(); llm.eval(w)
    logits = np.array(llm.scores[:len(w)], dtype=np.float64)  # (T, vocab)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    lp = logits[np.arange(len(w) - 1), w[1:]] - lse[:-1]
    nll -= lp.sum(); n += len(w) - 1
print(json.dumps({"gguf": path, "windows": len(wins), "tokens": n, "perplexity": math.exp(nll / n)}))
