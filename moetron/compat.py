"""Drop-in entry points with the signatures of the seed operators, so code written against them can switch by
changing an import (``from moetron.compat import npu_gmm``)."""

from __future__ import annotations

import torch

from .ops.gmm import gmm, gmm_k

_GROUP_TYPES = {-1: "no grouping (plain matmul)", 0: "m-grouped", 1: "n-grouped", 2: "k-grouped"}


def npu_gmm(x, weight, bias=None, group_list=None, group_type=0, group_list_type=0, gemm_fusion=False,
            original_weight=None):
    """The seed's ``npu_gmm`` on top of :func:`moetron.gmm` / :func:`moetron.gmm_k` (single tensors only).

    - ``group_type=0`` (m-grouped): ``x [M, K]``, ``weight [G, K, N]``, ``bias [G, N]`` -> ``[M, N]``.
    - ``group_type=2`` (k-grouped, the weight gradient): ``x [K, M]`` (the transposed activations, as callers
      pass ``x.t()``), ``weight [M, N]`` (the output gradient) -> ``[G, K, N]``, grouped over M. With
      ``gemm_fusion=True`` the result is added into ``original_weight.main_grad`` (fp32), which is returned.
    - ``group_type=-1``: plain ``x @ weight (+ bias)``.
    - ``group_type=1`` (n-grouped) is not implemented.

    ``group_list`` is cumulative ends when ``group_list_type=0`` (the default) and per-group counts when 1;
    a Python list or an int tensor on the CPU or x's device.
    """
    if group_type not in _GROUP_TYPES:
        raise ValueError(f"group_type must be one of {sorted(_GROUP_TYPES)}, got {group_type!r}")
    if group_list_type not in (0, 1):
        raise ValueError(f"group_list_type must be 0 (cumulative ends) or 1 (counts), got {group_list_type!r}")
    if isinstance(x, (list, tuple)) or isinstance(weight, (list, tuple)):
        raise TypeError("npu_gmm here takes single tensors for x and weight, got a list; concatenate the rows "
                        "into one x and stack the weights into one [G, K, N] tensor")
    if group_type == 1:
        raise NotImplementedError("npu_gmm group_type=1 (n-grouped) is not implemented in moetron; use "
                                  "group_type=0 on the transposed problem")
    if group_type == -1:
        if group_list is not None:
            raise ValueError("group_list must be None with group_type=-1 (no grouping), got a value")
        out = x @ weight
        return out if bias is None else out + bias
    if group_list is None:
        raise ValueError(f"group_list is required with group_type={group_type}, got None")
    sizes = {"offsets": group_list} if group_list_type == 0 else {"group_sizes": group_list}
    if group_type == 0:
        if gemm_fusion:
            raise ValueError("gemm_fusion=True applies to group_type=2 (the weight gradient), got group_type=0")
        return gmm(x, weight, bias=bias, **sizes)
    # group_type == 2
    if bias is not None:
        raise ValueError("bias must be None with group_type=2 (k-grouped), got a tensor")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [K, M] tensor with group_type=2, got {getattr(x, 'shape', x)}")
    if gemm_fusion:
        main_grad = getattr(original_weight, "main_grad", None)
        if main_grad is None:
            raise ValueError("gemm_fusion=True needs original_weight with an fp32 .main_grad attribute, got "
                             f"{'None' if original_weight is None else 'a weight without main_grad'}")
        return gmm_k(x.t(), weight, out=main_grad, accumulate=True, **sizes)
    return gmm_k(x.t(), weight, **sizes)


# ---------------------------------------------------------------------------------------------------------
# MoeDistributeDispatch / MoeDistributeCombine (moetron.dispatch.fused underneath)
# ---------------------------------------------------------------------------------------------------------

_QUANT_MODES = {0: None, 2: "int8"}
_HANDLE_ATTR = "_moetron_fused_handle"


