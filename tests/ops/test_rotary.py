"""Fused rotary embedding against a float64 PyTorch reference (the tests/_tolerance.py rule), forward and backward,
on the torch path and on the Triton kernel (the interpreter on CPU, CUDA on a GPU)."""

import pytest
import torch

from moetron.ops.rotary import apply_rotary, apply_rotary_ref
from tests._tolerance import assert_close_to_ref

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(positions: int, d: int, full: bool, device="cpu"):
    """fp32 rotate-half tables as the model builds them: [P, D] with duplicated halves, or the [P, D/2] halves."""
    half = d // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    if full:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _old_apply_rotary(x_BNSD, cos_SD, sin_SD):
    """moetron.models.transformer's rotary before the fused op."""
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BNSD * cos_SD + rotated * sin_SD).to(x_BNSD.dtype)


def _check(x, cos, sin, dy):
    """apply_rotary's output and dx against float64, with the same-dtype PyTorch formula as the baseline."""
    xg = x.detach().clone().requires_grad_(True)
    y = apply_rotary(xg, cos, sin)
    y.backward(dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = apply_rotary_ref(x64, cos.double().cpu(), sin.double().cpu())
    ref.backward(dy.double().cpu())
    xb = x.detach().clone().requires_grad_(True)
    base = apply_rotary_ref(xb, cos, sin)
    base.backward(dy)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert_close_to_ref("y", y, ref, base)
    assert_close_to_ref("dx", xg.grad, x64.grad, xb.grad)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,N,D", [(1, 1, 1, 2), (2, 5, 3, 8), (2, 5, 1, 24), (1, 5, 3, 24), (2, 1, 3, 8)],
                         ids=lambda v: str(v))
