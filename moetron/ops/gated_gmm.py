"""The first expert projection and its gated activation in one kernel, for inference and training.

Legend: R routed rows, H hidden, F expert ffn width, E experts, T tokens, K top-k.

    gated_gmm(x [R, H], w1 [E, 2F, H], offsets [E], "swiglu", row_scale [R]) -> a [R, F]
        a = act(h[:, :F]) * h[:, F:] * row_scale      h = x @ w1[e]^T for the rows of expert e
    gated_gmm(x [T, H], ..., gather=src_slot [R], gather_div=K, slot_scale=probs [T·K]) -> a [R, F]
        row r reads x[src_slot[r] // K] and is scaled by probs[src_slot[r]] (the folded permute; inference)

On Hopper (16-bit inputs, TMA-aligned operands) this is one kernel whose epilogue applies the activation (ops/gmm.py
``_gmm_gated_tma_kernel``); elsewhere ``gmm`` then ``gated_act``. Results are bit for bit the same either way.
Without autograd h [R, 2F] never goes to memory. When autograd records, the kernel also stores h for the backward
(gated_act's backward followed by gmm's, as two autograd nodes), so the activation's separate pass that read h
back is gone (H100, T=8192, benchmarks/NOTES.md session 18: first projection and activation 960 -> 914 us at
OLMoE, 776 -> 758 at Qwen3-30B). Large per-expert weights (Mixtral) train with gmm then gated_act: storing h
from the fused kernel was no faster there.
"""

from __future__ import annotations

import torch

from .._checks import check_consumable
from .._compile import eager_function, records_grad
from .gated_act import _GatedAct, _forward as _gated_forward
from .gmm import _Groups, _make_groups, _node_backward, _node_setup, _run_gmm, checked_main_grad, gmm_gated
from .permute import _gather_slots


def gated_gmm(x: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor, activation: str,
              row_scale: torch.Tensor | None = None, gather: torch.Tensor | None = None, *, gather_div: int = 1,
              slot_scale: torch.Tensor | None = None, zero_tail: bool = True, consume_x: bool = False,
              consume_h: bool = False) -> torch.Tensor:
    """``gated_act(gmm(x, w1, offsets=offsets, trans_w=True, zero_tail=zero_tail), activation, row_scale)``.

    ``x [R, H]`` contiguous fp16/bf16/fp32, ``w1 [E, 2F, H]`` contiguous in x's dtype (or fp32 with 16-bit x, as
    ``gmm`` takes it: the GEMM runs on a copy in x's dtype, w1's gradient is fp32), ``offsets [E]`` int32/int64
    cumulative row ends (rows past the last end give zeros, or with ``zero_tail=False`` are left unwritten),
    ``row_scale [R]`` optional, contiguous. Returns ``a [R, F]`` in x's dtype.

    Inference only (no autograd): with ``gather [R]`` (int32/int64), x is ``[T, H]`` tokens and row r reads
    ``x[gather[r] // gather_div]`` (-1: a zero row): permute's ``src_slot`` with ``gather_div`` = K, so no per-row
    token index is built. ``slot_scale`` (instead of ``row_scale``, with ``gather``): ``[T·gather_div]``
    contiguous per-slot scales, row r taking ``slot_scale[gather[r]]``.

    Differentiable in x, w1 and row_scale when autograd records them; ``consume_x`` / ``consume_h`` then let the
    backward write dx over x and dh over h (``gmm``'s ``consume_x``, ``gated_act``'s ``consume_h``; the backward
    can then run once). Inputs are the experts' own (validated there)."""
    by_slot = slot_scale is not None
    if by_slot and (gather is None or row_scale is not None):
        raise ValueError("slot_scale indexes the scales through gather: pass gather, and no row_scale beside it")
    records = records_grad(x, w1, row_scale)
    if records and gather is not None:
        raise ValueError("gather (and slot_scale) are for inference: call gated_gmm under torch.no_grad(), or "
                         "permute x first")
    check_consumable("x", x, consume_x)
    R = x.shape[0] if gather is None else gather.shape[0]
    groups = _make_groups(None, offsets, w1.shape[0], R, x.device, zero_tail=zero_tail)  # checked as gmm checks them
    # rows past the last group are left unwritten by both steps with zero_tail=False (gated_act's num_rows)
    limit = None if zero_tail else offsets[-1:]
    if records:
        h, a = _FirstGemmWithActivation.eager_apply(x, w1, None, row_scale, groups, activation, limit,
                                                    checked_main_grad(w1), consume_x)
        return _GatedAct.eager_apply(h, row_scale, activation, limit, consume_h, a)
    with torch.no_grad():
        return _forward(x, w1.to(x.dtype), slot_scale if by_slot else row_scale, groups, activation, limit,
                        gather=gather, gather_div=gather_div, scale_by_slot=by_slot)


def _forward(x, w1, scale, groups: _Groups, activation: str, limit, h_out=None, gather=None, gather_div: int = 1,
             scale_by_slot: bool = False) -> torch.Tensor:
    """a, by the fused kernel where it applies, else by gmm then gated_act (the same bits); h into ``h_out``
    (``[R, 2F]``) when given."""
    a = gmm_gated(x, w1, groups, activation, scale, gather=gather, gather_div=gather_div,
                  scale_by_slot=scale_by_slot, h_out=h_out)
    if a is not None:
        return a
    h = h_out if h_out is not None else torch.empty(groups.num_rows, w1.shape[1], dtype=x.dtype, device=x.device)
    _run_gmm(x.contiguous(), w1, None, groups, h, True, gather=gather, gather_div=gather_div)
    if scale_by_slot:
        scale = _gather_slots(scale, gather)
    return _gated_forward(h, scale, activation, limit)


@eager_function
class _FirstGemmWithActivation(torch.autograd.Function):
    """h = gmm(x, w1, trans_w=True) as gmm's own autograd node (same saved tensors, same backward), computed by the
    fused kernel, which also returns a = act(h)·scale. a leaves this node non-differentiable: gated_act's node takes
    it as already computed and differentiates it from h. Two nodes, as gmm then gated_act would make, keep the
    backward's memory the same: the activation's gradient is freed before the first GEMM's backward runs."""

    @staticmethod
    def forward(ctx, x, w1, bias, scale, groups: _Groups, activation, limit, main_grad, consume_x):
        # bias is always None: it holds gmm's input slot, so gmm's node backward reads needs_input_grad unchanged
        h = torch.empty(groups.num_rows, w1.shape[1], dtype=x.dtype, device=x.device)
        w_run = w1.to(x.dtype)  # w1 itself unless it is an fp32 weight for 16-bit x (see gmm)
        a = _forward(x, w_run, scale, groups, activation, limit, h_out=h)
        ctx.mark_non_differentiable(a)
        # a's gradient is always None here: not materialised as an [R, F] tensor of zeros (memory at the peak)
        ctx.set_materialize_grads(False)
        _node_setup(ctx, x, w1, bias, groups, True, main_grad, consume_x, w_run)
        return h, a

    @staticmethod
    def backward(ctx, dh, _):
        grads = (None, None, None) if dh is None else _node_backward(ctx, dh)
        return (*grads, None, None, None, None, None, None)