def _resolve_group(group, name: str, world_size, rank_id, what: str):
    """A process group from a group or its name; checks the declared size and rank against it."""
    import torch.distributed as dist

    if group in (None, ""):
        return None, 1, 0
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        try:
            group = _resolve_process_group(group)
        except Exception as err:
            raise ValueError(f"{name} must be a process group or the name of one, got unknown name {group!r}") \
                from err
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if world_size is not None and world_size not in (0,) and world_size != size:
        raise ValueError(f"{what}_world_size must equal the size of {name} ({size}), got {world_size}")
    if rank_id is not None and size > 1 and rank_id != rank:
        raise ValueError(f"{what}_rank_id must equal this rank's index in {name} ({rank}), got {rank_id}")
    return group, size, rank


def _reserved(**kw):
    for name, (value, default) in kw.items():
        if value is not None and not (default is not None and value == default):
            raise ValueError(f"{name} is a reserved argument of the seed operator and is not supported; pass "
                             f"{'None' if default is None else repr(default)}, got {value!r}")


def _common(group_ep, ep_world_size, ep_rank_id, group_tp, tp_world_size, tp_rank_id, expert_shard_type,
            shared_expert_num, shared_expert_rank_num, global_bs):
    if expert_shard_type != 0:
        raise ValueError(f"expert_shard_type must be 0 (shared-expert ranks placed before the MoE ranks), got "
                         f"{expert_shard_type!r}")
    ep, P, _ = _resolve_group(group_ep, "group_ep", ep_world_size, ep_rank_id, "ep")
    if ep is None:
        raise ValueError("group_ep must be a process group or its name, got None")
    tp = None
    if tp_world_size not in (0, 1) or group_tp not in (None, ""):
        tp, P_tp, _ = _resolve_group(group_tp, "group_tp", tp_world_size, tp_rank_id, "tp")
        if P_tp == 1:
            tp = None
    if not isinstance(global_bs, int) or global_bs < 0 or (global_bs and global_bs % P):
        raise ValueError(f"global_bs must be 0 or a multiple of ep_world_size = {P} (max BS x ep_world_size), got "
                         f"{global_bs!r}")
    max_bs = global_bs // P if global_bs else None
    n_sh = shared_expert_num if shared_expert_rank_num else 0
    return ep, tp, max_bs, n_sh


def moe_distribute_dispatch(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
                            x_active_mask=None, expert_scales=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                            expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
                            global_bs=0, expert_token_nums_type=1, transport="auto"):
    """The seed's MoeDistributeDispatch: returns ``(expand_x, dynamic_scales, expand_idx, expert_token_nums,
    ep_recv_counts, tp_recv_counts, expand_scales)``.

    - ``quant_mode``: 0 (none) or 2 (per-token dynamic int8; ``dynamic_scales`` [A] fp32). ``scales`` (smooth-quant
      scales) and ``x_active_mask`` are reserved and must be None.
    - ``global_bs``: 0 (every rank holds the same BS) or max BS x ep_world_size.
    - ``expert_token_nums_type``: 0 cumulative (gmm offsets), 1 counts.
    - ``expand_idx``, ``ep_recv_counts``, ``tp_recv_counts``: pass them to ``moe_distribute_combine`` as they are
      (as the seed says, their values are implementation details). ``expand_idx`` is the [BS, ep_world_size] table
      of each token's slot at each destination rank (-1: not sent there) and carries the dispatch state;
      ``ep_recv_counts`` [A_l, tp·ep] rows per (local expert, source); ``tp_recv_counts`` [tp] rows per TP rank.
    - ``expand_x`` has A = tp·ep·(global_bs / ep)·min(K, local experts) rows (1 per slot on a shared-expert rank),
      expert-major; rows past the total are zeros.
    """
    from .dispatch.fused import dispatch

    _reserved(scales=(scales, None), x_active_mask=(x_active_mask, None))
    if quant_mode not in _QUANT_MODES:
        raise ValueError(f"quant_mode must be 0 (none) or 2 (dynamic int8), got {quant_mode!r}")
    if expert_token_nums_type not in (0, 1):
        raise ValueError(f"expert_token_nums_type must be 0 (cumulative) or 1 (counts), got {expert_token_nums_type!r}")
    ep, tp, max_bs, n_sh = _common(group_ep, ep_world_size, ep_rank_id, group_tp, tp_world_size, tp_rank_id,
                                   expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs)
    r = dispatch(x, expert_ids, group=ep, num_experts=moe_expert_num, expert_scales=expert_scales,
                 max_tokens_per_rank=max_bs, shared_expert_num=n_sh, shared_expert_rank_num=shared_expert_rank_num,
                 quant=_QUANT_MODES[quant_mode], tp_group=tp,
                 tokens_per_expert_type="cumsum" if expert_token_nums_type == 0 else "count", transport=transport)
    h = r.handle
    expand_idx = h.tctx.pos_TP.to(torch.int32)
    setattr(expand_idx, _HANDLE_ATTR, h)
    return (r.expand_x, r.dynamic_scales, expand_idx, r.tokens_per_expert, h.ep_recv_counts(), h.tp_recv_counts(),
            r.expand_scales)


