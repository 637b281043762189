"""Expert-parallel MoE layer benchmark: moetron.MoELayer forward+backward at EP=N (one process per GPU) against EP=1
on one GPU with the same tokens per GPU, and Megatron-Core's MoELayer (alltoall dispatcher) at the same EP=N, in
one run.

    torchrun --nproc-per-node=N benchmarks/ep.py                     # GPU: qwen3_30b and mixtral, T = 8192 per rank
    python -m torch.distributed.run --nproc-per-node=2 benchmarks/ep.py --quick --device cpu   # CPU/gloo smoke run

Every rank holds its own T tokens (random, bf16) and E/N experts; the router is replicated. Per shape:

1. moetron at EP=N, for each dispatcher (alltoall, allgather, fused; one that raises NotImplementedError is
   recorded as skipped): ms per fwd+bwd step (median on each rank, the slowest rank's reported), then a breakdown
   pass that runs the layer's pieces (router, dispatcher.dispatch, experts, dispatcher.combine) with CUDA events
   between them in the forward and in tensor hooks in the backward (nothing is added to the library, no extra
   syncs): router / dispatch / experts / combine ms, forward and backward, averaged over the ranks.
2. moetron at EP=1 on rank 0's GPU alone (the other ranks wait): all E experts, the same T tokens, the same weights
   (gathered from the EP shards), so its output on rank 0's tokens must match the EP=N output.
3. Megatron-Core 0.19.2's MoELayer (local spec: SequentialMLP experts, no Transformer Engine; alltoall dispatcher,
   softmax top-k, aux loss 1e-2, fp32 router) with expert_model_parallel_size=N and the same weights.

Timing: benchmarks/_common.bench_ms_ranks (every rank makes the same number of calls; do_bench's own repetition
count could differ between ranks and hang a collective). FLOPs per GPU = 2*T*K*H*F*3 forward, 3x for fwd+bwd,
assuming balanced routing (load_imbalance in each row says how far from that the random router is).
Writes benchmarks/results/ep_<gpu>x<N>.json (DESIGN.md format; rank 0) after every case, and prints a table.
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set unless already set.
"""

from __future__ import annotations

import os

# before torch.distributed initialises anything: no NVLink multicast on the shared machines
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import StepClock, bench_ms_ranks, dump_results, gpu_tag, megatron_without_te  # noqa: E402

SHAPES = {  # name: hidden H, expert ffn F, experts E, top-k K
    "qwen3_30b": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
}
QUICK_SHAPES = {"qwen3_30b": (64, 32, 16, 4), "mixtral": (64, 96, 8, 2)}  # E divisible by 2, 4, 8
DISPATCHERS = ("alltoall", "allgather", "fused")
STAGES = ("router", "dispatch", "experts", "combine")


def log(*a):
    if RANK == 0:
        print(*a, flush=True)


RANK = 0


# ---------------------------------------------------------------------------------------------------------
# process groups and agreement between ranks
# ---------------------------------------------------------------------------------------------------------


def init(device: str, timeout_s: int):
    global RANK
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    RANK = dist.get_rank()
    return dist.get_rank(), dist.get_world_size()


def _reduce(v: float, op) -> float:
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v)], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_ok(ok: bool) -> bool:
    """True on every rank only if it is True on every rank (so all ranks skip or go on together)."""
    return _reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0


def rank_max(v: float) -> float:
    return _reduce(v, dist.ReduceOp.MAX)


def rank_mean(v: float) -> float:
    return _reduce(v, dist.ReduceOp.SUM) / dist.get_world_size()


def over_budget(args) -> bool:
    """Past --budget-s on any rank (all ranks agree, so they skip the same cases)."""
    return not all_ok(time.monotonic() - args.t0 <= args.budget_s)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.numel() else 0.0


def free(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# moetron
# ---------------------------------------------------------------------------------------------------------


def moetron_layer(shape, dispatcher, parallel, device, dtype, weights=None):
    """MoELayer with this dispatcher; ``weights`` {name: tensor} (this rank's shards) copied in when given."""
    from moetron import MoEConfig, MoELayer

    H, F, E, K = shape
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=K, dispatcher=dispatcher)
    layer = MoELayer(cfg, parallel=parallel, device=device, dtype=dtype).train()
    if weights is not None:
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(weights[n])
    return layer


