"""MoE layer benchmark: moetron.MoELayer against Hugging Face transformers' Qwen3MoeSparseMoeBlock
(experts_implementation "grouped_mm" and "eager") and Megatron-Core's MoELayer (SequentialMLP experts, alltoall
dispatcher, softmax top-k with aux loss, fp32 router), in one run, with the same weights and inputs.

    python benchmarks/layer.py                           # GPU: all shapes, T = 8192 and 32768
    python benchmarks/layer.py --device cpu --tiny       # CPU smoke run of every provider (no timing meaning)
    python benchmarks/layer.py --inference               # eval-mode forward under no_grad (a prefill), mode "infer"
    python benchmarks/layer.py --tokens 16 256 2048 --providers moetron moetron_graphed hf_grouped_mm \
        hf_grouped_mm_graphed --out-name layer_small_batch   # small batches, also captured in CUDA graphs
    python benchmarks/layer.py --shapes qwen3_30b --tokens 16 256 2048 --providers moetron moetron_compiled \
        hf_grouped_mm hf_grouped_mm_compiled --out-name layer_compiled   # torch.compile, mode "reduce-overhead"
    python benchmarks/layer.py --accumulate-grads   # gradients summed over calls (micro-batches): layer_accum
    python benchmarks/layer.py --shapes qwen3_30b --tokens 256 2048 8192 --providers moetron moetron_calling_thread \
        hf_grouped_mm hf_grouped_mm_calling_thread --out-name layer_calling_thread   # backward on the calling thread

bf16, training mode. FLOPs = 2*T*K*H*F*3 forward (gate, up, down), 3x that for forward+backward.
Writes benchmarks/results/layer_<gpu>.json (DESIGN.md format) with ms the median of --rounds timings taken with
the providers in turns, and peak_mem_gb per row: the peak allocated in one call, counting that provider's own
module, gradients and activations and the shared inputs (as if it were alone on the device). On the GPU each row
also has sm_clock_mhz and power_w, the means over its timed calls (nvidia-smi every 50 ms; absent without it; the
power is the driver's one-second average): at the 700 W cap the clock drops, so they tell a step slowed by its
energy from one at full clock.

Each timed fwd_bwd call starts with no gradients (set to None), as a training step after zero_grad. With
--accumulate-grads every call adds into the gradients the calls before it left (x's and the parameters'), as
gradient accumulation over micro-batches does, and as ../shared/anchors/anchors_layer.py timed its fwd+bwd
(its transformers figures include autograd summing the expert weight gradients); peak memory is then that of a
call that finds the gradients already there.

The "*_graphed" providers (training mode, CUDA only, not in the default set) are the same modules captured with
torch.cuda.make_graphed_callables: forward and backward replay as two CUDA graphs, without the Python that issues
their kernels, which is what small batches wait on. Their peak memory includes the graphs' private pools.
The "*_compiled" providers (opt-in, CUDA only, training or --inference) are the same modules under
torch.compile(mode="reduce-overhead", dynamic=False): Inductor plus CUDA-graph trees. moetron's layer compiles with
fullgraph=True (its ops are custom ops in the graph); transformers' block compiles with whatever breaks it has.
The "*_calling_thread" providers (opt-in) run each backward on the calling thread
(torch.autograd.set_multithreading_enabled(False)) instead of autograd's CUDA device thread: where a step is
host-bound, this shows how much of its host time is Python running on that second thread.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import PowerSampler, bench_ms, megatron_without_te, write_results  # noqa: E402

SHAPES = {  # name: hidden H, expert ffn F, experts E, top-k K
    "qwen3_30b": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
}
TOKENS = (8192, 32768)
TINY = {"tiny": (64, 32, 8, 2)}
PROVIDERS = ("moetron", "hf_grouped_mm", "hf_eager", "megatron")
GRAPHED = ("moetron_graphed", "hf_grouped_mm_graphed")  # opt-in (--providers)
COMPILED = ("moetron_compiled", "hf_grouped_mm_compiled")  # opt-in (--providers)
CALLING_THREAD = ("moetron_calling_thread", "hf_grouped_mm_calling_thread")  # opt-in (--providers)


def master_weights(H, F, E, seed=0):
    """One set of weights (CPU, fp32) every provider copies: router [E, H], gate_up [E, 2F, H], down [E, H, F]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(E, H, generator=g) * 0.02,
        "gate_up": torch.randn(E, 2 * F, H, generator=g) * 0.02,
        "down": torch.randn(E, H, F, generator=g) * 0.02,
    }


