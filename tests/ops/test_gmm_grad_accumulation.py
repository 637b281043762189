"""gmm's backward adds a weight gradient into an existing ``w.grad`` in place (gradient accumulation), only where
autograd could not tell the difference (moetron/ops/gmm.py, ``_grad_to_add_into``).

Values are checked against a float64 reference of the summed gradients (DESIGN.md tolerance rule, the baseline
being autograd's own accumulation in the same dtype); which path ran is read from a spy on the weight-gradient
launcher, since both paths leave the sum in the same memory."""

import importlib

import pytest
import torch

import moetron
from tests._tolerance import assert_close_to_ref

gmm_module = importlib.import_module("moetron.ops.gmm")

SIZES = [5, 0, 12, 3]  # an empty group, sizes not multiples of 16
M, K, N = 22, 18, 20


@pytest.fixture
def spy(monkeypatch):
    """Records (accumulate, data_ptr of out) of every weight-gradient launch."""
    calls = []
    real = gmm_module._run_gmm_k

    def run(a, b, groups, out, accumulate):
        calls.append((accumulate, out.data_ptr()))
        return real(a, b, groups, out, accumulate)

    monkeypatch.setattr(gmm_module, "_run_gmm_k", run)
    return calls


def _inputs(device, dtype, trans_w=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype).to(device)
    w_shape = (len(SIZES), N, K) if trans_w else (len(SIZES), K, N)
    w = (torch.randn(*w_shape, generator=gen) / K ** 0.5).to(dtype).to(device).requires_grad_(True)
    dys = [torch.randn(M, N, generator=gen).to(dtype).to(device) for _ in range(3)]
    return x, w, dys


def _ref_grad(x, dys, trans_w):
    """float64 sum over the dys of each group's x^T dy (transposed for a [G, N, K] weight)."""
    out = torch.zeros(len(SIZES), K, N, dtype=torch.float64)
    for dy in dys:
        start = 0
        for g, count in enumerate(SIZES):
            out[g] += x[start:start + count].double().cpu().t() @ dy[start:start + count].double().cpu()
            start += count
    return out.transpose(1, 2) if trans_w else out


def _backward_each(x, w, dys, trans_w, **backward_kw):
    for dy in dys:
        moetron.gmm(x, w, torch.tensor(SIZES), trans_w=trans_w).backward(dy, **backward_kw)


@pytest.mark.parametrize("trans_w", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_later_backwards_add_into_the_stored_gradient(device, dtype, trans_w, spy, monkeypatch):
    x, w, dys = _inputs(device, dtype, trans_w)
    _backward_each(x, w, dys, trans_w)
    first_ptr = spy[0][1]
    # the first backward writes a new gradient; the next two add into it, in the same memory
    assert [acc for acc, _ in spy] == [False, True, True]
    assert all(ptr == first_ptr for _, ptr in spy) and w.grad.data_ptr() == first_ptr
    # baseline: autograd's own accumulation (switched off here) in the same dtype
    monkeypatch.setenv("MOETRON_FUSE_GRAD_ACCUMULATION", "0")
    w_base = w.detach().clone().requires_grad_(True)
    _backward_each(x, w_base, dys, trans_w)
    assert [acc for acc, _ in spy[3:]] == [False, False, False]
    assert_close_to_ref("accumulated w.grad", w.grad, _ref_grad(x, dys, trans_w), w_base.grad)


def test_backward_that_skips_the_weight_leaves_its_gradient_alone(device, spy):
    x, w, dys = _inputs(device, torch.float32)
    x.requires_grad_(True)
    _backward_each(x, w, dys[:1], False)
    before = w.grad.clone()
    moetron.gmm(x, w, torch.tensor(SIZES)).backward(dys[1], inputs=[x])
    assert torch.equal(w.grad, before)
    # torch.autograd.grad returns the new gradient alone and never touches w.grad
    (dw,) = torch.autograd.grad(moetron.gmm(x, w, torch.tensor(SIZES)), [w], dys[2])
    assert torch.equal(w.grad, before)
    assert_close_to_ref("autograd.grad dw", dw, _ref_grad(x, dys[2:], False), dw)
    assert not any(acc for acc, _ in spy)


def test_tensor_hooks_see_each_new_gradient(device, spy):
    """A hook on w transforms the new gradient before autograd sums it: that path stays autograd's."""
    x, w, dys = _inputs(device, torch.float32)
    w.register_hook(lambda grad: grad * 2)
    _backward_each(x, w, dys[:2], False)
    assert not any(acc for acc, _ in spy)
    ref = _ref_grad(x, dys[:2], False) * 2
    assert_close_to_ref("hooked w.grad", w.grad, ref, w.grad.detach().clone())


def test_post_accumulate_hooks_see_the_sum(device, spy):
    x, w, dys = _inputs(device, torch.float32)
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.detach().clone()))
    _backward_each(x, w, dys[:2], False)
    assert [acc for acc, _ in spy] == [False, True]
    assert len(seen) == 2 and torch.equal(seen[-1], w.grad)


def test_a_view_gradient_keeps_autograd_accumulation(device, spy):
    """A gradient that is a view (a DDP bucket with gradient_as_bucket_view) must stay that view."""
    x, w, dys = _inputs(device, torch.float32)
    bucket = torch.zeros(w.numel() + 7, device=device)
    w.grad = bucket[7:].view(w.shape)
    _backward_each(x, w, dys[:2], False)
    assert not any(acc for acc, _ in spy)
    assert w.grad._is_view() and w.grad.data_ptr() == bucket[7:].data_ptr()
    assert_close_to_ref("bucket view w.grad", w.grad, _ref_grad(x, dys[:2], False), w.grad.detach().clone())


def test_weight_used_twice_in_one_graph(device, spy):
    x, w, dys = _inputs(device, torch.float32)
    x2 = x.flip(0).contiguous()
    for dy in dys[:2]:
        (moetron.gmm(x, w, torch.tensor(SIZES)) + moetron.gmm(x2, w, torch.tensor(SIZES))).backward(dy)
    # the second backward: one node adds into w.grad, the other (which then finds w.grad unset) writes its own
    assert sorted(acc for acc, _ in spy[2:]) == [False, True]
    ref = _ref_grad(x, dys[:2], False) + _ref_grad(x2, dys[:2], False)
    assert_close_to_ref("w.grad of two uses", w.grad, ref, w.grad.detach().clone())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_keeps_autograd_accumulation(device, spy):
    x, w, dys = _inputs(device, torch.float32)
    _backward_each(x, w, dys[:1], False)
    moetron.gmm(x, w, torch.tensor(SIZES)).backward(dys[1], create_graph=True)
    assert [acc for acc, _ in spy] == [False, False]
    assert_close_to_ref("w.grad", w.grad, _ref_grad(x, dys[:2], False), w.grad.detach().clone())
    w.grad = None  # create_graph ties the gradient to its parameter in a reference cycle
