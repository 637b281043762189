"""Fused RMSNorm: one read of x, one write of y (in a dtype of the caller's choice), fp32 maths.

Legend: R rows (all leading dims of x flattened), H the normalized width, P programs of the backward.

    rms_norm(x [..., H], weight [H], eps)             -> y [..., H]   y = x * rstd * weight, in x's dtype
    rms_norm(x [..., H], weight [H], eps, out_dtype)  -> y [..., H]   the same, stored in out_dtype
    add_rms_norm(x, branch, weight, eps, out_dtype)   -> (y, x_new)   x_new = x + branch, y = rms_norm(x_new)
                                                                      rstd = 1 / sqrt(mean(x^2 over H) + eps)

Why a kernel: under bf16 autocast the residual stream is fp32 and the next layer wants its input in bf16. With
``F.rms_norm`` that is an fp32 norm (read fp32, write fp32) followed by a cast (read fp32, write bf16); here the
forward reads x once and writes y straight in out_dtype. x and weight may each be fp32, bf16 or fp16; the maths
is fp32 whatever the storage dtypes.

Forward: one program per BLOCK_R rows, each row whole in one BLOCK_H = next_power_of_2(H) block (H up to a few
thousand: 8192 is 16 fp32 values per thread at 16 warps; rows wider than 65536 take the PyTorch path). It also
stores rstd [R] in fp32 for the backward.

Backward, with x_hat = x * rstd:

    dx      = rstd * (w * dy - x_hat * mean(x_hat * w * dy over H))      fp32, stored in x's dtype
    dweight = sum over rows of dy * x_hat                                 fp32, stored in weight's dtype

dweight is deterministic (no atomics): each of the P programs owns a fixed contiguous block of rows and writes
its fp32 partial sums to a [P, H] buffer, and one ``.sum(0)`` reduces them in a fixed order. P depends only on
the row count, H and the GPU (a few programs per SM; 4 under the interpreter), so a rerun is bitwise equal.

Layout of this file: tuning constants, Triton kernels, launchers, autograd, public function, reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _env
from ._launch import CachedLauncher
from ._triton_utils import cdiv, interpreter_bf16_fixups, next_power_of_2, num_sms, to_output_dtype
from .._checks import FLOAT_DTYPES, check_row_major, check_same_device, check_shape, check_tensor, is_real
from .._compile import eager_function

# ---------------------------------------------------------------------------------------------------------------
# Tuning constants
# ---------------------------------------------------------------------------------------------------------------

# Elements (rows x BLOCK_H) one program holds per step. On a GPU a row of 4096 or more is one row per program;
# short rows (per-head q/k norms, H=128) are packed 32 to a program. Under the interpreter the tile is small so
# that tiny test shapes still span several row blocks, backward loop steps and programs.
_GPU_TILE = 4096
_INTERPRETER_TILE = 256
_MAX_BLOCK_R = 64
_INTERPRETER_PROGRAMS = 4  # backward programs under the interpreter (partial-sum rows of dweight)
# Wider rows than this run the PyTorch path (same maths, same dtypes): a whole row in registers stops making sense.
_MAX_TRITON_H = 65536

# tests/test_sm90_compile.py sets this so that CPU launches use (and record) the tile shapes a GPU would use.
_GPU_CONFIG_ON_CPU = False


def _config(h: int, gpu: bool) -> dict:
    """BLOCK_H, BLOCK_R (rows per step) and num_warps for a row width h."""
    block_h = next_power_of_2(max(h, 16))
    tile = _GPU_TILE if gpu else _INTERPRETER_TILE
    block_r = max(1, min(tile // block_h, _MAX_BLOCK_R))
    num_warps = min(16, max(1, block_r * block_h // 512)) if gpu else 1
    return dict(BLOCK_H=block_h, BLOCK_R=block_r, num_warps=num_warps)


def _backward_programs(rows: int, block_r: int, x: torch.Tensor, num_warps: int) -> tuple[int, int]:
    """(P, rows per program) for the backward: rows per program a multiple of block_r, no program left empty."""
    if x.is_cuda:
        want = num_sms(x.device.index) * (4 if num_warps <= 4 else 2)
    else:
        want = _INTERPRETER_PROGRAMS
    per_program = cdiv(cdiv(rows, want), block_r) * block_r
    return cdiv(rows, per_program), per_program


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, xo_ptr, rstd_ptr, R, H, stride_x, stride_r, stride_y, stride_xo,
                        eps, HAS_RESIDUAL: tl.constexpr, BF16_FIXUPS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """y = rmsnorm(x) * w; with HAS_RESIDUAL, x is first replaced by x + r, stored to xo in xo's dtype (the norm
    and the backward see that stored value)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < R
    col_ok = cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x_out = to_output_dtype(x, xo_ptr, BF16_FIXUPS)
        tl.store(xo_ptr + rows[:, None] * stride_xo + cols[None, :], x_out, mask=ok)
        x = x_out.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / H
    rstd = 1.0 / tl.sqrt_rn(mean_sq + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], to_output_dtype(y, y_ptr, BF16_FIXUPS), mask=ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rmsnorm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dxo_ptr, dx_ptr, dr_ptr, dw_part_ptr, R, H, rows_per_program,
                        stride_x, stride_dy, stride_dxo, stride_dx, stride_dr, HAS_DXO: tl.constexpr,
                        HAS_DR: tl.constexpr, BF16_FIXUPS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """dx = the norm's input gradient, plus (HAS_DXO) the gradient dxo that reached the norm's input from
    elsewhere (the residual stream); with HAS_DR the same sum is also stored to dr in dr's dtype."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for step in range(0, rows_per_program, BLOCK_R):  # rows_per_program is a multiple of BLOCK_R
        rows = first + step + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c = tl.sum(x_hat * wdy, axis=1) / H
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DXO:
            dx += tl.load(dxo_ptr + rows[:, None] * stride_dxo + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], to_output_dtype(dx, dx_ptr, BF16_FIXUPS),
                 mask=ok)
        if HAS_DR:
            tl.store(dr_ptr + rows[:, None] * stride_dr + cols[None, :], to_output_dtype(dx, dr_ptr, BF16_FIXUPS),
                     mask=ok)
        acc += dy * x_hat  # masked rows and columns add zeros
    tl.store(dw_part_ptr + pid.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=col_ok)


_launch_fwd = CachedLauncher(_rmsnorm_fwd_kernel)
_launch_bwd = CachedLauncher(_rmsnorm_bwd_kernel)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (x and dy are [R, H] with unit last stride, weight is [H] contiguous)
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for the storage dtypes the op takes; fp64 stays fp64 (the internal gradcheck of the torch path)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, branch=None):
    """-> (y [R, H] in out_dtype, rstd [R] fp32, x_new = x + branch in x's dtype, or None without a branch)."""
    rows, h = x.shape
    if rows == 0 or h == 0:
        return (torch.empty(rows, h, dtype=out_dtype, device=x.device),
                torch.zeros(rows, dtype=_compute_dtype(x), device=x.device),
                None if branch is None else torch.empty_like(x))
    if h > _MAX_TRITON_H or not _env.use_triton(x):
        x_new = None if branch is None else (x.to(_compute_dtype(x)) + branch.to(_compute_dtype(x))).to(x.dtype)
        y, rstd = _torch_forward(x if x_new is None else x_new, weight, eps, out_dtype)
        return y, rstd, x_new
    y = torch.empty(rows, h, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    x_new = None if branch is None else torch.empty_like(x)
    cfg = _config(h, x.is_cuda or _GPU_CONFIG_ON_CPU)
    num_warps = cfg.pop("num_warps")
    r, xo = (x, y) if branch is None else (branch, x_new)  # placeholders when there is no branch
    _launch_fwd((cdiv(rows, cfg["BLOCK_R"]),),
                (x, r, weight, y, xo, rstd, rows, h, x.stride(0), r.stride(0), y.stride(0), xo.stride(0), float(eps)),
                dict(HAS_RESIDUAL=branch is not None, BF16_FIXUPS=interpreter_bf16_fixups(y), **cfg),
                num_warps=num_warps)
    return y, rstd, x_new


def _backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dx_extra=None,
              branch_dtype=None):
    """-> (dx [R, H] in x's dtype, dweight [H] in weight's dtype, dbranch or None). ``dx_extra``: a gradient
    that reached x from elsewhere, added in fp32; ``branch_dtype``: also return that sum in this dtype."""
    rows, h = x.shape
    if rows == 0 or h == 0:
        return torch.empty_like(x), torch.zeros_like(weight), (None if branch_dtype is None else
                                                               torch.empty(rows, h, dtype=branch_dtype,
                                                                           device=x.device))
    if h > _MAX_TRITON_H or not _env.use_triton(x):
        return _torch_backward(x, weight, rstd, dy, dx_extra, branch_dtype)
    dx = torch.empty_like(x)
    dr = None if branch_dtype is None else torch.empty(rows, h, dtype=branch_dtype, device=x.device)
    cfg = _config(h, x.is_cuda or _GPU_CONFIG_ON_CPU)
    num_warps = cfg.pop("num_warps")
    programs, per_program = _backward_programs(rows, cfg["BLOCK_R"], x, num_warps)
    partial = torch.empty(programs, h, dtype=torch.float32, device=x.device)
    dxo = dx if dx_extra is None else dx_extra  # placeholders when absent
    drr = dx if dr is None else dr
    _launch_bwd((programs,), (x, weight, dy, rstd, dxo, dx, drr, partial, rows, h, per_program, x.stride(0),
                              dy.stride(0), dxo.stride(0), dx.stride(0), drr.stride(0)),
                dict(HAS_DXO=dx_extra is not None, HAS_DR=dr is not None, BF16_FIXUPS=interpreter_bf16_fixups(dx),
                     **cfg), num_warps=num_warps)
    return dx, partial.sum(0).to(weight.dtype), dr


def _torch_forward(x, weight, eps, out_dtype):
    ct = _compute_dtype(x)
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd[:, None] * weight.to(ct)).to(out_dtype), rstd


