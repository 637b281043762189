"""The local dispatcher (all experts on this rank) and the source-side drop decision shared by the others.

Legend: T tokens, H hidden, E experts, K top-k, C capacity, R_out rows of the permuted buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._env import use_triton
from ..ops.permute import _permute, _route, permute, permuted_rows, unpermute
from . import Dispatched, TokenDispatcher


class Layout(NamedTuple):
    """Where each routed slot goes in the expert-major buffer, without moving any row (``LocalDispatcher.layout``)."""

    src_slot: torch.Tensor  # [R_out] int64: slot t·K+k of each row, -1 for padding / unused rows
    row_map: torch.Tensor  # [T, K] int32: row of each slot, -1 if dropped
    offsets: torch.Tensor  # [E] int32 cumulative row ends per expert
    tokens_per_expert: torch.Tensor  # [E] int64 kept slots per expert
    num_dropped: torch.Tensor  # 0-d int64 slots dropped over capacity


def _rank_probs(config, probs_TK, capacity):
    # the capacity competition ranks slots by their (detached) probs; "position" needs none
    return probs_TK.detach() if capacity is not None and config.drop_policy == "probs" else None


@torch.no_grad()
def source_drops(config, x_TH: torch.Tensor, probs_TK: torch.Tensor, ids_TK: torch.Tensor, capacity: int):
    """Which of this rank's T·K slots each expert keeps under ``capacity`` (the single-process competition).

    Returns (kept_ids [T, K]: ids with dropped slots set to E, tokens_per_expert [E] kept, num_dropped []).
    Runs permute's capacity competition on one column of x: index work plus a one-element copy per row (a
    zero-width tensor may hand the kernels a null pointer)."""
    E = config.num_experts
    decide = permute(x_TH.detach()[:, :1], ids_TK, E, probs=_rank_probs(config, probs_TK, capacity),
                     capacity=capacity, drop_policy=config.drop_policy)
    kept_ids = torch.where(decide.row_map >= 0, ids_TK, E)
    return kept_ids, decide.tokens_per_expert, decide.num_dropped


class LocalDispatcher(TokenDispatcher):
    """All E experts on this rank: ``permute`` by expert, ``unpermute`` with the probs. No communication, no sync.

    Dropless: [T·K (+ padding), H]. ``pad_to_capacity``: a static [E·C, H] buffer. Packed capacity: the kept slots
    decided first (``source_drops``), then only those laid out, so the GEMMs compute only kept rows.

    ``weights_in_experts`` (set by MoELayer when its experts have no down bias): where the Triton kernels run
    (CUDA, or the interpreter), the probs are permuted with the rows and returned as ``row_probs`` for the experts
    to apply, and combine sums unweighted. The unweighted unpermute's backward is a gather of dy; the weighted
    one's also reads every expert output row again for the probs' gradient (the experts get that from their fused
    activation instead) and keeps those rows alive until then. On the PyTorch path (CPU) the extra scaling ops
    cost more than they save (the CPU main job ran 5-8% slower), so it stays off there."""

    name = "local"
    reads_routed_rows_only = True  # unpermute gathers rows through the row map
    fresh_rows = True  # permute's output
    weights_in_experts = False

    def _slots(self, x_TH, probs_TK, ids_TK):
        """What ``permute`` lays out: (slot ids, ranking probs, capacity, rows, num_dropped or None). Dropless and
        padded capacity: the ids as routed, the capacity competition decided while laying out. Packed capacity:
        the kept slots decided first (``source_drops``; dropped ones get id E), then laid out without capacity."""
        c = self.config
        T, K = ids_TK.shape
        E = c.num_experts
        capacity = c.capacity(T)
        if capacity is None or c.pad_to_capacity:
            rows = permuted_rows(T, K, E, pad_to=c.pad_to, capacity=capacity)
            return ids_TK, _rank_probs(c, probs_TK, capacity), capacity, rows, None
        kept_ids, _, num_dropped = source_drops(c, x_TH, probs_TK, ids_TK, capacity)
        return kept_ids, None, None, permuted_rows(T, K, E, pad_to=c.pad_to), num_dropped

    def dispatch(self, x_TH, probs_TK, ids_TK) -> Dispatched:
        c = self.config
        in_experts = self.weights_in_experts and use_triton(x_TH)
        ids, rank_probs, capacity, rows, num_dropped = self._slots(x_TH, probs_TK, ids_TK)
        probs = probs_TK if in_experts else rank_probs  # permuted with the rows, and ranking for the capacity
        if num_dropped is None:
            perm = permute(x_TH, ids, c.num_experts, probs=probs, pad_to=c.pad_to, capacity=capacity,
                           drop_policy=c.drop_policy)
            num_dropped = perm.num_dropped
        else:
            # Slot ids outside [0, E) count as dropped in permute's index kernels; the public permute refuses
            # them on the CPU, hence the internal entry point.
            perm = _permute(x_TH, ids, c.num_experts, probs, c.pad_to, None, c.drop_policy, rows, None)
        kept = perm.tokens_per_expert
        if in_experts:
            return Dispatched(perm.x_permuted, perm.offsets, kept, num_dropped, (perm.row_map, None, perm.src_slot),
                              perm.probs_permuted)
        return Dispatched(perm.x_permuted, perm.offsets, kept, num_dropped, (perm.row_map, probs_TK, perm.src_slot))

    def layout(self, x_TH, probs_TK, ids_TK) -> Layout:
        """The layout ``dispatch`` would build, without the permuted copy of x: for experts that gather their
        rows themselves (``ops.routed_experts``). Same drops, same order, same offsets."""
        T, K = ids_TK.shape
        ids, rank_probs, capacity, rows, num_dropped = self._slots(x_TH, probs_TK, ids_TK)
        r = _route(ids, self.config.num_experts, rank_probs, self.config.pad_to, capacity, self.config.drop_policy,
                   rows)
        if num_dropped is None:
            num_dropped = r.num_dropped
        return Layout(r.src_slot, r.row_map_R.view(T, K), r.offsets, r.tokens_per_expert, num_dropped)

    def combine(self, h, handle):
        row_map, probs_TK, src_slot = handle
        return unpermute(h, row_map, probs_TK, src_slot=src_slot)
