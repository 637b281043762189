"""Why is gmm's backward slow on the host? Times the same Python work on the main thread and inside a backward
(autograd runs CUDA backwards on its own device thread), with the host clock only (no profiler).

    python benchmarks/autograd_thread_probe.py
"""

import importlib
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moetron  # noqa: E402
from benchmarks.gmm_overhead import host_us  # noqa: E402

gmm_module = importlib.import_module("moetron.ops.gmm")


def python_work():
    s = 0
    for i in range(2000):
        s += i
    return s


def main():
    x = torch.randn(24576, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    offs = (torch.arange(1, 33, device="cuda", dtype=torch.int32) * 768)
    dy = torch.randn(24576, 1024, device="cuda", dtype=torch.bfloat16)
    groups = gmm_module._make_groups(None, offs, 32, 24576, x.device)
    dx, dw = torch.empty_like(x), torch.empty_like(w)
    work = {
        "python loop 2000": python_work,
        "torch.empty x3": lambda: (torch.empty(16, device="cuda"), torch.empty(16, device="cuda"),
                                   torch.empty(16, device="cuda")),
        "dgrad+wgrad launches": lambda: (gmm_module._run_gmm(dy, w, None, groups, dx, True),
                                         gmm_module._run_gmm_k(x, dy, groups, dw, False)),
    }
    seen_threads = set()
    for name, body in work.items():
        main_us = host_us(body)
        inside = []

        class _Probe(torch.autograd.Function):
            @staticmethod
            def forward(ctx, a):
                return a.view_as(a)

            @staticmethod
            def backward(ctx, g):
                seen_threads.add(threading.get_ident())
                t0 = time.perf_counter()
                body()
                inside.append(time.perf_counter() - t0)
                return g

        a = torch.zeros(4, device="cuda", requires_grad=True)
        g = torch.ones(4, device="cuda")
        total = host_us(lambda: _Probe.apply(a).backward(g))
        inside_us = sum(inside[20:]) / max(1, len(inside) - 20) * 1e6
        print(f"{name:24s} main thread {main_us:8.1f} us | inside backward {inside_us:8.1f} us | "
              f"whole fwd+bwd {total:8.1f} us", flush=True)
    print("backward threads seen:", len(seen_threads), "main:", threading.get_ident())
    print("switch interval", sys.getswitchinterval(), "threads alive:", [t.name for t in threading.enumerate()])

    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def step():
        moetron.gmm(xg, wg, offsets=offs).backward(dy)
        xg.grad = wg.grad = None

    def torch_step():
        torch._grouped_mm(xg, wg, offs=offs).backward(dy)
        xg.grad = wg.grad = None

    plan_key = gmm_module._plan_key
    for plans in (True, False):
        gmm_module._plan_key = plan_key if plans else (lambda *a: None)
        for mt in (True, False):
            torch.autograd.set_multithreading_enabled(mt)
            print(f"plans={plans} multithreading={mt}: moetron fwd+bwd {host_us(step):8.1f} us host, "
                  f"torch {host_us(torch_step):8.1f}; moetron fwd no grad "
                  f"{host_us(lambda: moetron.gmm(x, w, offsets=offs)):8.1f}, torch "
                  f"{host_us(lambda: torch._grouped_mm(x, w, offs=offs)):8.1f}")
        torch.autograd.set_multithreading_enabled(True)
    gmm_module._plan_key = plan_key
    # GPU time alone of each part (do_bench, events), to compare with the host numbers
    import triton.testing as tt
    for name, fn in [("fwd", lambda: gmm_module._run_gmm(x, w, None, groups, dx, False)),
                     ("dgrad", lambda: gmm_module._run_gmm(dy, w, None, groups, dx, True)),
                     ("wgrad", lambda: gmm_module._run_gmm_k(x, dy, groups, dw, False)),
                     ("torch fwd", lambda: torch._grouped_mm(x, w, offs=offs)),
                     ("torch dgrad", lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)),
                     ("torch wgrad", lambda: torch._grouped_mm(x.t(), dy, offs=offs)),
                     ("moetron fwd+bwd", step), ("torch fwd+bwd", torch_step)]:
        print(f"GPU {name:18s} {tt.do_bench(fn, return_mode='median') * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