def fwd_bwd_step(module, run, x, dy):
    params = [p for p in module.parameters() if p.requires_grad]
    xg = x.detach().clone().requires_grad_(True)

    def step():
        for p in params:  # host only: no gradient accumulation kernels timed
            p.grad = None
        xg.grad = None
        run(xg).backward(dy)

    return step


def pieces_step(layer, x, dy, clock, marks: dict):
    """One fwd+bwd through the layer's pieces (MoELayer.forward without shared experts), a timestamp after each
    piece: forward in program order; backward from tensor hooks, which run in stream order just before the node
    consuming that gradient (the autograd engine runs ready nodes latest-created first, so combine, experts,
    dispatch, router)."""
    x = x.detach().requires_grad_(True)
    marks["start"] = clock.mark()
    route = layer.router(x)
    marks["router"] = clock.mark()
    x_d = x.view(x.shape)  # its own autograd node: its gradient marks the end of the dispatch backward
    d = layer.dispatcher.dispatch(x_d, route.probs, route.expert_ids)
    marks["dispatch"] = clock.mark()
    h = layer.experts(d.x, d.offsets)
    marks["experts"] = clock.mark()
    y = layer.dispatcher.combine(h, d.handle)
    marks["combine"] = clock.mark()

    def hook(name):
        def fn(grad):
            marks.setdefault(name, clock.mark())  # first gradient to arrive for that tensor
        return fn

    h.register_hook(hook("combine_bwd"))
    if d.x.requires_grad:
        d.x.register_hook(hook("experts_bwd"))
    x_d.register_hook(hook("dispatch_bwd"))
    y.backward(dy)
    marks["router_bwd"] = clock.mark()


def breakdown(layer, x, dy, clock, iters: int, warmup: int = 2) -> dict:
    """Per-stage ms (medians over ``iters`` steps on this rank): <stage>_fwd_ms, <stage>_bwd_ms, <stage>_ms."""
    order_fwd = ["start", "router", "dispatch", "experts", "combine"]
    order_bwd = ["combine", "combine_bwd", "experts_bwd", "dispatch_bwd", "router_bwd"]
    bwd_stage = {"combine_bwd": "combine", "experts_bwd": "experts", "dispatch_bwd": "dispatch",
                 "router_bwd": "router"}
    samples: dict = {}
    for i in range(warmup + iters):
        for p in layer.parameters():
            p.grad = None
        marks: dict = {}
        pieces_step(layer, x, dy, clock, marks)
        clock.sync()
        if i < warmup:
            continue
        for a, b in zip(order_fwd, order_fwd[1:]):
            samples.setdefault(f"{b}_fwd_ms", []).append(clock.ms(marks[a], marks[b]))
        prev = "combine"
        for b in order_bwd[1:]:
            if b in marks:
                samples.setdefault(f"{bwd_stage[b]}_bwd_ms", []).append(clock.ms(marks[prev], marks[b]))
                prev = b
        samples.setdefault("total_ms", []).append(clock.ms(marks["start"], marks["router_bwd"]))
    out = {k: statistics.median(v) for k, v in samples.items()}
    for s in STAGES:
        if f"{s}_fwd_ms" in out and f"{s}_bwd_ms" in out:
            out[f"{s}_ms"] = out[f"{s}_fwd_ms"] + out[f"{s}_bwd_ms"]
    return out


def safe_breakdown(layer, x, dy, clock, iters: int, collective: bool) -> dict:
    """breakdown() averaged over the ranks (``collective``), or {"breakdown_error": ...} where it fails (a
    dispatcher whose pieces do not fit MoELayer.forward's sequence, say) on any rank."""
    try:
        parts, err = breakdown(layer, x, dy, clock, iters), None
    except Exception as e:  # noqa: BLE001
        parts, err = {}, repr(e)[:300]
        traceback.print_exc()
    if collective:
        if not all_ok(err is None):
            return {"breakdown_error": err or "failed on another rank"}
        return {k: rank_mean(v) for k, v in sorted(parts.items())}
    return parts if err is None else {"breakdown_error": err}


def gather_full_weights(weights: dict, ep: int) -> dict:
    """{name: global tensor}: expert shards (dim 0, EP rank order) gathered on every rank; the rest replicated."""
    from moetron.dispatch._comm import all_gather_flat

    full = {}
    for n, t in weights.items():
        if n.startswith("experts.") and ep > 1:
            out = t.new_empty((ep * t.shape[0],) + tuple(t.shape[1:]))
            all_gather_flat(out, t.contiguous(), None)
            full[n] = out
        else:
            full[n] = t
    return full


