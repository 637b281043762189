"""Expert-parallel dispatch / combine: moetron's fused path (symmetric memory and NCCL transports) against the
all-to-all dispatcher (count exchange + permute + all_to_all_single + sort), in one run.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node=2 benchmarks/dispatch.py

Any world size (E must divide by it). Cases: dsv3 (H 7168, 256 experts, top-8) and qwen3_30b (H 2048, 128 experts,
top-8), bf16, at 128 tokens per rank (decode) and 4096 (prefill), random uniform routing. Modes: dispatch, combine
(expert outputs = the dispatched rows), round_trip (dispatch + combine), and for moetron's two transports
round_trip_graph: the same round trip captured once in a CUDA graph and replayed, as a serving engine runs its
decode steps (no host sync anywhere makes that possible; the eager rows are mostly host time at decode).
moetron dispatches with zero_padding=False, as its MoE layer does: the rows past the received total are left
unwritten (the all-to-all dispatcher allocates exact sizes after its host sync and writes no padding either).

Timing: every rank runs the same fixed number of iterations between CUDA events (do_bench picks its repeat count
from each rank's own estimate, and ranks that disagree would deadlock in the collectives); the median of 5 trials
of 20 iterations, after 5 warm-up iterations and a barrier. Reported per rank 0.

GB/s counts the bytes that leave each GPU: rows sent to other ranks x H x 2 bytes (rank 0's routing). For the fused
path a token goes to a rank once, whatever number of its experts live there; for alltoall once per (token, expert).
Both counts are reported (``bytes_out``), each provider's own traffic, and also ``GBps_fused_bytes``: the fused
byte count over each provider's time (the useful work, comparable across providers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script by torchrun

CASES = {"dsv3": dict(H=7168, E=256, K=8), "qwen3_30b": dict(H=2048, E=128, K=8)}
TOKENS = {"decode": 128, "prefill": 4096}
PROVIDERS = ("moetron_symm", "moetron_nccl", "alltoall")
MODES = ("dispatch", "combine", "round_trip", "round_trip_graph")


def _time_ms(fn, iters=20, trials=5, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(trials):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / iters)
    return statistics.median(times)


def _routing(T, E, K, rank, dev):
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    ids = torch.rand(T, E, device=dev, generator=g).argsort(1)[:, :K].contiguous()
    probs = torch.softmax(torch.randn(T, K, device=dev, generator=g), 1)
    return ids, probs


def _bytes_out(ids, E, world, rank, H):
    """(fused bytes: distinct other destination ranks per token, alltoall bytes: (token, expert) rows to other
    ranks), from rank ``rank``'s routing (host side, outside the timing)."""
    E_l = E // world
    dest = (ids // E_l).cpu()
    hit = torch.zeros(ids.shape[0], world, dtype=torch.bool).scatter_(1, dest, True)
    hit[:, rank] = False
    fused = int(hit.sum()) * H * 2
    a2a = int((dest != rank).sum()) * H * 2
    return fused, a2a


def _bench_fused(x, ids, probs, E, transport, num_sms, B):
    from moetron.dispatch import combine, dispatch

    # zero_padding=False, as the MoE layer dispatches: the alltoall dispatcher writes no padding rows either
    kw = dict(group=dist.group.WORLD, num_experts=E, expert_scales=probs, max_tokens_per_rank=B,
              transport=transport, num_sms=num_sms, zero_padding=False)
    with torch.no_grad():
        r = dispatch(x, ids, **kw)
        h = r.expand_x
        def rt():
            d = dispatch(x, ids, **kw)
            return combine(d.expand_x, d.handle, probs)

        fns = {"dispatch": lambda: dispatch(x, ids, **kw), "combine": lambda: combine(h, r.handle, probs),
               "round_trip": rt}
        times = {m: _time_ms(f) for m, f in fns.items()}
        # On a group of its own: after a capture, the symmetric-memory path keeps every barrier of that group
        # (moetron/dispatch/_symm.py), which would slow the eager rows of the cases measured after this one.
        graph_kw = dict(kw, group=_graph_group())

        def rt_graph():
            d = dispatch(x, ids, **graph_kw)
            return combine(d.expand_x, d.handle, probs)

        times["round_trip_graph"] = _time_ms(_graphed(rt_graph))
        return times


def _graph_group():
    if not hasattr(_graph_group, "group"):
        _graph_group.group = dist.new_group(list(range(dist.get_world_size())))
    return _graph_group.group


def _graphed(fn):
    """``fn`` captured once in a CUDA graph after warm-up calls; returns the replay."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def _bench_alltoall(x, ids, probs, E, K, world):
    from moetron import MoEConfig
    from moetron.dispatch import AllToAllDispatcher
    from moetron.parallel import ParallelGroups

    H = x.shape[1]
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=64, num_experts=E, top_k=K, dispatcher="alltoall")
    groups = _bench_alltoall.groups = getattr(_bench_alltoall, "groups", None) or ParallelGroups.build(ep=world)
    disp = AllToAllDispatcher(cfg, groups)
    with torch.no_grad():
        d = disp.dispatch(x, probs, ids)
        h = d.x

        def rt():
            dd = disp.dispatch(x, probs, ids)
            return disp.combine(dd.x, dd.handle)

        return {"dispatch": _time_ms(lambda: disp.dispatch(x, probs, ids)),
                "combine": _time_ms(lambda: disp.combine(h, d.handle)), "round_trip": _time_ms(rt)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tokens", default=",".join(TOKENS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--num-sms", type=int, default=24, help="programs of the symmetric-memory kernels")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local)
    rows = []
    for case in args.cases.split(","):
        H, E, K = (CASES[case][k] for k in ("H", "E", "K"))
        if E % world:
            continue
        for phase in args.tokens.split(","):
            T = TOKENS[phase]
            g = torch.Generator(device=dev).manual_seed(99 + rank)
            x = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
            ids, probs = _routing(T, E, K, rank, dev)
            fused_b, a2a_b = _bytes_out(ids, E, world, rank, H)
            for prov in args.providers.split(","):
                if prov == "alltoall":
                    ms = _bench_alltoall(x, ids, probs, E, K, world)
                    own = a2a_b
                else:
                    ms = _bench_fused(x, ids, probs, E, prov.split("_")[1], args.num_sms, T)
                    own = fused_b
                for mode, t in ms.items():
                    trips = 2 if mode.startswith("round_trip") else 1
                    nbytes, fb = own * trips, fused_b * trips
                    row = {"case": f"{case}_{phase}", "provider": prov, "mode": mode, "tokens_per_rank": T, "H": H,
                           "experts": E, "top_k": K, "world": world, "ms": t, "us": t * 1e3, "bytes_out": nbytes,
                           "GBps": nbytes / t / 1e6, "GBps_fused_bytes": fb / t / 1e6,
                           "num_sms": args.num_sms if prov == "moetron_symm" else None}
                    rows.append(row)
                    if rank == 0:
                        print(f"{row['case']:>18} {prov:>13} {mode:>10}  {row['us']:9.1f} us  "
                              f"{row['GBps']:7.1f} GB/s (own bytes)  {row['GBps_fused_bytes']:7.1f} GB/s "
                              f"(fused bytes)", flush=True)
    if rank == 0:
        _write(rows, world, args.out_dir)
    dist.barrier()
    dist.destroy_process_group()


def _write(rows, world, out_dir):
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._common import gpu_tag, meta

    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"dispatch_{gpu_tag()}x{world}.json")
    with open(path, "w") as f:
        json.dump({"meta": {**meta(), "world": world}, "rows": rows}, f, indent=1)
    # ratios measured in this run
    by = {(r["case"], r["provider"], r["mode"]): r["us"] for r in rows}
    for (case, prov, mode), us in sorted(by.items()):
        base = by.get((case, "alltoall", mode))
        if prov != "alltoall" and base:
            print(f"{case:>18} {prov:>13} {mode:>10}  {base / us:5.2f}x vs alltoall")
    print("wrote", path)


if __name__ == "__main__":
    main()
