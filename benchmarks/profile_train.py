"""Where a training step of the `moetron train` model goes: host time issued vs wall time per step, and the GPU
kernels sorted by total time (torch.profiler), for a preset at a given micro-batch. ``--host-profile`` adds
cProfile of two steps by function: when the GPU work per step is shorter than the host's issue time, that is what
bounds tokens/s (the forward and the optimizer; autograd runs the backward on its own thread, seen only as
run_backward's total).

    python benchmarks/profile_train.py --preset small --batch-size 16 --seq-len 1024 [--host-profile]
    torchrun --nproc-per-node=2 benchmarks/profile_train.py --batch-size 64   # expert parallel, EP = processes

Under torchrun every rank holds 1/EP of the experts (``--dispatcher``, allgather by default), takes its own batch,
and reduces the gradients as ``moetron train --ep N`` does; rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import host_and_wall_ms, print_kernel_table  # noqa: E402
from moetron.models import MoETransformer, preset  # noqa: E402
from moetron.train import distributed as D  # noqa: E402
from moetron.train.master import MasterWeights  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--host-profile", action="store_true", help="also cProfile two steps (host time)")
    parser.add_argument("--no-master-weights", dest="master", action="store_false",
                        help="fp32 weights cast by autocast (as `moetron train --no-master-weights`)")
    parser.add_argument("--dispatcher", default="allgather", help="under torchrun: the EP dispatcher")
    args = parser.parse_args(argv)
    world = D.env_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    ctx = D.init_distributed(world, device)  # one process: no group
    show = ctx.is_main
    torch.manual_seed(0)
    cfg = preset(args.preset, **({"dispatcher": args.dispatcher} if ctx.distributed else {}))
    model = MoETransformer(cfg, device=device, parallel=ctx.groups if ctx.distributed else None).train()
    master = MasterWeights(model) if args.master else None
    opt = torch.optim.AdamW(master.params if master else model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(ctx.rank)
    x = torch.randint(0, 256, (args.batch_size, args.seq_len), device=device, generator=g)
    y = torch.randint(0, 256, (args.batch_size, args.seq_len), device=device, generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        (loss / world).backward()
        if master is not None:
            master.accumulate()
        D.reduce_grads(model, ctx, master)
        opt.step()
        if master is not None:
            master.publish()
            master.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)

    host, wall = host_and_wall_ms(step, args.steps)
    tokens = args.batch_size * args.seq_len
    flops = cfg.flops_per_token(args.seq_len) * tokens
    if show:
        ep = f" EP={world} ({args.dispatcher}), per GPU:" if ctx.distributed else ":"
        print(f"{args.preset} B={args.batch_size} S={args.seq_len}{ep} host {host:.1f} ms/step issued, wall "
              f"{wall:.1f} ms/step, {tokens / wall * 1e3:,.0f} tokens/s, {flops / wall / 1e9:.0f} TFLOP/s model FLOPs")
    if not args.no_profile:
        print_kernel_table(step, 2, args.rows, name_width=60, show=show)
    if args.host_profile and not ctx.distributed:
        import cProfile
        import pstats

        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2):
            step()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.rows)
        stats.sort_stats("cumulative").print_stats(args.rows)
    ctx.close()


if __name__ == "__main__":
    main()
