"""Top-k MoE router and load-balancing losses.

Plain PyTorch, except on Triton's path (CUDA tensors) for the common softmax case (no groups, expert bias or
sinkhorn, fp32 gate maths, one process, at most the "aux_loss" type plus z-loss): there selection, combine
weights, counts and both losses run in moetron/ops/routing.py's kernels, with the same formulas.

Legend: T tokens, H hidden, E experts, K top-k, B sequences in a batch, S sequence length (B·S = T),
G expert groups.

    TopKRouter(cfg)(x [T, H], seq_len=None) -> RouterOutput(
        probs             [T, K]  fp32   combine weights of the selected experts
        expert_ids        [T, K]  int64  selected experts, best first
        logits            [T, E]  router dtype (fp32 or fp64), differentiable
        tokens_per_expert [E]     int64  how many of the T·K routed rows each expert receives
        losses            {name: 0-d tensor}  each loss / its coefficient, detached (1.0 = balanced aux loss)
        tokens            [T, H]  x for the experts (see RouterOutput)
    )

The formulas follow Megatron-Core (megatron/core/transformer/moe/router.py and moe_utils.py):

- gating: ``logits = x @ weight.T`` computed in the router dtype whatever the activation dtype
  (``RouterGatingLinearFunction``), saving x and weight in their own dtypes for backward. For bf16 x with an
  fp32 router, the fp32 GEMMs run on bf16 tensor cores over an exact three-part bf16 split of the fp32
  operands: fp32 accuracy without fp32's SIMT speed. On Triton's path that is ops/router_gemm.py (the split done
  in the kernels' registers, one launch forward, two backward); with MOETRON_BACKEND=torch on CUDA,
  ``_router_gemm_split`` (PyTorch ops around one cuBLAS GEMM).
- selection (``topk_routing_with_score_function``):
    softmax, pre_softmax=False: top-k on the logits, then softmax over the k selected logits;
    softmax, pre_softmax=True:  softmax over all E, then top-k (optionally renormalised, HF ``norm_topk_prob``);
    sigmoid: sigmoid scores, top-k on ``scores + expert_bias`` (the bias only selects), then
             ``probs = s / (sum(s) + 1e-20)`` over the k selected when K > 1 and ``norm_topk_prob``.
  Then ``probs *= scaling_factor``.
- group-limited routing (``group_limited_topk``): the E experts form G equal groups; a group's score is the sum of
  its top ``K // group_topk`` expert scores; only experts in the best ``group_topk`` groups may be selected.
- sinkhorn (``sinkhorn_load_balancing``): in training, select on sinkhorn-normalised ``exp(logits)``; weight with
  sigmoid(logits) when K == 1, else softmax(logits) over all E. In eval, plain top-k on those weights.
- aux losses (``switch_load_balancing_loss_func``), all computed from ``compute_routing_scores_for_aux_loss``:
  scores = softmax(logits) (or sigmoid normalised over all E), counts from a plain top-k on those scores
  (no bias, no groups)::

      aux_loss        = E / (K · T²) · Σ_e (Σ_t scores[t, e]) · counts[e]
      seq_aux_loss    = mean over the B sequences of aux_loss computed on each sequence alone (T -> S)
      global_aux_loss = aux_loss with counts replaced by the mean counts over all calls since
                        ``reset_global_aux_counts()`` (Megatron's ``global_tokens_per_expert / ga_steps``)
      z_loss          = mean_t logsumexp(logits[t])²                              (``z_loss_func``)

  A balanced router gives aux_loss = 1. Each loss is added to the gradient without the caller touching it:
  ``AuxLossAutoScaler`` is an identity on ``probs`` whose backward also seeds ``d(coeff · loss)`` with
  ``AuxLossAutoScaler.loss_scale`` (Megatron's ``MoEAuxLossAutoScaler``). The gradient therefore flows only if
  ``probs`` takes part in the loss being differentiated, as it does in any MoE layer.
- aux-loss-free balancing (``get_updated_expert_bias``): ``update_expert_bias()`` moves each expert's bias by
  ``rate · sign(mean(counts) - counts)`` using the counts accumulated since the previous update.

Across ranks (expert / data / tensor / context parallelism, ``set_process_groups``): every count and token
total above is summed over the ranks that share this router, so the losses equal the single-process losses of
the whole global batch, however it is split. Each rank attaches only its share of each loss (its own tokens'
scores times the global counts, over the global token count; the shares add up to the global loss), so summing
the router gradient over those ranks adds exactly one aux-loss gradient. The reported values are the global
losses. Sequences split over ranks (TP sequence parallelism, CP) sum their per-sequence counts over the
``sequences`` group first.

Losses, jitter and count accumulation happen only in training mode with grad enabled (Megatron skips them under
``torch.no_grad()``, for example in activation recomputation). Non-reentrant activation checkpointing runs the
forward twice with grad enabled, so the counters then hold each micro-batch twice: the global aux loss (a mean
over calls) and the bias update (a sign against the mean) are unchanged when each micro-batch's backward follows
its forward (tests/test_checkpointing.py), not when several forwards run before their backwards.

Nothing in ``forward`` reads routing data on the host, except the NaN/inf check of debug mode
(``RouterConfig.debug_nan_check`` or ``MOETRON_DEBUG=1``), which syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _env
from .ops import router_gemm, routing
from ._checks import check_tensor, config_error, is_int, is_real
from ._compile import compiling, eager_function, records_grad
from ._torch_caps import MM_OUT_DTYPE

__all__ = ["RouterConfig", "RouterOutput", "TopKRouter", "AuxLossAutoScaler", "exclude_router_counters_from_ddp"]

# ---------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------

SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")
ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

# Megatron's sinkhorn stops when the mean change of the column scaling drops to 1e-4.
_SINKHORN_TOL = 1e-4
# Megatron loops until that tolerance on the host, one sync per iteration and no upper bound. Here the loop runs a
# fixed number of iterations and freezes the scalings on the device once converged, so the result equals
# Megatron's whenever it converges within the cap. Measured on random fp32 logits (T=16..8192, E=8..128):
# std <= 1 converges in 2-6 iterations, std 8 in up to 106, and skewed logits (std >= 2 plus a per-expert
# offset) took Megatron's loop 50k-330k iterations, so a cap is needed anyway. Past the cap the selection is
# the partly balanced one reached so far.
_SINKHORN_MAX_ITERS = 64
# Megatron-Core's default init_method_std for the router weight.
_INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _bad(field: str, expected: str, got) -> ValueError:
    return config_error("RouterConfig", field, expected, got)


@dataclass
class RouterConfig:
    # Width H of the router input x [T, H].
    hidden_size: int
    # Number E of routed experts.
    num_experts: int
    # Experts K selected per token (1 <= K <= E).
    top_k: int
    # "softmax" or "sigmoid": how logits become scores.
    score_function: str = "softmax"
    # softmax only. True: softmax over all E, then top-k (probs sum to < 1). False: top-k on the logits, then
    # softmax over the k selected logits (probs sum to 1, Mixtral style).
    pre_softmax: bool = False
    # Renormalise the K selected probs to sum to 1 (only when K > 1, as Megatron). None picks the default:
    # True for sigmoid, False for softmax with pre_softmax; softmax without pre_softmax is normalised already.
    norm_topk_prob: bool | None = None
    # Multiplies the final probs (DeepSeek-V3 routed_scaling_factor); None for 1.
    scaling_factor: float | None = None
    # Group-limited routing: number G of equal expert groups (None: off). Set together with group_topk.
    num_groups: int | None = None
    # Group-limited routing: groups kept per token, ranked by the sum of each group's top K // group_topk scores.
    group_topk: int | None = None
    # Balancing methods, from "aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none". The three aux
    # losses combine freely; "sinkhorn" and "none" stand alone. A single string is accepted.
    load_balancing: tuple[str, ...] = ("aux_loss",)
    # Coefficient of the aux losses: one float for all, or a tuple aligned with load_balancing (entries for
    # "sinkhorn"/"none" are ignored). 0 reports a loss without adding its gradient. 1e-2 is Megatron's advice.
    aux_loss_coeff: float | tuple[float, ...] = 1e-2
    # Coefficient of the router z-loss (ST-MoE), None for off.
    z_loss_coeff: float | None = None
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only.
    # Needs score_function="sigmoid".
    expert_bias: bool = False
    # Step of update_expert_bias(): each call moves every bias by +-bias_update_rate (Megatron default 1e-3).
    bias_update_rate: float = 1e-3
    # Multiplicative uniform noise on x in training: x * U(1 - eps, 1 + eps). None for off.
    input_jitter: float | None = None
    # Dtype of the gate GEMM and all routing maths, whatever the activation dtype: "fp32" or "fp64".
    router_dtype: str = "fp32"
    # Raise ValueError when the logits hold NaN or inf. Syncs with the host; MOETRON_DEBUG=1 turns it on too.
    debug_nan_check: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_experts", "top_k"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _bad(name, "a positive int", v)
        if self.top_k > self.num_experts:
            raise _bad("top_k", f"<= num_experts ({self.num_experts})", self.top_k)
        if self.score_function not in SCORE_FUNCTIONS:
            raise _bad("score_function", f"one of {SCORE_FUNCTIONS}", self.score_function)
        for name in ("pre_softmax", "expert_bias", "debug_nan_check"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "a bool", getattr(self, name))
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise _bad("norm_topk_prob", "a bool or None", self.norm_topk_prob)
        if self.router_dtype not in ROUTER_DTYPES:
            raise _bad("router_dtype", f"one of {tuple(ROUTER_DTYPES)}", self.router_dtype)

        # load balancing names and coefficients
        lb = self.load_balancing
        if isinstance(lb, str):
            lb = (lb,)
        if not isinstance(lb, (tuple, list)) or not lb or not all(isinstance(n, str) for n in lb):
            raise _bad("load_balancing", f"a non-empty tuple of names from {LOAD_BALANCING_TYPES}", self.load_balancing)
        lb = tuple(lb)
        for n in lb:
            if n not in LOAD_BALANCING_TYPES:
                raise _bad("load_balancing", f"names from {LOAD_BALANCING_TYPES}", n)
        if len(set(lb)) != len(lb):
            raise _bad("load_balancing", "free of repeated names", lb)
        if len(lb) > 1 and ("sinkhorn" in lb or "none" in lb):
            raise _bad("load_balancing", '"sinkhorn" or "none" alone, or a combination of aux losses', lb)
        self.load_balancing = lb
        coeff = self.aux_loss_coeff
        if isinstance(coeff, list):
            coeff = tuple(coeff)
        if isinstance(coeff, tuple):
            if len(coeff) != len(lb):
                raise _bad("aux_loss_coeff", f"a float or a tuple of {len(lb)} floats (one per load_balancing "
                           f"entry {lb})", coeff)
            if not all(is_real(c) and c >= 0 for c in coeff):
                raise _bad("aux_loss_coeff", "made of finite floats >= 0", coeff)
        elif not is_real(coeff) or coeff < 0:
            raise _bad("aux_loss_coeff", "a finite float >= 0 or a tuple of them", coeff)
        self.aux_loss_coeff = coeff

        for name in ("z_loss_coeff", "scaling_factor"):
            v = getattr(self, name)
            if v is not None and (not is_real(v) or v < 0 or (name == "scaling_factor" and v == 0)):
                raise _bad(name, "None or a finite float " + (">= 0" if name == "z_loss_coeff" else "> 0"), v)
        if not is_real(self.bias_update_rate) or self.bias_update_rate < 0:
            raise _bad("bias_update_rate", "a finite float >= 0", self.bias_update_rate)
        if self.input_jitter is not None and (not is_real(self.input_jitter) or not 0 < self.input_jitter < 1):
            raise _bad("input_jitter", "None or a float in (0, 1)", self.input_jitter)

        # score function specifics
        if self.score_function == "sigmoid" and self.pre_softmax:
            raise _bad("pre_softmax", 'False with score_function="sigmoid" (it only applies to softmax)', True)
        if self.expert_bias and self.score_function != "sigmoid":
            raise _bad("expert_bias", 'False unless score_function="sigmoid" (Megatron never adds the bias to '
                       'softmax scores)', True)
        if self.score_function == "softmax" and not self.pre_softmax and self.norm_topk_prob is False:
            raise _bad("norm_topk_prob", "None or True with softmax and pre_softmax=False (a softmax over the k "
                       "selected logits always sums to 1; use pre_softmax=True for unnormalised probs)", False)

        # group-limited routing
        if (self.num_groups is None) != (self.group_topk is None):
            raise _bad("group_topk" if self.group_topk is None else "num_groups",
                       "set together with " + ("num_groups" if self.group_topk is None else "group_topk"), None)
        if self.num_groups is not None:
            if not is_int(self.num_groups) or self.num_groups < 1:
                raise _bad("num_groups", "a positive int", self.num_groups)
            if not is_int(self.group_topk) or self.group_topk < 1:
                raise _bad("group_topk", "a positive int", self.group_topk)
            if self.num_experts % self.num_groups:
                raise _bad("num_groups", f"a divisor of num_experts ({self.num_experts})", self.num_groups)
            if self.group_topk > self.num_groups:
                raise _bad("group_topk", f"<= num_groups ({self.num_groups})", self.group_topk)
            if self.group_topk > self.top_k:
                raise _bad("group_topk", f"<= top_k ({self.top_k}) since a group is scored by its top "
                           "top_k // group_topk experts", self.group_topk)
            per_group = self.num_experts // self.num_groups
            if self.top_k // self.group_topk > per_group or self.group_topk * per_group < self.top_k:
                raise _bad("group_topk", f"large enough for the {self.group_topk} kept groups of {per_group} experts "
                           f"to hold top_k={self.top_k} experts", self.group_topk)

        # sinkhorn follows Megatron's own weighting and ignores the selection options: refuse them, not drop them
        if lb == ("sinkhorn",):
            ignored = {"score_function": self.score_function != "softmax", "pre_softmax": self.pre_softmax,
                       "norm_topk_prob": self.norm_topk_prob is not None, "scaling_factor": self.scaling_factor
                       is not None, "num_groups": self.num_groups is not None, "expert_bias": self.expert_bias}
            for name, bad in ignored.items():
                if bad:
                    raise _bad(name, 'left at its default with load_balancing="sinkhorn" (sinkhorn weights with '
                               "sigmoid for top_k=1 and softmax otherwise, as Megatron-Core)", getattr(self, name))

        # resolved in place, so dataclasses.replace() on a validated config validates again; sinkhorn keeps None
        if self.norm_topk_prob is None and lb != ("sinkhorn",):
            self.norm_topk_prob = self.score_function == "sigmoid" or not self.pre_softmax

    def aux_loss_coeffs(self) -> dict[str, float]:
        """Coefficient of each configured aux loss type (Megatron's ``get_aux_loss_coeff``)."""
        names = [n for n in self.load_balancing if n in AUX_LOSS_TYPES]
        if isinstance(self.aux_loss_coeff, tuple):
            return {n: float(c) for n, c in zip(self.load_balancing, self.aux_loss_coeff) if n in AUX_LOSS_TYPES}
        return {n: float(self.aux_loss_coeff) for n in names}


class RouterOutput(NamedTuple):
    probs: torch.Tensor  # [T, K] fp32 combine weights
    expert_ids: torch.Tensor  # [T, K] int64, best first
    logits: torch.Tensor  # [T, E] router dtype
    tokens_per_expert: torch.Tensor  # [E] int64
    losses: dict  # name -> 0-d detached tensor, loss / coeff
    # x as the experts should take it: x itself, or on Triton's path (training) a view of x whose gradient the
    # router's backward adds into its own dx in one kernel (ops/router_gemm.py), instead of autograd summing the
    # router's and the experts' gradients of x in a pass of its own. Same values, same gradient bits.
    tokens: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------------------


def _split_bf16(t: torch.Tensor, parts: int = 3) -> list[torch.Tensor]:
    """``parts`` bf16 tensors, largest first, each the bf16 rounding of what the previous ones left of ``t`` (that
    remainder is exact in fp32). Three parts carry 24 bits of significand, so their sum is ``t`` to fp32's own
    relative precision (bf16 keeps fp32's exponent range)."""
    out, rest = [], t.float()
    for i in range(parts):
        out.append(rest.to(torch.bfloat16))
        if i + 1 < parts:
            rest = rest - out[-1].float()
    return out


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b for bf16 operands with fp32 accumulation, returned in ``out_dtype``: one tensor-core GEMM on CUDA;
    elsewhere the same sums in fp32 (a product of two bf16 values is exact in fp32), for the tests."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a.float(), b.float()).to(out_dtype)


# Pairs (i, j) of parts of the gradient and the weight that the input gradient sums: every product whose size
# is above ~2^-24 of the largest (part i is ~2^-8i of the whole).
_DGRAD_PAIRS = ((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2))


def _router_gemm_split(x_TH: torch.Tensor, w_EH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits of bf16 x and fp32 (or bf16) w on bf16 tensor cores: w = w0 + w1 + w2 exactly (three bf16
    parts) and x is exact in bf16, so x @ w.T is the sum of three bf16 GEMMs with fp32 accumulation, as accurate
    as one fp32 GEMM (the accumulation rounds the same way). On the H100 the router's three GEMMs of a Qwen3 layer
    step (T=8192) took 0.10 ms this way against 0.30 ms in cuBLAS's fp32 SIMT kernels, plus 0.12 ms of fp32 casts
    saved. Returns (logits [T, E] fp32, the parts [3E, H] for backward)."""
    E = w_EH.shape[0]
    w3 = torch.cat(_split_bf16(w_EH), dim=0)
    l3 = _mm_fp32_out(x_TH, w3.t())
    return l3.view(-1, 3, E).sum(dim=1), w3


def _router_gemm_split_backward(g_TE, x_TH, w3, need_x: bool, need_w: bool):
    """Gradients of ``_router_gemm_split`` from the fp32 logits gradient g: g is split in three bf16 parts too.
    dx = Σ g_i @ w_j over the pairs that matter, as one GEMM over the concatenated parts, rounded once to x's
    dtype; dw = Σ_i g_i.T @ x (three GEMMs in one, summed in fp32)."""
    E = g_TE.shape[1]
    g_parts = _split_bf16(g_TE)
    gx = gw = None
    if need_x:
        w_parts = w3.view(3, E, -1)
        g6 = torch.cat([g_parts[i] for i, _ in _DGRAD_PAIRS], dim=1)
        w6 = torch.cat([w_parts[j] for _, j in _DGRAD_PAIRS], dim=0)
        gx = _mm_fp32_out(g6, w6, out_dtype=x_TH.dtype)
    if need_w:
        g3 = torch.cat(g_parts, dim=1)
        gw = _mm_fp32_out(g3.t(), x_TH).view(3, E, -1).sum(dim=0)
    return gx, gw


def _use_split_gemm(x_TH: torch.Tensor, w_EH: torch.Tensor, dtype: torch.dtype) -> bool:
    """The split GEMM serves bf16 activations with an fp32 router on CUDA (the training case); fp16 or fp32
    activations, fp64 routing, the CPU and torch releases without mm's out_dtype use one GEMM in the router
    dtype."""
    return (MM_OUT_DTYPE and x_TH.is_cuda and x_TH.dtype == torch.bfloat16 and dtype == torch.float32
            and w_EH.dtype in (torch.float32, torch.bfloat16) and x_TH.shape[0] > 0)


@eager_function
class _RouterGemm(torch.autograd.Function):
    """logits = x @ w.T in the router dtype. Saving x and w in their own dtypes (bf16 in training) instead of the
    upcast copies halves the memory the router keeps for backward, as Megatron's RouterGatingLinearFunction.
    With ``split`` (see ``_use_split_gemm``) the fp32 GEMMs run as exact bf16 splits on tensor cores."""

    @staticmethod
    def forward(ctx, x_TH, w_EH, dtype, split):
        ctx.dtype, ctx.split, ctx.w_dtype = dtype, split, w_EH.dtype
        if split:
            logits, w3 = _router_gemm_split(x_TH, w_EH)
            ctx.save_for_backward(x_TH, w3)
            return logits
        ctx.save_for_backward(x_TH, w_EH)
        return torch.mm(x_TH.to(dtype), w_EH.to(dtype).t())

    @staticmethod
    def backward(ctx, g_TE):
        x_TH, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (*_router_gemm_backward(g_TE, x_TH, w, ctx.dtype, ctx.split, ctx.w_dtype, need_x, need_w), None, None)


def _router_gemm_backward(g_TE, x_TH, w, dtype, split: bool, w_dtype, need_x: bool, need_w: bool):
    """(dx, dw) of ``_RouterGemm``; ``w`` is what its forward saved (the bf16 parts with ``split``)."""
    g_TE = g_TE.to(dtype)
    with torch.autocast(device_type=g_TE.device.type, enabled=False):
        if split:
            gx, gw = _router_gemm_split_backward(g_TE.contiguous(), x_TH, w, need_x, need_w)
            return gx, None if gw is None else gw.to(w_dtype)
        gx = torch.mm(g_TE, w.to(dtype)).to(x_TH.dtype) if need_x else None
        gw = torch.mm(g_TE.t(), x_TH.to(dtype)).to(w.dtype) if need_w else None
    return gx, gw


# Under torch.compile, _RouterGemm and AuxLossAutoScaler run as custom ops with a registered autograd formula (no
# graph break; see moetron/_compile.py). Their backward formulas are plain torch ops, traced with the graph.
@torch.library.custom_op("moetron::router_gemm", mutates_args=(),
                         schema="(Tensor x, Tensor w, ScalarType dtype, bool split) -> (Tensor, Tensor)")
def _router_gemm_op(x_TH, w_EH, dtype, split):
    """(logits, the bf16 parts of w with ``split`` (what backward reads), else an empty tensor)."""
    with torch.autocast(device_type=x_TH.device.type, enabled=False):
        if split:
            return _router_gemm_split(x_TH, w_EH)
        return torch.mm(x_TH.to(dtype), w_EH.to(dtype).t()), w_EH.new_empty(0)


@_router_gemm_op.register_fake
def _(x_TH, w_EH, dtype, split):
    logits = x_TH.new_empty(x_TH.shape[0], w_EH.shape[0], dtype=dtype)
    if split:
        return logits, w_EH.new_empty(3 * w_EH.shape[0], w_EH.shape[1], dtype=torch.bfloat16)
    return logits, w_EH.new_empty(0)


def _router_gemm_op_setup(ctx, inputs, output):
    x_TH, w_EH, dtype, split = inputs
    ctx.save_for_backward(x_TH, output[1] if split else w_EH)
    ctx.dtype, ctx.split, ctx.w_dtype = dtype, split, w_EH.dtype
    ctx.mark_non_differentiable(output[1])


def _router_gemm_op_backward(ctx, g_TE, _parts):
    x_TH, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (*_router_gemm_backward(g_TE, x_TH, w, ctx.dtype, ctx.split, ctx.w_dtype, need_x, need_w), None, None)


_router_gemm_op.register_autograd(_router_gemm_op_backward, setup_context=_router_gemm_op_setup)


@torch.library.custom_op("moetron::aux_loss_scaler", mutates_args=(),
                         schema="(Tensor probs, Tensor loss, Tensor scale) -> Tensor")
def _aux_loss_scaler_op(probs, loss, scale):
    return probs.clone()  # a custom op may not return its input


@_aux_loss_scaler_op.register_fake
def _(probs, loss, scale):
    return torch.empty_like(probs)


def _aux_loss_scaler_op_setup(ctx, inputs, output):
    probs, loss, scale = inputs
    ctx.save_for_backward(loss, scale)


def _aux_loss_scaler_op_backward(ctx, grad_probs):
    loss, scale = ctx.saved_tensors
    return grad_probs, torch.ones_like(loss) * scale.to(loss.dtype), None


_aux_loss_scaler_op.register_autograd(_aux_loss_scaler_op_backward, setup_context=_aux_loss_scaler_op_setup)


def _router_gemm(x_TH, w_EH, dtype, split):
    if compiling():
        return torch.ops.moetron.router_gemm(x_TH, w_EH, dtype, split)[0]
    return _RouterGemm.eager_apply(x_TH, w_EH, dtype, split)


def _inject_aux_loss(probs_TK, total):
    """probs_TK, with ``total``'s gradient (AuxLossAutoScaler.loss_scale) injected in backward. Compiled, the scale
    is read when the forward runs (a compiled backward is traced once)."""
    if compiling():
        scale = torch.as_tensor(_aux_loss_scale(), dtype=torch.float32, device=total.device).reshape(())
        return torch.ops.moetron.aux_loss_scaler(probs_TK, total, scale)
    return AuxLossAutoScaler.eager_apply(probs_TK, total)


class _Scale:
    value: float | torch.Tensor = 1.0


_AUX_LOSS_SCALE = _Scale()


class _AuxLossScalerMeta(type(torch.autograd.Function)):
    """Keeps ``AuxLossAutoScaler.loss_scale`` in a plain object: Dynamo cannot read an attribute of an autograd
    Function's class into a graph, and a compiled forward reads the scale."""

    @property
    def loss_scale(cls) -> float | torch.Tensor:
        return _AUX_LOSS_SCALE.value

    @loss_scale.setter
    def loss_scale(cls, value: float | torch.Tensor) -> None:
        _AUX_LOSS_SCALE.value = value

    @loss_scale.deleter
    def loss_scale(cls) -> None:  # back to the default (pytest's monkeypatch undoes a class attribute this way)
        _AUX_LOSS_SCALE.value = 1.0


@eager_function
class AuxLossAutoScaler(torch.autograd.Function, metaclass=_AuxLossScalerMeta):
    """Identity on ``probs`` whose backward also back-propagates ``loss`` with gradient ``loss_scale``.

    ``loss`` already carries its coefficient. Set ``AuxLossAutoScaler.loss_scale`` (a float or a 0-d tensor on the
    device) to whatever the main loss is multiplied by before backward: the AMP/GradScaler scale, or 1/M when M
    micro-batch losses are averaged by gradient accumulation. It is class-level, read at backward time (under
    ``torch.compile``, when the forward runs: a compiled backward is traced once).
    """

    @staticmethod
    def forward(ctx, probs, loss):
        ctx.save_for_backward(loss)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (loss,) = ctx.saved_tensors
        scale = AuxLossAutoScaler.loss_scale
        return grad_probs, torch.ones_like(loss) * scale

    @staticmethod
    def set_loss_scale(scale: float | torch.Tensor) -> None:
        AuxLossAutoScaler.loss_scale = scale


def _aux_loss_scale():
    return _AUX_LOSS_SCALE.value


# ---------------------------------------------------------------------------------------------------------
# Routing maths (pure functions on [T, E] tensors)
# ---------------------------------------------------------------------------------------------------------


def _topk(scores_TE: torch.Tensor, k: int, num_groups: int | None, group_topk: int | None):
    """Top-k over experts, optionally group-limited (Megatron's group_limited_topk). Returns (values, ids),
    best first."""
    if group_topk is None:
        return torch.topk(scores_TE, k, dim=-1)
    T, E = scores_TE.shape
    group_score_TG = scores_TE.view(T, num_groups, E // num_groups).topk(k // group_topk, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_score_TG, group_topk, dim=-1)[1]
    group_keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_keep_TE = group_keep_TG.repeat_interleave(E // num_groups, dim=1)
    return torch.topk(scores_TE.masked_fill(~expert_keep_TE, float("-inf")), k, dim=-1)


def _count(ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Counts of each expert id along the last dim, [..., E]. scatter_add rather than bincount: bincount syncs on
    CUDA to size its output."""
    out = torch.zeros(*ids.shape[:-1], num_experts, dtype=dtype, device=ids.device)
    return out.scatter_add_(-1, ids, torch.ones_like(ids, dtype=dtype))


def _sinkhorn(logits_TE: torch.Tensor) -> torch.Tensor:
    """Megatron's sinkhorn: alternately rescale rows and columns of exp(logits) towards sums 1/T and 1/E.

    exp is taken of the row-centred logits: a per-row factor is absorbed by the first row scaling and cancels in
    the result and in the convergence test (up to the 1e-8 guard), but it keeps exp from overflowing in fp32 for
    logits above ~88.
    """
    T, E = logits_TE.shape
    cost = torch.exp(logits_TE - logits_TE.max(dim=1, keepdim=True)[0])
    eps = 1e-8
    d0 = torch.ones(T, dtype=cost.dtype, device=cost.device)
    d1 = torch.ones(E, dtype=cost.dtype, device=cost.device)
    done = torch.zeros((), dtype=torch.bool, device=cost.device)
    for _ in range(_SINKHORN_MAX_ITERS):
        new_d0 = (1.0 / T) / (torch.sum(d1 * cost, 1) + eps)
        new_d1 = (1.0 / E) / (torch.sum(new_d0.unsqueeze(1) * cost, 0) + eps)
        d0 = torch.where(done, d0, new_d0)
        d1_old, d1 = d1, torch.where(done, d1, new_d1)
        done = done | (torch.mean(torch.abs(d1_old - d1)) <= _SINKHORN_TOL)
    return d1 * cost * d0.unsqueeze(1)


def _switch_aux_loss(scores_sum_BE: torch.Tensor, counts_BE: torch.Tensor, tokens: int, k: int) -> torch.Tensor:
    """Megatron's switch_load_balancing_loss_func without the coefficient, averaged over the leading dim:
    E / (K·T²) · Σ_e scores_sum[e] · counts[e]."""
    E = scores_sum_BE.shape[-1]
    per_row = (scores_sum_BE * counts_BE).sum(dim=-1) * (E / (k * max(tokens, 1) ** 2))
    return per_row.mean()


# ---------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------

# buffers kept in fp32 when the module is cast to bf16/fp16: +-1e-3 bias steps vanish in bf16 near |bias| ~ 1,
# and token counts above 256 stop being exact.
_FP32_BUFFERS = ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert", "global_aux_steps")
# each rank's own counts since the last update or reset (buffers, so .to(), CUDA-graph warm-ups and checkpoints
# of the trainer carry them)
_COUNTERS = ("local_tokens_per_expert", "global_tokens_per_expert", "global_aux_steps")
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel on the module it wraps


def exclude_router_counters_from_ddp(model: torch.nn.Module) -> list[str]:
    """Keep torch's DistributedDataParallel from broadcasting the routers' counters. Call it on the module you are
    about to wrap in DDP (``MoELayer`` and ``MoETransformer`` do it for themselves, for when they are the module
    wrapped); it adds the counters' names to the list DDP reads and returns them.

    Why: DDP copies rank 0's buffers into every rank at each forward (``broadcast_buffers=True``, its default). The
    counters are each rank's own token counts, summed over the ranks only when ``update_expert_bias(group)`` runs
    (or in the forward, with ``set_process_groups``); overwritten with rank 0's, the expert-bias update and the
    global aux loss would use rank 0's tokens several times over, with no error. ``broadcast_buffers=False`` avoids
    it too."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the module to be wrapped in DDP), got "
                        f"{type(model).__name__}")
    names = [f"{prefix}.{name}" if prefix else name
             for prefix, module in model.named_modules() if isinstance(module, TopKRouter)
             for name in _COUNTERS if getattr(module, name, None) is not None]
    ignored = list(getattr(model, _DDP_IGNORE, []))
    object.__setattr__(model, _DDP_IGNORE, ignored + [n for n in names if n not in ignored])
    return names


class TopKRouter(torch.nn.Module):
    """Routes each of T tokens to K of E experts and attaches the load-balancing losses to the probs.

    Parameters: ``weight [E, H]`` (like Hugging Face ``gate.weight``). Buffers: ``expert_bias [E]`` fp32 (persistent,
    only with ``config.expert_bias``), ``local_tokens_per_expert [E]`` fp32 (non-persistent counts since the last
    ``update_expert_bias()``), ``global_tokens_per_expert [E]`` and ``global_aux_steps []`` fp32 (non-persistent,
    only with "global_aux_loss").

    ``forward(x [T, H], seq_len=None) -> RouterOutput``. ``seq_len`` is needed for "seq_aux_loss" in training: the
    T tokens are B = T / seq_len sequences stored batch-major, sequence b owning rows [b·S, (b+1)·S) (the layout of
    ``hidden_states.view(-1, H)`` in Hugging Face models; Megatron's own layout is sequence-major [S, B]).
    """

    def __init__(self, config: RouterConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
        self.config = config
        E, H = config.num_experts, config.hidden_size
        self.weight = torch.nn.Parameter(torch.empty(E, H, device=device, dtype=dtype or torch.float32))
        self._aux_coeffs = config.aux_loss_coeffs()
        self._router_dtype = ROUTER_DTYPES[config.router_dtype]
        # process groups over which loss counts are summed (set_process_groups); None: this process only
        self._token_group = None
        self._sequence_group = None
        self._sequence_split = 1
        fp32 = dict(device=device, dtype=torch.float32)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, **fp32))
            self.register_buffer("local_tokens_per_expert", torch.zeros(E, **fp32), persistent=False)
        else:
            self.register_buffer("expert_bias", None)
            self.register_buffer("local_tokens_per_expert", None, persistent=False)
        if "global_aux_loss" in self._aux_coeffs:
            self.register_buffer("global_tokens_per_expert", torch.zeros(E, **fp32), persistent=False)
            self.register_buffer("global_aux_steps", torch.zeros((), **fp32), persistent=False)
        else:
            self.register_buffer("global_tokens_per_expert", None, persistent=False)
            self.register_buffer("global_aux_steps", None, persistent=False)
        exclude_router_counters_from_ddp(self)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh router: random weight, zero expert bias and counters. The buffers matter after building on the
        meta device and ``to_empty()``, which leaves them uninitialised (a garbage bias would steer routing)."""
        torch.nn.init.normal_(self.weight, std=_INIT_STD)
        for buf in (self.expert_bias, *(getattr(self, name) for name in _COUNTERS)):
            if buf is not None:
                buf.zero_()

    def set_process_groups(self, tokens=None, sequences=None) -> None:
        """Compute the losses over a global batch spread across ranks.

        ``tokens``: the process group of every rank sharing this router and holding its own tokens (in
        moetron.parallel, "tp_cp_dp"); counts, token totals and reported losses are summed over it. ``sequences``:
        the subgroup whose ranks hold pieces of the same sequences (TP sequence parallelism and CP, "tp_cp"), for
        "seq_aux_loss"; each rank passes its chunk of the same B sequences, and ``seq_len`` is the chunk length.
        None for either means this process alone. Every rank of ``tokens`` must then run each training forward
        (also with zero tokens), since the losses take one all_reduce (two with "seq_aux_loss" and ``sequences``).
        """
        import torch.distributed as dist

        if sequences is not None and tokens is None:
            raise ValueError("sequences needs tokens: the sequence group is a subgroup of the token group")
        self._token_group = tokens
        self._sequence_group = sequences
        self._sequence_split = 1 if sequences is None else dist.get_world_size(sequences)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"score_function={c.score_function!r}, load_balancing={c.load_balancing}")

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() must not round the fp32 bookkeeping buffers: keep their exact values, move them only.
        saved = {n: getattr(self, n) for n in _FP32_BUFFERS if getattr(self, n, None) is not None}
        out = super()._apply(fn, recurse)
        for n, before in saved.items():
            after = getattr(self, n)
            if after.dtype != torch.float32:
                self._buffers[n] = before.to(device=after.device)
        return out

    # -- maintenance ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step (Megatron's get_updated_expert_bias): move each expert's bias by
        ``bias_update_rate · sign(mean(counts) - counts)`` using the counts accumulated since the previous call,
        then zero them. Call once per optimizer step. With ``group`` (a torch.distributed process group spanning
        the data/context/tensor-parallel ranks that share this router), the counts are all-reduced over it first."""
        if self.expert_bias is None:
            raise RuntimeError("update_expert_bias needs RouterConfig.expert_bias=True")
        counts = self.local_tokens_per_expert
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        offset = counts.mean() - counts
        self.expert_bias.add_(torch.sign(offset) * self.config.bias_update_rate)
        counts.zero_()

    @torch.no_grad()
    def reset_global_aux_counts(self) -> None:
        """Forget the counts accumulated for "global_aux_loss" (Megatron resets them every optimizer step)."""
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.global_aux_steps.zero_()

    # -- forward ----------------------------------------------------------------------------------------------

    def _check_input(self, x, seq_len):
        cfg = self.config
        check_tensor("x", x, ndim=2)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != cfg.hidden_size:
            raise ValueError(f"x must have shape [T, {cfg.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x must be on the router's device ({self.weight.device}), got {x.device}")
        if seq_len is not None:
            if not is_int(seq_len) or seq_len < 1:
                raise ValueError(f"seq_len must be None or a positive int, got {seq_len!r}")
            if x.shape[0] % seq_len:
                raise ValueError(f"seq_len must divide the number of tokens T={x.shape[0]}, got {seq_len}")

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        self._check_input(x, seq_len)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x, seq_len)

    def _forward(self, x_TH: torch.Tensor, seq_len: int | None) -> RouterOutput:
        cfg = self.config
        T, E, K = x_TH.shape[0], cfg.num_experts, cfg.top_k
        train = self.training and torch.is_grad_enabled()
        sinkhorn = cfg.load_balancing == ("sinkhorn",)
        if train and "seq_aux_loss" in self._aux_coeffs and seq_len is None:
            raise ValueError('seq_len must be given in training when load_balancing has "seq_aux_loss", got None')

        tokens = x_TH  # the experts take x unjittered
        if self.training and cfg.input_jitter is not None:
            eps = cfg.input_jitter
            x_TH = x_TH * torch.empty_like(x_TH).uniform_(1.0 - eps, 1.0 + eps)

        if self._router_dtype == torch.float32 and _env.use_triton(x_TH) and router_gemm.applies(x_TH, self.weight):
            # fp32 GEMMs on bf16 tensor cores, 3 kernels; x's two gradients summed in the dx kernel
            if x_TH is tokens and records_grad(x_TH):
                logits_TE, tokens = router_gemm.router_logits(x_TH, self.weight, pass_tokens=True)
            else:
                logits_TE = router_gemm.router_logits(x_TH, self.weight)
        else:
            split = _use_split_gemm(x_TH, self.weight, self._router_dtype)
            logits_TE = _router_gemm(x_TH, self.weight, self._router_dtype, split)
        if cfg.debug_nan_check or _env.debug_checks_enabled():
            # host sync: debug mode only
            if not bool(torch.isfinite(logits_TE).all()):
                raise ValueError("router logits contain NaN or inf (check the router input x and weight)")

        if self._fusable(logits_TE, sinkhorn):
            return self._fused_forward(logits_TE, train)._replace(tokens=tokens)

        # -- selection and combine weights
        if sinkhorn:
            weights_TE = torch.sigmoid(logits_TE) if K == 1 else torch.softmax(logits_TE, dim=-1)
            if self.training and T > 0:
                with torch.no_grad():
                    ids_TK = torch.topk(_sinkhorn(logits_TE.detach()), K, dim=-1)[1]
            else:
                ids_TK = torch.topk(weights_TE, K, dim=-1)[1]
            probs_TK = torch.gather(weights_TE, 1, ids_TK)
        elif cfg.score_function == "softmax":
            if cfg.pre_softmax:
                probs_TK, ids_TK = _topk(torch.softmax(logits_TE, dim=-1), K, cfg.num_groups, cfg.group_topk)
                if cfg.norm_topk_prob and K > 1:
                    probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
            else:
                top_logits_TK, ids_TK = _topk(logits_TE, K, cfg.num_groups, cfg.group_topk)
                probs_TK = torch.softmax(top_logits_TK, dim=-1)
        else:  # sigmoid
            scores_TE = torch.sigmoid(logits_TE)
            if self.expert_bias is not None:
                select_TE = scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)
                ids_TK = _topk(select_TE, K, cfg.num_groups, cfg.group_topk)[1]
                probs_TK = torch.gather(scores_TE, 1, ids_TK)
            else:
                probs_TK, ids_TK = _topk(scores_TE, K, cfg.num_groups, cfg.group_topk)
            if cfg.norm_topk_prob and K > 1:
                probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.scaling_factor is not None:
            probs_TK = probs_TK * cfg.scaling_factor
        probs_TK = probs_TK.float()
        tokens_per_expert = _count(ids_TK.reshape(1, -1), E, torch.int64).view(E)

        # -- losses (training only), all injected through one identity on the probs
        losses: dict[str, torch.Tensor] = {}
        distributed = self._token_group is not None
        if train and (T > 0 or distributed):  # across ranks, a rank without tokens still joins the reduction
            total = None
            if distributed:
                losses, reported = self._distributed_losses(logits_TE, ids_TK, seq_len)
            else:
                if self._aux_coeffs:
                    losses.update(self._aux_losses(logits_TE, ids_TK, seq_len))
                if cfg.z_loss_coeff is not None:
                    losses["z_loss"] = torch.logsumexp(logits_TE, dim=-1).square().sum() / max(T, 1)
                reported = {name: loss.detach() for name, loss in losses.items()}
            for name, loss in losses.items():
                coeff = cfg.z_loss_coeff if name == "z_loss" else self._aux_coeffs[name]
                if coeff:
                    total = coeff * loss if total is None else total + coeff * loss
            if total is not None:
                probs_TK = _inject_aux_loss(probs_TK, total)
            losses = reported
            if self.local_tokens_per_expert is not None:
                self.local_tokens_per_expert += tokens_per_expert.float()

        return RouterOutput(probs_TK, ids_TK, logits_TE, tokens_per_expert, losses, tokens)

    def _fusable(self, logits_TE: torch.Tensor, sinkhorn: bool) -> bool:
        """Whether ``_fused_forward`` (ops/routing.py's kernels) computes exactly what the code below would."""
        cfg = self.config
        T, E = logits_TE.shape
        return (not sinkhorn and cfg.score_function == "softmax" and cfg.num_groups is None
                and self.expert_bias is None and self._token_group is None and set(self._aux_coeffs) <= {"aux_loss"}
                and logits_TE.dtype == torch.float32 and T > 0 and E <= routing.MAX_EXPERTS
                and cfg.top_k <= routing.MAX_TOP_K and _env.use_triton(logits_TE))

    def _fused_forward(self, logits_TE: torch.Tensor, train: bool) -> RouterOutput:
        cfg = self.config
        probs_TK, ids_TK, tokens_per_expert, losses = routing.softmax_topk(
            logits_TE.contiguous(), cfg.top_k, pre_softmax=cfg.pre_softmax, norm_topk_prob=cfg.norm_topk_prob,
            scaling_factor=cfg.scaling_factor, aux_loss_coeff=self._aux_coeffs.get("aux_loss") if train else None,
            z_loss_coeff=cfg.z_loss_coeff if train else None, loss_scale=_aux_loss_scale)
        return RouterOutput(probs_TK, ids_TK, logits_TE, tokens_per_expert, losses)

    def _aux_scores(self, logits_TE: torch.Tensor, routed_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores the aux losses see (Megatron's compute_routing_scores_for_aux_loss) and each token's top-K
        experts by them: softmax over all E, or sigmoid normalised to sum to 1. Independent of group-limited
        routing and the expert bias, as in Megatron. Without those two, the routed experts are that top-K
        already (softmax and the row normalisation keep the order of the logits and sigmoid scores), so
        ``routed_ids_TK`` is reused instead of a second top-k."""
        cfg = self.config
        if cfg.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
            scores_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.num_groups is None and self.expert_bias is None:
            return scores_TE, routed_ids_TK
        return scores_TE, torch.topk(scores_TE.detach(), cfg.top_k, dim=-1)[1]

    def _aux_losses(self, logits_TE: torch.Tensor, routed_ids_TK: torch.Tensor,
                    seq_len: int | None) -> dict[str, torch.Tensor]:
        """Megatron's compute_routing_scores_for_aux_loss + switch_load_balancing_loss_func for each aux type.
        Not divided by the coefficient: the caller multiplies."""
        cfg = self.config
        T, E, K = logits_TE.shape[0], cfg.num_experts, cfg.top_k
        scores_TE, ids_TK = self._aux_scores(logits_TE, routed_ids_TK)
        out = {}
        if "aux_loss" in self._aux_coeffs or "global_aux_loss" in self._aux_coeffs:
            counts_E = _count(ids_TK.reshape(1, -1), E, scores_TE.dtype).view(E)
            scores_sum_E = scores_TE.sum(dim=0)
            if "aux_loss" in self._aux_coeffs:
                out["aux_loss"] = _switch_aux_loss(scores_sum_E, counts_E, T, K)
            if "global_aux_loss" in self._aux_coeffs:
                self.global_tokens_per_expert += counts_E.float()
                self.global_aux_steps += 1
                mean_counts_E = (self.global_tokens_per_expert / self.global_aux_steps).to(scores_TE.dtype)
                out["global_aux_loss"] = _switch_aux_loss(scores_sum_E, mean_counts_E, T, K)
        if "seq_aux_loss" in self._aux_coeffs:
            B = T // seq_len
            counts_BE = _count(ids_TK.reshape(B, seq_len * K), E, scores_TE.dtype)
            scores_sum_BE = scores_TE.view(B, seq_len, E).sum(dim=1)
            out["seq_aux_loss"] = _switch_aux_loss(scores_sum_BE, counts_BE, seq_len, K)
        return out

    def _distributed_losses(self, logits_TE: torch.Tensor, routed_ids_TK: torch.Tensor, seq_len: int | None):
        """The losses of the global batch spread over ``_token_group``: returns ({name: this rank's share, with
        grad}, {name: global value, detached}). The shares over all ranks add up to the global loss.

        One all_reduce of [counts_E, scores_sum_E, T, sum lse², seq partial, B] in float64 (exact counts past
        2^24) over the token group, preceded for "seq_aux_loss" by one over the sequence group of the
        per-sequence [counts, scores_sum]. No host sync."""
        import torch.distributed as dist

        cfg = self.config
        T, E, K = logits_TE.shape[0], cfg.num_experts, cfg.top_k
        dt = logits_TE.dtype
        scores_TE, ids_TK = self._aux_scores(logits_TE, routed_ids_TK)
        counts_E = _count(ids_TK.reshape(1, -1), E, torch.float64).view(E)
        scores_sum_E = scores_TE.sum(dim=0)
        zero = logits_TE.new_zeros((), dtype=torch.float64)
        lse2 = torch.logsumexp(logits_TE, dim=-1).square().sum() if cfg.z_loss_coeff is not None else None

        seq = "seq_aux_loss" in self._aux_coeffs
        seq_part, B = zero, 0
        if seq:
            B = T // seq_len if seq_len else 0
            S_full = (seq_len or 1) * self._sequence_split
            S = seq_len or 0
            counts_BE = _count(ids_TK.reshape(B, S * K), E, torch.float64)
            scores_sum_BE = scores_TE.reshape(B, S, E).sum(dim=1)
            both = torch.cat([counts_BE, scores_sum_BE.detach().double()], dim=1)
            if self._sequence_group is not None:
                dist.all_reduce(both, group=self._sequence_group)
            seq_counts_BE, seq_scores_BE = both[:, :E], both[:, E:]
            seq_coeff = E / (K * S_full * S_full)
            # each of the sequence group's ranks holds the same full-sequence values: count them once
            seq_part = (seq_scores_BE * seq_counts_BE).sum() * seq_coeff / self._sequence_split
            seq_numer = (scores_sum_BE * seq_counts_BE.to(dt)).sum() * seq_coeff

        stats = torch.cat([counts_E, scores_sum_E.detach().double(),
                           torch.stack([zero + T, zero if lse2 is None else lse2.detach().double(), seq_part,
                                        zero + B])])
        dist.all_reduce(stats, group=self._token_group)
        counts_g, scores_g = stats[:E], stats[E:2 * E]
        T_g, lse2_g, seq_g, B_g = stats[2 * E:].unbind()
        T_g = T_g.clamp(min=1)
        switch = E / (K * T_g * T_g)

        shares, reported = {}, {}
        if "aux_loss" in self._aux_coeffs:
            shares["aux_loss"] = (scores_sum_E * counts_g.to(dt)).sum() * switch.to(dt)
            reported["aux_loss"] = ((scores_g * counts_g).sum() * switch).to(dt)
        if "global_aux_loss" in self._aux_coeffs:
            self.global_tokens_per_expert += counts_g.float()
            self.global_aux_steps += 1
            mean_E = self.global_tokens_per_expert.double() / self.global_aux_steps.double()
            shares["global_aux_loss"] = (scores_sum_E * mean_E.to(dt)).sum() * switch.to(dt)
            reported["global_aux_loss"] = ((scores_g * mean_E).sum() * switch).to(dt)
        if seq:
            num_seqs = (B_g / self._sequence_split).clamp(min=1)
            shares["seq_aux_loss"] = seq_numer / num_seqs.to(dt)
            reported["seq_aux_loss"] = (seq_g / num_seqs).to(dt)
        if lse2 is not None:
            shares["z_loss"] = lse2 / T_g.to(dt)
            reported["z_loss"] = (lse2_g / T_g).to(dt)
        return shares, reported
