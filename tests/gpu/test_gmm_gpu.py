"""GPU-only checks of moetron.gmm: full-size shapes, no host sync, CUDA-graph capture, determinism.
Run on a CUDA machine with `python -m pytest tests/gpu tests/ops -q` (the tests/ops cases then run on CUDA)."""

import importlib
import math

import pytest
import torch

import moetron
from tests._tiles import standard_tiles
from tests._tolerance import assert_close_to_ref

gm = importlib.import_module("moetron.ops.gmm")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be true fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _loop(x, w, sizes, dtype=None):
    out = torch.zeros(x.shape[0], w.shape[2], dtype=dtype or x.dtype, device=x.device)
    s = 0
    for g, c in enumerate(sizes):
        out[s:s + c] = (x[s:s + c].to(out.dtype) @ w[g].to(out.dtype))
        s += c
    return out


def _loop_wgrad(x, dy, sizes, dtype):
    out = torch.zeros(len(sizes), x.shape[1], dy.shape[1], dtype=dtype, device=x.device)
    s = 0
    for g, c in enumerate(sizes):
        out[g] = x[s:s + c].to(dtype).t() @ dy[s:s + c].to(dtype)
        s += c
    return out


@pytest.mark.parametrize("name,sizes,K,N", [
    # the Mixtral edge case: very uneven sizes, a 1-row and a 5-row group, an empty last group
    ("mixtral_edge", [219, 2246, 5, 8103, 1, 1117, 4693, 0], 4096, 14336),
    # decode-sized: every group is one partial row chunk of the weight gradient (the prefetched tail) or empty
    ("mixtral_decode", [4, 0, 3, 9, 1, 0, 63, 2], 4096, 14336),
    # fine-grained experts: 128 groups at the Qwen3-30B shape, random sizes with empties
    ("qwen3_like", None, 2048, 1536),
])
def test_large_forward_backward(name, sizes, K, N):
    gen = torch.Generator().manual_seed(0)
    if sizes is None:
        d = torch.rand(128, generator=gen) * (torch.rand(128, generator=gen) > 0.2)
        sizes = (d / d.sum() * 8192).long()
        sizes[0] += 8192 - sizes.sum()
        sizes = sizes.tolist()
    M, G = sum(sizes), len(sizes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(G, K, N, device="cuda") / math.sqrt(K)).to(torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = moetron.gmm(xg, wg, torch.tensor(sizes, device="cuda"))
    out.backward(dy)
    ref = _loop(x, w, sizes, torch.float32)
    assert_close_to_ref("out", out, ref, _loop(x, w, sizes))
    ref_dx = _loop(dy, w.transpose(1, 2), sizes, torch.float32)
    assert_close_to_ref("dx", xg.grad, ref_dx, _loop(dy, w.transpose(1, 2).contiguous(), sizes))
    ref_dw = _loop_wgrad(x, dy, sizes, torch.float32)
    assert_close_to_ref("dw", wg.grad, ref_dw, _loop_wgrad(x, dy, sizes, torch.bfloat16))


@pytest.mark.parametrize("name,sizes,K,N,trans_w", [
    # one token, top-2: two 1-row groups; the 64-row tiles cannot fill the GPU, so the narrow decode tiles run
    ("mixtral_down_one_token", [1, 0, 0, 0, 0, 1, 0, 0], 14336, 4096, True),
    # a few tokens over Mixtral's up projection ([G, K, N] weight), empties and unaligned rows
    ("mixtral_up_few_tokens", [3, 0, 5, 1, 0, 2, 4, 1], 4096, 14336, False),
    # fine-grained experts at decode: 0-3 rows per expert over 128 experts
    ("qwen3_decode", None, 2048, 768, True),
])
def test_decode_tiles_match_the_standard_tiles(monkeypatch, name, sizes, K, N, trans_w):
    # With few rows per group (gmm._FEW_ROWS_PER_GROUP) the forward and dx take 64-row tiles and the Mixtral-sized
    # weight gradients a write-bound config; they must give the same bits as the tiles of larger batches, and the
    # reference's values
    if sizes is None:
        sizes = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(3)).tolist()
    M, G = sum(sizes), len(sizes)
    assert gm._few_rows(M, G)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(G, *((N, K) if trans_w else (K, N)), device="cuda") / math.sqrt(K)).to(torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    sizes_t = torch.tensor(sizes, device="cuda")
    results = []
    for standard in (False, True):
        if standard:
            standard_tiles(monkeypatch)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = moetron.gmm(xg, wg, sizes_t, trans_w=trans_w)
        out.backward(dy)
        results.append((out, xg.grad, wg.grad))
    for label, decode, std in zip(("out", "dx", "dw"), *results):
        assert torch.equal(decode, std), label
    w_kn = w.transpose(1, 2) if trans_w else w
    assert_close_to_ref("out", results[0][0], _loop(x, w_kn, sizes, torch.float32), _loop(x, w_kn, sizes))
    ref_dx = _loop(dy, w_kn.transpose(1, 2), sizes, torch.float32)
    assert_close_to_ref("dx", results[0][1], ref_dx, _loop(dy, w_kn.transpose(1, 2).contiguous(), sizes))
    dw = results[0][2].transpose(1, 2) if trans_w else results[0][2]
    assert_close_to_ref("dw", dw, _loop_wgrad(x, dy, sizes, torch.float32),
                        _loop_wgrad(x, dy, sizes, torch.bfloat16))


def test_no_host_sync():
    """With sizes on the GPU, forward and backward never synchronize with the host."""
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sizes = torch.randint(0, 60, (16,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moetron.gmm(x, w, sizes)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replay_with_new_sizes():
    """Forward and backward captured once, replayed with new group sizes written into the same tensor."""
    M, K, N, G = 777, 192, 160, 12
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(G, K, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    sizes = torch.zeros(G, dtype=torch.int32, device="cuda")

    def step():
        x.grad = w.grad = None
        out = moetron.gmm(x, w, sizes)
        out.backward(dy)
        return out

    sizes.copy_(torch.full((G,), M // G, dtype=torch.int32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = w.grad = None
    with torch.cuda.graph(graph):
        static_out = moetron.gmm(x, w, sizes)
        static_out.backward(dy)
    static_dx, static_dw = x.grad, w.grad

    for trial in range(3):
        new = torch.randint(0, 120, (G,), generator=torch.Generator().manual_seed(trial))
        new[trial] = 0
        new = (new * M // max(int(new.sum()), 1)).to(torch.int32)  # sum <= M, some rows in the tail
        sizes.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        eager_out = moetron.gmm(x.detach(), w.detach(), sizes)
        xe, we = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        moetron.gmm(xe, we, sizes).backward(dy)
        assert torch.equal(static_out, eager_out)
        assert torch.equal(static_dx, xe.grad)
        assert torch.equal(static_dw, we.grad)


def test_bitwise_deterministic():
    gen = torch.Generator().manual_seed(3)
    M, K, N, G = 4099, 512, 384, 24
    x = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(G, K, N, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(M, N, generator=gen).to("cuda", torch.bfloat16)
    sizes = torch.randint(0, 300, (G,), generator=gen)
    sizes = (sizes * M // sizes.sum()).cuda()
    results = []
    for _ in range(2):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = moetron.gmm(xg, wg, sizes)
        out.backward(dy)
        results.append((out, xg.grad, wg.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_launch_plans_rerun_with_new_tensors():
    """The second call of a shape reuses the first call's launch plan (moetron.ops._launch.LaunchPlans): new data,
    new group sizes, counts vs ends, bias vs none, a misaligned operand and a new row count must all still be
    right, and a plan must not keep the tensors of the call that made it alive."""
    import gc
    import weakref

    import importlib

    gmm_module = importlib.import_module("moetron.ops.gmm")

    gen = torch.Generator().manual_seed(5)
    K, N, G = 192, 320, 7

    def check(M, bias=False, misalign=False, ends=False):
        storage = torch.randn(M * K + 8, generator=gen).to("cuda", torch.bfloat16)
        x = storage[1:1 + M * K].view(M, K) if misalign else storage[:M * K].view(M, K)
        w = (torch.randn(G, K, N, generator=gen) / math.sqrt(K)).to("cuda", torch.bfloat16)
        b = torch.randn(G, N, generator=gen).to("cuda", torch.bfloat16) if bias else None
        counts = torch.randint(0, M // G + 40, (G,), generator=gen)
        counts[2] = 0
        counts = (counts * M // max(int(counts.sum()), 1))
        sizes = torch.cumsum(counts, 0) if ends else counts
        out = moetron.gmm(x, w, **{("offsets" if ends else "group_sizes"): sizes.cuda()}, bias=b)
        ref = torch.zeros(M, N, device="cuda")
        s = 0
        for g, c in enumerate(counts.tolist()):
            ref[s:s + c] = x[s:s + c].float() @ w[g].float() + (b[g].float() if bias else 0)
            s += c
        assert_close_to_ref("out", out, ref, ref.to(torch.bfloat16))
        dy = torch.randn(M, N, generator=gen).to("cuda", torch.bfloat16)
        dw = moetron.gmm_k(x, dy, sizes.cuda() if not ends else None, offsets=sizes.cuda() if ends else None)
        s = 0
        for g, c in enumerate(counts.tolist()):
            ref_g = x[s:s + c].float().t() @ dy[s:s + c].float()
            assert_close_to_ref(f"dw[{g}]", dw[g], ref_g, ref_g.to(torch.bfloat16))
            s += c
        return weakref.ref(x)

    for M in (513, 513, 1024, 513):
        check(M)
    for kwargs in (dict(bias=True), dict(bias=True), dict(ends=True), dict(ends=True), dict(misalign=True)):
        check(513, **kwargs)
    assert len(gmm_module._FWD_PLANS._plans) > 0, "no plan was recorded: the fast path is not exercised"
    ref = check(640)
    gc.collect()
    assert ref() is None, "a launch plan keeps a caller's tensor alive"


@pytest.mark.parametrize("trans_w", [False, True])
def test_fp32_on_tf32(trans_w):
    """fp32 inputs with TF32 allowed. The forward of a [G, K, N] weight runs as out^T = w^T x^T (Hopper's TF32 MMA
    reads a shared-memory operand only with the reduction dim contiguous); w itself must stay untouched. Checked
    against float64 with torch's own TF32 loop as the baseline error, with uneven, empty and unaligned groups.

    The bound is 3x torch's error, not 2x: Triton's TF32 MMA truncates the operands' low mantissa bits where
    cuBLAS rounds them to nearest, which measured 2.3x cuBLAS's max error on the H100 (benchmarks/NOTES.md)."""
    torch.backends.cuda.matmul.allow_tf32 = True  # the autouse fixture restores it
    gen = torch.Generator().manual_seed(5)
    sizes = [700, 0, 1, 517, 1029, 0, 77, 300]
    M, K, N, G = sum(sizes) + 13, 320, 272, len(sizes)  # 13 tail rows no group owns; 329 rows per group
    x = torch.randn(M, K, generator=gen).cuda()
    w = (torch.randn(G, K, N, generator=gen) / math.sqrt(K)).cuda()
    dy = torch.randn(M, N, generator=gen).cuda()
    w_arg = w.transpose(1, 2).contiguous() if trans_w else w
    w_before = w_arg.clone()
    xg, wg = x.clone().requires_grad_(True), w_arg.clone().requires_grad_(True)
    out = moetron.gmm(xg, wg, torch.tensor(sizes, device="cuda"), trans_w=trans_w)
    out.backward(dy)
    assert torch.equal(wg.detach(), w_before)
    ref = _loop(x.double(), w.double(), sizes)  # rows past the groups stay zero
    assert_close_to_ref("out", out, ref, _loop(x, w, sizes), factor=3)  # baseline: torch's own TF32 loop
    ref_dx = _loop(dy.double(), w.transpose(1, 2).double(), sizes)
    assert_close_to_ref("dx", xg.grad, ref_dx, _loop(dy, w.transpose(1, 2).contiguous(), sizes), factor=3)
    ref_dw = _loop_wgrad(x.double(), dy.double(), sizes, torch.float64)
    base_dw = _loop_wgrad(x, dy, sizes, torch.float32)
    if trans_w:
        ref_dw, base_dw = ref_dw.transpose(1, 2), base_dw.transpose(1, 2)
    assert_close_to_ref("dw", wg.grad, ref_dw, base_dw, factor=3)
