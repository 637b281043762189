"""The all-to-all dispatcher (Megatron-Core's MoEAlltoAllTokenDispatcher semantics).

Legend: P_ep / P_etp ranks of the "ep" / "etp" groups, S = P_etp·P_ep source ranks of a local expert's rows,
T tokens on this rank, H hidden, E experts, E_l = E / P_ep local experts, K top-k, C capacity, N rows received.

Dropless and packed capacity (one host sync):

    1. drops decided among this rank's T·K slots (capacity only); permute by GLOBAL expert: [T·K, H], kept rows
       first. Experts of EP rank j are [j·E_l, (j+1)·E_l), so the rows are already grouped by destination.
    2. counts [E] exchanged on the device: all_to_all over EP -> [P_ep, E_l] rows this rank will receive per
       (source, local expert); all_gather over ETP -> cnt [P_etp, P_ep, E_l].
    3. THE HOST SYNC: one ``.tolist()`` of [send rows per EP rank (P_ep), received rows per (ETP rank, EP source)
       (P_etp·P_ep)]. It sits after the permute and the count exchange are queued, and the layer queues the
       shared experts before dispatch, so the device has that work in hand while the host waits.
    4. AllToAllV over EP with those splits -> [N_ep, H] in (source, local expert) order; then AllGatherV over ETP
       (ETP > 1), so each ETP rank holds every row of its E_l experts -> [N, H] in (etp, source, expert) order.
    5. sort chunks by local expert: one row scatter with indices computed on the device from cnt; each local
       expert's rows padded to a multiple of pad_to (zeros), offsets [E_l] on the device.
    combine: each step reversed (gather back to chunk order, ReduceScatterV over ETP summing the F-shards,
    AllToAllV back, unpermute with the probs). The backward reuses the host split sizes: no further sync.

``pad_to_capacity`` (no sync at all): permute with capacity C gives a fixed [E·C, H] buffer, E_l·C rows per EP rank;
the all-to-all and the ETP all-gather have equal splits; sorting by local expert is a fixed transpose
[S, E_l, C, H] -> [E_l, S, C, H]; offsets are (l + 1)·S·C. Every rank of the EP×ETP group must then hold the same T
(so the same C); MOETRON_DEBUG=1 checks it (and syncs).

Inside one local expert, rows come in (ETP rank, EP source, source order) order instead of the single-process
token order; each row's result is the same, only the order of the expert-weight gradient's sum changes.
"""

from __future__ import annotations

import torch

from ..ops.permute import _permute, permute, permuted_rows, unpermute
from . import Dispatched, TokenDispatcher
from ._comm import (all_gather, all_gather_v, all_to_all, all_to_all_nograd, gather_nograd, reduce_scatter,
                    reduce_scatter_v)
from .allgather import check_same_tokens
from .local import LocalDispatcher, _rank_probs, source_drops


def chunk_layout(cnt_SL: torch.Tensor, num_rows: int, pad_to: int):
    """Where each received row goes when chunks are re-sorted by local expert.

    ``cnt_SL [S, E_l]``: rows received from source s for local expert l; received rows are source-major
    ((s, l) chunks in that order), ``num_rows`` = their total (host-known). Returns (dest [N] int64: the row of
    the expert-major buffer each received row moves to, offsets [E_l] int64: cumulative ends of each expert's
    segment, padded to a multiple of pad_to). All on the device, no sync."""
    flat = cnt_SL.reshape(-1)
    src_end = torch.cumsum(flat, 0)
    src_start = src_end - flat
    total_L = cnt_SL.sum(0)
    padded_L = (total_L + (pad_to - 1)) // pad_to * pad_to
    ends_L = torch.cumsum(padded_L, 0)
    within_SL = torch.cumsum(cnt_SL, 0) - cnt_SL  # rows of earlier sources for the same expert
    dst_start = ((ends_L - padded_L)[None, :] + within_SL).reshape(-1)
    r = torch.arange(num_rows, device=cnt_SL.device)
    chunk = torch.searchsorted(src_end, r, right=True)
    return dst_start[chunk] + (r - src_start[chunk]), ends_L


