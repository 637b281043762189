"""Host-side cost of one gmm call (microseconds of Python and launch work per call) beside
torch._grouped_mm, split into its parts. Small problems are bound by this, not by the GPU.

    python benchmarks/gmm_overhead.py
"""

import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moetron  # noqa: E402

gmm_module = importlib.import_module("moetron.ops.gmm")


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, 9, device="cuda", dtype=torch.int32) * 512
    out = torch.empty(4096, 1024, device="cuda", dtype=torch.bfloat16)
    groups = gmm_module._make_groups(None, offs, 8, 4096, x.device)
    rows = {}
    rows["torch._grouped_mm"] = host_us(lambda: torch._grouped_mm(x, w, offs=offs))
    for tma in ("auto", "0"):
        os.environ["MOETRON_TMA"] = tma
        rows[f"moetron.gmm tma={tma}"] = host_us(lambda: moetron.gmm(x, w, offsets=offs))
        rows[f"  launcher only tma={tma}"] = host_us(lambda: gmm_module._launch_gmm(x, w, None, groups, out, False))
    os.environ["MOETRON_TMA"] = "auto"
    rows["  validation (_make_groups)"] = host_us(lambda: gmm_module._make_groups(None, offs, 8, 4096, x.device))
    from triton.tools.tensor_descriptor import TensorDescriptor
    rows["  TensorDescriptor.from_tensor x2"] = host_us(
        lambda: (TensorDescriptor.from_tensor(x, [128, 64]), TensorDescriptor.from_tensor(w, [1, 64, 256])))
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dy = torch.randn_like(out)
    rows["moetron fwd+bwd"] = host_us(lambda: moetron.gmm(xg, wg, offsets=offs).backward(dy))
    rows["torch fwd+bwd"] = host_us(lambda: torch._grouped_mm(xg, wg, offs=offs).backward(dy))
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us/call (host)")


if __name__ == "__main__":
    main()
