"""Host (Python) time of one training step of the `moetron train` model, by function (cProfile), after warm-up:
when the GPU work per step shrinks below the host's issue time, this is what bounds tokens/s.

    python benchmarks/profile_train_host.py --preset small --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moetron.models import MoETransformer, preset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = MoETransformer(preset(args.preset), device="cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 256, (args.batch_size, args.seq_len), device="cuda")
    y = torch.randint(0, 256, (args.batch_size, args.seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()  # the forward and the optimizer (main thread); the backward runs on autograd's thread
    for _ in range(2):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
