"""Fused gated activation (SwiGLU / GeGLU) for the experts: one read of the first projection's output, one write.

Legend: R rows (routed rows of the permuted buffer), F expert ffn width.

    gated_act(h [R, 2F], "swiglu") -> a [R, F]      a = silu(h[:, :F]) * h[:, F:]
    gated_act(h [R, 2F], "geglu")  -> a [R, F]      a = gelu_tanh(h[:, :F]) * h[:, F:]
    gated_act(h, act, row_scale [R]) -> a · row_scale[:, None]   (the routing weights, before the second GEMM)

Why a kernel: in PyTorch the gate and up halves are strided views of h, so the activation, its backward and
the ``cat`` that reassembles the gradient run as four non-vectorised elementwise kernels. On the H100 they took
0.75 ms of a 6.1 ms Qwen3-30B layer step at T=8192 (benchmarks/NOTES.md). Here the forward reads 2F and writes
F per row; the backward reads h and da and writes dh [R, 2F] in place of the cat. The maths is fp32 whatever the
storage dtype. Rows of zeros stay zeros (the zero tail of a grouped GEMM buffer stays zero).

Layout of this file: Triton kernels, launchers, autograd, public function, reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _env
from ._launch import CachedLauncher
from ._triton_utils import cdiv, interpreter_bf16_fixups, next_power_of_2, to_output_dtype
from .._checks import FLOAT_DTYPES, check_consumable, check_row_major, check_single_backward, check_tensor
from .._compile import compiling, eager_function, or_empty

GATED_ACTIVATIONS = ("swiglu", "geglu")
_MAX_BLOCK_F = 1024  # columns per program; F=768 (Qwen3) is one block per row
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gate_and_slope(g, GELU: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if GELU:  # tanh approximation, as F.gelu(approximate="tanh")
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        act = g * s
        slope = s * (1.0 + g * (1.0 - s))
    return act, slope


@triton.jit
def _row_limit(limit_ptr, HAS_LIMIT: tl.constexpr):
    """Rows at and past this one are neither read nor written: limit[0] with HAS_LIMIT, else no limit."""
    if HAS_LIMIT:
        limit = tl.load(limit_ptr).to(tl.int64)
    else:
        limit = tl.full((), 1 << 62, tl.int64)
    return limit


@triton.jit
def _gated_fwd_kernel(h_ptr, s_ptr, a_ptr, limit_ptr, F_, stride_h, stride_a, GELU: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_LIMIT: tl.constexpr, BF16_FIXUPS: tl.constexpr,
                      BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    # a row past the limit loads and stores nothing (its scale is in bounds and harmless to read)
    ok = (cols < F_) & ((cols * 0 + row) < _row_limit(limit_ptr, HAS_LIMIT))
    g = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * stride_h + F_ + cols, mask=ok, other=0.0).to(tl.float32)
    act, _ = _gate_and_slope(g, GELU)
    out = act * u
    if HAS_SCALE:
        out = out * tl.load(s_ptr + row).to(tl.float32)
    tl.store(a_ptr + row * stride_a + cols, to_output_dtype(out, a_ptr, BF16_FIXUPS), mask=ok)


@triton.jit
def _gated_bwd_kernel(h_ptr, da_ptr, s_ptr, dh_ptr, ds_ptr, limit_ptr, F_, stride_h, stride_da, stride_dh,
                      num_blocks, GELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LIMIT: tl.constexpr,
                      BF16_FIXUPS: tl.constexpr, BLOCK_F: tl.constexpr):
    """dh = d(act(g)·u·s); with a row scale s also this block's share of ds = sum_f da·act(g)·u, stored at
    ds[row, block] (summed over blocks afterwards: no atomics)."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK_F + tl.arange(0, BLOCK_F)
    # a row past the limit loads and stores nothing (its scale is in bounds and harmless to read)
    ok = (cols < F_) & ((cols * 0 + row) < _row_limit(limit_ptr, HAS_LIMIT))
    g = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + row * stride_h + F_ + cols, mask=ok, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + row * stride_da + cols, mask=ok, other=0.0).to(tl.float32)
    act, slope = _gate_and_slope(g, GELU)
    if HAS_SCALE:
        tl.store(ds_ptr + row * num_blocks + block, tl.sum(da * act * u, axis=0))
        da = da * tl.load(s_ptr + row).to(tl.float32)
    tl.store(dh_ptr + row * stride_dh + cols, to_output_dtype(da * u * slope, dh_ptr, BF16_FIXUPS), mask=ok)
    tl.store(dh_ptr + row * stride_dh + F_ + cols, to_output_dtype(da * act, dh_ptr, BF16_FIXUPS), mask=ok)


