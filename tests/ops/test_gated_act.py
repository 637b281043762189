"""Fused gated activation against a float64 PyTorch reference (DESIGN.md tolerance rule), forward and backward,
on the torch path and on the Triton kernels (the interpreter on CPU, CUDA on a GPU)."""

import os

import pytest
import torch

from moetron.ops import gated_act, gated_act_ref
from tests._tolerance import assert_close_to_ref


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,f", [(7, 24), (5, 1030), (1, 1)], ids=["small", "two_col_blocks", "one"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "row_scale"])
def test_forward_backward(device, activation, dtype, rows, f, scaled):
    # 1030 columns: two column blocks, the second one partial (row_scale's gradient sums both); odd row counts;
    # a zero row must stay zero
    torch.manual_seed(rows + f)
    h = (torch.randn(rows, 2 * f) * 3).to(dtype).to(device)
    h[rows // 2] = 0
    da = torch.randn(rows, f).to(dtype).to(device)
    s = (torch.rand(rows) + 0.1).to(device) if scaled else None
    hg = h.clone().requires_grad_(True)
    sg = s.clone().requires_grad_(True) if scaled else None
    a = gated_act(hg, activation, row_scale=sg)
    a.backward(da)
    h64 = h.double().cpu().requires_grad_(True)
    s64 = s.double().cpu().requires_grad_(True) if scaled else None
    ref = gated_act_ref(h64, activation, s64)
    ref.backward(da.double().cpu())
    hb = h.clone().requires_grad_(True)
    sb = s.clone().requires_grad_(True) if scaled else None
    base = gated_act_ref(hb, activation, sb)
    base.backward(da)
    assert a.dtype == dtype and a.shape == (rows, f)
    assert_close_to_ref("a", a, ref, base)
    assert_close_to_ref("dh", hg.grad, h64.grad, hb.grad)
    if scaled:
        assert sg.grad.dtype == torch.float32
        assert_close_to_ref("dscale", sg.grad, s64.grad, sb.grad)
    assert torch.equal(a[rows // 2].float().cpu(), torch.zeros(f))


def test_empty_and_bad_input():
    assert gated_act(torch.randn(0, 8)).shape == (0, 4)
    with pytest.raises(ValueError, match="odd width"):
        gated_act(torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_act(torch.randn(3, 4), "relu")
    with pytest.raises(ValueError, match="2-D"):
        gated_act(torch.randn(3))
    with pytest.raises(TypeError, match="dtype"):
        gated_act(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"row_scale must be \[R\] = \[3\]"):
        gated_act(torch.randn(3, 4), row_scale=torch.ones(2))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "row_scale"])
def test_num_rows_computes_the_live_rows_only(device, scaled):
    # Rows at and past num_rows (a device tensor) are neither read nor written on the Triton path: NaN garbage
    # there reaches nothing, and the live rows of a, dh and the scale gradient are bitwise the full call's.
    rows, f, live = 9, 40, 6
    torch.manual_seed(3)
    h = torch.randn(rows, 2 * f).to(torch.bfloat16).to(device)
    h[live:] = float("nan")
    da = torch.randn(rows, f).to(torch.bfloat16).to(device)
    da[live:] = float("nan")
    s = (torch.rand(rows) + 0.1).to(device) if scaled else None
    outs, tails = [], []
    for limit in (None, torch.tensor([live], device=device)):
        hg = h.clone().requires_grad_(True)
        sg = s.clone().requires_grad_(True) if scaled else None
        a = gated_act(hg, "swiglu", row_scale=sg, num_rows=limit)
        a.backward(da)
        outs.append((a[:live], hg.grad[:live], sg.grad[:live] if scaled else None))
        tails.append(sg.grad[live:] if scaled else None)
    if scaled and (device != "cpu" or os.environ.get("MOETRON_BACKEND") == "triton"):
        # the kernels skipped the dead rows: their scale gradient reads no NaN (the full call's does)
        assert torch.isnan(tails[0]).all() and not torch.isnan(tails[1]).any()
    for got, want in zip(outs[1], outs[0]):
        assert got is None or torch.equal(got, want)
    assert not torch.isnan(outs[1][0].float()).any()
    with pytest.raises(ValueError, match="num_rows must be a one-element integer tensor"):
        gated_act(h, num_rows=torch.tensor([1, 2], device=device))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "row_scale"])
def test_consume_h_writes_dh_over_h(device, scaled):
    """consume_h=True: bitwise the same output and gradients, dh in h's memory on the Triton path, and a second
    backward raises (on every path, so CPU and GPU code behave alike)."""
    torch.manual_seed(5)
    rows, f = 9, 40
    h0 = torch.randn(rows, 2 * f).to(torch.bfloat16).to(device)
    s0 = (torch.rand(rows) + 0.1).to(device)
    da = torch.randn(rows, f).to(torch.bfloat16).to(device)
    runs = []
    for consume in (False, True):
        leaf = h0.clone().requires_grad_(True)
        h = leaf * 1
        memory = h.data_ptr()
        s = s0.clone().requires_grad_(True) if scaled else None
        seen = {}
        h.register_hook(lambda g: seen.setdefault("dh", g))
        a = gated_act(h, "swiglu", row_scale=s, consume_h=consume)
        a.backward(da, retain_graph=True)
        runs.append((a, seen["dh"], leaf.grad, s.grad if scaled else None))
        triton_path = os.environ["MOETRON_BACKEND"] != "torch"
        assert (seen["dh"].data_ptr() == memory) == (consume and triton_path)
        if consume:
            with pytest.raises(RuntimeError, match="can run once"):
                a.backward(da)
    for x, y in zip(*runs):
        assert (x is None and y is None) or torch.equal(x, y)
    with pytest.raises(ValueError, match="consume_h=True needs h to be an intermediate result"):
        gated_act(h0.clone().requires_grad_(True), consume_h=True)
    with pytest.raises(TypeError, match="consume_h must be a bool"):
        gated_act(h0, consume_h="yes")
