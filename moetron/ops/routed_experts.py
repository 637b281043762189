"""Inference path of the routed gated experts: the permutation folded into the first grouped GEMM.

Legend: T tokens, H hidden, F expert ffn, E experts, K top-k, R rows of the expert-major layout (``permute``'s
R_out, padding and zero tail included).

    routed_gated_experts(x [T, H], probs [T, K], w1 [E, 2F, H], w2 [E, H, F], layout) -> y [T, H]
        y[t] = sum_k probs[t, k] · w2[e] act(w1[e] x[t])      e = expert of slot (t, k), kept slots only

It computes what ``permute`` → ``GroupedExperts`` (routing weights applied in the experts) → unweighted
``unpermute`` computes, on the same layout, but the first GEMM gathers its rows of x itself, so the [R, H]
permuted copy of x is never written:

    h = gmm(x[src_slot // K], w1)    a = gated_act(h, probs[src_slot])    y_R = gmm(a, w2)    y = unpermute(y_R)

``src_slot[r]`` is the slot t·K+k that row r holds, -1 for padding and tail rows, which read zeros. The GEMM
reads the row's token t and its routing weight through it, so neither a permuted copy of x (268 MB at Qwen3-30B
shapes, T=8192, K=8, H=2048, bf16) nor per-row token and weight indices are made (those took eleven small torch
ops per call: a Qwen3-30B layer at T=16 ran 19 kernels before, 8 now; benchmarks/NOTES.md, session 17). The
fold sped up the Qwen3-30B and OLMoE layers' inference (benchmarks/results/infer_fusions_h100.json: Qwen3-30B
T=32768 -7%, T=8192 -4%, OLMoE -2%) and slowed Mixtral's in scratch A/B runs (benchmarks/NOTES.md,
session 7), whose large-expert GEMMs lose more to pointer loads than the copy costs, so only experts with a small
per-expert weight fold (``FOLD_MAX_WEIGHT``, ``folds``), except at decode sizes (at most 32 rows per expert on
average), where every GEMM streams its weights and the fold saves the permute and its index ops (Mixtral's block
at T=1 / 16 / 128: 0.328 / 1.037 / 1.047 -> 0.307 / 1.007 / 1.028 ms compiled, a scratch A/B of
MOETRON_FOLD_PERMUTE on one lease; benchmarks/NOTES.md, session 19).
The first GEMM with the activation in its epilogue is ``gated_gmm``'s. ``gathered_gemm`` is the folded first GEMM
alone (the transformers backend uses it with its own gates).

Inference only: a training step needs the gathered rows again for a weight gradient, and there the GEMM that
gathered its own rows ran slower than on a copy, while copying in backward what the forward skipped left the
step unchanged (scratch A/B, benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch

from .._compile import records_grad
from .._env import fold_permute_enabled, use_triton
from .gated_gmm import gated_gmm
from .gmm import _Groups, _few_rows, _run_gmm
from .permute import _run_unpermute

# Fold only below this many elements per expert in the first projection: Qwen3-30B and OLMoE (3-4M) gained,
# Mixtral (117M) lost (scratch A/B, benchmarks/NOTES.md).
FOLD_MAX_WEIGHT = 1 << 23


def folds(x: torch.Tensor, w1: torch.Tensor, *others, rows: int) -> bool:
    """Whether an experts forward on x with first projection w1 [E, ., .] takes the folded path: nothing to
    record for autograd (x, w1 and ``others``, None allowed), Triton kernels for x, ``MOETRON_FOLD_PERMUTE`` not
    0, and a small per-expert weight, or (``rows``: the routed rows T·K) a decode-sized batch: there the GEMMs
    stream the weights whatever loads x, and the fold saves the permute and its index ops."""
    small = w1[0].numel() < FOLD_MAX_WEIGHT or _few_rows(rows, w1.shape[0])
    return not records_grad(x, w1, *others) and small and use_triton(x) and fold_permute_enabled()


@torch.no_grad()
def gathered_gemm(x: torch.Tensor, w: torch.Tensor, src_slot: torch.Tensor, top_k: int, offsets: torch.Tensor,
                  trans_w: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, N]`` = ``gmm(x_permuted, w, offsets=offsets, trans_w=trans_w, bias=bias)`` for the layout of
    ``src_slot [R]`` (the slot t·K+k of each row, -1 for a zero row; K = ``top_k``), reading each row's token t of
    ``x [T, H]`` directly instead of a permuted copy. No autograd."""
    R = src_slot.shape[0]
    out = torch.empty(R, w.shape[1] if trans_w else w.shape[2], dtype=x.dtype, device=x.device)
    return _run_gmm(x.contiguous(), w, bias, _Groups(offsets, True, R), out, trans_w, gather=src_slot,
                    gather_div=top_k)


@torch.no_grad()
def routed_gated_experts(x: torch.Tensor, probs: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                         src_slot: torch.Tensor, row_map: torch.Tensor, offsets: torch.Tensor,
                         activation: str = "swiglu") -> torch.Tensor:
    """The routed experts of an MoE layer from unpermuted tokens to combined outputs, without autograd.

    Args:
        x: ``[T, H]`` fp16/bf16/fp32 tokens in the weights' dtype.
        probs: ``[T, K]`` routing weights (any float dtype; applied in fp32), or None for weight 1.
        w1: ``[E, 2F, H]`` gate-then-up projection (Hugging Face v5 ``gate_up_proj``), contiguous.
        w2: ``[E, H, F]`` down projection, contiguous.
        src_slot, row_map, offsets: the layout of ``permute``'s routing (``LocalDispatcher.layout``): ``[R]``
            int64 slot t·K+k of each row (-1: a zero row), ``[T, K]`` row of each slot (-1: dropped), ``[E]``
            int32 cumulative row ends.
        activation: "swiglu" or "geglu".

    Returns ``[T, H]`` in x's dtype. Callers check that the Triton kernels run for x (``use_triton``), that the
    experts have no biases, and that no gradient is needed; the layer has validated the shapes."""
    T, K = row_map.shape
    R = src_slot.shape[0]
    slot_probs = None if probs is None else probs.reshape(T * K).contiguous()
    # the activation in the first GEMM's epilogue where it applies: h never goes to memory
    a = gated_gmm(x, w1, offsets, activation, gather=src_slot, gather_div=K, slot_scale=slot_probs)
    y_R = torch.empty(R, w2.shape[1], dtype=x.dtype, device=x.device)
    _run_gmm(a, w2, None, _Groups(offsets, True, R), y_R, True)
    y = torch.empty(T, w2.shape[1], dtype=x.dtype, device=x.device)
    _run_unpermute(y_R, row_map.reshape(T * K), None, K, y)
    return y
