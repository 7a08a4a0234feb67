"""A second model for the AWQ checks: a small Llama (GQA, SmolLM2's tokenizer) trained briefly on
builtin:eval text (not the calib split the checks calibrate on)."""
import sys, time, torch
from transformers import AutoConfig, AutoModelForCausalLM
import memfit
from memfit.calib.data import token_windows
torch.manual_seed(0)
tok = memfit.load_model("default").tokenizer
cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=192, intermediate_size=576,
                           num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
model = AutoModelForCausalLM.from_config(cfg)
data = token_windows(tok, "builtin", "eval", seq_len=128)
print("windows", data.shape, flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
steps = int(sys.argv[1]); t0 = time.time()
sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
for step in range(steps):
    idx = torch.randint(0, len(data), (8,))
    loss = model(data[idx], labels=data[idx]).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(); sched.step()
    if step % 50 == 0 or step == steps - 1:
        print(step, round(loss.item(), 3), round(time.time() - t0), flush=True)
model.save_pretrained(sys.argv[2]); tok.save_pretrained(sys.argv[2])