_launch_fwd = CachedLauncher(_gated_fwd_kernel)
_launch_bwd = CachedLauncher(_gated_bwd_kernel)


def _grid(rows: int, f: int):
    block = min(next_power_of_2(max(f, 16)), _MAX_BLOCK_F)
    return (rows, cdiv(f, block)), block


def _forward(h: torch.Tensor, scale: torch.Tensor | None, activation: str, limit=None) -> torch.Tensor:
    rows, f = h.shape[0], h.shape[1] // 2
    if rows == 0 or f == 0:
        return h.new_empty(rows, f)
    if not _env.use_triton(h):
        return _torch_gated(h.float(), activation, scale).to(h.dtype)
    a = torch.empty(rows, f, dtype=h.dtype, device=h.device)
    grid, block = _grid(rows, f)
    _launch_fwd(grid, (h, h if scale is None else scale, a, h if limit is None else limit, f, h.stride(0),
                       a.stride(0)),
                dict(GELU=activation == "geglu", HAS_SCALE=scale is not None, HAS_LIMIT=limit is not None,
                     BF16_FIXUPS=interpreter_bf16_fixups(h), BLOCK_F=block), num_warps=4)
    return a


def _backward(h, scale, da, activation: str, need_scale_grad: bool, limit=None, into_h: bool = False):
    """(dh [R, 2F], dscale [R] or None). ``into_h``: the kernel writes dh over h (each element is read before it
    is written, by the same program), so no second [R, 2F] buffer is allocated; the torch path ignores it."""
    rows, f = h.shape[0], h.shape[1] // 2
    if rows == 0 or f == 0:
        return torch.zeros_like(h), None if scale is None else torch.zeros_like(scale)
    if not _env.use_triton(h):
        # the kernel's formulas in torch ops (not autograd.grad, which does not record inside a custom op)
        gate, up = h.float().chunk(2, dim=-1)
        act, slope = _torch_gate_and_slope(gate, activation)
        da = da.float()
        dscale = (da * act * up).sum(dim=1).to(scale.dtype) if need_scale_grad else None
        if scale is not None:
            da = da * scale.float()[:, None]
        return torch.cat([da * up * slope, da * act], dim=1).to(h.dtype), dscale
    dh = h if into_h else torch.empty_like(h)
    grid, block = _grid(rows, f)
    ds = torch.empty(rows, grid[1], dtype=torch.float32, device=h.device) if scale is not None else None
    _launch_bwd(grid, (h, da, h if scale is None else scale, dh, dh if ds is None else ds,
                       h if limit is None else limit, f, h.stride(0), da.stride(0), dh.stride(0), grid[1]),
                dict(GELU=activation == "geglu", HAS_SCALE=scale is not None, HAS_LIMIT=limit is not None,
                     BF16_FIXUPS=interpreter_bf16_fixups(dh), BLOCK_F=block), num_warps=4)
    if not need_scale_grad:
        return dh, None
    return dh, (ds[:, 0] if grid[1] == 1 else ds.sum(1)).to(scale.dtype)


@eager_function
class _GatedAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, scale, activation, limit, consume_h, computed=None):
        """``computed``: the activation already computed from h (by the fused first GEMM, ops/gated_gmm.py), which
        this node then returns and differentiates instead of computing it again."""
        ctx.save_for_backward(h, scale, limit)
        ctx.activation, ctx.consume_h, ctx.ran = activation, consume_h, False
        return _forward(h, scale, activation, limit) if computed is None else computed

    @staticmethod
    def backward(ctx, da):
        if ctx.consume_h:
            check_single_backward(ctx, "gated_act(consume_h=True)", "writes the gradient over h")
        h, scale, limit = ctx.saved_tensors
        need_scale_grad = scale is not None and ctx.needs_input_grad[1]
        dh, dscale = _backward(h, scale, da.contiguous(), ctx.activation, need_scale_grad, limit,
                               into_h=ctx.consume_h)
        if dh is h:  # whoever else saved h for backward now fails autograd's version check instead of reading dh
            torch.autograd.graph.increment_version(h)
        return dh, dscale, None, None, None, None


# Under torch.compile: the same two kernels as custom ops with a registered autograd formula (no graph break;
# see moetron/_compile.py)
@torch.library.custom_op("moetron::gated_act", mutates_args=(),
                         schema="(Tensor h, Tensor? scale, str activation, Tensor? limit) -> Tensor")
def _gated_act_op(h, scale, activation, limit):
    return _forward(h, scale, activation, limit)


@_gated_act_op.register_fake
def _(h, scale, activation, limit):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("moetron::gated_act_backward", mutates_args=(),
                         schema="(Tensor h, Tensor? scale, Tensor da, str activation, bool need_scale_grad, "
                                "Tensor? limit) -> (Tensor, Tensor)")
