"""The first expert projection and its gated activation as one op: ``gated_act(gmm(x, w1, trans_w=True))``.

Legend: R routed rows, H hidden, F expert ffn width, E experts.

    gated_gmm(x [R, H], w1 [E, 2F, H], offsets [E], "swiglu", row_scale [R]) -> a [R, F]
        a = act(h[:, :F]) * h[:, F:] * row_scale      h = x @ w1[e]^T for the rows of expert e

On Hopper (16-bit inputs, TMA-aligned operands, per-expert weights under 8M elements) the forward is one kernel
whose epilogue applies the activation (ops/gmm.py ``_gmm_gated_tma_kernel``): h goes to memory only when a
backward needs it, and is never read back in the forward. The backward is the gated activation's (``gated_act``)
followed by the grouped GEMM's. Elsewhere it runs ``gmm`` then ``gated_act``. Results are bit for bit the same
either way. Measured on the H100 (benchmarks/NOTES.md): inference 3-4% faster on the Qwen3-30B and OLMoE layers;
training within run-to-run noise.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .gated_act import _backward as _gated_backward, _forward as _gated_forward
from .gmm import _Groups, _make_groups, _matmul_grads, _run_gmm, gmm_gated


def _forward(x, w, scale, groups: _Groups, activation: str, store_h: bool):
    """(a, h or None): the fused kernel where it applies, else gmm then the activation (the same bits)."""
    fused = gmm_gated(x, w, groups, activation, scale, store_h=store_h)
    if fused is not None:
        return fused
    h = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    _run_gmm(x, w, None, groups, h, True)
    return _gated_forward(h, scale, activation), h


class _GatedGroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale, groups: _Groups, activation: str, main_grad):
        a, h = _forward(x, w, scale, groups, activation, store_h=True)
        ctx.save_for_backward(x, w, h, scale)
        ctx.groups, ctx.activation, ctx.main_grad = groups, activation, main_grad
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx, da):
        x, w, h, scale = ctx.saved_tensors
        need_x, need_w, need_scale = ctx.needs_input_grad[:3]
        dh, dscale = _gated_backward(h, scale, da.contiguous(), ctx.activation, need_scale and scale is not None)
        del h
        dx, dw = _matmul_grads(dh, x, w, ctx.groups, True, ctx.main_grad, need_x, need_w)
        return dx, dw, dscale, None, None, None


def gated_gmm(x: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor, activation: str,
              row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_act(gmm(x, w1, offsets=offsets, trans_w=True), activation, row_scale)`` (see the module docstring).

    ``x [R, H]`` contiguous fp16/bf16/fp32, ``w1 [E, 2F, H]`` contiguous in x's dtype, ``offsets [E]`` int32/int64
    cumulative row ends on x's device (rows past the last end give zeros), ``row_scale [R]`` optional, contiguous.
    Differentiable in x, w1 and row_scale; w1's gradient goes into an fp32 ``w1.main_grad`` when it has one (as
    ``gmm``). Inputs are the experts' own (validated there)."""
    groups = _make_groups(None, offsets, w1.shape[0], x.shape[0], x.device)  # checked as gmm checks them
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad
                                    or (row_scale is not None and row_scale.requires_grad)):
        return _GatedGroupedMatmul.apply(x, w1, row_scale, groups, activation, getattr(w1, "main_grad", None))
    return _forward(x, w1, row_scale, groups, activation, store_h=False)[0]