# ---------------------------------------------------------------------------------------------------------
# Megatron-Core
# ---------------------------------------------------------------------------------------------------------

_MEGATRON_READY = False


def stub_cuda_for_cpu_megatron():
    """CPU smoke only: Megatron's alltoall dispatcher copies split sizes on a torch.cuda.Stream (turning them into
    numpy arrays only when they come from the GPU) and its router asks torch.cuda.current_device(); give a CPU-only
    torch stand-ins for those calls."""
    import contextlib

    from megatron.core.transformer.moe import token_dispatcher

    to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def move(t, as_numpy=False, record_stream=False):
        if torch.is_tensor(t) and not t.is_cuda and as_numpy:
            return t.numpy()
        return to_cpu(t, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move

    class Event:
        def synchronize(self):
            pass

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

        def record_event(self, *a):
            return Event()

        def __eq__(self, other):
            return isinstance(other, Stream)

        def __hash__(self):
            return 0

    one = Stream()
    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda *a, **k: one
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    torch.cuda.current_device = lambda: "cpu"


def megatron_layer(shape, ep, device, dtype, weights, fused_act: bool):
    """Megatron-Core's MoELayer at expert_model_parallel_size=ep with this rank's expert shards from ``weights``."""
    global _MEGATRON_READY
    import torch.nn.functional as Fn
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    megatron_without_te()
    if not _MEGATRON_READY:
        if device == "cpu" and not torch.cuda.is_available():
            stub_cuda_for_cpu_megatron()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=ep, create_gloo_process_groups=False)
        if device == "cuda":
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(1234)
        _MEGATRON_READY = True
    H, F, E, K = shape
    cfg = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=max(1, H // 128), ffn_hidden_size=F,
        moe_ffn_hidden_size=F, num_moe_experts=E, moe_router_topk=K, moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True, activation_func=Fn.silu,
        add_bias_linear=False, bias_activation_fusion=fused_act,  # Megatron-LM's default: torch.compile'd SwiGLU
        bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype, hidden_dropout=0.0,
        attention_dropout=0.0, transformer_impl="local", tensor_model_parallel_size=1,
        expert_model_parallel_size=ep, sequence_parallel=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=device != "cuda",
    )
    layer = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)(config=cfg, layer_number=1)
    layer.set_layer_number(1)  # so the router records its aux loss as inside a model
    layer = layer.to(device).train()
    experts = layer.experts.local_experts
    if len(experts) != E // ep:
        raise RuntimeError(f"Megatron built {len(experts)} local experts, expected {E // ep}")
    with torch.no_grad():
        layer.router.weight.copy_(weights["router.weight"])
        for e, mlp in enumerate(experts):  # local expert e is global expert ep_rank * E / ep + e in both
            mlp.linear_fc1.weight.copy_(weights["experts.gate_up_proj"][e])  # [gate; up], as Megatron's GLU chunks
            mlp.linear_fc2.weight.copy_(weights["experts.down_proj"][e])

    def run(x):  # Megatron wants [S, B, H]
        out, _ = layer(x.unsqueeze(1))
        return out.squeeze(1)

    return layer, run


# ---------------------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------------------


