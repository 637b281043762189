"""The Gluon grouped-GEMM kernels (moetron/ops/_gluon_gmm.py) compile for Hopper (sm_90) with the installed Triton,
checked on a machine without a GPU. Gluon has no interpreter, so the CPU tests cannot run these kernels; this catches
a Triton release that renames or changes a Gluon call they use before a GPU machine meets it (there, a kernel that
fails to compile falls back to the tl kernels with a warning). The GPU tests (tests/gpu/test_gluon_gmm_gpu.py) check
their results."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moetron.ops import _gluon_gmm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILE = r"""
import itertools, json
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from moetron.ops import _gluon_gmm as m

def compile_for_sm90(kernel, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = GluonASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).metadata.shared

shared = {}
plain = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", sizes_ptr="*i32", M="i32", N="i32", K="i32", G="i32",
             num_programs="i32", stride_xm="i32", stride_ym="i32")
for trans_w, ends in itertools.product((True, False), (True, False)):
    shared[f"plain trans_w={trans_w} ends={ends}"] = compile_for_sm90(
        m._gmm_ws_kernel, plain, dict(TRANS_W=trans_w, SIZES_ARE_ENDS=ends, ZERO_TAIL=True, BLOCK_G=256, NUM_STAGES=3))
gated = dict(x_ptr="*bf16", w_ptr="*bf16", scale_ptr="*fp32", a_ptr="*bf16", h_ptr="*bf16", sizes_ptr="*i64",
             M="i32", F="i32", K="i32", G="i32", num_programs="i32", stride_xm="i32", stride_am="i32", stride_hm="i32")
for store_h in (True, False):
    shared[f"gated store_h={store_h}"] = compile_for_sm90(
        m._gmm_gated_ws_kernel, gated, dict(HAS_SCALE=True, STORE_H=store_h, SIZES_ARE_ENDS=True, ZERO_TAIL=False,
                                            BLOCK_G=256, NUM_STAGES=m.GATED_STAGES))
wgrad = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", sizes_ptr="*i64", M="i32", KA="i32", NB="i32", G="i32",
             num_programs="i32", stride_am="i32", stride_bm="i32")
for accumulate, ends in itertools.product((True, False), (True, False)):
    shared[f"wgrad accumulate={accumulate} ends={ends}"] = compile_for_sm90(
        m._gmm_k_ws_kernel, wgrad, dict(ACCUMULATE=accumulate, SIZES_ARE_ENDS=ends, BLOCK_G=256, GROUP_K=8,
                                        NUM_STAGES=m.K_STAGES))
print(json.dumps(shared))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles and runs the kernels for real")
def test_gluon_kernels_compile_for_sm90():
    if _gluon_gmm.gluon is None:
        pytest.skip("this Triton has no Gluon")
    pytest.importorskip("triton.experimental.gluon._runtime")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])  # {kernel and specialization: shared memory bytes}
    assert len(shared) == 10
    for name, nbytes in shared.items():  # one program per SM: what the kernel asks for must fit an H100's 227 KB
        assert nbytes <= 227 * 1024, (name, nbytes)
