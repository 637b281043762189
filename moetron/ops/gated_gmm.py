"""Inference: the first expert projection and its gated activation in one kernel.

Legend: R routed rows, H hidden, F expert ffn width, E experts, T tokens, K top-k.

    gated_gmm(x [R, H], w1 [E, 2F, H], offsets [E], "swiglu", row_scale [R]) -> a [R, F]
        a = act(h[:, :F]) * h[:, F:] * row_scale      h = x @ w1[e]^T for the rows of expert e
    gated_gmm(x [T, H], ..., gather=src_slot [R], gather_div=K, slot_scale=probs [T·K]) -> a [R, F]
        row r reads x[src_slot[r] // K] and is scaled by probs[src_slot[r]] (the folded permute)

On Hopper (16-bit inputs, TMA-aligned operands, per-expert weights under 8M elements) this is one kernel whose
epilogue applies the activation (ops/gmm.py ``_gmm_gated_tma_kernel``), so h [R, 2F] never goes to memory;
elsewhere ``gmm`` then ``gated_act``. Results are bit for bit the same either way. It sped up the Qwen3-30B and
OLMoE layers' inference by a few percent (benchmarks/results/infer_fusions_h100.json; within that run's noise at
T=8192). Training keeps the two ops: a variant that also stored h for backward showed no gain there,
and as one autograd node it held h through the backward GEMMs (+0.94 GB peak at Mixtral in a layer.py run) or
could not be backpropagated through twice.
"""

from __future__ import annotations

import torch

from .gated_act import _forward as _gated_forward
from .gmm import _make_groups, _run_gmm, gmm_gated
from .permute import _gather_slots


@torch.no_grad()
def gated_gmm(x: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor, activation: str,
              row_scale: torch.Tensor | None = None, gather: torch.Tensor | None = None, *, gather_div: int = 1,
              slot_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_act(gmm(x, w1, offsets=offsets, trans_w=True), activation, row_scale)`` without autograd.

    ``x [R, H]`` contiguous fp16/bf16/fp32, ``w1 [E, 2F, H]`` contiguous in x's dtype, ``offsets [E]`` int32/int64
    cumulative row ends (rows past the last end give zeros), ``row_scale [R]`` optional, contiguous. With
    ``gather [R]`` (int32/int64), x is ``[T, H]`` tokens and row r reads ``x[gather[r] // gather_div]`` (-1: a
    zero row): permute's ``src_slot`` with ``gather_div`` = K, so no per-row token index is built. ``slot_scale``
    (instead of ``row_scale``, with ``gather``): ``[T·gather_div]`` contiguous per-slot scales, row r taking
    ``slot_scale[gather[r]]``. Inputs are the experts' own (validated there)."""
    by_slot = slot_scale is not None
    if by_slot and (gather is None or row_scale is not None):
        raise ValueError("slot_scale indexes the scales through gather: pass gather, and no row_scale beside it")
    R = x.shape[0] if gather is None else gather.shape[0]
    groups = _make_groups(None, offsets, w1.shape[0], R, x.device)  # checked as gmm checks them
    a = gmm_gated(x, w1, groups, activation, slot_scale if by_slot else row_scale, gather=gather,
                  gather_div=gather_div, scale_by_slot=by_slot)
    if a is not None:
        return a
    h = torch.empty(R, w1.shape[1], dtype=x.dtype, device=x.device)
    _run_gmm(x.contiguous(), w1, None, groups, h, True, gather=gather, gather_div=gather_div)
    if by_slot:
        row_scale = _gather_slots(slot_scale, gather)
    return _gated_forward(h, row_scale, activation)