def bench_shape(name, shape, T, args, rank, world, parallel, device, dtype, rows, save):
    H, F, E, K = shape
    cuda = device == "cuda"
    clock = StepClock(cuda)
    flops = 3 * 2.0 * T * K * H * F * 3  # fwd+bwd per GPU (balanced routing)
    timer = dict(warmup=args.warmup, rep_ms=args.rep_ms, min_reps=args.min_reps, max_reps=args.max_reps)
    prefix = f"{name}/T{T}"

    def row(case, provider, ms, **extra):
        r = {"case": case, "provider": provider, "mode": "fwd_bwd", "ms": ms, "tflops": flops / ms / 1e9,
             "tokens_per_s_per_gpu": T / ms * 1e3, "T_per_rank": T, "H": H, "F": F, "E": E, "K": K, **extra}
        rows.append(r)
        log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        save()
        return r

    def skip(case, provider, why, **extra):
        rows.append({"case": case, "provider": provider, "mode": "fwd_bwd", "skipped": why, **extra})
        log(f"{case} {provider}: skipped: {why}")
        save()

    if E % world:
        skip(f"{prefix}/ep{world}", "moetron", f"E={E} is not divisible by EP={world}")
        return
    g = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own tokens
    x = torch.randn(T, H, device=device, generator=g).to(dtype)
    dy = torch.randn(T, H, device=device, generator=g).to(dtype)

    weights, y_first, ep_rows = None, None, []
    for disp in args.dispatchers:
        case = f"{prefix}/ep{world}/{disp}"
        if over_budget(args):
            skip(case, "moetron", "time budget")
            continue
        layer = y = None
        try:  # build and a first forward (compiles); an error here is the same on every rank, or a timeout
            torch.manual_seed(1234 + rank)  # expert shards differ between ranks; the router is broadcast
            layer = moetron_layer(shape, disp, parallel, device, dtype, weights)
            with torch.no_grad():
                y = layer(x)
            err = None
        except NotImplementedError as e:
            err = f"NotImplementedError: {e}"
        except Exception as e:  # noqa: BLE001 - recorded, and every rank skips together
            err = repr(e)[:400]
            traceback.print_exc()
        if not all_ok(err is None):
            skip(case, "moetron", err or "failed on another rank", dispatcher=disp, ep=world)
            del layer, y
            free(device)
            continue
        if weights is None:
            weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
        if y_first is None:
            y_first = y
        diff = rank_max(rel_diff(y, y_first))
        step = fwd_bwd_step(layer, layer, x, dy)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = rank_max(bench_ms_ranks(step, cuda=cuda, **timer))
        mem = rank_max(peak_gb(device) or 0.0) if cuda else None
        parts = safe_breakdown(layer, x, dy, clock, args.breakdown_iters, collective=True)
        stats = layer.stats()
        ep_rows.append(row(case, "moetron", ms, dispatcher=disp, ep=world, peak_mem_gb=mem,
                           rel_diff_vs_first_dispatcher=diff, load_imbalance_rank0=stats["load_imbalance"],
                           breakdown_total_ms=parts.pop("total_ms", None), **parts))
        del layer, step, y
        free(device)
    if weights is None:
        return

    # EP=1: rank 0 alone, every expert, the same tokens and weights
    case = f"{prefix}/ep1/local"
    full = gather_full_weights(weights, world)
    ep1 = None
    if rank == 0:
        try:
            layer = moetron_layer(shape, "local", None, device, dtype, full)
            del full
            with torch.no_grad():
                diff = rel_diff(layer(x), y_first)
            step = fwd_bwd_step(layer, layer, x, dy)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = bench_ms_ranks(step, cuda=cuda, collective=False, **timer)
            mem = peak_gb(device)
            parts = safe_breakdown(layer, x, dy, clock, args.breakdown_iters, collective=False)
            ep1 = row(case, "moetron", ms, dispatcher="local", ep=1, peak_mem_gb=mem, rel_diff_vs_ep=diff,
                      load_imbalance_rank0=layer.stats()["load_imbalance"],
                      breakdown_total_ms=parts.pop("total_ms", None), **parts)
            del layer, step
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            skip(case, "moetron", repr(e)[:400], ep=1)
    else:
        del full
    free(device)
    dist.barrier()
    if ep1 is not None:
        for r in ep_rows:  # per-GPU throughput ratio, same tokens per GPU
            r["speedup_vs_ep1"] = ep1["ms"] / r["ms"]
        save()

    # Megatron-Core at the same EP
    if args.no_megatron:
        return
    case = f"{prefix}/ep{world}/alltoall"
    if over_budget(args):
        skip(case, "megatron", "time budget", ep=world)
        return
    errors, module, run, y_meg = [], None, None, None
    # the torch.compile'd SwiGLU (Megatron's default bias_activation_fusion) is the most fragile piece: retry eager
    for fused_act in ((True, False) if cuda else (False,)):
        try:  # build and a first forward; not installed or failing: recorded, the run goes on
            module, run = megatron_layer(shape, world, device, dtype, weights, fused_act)
            with torch.no_grad():
                y_meg = run(x)
            err = None
        except Exception as e:  # noqa: BLE001
            err = repr(e)[:400]
            if not isinstance(e, ImportError):
                traceback.print_exc()
        if all_ok(err is None):
            break
        errors.append(err or "failed on another rank")
        module = run = y_meg = None
        free(device)
        if err is not None and ("ModuleNotFoundError" in err or "ImportError" in err):
            break
    if module is None:
        skip(case, "megatron", "; ".join(errors), ep=world)
        return
    diff = rank_max(rel_diff(y_meg, y_first))
    del y_meg
    step = fwd_bwd_step(module, run, x, dy)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = rank_max(bench_ms_ranks(step, cuda=cuda, **timer))
    mem = rank_max(peak_gb(device) or 0.0) if cuda else None
    r = row(case, "megatron", ms, dispatcher="alltoall", ep=world, peak_mem_gb=mem, rel_diff_vs_moetron=diff,
            experts_impl=type(module.experts).__name__, bias_activation_fusion=fused_act,
            **({"fused_act_error": errors[0]} if errors else {}))
    if ep1 is not None:
        r["speedup_vs_ep1"] = ep1["ms"] / ms
    for other in ep_rows:  # measured in this run, same EP, same tokens and weights
        other["speedup_vs_megatron"] = ms / other["ms"]
    save()
    del module, run, step
    free(device)


