"""Fused softmax top-k routing: selection, combine weights, counts and the aux / z losses in three small kernels.

Legend: T tokens, E experts, K top-k, P programs of the forward kernel.

    softmax_topk(logits [T, E] fp32, K, pre_softmax=False, norm_topk_prob=False, scaling_factor=None,
                 aux_loss_coeff=None, z_loss_coeff=None)
        -> (probs [T, K] fp32, ids [T, K] int64, tokens_per_expert [E] int64, {"aux_loss": [], "z_loss": []})

Same maths as the router's PyTorch code (moetron/router.py, Megatron-Core's formulas):
- pre_softmax=False: top-k on the logits, softmax over the k selected;
  pre_softmax=True: softmax over all E, top-k of it, renormalised to sum 1 when ``norm_topk_prob`` (and K > 1);
  then ``probs *= scaling_factor``. Ties pick the lowest expert id.
- aux_loss = E / (K·T²) · Σ_e (Σ_t softmax(logits)[t, e]) · counts[e], counts from the selected ids;
  z_loss = mean_t logsumexp(logits[t])². Reported without their coefficients (1.0 = a balanced aux loss).
- backward: the gradient of the combine weights, plus ``coeff · loss_scale`` times the gradient of each loss
  (what the router's AuxLossAutoScaler injects), all into one d(logits).
- the router uses it on Triton's path (CUDA) for softmax scores without groups, expert bias or sinkhorn, fp32
  gate maths, one process, and at most the "aux_loss" balancing type (plus z-loss); everything else takes the
  PyTorch code.

Why fused: the PyTorch router runs ~25 small ops forward and ~30 backward (two softmaxes, top-k, two counts, the
loss arithmetic and their autograd nodes). At Qwen3-30B's layer with T=8192 a training step of the layer is close
to host-bound (benchmarks/NOTES.md, session 7), so those launches cost wall time as well as ~0.1 ms of kernels.
Here: a zeroed count buffer, the forward kernel and (with losses) a one-program reduction; one kernel backward.
The per-expert score sums go through per-program partial rows reduced in a fixed order, so the losses are
bitwise reproducible (the counts use integer atomics, exact in any order).

Layout of this file: Triton kernels, launchers, autograd, public function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import CachedLauncher
from ._triton_utils import cdiv, next_power_of_2
from .._compile import compiling, eager_function

MAX_EXPERTS = 1024  # one row of logits per program row in registers
MAX_TOP_K = 16  # the selection loop is unrolled K times
_TILE = 4096  # logits per program of the forward (BT rows x BE columns)
# The backward, a few dependent passes over its rows, runs faster with more, smaller programs in flight (session
# 16, H100, T=8192 / 32768 at 128 experts: 11.4 / 47.4 us with 4096 logits per program, 6.0 / 21.6 with 1024,
# bitwise the same); the forward's top-k loop and count atomics went the other way (16.9 -> 29.2 us at T=8192).
_BWD_TILE = 1024
_LOSS_TILE = 32768  # partial sums per step of the loss reduction (BP rows x BE columns)


@triton.jit
def _row_softmax(logits_ptr, rows, cols, T, E):
    """The [BT, BE] tile of logits (-inf outside), its softmax S (0 outside), and each row's logsumexp."""
    row_ok = rows < T
    ok = row_ok[:, None] & (cols[None, :] < E)
    lg = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=ok, other=float("-inf"))
    m = tl.where(row_ok, tl.max(lg, axis=1), 0.0)  # rows past T: all -inf, keep them finite
    ex = tl.where(ok, tl.exp(lg - m[:, None]), 0.0)
    z = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)
    return lg, ex / z[:, None], m + tl.log(z), m, z


