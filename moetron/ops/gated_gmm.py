"""Inference: the first expert projection and its gated activation in one kernel.

Legend: R routed rows, H hidden, F expert ffn width, E experts.

    gated_gmm(x [R, H], w1 [E, 2F, H], offsets [E], "swiglu", row_scale [R]) -> a [R, F]
        a = act(h[:, :F]) * h[:, F:] * row_scale      h = x @ w1[e]^T for the rows of expert e
    gated_gmm(x [T, H], ..., gather=row_token [R]) -> a [R, F]    row r reads x[row_token[r]] (the folded permute)

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


@torch.no_grad()
def gated_gmm(x: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor, activation: str,
              row_scale: torch.Tensor | None = None, gather: torch.Tensor | None = None) -> torch.Tensor:
    """``gated_act(gmm(x, w1, offsets=offsets, trans_w=True), activation, row_scale)`` without autograd.

    ``x [R, H]`` contiguous fp16/bf16/fp32, ``w1 [E, 2F, H]`` contiguous in x's dtype, ``offsets [E]`` int32/int64
    cumulative row ends (rows past the last end give zeros), ``row_scale [R]`` optional, contiguous. With
    ``gather [R]`` (int32, ``routed_experts.row_tokens``), x is ``[T, H]`` tokens and row r reads
    ``x[gather[r]]`` (-1: a zero row). Inputs are the experts' own (validated there)."""
    R = x.shape[0] if gather is None else gather.shape[0]
    groups = _make_groups(None, offsets, w1.shape[0], R, x.device)  # checked as gmm checks them
    a = gmm_gated(x, w1, groups, activation, row_scale, gather=gather)
    if a is not None:
        return a
    h = torch.empty(R, w1.shape[1], dtype=x.dtype, device=x.device)
    _run_gmm(x.contiguous(), w1, None, groups, h, True, gather=gather)
    return _gated_forward(h, row_scale, activation)
