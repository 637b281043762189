"""The first expert GEMM with its gated activation in the epilogue (gmm.gmm_gated, ops/gated_gmm.py).

Against an independent float64 reference (DESIGN.md tolerance rule) and bit for bit against ``gmm`` followed by
``gated_act``: empty, unaligned and single-row groups, a zero tail, rows gathered by index with padding rows, row
scales, h stored for training and the gradients of the training node, both epilogue configs (small and large
per-expert weights), the fallbacks. On CPU the fused kernel runs in Triton's interpreter (MOETRON_TMA=1: it is a
TMA kernel); on a GPU machine on the GPU.
"""

import importlib
import math

import pytest
import torch

gated_act = importlib.import_module("moetron.ops.gated_act")
from tests._tiles import standard_tiles
from tests._tolerance import assert_close_to_ref

gmm_module = importlib.import_module("moetron.ops.gmm")
gated_gmm_module = importlib.import_module("moetron.ops.gated_gmm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [40, 0, 16, 33, 1]
M, K, F = sum(SIZES) + 5, 40, 24  # 5 tail rows; F is not a multiple of the interpreter's 16-wide tiles
# On the GPU these few rows per expert take the decode tiles (gmm._FEW_ROWS_PER_GROUP); "standard" turns that off
# so the tests also reach the tiles larger batches run. The interpreter has one tile config.
TILES = ["decode", "standard"] if DEVICE == "cuda" else ["interpreter"]


@pytest.fixture(autouse=True)
def _fused_kernel(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "triton" if DEVICE == "cpu" else "auto")
    monkeypatch.setenv("MOETRON_TMA", "1" if DEVICE == "cpu" else "auto")


@pytest.fixture(params=TILES)
def tiles(request, monkeypatch):
    if request.param == "standard":
        standard_tiles(monkeypatch)
    return request.param


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


@pytest.mark.parametrize("large", [False, True], ids=["small_w", "large_w"])
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward(monkeypatch, tiles, act, dtype, large):
    if large:  # the large-weight epilogue (TMA stores) at test sizes
        monkeypatch.setattr(gmm_module, "_LARGE_OUTPUT", 16)
    x, w, scale, _ = _inputs(dtype, seed=1)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    groups = gmm_module._Groups(offsets, True, M)
    a = gmm_module.gmm_gated(x, w, groups, act, scale)
    # the same op as two: bit for bit (the GPU issues the same MMAs in the same order; under the interpreter
    # tests/conftest.py makes tl.dot's rounding independent of how a kernel tiles it)
    h_twin = gmm_module.gmm(x, w, offsets=offsets, trans_w=True)
    assert torch.equal(a, gated_act.gated_act(h_twin, act, row_scale=scale))
    assert torch.equal(gated_gmm_module.gated_gmm(x, w, offsets, act, scale), a)
    # storing h (training) changes nothing in a, and h is gmm's output, zero tail included; on the GPU large weights
    # leave that to gmm + gated_act (no faster fused there)
    h = torch.full((M, 2 * F), float("nan"), dtype=dtype, device=DEVICE)
    a_with_h = gmm_module.gmm_gated(x, w, groups, act, scale, h_out=h)
    if large and DEVICE == "cuda":
        assert a_with_h is None
    else:
        assert torch.equal(a_with_h, a)
        assert torch.equal(h, h_twin)
    # and the float64 reference
    ref = _reference(x.double().cpu(), w.double().cpu(), scale.double().cpu(), act)
    assert_close_to_ref("a", a, ref, _reference(x, w, scale, act))
    assert torch.equal(a[sum(SIZES):].float().cpu(), torch.zeros(5, F))


def _two_ops(x, w, scale, offsets, act, zero_tail=True):
    h = gmm_module.gmm(x, w, offsets=offsets, trans_w=True, zero_tail=zero_tail)
    return gated_act.gated_act(h, act, row_scale=scale, num_rows=None if zero_tail else offsets[-1:])


@pytest.mark.parametrize("large", [False, True], ids=["small_w", "large_w"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_training_matches_the_two_ops(monkeypatch, tiles, act, fused, large):
    # the training node: output and the x, w and row-scale gradients bit for bit those of gmm then gated_act,
    # and close to float64 autograd through the plain per-group reference
    if large:
        monkeypatch.setattr(gmm_module, "_LARGE_OUTPUT", 16)
    if not fused:
        monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    x, w, scale, dy = _inputs(torch.bfloat16, seed=11)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    calls = []
    real = gmm_module.gmm_gated
    monkeypatch.setattr(gated_gmm_module, "gmm_gated", lambda *a, **k: calls.append(k.get("h_out")) or real(*a, **k))
    grads = []
    for fn in (gated_gmm_module.gated_gmm, None):
        leaves = [t.clone().requires_grad_() for t in (x, w, scale)]
        a = fn(*leaves[:2], offsets, act, leaves[2]) if fn else _two_ops(*leaves, offsets, act)
        a.backward(dy)
        grads.append([a.detach()] + [t.grad for t in leaves])
    assert len(calls) == 1 and calls[0] is not None  # the training node asked the kernel to store h
    for name, got, want in zip(("a", "dx", "dw", "dscale"), *grads):
        assert torch.equal(got, want), name
    leaves64 = [t.double().cpu().requires_grad_() for t in (x, w, scale)]
    ref = _reference(*leaves64, act)
    ref.backward(dy.double().cpu())
    base = [t.clone().requires_grad_() for t in (x, w, scale)]
    _reference(*base, act).backward(dy)
    for name, got, t64, tb in zip(("dx", "dw", "dscale"), grads[0][1:], leaves64, base):
        assert_close_to_ref(name, got, t64.grad, tb.grad)


def test_training_without_zero_tail_and_reusing_memory():
    # zero_tail=False leaves the tail rows unwritten (forward and dx) and the rest bit for bit; consume_x /
    # consume_h write the gradients over x and h, so a second backward raises
    x, w, scale, dy = _inputs(torch.bfloat16, seed=12)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    n = sum(SIZES)
    want = [t.clone().requires_grad_() for t in (x, w, scale)]
    _two_ops(*want, offsets, "swiglu").backward(dy)
    leaves = [t.clone().requires_grad_() for t in (x, w, scale)]
    a = gated_gmm_module.gated_gmm(*leaves[:2], offsets, "swiglu", leaves[2], zero_tail=False)
    a.backward(dy)
    assert torch.equal(leaves[0].grad[:n], want[0].grad[:n])
    assert torch.equal(leaves[1].grad, want[1].grad) and torch.equal(leaves[2].grad[:n], want[2].grad[:n])
    leaves = [t.clone().requires_grad_() for t in (x, w, scale)]
    x_mid = leaves[0] * 1  # an intermediate, as a dispatcher's permuted rows are
    a = gated_gmm_module.gated_gmm(x_mid, leaves[1], offsets, "swiglu", leaves[2], consume_x=True, consume_h=True)
    (a * dy).sum().backward(retain_graph=True)
    assert torch.equal(leaves[0].grad, want[0].grad) and torch.equal(leaves[1].grad, want[1].grad)
    with pytest.raises(RuntimeError, match="can run once"):
        (a * dy).sum().backward()
    with pytest.raises(ValueError, match="consume_x"):  # a leaf's data must not be overwritten
        gated_gmm_module.gated_gmm(leaves[0], leaves[1], offsets, "swiglu", consume_x=True)


def test_training_materialises_no_gradient_for_the_activation(monkeypatch):
    # the first node returns a as a non-differentiable side output: its backward must get None there, not an [R, F]
    # tensor of zeros allocated by autograd (that was +0.47 GB at the Mixtral layer's peak, T=8192)
    node = gated_gmm_module._FirstGemmWithActivation
    seen = []
    real = node.backward
    monkeypatch.setattr(node, "backward", staticmethod(lambda ctx, dh, da: seen.append(da) or real(ctx, dh, da)))
    x, w, scale, dy = _inputs(torch.bfloat16, seed=14)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    gated_gmm_module.gated_gmm(x, w.requires_grad_(), offsets, "swiglu", scale).backward(dy)
    assert seen == [None] and w.grad is not None


def test_training_adds_into_main_grad():
    x, w, scale, dy = _inputs(torch.bfloat16, seed=13)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    wp = w.clone().requires_grad_()
    _two_ops(x, wp, scale, offsets, "swiglu").backward(dy)
    wm = w.clone().requires_grad_()
    wm.main_grad = torch.ones(w.shape, device=DEVICE)
    gated_gmm_module.gated_gmm(x, wm, offsets, "swiglu", scale).backward(dy)
    assert wm.grad is None
    assert torch.allclose(wm.main_grad, 1 + wp.grad.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="gather"):
        gated_gmm_module.gated_gmm(x[:3], wm, offsets, "swiglu", gather=torch.zeros(M, dtype=torch.int32,
                                                                                          device=DEVICE))


def test_training_with_an_fp32_weight():
    """Mixed precision (autocast with fp32 weights): outputs, dx and the row scale's gradient bitwise those of w
    rounded to x's dtype; w's gradient in fp32, against float64 with the rounded copy's gradient as baseline."""
    x, w, scale, dy = _inputs(torch.bfloat16, seed=17)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    w32 = w.float().requires_grad_()
    runs = []
    for weight in (w32, w.clone().requires_grad_()):
        xi, si = x.clone().requires_grad_(), scale.clone().requires_grad_()
        a = gated_gmm_module.gated_gmm(xi, weight, offsets, "swiglu", si)
        a.backward(dy)
        runs.append((a, xi.grad, si.grad, weight.grad))
    (a, dx, ds, dw), (a_copy, dx_copy, ds_copy, dw_copy) = runs
    assert torch.equal(a, a_copy) and torch.equal(dx, dx_copy) and torch.equal(ds, ds_copy)
    assert dw.dtype == torch.float32
    w64 = w.double().requires_grad_()
    _reference(x.double(), w64, scale.double(), "swiglu").backward(dy.double())
    assert_close_to_ref("fp32 dw1", dw, w64.grad, dw_copy.float())


def test_gathered_rows_with_padding(tiles):
    # rows read x[gather[r]] (the MoE layer's inference path); -1 marks padding rows, which come out zero
    x, w, scale, _ = _inputs(torch.bfloat16, seed=3)
    tokens = x[:13]
    gather = torch.randint(-1, 13, (M,), generator=torch.Generator().manual_seed(4), dtype=torch.int32).to(DEVICE)
    groups = gmm_module._Groups(torch.tensor(SIZES, device=DEVICE), False, M)
    a = gmm_module.gmm_gated(tokens, w, groups, "swiglu", scale, gather=gather)
    rows = torch.where((gather >= 0)[:, None], tokens[gather.clamp(min=0).long()], 0)
    h_twin = torch.empty(M, 2 * F, dtype=rows.dtype, device=DEVICE)
    gmm_module._run_gmm(rows, w, None, groups, h_twin, True)
    assert torch.equal(a, gated_act.gated_act(h_twin, "swiglu", row_scale=scale))
    assert torch.equal(a[gather < 0].float(), torch.zeros(int((gather < 0).sum()), F, device=DEVICE))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
def test_gathered_slots_with_slot_scales(monkeypatch, tiles, fused):
    # the MoE layer's folded inference: gather holds routed slots t·K+k (-1: padding), row r reads token
    # slot // K and takes the slot's routing weight; the same bits as gathering rows and scales up front
    top_k = 3
    x, w, _, _ = _inputs(torch.bfloat16, seed=7)
    tokens = x[:11]
    g = torch.Generator().manual_seed(8)
    slots = torch.randint(-1, 11 * top_k, (M,), generator=g).to(DEVICE)  # int64, as permute's src_slot
    slot_probs = torch.rand(11 * top_k, generator=g).to(DEVICE)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    keep = slots >= 0
    row_token = torch.where(keep, slots // top_k, -1).to(torch.int32)
    row_scale = torch.where(keep, slot_probs[slots.clamp(min=0)], 0.0)
    if not fused:
        monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    a = gated_gmm_module.gated_gmm(tokens, w, offsets, "swiglu", gather=slots, gather_div=top_k,
                                   slot_scale=slot_probs)
    assert torch.equal(a, gated_gmm_module.gated_gmm(tokens, w, offsets, "swiglu", row_scale, gather=row_token))
    rows = torch.where(keep[:, None], tokens[row_token.clamp(min=0).long()], 0)
    ref = _reference(rows.double().cpu(), w.double().cpu(), row_scale.double().cpu(), "swiglu")
    assert_close_to_ref("a", a, ref, _reference(rows, w, row_scale, "swiglu"))
    assert torch.equal(a[~keep].float(), torch.zeros(int((~keep).sum()), F, device=DEVICE))
    with pytest.raises(ValueError, match="slot_scale"):  # without gather there are no slots to index by
        gated_gmm_module.gated_gmm(x, w, offsets, "swiglu", slot_scale=slot_probs)
    with pytest.raises(ValueError, match="slot_scale"):
        gated_gmm_module.gated_gmm(tokens, w, offsets, "swiglu", row_scale, gather=slots, gather_div=top_k,
                                   slot_scale=slot_probs)


def test_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    # fp32 inputs and the kernel switched off take gmm + gated_act: same values
    x, w, scale, _ = _inputs(torch.float32, seed=5)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    groups = gmm_module._Groups(offsets, True, M)
    assert gmm_module.gmm_gated(x, w, groups, "swiglu") is None
    expect = gated_act.gated_act(gmm_module.gmm(x, w, offsets=offsets, trans_w=True), "swiglu", row_scale=scale)
    assert torch.equal(gated_gmm_module.gated_gmm(x, w, offsets, "swiglu", scale), expect)
    xb, wb, sb, _ = _inputs(torch.bfloat16, seed=5)
    monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    assert torch.equal(gated_gmm_module.gated_gmm(xb, wb, offsets, "geglu", sb),
                       gated_act.gated_act(gmm_module.gmm(xb, wb, offsets=offsets, trans_w=True), "geglu",
                                           row_scale=sb))


def test_layer_uses_it_in_inference_and_training(monkeypatch):
    from moetron import GroupedExperts

    experts = GroupedExperts(len(SIZES), K, F).to(DEVICE, torch.bfloat16)
    x, _, scale, dy = _inputs(torch.bfloat16, seed=6)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    calls = []
    real = gmm_module.gmm_gated
    monkeypatch.setattr(gated_gmm_module, "gmm_gated", lambda *a, **k: calls.append(k.get("h_out")) or real(*a, **k))
    with torch.no_grad():
        y_infer = experts(x, offsets, row_scale=scale)
    assert len(calls) == 1 and calls[0] is None
    y_train = experts(x, offsets, row_scale=scale)
    assert len(calls) == 2 and calls[1] is not None and y_train.requires_grad
    assert torch.equal(y_infer, y_train.detach())
    y_train.backward(dy[:, :1].expand(M, K).contiguous())
    fused_grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    experts(x, offsets, row_scale=scale).backward(dy[:, :1].expand(M, K).contiguous())
    for got, p in zip(fused_grads, experts.parameters()):
        assert torch.equal(got, p.grad)