@triton.jit
def _route_fwd_kernel(logits_ptr, probs_ptr, ids_ptr, counts_ptr, score_sums_ptr, lse2_sums_ptr, T, E, scale,
                      K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                      PRE_SOFTMAX: tl.constexpr, NORM: tl.constexpr, LOSS_SUMS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    kcols = tl.arange(0, BK)
    row_ok = rows < T
    col_ok = cols < E
    lg, S, lse, m, z = _row_softmax(logits_ptr, rows, cols, T, E)
    if PRE_SOFTMAX:
        work = tl.where(col_ok[None, :], S, float("-inf"))
    else:
        work = lg
    sel = tl.zeros((BT, BK), dtype=tl.float32)
    sel_ids = tl.zeros((BT, BK), dtype=tl.int32)
    hist = tl.zeros((BE,), dtype=tl.int32)
    for k in tl.static_range(K):
        v = tl.max(work, axis=1)
        # lowest id among the maxima; min() keeps a NaN row's ids in range
        idx = tl.minimum(tl.min(tl.where(work == v[:, None], cols[None, :], BE), axis=1), E - 1)
        hit = cols[None, :] == idx[:, None]
        sel = tl.where(kcols[None, :] == k, v[:, None], sel)
        sel_ids = tl.where(kcols[None, :] == k, idx[:, None], sel_ids)
        work = tl.where(hit, float("-inf"), work)
        hist += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
    k_ok = kcols[None, :] < K
    if PRE_SOFTMAX:
        p = tl.where(k_ok, sel, 0.0)
        if NORM:
            p = p / (tl.sum(p, axis=1)[:, None] + 1e-20)
    else:
        top = tl.where(row_ok, tl.max(tl.where(k_ok, sel, float("-inf")), axis=1), 0.0)
        e = tl.where(k_ok, tl.exp(sel - top[:, None]), 0.0)
        p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    store_ok = row_ok[:, None] & k_ok
    tl.store(probs_ptr + out, p * scale, mask=store_ok)
    tl.store(ids_ptr + out, sel_ids.to(tl.int64), mask=store_ok)
    tl.atomic_add(counts_ptr + cols, hist.to(tl.int64), mask=col_ok)
    if LOSS_SUMS:
        tl.store(score_sums_ptr + pid * BE + cols, tl.sum(S, axis=0))
        tl.store(lse2_sums_ptr + pid, tl.sum(tl.where(row_ok, lse * lse, 0.0), axis=0))


@triton.jit
def _route_losses_kernel(score_sums_ptr, lse2_sums_ptr, counts_ptr, out_ptr, P, E, aux_factor, inv_T,
                         BE: tl.constexpr, BP: tl.constexpr):
    """One program: the per-program partial sums reduced in a fixed order; out = [aux_loss, z_loss]."""
    cols = tl.arange(0, BE)
    score_sum = tl.zeros((BE,), dtype=tl.float32)
    lse2 = tl.zeros((BP,), dtype=tl.float32)
    for p0 in range(0, P, BP):
        prow = p0 + tl.arange(0, BP)
        tile = tl.load(score_sums_ptr + prow[:, None] * BE + cols[None, :], mask=prow[:, None] < P, other=0.0)
        score_sum += tl.sum(tile, axis=0)
        lse2 += tl.load(lse2_sums_ptr + prow, mask=prow < P, other=0.0)
    counts = tl.load(counts_ptr + cols, mask=cols < E, other=0).to(tl.float32)
    tl.store(out_ptr, tl.sum(score_sum * counts, axis=0) * aux_factor)
    tl.store(out_ptr + 1, tl.sum(lse2, axis=0) * inv_T)


@triton.jit
def _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K: tl.constexpr, k: tl.constexpr):
    """Slot k of each row: (expert id, its logit, the incoming gradient of its combine weight)."""
    at = rows.to(tl.int64) * K + k
    idk = tl.load(ids_ptr + at, mask=row_ok, other=0)
    logit = tl.load(logits_ptr + rows.to(tl.int64) * E + idk, mask=row_ok, other=0.0)
    return idk, logit, tl.load(dprobs_ptr + at, mask=row_ok, other=0.0)


