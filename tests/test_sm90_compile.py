"""The Triton kernels compile for Hopper (sm_90), checked on a machine without a GPU.

Triton's CPU interpreter runs programs that the compiler rejects: a loop variable reused as int64 and then int32
passed every interpreter test and failed only on the H100. Here a workload runs under the interpreter with
MOETRON_RECORD_KERNELS set (every kernel specialization it launches is written down: argument types, constexprs,
warps, stages), and a second process without the interpreter compiles each one with ``triton.compile`` for
GPUTarget("cuda", 90, 32). The workload covers gmm (pointer and TMA kernels, every epilogue, the decode tiles,
trans_w, bias, counts and offsets, fp32/bf16/fp16, rows gathered by index), gmm_k (overwrite, accumulate, TMA
store, the decode tiles), the gated activations, rotary, the fused router and the router's GEMMs (interpreter
and GPU tiles), rms_norm (interpreter and GPU tile shapes, mixed x/weight/output dtypes), permute and unpermute (dropless, padded,
capacity) with their backward, and the fused dispatch/combine kernels (the CPU tests of
tests/test_fused_dispatch.py, symmetric-memory emulation included).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOAD = r"""
import importlib, torch, moetron
from moetron.ops import gated_act, permute, unpermute
gm = importlib.import_module("moetron.ops.gmm")
rn = importlib.import_module("moetron.ops.rmsnorm")
pm = importlib.import_module("moetron.ops.permute")
re = importlib.import_module("moetron.ops.routed_experts")
gg = importlib.import_module("moetron.ops.gated_gmm")
from moetron.ops.rotary import apply_rotary
torch.manual_seed(0)
sizes = torch.tensor([40, 0, 16, 33, 1])
M = int(sizes.sum()) + 5
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for tma, store in ((False, False), (True, False), (True, True)):  # pointer kernels, TMA, TMA epilogues
        gm._CONFIG_OVERRIDES.clear()
        gm._CONFIG_OVERRIDES["fwd"] = dict(gm._INTERPRETER_CONFIG, tma=tma, tma_store=store, flatten=store)
        gm._CONFIG_OVERRIDES["wgrad"] = dict(BK=16, BN=16, BM=16, num_warps=1, num_stages=1, tma=tma,
                                             tma_store=store)
        for trans_w in (False, True):
            x = torch.randn(M, 32, dtype=dtype, requires_grad=True)
            w = torch.randn(5, *((48, 32) if trans_w else (32, 48)), dtype=dtype, requires_grad=True)
            b = torch.randn(5, 48, dtype=dtype, requires_grad=True)
            kw = dict(offsets=sizes.cumsum(0)) if trans_w else dict(group_sizes=sizes)
            moetron.gmm(x, w, trans_w=trans_w, bias=b, **kw).sum().backward()
        if tma and dtype == torch.float32:  # fp32 on TF32, [G, K, N] weight: the swapped form at the GPU's tiles
            torch.backends.cuda.matmul.allow_tf32 = True
            gm._CONFIG_OVERRIDES["fwd"] = gm._gmm_config(torch.float32, 48, 32, on_cpu=False)
            assert gm._CONFIG_OVERRIDES["fwd"]["swap_ab"]
            moetron.gmm(torch.randn(M, 32), torch.randn(5, 32, 48), sizes, bias=torch.randn(5, 48))
            torch.backends.cuda.matmul.allow_tf32 = False
        main = torch.zeros(5, 32, 48)
        moetron.gmm_k(torch.randn(M, 32, dtype=dtype), torch.randn(M, 48, dtype=dtype), sizes, out=main,
                      accumulate=True)
        if tma:  # the persistent wgrad kernel: plain, and flattened with the prefetched tail (the GPU default)
            gm._CONFIG_OVERRIDES["wgrad"].update(persistent=True, flatten=store, prefetch_tail=store)
            moetron.gmm_k(torch.randn(M, 32, dtype=dtype), torch.randn(M, 48, dtype=dtype), sizes)
        if tma and dtype != torch.float32:  # the first expert GEMM with its activation in the epilogue
            gg.gated_gmm(torch.randn(M, 32, dtype=dtype), torch.randn(5, 48, 32, dtype=dtype), sizes.cumsum(0),
                         "geglu", torch.rand(M))
        if tma and dtype == torch.bfloat16 and store:  # the GPU's decode tiles (few rows per group)
            saved = dict(gm._CONFIG_OVERRIDES)
            for few_tiles in (False, True):
                gm._CONFIG_OVERRIDES["fwd"] = gm._gmm_config(dtype, 1 << 12, 1 << 12, False, True, True, few_tiles)
                moetron.gmm(torch.randn(M, 32, dtype=dtype), torch.randn(5, 48, 32, dtype=dtype), sizes,
                            trans_w=True)
            gm._CONFIG_OVERRIDES["gated"] = gm._gmm_gated_config(False, False, True)
            gg.gated_gmm(torch.randn(M, 32, dtype=dtype), torch.randn(5, 48, 32, dtype=dtype), sizes.cumsum(0),
                         "swiglu")
            gm._CONFIG_OVERRIDES["wgrad"] = gm._gmm_k_config(dtype, 1 << 12, 1 << 12, False, few_rows=True)
            moetron.gmm_k(torch.randn(M, 32, dtype=dtype), torch.randn(M, 48, dtype=dtype), sizes)
            gm._CONFIG_OVERRIDES.clear()
            gm._CONFIG_OVERRIDES.update(saved)
        # the first expert GEMM gathering its rows (inference), with padding rows
        lay = pm._route(torch.randint(0, 4, (9, 2)), 4, None, 8, None, "probs", pm.permuted_rows(9, 2, 4, pad_to=8))
        re.routed_gated_experts(torch.randn(9, 32, dtype=dtype), torch.rand(9, 2), torch.randn(4, 48, 32, dtype=dtype),
                                torch.randn(4, 32, 24, dtype=dtype), lay.src_slot, lay.row_map_R.view(9, 2),
                                lay.offsets)
    h = torch.randn(7, 48, dtype=dtype, requires_grad=True)
    for act in ("swiglu", "geglu"):
        gated_act(h, act).sum().backward()
        gated_act(h, act, row_scale=torch.rand(7, requires_grad=True)).sum().backward()
    for gpu_tiles in (False, True):  # the interpreter's small tiles, then the ones a GPU launch would pick
        rn._GPU_CONFIG_ON_CPU = gpu_tiles
        for rows, width, w_dtype, out_dtype in ((33, 48, torch.float32, None),
                                                (7, 100, torch.bfloat16, torch.bfloat16)):
            xn = torch.randn(rows, width, dtype=dtype, requires_grad=True)
            wn = torch.randn(width, dtype=w_dtype, requires_grad=True)
            rn.rms_norm(xn, wn, 1e-6, out_dtype).float().sum().backward()
            branch = torch.randn(rows, width, dtype=torch.bfloat16, requires_grad=True)
            y, x_new = rn.add_rms_norm(xn, branch, wn, 1e-6, out_dtype)
            (y.float().sum() + x_new.float().sum()).backward()
    xn = torch.randn(2, 8192, dtype=dtype, requires_grad=True)  # the widest row: one row per program, 16 warps
    rn.rms_norm(xn, torch.ones(8192, requires_grad=True), 1e-6).float().sum().backward()
    rn._GPU_CONFIG_ON_CPU = False
    xr = torch.randn(2, 3, 5, 24, dtype=dtype).transpose(1, 2).requires_grad_(True)  # strided [B, S, N, D]
    apply_rotary(xr, torch.randn(7, 24), torch.randn(7, 24)).sum().backward()  # [P, D] tables
    xr = torch.randn(1, 4, 2, 128, dtype=dtype, requires_grad=True)
    apply_rotary(xr, torch.randn(4, 64), torch.randn(4, 64)).sum().backward()  # [P, D/2] tables
    x = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 4, (6, 2))
    probs = torch.rand(6, 2, requires_grad=True)
    for scatter in (True, False):  # the token-scatter permute, and the row-program one (empty batches)
        pm.PERMUTE_SCATTER = scatter
        for kw in (dict(), dict(pad_to=8), dict(capacity=3, drop_policy="position")):
            r = permute(x, ids, 4, probs=probs, **kw)
            unpermute(r.x_permuted * 2, r.row_map, probs).sum().backward()
    pm.PERMUTE_SCATTER = True