def build_moetron(W, H, F, E, K, device, dtype):
    from moetron.layer import MoEConfig, MoELayer

    layer = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=K), device=device,
                     dtype=dtype)
    with torch.no_grad():
        layer.router.weight.copy_(W["router"])
        layer.experts.gate_up_proj.copy_(W["gate_up"])
        layer.experts.down_proj.copy_(W["down"])
    return layer.train(), lambda x: layer(x)


def build_hf(W, H, F, E, K, device, dtype, impl):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True)
    cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(cfg).to(device, dtype)
    with torch.no_grad():
        block.gate.weight.copy_(W["router"])
        block.experts.gate_up_proj.copy_(W["gate_up"])
        block.experts.down_proj.copy_(W["down"])

    def run(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out

    return block.train(), run


_MEGATRON_READY = False


def build_megatron(W, H, F, E, K, device, dtype):
    """Megatron-Core's MoELayer from its own local spec (no Transformer Engine): SequentialMLP experts, alltoall
    dispatcher, softmax top-k after selection, aux loss 1e-2, fp32 router. World of one process."""
    global _MEGATRON_READY
    import torch.distributed as dist
    import torch.nn.functional as Fn
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    megatron_without_te()
    if not _MEGATRON_READY:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1,
                                                 create_gloo_process_groups=False)
        if device == "cuda":
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
        _MEGATRON_READY = True
    cfg = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=max(1, H // 128), ffn_hidden_size=F,
        moe_ffn_hidden_size=F, num_moe_experts=E, moe_router_topk=K, moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True, activation_func=Fn.silu,
        add_bias_linear=False, bias_activation_fusion=True, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        pipeline_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
        use_cpu_initialization=device != "cuda",
    )
    layer = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)(config=cfg, layer_number=1)
    layer.set_layer_number(1)
    layer = layer.to(device)
    with torch.no_grad():
        layer.router.weight.copy_(W["router"])
        for e, mlp in enumerate(layer.experts.local_experts):
            mlp.linear_fc1.weight.copy_(W["gate_up"][e])  # [gate; up], as Megatron's GLU chunks it
            mlp.linear_fc2.weight.copy_(W["down"][e])

    def run(x):  # Megatron wants [S, B, H]
        out, _ = layer(x.transpose(0, 1))
        return out.transpose(0, 1)

    return layer.train(), run


def graphed(build, sample):
    """``build``'s module captured by torch.cuda.make_graphed_callables for inputs shaped like ``sample`` (training
    mode, CUDA only). Returns (module, run) like the builders."""
    if sample.device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    module, run = build()
    graph = torch.cuda.make_graphed_callables(module, (sample.detach().clone().requires_grad_(True),))

    def run_graphed(x):
        out = graph(x)
        return out[0] if isinstance(out, tuple) else out

    return module, run_graphed


def on_calling_thread(build):
    """``build``'s module, with each training call's backward run on the calling thread
    (``torch.autograd.set_multithreading_enabled(False)``) instead of autograd's CUDA device thread."""
    module, run = build()

    def run_here(x):
        return run(x)

    run_here.backward_on_calling_thread = True
    return module, run_here


def compiled(build, sample, fullgraph):
    """``build``'s module under torch.compile(mode="reduce-overhead") (CUDA only). Returns (module, run) like the
    builders."""
    if sample.device.type != "cuda":
        raise RuntimeError("mode='reduce-overhead' needs a CUDA device")
    # every case compiles the same builder lambda again (new module, new shapes): allow that many recompilations
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    module, run = build()
    compiled_run = torch.compile(run, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)

    def run_compiled(x):
        # each call is a step of its own: the harness also runs forwards without a backward, which CUDA-graph trees
        # cannot tell from a step that is still going on
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_run(x)

    return module, run_compiled


