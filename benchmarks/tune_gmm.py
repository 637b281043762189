"""Config sweep for the gmm kernels (GPU): times forward, dgrad (trans_w) and wgrad (gmm_k) under pinned
configs beside torch._grouped_mm, on the anchor cases. Used to pick the tables in moetron/ops/gmm.py; the
numbers that count are benchmarks/gmm.py's.

    python benchmarks/tune_gmm.py [--cases ...] [--json path]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moetron  # noqa: E402
from benchmarks._common import bench_ms  # noqa: E402
from benchmarks.gmm import CASES, make_sizes  # noqa: E402

gmm_module = importlib.import_module("moetron.ops.gmm")


def _fwd(bm, bn, bk, warps, stages, group_m=8, tma=True, ws=False, flatten=False, tma_store=False, swap_ab=False):
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages, GROUP_M=group_m, tma=tma,
                warp_specialize=ws, flatten=flatten, tma_store=tma_store, swap_ab=swap_ab)


def _wgrad(bk, bn, bm, warps, stages, tma=True, tma_store=False, group_k=8, persistent=False, flatten=False,
           per_sm=1, ws=False, prefetch_tail=False):
    return dict(BK=bk, BN=bn, BM=bm, num_warps=warps, num_stages=stages, tma=tma, tma_store=tma_store,
                GROUP_K=group_k, persistent=persistent, flatten=flatten, programs_per_sm=per_sm,
                warp_specialize=ws, prefetch_tail=prefetch_tail)


FWD_VARIANTS = {  # the first two are the defaults for N >= 256 ([G, K, N] and [G, N, K] weights)
    "128x256x64_w8_s3_fl_st": _fwd(128, 256, 64, 8, 3, flatten=True, tma_store=True),
    "128x256x64_w8_s4_fl": _fwd(128, 256, 64, 8, 4, flatten=True),
    "128x256x64_w8_s3_fl_st_g4": _fwd(128, 256, 64, 8, 3, group_m=4, flatten=True, tma_store=True),
    "128x256x64_w8_s3_fl_st_g16": _fwd(128, 256, 64, 8, 3, group_m=16, flatten=True, tma_store=True),
    "128x128x64_w8_s4_fl_st": _fwd(128, 128, 64, 8, 4, flatten=True, tma_store=True),
    "128x128x64_w4_s4_fl": _fwd(128, 128, 64, 4, 4, flatten=True),
    "64x256x64_w4_s4_fl_st": _fwd(64, 256, 64, 4, 4, flatten=True, tma_store=True),
    "256x128x64_w8_s3_fl_st": _fwd(256, 128, 64, 8, 3, flatten=True, tma_store=True),
}
WGRAD_VARIANTS = {  # the first is the default for small per-group outputs; large ones: "..._pers_fl_st" below
    "128x128x32_w4_s4_pers2_fl_pt": _wgrad(128, 128, 32, 4, 4, persistent=True, flatten=True, per_sm=2,
                                           prefetch_tail=True),
    "128x128x32_w4_s5_pers2_fl": _wgrad(128, 128, 32, 4, 5, persistent=True, flatten=True, per_sm=2),
    "128x256x64_w8_s3": _wgrad(128, 256, 64, 8, 3),
    "128x256x64_w8_s3_pers_fl": _wgrad(128, 256, 64, 8, 3, persistent=True, flatten=True),
    "128x256x64_w8_s3_pers_ws": _wgrad(128, 256, 64, 8, 3, persistent=True, ws=True),
    "128x128x64_w8_s4_pers_ws": _wgrad(128, 128, 64, 8, 4, persistent=True, ws=True),
    "128x128x32_w8_s5_pers_ws": _wgrad(128, 128, 32, 8, 5, persistent=True, ws=True),
    "128x128x32_w4_s5_pers2_ws": _wgrad(128, 128, 32, 4, 5, persistent=True, ws=True, per_sm=2),
    "128x256x64_w8_s3_pers_fl_st": _wgrad(128, 256, 64, 8, 3, persistent=True, flatten=True, tma_store=True),
}

FP32_FWD_VARIANTS = {  # fp32 on TF32; the [G, K, N] forward runs swapped (SWAP_AB) only in the *_swap variants
    "128x256x32_w8_s3_swap": _fwd(128, 256, 32, 8, 3, swap_ab=True),
    "128x256x32_w8_s3_g16_swap": _fwd(128, 256, 32, 8, 3, group_m=16, swap_ab=True),
    "128x128x32_w8_s4_swap": _fwd(128, 128, 32, 8, 4, swap_ab=True),
    "128x64x32_w4_s3": _fwd(128, 64, 32, 4, 3),
    "128x128x32_w8_s3": _fwd(128, 128, 32, 8, 3),
    "128x128x32_w8_s4_fl": _fwd(128, 128, 32, 8, 4, flatten=True),
    "128x256x32_w8_s3": _fwd(128, 256, 32, 8, 3),
    "128x256x32_w8_s3_fl": _fwd(128, 256, 32, 8, 3, flatten=True),
    "256x128x32_w8_s3_fl": _fwd(256, 128, 32, 8, 3, flatten=True),
    "128x128x64_w8_s2": _fwd(128, 128, 64, 8, 2),
    "128x128x32_w4_s4": _fwd(128, 128, 32, 4, 4),
}
FP32_WGRAD_VARIANTS = {
    "64x64x32_w4_s3": _wgrad(64, 64, 32, 4, 3),
    "128x128x32_w8_s3": _wgrad(128, 128, 32, 8, 3),
    "128x128x16_w4_s4": _wgrad(128, 128, 16, 4, 4),
}


def _part_fn(part, x, w, dy, offs):
    if part == "fwd":
        return lambda: moetron.gmm(x, w, offsets=offs)
    if part == "dgrad":
        return lambda: moetron.gmm(dy, w, offsets=offs, trans_w=True)
    return lambda: moetron.gmm_k(x, dy, offsets=offs)


def _compile(args, x, w, dy, offs, fwd_variants, wgrad_variants, shard, num_shards):
    for part in args.parts:
        variants = wgrad_variants if part == "wgrad" else fwd_variants
        for i, (vname, cfg) in enumerate(variants.items()):
            if i % num_shards != shard or (args.variants and vname not in args.variants):
                continue
            gmm_module._CONFIG_OVERRIDES.clear()
            gmm_module._CONFIG_OVERRIDES["wgrad" if part == "wgrad" else "fwd"] = cfg
            try:
                _part_fn(part, x, w, dy, offs)()
            except Exception as e:
                print(part, vname, "failed to compile or run:", repr(e)[:200], flush=True)
    gmm_module._CONFIG_OVERRIDES.clear()
    torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--parts", nargs="+", default=["fwd", "dgrad", "wgrad"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", nargs="*", default=None, help="subset of variant names")
    parser.add_argument("--compile-only", action="store_true",
                        help="one call per (case, part, variant), no timing: fills Triton's disk cache, so several "
                             "shards can compile in parallel before one timing run")
    parser.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th variant from the i-th")
    args = parser.parse_args()
    shard, num_shards = (int(v) for v in args.shard.split("/"))
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32: torch and moetron both on TF32
    fwd_variants = FP32_FWD_VARIANTS if dtype == torch.float32 else FWD_VARIANTS
    wgrad_variants = FP32_WGRAD_VARIANTS if dtype == torch.float32 else WGRAD_VARIANTS
    gen = torch.Generator().manual_seed(1)
    results = []
    for name, M, K, N, G, kind in CASES:
        sizes = make_sizes(M, G, kind, gen)
        if args.cases and name not in args.cases:
            continue
        if args.compile_only:  # fewer rows, same specialization (row counts stay multiples of 16)
            M = min(M, 8192)
            sizes = make_sizes(M, G, kind, torch.Generator().manual_seed(1))
        offs = torch.cumsum(sizes, 0).to(torch.int32).cuda()
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randn(G, K, N, device="cuda", dtype=dtype) / math.sqrt(K)
        dy = torch.randn(M, N, device="cuda", dtype=dtype)
        wt = w.transpose(1, 2)  # [G, N, K] view: torch's dgrad operand
        flops = 2 * M * K * N
        line = {"case": name}
        if args.compile_only:
            _compile(args, x, w, dy, offs, fwd_variants, wgrad_variants, shard, num_shards)
            continue
        line["torch_fwd"] = flops / bench_ms(lambda: torch._grouped_mm(x, w, offs=offs)) / 1e9
        line["torch_dgrad"] = flops / bench_ms(lambda: torch._grouped_mm(dy, wt, offs=offs)) / 1e9
        try:
            line["torch_wgrad"] = flops / bench_ms(lambda: torch._grouped_mm(x.t(), dy, offs=offs)) / 1e9
        except Exception as e:
            print("torch wgrad failed:", repr(e)[:200])
            line["torch_wgrad"] = float("nan")
        ref = torch._grouped_mm(x, w, offs=offs).float()
        for part in args.parts:
            variants = wgrad_variants if part == "wgrad" else fwd_variants
            for vname, cfg in variants.items():
                if args.variants and vname not in args.variants:
                    continue
                gmm_module._CONFIG_OVERRIDES.clear()
                gmm_module._CONFIG_OVERRIDES["wgrad" if part == "wgrad" else "fwd"] = cfg
                try:
                    fn = _part_fn(part, x, w, dy, offs)
                    if part == "fwd":
                        err = ((fn().float() - ref).norm() / ref.norm()).item()
                        assert err < 1e-2, f"wrong result, rel err {err}"
                    line[f"{part}:{vname}"] = flops / bench_ms(fn) / 1e9
                except Exception as e:
                    line[f"{part}:{vname}"] = float("nan")
                    print(name, part, vname, "failed:", repr(e)[:200], flush=True)
        gmm_module._CONFIG_OVERRIDES.clear()
        results.append(line)
        print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in line.items()}), flush=True)
        del x, w, dy, ref
        torch.cuda.empty_cache()
    if args.compile_only:
        return
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    for part in args.parts:
        keys = [k for k in results[0] if k.startswith(part + ":")]
        print(f"\n{part} TFLOP/s (torch_{part} first)")
        print(f"{'case':22s}{'torch':>8s}" + "".join(f"{k.split(':')[1][:16]:>17s}" for k in keys))
        for r in results:
            print(f"{r['case']:22s}{r['torch_' + part]:8.0f}" + "".join(f"{r[k]:17.0f}" for k in keys))


if __name__ == "__main__":
    main()
