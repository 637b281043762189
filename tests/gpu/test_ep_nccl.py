"""Expert parallelism on NCCL (CUDA, world 2): the checks of tests/test_dispatch_ep.py with real GPUs.

One spawned world of 2 ranks (rank r on cuda:r, NCCL, TF32 off) runs EP=2 for both dispatchers and returns every
rank's pieces; the tests assemble them (tests/_ep_harness.py) and compare:

- fp32: output, input gradient and every parameter gradient against the single-process layer on cuda:0 (same
  kernels, fp32, TF32 off) within fp32 rounding of the summation order, and against the float64 reference with
  the DESIGN.md rule (at most 2x the single-process layer's error plus a tiny slack); aux-loss values equal;
  dropless, packed capacity and padded capacity (the sync-free path);
- bf16: the DESIGN.md rule only (slack: one bf16 ulp, for the extra rounding of sums across ranks), data rounded
  to bf16 first so the float64 reference computes the same function;
- a rank with zero tokens (alltoall; allgather needs equal T), every token routed to rank 0's experts (the idle
  experts get exactly zero gradient);
- the alltoall dispatcher with ``pad_to_capacity`` captured with forward and backward in one CUDA graph on both
  ranks, replayed with new tokens (so new routing): output, input gradient, parameter gradients and counts equal
  an eager run on the same tokens.

Skipped unless at least 2 GPUs are visible. Run: ``python -m pytest -q tests/gpu/test_ep_nccl.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests._ep_harness import (DATA, E, H, K, T, assemble, check_against_references, round_data, run_cuda_world,
                               run_layout)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")

WORLD = 2
DISPATCHERS = ("allgather", "alltoall")
MAIN = ("dropless_aux", "capacity_packed", "capacity_padded")
RUNS = ([(case, d) for case in MAIN for d in DISPATCHERS]
        + [("uneven_aux", "alltoall"), ("uneven_capacity", "alltoall")]  # rank 1 holds no tokens
        + [("one_rank", d) for d in DISPATCHERS])
BF16_RUNS = [(case, d) for case in ("dropless_aux", "capacity_packed") for d in DISPATCHERS]
BF16_DATA = {case: round_data(DATA[case], torch.bfloat16) for case, _ in BF16_RUNS}

# CUDA graph case: capacity with probs drops into fixed buffers, aux loss and z-loss (their count all-reduce is
# captured too), biases; more tokens than the other cases so several experts overflow
GRAPH_T = 48  # tokens per rank
GRAPH_CFG = dict(hidden_size=H, ffn_hidden_size=12, num_experts=E, top_k=K, dispatcher="alltoall",
                 capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True, load_balancing=("aux_loss",),
                 z_loss_coeff=0.01, expert_linear_bias=True)


def _graph_data():
    """Global weights and, per rank, two batches (x, dy) whose routings differ."""
    from moetron import MoEConfig, MoELayer
    from tests.test_layer import randomize

    layer = MoELayer(MoEConfig(**{**GRAPH_CFG, "dispatcher": "local"}))
    randomize(layer, 7)
    g = torch.Generator().manual_seed(77)
    batches = [[(torch.randn(GRAPH_T, H, generator=g), torch.randn(GRAPH_T, H, generator=g)) for _ in range(2)]
               for _ in range(WORLD)]
    return {k: v.clone() for k, v in layer.state_dict().items()}, batches


GRAPH_DATA = _graph_data()


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------


def _graph_check(groups, rank, graph_data, ctrl):
    """Capture forward + backward of the pad_to_capacity alltoall layer in one CUDA graph, replay it with new
    tokens, compare with eager runs on the same tokens. Gradients are compared before any reduction.

    A failure is returned as {"error": traceback} instead of raised, so the other checks' results survive it; the
    ranks agree on a gloo group (``ctrl``) that both captures succeeded before either replays (a replay whose peer
    never replays would wait in NCCL forever)."""
    import traceback

    import torch.distributed as dist

    def agree(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ctrl)
        return bool(flag.item())

    try:
        state = _graph_capture(groups, rank, graph_data)
        err = None
    except Exception:  # noqa: BLE001
        state, err = None, traceback.format_exc()
    if not agree(err is None):
        return {"error": err or "the capture failed on the other rank"}
    try:
        out = _graph_replays(*state)
        err = None
    except Exception:  # noqa: BLE001
        out, err = None, traceback.format_exc()
    agree(err is None)
    return out if err is None else {"error": err}


def _graph_capture(groups, rank, graph_data):
    import torch.distributed as dist

    from moetron import MoEConfig, MoELayer

    sd, batches = graph_data
    (x1, dy1), (x2, dy2) = [(x.cuda(), dy.cuda()) for x, dy in batches[rank]]
    layer = MoELayer(MoEConfig(**GRAPH_CFG), parallel=groups, device="cuda")
    layer.load_state_dict(sd)
    params = dict(layer.named_parameters())

    def eager(x, dy):
        for p in params.values():
            p.grad = None
        xe = x.clone().requires_grad_()
        y = layer(xe)
        y.backward(dy)
        return dict(y=y.detach().clone(), xg=xe.grad.clone(), grads={n: p.grad.clone() for n, p in params.items()},
                    kept=layer.last_stats["tokens_per_expert"].clone(), dropped=int(layer.last_stats["num_dropped"]))

    ref1, ref2 = eager(x1, dy1), eager(x2, dy2)

    static_x, static_dy = x1.clone().requires_grad_(), dy1.clone()

    def step():
        y = layer(static_x)
        y.backward(static_dy)
        return y

    # warm-up on a side stream (Triton compiles, NCCL connects), then capture with every .grad unset, so the graph
    # allocates the gradients and each replay overwrites them
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for p in params.values():
                p.grad = None
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    for p in params.values():
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread may query events of earlier collectives during the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_y = step()
    static_kept = layer.last_stats["tokens_per_expert"]
    torch.cuda.synchronize()
    # the layer too: the graph reads its buffers and weights at fixed addresses
    return (layer, graph, params, static_x, static_dy, static_y, static_kept, (x1, dy1), (x2, dy2), ref1, ref2)


def _graph_replays(layer, graph, params, static_x, static_dy, static_y, static_kept, b1, b2, ref1, ref2):
    (x1, dy1), (x2, dy2) = b1, b2
    out = {}
    for name, (x, dy) in (("replay2", (x2, dy2)), ("replay1", (x1, dy1))):
        with torch.no_grad():
            static_x.copy_(x)
            static_dy.copy_(dy)
            # poison everything the replay must write
            static_y.fill_(float("nan"))
            static_x.grad.fill_(float("nan"))
            for p in params.values():
                p.grad.fill_(float("nan"))
            static_kept.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        out[name] = dict(y=static_y.clone(), xg=static_x.grad.clone(),
                         grads={n: p.grad.clone() for n, p in params.items()}, kept=static_kept.clone())
    out["eager2"], out["eager1"] = ref2, ref1
    return out


def _gpu_world(rank, world, data, bf16_data, graph_data):
    import torch.distributed as dist

    from moetron.parallel import ParallelGroups

    ctrl = dist.new_group(backend="gloo")  # host-side agreement for the CUDA graph check
    groups = ParallelGroups.build(ep=world)
    out = {"fp32": {}, "bf16": {}}
    for case, disp in RUNS:
        out["fp32"][(case, disp)] = run_layout(groups, rank, case, disp, data, device="cuda")
    for case, disp in BF16_RUNS:
        out["bf16"][(case, disp)] = run_layout(groups, rank, case, disp, bf16_data, device="cuda",
                                               dtype=torch.bfloat16)
    out["graph"] = _graph_check(groups, rank, graph_data, ctrl)
    return out


# ---------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the single-process references run here, in true fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def world():
    return run_cuda_world(WORLD, _gpu_world, DATA, BF16_DATA, GRAPH_DATA)


def _layout():
    from moetron.parallel import ParallelLayout

    return ParallelLayout.plan(WORLD, ep=WORLD)


@pytest.mark.parametrize("case, disp", RUNS)
def test_ep2_fp32_matches_single_process(world, case, disp):
    # tolerance: fp32 rounding of a different summation order (rows per expert, the gradient all-reduce), scaled
    # to each tensor's magnitude; the DESIGN.md rule against float64 as well
    check_against_references([w["fp32"][(case, disp)] for w in world], _layout(), case, device="cuda",
                             rtol=1e-5, atol=1e-5, scale_atol=True)


@pytest.mark.parametrize("case, disp", BF16_RUNS)
def test_ep2_bf16_design_rule(world, case, disp):
    # slack: one bf16 ulp of the tensor's largest magnitude. EP adds partial results across ranks in bf16 (the
    # allgather combine's reduce-scatter of outputs, the gradient all-reduce of replicated weights), one rounding
    # more than the single process makes; the 2x rule alone could fail on that where the single-process error is
    # one rounding too
    check_against_references([w["bf16"][(case, disp)] for w in world], _layout(), case, data=BF16_DATA,
                             device="cuda", dtype=torch.bfloat16, rtol=None, slack=2.0 ** -8)


def test_aux_losses_identical_across_dispatchers(world):
    values = [w["fp32"][("dropless_aux", d)]["losses"] for d in DISPATCHERS for w in world]
    assert set(values[0]) == {"aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss"}
    for v in values[1:]:
        for k in v:
            assert v[k] == pytest.approx(values[0][k], rel=1e-6), k


def test_zero_token_rank(world):
    for case in ("uneven_aux", "uneven_capacity"):
        runs = [w["fp32"][(case, "alltoall")] for w in world]
        assert runs[1]["y"].shape == (0, H) and runs[1]["xg"].shape == (0, H), case
        assert runs[1]["kept"] == [0] * E and runs[1]["dropped"] == 0, case
        assert sum(runs[0]["kept"]) > 0, case


def test_every_token_on_one_ranks_experts(world):
    for disp in DISPATCHERS:
        runs = [w["fp32"][("one_rank", disp)] for w in world]
        assert [sum(col) for col in zip(*(r["kept"] for r in runs))] == [T, T] + [0] * (E - 2)
        _, _, grads = assemble(runs, _layout(), "one_rank")
        for n in ("experts.gate_up_proj", "experts.down_proj", "experts.down_proj_bias"):
            assert grads[n][2:].abs().max() == 0, (disp, n)  # idle experts, on both ranks: exactly zero
            assert grads[n][:2].abs().max() > 0, (disp, n)


def test_cuda_graph_replay_with_new_routing_matches_eager(world):
    for r, w in enumerate(world):
        g = w["graph"]
        assert "error" not in g, f"rank {r}:\n{g['error']}"
        # the two batches route differently (else the replay would prove little)
        assert not torch.equal(g["eager1"]["kept"], g["eager2"]["kept"]), r
        assert g["eager1"]["dropped"] > 0 and g["eager2"]["dropped"] > 0, r  # the static buffers really drop
        for replay, eager in (("replay2", "eager2"), ("replay1", "eager1")):
            got, ref = g[replay], g[eager]
            assert torch.equal(got["kept"], ref["kept"]), (r, replay)
            named = [("y", got["y"], ref["y"]), ("grad of x", got["xg"], ref["xg"])]
            named += [(f"grad of {n}", got["grads"][n], ref["grads"][n]) for n in ref["grads"]]
            for name, a, b in named:
                assert torch.isfinite(a).all(), (r, replay, name)  # every poisoned element was rewritten
                atol = 1e-6 * max(1.0, b.abs().max().item())  # same kernels, same inputs: rounding at most
                torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"rank {r} {replay} {name}: {m}")