def _torch_backward(x, weight, rstd, dy, dx_extra=None, branch_dtype=None):
    ct = _compute_dtype(x)
    x_hat = x.to(ct) * rstd[:, None]
    dyf = dy.to(ct)
    wdy = weight.to(ct) * dyf
    c = (x_hat * wdy).mean(-1, keepdim=True)
    dx = rstd[:, None] * (wdy - x_hat * c)
    if dx_extra is not None:
        dx = dx + dx_extra.to(ct)
    dr = None if branch_dtype is None else dx.to(branch_dtype)
    return dx.to(x.dtype), (dyf * x_hat).sum(0).to(weight.dtype), dr


# ---------------------------------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------------------------------


@eager_function
class _RMSNorm(torch.autograd.Function):
    """x [R, H] (unit last stride), weight [H] contiguous -> y [R, H] in out_dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, rstd, _ = _forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw, _ = _backward(x, weight, rstd, _unit_stride(dy))
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None, None


@eager_function
class _AddRMSNorm(torch.autograd.Function):
    """x, branch [R, H] (unit last stride), weight [H] -> (y [R, H] in out_dtype, x_new = x + branch in x's dtype)."""

    @staticmethod
    def forward(ctx, x, branch, weight, eps, out_dtype):
        y, rstd, x_new = _forward(x, weight, eps, out_dtype, branch)
        ctx.save_for_backward(x_new, weight, rstd)
        ctx.branch_dtype = branch.dtype
        return y, x_new

    @staticmethod
    def backward(ctx, dy, dx_new):
        x_new, weight, rstd = ctx.saved_tensors
        if dy is None:  # only x_new was used: the norm adds nothing
            dy = torch.zeros_like(x_new)
        dx, dw, dbranch = _backward(x_new, weight, rstd, _unit_stride(dy),
                                    None if dx_new is None else _unit_stride(dx_new),
                                    ctx.branch_dtype if ctx.needs_input_grad[1] else None)
        return (dx if ctx.needs_input_grad[0] else None, dbranch if ctx.needs_input_grad[1] else None,
                dw if ctx.needs_input_grad[2] else None, None, None)


def _unit_stride(g: torch.Tensor) -> torch.Tensor:
    if g.shape[-1] > 1 and g.stride(-1) != 1:  # e.g. the expanded gradient of y.sum()
        return g.contiguous()
    return g.view(-1, g.shape[-1]) if g.dim() != 2 else g


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not is_real(eps) or eps <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``y = x * rsqrt(mean(x^2 over H) + eps) * weight``.

    Args:
        x: ``[..., H]`` fp32, bf16 or fp16, contiguous in its last dim (leading dims are flattened without a copy
            where their strides allow it). Any number of rows, zero included.
        weight: ``[H]`` fp32, bf16 or fp16 (independent of x's dtype), on x's device.
        eps: finite, > 0; added to the mean square.
        out_dtype: dtype of y (fp32, bf16 or fp16); default x's dtype. Under bf16 autocast, an fp32 residual
            stream can be normed straight into bf16.

    Returns:
        y ``[..., H]`` in out_dtype, contiguous. All maths is fp32. Differentiable in x (dx in x's dtype) and
        weight (dweight in weight's dtype, deterministic). One Triton kernel each way on CUDA (PyTorch on CPU
        tensors unless MOETRON_BACKEND=triton).
    """
    out_dtype = _check_norm_args(x, weight, eps, out_dtype)
    lead, h = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), h)  # a view unless the leading dims cannot be merged
    y = _RMSNorm.eager_apply(x2, weight.contiguous(), float(eps), out_dtype)
    return y.view(*lead, h)


def add_rms_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add fused with the RMSNorm after it: ``x_new = x + branch``, ``y = rms_norm(x_new)``.

    Args:
        x: ``[..., H]`` the residual stream (fp32 under bf16 autocast), contiguous in its last dim.
        branch: what the block adds to it, x's shape, any of fp32 / bf16 / fp16 (a bf16 attention or MLP output).
        weight, eps, out_dtype: as for ``rms_norm``.

    Returns:
        ``(y, x_new)``: y ``[..., H]`` in out_dtype; x_new ``[..., H]`` in x's dtype (the sum in fp32, rounded once;
        the norm reads the rounded value). Differentiable in x, branch and weight: the backward adds the gradient
        reaching x_new from later in the stream to the norm's, and writes that sum once in x's dtype and once in
        branch's, which is what the unfused add's backward would produce with an extra cast.
    """
    out_dtype = _check_norm_args(x, weight, eps, out_dtype)
    check_tensor("branch", branch, dtypes=FLOAT_DTYPES)
    check_shape("branch", branch, tuple(x.shape), "the shape of x")
    check_same_device("branch", branch, "x", x)
    check_row_major("branch", branch)
    lead, h = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    y, x_new = _AddRMSNorm.eager_apply(x.reshape(rows, h), branch.reshape(rows, h), weight.contiguous(), float(eps),
                                       out_dtype)
    return y.view(*lead, h), x_new.view(*lead, h)


def _check_norm_args(x, weight, eps, out_dtype) -> torch.dtype:
    """Validates rms_norm's arguments; returns the output dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension ([..., H]), got a 0-D tensor")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    check_shape("weight", weight, (x.shape[-1],), "the last dim of x")
    check_same_device("weight", weight, "x", x)
    _check_eps(eps)
    if out_dtype is None:
        out_dtype = x.dtype
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of torch.float16, torch.bfloat16, torch.float32 or None, got "
                        f"{out_dtype!r}")
    check_row_major("x", x)
    return out_dtype


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """Plain PyTorch in x's dtype (weight cast to it), then cast to out_dtype; the tests compare against it in
    float64."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return y.to(out_dtype or x.dtype)