def print_table(rows):
    if RANK != 0:
        return
    cols = {"ms": "ms", "tokens_per_s_per_gpu": "tok/s/GPU", "tflops": "TFLOP/s/GPU", "router_ms": "router",
            "dispatch_ms": "dispatch", "experts_ms": "experts", "combine_ms": "combine", "speedup_vs_ep1": "vs EP=1",
            "speedup_vs_megatron": "vs Megatron"}
    print("\nfwd+bwd per step; router/dispatch/experts/combine: ms from the breakdown pass (fwd + bwd, mean of ranks);"
          "\nvs EP=1 / vs Megatron: per-GPU throughput ratio (>1: this row is faster)")
    print(f"{'case':36s} {'provider':9s}" + "".join(f"{c:>12s}" for c in cols.values()))
    for r in rows:
        head = f"{r['case']:36s} {r['provider']:9s}"
        if "skipped" in r:
            print(head + f"  skipped: {r['skipped'][:80]}")
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>12s}" if v is None else f"{v:12.0f}" if c == "tokens_per_s_per_gpu" else f"{v:12.3f}")
        print(head + "".join(cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke run)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--dispatchers", nargs="+", default=list(DISPATCHERS), choices=DISPATCHERS)
    p.add_argument("--no-megatron", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep-ms", type=float, default=1000)
    p.add_argument("--min-reps", type=int, default=10)
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--breakdown-iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=480, help="start no new case after this many seconds")
    p.add_argument("--timeout-s", type=int, default=180,
                   help="collective timeout: a hang (or the EP=1 phase, when ranks > 0 wait) fails after this")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results; for --quick or --device cpu runs, <tmp>/moetron_bench")
    args = p.parse_args(argv)
    args.t0 = time.monotonic()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu for the smoke run)")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    T = 64 if args.quick else args.tokens
    if args.quick:
        args.warmup, args.rep_ms, args.min_reps, args.max_reps, args.breakdown_iters = 1, 1, 2, 2, 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    if args.out_dir is None and (args.quick or device == "cpu"):  # smoke runs stay out of the committed results
        import tempfile

        args.out_dir = os.path.join(tempfile.gettempdir(), "moetron_bench")
    rank, world = init(device, args.timeout_s)
    from moetron.parallel import ParallelGroups

    parallel = ParallelGroups.build(ep=world)
    rows: list = []
    filename = f"ep_{gpu_tag() if device == 'cuda' else 'cpu'}x{world}.json"
    extra = {"world_size": world, "ep": world, "tokens_per_rank": T, "dtype": str(dtype).replace("torch.", ""),
             "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
             "torch_symm_mem_disable_multicast": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    if device == "cuda":
        v = torch.cuda.nccl.version()
        extra["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    try:
        import megatron.core

        extra["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        pass

    def save():
        if rank == 0:
            dump_results(filename, rows, extra, args.out_dir)

    log(f"EP={world}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, T={T} per rank, "
        f"dispatchers {args.dispatchers}")
    for name in args.shapes:
        bench_shape(name, shapes[name], T, args, rank, world, parallel, device, dtype, rows, save)
    save()
    print_table(rows)
    if rank == 0:
        out = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        print(f"wrote {os.path.join(out, filename)} ({time.monotonic() - args.t0:.0f} s in all)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
