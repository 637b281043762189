"""Decode-sized MoE blocks, eager and under CUDA graphs: transformers' Qwen3MoeSparseMoeBlock with the experts
implementation "grouped_mm" and "moetron", inference (eval, no_grad), each run eagerly and compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (Inductor, replayed from a CUDA graph).

    python benchmarks/hf_decode.py                       # GPU: qwen3_30b and mixtral shapes, T = 1, 16, 128
    python benchmarks/hf_decode.py --device cpu --tiny   # CPU smoke run (backend "eager": no graphs, no timing meaning)

At these sizes an eager MoE block is host-bound: its kernels take less time than issuing them. A CUDA graph replays
the kernels without the Python. The "moetron" experts enter the compiled graph as one custom op
(``moetron::hf_experts_inference``), so ``fullgraph=True`` holds for both implementations. Writes
benchmarks/results/hf_decode_<gpu>.json (DESIGN.md format): one row per (case, provider, variant) with
``mode`` "infer", ``variant`` "eager" or "compiled", ``ms`` the median of ``--rounds`` timings taken in turns, and
``rel_diff`` the relative difference of the output to the eager "grouped_mm" block's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moetron.integrations import hf as moetron_hf  # noqa: E402  (importing it registers "moetron")
from benchmarks._common import bench_ms, write_results  # noqa: E402
from benchmarks.layer import SHAPES, TINY, build_hf, master_weights  # noqa: E402

PROVIDERS = {"hf_grouped_mm": "grouped_mm", "moetron": moetron_hf.IMPLEMENTATION_NAME}


def _compiled(run, device):
    if device == "cuda":
        return torch.compile(run, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(run, backend="eager", fullgraph=True, dynamic=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke)")
    parser.add_argument("--shapes", nargs="+", default=["qwen3_30b", "mixtral"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = TINY if args.tiny else {k: SHAPES[k] for k in args.shapes}
    tokens = [1, 5] if args.tiny else args.tokens
    # one compiled entry per (shape, T, provider): more than Dynamo's default number of recompiles of one function
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows = []
    for shape_name, (H, F, E, K) in shapes.items():
        W = master_weights(H, F, E)
        blocks = {p: build_hf(W, H, F, E, K, device, dtype, impl) for p, impl in PROVIDERS.items()}
        for T in tokens:
            case = f"{shape_name}_T{T}"
            x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T)).to(device, dtype)
            fns, outs = {}, {}
            for provider, (module, run) in blocks.items():
                module.eval()
                compiled = _compiled(run, device)
                for variant, fn in (("eager", run), ("compiled", compiled)):
                    with torch.no_grad():
                        for _ in range(3):  # compile, record the CUDA graph, replay
                            out = fn(x)
                        outs[provider, variant] = out.float().clone()
                    fns[provider, variant] = fn
            ref = outs["hf_grouped_mm", "eager"]
            times = {key: [] for key in fns}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    with torch.no_grad():
                        if device == "cuda":
                            times[key].append(bench_ms(lambda fn=fn: fn(x), rep_ms=args.rep_ms))
                        else:
                            times[key].append(float("nan"))
            for (provider, variant), ms in times.items():
                err = ((outs[provider, variant] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                row = {"case": case, "provider": provider, "mode": "infer", "variant": variant, "T": T,
                       "ms_rounds": ms, "ms": statistics.median(ms), "rel_diff": err}
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "ms_rounds"},
                      flush=True)
        del blocks
        if device == "cuda":
            torch.cuda.empty_cache()
    path = write_results("hf_decode", rows)
    print_table(rows)
    print(f"wrote {path}")


def print_table(rows):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    keys = [(p, v) for p in PROVIDERS for v in ("eager", "compiled")]
    print("\ninfer: ms")
    print(f"{'case':20s}" + "".join(f"{p + ' ' + v:>26s}" for p, v in keys))
    for case in cases:
        cells = {(r["provider"], r["variant"]): r["ms"] for r in rows if r["case"] == case}
        print(f"{case:20s}" + "".join(f"{cells.get(k, float('nan')):26.4f}" for k in keys))


if __name__ == "__main__":
    main()
