"""Host-side cost of one gmm call (microseconds of Python and launch work per call), TMA and pointer kernels,
beside torch._grouped_mm. Small problems are bound by this, not by the GPU."""
import os, torch, time, moetron
x=torch.randn(4096,1024,device="cuda",dtype=torch.bfloat16); w=torch.randn(8,1024,1024,device="cuda",dtype=torch.bfloat16); offs=torch.arange(1,9,device="cuda",dtype=torch.int32)*512
for tma in ["auto","0"]:
    os.environ["MOETRON_TMA"]=tma
    for name,fn in [("moetron tma="+tma,lambda: moetron.gmm(x,w,offsets=offs)),("torch",lambda: torch._grouped_mm(x,w,offs=offs))]:
        for _ in range(20): fn()
        torch.cuda.synchronize(); t=time.perf_counter()
        for _ in range(300): fn()
        t1=time.perf_counter(); torch.cuda.synchronize(); print(name,"host us/call %.1f"%((t1-t)/300*1e6))
