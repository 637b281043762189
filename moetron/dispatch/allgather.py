"""The all-gather dispatcher (Megatron-Core's MoEAllGatherTokenDispatcher semantics).

Legend: P = EP·ETP ranks of the "ep_etp" group, T tokens per rank, H hidden, E experts, E_l local experts,
K top-k, C capacity.

    dispatch: drops decided on the source rank -> all-gather x [P·T, H], probs [P·T, K], ids [P·T, K] over P
              -> permute the gathered slots routed to [first_expert, first_expert + E_l) by local expert
    combine:  unpermute with the gathered probs ([P·T, H]: this rank's experts' share of every gathered token)
              -> reduce-scatter over P (sums the shares of all experts, and the F-shards when ETP > 1)

Backward: the all-gathers become reduce-scatters and the reduce-scatter an all-gather. No host sync. Every rank
of the group must hold the same T (checked only with MOETRON_DEBUG=1, which syncs). Buffers: [P·T·K, H] dropless
(every gathered slot might be local), [E_l·P·C, H] with ``pad_to_capacity``.
"""

from __future__ import annotations

import torch

from .. import _env
from ..ops.permute import _permute, permuted_rows, unpermute
from . import Dispatched, TokenDispatcher
from ._comm import gather_nograd, gather_tokens, reduce_scatter
from .local import source_drops


def check_same_tokens(T: int, group, what: str) -> None:
    """MOETRON_DEBUG=1 only (one sync): every rank of ``group`` must hold T tokens."""
    if group is None or not _env.debug_checks_enabled():
        return
    import torch.distributed as dist

    seen = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, T, group=group)
    if len(set(seen)) > 1:
        raise ValueError(f"{what} needs the same number of tokens on every rank of its group, got T = {seen}")


class AllGatherDispatcher(TokenDispatcher):
    name = "allgather"
    reads_routed_rows_only = True  # unpermute gathers rows through the row map
    fresh_rows = True  # permute's output

    def __init__(self, config, groups):
        super().__init__(config, groups)
        self.group = groups.get("ep_etp")
        self.group_size = groups.size("ep_etp")

    def dispatch(self, x_TH, probs_TK, ids_TK) -> Dispatched:
        c = self.config
        T, K = ids_TK.shape
        E, E_l = c.num_experts, self.num_local_experts
        capacity = c.capacity(T)
        if capacity is None:
            kept_ids = ids_TK
            kept = torch.zeros(E, dtype=torch.int64, device=ids_TK.device)
            kept.scatter_add_(0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1)))
            num_dropped = torch.zeros((), dtype=torch.int64, device=ids_TK.device)
        else:
            kept_ids, kept, num_dropped = source_drops(c, x_TH, probs_TK, ids_TK, capacity)
        if self.group is not None:
            check_same_tokens(T, self.group, "dispatcher='allgather'")
            x_all, probs_all = gather_tokens(x_TH, probs_TK, self.group)
            ids_all = gather_nograd(kept_ids, self.group)
        else:
            x_all, probs_all, ids_all = x_TH, probs_TK, kept_ids
        local = ids_all - self.first_expert
        local = torch.where((local >= 0) & (local < E_l), local, E_l)  # E_l: another rank's expert, or dropped
        cap = None
        if capacity is not None and c.pad_to_capacity:
            # each source kept at most C slots per expert, so P·C rows hold them all: nothing drops here
            cap = self.group_size * capacity
        rows = permuted_rows(x_all.shape[0], K, E_l, pad_to=c.pad_to, capacity=cap)
        perm = _permute(x_all, local, E_l, None, c.pad_to, cap, "position", rows, None)
        return Dispatched(perm.x_permuted, perm.offsets, kept, num_dropped, (perm.row_map, probs_all, perm.src_slot))

    def combine(self, h, handle):
        row_map, probs_all, src_slot = handle
        y_all = unpermute(h, row_map, probs_all, src_slot=src_slot)
        return y_all if self.group is None else reduce_scatter(y_all, self.group)
