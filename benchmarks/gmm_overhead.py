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
    # the backward's parts, called on this thread (autograd runs CUDA backwards on its own thread)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    rows["  bwd part: dgrad _run_gmm"] = host_us(lambda: gmm_module._run_gmm(dy, w, None, groups, dx, True))
    rows["  bwd part: wgrad _run_gmm_k"] = host_us(lambda: gmm_module._run_gmm_k(x, dy, groups, dw, False))

    class _Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return g, None

    rows["  autograd Function no-op fwd+bwd"] = host_us(lambda: _Noop.apply(xg, wg).backward(x))
    rows["moetron fwd+bwd, no grad accumulation"] = host_us(
        lambda: (moetron.gmm(xg, wg, offsets=offs).backward(dy), setattr(xg, "grad", None), setattr(wg, "grad", None)))
    rows["moetron fwd recorded for autograd (no backward)"] = host_us(lambda: moetron.gmm(xg, wg, offsets=offs))
    # time spent inside the backward body, on autograd's thread
    inside = []
    original = gmm_module._GroupedMatmul.backward

    import cProfile
    import pstats
    bwd_prof = cProfile.Profile()

    def timed_backward(ctx, grad):
        t0 = time.perf_counter()
        bwd_prof.enable()  # cProfile follows one thread: enable it on autograd's
        result = original(ctx, grad)
        bwd_prof.disable()
        inside.append(time.perf_counter() - t0)
        return result

    gmm_module._GroupedMatmul.backward = staticmethod(timed_backward)
    host_us(lambda: (moetron.gmm(xg, wg, offsets=offs).backward(dy), setattr(xg, "grad", None),
                     setattr(wg, "grad", None)))
    gmm_module._GroupedMatmul.backward = staticmethod(original)
    rows["  inside the backward body (profiled)"] = sum(inside[20:]) / max(1, len(inside) - 20) * 1e6
    print("backward body, on autograd's thread:")
    pstats.Stats(bwd_prof).sort_stats("tottime").print_stats(14)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        gmm_module._run_gmm(dy, w, None, groups, dx, True)
        gmm_module._run_gmm_k(x, dy, groups, dw, False)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us/call (host)")


if __name__ == "__main__":
    main()