class AllToAllDispatcher(TokenDispatcher):
    name = "alltoall"

    def __init__(self, config, groups):
        super().__init__(config, groups)
        self.ep_group, self.ep_size = groups.get("ep"), groups.ep_size
        self.etp_group, self.etp_size = groups.get("etp"), groups.etp_size
        self.etp_rank = groups.rank_in("etp")
        self.syncs = not config.pad_to_capacity
        # one EP rank and one ETP rank: nothing to exchange, the local path is exact and sync-free
        self._local = LocalDispatcher(config, groups) if self.ep_size * self.etp_size == 1 else None

    def dispatch(self, x_TH, probs_TK, ids_TK) -> Dispatched:
        if self._local is not None:
            return self._local.dispatch(x_TH, probs_TK, ids_TK)
        c = self.config
        T, K = ids_TK.shape
        capacity = c.capacity(T)
        if capacity is not None and c.pad_to_capacity:
            return self._dispatch_static(x_TH, probs_TK, ids_TK, capacity)
        E, E_l, H = c.num_experts, self.num_local_experts, x_TH.shape[1]
        P_ep, P_etp = self.ep_size, self.etp_size

        # 1. permute by global expert (kept slots only)
        if capacity is None:
            perm = permute(x_TH, ids_TK, E)
            num_dropped = perm.num_dropped
        else:
            kept_ids, _, num_dropped = source_drops(c, x_TH, probs_TK, ids_TK, capacity)
            perm = _permute(x_TH, kept_ids, E, None, 1, None, "position", permuted_rows(T, K, E), None)
        counts_E = perm.tokens_per_expert

        # 2. counts on the device: [P_ep·E_l] from each EP source, then [P_etp, P_ep, E_l] over ETP
        with torch.no_grad():
            cnt = all_to_all_nograd(counts_E, self.ep_group) if self.ep_group is not None else counts_E
            if self.etp_group is not None:
                cnt = gather_nograd(cnt, self.etp_group)
            cnt = cnt.view(P_etp, P_ep, E_l)
            splits = torch.cat([counts_E.view(P_ep, E_l).sum(1), cnt.sum(2).reshape(-1)])

        # 3. the one host sync of this dispatcher: split sizes for the AllToAllV / AllGatherV
        host = splits.tolist()

        in_splits = host[:P_ep]
        table = [host[P_ep + j * P_ep:P_ep + (j + 1) * P_ep] for j in range(P_etp)]
        out_splits = table[self.etp_rank]
        etp_sizes = [sum(row) for row in table]
        num_send = sum(in_splits)

        # 4. exchange
        x_recv = perm.x_permuted[:num_send]
        if self.ep_group is not None:
            x_recv = all_to_all(x_recv, out_splits, in_splits, self.ep_group)
        if self.etp_group is not None:
            x_recv = all_gather_v(x_recv, etp_sizes, self.etp_rank, self.etp_group)

        # 5. sort by local expert (rows of one expert contiguous, padded to pad_to)
        N = sum(etp_sizes)
        dest, offsets = chunk_layout(cnt.reshape(P_etp * P_ep, E_l), N, c.pad_to)
        rows = N + (E_l * (c.pad_to - 1) if c.pad_to > 1 else 0)
        x_sorted = x_recv.new_zeros(rows, H).index_copy(0, dest, x_recv)
        handle = ("v", perm.row_map, probs_TK, dest, in_splits, out_splits, etp_sizes)
        return Dispatched(x_sorted, offsets, counts_E, num_dropped, handle)

    def _dispatch_static(self, x_TH, probs_TK, ids_TK, capacity) -> Dispatched:
        c = self.config
        E, E_l, H = c.num_experts, self.num_local_experts, x_TH.shape[1]
        check_same_tokens(x_TH.shape[0], self.groups.get("ep_etp"), "dispatcher='alltoall' with pad_to_capacity")
        perm = permute(x_TH, ids_TK, E, probs=_rank_probs(c, probs_TK, capacity), capacity=capacity,
                       drop_policy=c.drop_policy)
        x_recv = perm.x_permuted  # [E·C, H] = [P_ep, E_l, C, H]
        if self.ep_group is not None:
            x_recv = all_to_all(x_recv, None, None, self.ep_group)  # [P_ep (sources), E_l, C, H]
        if self.etp_group is not None:
            x_recv = all_gather(x_recv, self.etp_group)  # [P_etp·P_ep, E_l, C, H]
        S = self.ep_size * self.etp_size
        x_sorted = x_recv.view(S, E_l, capacity, H).transpose(0, 1).reshape(E_l * S * capacity, H)
        offsets = torch.arange(1, E_l + 1, device=x_TH.device, dtype=torch.int64) * (S * capacity)
        handle = ("static", perm.row_map, probs_TK, capacity)
        return Dispatched(x_sorted, offsets, perm.tokens_per_expert, perm.num_dropped, handle)

    def combine(self, h, handle):
        if self._local is not None:
            return self._local.combine(h, handle)
        H = h.shape[1]
        if handle[0] == "static":
            _, row_map, probs_TK, capacity = handle
            S = self.ep_size * self.etp_size
            h_recv = h.view(self.num_local_experts, S, capacity, H).transpose(0, 1).reshape(-1, H)
            if self.etp_group is not None:
                h_recv = reduce_scatter(h_recv, self.etp_group)
            if self.ep_group is not None:
                h_recv = all_to_all(h_recv, None, None, self.ep_group)
            return unpermute(h_recv, row_map, probs_TK)
        _, row_map, probs_TK, dest, in_splits, out_splits, etp_sizes = handle
        h_recv = h.index_select(0, dest)
        if self.etp_group is not None:
            h_recv = reduce_scatter_v(h_recv, etp_sizes, self.etp_rank, self.etp_group)
        if self.ep_group is not None:
            h_recv = all_to_all(h_recv, in_splits, out_splits, self.ep_group)
        # rows [0, num_send) of the permuted layout; row_map never points past them (dropped slots are -1)
        return unpermute(h_recv, row_map, probs_TK)