class Prepared:
    """One provider built and warmed up for one case: its timed functions and its peak memory per mode."""

    def __init__(self, build, x, dy, device, inference, accumulate=False):
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        self.module, run = build()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.xg = x.detach().clone().requires_grad_(True)
        self.accumulate = accumulate

        def fwd():
            return run(self.xg)

        calling_thread = getattr(run, "backward_on_calling_thread", False)

        def fwd_bwd():
            with torch.autograd.set_multithreading_enabled(not calling_thread):
                run(self.xg).backward(dy)

        @torch.no_grad()
        def infer():  # eval mode, no autograd: a prefill
            return run(x)

        if inference:
            self.module.eval()
            self.out = infer().detach().float()
            self.modes = {"infer": infer}
        else:
            self.out = fwd().detach().float()
            fwd_bwd()  # warm-up: compiles kernels
            self.modes = {"fwd": fwd, "fwd_bwd": fwd_bwd}
        # peak memory of one call per mode: this provider's weights, gradients and activations (allocated past
        # `base`, so not the other providers' modules), plus the shared x and dy, as if it ran alone
        self.peak_gb = {}
        if device == "cuda":
            for mode, fn in self.modes.items():
                self.clear_grads()
                if accumulate and mode == "fwd_bwd":
                    fn()  # the gradients this call adds into
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                inputs = x.numel() * x.element_size() + dy.numel() * dy.element_size()
                self.peak_gb[mode] = (torch.cuda.max_memory_allocated() - base + inputs) / 1e9

    def clear_grads(self):
        for t in self.params + [self.xg]:
            t.grad = None

    def time_ms(self, mode, device, rep_ms):
        fn = self.modes[mode]
        if device == "cuda":
            return bench_ms(fn, grad_to_none=None if self.accumulate else self.params + [self.xg], rep_ms=rep_ms)
        if not self.accumulate:
            self.clear_grads()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def time_case(case, builders, x, dy, flops, device, rep_ms, rounds, inference, rows, accumulate=False,
              power=None):
    """Build every provider, then time them in turns, ``rounds`` times (median kept): this H100 holds its clock
    only until its 700 W cap, so a provider timed first on a cool GPU would run at a higher clock than the next
    (benchmarks/NOTES.md, session 11). With a ``PowerSampler``, each row also gets the mean SM clock and board power
    over its timed windows. Returns each provider's output (fp32) for the cross-check."""
    prepared, rows_here = {}, {}
    for provider, build in builders.items():
        try:
            prepared[provider] = Prepared(build, x, dy, device, inference, accumulate)
        except Exception as e:  # a provider that cannot build or run is recorded, not fatal
            rows_here[provider, None] = {"case": case, "provider": provider, "mode": "infer" if inference else "fwd",
                                         "error": repr(e)[:300]}
            print(case, provider, "failed:", repr(e)[:300], flush=True)
            continue
        for mode in prepared[provider].modes:
            rows_here[provider, mode] = {"case": case, "provider": provider, "mode": mode, "ms_rounds": []}
    windows = {key: [] for key in rows_here}
    for _ in range(rounds):
        for (provider, mode), row in rows_here.items():
            if "error" in row:
                continue
            try:
                t0 = time.monotonic()
                row["ms_rounds"].append(prepared[provider].time_ms(mode, device, rep_ms))
                windows[provider, mode].append((t0, time.monotonic()))
            except Exception as e:
                row["error"] = repr(e)[:300]
    for (provider, mode), row in rows_here.items():
        if "error" not in row and row["ms_rounds"]:
            row["ms"] = statistics.median(row["ms_rounds"])
            if mode in prepared[provider].peak_gb:
                row["peak_mem_gb"] = prepared[provider].peak_gb[mode]
            row["tflops"] = (3 * flops if mode == "fwd_bwd" else flops) / row["ms"] / 1e9
            if power is not None:
                row.update(_mean_power(power, windows[provider, mode]))
        rows.append(row)
        if mode is not None:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "ms_rounds"},
                  flush=True)
    outs = {name: prep.out for name, prep in prepared.items()}
    del prepared
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return outs


