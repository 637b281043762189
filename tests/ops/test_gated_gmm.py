"""The first expert GEMM with its gated activation in the epilogue (moetron/ops/gated_gmm.py, gmm.gmm_gated).

Against an independent float64 reference (DESIGN.md tolerance rule) and bit for bit against ``gmm`` followed by
``gated_act``, forward and every gradient: empty, unaligned and single-row groups, a zero tail, rows gathered by
index with padding rows, row scales, an fp32 main_grad. On CPU the fused kernel runs in Triton's interpreter
(MOETRON_TMA=1: it is a TMA kernel); on a GPU machine on the GPU.
"""

import importlib
import math

import pytest
import torch

gated_act = importlib.import_module("moetron.ops.gated_act")
from tests._tolerance import assert_close_to_ref

gmm_module = importlib.import_module("moetron.ops.gmm")
gated_gmm_module = importlib.import_module("moetron.ops.gated_gmm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [40, 0, 16, 33, 1]
M, K, F = sum(SIZES) + 5, 40, 24  # 5 tail rows; F is not a multiple of the interpreter's 16-wide tiles


@pytest.fixture(autouse=True)
def _fused_kernel(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "triton" if DEVICE == "cpu" else "auto")
    monkeypatch.setenv("MOETRON_TMA", "1" if DEVICE == "cpu" else "auto")


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(len(SIZES), 2 * F, K, generator=g) / math.sqrt(K)).to(dtype).to(DEVICE)
    scale = torch.rand(M, generator=g).to(DEVICE)
    dy = torch.randn(M, F, generator=g).to(dtype).to(DEVICE)
    return x, w, scale, dy


def _reference(x, w, scale, act):
    """Per-group loop in x's dtype (float64 for the reference), tail rows zero."""
    h = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for g, n in enumerate(SIZES):
        h[start:start + n] = x[start:start + n] @ w[g].t()
        start += n
    return gated_act.gated_act_ref(h, act, scale.to(x.dtype))


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_and_backward(act, dtype):
    x, w, scale, dy = _inputs(dtype, seed=1)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, scale)]
    out = gated_gmm_module.gated_gmm(*leaves[:2], offsets, act, leaves[2])
    out.backward(dy)
    # the same op as two: bit for bit
    twin = [t.clone().requires_grad_(True) for t in (x, w, scale)]
    h = gmm_module.gmm(twin[0], twin[1], offsets=offsets, trans_w=True)
    twin_out = gated_act.gated_act(h, act, row_scale=twin[2])
    twin_out.backward(dy)
    assert torch.equal(out, twin_out)
    for got, same in zip(leaves, twin):
        assert torch.equal(got.grad, same.grad)
    # and the float64 reference
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (x, w, scale)]
    _reference(*ref, act).backward(dy.double().cpu())
    base = [t.detach().clone().requires_grad_(True) for t in (x, w, scale)]
    base_out = _reference(base[0], base[1], base[2], act)
    base_out.backward(dy)
    assert_close_to_ref("a", out, _reference(*[t.detach() for t in ref], act), base_out)
    for name, got, r, b in zip(("dx", "dw", "dscale"), leaves, ref, base):
        assert_close_to_ref(name, got.grad, r.grad, b.grad)
    assert torch.equal(out[sum(SIZES):].float().cpu(), torch.zeros(5, F))


def test_main_grad_and_no_grad():
    x, w, scale, dy = _inputs(torch.bfloat16, seed=2)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    w_main = w.clone().requires_grad_(True)
    w_main.main_grad = torch.ones(w.shape, dtype=torch.float32, device=DEVICE)
    gated_gmm_module.gated_gmm(x, w_main, offsets, "swiglu", scale).backward(dy)
    w_plain = w.clone().requires_grad_(True)
    gated_gmm_module.gated_gmm(x, w_plain, offsets, "swiglu", scale).backward(dy)
    assert w_main.grad is None
    torch.testing.assert_close(w_main.main_grad, 1 + w_plain.grad.float(), rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # inference: h is never stored, a is the same
        assert torch.equal(gated_gmm_module.gated_gmm(x, w, offsets, "swiglu", scale),
                           gated_gmm_module.gated_gmm(x, w_plain.detach(), offsets, "swiglu", scale))


def test_gathered_rows_with_padding():
    # rows read x[gather[r]] (the MoE layer's inference path); -1 marks padding rows, which come out zero
    x, w, scale, _ = _inputs(torch.bfloat16, seed=3)
    tokens = x[:13]
    gather = torch.randint(-1, 13, (M,), generator=torch.Generator().manual_seed(4), dtype=torch.int32).to(DEVICE)
    groups = gmm_module._Groups(torch.tensor(SIZES, device=DEVICE), False, M)
    a, h = gmm_module.gmm_gated(tokens, w, groups, "swiglu", scale, gather=gather, store_h=True)
    rows = torch.where((gather >= 0)[:, None], tokens[gather.clamp(min=0).long()], 0)
    h_twin = torch.empty_like(h)
    gmm_module._run_gmm(rows, w, None, groups, h_twin, True)
    assert torch.equal(h, h_twin)
    assert torch.equal(a, gated_act.gated_act(h_twin, "swiglu", row_scale=scale))
    assert torch.equal(a[gather < 0].float(), torch.zeros(int((gather < 0).sum()), F, device=DEVICE))


def test_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    # fp32 inputs and the kernel switched off both take gmm + gated_act: same values, same gradients
    x, w, scale, dy = _inputs(torch.float32, seed=5)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    groups = gmm_module._Groups(offsets, True, M)
    assert gmm_module.gmm_gated(x, w, groups, "swiglu") is None
    out = gated_gmm_module.gated_gmm(x, w, offsets, "swiglu", scale)
    expect = gated_act.gated_act(gmm_module.gmm(x, w, offsets=offsets, trans_w=True), "swiglu", row_scale=scale)
    assert torch.equal(out, expect)
    monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    xb, wb, sb, _ = _inputs(torch.bfloat16, seed=5)
    assert torch.equal(gated_gmm_module.gated_gmm(xb, wb, offsets, "geglu", sb),
                       gated_act.gated_act(gmm_module.gmm(xb, wb, offsets=offsets, trans_w=True), "geglu",
                                           row_scale=sb))
