"""Fused RMSNorm against a float64 PyTorch reference (DESIGN.md tolerance rule), forward, dx and dweight, on the
torch path and on the Triton kernels (the interpreter on CPU, CUDA on a GPU); deterministic dweight; argument
errors; a float64 gradcheck of the hand-written backward through the torch path."""

import math

import pytest
import torch

from moetron.ops import rmsnorm as rn
from moetron.ops.rmsnorm import rms_norm, rms_norm_ref
from tests._tolerance import assert_close_to_ref

ON_GPU = torch.cuda.is_available()
EPS = 1e-6
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / torch.empty_like hand out NaN-filled float memory, so an element a kernel never writes
    shows up as NaN (assert_close_to_ref fails on NaN)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def _inputs(rows, h, x_dtype, w_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + rows * 7 + h)
    scale = torch.exp(torch.randn(rows, 1, generator=g))  # rows of different RMS: rstd is per row
    x = (torch.randn(rows, h, generator=g) * 2 * scale).to(x_dtype).to(device)
    w = (1 + 0.5 * torch.randn(h, generator=g)).to(w_dtype).to(device)
    return x, w


def _check(x, w, out_dtype, dy_seed=1, lead=None):
    """Run rms_norm, its float64 reference and the same-dtype baseline on x (reshaped to lead + [H] when given);
    compare y, dx and dweight with the tolerance rule."""
    h = x.shape[-1]
    shape = tuple(lead or x.shape[:-1]) + (h,)
    want = out_dtype or x.dtype
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(dy_seed)).to(want).to(x.device)
    xg, wg = x.clone().reshape(shape).requires_grad_(True), w.clone().requires_grad_(True)
    y = rms_norm(xg, wg, EPS, out_dtype)
    y.backward(dy)
    x64 = x.double().cpu().reshape(shape).requires_grad_(True)
    w64 = w.double().cpu().requires_grad_(True)
    ref = rms_norm_ref(x64, w64, EPS)
    ref.backward(dy.double().cpu())
    xb, wb = x.clone().reshape(shape).requires_grad_(True), w.clone().requires_grad_(True)
    base = rms_norm_ref(xb, wb, EPS, out_dtype)
    base.backward(dy)
    assert y.dtype == want and y.shape == shape and y.is_contiguous()
    assert xg.grad.dtype == x.dtype and wg.grad.dtype == w.dtype
    assert_close_to_ref("y", y, ref, base)
    assert_close_to_ref("dx", xg.grad, x64.grad, xb.grad)
    assert_close_to_ref("dweight", wg.grad, w64.grad, wb.grad)
    return y, xg.grad, wg.grad


_DTYPES = [(xd, wd, od) for xd in (FP32, BF16, FP16) for wd in (FP32, BF16) for od in (None, BF16)]
_SHAPES = [(rows, h) for rows in (0, 1, 7, 33) for h in (16, 48, 100)]
# every dtype combination on two shapes (33 rows: several backward programs and loop steps; H=100 is not a power
# of two), every shape on the combinations the model uses (fp32 throughout; fp32 residual -> bf16; bf16 throughout)
_CASES = ([(33, 100, *d) for d in _DTYPES] + [(7, 48, *d) for d in _DTYPES]
          + [(r, h, *d) for r, h in _SHAPES for d in ((FP32, FP32, None), (FP32, FP32, BF16), (BF16, BF16, None))
             if (r, h) not in ((33, 100), (7, 48))])


def _case_id(case):
    rows, h, xd, wd, od = case
    name = lambda d: str(d).replace("torch.", "") if d else "same"  # noqa: E731
    return f"{rows}x{h}-x_{name(xd)}-w_{name(wd)}-out_{name(od)}"


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_forward_backward(device, poisoned_empty, case):
    rows, h, x_dtype, w_dtype, out_dtype = case
    x, w = _inputs(rows, h, x_dtype, w_dtype, device)
    y, dx, dw = _check(x, w, out_dtype)
    if rows == 0:
        assert y.numel() == 0 and dx.numel() == 0 and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("lead", [(3, 11), (2, 1, 4)], ids=str)