rg = importlib.import_module("moetron.ops.router_gemm")
for gpu_tiles in (False, True):  # the router's GEMMs: interpreter tiles, then the GPU's tiles and bf16 dots
    rg._GPU_TILES_ON_CPU = gpu_tiles
    for w_dtype, rows in ((torch.float32, 70), (torch.bfloat16, 70), (torch.float32, 130)):  # 130: big-batch tiles
        xr = torch.randn(rows, 96).bfloat16().requires_grad_(True)
        wr = torch.randn(20, 96).to(w_dtype).requires_grad_(True)
        rg.router_logits(xr, wr).sum().backward()
rg._GPU_TILES_ON_CPU = False
ro = importlib.import_module("moetron.ops.routing")
for E, k, kw in ((8, 2, dict(aux_loss_coeff=0.1, z_loss_coeff=0.01)), (128, 8, dict(pre_softmax=True,
                 norm_topk_prob=True, aux_loss_coeff=0.01, loss_scale=torch.tensor(0.5))), (7, 3, dict())):
    lg = torch.randn(50, E, requires_grad=True)
    ro.softmax_topk(lg, k, **kw)[0].sum().backward()
"""

COMPILE = r"""
import glob, json, importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
seen, failures = set(), []
for path in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    for line in open(path):
        if line in seen:
            continue
        seen.add(line)
        r = json.loads(line)
        kernel = getattr(importlib.import_module(r["module"]), r["name"])
        types = iter(r["types"])
        signature, constexprs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in r["constexprs"]:
                signature[name], constexprs[(i,)] = "constexpr", r["constexprs"][name]
            else:
                signature[name] = next(types)
        options = {k: v for k, v in r["options"].items() if k in ("num_warps", "num_stages")}
        try:
            triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options=options)
        except Exception as e:
            failures.append(f"{r['name']} {r['constexprs']}: {str(e)[-800:]}")