def moe_distribute_combine(expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep, ep_world_size,
                           ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
                           activation_scale=None, weight_scale=None, group_list=None, expand_scales=None,
                           shared_expert_x=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                           shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, out_dtype=0,
                           comm_quant_mode=0, group_list_type=0):
    """The seed's MoeDistributeCombine: ``x [BS, H] = sum_k expert_scales · (expert rows) (+ shared-expert rows)
    (+ shared_expert_x)``, along the paths of the matching ``moe_distribute_dispatch``. ``comm_quant_mode`` 0 or 2
    (int8 on the way back). ``x_active_mask``, ``activation_scale``, ``weight_scale``, ``group_list``,
    ``out_dtype`` != 0 and ``group_list_type`` != 0 are reserved. ``expand_scales`` is accepted and unused."""
    from .dispatch.fused import combine

    _reserved(x_active_mask=(x_active_mask, None), activation_scale=(activation_scale, None),
              weight_scale=(weight_scale, None), group_list=(group_list, None), out_dtype=(out_dtype, 0),
              group_list_type=(group_list_type, 0))
    if comm_quant_mode not in _QUANT_MODES:
        raise ValueError(f"comm_quant_mode must be 0 (none) or 2 (int8), got {comm_quant_mode!r}")
    handle = getattr(expand_idx, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("expand_idx must be the expand_idx tensor returned by moe_distribute_dispatch (it carries "
                         "the dispatch state); got a tensor without it")
    ep, tp, max_bs, n_sh = _common(group_ep, ep_world_size, ep_rank_id, group_tp, tp_world_size, tp_rank_id,
                                   expert_shard_type, shared_expert_num, shared_expert_rank_num, global_bs)
    t = handle.topo
    if ep is not t.group or tp is not t.tp_group or moe_expert_num != t.E or (max_bs or handle.T) != t.B \
            or n_sh != t.n_shared or shared_expert_rank_num != t.Sh:
        raise ValueError("moe_distribute_combine must get the same group_ep, group_tp, moe_expert_num, global_bs and "
                         "shared-expert settings as the moe_distribute_dispatch that made expand_idx")
    if tuple(expert_ids.shape) != (handle.T, t.K):
        raise ValueError(f"expert_ids must be [BS, K] = [{handle.T}, {t.K}] as in dispatch, got "
                         f"{tuple(expert_ids.shape)}")
    return combine(expand_x, handle, expert_scales, shared_expert_x=shared_expert_x,
                   comm_quant=_QUANT_MODES[comm_quant_mode])


npu_moe_distribute_dispatch = moe_distribute_dispatch
npu_moe_distribute_combine = moe_distribute_combine
