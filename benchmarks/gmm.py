"""Grouped GEMM benchmark: moetron.gmm against torch._grouped_mm, the grouped GEMM blog's per-expert loop
(plain and on 4 CUDA streams), and one dense matmul of the same total size, all in one run on the same data.

    python benchmarks/gmm.py                      # the ten anchor cases, bf16, fwd and fwd_bwd
    python benchmarks/gmm.py --dtype float16 float32 --out-name gmm_dtypes
    python benchmarks/gmm.py --self-check         # CPU: correctness of every path on small shapes, no timing

Writes benchmarks/results/<out-name>_<gpu>.json in the DESIGN.md format and prints a table.
FLOPs: 2*M*K*N forward; forward+backward counts 3x that (dgrad and wgrad each cost one forward).

Modes: ``fwd``; ``fwd_bwd`` (x.grad and w.grad set to None before every timed call, so each backward writes
fresh gradients); ``fwd_bwd_accum`` (gradients kept, so autograd adds each new x.grad and w.grad into the old
ones: one more elementwise pass over x and w per call, as in a gradient-accumulation micro-step; this is how
shared/anchors/anchors_gmm.py timed torch._grouped_mm). Provider ``moetron_main_grad`` runs only in
``fwd_bwd_accum``: w carries an fp32 ``main_grad`` that the weight-gradient kernel adds into (Megatron's
gradient-accumulation fusion), so w.grad is never formed; it is not in the moetron/torch ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moetron  # noqa: E402
from benchmarks._common import bench_ms, write_results  # noqa: E402

# name, M (routed rows), K, N, G, sizes: the cases of shared/anchors (anchors_gmm.py), same order and seed
CASES = [
    ("blog_g8", 24576, 1024, 1024, 8, "random"),
    ("blog_g32", 24576, 1024, 1024, 32, "random"),
    ("blog_g128", 24576, 1024, 1024, 128, "random"),
    ("mixtral_up", 32768, 4096, 28672, 8, "random"),
    ("mixtral_down", 32768, 14336, 4096, 8, "random"),
    ("dsv3_ep8_up", 32768, 7168, 4096, 32, "random"),
    ("dsv3_ep8_down", 32768, 2048, 7168, 32, "random"),
    ("qwen3_30b_up", 65536, 2048, 1536, 128, "random"),
    ("qwen3_30b_down", 65536, 768, 2048, 128, "random"),
    ("qwen3_30b_up_uniform", 65536, 2048, 1536, 128, "uniform"),
]
PROVIDERS = ["moetron", "torch_grouped_mm", "loop", "loop_4streams", "dense", "moetron_main_grad"]
MODES = ["fwd", "fwd_bwd", "fwd_bwd_accum"]
ACCUM_ONLY = {"moetron_main_grad"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_sizes(total: int, groups: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random group sizes as in the grouped GEMM blog: a uniform draw normalised to the row count."""
    if kind == "uniform":
        sizes = torch.full((groups,), total // groups, dtype=torch.long)
    else:
        d = torch.rand(groups, generator=gen)
        sizes = (d / d.sum() * total).long()
    sizes[-1] += total - sizes.sum()
    return sizes


def loop_gmm(x, w, sizes_list, streams=None):
    """The blog's sequential GEMM: one torch.matmul per group into a zeroed output (optionally round-robin
    over CUDA streams, the blog's multi-stream variant)."""
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=x.dtype, device=x.device)
    main = torch.cuda.current_stream() if streams else None
    if streams:
        for s in streams:
            s.wait_stream(main)
    start, pieces = 0, []
    for g, count in enumerate(sizes_list):
        if streams:
            with torch.cuda.stream(streams[g % len(streams)]):
                pieces.append((start, count, x[start:start + count] @ w[g]))
        else:
            pieces.append((start, count, x[start:start + count] @ w[g]))
        start += count
    if streams:
        for s in streams:
            main.wait_stream(s)
    for begin, count, piece in pieces:
        out[begin:begin + count] = piece
    return out


