"""Inference A/B of the two fusions of the first expert GEMM, every variant in one run on the same layer and data:

    plain      MOETRON_FOLD_PERMUTE=0 and gmm.GATED_EPILOGUE off: permute, gmm, gated_act, gmm, unpermute
    fold       the first GEMM gathers its token rows (moetron/ops/routed_experts.py), activation separate
    fold_gate  the default: also the gated activation in that GEMM's epilogue (gmm.gmm_gated)

    python benchmarks/infer_fusions.py        # GPU; writes benchmarks/results/infer_fusions_<gpu>.json

MoELayer in eval mode under no_grad, bf16; variants take turns for 3 rounds, the median is kept. Mixtral's experts
are above the fold's size limit, so "fold" runs plain's kernels there (a control) and "fold_gate" adds only the
gated epilogue (large weights take it since session 18).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import bench_ms, write_results  # noqa: E402
from benchmarks.layer import SHAPES, build_moetron, master_weights  # noqa: E402

CASES = (("qwen3_30b", 8192), ("qwen3_30b", 32768), ("olmoe", 8192), ("mixtral", 8192))
VARIANTS = {"plain": ("0", False), "fold": ("1", False), "fold_gate": ("1", True)}


def main():
    gmm_module = importlib.import_module("moetron.ops.gmm")
    rows = []
    for shape, T in CASES:
        H, F, E, K = SHAPES[shape]
        layer, run = build_moetron(master_weights(H, F, E), H, F, E, K, "cuda", torch.bfloat16)
        layer.eval()
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T)).to("cuda", torch.bfloat16)
        times, outs = {}, {}
        for _ in range(3):
            for name, (fold, gate) in VARIANTS.items():
                os.environ["MOETRON_FOLD_PERMUTE"] = fold
                gmm_module.GATED_EPILOGUE = gate
                with torch.no_grad():
                    outs[name] = run(x)
                    torch.cuda.reset_peak_memory_stats()
                    times.setdefault(name, []).append(bench_ms(lambda: run(x), rep_ms=200))
                    times[name + "_mem"] = torch.cuda.max_memory_allocated() / 1e9
        for name in VARIANTS:
            ms = sorted(times[name])[1]
            row = dict(case=f"{shape}_T{T}", provider=f"moetron_{name}", mode="infer", ms=ms, ms_rounds=times[name],
                       peak_mem_gb=times[name + "_mem"], tflops=2 * T * K * H * F * 3 / ms / 1e9,
                       bitwise_equal_to_plain=bool(torch.equal(outs[name], outs["plain"])))
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "ms_rounds"},
                  flush=True)
        del layer, run
        torch.cuda.empty_cache()
    os.environ.pop("MOETRON_FOLD_PERMUTE")
    gmm_module.GATED_EPILOGUE = True
    print("wrote", write_results("infer_fusions", rows))


if __name__ == "__main__":
    main()
