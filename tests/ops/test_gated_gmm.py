"""The first expert GEMM with its gated activation in the epilogue (gmm.gmm_gated, ops/gated_gmm.py: inference).

Against an independent float64 reference (DESIGN.md tolerance rule) and bit for bit against ``gmm`` followed by
``gated_act``: empty, unaligned and single-row groups, a zero tail, rows gathered by index
with padding rows, row scales, the fallbacks. On CPU the fused kernel runs in Triton's interpreter (MOETRON_TMA=1:
it is a TMA kernel); on a GPU machine on the GPU.
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
def test_forward(act, dtype):
    x, w, scale, _ = _inputs(dtype, seed=1)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    groups = gmm_module._Groups(offsets, True, M)
    a = gmm_module.gmm_gated(x, w, groups, act, scale)
    # the same op as two: bit for bit
    h_twin = gmm_module.gmm(x, w, offsets=offsets, trans_w=True)
    assert torch.equal(a, gated_act.gated_act(h_twin, act, row_scale=scale))
    assert torch.equal(gated_gmm_module.gated_gmm(x, w, offsets, act, scale), a)
    # and the float64 reference
    ref = _reference(x.double().cpu(), w.double().cpu(), scale.double().cpu(), act)
    assert_close_to_ref("a", a, ref, _reference(x, w, scale, act))
    assert torch.equal(a[sum(SIZES):].float().cpu(), torch.zeros(5, F))


def test_gathered_rows_with_padding():
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
def test_gathered_slots_with_slot_scales(monkeypatch, fused):
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
    # fp32 inputs, large per-expert weights and the kernel switched off all take gmm + gated_act: same values
    x, w, scale, _ = _inputs(torch.float32, seed=5)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    groups = gmm_module._Groups(offsets, True, M)
    assert gmm_module.gmm_gated(x, w, groups, "swiglu") is None
    expect = gated_act.gated_act(gmm_module.gmm(x, w, offsets=offsets, trans_w=True), "swiglu", row_scale=scale)
    assert torch.equal(gated_gmm_module.gated_gmm(x, w, offsets, "swiglu", scale), expect)
    xb, wb, sb, _ = _inputs(torch.bfloat16, seed=5)
    monkeypatch.setattr(gmm_module, "_LARGE_OUTPUT", 16)
    assert gmm_module.gmm_gated(xb, wb, groups, "geglu") is None
    monkeypatch.undo()
    monkeypatch.setattr(gmm_module, "GATED_EPILOGUE", False)
    assert torch.equal(gated_gmm_module.gated_gmm(xb, wb, offsets, "geglu", sb),
                       gated_act.gated_act(gmm_module.gmm(xb, wb, offsets=offsets, trans_w=True), "geglu",
                                           row_scale=sb))


def test_layer_inference_uses_it_and_training_does_not(monkeypatch):
    from moetron import GroupedExperts

    experts = GroupedExperts(len(SIZES), K, F).to(DEVICE, torch.bfloat16)
    x, _, scale, _ = _inputs(torch.bfloat16, seed=6)
    offsets = torch.tensor(SIZES).cumsum(0).to(DEVICE)
    calls = []
    real = gmm_module.gmm_gated
    monkeypatch.setattr(gated_gmm_module, "gmm_gated", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        y_infer = experts(x, offsets, row_scale=scale)
    assert calls == [1]
    y_train = experts(x, offsets, row_scale=scale)
    assert calls == [1] and y_train.requires_grad
    assert torch.equal(y_infer, y_train.detach())