def _providers(x, w, sizes, offsets, streams):
    sizes_list = sizes.tolist()
    w0 = w[0]
    return {
        "moetron": lambda x, w: moetron.gmm(x, w, offsets=offsets),
        "moetron_main_grad": lambda x, w: moetron.gmm(x, w, offsets=offsets),  # w.main_grad set by the caller
        "torch_grouped_mm": lambda x, w: torch._grouped_mm(x, w, offs=offsets),
        "loop": lambda x, w: loop_gmm(x, w, sizes_list),
        "loop_4streams": lambda x, w: loop_gmm(x, w, sizes_list, streams),
        "dense": lambda x, w: x @ (w0 if not w.requires_grad else w[0]),
    }


def _time_accumulating(fn, x, w, dy, provider) -> float:
    """fwd+bwd into gradients that already exist (bench_ms's warm-up call creates them; nothing clears them)."""
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    if provider == "moetron_main_grad":
        wg.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    ms = bench_ms(lambda: fn(xg, wg).backward(dy))
    if provider == "moetron_main_grad" and wg.grad is not None:
        raise RuntimeError("moetron_main_grad: w.grad was formed; the gradient should have gone to w.main_grad")
    return ms


def run(dtype_names, case_names, modes, providers, out_name, rounds=3):
    dev = "cuda"
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: every provider under the same TF32 setting
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, M, K, N, G, kind in CASES:
        sizes = make_sizes(M, G, kind, gen)
        if case_names and name not in case_names:
            continue
        offsets = torch.cumsum(sizes, 0).to(torch.int32).to(dev)
        # one set of values, rounded to each dtype: the dtypes of a case differ only in their storage
        base = (torch.randn(M, K, device=dev), torch.randn(G, K, N, device=dev) / math.sqrt(K),
                torch.randn(M, N, device=dev))
        data = {d: tuple(t.to(DTYPES[d]) for t in base) for d in dtype_names}
        del base
        fns = {d: _providers(*data[d][:2], sizes, offsets, streams) for d in dtype_names}
        flops = 2 * M * K * N
        for mode in modes:
            rows_here = {}
            for dtype_name in dtype_names:
                x, w, _ = data[dtype_name]
                ref = None
                for provider in providers:
                    if provider in ACCUM_ONLY and mode != "fwd_bwd_accum":
                        continue
                    row = {"case": name, "provider": provider, "mode": mode, "dtype": dtype_name,
                           "M": M, "K": K, "N": N, "G": G, "ms_rounds": []}
                    rows_here[dtype_name, provider] = row
                    if mode == "fwd":
                        try:
                            out = fns[dtype_name][provider](x, w)
                            if provider == "loop":
                                ref = out.float()
                            if provider != "dense" and ref is not None:
                                row["rel_err_vs_loop"] = ((out.float() - ref).norm() / ref.norm()).item()
                        except Exception as e:  # a provider that cannot run a case is recorded, not fatal
                            row["error"] = repr(e)[:300]
            # the providers (and the dtypes of a case) take turns, `rounds` times: this GPU's clocks drift by
            # ~10% within a minute and sink under its power cap on long GEMMs (benchmarks/NOTES.md), so one
            # back-to-back pair of timings can mislead
            for _ in range(rounds):
                for (dtype_name, provider), row in rows_here.items():
                    if "error" in row:
                        continue
                    x, w, dy = data[dtype_name]
                    fn = fns[dtype_name][provider]
                    try:
                        if mode == "fwd":
                            row["ms_rounds"].append(bench_ms(lambda x=x, w=w: fn(x, w)))
                        elif mode == "fwd_bwd_accum":
                            row["ms_rounds"].append(_time_accumulating(fn, x, w, dy, provider))
                        else:
                            xg = x.clone().requires_grad_(True)
                            wg = w.clone().requires_grad_(True)
                            row["ms_rounds"].append(bench_ms(lambda dy=dy: fn(xg, wg).backward(dy),
                                                             grad_to_none=[xg, wg]))
                            del xg, wg
                    except Exception as e:
                        row["error"] = repr(e)[:300]
            for row in rows_here.values():
                if row["ms_rounds"] and "error" not in row:
                    row["ms"] = statistics.median(row["ms_rounds"])
                    row["tflops"] = (flops if mode == "fwd" else 3 * flops) / row["ms"] / 1e9
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                       if k != "ms_rounds"}, flush=True)
        del data, fns
        torch.cuda.empty_cache()
    path = write_results(out_name, rows)
    print_table(rows)
    print(f"wrote {path}")
    return rows