def test_forward_backward(device, dtype, B, S, N, D):
    torch.manual_seed(B * 100 + S * 10 + N + D)
    x = (torch.randn(B, S, N, D) * 3).to(dtype).to(device)
    dy = torch.randn(B, S, N, D).to(dtype).to(device)
    full = (S + N) % 2 == 0  # both table layouts across the cases
    cos, sin = _tables(S + 3, D, full, device)  # more table rows than positions
    _check(x, cos, sin, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full", [True, False], ids=["full", "half"])
def test_tables_per_batch_row(device, dtype, full):
    """[B, P, .] tables (transformers' cos/sin from position_ids): each batch row its own positions; [1, P, .]
    serves every row like a 2-D table."""
    torch.manual_seed(2)
    B, S, N, D = 3, 5, 2, 8
    x = (torch.randn(B, S, N, D) * 2).to(dtype).to(device)
    dy = torch.randn(B, S, N, D).to(dtype).to(device)
    cos, sin = _tables(16, D, full, device)
    starts = (0, 7, 3)  # packed or left-padded rows start at other positions
    cos_b = torch.stack([cos[s0:s0 + S + 2] for s0 in starts])
    sin_b = torch.stack([sin[s0:s0 + S + 2] for s0 in starts])
    y = _check(x, cos_b, sin_b, dy)
    for b, s0 in enumerate(starts):  # row b rotated by its own positions
        torch.testing.assert_close(y[b:b + 1], apply_rotary(x[b:b + 1], cos[s0:], sin[s0:]), rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(x, cos[None], sin[None]), apply_rotary(x, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_input_and_table_layouts(device, dtype):
    # x as a [B, S, N, D] view of a [B, N, S, D] tensor (and a head slice of it): read in place through the strides
    torch.manual_seed(1)
    B, S, N, D = 2, 5, 3, 24
    base = (torch.randn(B, N + 1, S, D) * 2).to(dtype).to(device)
    x = base[:, 1:].transpose(1, 2)
    assert not x.is_contiguous() and x.stride(-1) == 1
    dy = torch.randn(B, S, N, D).to(dtype).to(device)
    cos_full, sin_full = _tables(9, D, True, device)
    y_full = _check(x, cos_full, sin_full, dy)
    cos_half, sin_half = _tables(9, D, False, device)
    y_half = _check(x, cos_half, sin_half, dy)
    assert torch.equal(y_full, y_half)  # only the first D/2 columns of the [P, D] tables are read
    # a non-contiguous incoming gradient (zero strides: the gradient of a sum)
    xg = x.detach().clone().requires_grad_(True)
    apply_rotary(xg, cos_half, sin_half).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_(True)
    apply_rotary_ref(x64, cos_half.double().cpu(), sin_half.double().cpu()).sum().backward()
    xb = x.detach().clone().requires_grad_(True)
    apply_rotary_ref(xb, cos_half, sin_half).sum().backward()
    assert_close_to_ref("dx(sum)", xg.grad, x64.grad, xb.grad)


def test_matches_old_model_rotary(device):
    torch.manual_seed(2)
    B, S, N, D = 2, 5, 3, 24
    x = torch.randn(B, S, N, D, device=device)
    cos, sin = _tables(8, D, True, device)
    old = _old_apply_rotary(x.transpose(1, 2), cos[:S], sin[:S]).transpose(1, 2)
    x64 = x.double().cpu()
    ref = apply_rotary_ref(x64, cos.double().cpu(), sin.double().cpu())
    new = apply_rotary(x, cos, sin)
    assert_close_to_ref("y", new, ref, old)
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)


def test_empty(device):
    cos, sin = _tables(4, 8, False, device)
    for shape in [(0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = apply_rotary(x, cos, sin)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape


def test_bad_input():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = _tables(6, 8, False)
    with pytest.raises(ValueError, match="x must be .*head dim D even"):
        apply_rotary(torch.randn(2, 5, 3, 7), *_tables(6, 14, False))
    with pytest.raises(ValueError, match="x must be .*head dim D even"):
        apply_rotary(torch.randn(1, 1, 1, 258), *_tables(1, 258, False))
    with pytest.raises(ValueError, match="x must be 4-D"):
        apply_rotary(torch.randn(5, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="cos must be \\[P, D // 2\\]"):
        apply_rotary(x, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="cos must be \\[P, D // 2\\].*P >= S = 5"):
        apply_rotary(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="sin must be .*per batch row"):
        apply_rotary(x, cos, sin[None, None])
    with pytest.raises(ValueError, match="cos must be .*per batch row"):
        apply_rotary(x, cos.expand(3, -1, -1), sin.expand(3, -1, -1))  # x has 2 batch rows
    with pytest.raises(ValueError, match="sin must have the same shape"):
        apply_rotary(x, cos, sin[:5])
    with pytest.raises(TypeError, match="sin must have the same dtype"):
        apply_rotary(x, cos, sin.half())
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        apply_rotary(torch.randn(2, 5, 3, 16)[..., ::2], cos, sin)
    with pytest.raises(ValueError, match="cos must be contiguous in its last dimension"):
        apply_rotary(x, torch.randn(6, 8)[:, ::2], sin)
    with pytest.raises(TypeError, match="x must have dtype"):
        apply_rotary(torch.ones(2, 5, 3, 8, dtype=torch.int32), cos, sin)
    with pytest.raises(TypeError, match="cos must have dtype"):
        apply_rotary(x, cos.to(torch.int32), sin)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        apply_rotary(x.tolist(), cos, sin)
    with pytest.raises(ValueError, match="cos and sin must not require grad"):
        apply_rotary(x, cos.requires_grad_(True), sin)
    with torch.no_grad():  # nothing records: tables that require grad are fine
        apply_rotary(x, cos, sin)
    cos.requires_grad_(False)
    with pytest.raises(ValueError, match="cos must be on a CPU or CUDA device"):  # no second device on CPU
        apply_rotary(x, cos.to("meta"), sin)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_device_mismatch_cuda():
    cos, sin = _tables(6, 8, False, "cuda")
    with pytest.raises(ValueError, match="cos must be on the same device as x"):
        apply_rotary(torch.randn(2, 5, 3, 8), cos, sin)