def _mean_power(power, windows) -> dict:
    """Round-weighted means of a PowerSampler's clock and power over the timed windows that have samples."""
    means = [m for m in (power.mean(t0, t1) for t0, t1 in windows) if m]
    return {key: sum(m[key] for m in means) / len(means) for key in means[0]} if means else {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS),
                        choices=PROVIDERS + GRAPHED + COMPILED + CALLING_THREAD)
    parser.add_argument("--out-name", default=None, help="results file stem (default layer / layer_infer)")
    parser.add_argument("--eager-max-tokens", type=int, default=8192, help="skip hf_eager above this T")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timings per provider, taken in turns; median kept")
    parser.add_argument("--inference", action="store_true",
                        help="time the eval-mode forward under torch.no_grad() (mode 'infer') instead of training; "
                             "writes layer_infer_<gpu>.json")
    parser.add_argument("--accumulate-grads", action="store_true",
                        help="each fwd_bwd call adds into the gradients earlier calls left (micro-batch gradient "
                             "accumulation, as the anchors timed it); writes layer_accum_<gpu>.json")
    args = parser.parse_args(argv)
    if args.inference and args.accumulate_grads:
        parser.error("--accumulate-grads times training calls; it does not go with --inference")
    if args.inference and set(args.providers) & set(GRAPHED):
        parser.error("the *_graphed providers capture a training step (forward and backward); drop them with "
                     "--inference")
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = TINY if args.tiny else {k: SHAPES[k] for k in args.shapes}
    tokens = [64] if args.tiny else args.tokens
    rows = []
    power = PowerSampler() if device == "cuda" else None
    for shape_name, (H, F, E, K) in shapes.items():
        W = master_weights(H, F, E)
        for T in tokens:
            case = f"{shape_name}_T{T}"
            flops = 2 * T * K * H * F * 3
            g = torch.Generator().manual_seed(T)
            x = torch.randn(1, T, H, generator=g).to(device, dtype)
            dy = torch.randn(1, T, H, generator=g).to(device, dtype)
            builders = {
                "moetron": lambda: build_moetron(W, H, F, E, K, device, dtype),
                "hf_grouped_mm": lambda: build_hf(W, H, F, E, K, device, dtype, "grouped_mm"),
                "hf_eager": lambda: build_hf(W, H, F, E, K, device, dtype, "eager"),
                "megatron": lambda: build_megatron(W, H, F, E, K, device, dtype),
            }
            for name in GRAPHED:
                builders[name] = lambda build=builders[name.removesuffix("_graphed")]: graphed(build, x)
            for name in COMPILED:
                builders[name] = lambda build=builders[name.removesuffix("_compiled")], full=name.startswith(
                    "moetron"): compiled(build, x, full)
            for name in CALLING_THREAD:
                builders[name] = lambda build=builders[name.removesuffix("_calling_thread")]: on_calling_thread(build)
            builders = {p: builders[p] for p in args.providers
                        if not (p == "hf_eager" and T > args.eager_max_tokens)}
            outs = time_case(case, builders, x, dy, flops, device, args.rep_ms, args.rounds, args.inference, rows,
                             args.accumulate_grads, power)
            ref = outs.get("hf_grouped_mm")
            for provider, out in outs.items():
                if ref is not None and provider != "hf_grouped_mm":
                    err = ((out - ref).norm() / ref.norm()).item()
                    print(f"{case} {provider}: rel. difference to hf_grouped_mm output {err:.2e}", flush=True)
                    for r in rows:
                        if r["case"] == case and r["provider"] == provider:
                            r["rel_diff_vs_hf"] = err
    if power is not None:
        power.close()
    default_name = "layer_infer" if args.inference else "layer_accum" if args.accumulate_grads else "layer"
    path = write_results(args.out_name or default_name, rows)
    print_table(rows)
    print(f"wrote {path}")


def print_table(rows):
    keyed = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for mode in dict.fromkeys(r.get("mode", "fwd") for r in rows):
        print(f"\n{mode}: ms (TFLOP/s) [peak GB]")
        print(f"{'case':20s}" + "".join(f"{p:>28s}" for p in providers))
        for case in cases:
            line = f"{case:20s}"
            for p in providers:
                r = keyed.get((case, p, mode), {})
                cell = (f"{r['ms']:.2f} ({r['tflops']:.0f}) [{r.get('peak_mem_gb', 0):.1f}]" if "ms" in r
                        else "err" if "error" in r else "-")
                line += f"{cell:>28s}"
            print(line)


if __name__ == "__main__":
    main()