def _gated_act_backward_op(h, scale, da, activation, need_scale_grad, limit):
    dh, dscale = _backward(h, scale, da.contiguous(), activation, need_scale_grad, limit)
    return dh, or_empty(dscale, h)


@_gated_act_backward_op.register_fake
def _(h, scale, da, activation, need_scale_grad, limit):
    return torch.empty_like(h), torch.empty_like(scale) if need_scale_grad else h.new_empty(0)


def _gated_act_op_setup(ctx, inputs, output):
    h, scale, activation, limit = inputs
    ctx.save_for_backward(h, scale, limit)
    ctx.activation = activation


def _gated_act_op_backward(ctx, da):
    h, scale, limit = ctx.saved_tensors
    need_scale_grad = scale is not None and ctx.needs_input_grad[1]
    dh, dscale = torch.ops.moetron.gated_act_backward(h, scale, da, ctx.activation, need_scale_grad, limit)
    return dh, dscale if need_scale_grad else None, None, None


_gated_act_op.register_autograd(_gated_act_op_backward, setup_context=_gated_act_op_setup)


def gated_act(h: torch.Tensor, activation: str = "swiglu", row_scale: torch.Tensor | None = None,
              num_rows: torch.Tensor | None = None, *, consume_h: bool = False) -> torch.Tensor:
    """``act(h[:, :F]) * h[:, F:]`` for ``h [R, 2F]`` (gate columns first, then up), returned as ``[R, F]`` in h's
    dtype; act is silu (``"swiglu"``) or tanh-approximated gelu (``"geglu"``). ``row_scale [R]`` (optional,
    fp32/bf16/fp16) multiplies each row: an MoE layer applies its routing weights here, before the second GEMM,
    so the weighted sum after it needs no second read of the expert outputs in backward. Computed in fp32,
    differentiable in h and row_scale, one Triton kernel each way on CUDA (PyTorch on CPU tensors unless
    MOETRON_BACKEND=triton).

    ``num_rows`` (optional): a one-element integer tensor on h's device, read by the kernels (no sync): only the
    rows below it are computed, and the output rows (and the backward's dh and row_scale gradient rows) at and
    past it are left unwritten, for a worst-case-sized buffer whose tail nothing reads (``gmm``'s
    ``zero_tail=False``). The PyTorch path computes every row.

    ``consume_h=True`` declares h an intermediate that nothing else reads after this call (an expert MLP's
    first GEMM output): the Triton backward then writes dh over h instead of allocating a second ``[R, 2F]``
    buffer, which lowers the backward's peak memory by that much (the PyTorch path allocates it as before). The
    backward can then run once: a second one (``retain_graph=True``) raises. Ignored under torch.compile, which
    plans its own buffers."""
    check_tensor("h", h, ndim=2, dtypes=FLOAT_DTYPES)
    if h.shape[1] % 2:
        raise ValueError(f"h must be [R, 2F] (gate then up columns), got an odd width: shape {tuple(h.shape)}")
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
    check_row_major("h", h)
    if row_scale is not None:
        check_tensor("row_scale", row_scale, ndim=1, dtypes=FLOAT_DTYPES)
        if row_scale.shape[0] != h.shape[0] or row_scale.device != h.device:
            raise ValueError(f"row_scale must be [R] = [{h.shape[0]}] on {h.device}, got "
                             f"{tuple(row_scale.shape)} on {row_scale.device}")
        row_scale = row_scale.contiguous()
    if num_rows is not None:
        check_tensor("num_rows", num_rows, dtypes=(torch.int32, torch.int64))
        if num_rows.numel() != 1 or num_rows.device != h.device:
            raise ValueError(f"num_rows must be a one-element integer tensor on {h.device}, got shape "
                             f"{tuple(num_rows.shape)} on {num_rows.device}")
        num_rows = num_rows.reshape(1)
    check_consumable("h", h, consume_h)
    if compiling():
        return torch.ops.moetron.gated_act(h, row_scale, activation, num_rows)
    return _GatedAct.eager_apply(h, row_scale, activation, num_rows, consume_h)


def _torch_gate_and_slope(g: torch.Tensor, activation: str):
    """act(g) and act'(g), as ``_gate_and_slope``."""
    if activation == "geglu":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g))
        return (0.5 * g * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * g * g))
    s = torch.sigmoid(g)
    return g * s, s * (1.0 + g * (1.0 - s))


def _torch_gated(h: torch.Tensor, activation: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")
    out = act * up
    return out if scale is None else out * scale.to(out.dtype)[:, None]


def gated_act_ref(h: torch.Tensor, activation: str = "swiglu", row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch in h's dtype (the reference the tests compare against, in float64)."""
    return _torch_gated(h, activation, row_scale)
