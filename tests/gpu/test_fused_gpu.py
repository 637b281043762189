"""Fused dispatch / combine on 2, 4 or 8 GPUs (the largest of those the machine has): both transports (NCCL and
NVLink symmetric memory) through the CPU suite's checks for that world size, one dispatch -> gmm -> combine step
captured in a CUDA graph and replayed with new routing, and bitwise determinism across runs. Spawns its own
processes (one per GPU):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python -m pytest -q tests/gpu/test_fused_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

TRANSPORTS = ("nccl", "symm")
WORLD = max([w for w in (2, 4, 8) if w <= torch.cuda.device_count()] or [2])


def _scenarios(world: int) -> list[str]:
    from tests.test_fused_dispatch import SCENARIOS

    return [name for name, sc in SCENARIOS.items() if sc["world"] == world]


def _graph_step(rank, transport):
    """dispatch -> gmm (per-expert weights) -> combine, eager and captured; replayed on new routing."""
    import torch.distributed as dist

    from moetron import gmm
    from moetron.dispatch import combine, dispatch

    dev = torch.device("cuda", rank)
    T, H, E, K, B = 96, 256, 16, 4, 128
    E_l = E // dist.get_world_size()
    g = torch.Generator(device=dev).manual_seed(10 + rank)
    w_exp = torch.randn(E_l, H, H, device=dev, generator=g, dtype=torch.bfloat16) / H ** 0.5

    def routing(seed):
        gg = torch.Generator(device=dev).manual_seed(seed * 7 + rank)
        x = torch.randn(T, H, device=dev, generator=gg).to(torch.bfloat16)
        ids = torch.rand(T, E, device=dev, generator=gg).argsort(1)[:, :K].contiguous()
        w = torch.rand(T, K, device=dev, generator=gg)
        return x, ids, w

    def step(x, ids, w):
        r = dispatch(x, ids, group=dist.group.WORLD, num_experts=E, expert_scales=w, max_tokens_per_rank=B,
                     transport=transport)
        h = gmm(r.expand_x, w_exp, offsets=r.tokens_per_expert)
        return combine(h, r.handle, w)

    out = {}
    with torch.no_grad():
        sx, sids, sw = (t.clone() for t in routing(0))
        for _ in range(2):  # warm-up: compiles kernels, allocates the symmetric buffers
            step(sx, sids, sw)
        torch.cuda.synchronize()
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sy = step(sx, sids, sw)
        eager, replayed = [], []
        for seed in (1, 2, 3):
            x, ids, w = routing(seed)
            eager.append(step(x, ids, w).clone())
            sx.copy_(x)
            sids.copy_(ids)
            sw.copy_(w)
            graph.replay()
            replayed.append(sy.clone())
        torch.cuda.synchronize()
        out["graph_equal"] = [torch.equal(a, b) for a, b in zip(eager, replayed)]
        # determinism: the same step three times, bitwise
        x, ids, w = routing(5)
        runs = [step(x, ids, w) for _ in range(3)]
        out["deterministic"] = all(torch.equal(runs[0], r) for r in runs[1:])
        # and against a plain reference on this rank's tokens? the experts are split, so the parent compares sums
        out["finite"] = bool(torch.isfinite(runs[0]).all())
    return out


def _no_sync_and_skew(rank, transport):
    """(1) A warmed-up dispatch -> combine under torch.cuda.set_sync_debug_mode("error"): nothing reads the device
    from the host. (2) The mixtral-hang pattern: new buffer shapes first used while this rank's GPU is still busy
    (a long matmul queued just before, on rank 0 only, so the ranks' devices drift apart), with skewed routing (every
    token to the rank's own experts: the peer receives nothing). Before the allocation protocol fix a peer's first
    barrier signal could be erased by the late zeroing of the signal pad and the step hung."""
    import torch.distributed as dist

    from moetron.dispatch import combine, dispatch

    dev = torch.device("cuda", rank)
    H, E, K = 512, 4 * dist.get_world_size(), 2  # 4 experts per rank
    out = {}
    with torch.no_grad():
        x = torch.randn(64, H, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(64)])
        w = torch.rand(64, K, device=dev)
        kw = dict(group=dist.group.WORLD, num_experts=E, expert_scales=w, max_tokens_per_rank=64, transport=transport)
        r = dispatch(x, ids, **kw)
        combine(r.expand_x, r.handle, w)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            r = dispatch(x, ids, **kw)
            y = combine(r.expand_x, r.handle, w)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out["no_sync"] = bool(torch.isfinite(y.float()).all())
        big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        ok = []
        for i in range(4):
            T = 256 + 32 * i  # a new B each time: new buffers, allocated while the GPU is busy
            xs = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            E_l = E // dist.get_world_size()
            ids_s = torch.stack([torch.randperm(E_l, device=dev)[:K] + E_l * rank for _ in range(T)])
            ws = torch.rand(T, K, device=dev)
            if rank == 0:
                for _ in range(20):
                    big = (big @ big).clamp_(-1, 1)
            r = dispatch(xs, ids_s, group=dist.group.WORLD, num_experts=E, expert_scales=ws, max_tokens_per_rank=T,
                         transport=transport)
            y = combine(r.expand_x, r.handle, ws)
            ok.append(torch.allclose(y.float(), (ws.sum(1, keepdim=True) * xs.float()), rtol=2e-2, atol=2e-2))
        torch.cuda.synchronize()
        out["skew"] = ok
    return out


def _world(rank, world):
    import torch.distributed as dist

    from moetron.dispatch.fused import select_transport
    from tests.test_fused_dispatch import _run_scenario

    res = {}
    for tr in TRANSPORTS:
        probe = torch.empty(1, device="cuda")
        chosen = select_transport(probe, dist.group.WORLD, tr)
        res[tr] = {"chosen": chosen, "scenarios": {n: _run_scenario(n, rank, "cuda", tr) for n in _scenarios(world)},
                   "graph": _graph_step(rank, tr), "sync_skew": _no_sync_and_skew(rank, tr)}
    res["auto"] = select_transport(torch.empty(1, device="cuda"), dist.group.WORLD, "auto")
    return res


@pytest.fixture(scope="module")
def gpu_world():
    from tests._ep_harness import run_cuda_world

    return run_cuda_world(WORLD, _world)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", _scenarios(WORLD))
def test_cpu_suite_checks_on_gpus(gpu_world, transport, name):
    from tests import test_fused_dispatch as cpu

    results = [r[transport] for r in gpu_world]
    assert all(r["chosen"] == transport for r in results)
    cpu.check_layout_equals_recount(results, name)
    cpu.check_combine_once_per_destination(results, name)
    cpu.check_weighted_combine_and_gradients(results, name)
    if name in cpu.INT8_SCENARIOS:
        cpu.check_int8_round_trips(results, name)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cuda_graph_replay_with_new_routing_and_determinism(gpu_world, transport):
    for r in gpu_world:
        gr = r[transport]["graph"]
        assert gr["graph_equal"] == [True, True, True]
        assert gr["deterministic"] and gr["finite"]


def test_auto_picks_symmetric_memory_on_one_node(gpu_world):
    assert [r["auto"] for r in gpu_world] == ["symm"] * WORLD


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_host_sync_and_no_hang_on_skewed_routing_with_fresh_buffers(gpu_world, transport):
    for r in gpu_world:
        s = r[transport]["sync_skew"]
        assert s["no_sync"]
        assert s["skew"] == [True] * 4
