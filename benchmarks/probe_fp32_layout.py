"""Probe: fp32 (TF32) gmm speed by weight layout. Hopper's TF32 tensor-core MMA takes operands K-major only,
so w[g] stored [K, N] (N-major) may fall off the fast path where [N, K] (trans_w=True) stays on it."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moetron  # noqa: E402
from benchmarks._common import bench_ms  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = True
for M, K, N, G in ((32768, 14336, 4096, 8), (32768, 7168, 4096, 32), (65536, 2048, 1536, 128)):
    x = torch.randn(M, K, device="cuda")
    w = torch.randn(G, K, N, device="cuda") / math.sqrt(K)
    wt = w.transpose(1, 2).contiguous()  # [G, N, K]
    sizes = torch.full((G,), M // G, device="cuda")
    flops = 2 * M * K * N
    a = flops / bench_ms(lambda: moetron.gmm(x, w, sizes)) / 1e9
    b = flops / bench_ms(lambda: moetron.gmm(x, wt, sizes, trans_w=True)) / 1e9
    c = flops / bench_ms(lambda: w.transpose(1, 2).contiguous()) / 1e9
    dy = torch.randn(M, N, device="cuda")
    d = flops / bench_ms(lambda: moetron.gmm_k(x, dy, sizes)) / 1e9
    loop = flops / bench_ms(lambda: [x[i * (M // G):(i + 1) * (M // G)] @ w[i] for i in range(G)]) / 1e9
    print(f"M{M} K{K} N{N} G{G}: w[G,K,N] {a:.0f}  w[G,N,K] {b:.0f}  transpose-copy as TFLOP-equivalent {c:.0f}"
          f"  wgrad {d:.0f}  torch loop {loop:.0f} TFLOP/s", flush=True)