def test_leading_dims(device, lead):
    rows = math.prod(lead)
    x, w = _inputs(rows, 48, BF16, FP32, device)
    _check(x, w, None, lead=lead)


def test_strided_leading_dims_and_expanded_grad(device):
    # leading dims that cannot be merged into one (reshape copies), and the stride-0 gradient of y.sum()
    x, w = _inputs(24, 48, FP32, BF16, device)
    xs = x.reshape(4, 6, 48)[:, ::2].requires_grad_(True)
    xs.retain_grad()
    wg = w.clone().requires_grad_(True)
    y = rms_norm(xs, wg, EPS, BF16)
    y.sum().backward()
    x64 = xs.detach().double().cpu().requires_grad_(True)
    w64 = w.double().cpu().requires_grad_(True)
    ref = rms_norm_ref(x64, w64, EPS)
    ref.sum().backward()
    xb, wb = xs.detach().clone().requires_grad_(True), w.clone().requires_grad_(True)
    base = rms_norm_ref(xb, wb, EPS, BF16)
    base.sum().backward()
    assert y.shape == (4, 3, 48)
    assert_close_to_ref("y", y, ref, base)
    assert_close_to_ref("dx", xs.grad, x64.grad, xb.grad)
    assert_close_to_ref("dweight", wg.grad, w64.grad, wb.grad)


def test_wide_rows_take_the_torch_path(device, monkeypatch):
    monkeypatch.setattr(rn, "_MAX_TRITON_H", 32)
    x, w = _inputs(7, 48, BF16, FP32, device)
    _check(x, w, None)


def test_zero_row(device):
    # an all-zero row: y is exactly zero, dx = rstd * w * dy with rstd = 1/sqrt(eps)
    x, w = _inputs(5, 16, BF16, FP32, device)
    x[2] = 0
    xg = x.clone().requires_grad_(True)
    y = rms_norm(xg, w, EPS)
    dy = torch.ones_like(y)
    y.backward(dy)
    assert torch.equal(y[2].float().cpu(), torch.zeros(16))
    expect = (w.double().cpu() / math.sqrt(EPS)).to(BF16)
    torch.testing.assert_close(xg.grad[2].cpu(), expect, rtol=1e-2, atol=0)


def test_dweight_deterministic(device):
    x, w = _inputs(33, 100, BF16, FP32, device, seed=3)
    dy = torch.randn(33, 100, generator=torch.Generator().manual_seed(5)).to(BF16).to(device)
    grads = []
    for _ in range(2):
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rms_norm(xg, wg, EPS).backward(dy)
        grads.append((xg.grad, wg.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1].view(torch.int32), grads[1][1].view(torch.int32))  # bitwise


def test_backward_programs_cover_rows():
    # the partial-sum programs own disjoint, contiguous row blocks, a multiple of BLOCK_R each, none empty
    x = torch.empty(1, 1)
    for rows in (1, 3, 4, 5, 33, 1000):
        for block_r in (1, 2, 4, 16):
            programs, per = rn._backward_programs(rows, block_r, x, num_warps=1)
            assert per % block_r == 0 and programs * per >= rows and (programs - 1) * per < rows
            assert programs <= rn._INTERPRETER_PROGRAMS