@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, dprobs_ptr, counts_ptr, loss_scale_ptr, dlogits_ptr, T, E, scale,
                      aux_grad, z_grad, loss_scale,
                      K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PRE_SOFTMAX: tl.constexpr,
                      NORM: tl.constexpr, HAS_DPROBS: tl.constexpr, AUX: tl.constexpr, ZLOSS: tl.constexpr,
                      SCALE_TENSOR: tl.constexpr):
    """d(logits) = [aux and z-loss terms] · coeff · loss_scale + the combine weights' backward."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols[None, :] < E)
    lg, S, lse, m, z = _row_softmax(logits_ptr, rows, cols, T, E)
    ls = tl.load(loss_scale_ptr).to(tl.float32) if SCALE_TENSOR else loss_scale
    dl = tl.zeros((BT, BE), dtype=tl.float32)
    if AUX:  # d/dS[t, e] of E/(K·T²)·Σ S·counts is aux_grad·counts[e] for every t, then softmax's backward
        g = tl.load(counts_ptr + cols, mask=cols < E, other=0).to(tl.float32) * (aux_grad * ls)
        dl += S * (g[None, :] - tl.sum(S * g[None, :], axis=1)[:, None])
    if ZLOSS:  # d/dlogits of lse² / T is 2·lse·S / T
        dl += S * (2.0 * z_grad * ls * lse)[:, None]
    if HAS_DPROBS:
        if PRE_SOFTMAX:
            p_sum = tl.zeros((BT,), dtype=tl.float32)
            dot_q = tl.zeros((BT,), dtype=tl.float32)
            for k in tl.static_range(K):
                _, lk, dk = _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K, k)
                pk = tl.exp(lk - m) / z
                p_sum += pk
                dot_q += pk * dk
            denom = p_sum + 1e-20
            dS = tl.zeros((BT, BE), dtype=tl.float32)
            dot_s = tl.zeros((BT,), dtype=tl.float32)
            for k in tl.static_range(K):
                idk, lk, dk = _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K, k)
                pk = tl.exp(lk - m) / z
                dk = dk * scale
                if NORM:  # q = p / (Σp + 1e-20): dp = (dq - Σ q·dq) / (Σp + 1e-20)
                    dk = (dk - dot_q * scale / denom) / denom
                dS = tl.where(cols[None, :] == idk[:, None], dk[:, None], dS)
                dot_s += pk * dk
            dl += S * (dS - dot_s[:, None])
        else:  # p = softmax over the K selected logits
            top = tl.zeros((BT,), dtype=tl.float32) + float("-inf")
            for k in tl.static_range(K):
                _, lk, _ = _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K, k)
                top = tl.maximum(top, lk)
            e_sum = tl.zeros((BT,), dtype=tl.float32)
            e_dot = tl.zeros((BT,), dtype=tl.float32)
            for k in tl.static_range(K):
                _, lk, dk = _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K, k)
                ek = tl.exp(lk - top)
                e_sum += ek
                e_dot += ek * dk
            dot = e_dot / e_sum * scale
            for k in tl.static_range(K):
                idk, lk, dk = _kth_slot(ids_ptr, logits_ptr, dprobs_ptr, rows, row_ok, E, K, k)
                pk = tl.exp(lk - top) / e_sum
                dl = tl.where(cols[None, :] == idk[:, None], dl + (pk * (dk * scale - dot))[:, None], dl)
    tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dl, mask=ok)


_fwd_launcher = CachedLauncher(_route_fwd_kernel)
_losses_launcher = CachedLauncher(_route_losses_kernel)
_bwd_launcher = CachedLauncher(_route_bwd_kernel)


def _tile(E: int, logits_per_program: int = _TILE) -> tuple[int, int]:
    BE = next_power_of_2(max(E, 2))
    return max(1, logits_per_program // BE), BE


def _softmax_topk_forward(logits, k, pre_softmax, norm, scale, with_losses):
    """(probs [T, K] fp32, ids [T, K] int64, counts [E] int64, losses [2]: aux_loss, z_loss; unset without
    ``with_losses``)."""
    T, E = logits.shape
    BT, BE = _tile(E)
    P = cdiv(T, BT)
    probs = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device)
    score_sums = logits.new_empty((P, BE)) if with_losses else probs
    lse2_sums = logits.new_empty((P,)) if with_losses else probs
    _fwd_launcher((P,), [logits, probs, ids, counts, score_sums, lse2_sums, T, E, float(scale)],
                  dict(K=k, BT=BT, BE=BE, BK=next_power_of_2(k), PRE_SOFTMAX=pre_softmax, NORM=norm,
                       LOSS_SUMS=with_losses), num_warps=4)
    losses = logits.new_empty((2,))
    if with_losses:
        # the one program reads the P partial rows in a few wide steps: a step is a dependent round trip to
        # memory (session 16, H100, T=8192, P=256: 16 rows a step 34.5 us, 256 rows with 16 warps 10.7 us)
        _losses_launcher((1,), [score_sums, lse2_sums, counts, losses, P, E, E / (k * T * T), 1.0 / T],
                         dict(BE=BE, BP=min(256, max(16, _LOSS_TILE // BE))), num_warps=16)
    return probs, ids, counts, losses


def _softmax_topk_backward(dprobs, logits, ids, counts, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale):
    """d(logits), or None when there is nothing to back-propagate. ``loss_scale``: a float or a 0-d tensor."""
    T, E = logits.shape
    BT, BE = _tile(E, _BWD_TILE)
    aux = bool(aux_coeff)
    zl = bool(z_coeff)
    if dprobs is None and not aux and not zl:
        return None
    dlogits = torch.empty_like(logits)
    scale_tensor = isinstance(loss_scale, torch.Tensor)
    dp = dprobs.contiguous() if dprobs is not None else logits
    _bwd_launcher((cdiv(T, BT),),
                  [logits, ids, dp, counts, loss_scale if scale_tensor else logits, dlogits, T, E, float(scale),
                   float(aux_coeff or 0.0) * E / (k * T * T), float(z_coeff or 0.0) / T,
                   1.0 if scale_tensor else float(loss_scale)],
                  dict(K=k, BT=BT, BE=BE, PRE_SOFTMAX=pre_softmax, NORM=norm, HAS_DPROBS=dprobs is not None,
                       AUX=aux, ZLOSS=zl, SCALE_TENSOR=scale_tensor), num_warps=4)
    return dlogits


@eager_function
class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale):
        with_losses = aux_coeff is not None or z_coeff is not None
        probs, ids, counts, losses = _softmax_topk_forward(logits, k, pre_softmax, norm, scale, with_losses)
        ctx.save_for_backward(logits, ids, counts)
        ctx.args = (k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale)
        ctx.mark_non_differentiable(ids, counts, losses)
        return probs, ids, counts, losses

    @staticmethod
    def backward(ctx, dprobs, _ids, _counts, _losses):
        logits, ids, counts = ctx.saved_tensors
        k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale = ctx.args
        if callable(loss_scale):
            loss_scale = loss_scale()
        dlogits = _softmax_topk_backward(dprobs, logits, ids, counts, k, pre_softmax, norm, scale, aux_coeff, z_coeff,
                                         loss_scale)
        return dlogits, None, None, None, None, None, None, None


# Under torch.compile: the same kernels as custom ops with a registered autograd formula (no graph break; see
# moetron/_compile.py). The loss scale is read when the forward runs and travels as a 0-d tensor: a compiled
# backward is traced once, so it cannot read the scale at backward time as the eager Function does.
@torch.library.custom_op("moetron::softmax_topk", mutates_args=(),
                         schema="(Tensor logits, int k, bool pre_softmax, bool norm, float scale, float? aux_coeff, "
                                "float? z_coeff, Tensor loss_scale) -> (Tensor, Tensor, Tensor, Tensor)")
def _softmax_topk_op(logits, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale):
    # loss_scale is only kept for the backward
    return _softmax_topk_forward(logits, k, pre_softmax, norm, scale, aux_coeff is not None or z_coeff is not None)


@_softmax_topk_op.register_fake
def _(logits, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale):
    T, E = logits.shape
    return (logits.new_empty(T, k), logits.new_empty(T, k, dtype=torch.int64),
            logits.new_empty(E, dtype=torch.int64), logits.new_empty(2))


@torch.library.custom_op("moetron::softmax_topk_backward", mutates_args=(),
                         schema="(Tensor dprobs, Tensor logits, Tensor ids, Tensor counts, int k, bool pre_softmax, "
                                "bool norm, float scale, float aux_coeff, float z_coeff, Tensor loss_scale) -> Tensor")
def _softmax_topk_backward_op(dprobs, logits, ids, counts, k, pre_softmax, norm, scale, aux_coeff, z_coeff,
                              loss_scale):
    dlogits = _softmax_topk_backward(dprobs, logits, ids, counts, k, pre_softmax, norm, scale, aux_coeff, z_coeff,
                                     loss_scale)
    return torch.zeros_like(logits) if dlogits is None else dlogits


@_softmax_topk_backward_op.register_fake
def _(dprobs, logits, ids, counts, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale):
    return torch.empty_like(logits)


def _softmax_topk_op_setup(ctx, inputs, output):
    logits, k, pre_softmax, norm, scale, aux_coeff, z_coeff, loss_scale = inputs
    _, ids, counts, losses = output
    ctx.save_for_backward(logits, ids, counts, loss_scale)
    ctx.args = (k, pre_softmax, norm, scale, aux_coeff or 0.0, z_coeff or 0.0)
    ctx.mark_non_differentiable(ids, counts, losses)


def _softmax_topk_op_backward(ctx, dprobs, _ids, _counts, _losses):
    logits, ids, counts, loss_scale = ctx.saved_tensors
    dlogits = torch.ops.moetron.softmax_topk_backward(dprobs, logits, ids, counts, *ctx.args, loss_scale)
    return (dlogits,) + (None,) * 7


_softmax_topk_op.register_autograd(_softmax_topk_op_backward, setup_context=_softmax_topk_op_setup)


def softmax_topk(logits: torch.Tensor, k: int, *, pre_softmax: bool = False, norm_topk_prob: bool = False,
                 scaling_factor: float | None = None, aux_loss_coeff: float | None = None,
                 z_loss_coeff: float | None = None, loss_scale=1.0):
    """Softmax top-k routing of ``logits [T, E]`` (fp32, contiguous, 0 < T, E <= MAX_EXPERTS,
    K <= min(E, MAX_TOP_K)); see the module docstring. The losses are computed (and their gradients added to
    d(logits), times their coefficient and ``loss_scale``, read when this is called) only for the coefficients
    given; ``loss_scale`` is a float, a 0-d tensor on the device, or a function returning one, called in backward
    (the router passes AuxLossAutoScaler's class-level scale, read at backward time as that node does).
    Returns (probs [T, K], ids [T, K], tokens_per_expert [E], losses {name: 0-d tensor, detached})."""
    T, E = logits.shape
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"logits must be a contiguous float32 [T, E] tensor, got {logits.dtype}, "
                         f"strides {logits.stride()}")
    if not (T > 0 and 0 < k <= min(E, MAX_TOP_K) and E <= MAX_EXPERTS):
        raise ValueError(f"softmax_topk needs T > 0, 0 < k <= min(E, {MAX_TOP_K}) and E <= {MAX_EXPERTS}; got "
                         f"T={T}, E={E}, k={k}")
    norm = bool(pre_softmax and norm_topk_prob and k > 1)
    scale = 1.0 if scaling_factor is None else float(scaling_factor)
    if compiling():
        if callable(loss_scale):
            loss_scale = loss_scale()
        loss_scale = torch.as_tensor(loss_scale, dtype=torch.float32, device=logits.device).reshape(())
        probs, ids, counts, loss_values = torch.ops.moetron.softmax_topk(
            logits, k, bool(pre_softmax), norm, scale, aux_loss_coeff, z_loss_coeff, loss_scale)
    else:
        probs, ids, counts, loss_values = _SoftmaxTopK.eager_apply(logits, k, bool(pre_softmax), norm, scale,
                                                                   aux_loss_coeff, z_loss_coeff, loss_scale)
    losses = {}
    if aux_loss_coeff is not None:
        losses["aux_loss"] = loss_values[0]
    if z_loss_coeff is not None:
        losses["z_loss"] = loss_values[1]
    return probs, ids, counts, losses