print(json.dumps({"compiled": len(seen), "failures": failures}))
"""


def _run(code_or_args, env, timeout):
    args = [sys.executable] + code_or_args
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles and runs every kernel for real in the "
                    "other tests; this offline check is for machines without one (its workload needs a Triton "
                    "interpreter that runs the TMA kernels: 3.6's fails on the first TMA gmm launch)")
def test_kernels_compile_for_sm90(tmp_path):
    compiler = pytest.importorskip("triton.compiler")
    if not hasattr(compiler, "ASTSource"):
        pytest.skip("this Triton has no triton.compiler.ASTSource")
    record = tmp_path / "kernels"
    record.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOETRON_BACKEND", "MOETRON_TMA")}
    env = {**base, "TRITON_INTERPRET": "1", "MOETRON_BACKEND": "triton", "MOETRON_TMA": "1",
           "MOETRON_RECORD_KERNELS": str(record), "CUDA_VISIBLE_DEVICES": ""}
    work = _run(["-c", WORKLOAD], env, 300)
    assert work.returncode == 0, work.stderr[-3000:]
    fused = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_fused_dispatch.py"], env, 600)
    assert fused.returncode == 0, fused.stdout[-3000:]
    done = _run(["-c", COMPILE, str(record)], {**base, "TRITON_DEFAULT_FP_FUSION": "1"}, 600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    names = {json.loads(line)["name"] for p in record.iterdir() for line in p.read_text().splitlines()}
    expected = {"_gmm_kernel", "_gmm_tma_kernel", "_gmm_gated_tma_kernel", "_gmm_k_kernel", "_gmm_k_tma_kernel",
                "_gmm_k_tma_persistent_kernel", "_gated_fwd_kernel", "_rotary_kernel",
                "_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel",
                "_gated_bwd_kernel", "_expert_count_kernel", "_chunk_prefix_kernel", "_place_kernel",
                "_permute_kernel", "_permute_scatter_kernel", "_unpermute_kernel", "_unpermute_bwd_kernel",
                "_count_kernel", "_push_kernel",
                "_recv_kernel", "_route_fwd_kernel", "_route_losses_kernel", "_route_bwd_kernel",
                "_router_logits_kernel", "_router_dx_kernel", "_router_dw_kernel"}
    assert expected <= names, f"the workload did not launch {sorted(expected - names)}"
    assert not result["failures"], "\n\n".join(result["failures"])