def test_gradcheck_float64_torch_path(monkeypatch):
    # the hand-written backward formula (the kernel's) against finite differences, in float64 through the torch
    # path of the autograd function (the public function takes fp32/bf16/fp16 only)
    monkeypatch.setenv("MOETRON_BACKEND", "torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.5 * torch.randn(12, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rn._RMSNorm.apply(a, b, 1e-3, torch.float64), (x, w))


def test_bad_input():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(1, 8), EPS)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(torch.ones(3, 8, dtype=torch.int32), w, EPS)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.double(), w, EPS)
    with pytest.raises(TypeError, match="weight must have dtype"):
        rms_norm(x, w.double(), EPS)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rms_norm(x, [1.0] * 8, EPS)
    with pytest.raises(TypeError, match="out_dtype"):
        rms_norm(x, w, EPS, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        rms_norm(x, w, EPS, out_dtype=torch.float64)
    for eps in (0.0, -1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            rms_norm(x, w, eps)
    for eps in ("1e-6", None, True):
        with pytest.raises(TypeError, match="eps"):
            rms_norm(x, w, eps)
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        rms_norm(torch.randn(8, 3).t(), w, EPS)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        rms_norm(torch.tensor(1.0), torch.ones(()), EPS)
    with pytest.raises(ValueError, match="weight must be on a CPU or CUDA device"):
        rms_norm(x, torch.ones(8, device="meta"), EPS)
    if ON_GPU:
        with pytest.raises(ValueError, match="weight must be on the same device as x"):
            rms_norm(x, w.cuda(), EPS)
    assert rms_norm(torch.randn(0, 2, 8), w, EPS).shape == (0, 2, 8)
    assert rms_norm(torch.randn(8), w, 1).shape == (8,)  # 1-D x, an int eps


# ---------------------------------------------------------------------------------------------------------
# add_rms_norm: the residual add fused with the norm after it
# ---------------------------------------------------------------------------------------------------------

# (x dtype, branch dtype, out dtype): the model's fp32 residual + bf16 block output -> bf16; all bf16; all fp32
_ADD_CASES = [(FP32, BF16, BF16), (BF16, BF16, None), (FP32, FP32, None)]


def _add_ref(x, branch, w, out_dtype):
    x_new = (x.double() + branch.double()).to(x.dtype)  # the sum is rounded once to x's dtype
    return rms_norm_ref(x_new.double(), w.double(), EPS).to(out_dtype or x.dtype), x_new


@pytest.mark.parametrize("rows,h", [(33, 100), (7, 48), (0, 16)], ids=str)
@pytest.mark.parametrize("dtypes", _ADD_CASES, ids=lambda d: "-".join(str(t).replace("torch.", "") for t in d))
@pytest.mark.parametrize("use_x_new", [True, False], ids=["x_new_used", "x_new_unused"])
def test_add_rms_norm_matches_reference(device, poisoned_empty, rows, h, dtypes, use_x_new):
    x_dtype, b_dtype, out_dtype = dtypes
    x, w = _inputs(rows, h, x_dtype, FP32, device)
    branch = _inputs(rows, h, b_dtype, FP32, device, seed=3)[0]
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(rows, h, generator=g).to(out_dtype or x_dtype).to(device)
    dxn = torch.randn(rows, h, generator=g).to(x_dtype).to(device)

    def run(fn, xx, bb, ww):
        y, x_new = fn(xx, bb, ww)
        loss = (y.double() * dy.double().to(y.device)).sum()
        if use_x_new:
            loss = loss + (x_new.double() * dxn.double().to(x_new.device)).sum()
        loss.backward()
        return y, x_new

    leaves = lambda *ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    xg, bg, wg = leaves(x, branch, w)
    y, x_new = run(lambda a, b, c: rn.add_rms_norm(a, b, c, EPS, out_dtype), xg, bg, wg)
    x64, b64, w64 = leaves(x.double().cpu(), branch.double().cpu(), w.double().cpu())
    ref = run(lambda a, b, c: (rms_norm_ref(a + b, c, EPS), a + b), x64, b64, w64)
    xb, bb, wb = leaves(x, branch, w)
    base = run(lambda a, b, c: (rms_norm_ref((a + b).to(x_dtype), c, EPS, out_dtype), (a + b).to(x_dtype)),
               xb, bb, wb)
    assert y.dtype == (out_dtype or x_dtype) and x_new.dtype == x_dtype
    assert xg.grad.dtype == x_dtype and bg.grad.dtype == b_dtype
    assert_close_to_ref("y", y, ref[0], base[0])
    assert_close_to_ref("x_new", x_new, ref[1], base[1])
    assert_close_to_ref("dx", xg.grad, x64.grad, xb.grad)
    assert_close_to_ref("dbranch", bg.grad, b64.grad, bb.grad)
    assert_close_to_ref("dweight", wg.grad, w64.grad, wb.grad)


def test_add_rms_norm_bad_input():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="branch must have shape"):
        rn.add_rms_norm(x, torch.randn(3, 7), w, EPS)
    with pytest.raises(TypeError, match="branch must have dtype"):
        rn.add_rms_norm(x, torch.ones(3, 8, dtype=torch.int32), w, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        rn.add_rms_norm(x, x, torch.ones(7), EPS)