def print_table(rows):
    keyed = {(r["dtype"], r["case"], r["provider"], r["mode"]): r for r in rows}
    cases = list(dict.fromkeys((r["dtype"], r["case"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        print(f"\nTFLOP/s, {mode}")
        print(f"{'dtype':9s} {'case':22s}" + "".join(f"{p:>17s}" for p in providers) + f"{'moetron/torch':>15s}")
        ratios = []
        for dtype, case in cases:
            line = f"{dtype:9s} {case:22s}"
            for p in providers:
                r = keyed.get((dtype, case, p, mode), {})
                line += f"{r.get('tflops', float('nan')):17.1f}"
            m, t = keyed.get((dtype, case, "moetron", mode), {}), keyed.get((dtype, case, "torch_grouped_mm", mode), {})
            if "ms" in m and "ms" in t:
                ratios.append(t["ms"] / m["ms"])
                line += f"{ratios[-1]:15.3f}"
            print(line)
        if ratios:
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            print(f"moetron / torch._grouped_mm: geomean {geo:.3f}, min {min(ratios):.3f}")


def self_check():
    """CPU correctness check of every gmm path (the torch backend, and Triton's interpreter if enabled) on
    small shapes against a float64 loop. Prints a table and exits non-zero on a mismatch."""
    torch.manual_seed(0)
    worst = 0.0
    print(f"{'dtype':10s} {'case':22s} {'max |err|':>10s} {'torch same-dtype':>17s}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, sizes, K, N in (("uneven_with_empties", [0, 17, 3, 0, 40, 1], 48, 40),
                                  ("single_group", [64], 32, 24), ("tail_rows", [10, 5], 20, 30)):
            M = sum(sizes) + (7 if name == "tail_rows" else 0)
            x = torch.randn(M, K, dtype=dtype)
            w = (torch.randn(len(sizes), K, N) / math.sqrt(K)).to(dtype)
            got = moetron.gmm(x, w, torch.tensor(sizes))
            ref = torch.zeros(M, N, dtype=torch.float64)
            base = torch.zeros(M, N, dtype=dtype)
            s = 0
            for g, c in enumerate(sizes):
                ref[s:s + c] = x[s:s + c].double() @ w[g].double()
                base[s:s + c] = x[s:s + c] @ w[g]
                s += c
            err = (got.double() - ref).abs().max().item()
            base_err = (base.double() - ref).abs().max().item()
            print(f"{str(dtype):10s} {name:22s} {err:10.2e} {base_err:17.2e}")
            if not err <= 2 * base_err + 1e-5 * max(1.0, ref.abs().max().item()):
                print("MISMATCH")
                return 1
            worst = max(worst, err)
    print(f"self-check passed (worst max error {worst:.2e}); run on a GPU for timings")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-check", action="store_true", help="CPU correctness check, no timing")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=list(DTYPES))
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=MODES)
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--out-name", default="gmm", help="results file stem (benchmarks/results/<stem>_<gpu>.json)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timings per provider; the median is kept")
    args = parser.parse_args(argv)
    if args.self_check:
        return self_check()
    if not torch.cuda.is_available():
        parser.error("timing needs a CUDA GPU; on a CPU machine use --self-check")
    run(args.dtype, args.cases, args.modes, args.providers, args.out_name, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
