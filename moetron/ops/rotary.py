"""Fused rotary position embedding (rotate-half, as Llama, Qwen3 and Hugging Face): one read of q or k, one write.

Legend: B batch, S sequence, N heads, D head dim (even), P table rows (positions, P >= S), h = D / 2.

    apply_rotary(x [B, S, N, D], cos [P, h] or [P, D], sin like cos) -> y [B, S, N, D]
    apply_rotary(x [B, S, N, D], cos [B or 1, P, h or D], sin like cos)   tables per batch row (transformers')
        y[..., :h] = x1 * cos[s] - x2 * sin[s]      x1 = x[..., :h], x2 = x[..., h:]
        y[..., h:] = x2 * cos[s] + x1 * sin[s]      for the token at position s (positions 0..S-1)

Tables: row s holds the h angles' cosines (sines) of position s. Either the [P, h] half tables or the [P, D]
duplicated-halves tables of the rotate-half formulation (``cat([angles, angles], -1)``, what
moetron.models.transformer builds) are accepted; of a [P, D] table only the first h columns are read, and its second
half is assumed equal to the first (not checked). Rows past S are not read, so the tables of the longest sequence
serve every shorter one. 3-D tables hold one table per batch row (position ids that differ between rows, as
transformers builds them from ``position_ids``); a leading dim of 1 serves every row.

Why a kernel: ``x * cos + cat([-x2, x1]) * sin`` on a bf16 [B, N, S, D] view with fp32 tables runs about six
elementwise kernels each way with fp32 intermediates. Here the forward reads x (and the h table columns of each
position) and writes y; the backward is the same rotation with the sine negated,
``dx1 = dy1 * cos + dy2 * sin, dx2 = dy2 * cos - dy1 * sin``, also one kernel. The maths is fp32 whatever the
storage dtype; y is returned in x's dtype.

x is [B, S, N, D] with S at dim 1, the layout straight out of the q/k projections (``q.view(B, S, N, D)``), and may
have any strides on its three leading dims (a transposed or sliced view is read in place); its last dim must have
stride 1. y is contiguous. The tables get no gradient: passing tables that require grad while autograd records is an
error.

Layout of this file: Triton kernel, launcher, autograd, public function, reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from ._launch import CachedLauncher
from ._triton_utils import cdiv, interpreter_bf16_fixups, next_power_of_2, to_output_dtype
from .._checks import FLOAT_DTYPES, check_row_major, check_same_device, check_same_dtype, check_tensor
from .._compile import eager_function

MAX_HEAD_DIM = 256
_TILE_ELEMS = 4096  # rows x half-columns per program: with D=128, 64 rows (16 KiB of bf16 in and out)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, R, S, N, HALF, stride_xb, stride_xs, stride_xn, stride_cos_b,
                   stride_cos, stride_sin_b, stride_sin, BACKWARD: tl.constexpr, BF16_FIXUPS: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows are the (b, s, n) triples in row-major order; y is contiguous [R, 2 * HALF]. BACKWARD negates the sine
    (the transpose of the rotation). The tables' batch strides are 0 for one table shared by every row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < R
    n = rows % N
    bs = rows // N
    s = bs % S
    b = bs // S
    ok = row_ok[:, None] & (cols < HALF)[None, :]
    x_off = (b * stride_xb + s * stride_xs + n * stride_xn)[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + (b * stride_cos_b + s * stride_cos)[:, None] + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + (b * stride_sin_b + s * stride_sin)[:, None] + cols[None, :], mask=ok,
                 other=0.0).to(tl.float32)
    if BACKWARD:
        sn = -sn
    y1 = x1 * c - x2 * sn
    y2 = x2 * c + x1 * sn
    y_off = (rows * (2 * HALF))[:, None] + cols[None, :]
    tl.store(y_ptr + y_off, to_output_dtype(y1, y_ptr, BF16_FIXUPS), mask=ok)
    tl.store(y_ptr + y_off + HALF, to_output_dtype(y2, y_ptr, BF16_FIXUPS), mask=ok)


_launch = CachedLauncher(_rotary_kernel)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The rotation (sine negated if ``backward``) of x [B, S, N, D] (unit last stride) by the first D/2 columns
    of the tables' first S rows, as a contiguous tensor in x's dtype."""
    B, S, N, D = x.shape
    half = D // 2
    if x.numel() == 0:
        return torch.empty(B, S, N, D, dtype=x.dtype, device=x.device)
    if not _env.use_triton(x):
        c = cos[..., :S, :half].float().unsqueeze(-2)  # [S, 1, h] or [B or 1, S, 1, h]
        s = sin[..., :S, :half].float().unsqueeze(-2)
        if backward:
            s = -s
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    y = torch.empty(B, S, N, D, dtype=x.dtype, device=x.device)
    rows = B * S * N
    block_h = next_power_of_2(half)
    block_rows = min(next_power_of_2(rows), max(1, _TILE_ELEMS // block_h))
    _launch((cdiv(rows, block_rows),),
            (x, cos, sin, y, rows, S, N, half, x.stride(0), x.stride(1), x.stride(2), _batch_stride(cos),
             cos.stride(-2), _batch_stride(sin), sin.stride(-2)),
            dict(BACKWARD=backward, BF16_FIXUPS=interpreter_bf16_fixups(y), BLOCK_ROWS=block_rows, BLOCK_H=block_h),
            num_warps=4)
    return y


def _batch_stride(table: torch.Tensor) -> int:
    """Elements between the tables of consecutive batch rows: 0 for a 2-D table or a leading dim of 1."""
    return table.stride(0) if table.ndim == 3 and table.shape[0] > 1 else 0


@eager_function
class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.shape[-1] > 1 and dy.stride(-1) != 1:  # e.g. the all-zero-stride gradient of a sum()
            dy = dy.contiguous()
        return _rotate(dy, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half layout, of ``x [B, S, N, D]`` (sequence at dim 1, any strides on the
    leading dims, unit last stride, D even and <= 256) with the tables ``cos``/``sin`` of shape ``[P, D // 2]``, or
    ``[P, D]`` with equal halves (only the first D/2 columns are read), P >= S; token s uses table row s. Tables of
    shape ``[B, P, .]`` (or ``[1, P, .]``) give each batch row its own table.
    Returns a contiguous ``[B, S, N, D]`` tensor in x's dtype, computed in fp32. Differentiable in x; the tables get
    no gradient (tables that require grad while autograd records are refused). One Triton kernel each way on CUDA
    (PyTorch on CPU tensors unless MOETRON_BACKEND=triton). See the module docstring for the formula."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    B, S, N, D = x.shape
    if D < 2 or D % 2 or D > MAX_HEAD_DIM:
        raise ValueError(f"x must be [B, S, N, D] with the head dim D even and in [2, {MAX_HEAD_DIM}], got shape "
                         f"{tuple(x.shape)}")
    check_row_major("x", x)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        check_same_device(name, t, "x", x)
        if (t.ndim not in (2, 3) or t.shape[-1] not in (D // 2, D) or t.shape[-2] < S
                or (t.ndim == 3 and t.shape[0] not in (1, B))):
            raise ValueError(f"{name} must be [P, D // 2] or [P, D], or [B or 1, P, D // 2 or D] per batch row, with "
                             f"P >= S = {S} (table rows are positions) for x of shape {tuple(x.shape)}, got shape "
                             f"{tuple(t.shape)}")
        check_row_major(name, t)
    check_same_dtype("sin", sin, "cos", cos)
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the same shape as cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin must not require grad: apply_rotary gives the tables no gradient (pass "
                         "detached tables, or compute the rotation with apply_rotary_ref)")
    return _Rotary.eager_apply(x, cos, sin)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in x's dtype, tables cast to it (the reference the tests compare against, in float64): the
    rotate-half formula ``x * cos + cat([-x2, x1]) * sin`` on [B, S, N, D]. Differentiable in x and the tables."""
    S, D = x.shape[1], x.shape[-1]
    cos, sin = cos[..., :S, :].to(x.dtype), sin[..., :S, :].to(x.dtype)
    if cos.shape[-1] != D:  # half tables: duplicate the angles
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)
