"""Cross-entropy of a linear layer's logits (a language model head) without fp32 copies of the logits.

Legend: N rows (tokens), H hidden, V vocabulary (classes).

    logits [N, V] = x [N, H] @ weight [V, H]^T          one cuBLAS GEMM in x's dtype, as nn.Linear computes it
    lse_n  = log(sum_v exp(logits[n, v]))                 fp32, one Triton program per row (online max and sum)
    loss_n = lse_n - logits[n, label_n]                   0 where label_n == ignore_index
    loss   = sum_n loss_n / divisor                       fp32 scalar

    divisor: the number of labels that are not ignore_index ("mean", PyTorch's and transformers' default), 1
    ("sum"), or a given count (transformers' ``num_items_in_batch`` under gradient accumulation).

Backward, with c = dloss / divisor (a device scalar, never read on the host):

    g [N, V] = c * (softmax(logits) - onehot(label))      written over the saved logits, in their dtype
    dx = g @ weight,  dweight = g^T @ x                   two cuBLAS GEMMs, as nn.Linear's backward

Why: transformers' causal-LM loss upcasts the [N, V] logits to fp32 and runs PyTorch's log-softmax and NLL, which
writes and reads several fp32 copies of the logits forward and backward (~6 GB each at N=8192, V=151936). Here
the logits are read once forward (log-sum-exp and the label's logit) and once backward (the gradient, written
in place), in their own dtype. The values are those of the unfused computation: the same bf16 logits from the
same GEMM, fp32 maths, the gradient rounded once to the logits' dtype before the backward GEMMs.

Memory: up to ``max_logits_bytes`` (4 GiB), the logits [N, V] stay alive from the forward to the backward (the
unfused loss keeps them too, plus its fp32 log-probabilities); the backward overwrites them, so it can run once (a
second backward raises). Beyond it (long sequences), the forward runs chunks of rows and computes each chunk's
gradients at once (with dloss = 1; the backward scales them), so one chunk's logits are alive at a time, plus an
fp32 weight gradient [V, H].

Bad labels: a label outside [0, V) that is not ignore_index gives a NaN loss (on the CPU a ValueError); nothing is
read out of bounds and no host sync checks it on the GPU unless ``MOETRON_DEBUG=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env
from ._launch import CachedLauncher
from ._triton_utils import cdiv, interpreter_bf16_fixups, next_power_of_2, to_output_dtype
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .._compile import eager_function
from .._torch_caps import ADDMM_OUT_DTYPE, MM_OUT_DTYPE

# Columns per step of the row loops. Under the interpreter the block is small so that tiny test vocabularies still
# take several steps and a partial last block.
_GPU_BLOCK_V = 4096
_INTERPRETER_BLOCK_V = 16


@triton.jit
def _lse_loss_kernel(logits_ptr, labels_ptr, lse_ptr, loss_ptr, V, stride_row, ignore_index,
                     BLOCK_V: tl.constexpr):
    """One program per row: lse (fp32) and loss = lse - logits[label] (0 if ignored, NaN if out of range)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # running max and sum of exp, per lane
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only -inf (past V) keep s = 0 without computing exp(-inf - -inf) = NaN
        pivot = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - pivot) + tl.exp(x - pivot)
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(total)
    label = tl.load(labels_ptr + row)
    in_range = (label >= 0) & (label < V)
    picked = tl.load(base + label, mask=in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - picked, float("nan"))
    loss = tl.where(label == ignore_index, 0.0, loss)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _grad_kernel(logits_ptr, labels_ptr, lse_ptr, coef_ptr, V, stride_row, ignore_index,
                 BLOCK_V: tl.constexpr, BF16_FIXUPS: tl.constexpr):
    """Program (row, column block): logits[row, cols] <- coef * (exp(logits - lse) - [col == label]), or 0 for
    an ignored row. Each element is read and then written by the same program, so in place is safe."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + cols
    x = tl.load(ptrs, mask=cols < V, other=0.0).to(tl.float32)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr)
    g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
    g = tl.where(label == ignore_index, 0.0, g * coef)
    tl.store(ptrs, to_output_dtype(g, logits_ptr, BF16_FIXUPS), mask=cols < V)


_launch_lse_loss = CachedLauncher(_lse_loss_kernel)
_launch_grad = CachedLauncher(_grad_kernel)


def _block_v(logits: torch.Tensor) -> int:
    return _GPU_BLOCK_V if logits.is_cuda else _INTERPRETER_BLOCK_V


def _lse_and_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """-> (lse [N] fp32, per-row losses [N] fp32) of logits [N, V] (unit last stride)."""
    N, V = logits.shape
    if not _env.use_triton(logits) or N == 0:
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=1)
        in_range = (labels >= 0) & (labels < V)
        picked = lf.gather(1, torch.where(in_range, labels, 0)[:, None]).squeeze(1)
        loss = torch.where(in_range, lse - picked, float("nan"))
        return lse, torch.where(labels == ignore_index, 0.0, loss)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    block = min(_block_v(logits), next_power_of_2(V))
    _launch_lse_loss((N,), (logits, labels, lse, losses, V, logits.stride(0), ignore_index),
                     dict(BLOCK_V=block), num_warps=8 if logits.is_cuda else 1)
    return lse, losses


def _logits_to_grad(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
    """Overwrite logits [N, V] with coef * (softmax - onehot(label)) (zero rows where ignored); returns it."""
    N, V = logits.shape
    if N == 0:
        return logits
    if not _env.use_triton(logits):
        g = torch.exp(logits.float() - lse[:, None])
        g.scatter_add_(1, labels.clamp(0, V - 1)[:, None],
                       torch.where((labels >= 0) & (labels < V), -1.0, 0.0)[:, None])
        g = torch.where((labels == ignore_index)[:, None], 0.0, g * coef)
        return logits.copy_(g)
    block = min(_block_v(logits), next_power_of_2(V))
    _launch_grad((N, cdiv(V, block)), (logits, labels, lse, coef, V, logits.stride(0), ignore_index),
                 dict(BLOCK_V=block, BF16_FIXUPS=interpreter_bf16_fixups(logits)),
                 num_warps=8 if logits.is_cuda else 1)
    return logits


def _fp32_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or += with ``accumulate``: the product kept in fp32 (cuBLAS writes or adds fp32 in its
    epilogue on CUDA for fp16/bf16 operands; elsewhere an fp32 product)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and MM_OUT_DTYPE and ADDMM_OUT_DTYPE:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.add_(a.float() @ b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)


@eager_function
class _LinearCrossEntropy(torch.autograd.Function):
    """Whole: the logits [N, V] are kept from forward to backward. Chunked (``chunk_rows`` < N): the forward runs
    chunks of rows and computes their gradients right away with dloss = 1 (the logits of one chunk alive at a
    time; dx and the accumulated dweight in fp32), and the backward scales them by dloss and rounds them once."""

    @staticmethod
    def forward(ctx, x, weight, labels, divisor, ignore_index, chunk_rows):
        ctx.ignore_index, ctx.used = ignore_index, False
        N = x.shape[0]
        if chunk_rows >= N:
            logits = x @ weight.t()
            lse, losses = _lse_and_losses(logits, labels, ignore_index)
            ctx.save_for_backward(x, weight, labels, lse, divisor)
            ctx.logits, ctx.grads = logits, None
            return losses.sum() / divisor
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        coef = (1.0 / divisor).reshape(1)
        losses = torch.empty(N, dtype=torch.float32, device=x.device)
        dx32 = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            logits = x[rows] @ weight.t()
            lse, chunk_losses = _lse_and_losses(logits, labels[rows], ignore_index)
            losses[rows] = chunk_losses
            if need_x or need_w:
                g = _logits_to_grad(logits, labels[rows], lse, coef, ignore_index)
                if need_x:
                    _fp32_mm(g, weight, dx32[rows], accumulate=False)
                if need_w:
                    _fp32_mm(g.t(), x[rows], dw32, accumulate=True)
            del logits
        ctx.grads = (dx32, dw32)
        ctx.dtypes = (x.dtype, weight.dtype)
        return losses.sum() / divisor

    @staticmethod
    def backward(ctx, dloss):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: its backward overwrites the saved logits with their gradient, "
                               "so it can run once; a second backward (retain_graph=True) is not supported")
        ctx.used = True
        if ctx.grads is not None:  # chunked: the fp32 gradients for dloss = 1 are ready
            (dx32, dw32), (x_dtype, w_dtype) = ctx.grads, ctx.dtypes
            ctx.grads = None
            scale = dloss.float()
            return (None if dx32 is None else (dx32 * scale).to(x_dtype),
                    None if dw32 is None else dw32.mul_(scale).to(w_dtype), None, None, None, None)
        x, weight, labels, lse, divisor = ctx.saved_tensors
        coef = (dloss.float() / divisor).reshape(1)
        g = _logits_to_grad(ctx.logits, labels, lse, coef, ctx.ignore_index)
        ctx.logits = None
        dx = g @ weight if ctx.needs_input_grad[0] else None
        dweight = g.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dweight, None, None, None, None


# Above this many bytes of logits, the rows run in chunks of about this size (the chunked path of
# _LinearCrossEntropy): 4 GiB holds 8192 rows of a 152k vocabulary in bf16 whole, the fastest way.
DEFAULT_MAX_LOGITS_BYTES = 4 << 30


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", num_items: torch.Tensor | int | None = None,
                         max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T`` against ``labels``, without fp32 copies of the logits (module docstring).

    Args:
        x: ``[N, H]`` fp16/bf16/fp32 rows (leading dims are flattened: ``[B, S, H]`` is fine).
        weight: ``[V, H]`` the head's weight (``nn.Linear(H, V, bias=False).weight``), x's dtype (under
            ``torch.autocast`` both are cast to the autocast dtype, as ``nn.Linear`` would).
        labels: int64/int32 class of each row, ``x``'s leading shape; ``ignore_index`` marks rows to skip.
        reduction: "mean" (over labels that are not ignored; NaN if there are none, as in PyTorch) or "sum".
        num_items: divide the sum by this instead (a tensor stays on the device); overrides ``reduction``.
        max_logits_bytes: memory for logits. Up to it, the [N, V] logits are computed whole and kept for the
            backward; beyond it, rows run in chunks of that size, each chunk's gradients computed in the forward
            (in fp32: dweight accumulated over the chunks, V·H·4 bytes), and the backward scales them by dloss.

    Returns the fp32 scalar loss. Gradients reach x and weight; the backward can run once.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    check_same_device("weight", weight, "x", x)
    check_same_device("labels", labels, "x", x)
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one row (one class), got shape {tuple(weight.shape)}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, got {tuple(x.shape)}")
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"labels must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(labels.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(max_logits_bytes, int) or isinstance(max_logits_bytes, bool) or max_logits_bytes <= 0:
        raise ValueError(f"max_logits_bytes must be a positive int, got {max_logits_bytes!r}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype (outside autocast), got {x.dtype} and {weight.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    flat = labels.reshape(-1).long()
    V = weight.shape[0]
    if flat.numel() and (flat.device.type == "cpu" or _env.debug_checks_enabled()):
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
        if bool(bad.any()):  # free on the CPU; a sync in GPU debug mode
            raise ValueError(f"labels must lie in [0, {V}) (the vocabulary, weight.shape[0]) or equal ignore_index="
                             f"{ignore_index}, got {flat[bad][:5].tolist()}")
    if num_items is not None:
        divisor = torch.as_tensor(num_items, dtype=torch.float32, device=x.device).reshape(())
    elif reduction == "mean":
        divisor = (flat != ignore_index).sum().float()
    else:
        divisor = torch.ones((), dtype=torch.float32, device=x.device)
    chunk_rows = max(1, max_logits_bytes // (V * x2.element_size()))
    return _LinearCrossEntropy.eager_apply(x2.contiguous(), weight.contiguous(), flat, divisor, ignore_index,
                                           chunk_rows)


def linear_cross_entropy_ref(x, weight, labels, *, ignore_index=-100, reduction="mean", num_items=None):
    """The plain computation (fp64 logits, PyTorch's cross_entropy), for tests."""
    logits = x.reshape(-1, x.shape[-1]).double() @ weight.double().t()
    flat = labels.reshape(-1).long()
    loss = torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index,
                                             reduction="sum" if num_items is not None else reduction)
    return loss if num_items is None else loss / num_items
