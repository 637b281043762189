"""Kernel times of one fused dispatch (symmetric-memory transport) at a given shape, from torch.profiler on rank 0,
plus its host time per call (dispatch, and combine): which part of a dispatch costs what. ``--host-profile``
adds cProfile of 50 dispatch + combine calls on rank 0 (the decode case is host-bound). Diagnostic only.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node=2 benchmarks/profile_dispatch.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import print_kernel_table  # noqa: E402
from benchmarks.dispatch import CASES, _routing  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="qwen3_30b", choices=list(CASES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--transport", default="symm")
    ap.add_argument("--num-sms", type=int, default=24)
    ap.add_argument("--host-profile", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda")
    c = CASES[args.case]
    from moetron.dispatch import combine, dispatch

    x = torch.randn(args.tokens, c["H"], device=dev, dtype=torch.bfloat16)
    ids, probs = _routing(args.tokens, c["E"], c["K"], rank, dev)
    kw = dict(group=dist.group.WORLD, num_experts=c["E"], expert_scales=probs, max_tokens_per_rank=args.tokens,
              transport=args.transport, num_sms=args.num_sms)
    with torch.no_grad():
        for _ in range(5):
            dispatch(x, ids, **kw)
        torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(20):
            dispatch(x, ids, **kw)
        host = (time.perf_counter() - t) / 20 * 1e6
        torch.cuda.synchronize()
        r = dispatch(x, ids, **kw)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(20):
            combine(r.expand_x, r.handle, probs)
        host_c = (time.perf_counter() - t) / 20 * 1e6
        torch.cuda.synchronize()
        if rank == 0:
            print(f"{args.case} T={args.tokens} {args.transport}: host {host:.0f} us issued per dispatch, "
                  f"{host_c:.0f} us per combine")
        dist.barrier()
        if args.host_profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            if rank == 0:
                prof.enable()
            for _ in range(50):
                d = dispatch(x, ids, **kw)
                combine(d.expand_x, d.handle, probs)
            if rank == 0:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
            torch.cuda.synchronize()
            dist.barrier()
        if rank == 0:
            print_kernel_table(lambda: dispatch(x, ids, **kw), 5, 12, name_width=60)
        else:  # the same number of calls: each one has barriers with rank 0
            for _ in range(5):
                dispatch(x, ids, **kw)
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
