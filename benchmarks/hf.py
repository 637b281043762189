"""Hugging Face transformers Qwen3-MoE training step with each experts implementation, in one run.

    python benchmarks/hf.py              # GPU: 4 layers at the qwen3_30b MoE shape, batch 2 x 4096 tokens, bf16
    python benchmarks/hf.py --quick      # CPU smoke run on tiny shapes (no timing meaning)
    python benchmarks/hf.py --accumulate-grads   # each step adds into the gradients the steps before it left

One ``Qwen3MoeForCausalLM`` (transformers' own model: attention, norms, router, aux-loss hooks and LM head unchanged)
is built once; ``model.set_experts_implementation(...)`` switches its experts between "grouped_mm" (transformers'
default, torch._grouped_mm), "eager" (the per-expert loop in the modeling file) and "moetron" (registered by
``import moetron.integrations.hf``), so every provider runs the same weights on the same batch. moetron runs in three
variants (``--providers`` names; in the results, provider "moetron" with a ``variant`` field):
  moetron               ``moetron.integrations.hf.fuse(model)``, the one line a user writes: the "moetron" experts,
                        the LM head's GEMM and cross-entropy without fp32 logits, every RMSNorm and the rotary
                        embedding as one kernel each way (variant "fuse");
  moetron_experts       only ``model.set_experts_implementation("moetron")`` (variant "experts");
  moetron_experts_loss  that plus ``fuse_lm_loss(model)`` (variant "experts+loss").
A step is the forward with labels (mean cross-entropy) and its backward, no optimizer. All but "eager"
are timed with ``triton.testing.do_bench`` (median, gradients reset between calls; with ``--accumulate-grads``
each step adds into the gradients the steps before it left, as micro-batch gradient accumulation does, and the
file is hf_accum_<gpu>.json), in turns over ``--rounds`` rounds
(median kept: the H100 drops its clock at its power cap, so a provider timed alone first would get a cooler GPU);
"eager" is slow on 128 experts, so it runs a few steps timed with CUDA events once (``--eager-iters``; 0 skips it).
Each provider's loss is recorded against grouped_mm's.

Model defaults follow Qwen3-30B-A3B apart from the depth: hidden 2048, 32 query / 4 key-value heads of 128,
128 experts, top-8, moe_intermediate_size 768, vocab 151936. The attention and the LM head are the same for every
provider, so they dilute the experts' speed-up in the ratio (``--vocab`` shrinks the head).

Writes benchmarks/results/hf_<gpu>.json (DESIGN.md format): rows {case, provider, variant (moetron's rows), mode:
"train_step", ms, ms_rounds, peak_mem_gb, tflops (experts FLOPs only: 3 * 2 * T*K*H*F*3 per layer), loss,
loss_rel_diff_vs_grouped_mm}.
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
from benchmarks._common import bench_ms, write_results  # noqa: E402

PROVIDERS = ("grouped_mm", "moetron", "moetron_experts", "moetron_experts_loss", "eager")
# --providers name -> (provider, variant) in the results (DESIGN.md: provider is moetron, grouped_mm or eager)
RESULT_NAMES = {"moetron": ("moetron", "fuse"), "moetron_experts": ("moetron", "experts"),
                "moetron_experts_loss": ("moetron", "experts+loss")}
FULL = dict(layers=4, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_ffn=768,
            vocab=151936, batch=2, seq=4096)
QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, moe_ffn=32, vocab=128,
             batch=2, seq=32)


def build_model(s: dict, device, dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moetron.integrations.hf import register

    register()  # "moetron" as an experts implementation (importing the module already did; explicit here)

    cfg = Qwen3MoeConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                         num_experts=s["experts"], num_experts_per_tok=s["top_k"], moe_intermediate_size=s["moe_ffn"],
                         intermediate_size=6144, norm_topk_prob=True, max_position_embeddings=max(s["seq"], 128),
                         decoder_sparse_step=1, mlp_only_layers=[], attention_dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # transformers' init: normal(0, 0.02) for routers and experts too
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    return model.train()


def experts_flops(s: dict) -> float:
    T = s["batch"] * s["seq"]
    return 3 * s["layers"] * 2 * T * s["top_k"] * s["hidden"] * s["moe_ffn"] * 3  # fwd + 2x bwd, three matrices


def use_provider(model, provider: str) -> None:
    """Switch the model to ``provider``: its experts implementation, and moetron's fusions where the variant has
    them."""
    from moetron.integrations.hf import fuse, fuse_lm_loss, unfuse

    unfuse(model)
    model.set_experts_implementation("moetron" if provider.startswith("moetron") else provider)
    if provider == "moetron_experts_loss":
        fuse_lm_loss(model)
    elif provider == "moetron":
        fuse(model)  # the experts are "moetron" already; this adds the loss, norms and rotary


def time_provider(model, provider, ids, labels, device, args) -> dict:
    use_provider(model, provider)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss

    model.zero_grad(set_to_none=True)
    loss = step().detach().float().item()  # warm-up: compiles kernels, allocates
    model.zero_grad(set_to_none=True)
    row = {"provider": provider, "mode": "train_step", "loss": loss}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if provider == "eager":
            times = []
            for _ in range(args.eager_iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
                model.zero_grad(set_to_none=True)
            row["ms"] = sorted(times)[len(times) // 2]
            row["iters"] = args.eager_iters
        else:
            if args.accumulate_grads:
                step()  # the gradients every timed step adds into
            row["ms"] = bench_ms(step, grad_to_none=None if args.accumulate_grads else params,
                                 warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        t = time.perf_counter()
        step()
        row["ms"] = (time.perf_counter() - t) * 1e3
    model.zero_grad(set_to_none=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--eager-iters", type=int, default=3, help="timed eager steps (slow on 128 experts); 0 skips")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (LM head width)")
    parser.add_argument("--seq", type=int, default=None, help="override the sequence length")
    parser.add_argument("--rounds", type=int, default=3, help="timings per provider, taken in turns; median kept")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=500)
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--accumulate-grads", action="store_true",
                        help="steps add into the gradients earlier steps left (micro-batch gradient accumulation); "
                             "writes hf_accum_<gpu>.json")
    args = parser.parse_args(argv)
    device = args.device
    s = dict(QUICK if args.quick else FULL)
    for key in ("vocab", "seq"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    case = ("quick" if args.quick else "qwen3_30b") + f"_L{s['layers']}_B{s['batch']}_S{s['seq']}"
    model = build_model(s, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    labels = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    flops = experts_flops(s)
    by_provider: dict[str, dict] = {}
    for round_index in range(args.rounds if device == "cuda" else 1):
        for provider in args.providers:
            if provider == "eager" and (args.eager_iters <= 0 or round_index > 0):
                continue
            if "error" in by_provider.get(provider, {}):
                continue
            try:
                row = time_provider(model, provider, ids, labels, device, args)
            except Exception as e:  # a provider that cannot run is recorded, not fatal
                row = {"provider": provider, "mode": "train_step", "error": repr(e)[:300]}
            first = by_provider.setdefault(provider, {"case": case, **row, "ms_rounds": []})
            if "ms" in row:
                first["ms_rounds"].append(row["ms"])
                if "peak_mem_gb" in row:
                    first["peak_mem_gb"] = max(first["peak_mem_gb"], row["peak_mem_gb"])
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    use_provider(model, "grouped_mm")
    rows = list(by_provider.values())
    for r in rows:
        if r["provider"] in RESULT_NAMES:
            r["provider"], r["variant"] = RESULT_NAMES[r["provider"]]
    for r in rows:
        if r["ms_rounds"]:
            r["ms"] = statistics.median(r["ms_rounds"])
            r["tflops"] = flops / r["ms"] / 1e9
    ref = next((r for r in rows if r["provider"] == "grouped_mm" and "loss" in r), None)
    for r in rows:
        if ref is not None and "loss" in r and r is not ref:
            r["loss_rel_diff_vs_grouped_mm"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
    path = write_results("hf_accum" if args.accumulate_grads else "hf", rows,
                         extra_meta={"shape": s, "dtype": str(dtype).replace("torch.", "")}, out_dir=args.out_dir)
    print(f"\n{case} ({dtype}): ms per forward+backward step")
    by = {r["provider"]: r for r in rows if r.get("variant") in (None, "fuse")}
    for r in rows:
        speed = ""
        if "ms" in r and "ms" in by.get("grouped_mm", {}):
            speed = f"  {by['grouped_mm']['ms'] / r['ms']:.2f}x grouped_mm"
        cell = f"{r['ms']:.2f}" if "ms" in r else "error: " + r.get("error", "")
        name = r["provider"] + (f" ({r['variant']})" if "variant" in r else "")
        print(f"  {name:24s} {cell}{speed}")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
