import torch, time, sys
from memfit.io.save import load
torch.set_num_threads(2)
m = load(sys.argv[1], dtype=getattr(torch, sys.argv[2])).model
ids = torch.randint(0, 1000, (1, 512))
ts=[]
with torch.inference_mode():
    for i in range(6):
        t=time.perf_counter(); m(ids); ts.append(round(time.perf_counter()-t,3))
print(sys.argv[2], ts)
