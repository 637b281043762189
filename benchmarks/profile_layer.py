"""Where the MoE layer's time goes: torch.profiler over a few forward+backward steps of moetron.MoELayer,
GPU kernels sorted by total time, plus the host time per step.

    python benchmarks/profile_layer.py --shape qwen3_30b --tokens 8192
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import host_and_wall_ms, print_kernel_table  # noqa: E402
from benchmarks.layer import SHAPES, build_moetron, master_weights  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3_30b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    H, F, E, K = SHAPES[args.shape]
    torch.manual_seed(0)
    layer, run = build_moetron(master_weights(H, F, E), H, F, E, K, "cuda", torch.bfloat16)
    x = torch.randn(args.tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    params = list(layer.parameters()) + [x]

    def step():
        for p in params:  # as the benchmark's grad_to_none: no gradient accumulation kernels
            p.grad = None
        run(x).backward(dy)

    host, wall = host_and_wall_ms(step, args.steps)
    print(f"{args.shape} T={args.tokens}: host {host:.2f} ms/step issued, {wall:.2f} ms/step wall")
    print_kernel_table(step, args.steps, args.rows)


if __name__ == "__main__":
    main()
