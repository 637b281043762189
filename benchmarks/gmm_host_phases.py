"""Where the host time of one gmm forward+backward goes (blog_g32 shape, H100): host-clock marks around the
validation, the forward body, autograd's hand-off to its backward thread, the backward body and the return,
then cProfile of the forward (main thread) and of the backward body (autograd's thread). Diagnostic only.

    python benchmarks/gmm_host_phases.py
"""
import importlib, math, sys, time, os, statistics
sys.path.insert(0, os.getcwd())
import torch, moetron
gm = importlib.import_module("moetron.ops.gmm")
M, K, N, G = 24576, 1024, 1024, 32
offs = (torch.arange(1, G + 1, dtype=torch.int32) * (M // G)).cuda()
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(G, K, N, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
pc = time.perf_counter_ns
marks = {}
ofwd, obwd = gm._GroupedMatmul.forward, gm._GroupedMatmul.backward
def fwd(ctx, *a):
    marks["fwd_in"] = pc(); r = ofwd(ctx, *a); marks["fwd_out"] = pc(); return r
def bwd(ctx, dy):
    marks["bwd_in"] = pc(); r = obwd(ctx, dy); marks["bwd_out"] = pc(); return r
gm._GroupedMatmul.forward = staticmethod(fwd); gm._GroupedMatmul.backward = staticmethod(bwd)
rows = []
for it in range(400):
    t0 = pc(); out = moetron.gmm(xg, wg, offsets=offs); t1 = pc(); out.backward(dy); t2 = pc()
    xg.grad = wg.grad = None; t3 = pc()
    rows.append(dict(checks=marks["fwd_in"] - t0, fwd_body=marks["fwd_out"] - marks["fwd_in"], apply_exit=t1 - marks["fwd_out"],
                     handoff=marks["bwd_in"] - t1, bwd_body=marks["bwd_out"] - marks["bwd_in"], bwd_exit=t2 - marks["bwd_out"],
                     clear=t3 - t2, total=t3 - t0))
    if it % 50 == 0: torch.cuda.synchronize()
for k in rows[0]:
    v = [r[k] / 1e3 for r in rows[50:]]
    print(f"{k:12s} median {statistics.median(v):8.1f} us  p10 {sorted(v)[len(v)//10]:8.1f}  p90 {sorted(v)[9*len(v)//10]:8.1f}")
# plain torch for comparison
tt = []
for it in range(400):
    t0 = pc(); torch._grouped_mm(xg, wg, offs=offs).backward(dy); xg.grad = wg.grad = None; tt.append(pc() - t0)
    if it % 50 == 0: torch.cuda.synchronize()
print("torch total median", statistics.median(tt[50:]) / 1e3)
import cProfile, pstats
fp, bp = cProfile.Profile(), cProfile.Profile()
def bwd2(ctx, dy):
    bp.enable(); r = obwd(ctx, dy); bp.disable(); return r
gm._GroupedMatmul.backward = staticmethod(bwd2)
for _ in range(200):
    fp.enable(); out = moetron.gmm(xg, wg, offsets=offs); fp.disable()
    out.backward(dy); xg.grad = wg.grad = None
torch.cuda.synchronize()
print("=== forward with grad (main thread)")
pstats.Stats(fp).sort_stats("tottime").print_stats(22)
print("=== backward body (autograd thread)")
pstats.Stats(bp).sort_stats("tottime").print_stats(16)
