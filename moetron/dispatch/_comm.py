"""Differentiable collectives for the dispatchers (each backward is the forward's adjoint).

Legend: P ranks in the group, N rows, H hidden (any trailing shape).

    all_to_all(x [N, ...], out_splits, in_splits, group)   AllToAllV (equal splits when both are None)
    all_gather(x [N, ...], group) -> [P·N, ...]            backward: reduce-scatter (sum)
    reduce_scatter(x [P·N, ...], group) -> [N, ...]        backward: all-gather
    all_gather_v(x [n_rank, ...], sizes, rank, group)      AllGatherV with host-known sizes, via a padded gather
    reduce_scatter_v(x [sum(sizes), ...], sizes, rank, group)   its adjoint
    gather_tokens(x, probs, group)                         x and probs gathered in one node (fixed order)

Every rank of the group must call these in the same order, and autograd must run the backward on every rank
(it does when each rank differentiates a loss built from the layer's output, even an empty one). Split sizes
are Python ints: nothing here reads device data on the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from .._compile import eager_function


def _all_gather_flat(out, x, group):
    # torch 2.13 renames the flat-tensor collectives (the old names warn); torch 2.9 has only the old ones
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_flat(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """Every rank's ``x`` concatenated along dim 0 into ``out`` (no autograd)."""
    _all_gather_flat(out, x, group=group)


def _empty_rows(like: torch.Tensor, n: int) -> torch.Tensor:
    return like.new_empty((n,) + tuple(like.shape[1:]))


def _a2a(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    x = x.contiguous()
    n_out = x.shape[0] if out_splits is None else sum(out_splits)
    out = _empty_rows(x, n_out)
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


@eager_function
class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    """Rows ``x[sum(in_splits[:j]) : ...]`` go to group rank j; the result holds ``out_splits[j]`` rows from rank
    j, in rank order. Both None: equal splits."""
    return _AllToAll.eager_apply(x, out_splits, in_splits, group)


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = _empty_rows(x, x.shape[0] * dist.get_world_size(group))
    _all_gather_flat(out, x, group=group)
    return out


def _scatter_sum(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = _empty_rows(x, x.shape[0] // dist.get_world_size(group))
    _reduce_scatter_flat(out, x, group=group)
    return out


@eager_function
class _AllGather(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sum(grad, ctx.group), None


@eager_function
class _ReduceScatter(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) in rank order."""
    return _AllGather.eager_apply(x, group)


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x [P·N, ...]`` over the ranks and keep this rank's block of N rows."""
    return _ReduceScatter.eager_apply(x, group)


def _gather_v(x, sizes, group):
    m = max(sizes)
    if m == 0:
        return _empty_rows(x, 0)
    buf = x.new_zeros((m,) + tuple(x.shape[1:]))
    buf[:x.shape[0]] = x
    full = _gather(buf, group)
    return torch.cat([full[j * m:j * m + n] for j, n in enumerate(sizes)])


def _scatter_v(x, sizes, rank, group):
    m = max(sizes)
    if m == 0:
        return _empty_rows(x, 0)
    buf = x.new_zeros((m * len(sizes),) + tuple(x.shape[1:]))
    start = 0
    for j, n in enumerate(sizes):
        buf[j * m:j * m + n] = x[start:start + n]
        start += n
    return _scatter_sum(buf, group)[:sizes[rank]]


@eager_function
class _AllGatherV(Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, rank, group)
        return _gather_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_v(grad, *ctx.args), None, None, None


@eager_function
class _ReduceScatterV(Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, group)
        return _scatter_v(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.args
        return _gather_v(grad, sizes, group), None, None, None


def all_gather_v(x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """AllGatherV: rank j contributes ``sizes[j]`` rows (``x`` here has ``sizes[rank]``); the result is their
    concatenation in rank order. Gathers max(sizes) rows from every rank (padding), then compacts."""
    return _AllGatherV.eager_apply(x, sizes, rank, group)


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """ReduceScatterV: ``x`` holds ``sum(sizes)`` rows in blocks of ``sizes[j]``; block j is summed over the ranks
    and kept by rank j."""
    return _ReduceScatterV.eager_apply(x, sizes, rank, group)


@eager_function
class _GatherTokens(Function):
    @staticmethod
    def forward(ctx, x, probs, group):
        ctx.group = group
        return _gather(x, group), _gather(probs, group)

    @staticmethod
    def backward(ctx, grad_x, grad_probs):
        dx = _scatter_sum(grad_x, ctx.group) if ctx.needs_input_grad[0] else None
        dprobs = _scatter_sum(grad_probs, ctx.group) if ctx.needs_input_grad[1] else None
        return dx, dprobs, None


def gather_tokens(x: torch.Tensor, probs: torch.Tensor, group):
    """(all_gather(x), all_gather(probs)) as one autograd node, so the backward's two reduce-scatters run in a
    fixed order on every rank."""
    return _GatherTokens.eager_apply(x, probs, group)


@torch.no_grad()
def gather_nograd(x: torch.Tensor, group) -> torch.Tensor:
    return _gather(x, group)


@torch.no_grad()
def all_to_all_nograd(x: torch.Tensor, group) -> torch.Tensor:
    return _a2a(x, None, None, group)
