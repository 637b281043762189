"""Token dispatchers: move each routed token row to the rank holding its expert and bring the results back.

Legend: T tokens on this rank, H hidden, E experts, E_l = E / EP experts on this rank, K top-k, R rows of the
dispatched buffer, C capacity (rows per expert and source rank when dropping).

    d = dispatcher.dispatch(x [T, H], probs [T, K], expert_ids [T, K])   -> Dispatched
        d.x [R, H]              rows for this rank's E_l experts, grouped by local expert (expert-major)
        d.offsets [E_l]         cumulative row ends of each local expert (rows past the last end are zeros)
        d.tokens_per_expert [E] this rank's routed slots kept per global expert (int64, on the device)
        d.num_dropped []        this rank's slots dropped over capacity (int64, on the device)
    h = experts(d.x, d.offsets, row_scale=d.row_probs)                     [R, H] (partial sums when ETP > 1)
    y = dispatcher.combine(h, d.handle)                                    [T, H] = sum_k probs[t, k] · h(t, k)

``d.row_probs`` is None, or (the local dispatcher with ``weights_in_experts``) each row's routing weight
``[R]``: the experts apply it and combine sums unweighted.

``make_dispatcher(config, groups)`` picks one from ``config.dispatcher``:

- ``"local"`` (``LocalDispatcher``): all E experts here; one permute and one unpermute. No communication.
- ``"allgather"`` (``AllGatherDispatcher``): tokens, probs and expert ids gathered over EP×ETP; each rank
  permutes the rows routed to its experts; results reduce-scattered back. No host sync; every rank of the
  EP×ETP group must hold the same T (sequence-parallel shards do).
- ``"fused"`` (``FusedDispatcher``, moetron/dispatch/fused.py): MoeDistributeDispatch/Combine semantics: each token
  sent once per destination rank into fixed per-source slots, counts carried with the rows on the device, no
  host sync, CUDA-graph capturable; NCCL or NVLink symmetric-memory transport. Also the functional
  ``dispatch`` / ``combine`` exported here.
- ``"alltoall"`` (``AllToAllDispatcher``): local permute by global expert, AllToAllV over EP (then AllGatherV over
  ETP), rows re-sorted by local expert; combine reverses each step. One host sync for the split sizes, placed
  after the permute and the count exchange are queued. With ``pad_to_capacity`` the buffers have fixed sizes and
  nothing syncs (every rank of the EP×ETP group must then hold the same T).

Token dropping is decided on the source rank among its own T tokens (Megatron-Core's semantics):
``C = config.capacity(T)``, the same competition as the single-process layer, before anything moves. So with the
same tokens per rank, the layer's output on every rank equals the single-process layer's output on that rank's
tokens, for every dispatcher and layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Dispatched", "TokenDispatcher", "LocalDispatcher", "AllGatherDispatcher", "AllToAllDispatcher",
           "FusedDispatcher", "make_dispatcher", "dispatch", "combine", "DispatchResult", "FusedHandle"]


class Dispatched(NamedTuple):
    x: torch.Tensor  # [R, H] rows for the local experts, expert-major
    offsets: torch.Tensor  # [E_l] int32/int64 cumulative row ends per local expert
    tokens_per_expert: torch.Tensor  # [E] int64 this rank's kept slots per global expert
    num_dropped: torch.Tensor  # 0-d int64 this rank's slots dropped over capacity
    handle: object  # what combine needs
    row_probs: torch.Tensor | None = None  # [R] routing weight of each row when the experts must apply it


class TokenDispatcher:
    """Interface of the dispatchers. ``syncs``: whether ``dispatch`` reads device data on the host.
    ``reads_routed_rows_only``: whether ``combine`` (and the backward of ``dispatch``) touch only the rows that
    routing filled, so the experts may leave the buffer's tail past the last expert unwritten.
    ``fresh_rows``: whether ``Dispatched.x`` is a new tensor that nothing but the experts reads afterwards (not a
    persistent communication buffer), so the experts' backward may write its gradient over it."""

    name = "base"
    syncs = False
    reads_routed_rows_only = False
    fresh_rows = False

    def __init__(self, config, groups):
        self.config = config
        self.groups = groups
        E = config.num_experts
        self.num_local_experts = E // groups.ep_size
        self.first_expert = groups.ep_rank * self.num_local_experts

    def dispatch(self, x_TH: torch.Tensor, probs_TK: torch.Tensor, ids_TK: torch.Tensor) -> Dispatched:
        raise NotImplementedError

    def combine(self, h: torch.Tensor, handle) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts [{self.first_expert}, {self.first_expert + self.num_local_experts}))"


from .local import LocalDispatcher  # noqa: E402
from .allgather import AllGatherDispatcher  # noqa: E402
from .alltoall import AllToAllDispatcher  # noqa: E402
from .fused import DispatchResult, FusedDispatcher, FusedHandle, combine, dispatch  # noqa: E402

_DISPATCHERS = {"local": LocalDispatcher, "allgather": AllGatherDispatcher, "alltoall": AllToAllDispatcher,
                "fused": FusedDispatcher}


def make_dispatcher(config, groups) -> TokenDispatcher:
    """The dispatcher named by ``config.dispatcher`` for this rank of ``groups`` (a ParallelGroups)."""
    if config.dispatcher not in _DISPATCHERS:
        raise ValueError(f"MoEConfig.dispatcher must be one of {tuple(_DISPATCHERS)}, got {config.dispatcher!r}")
    return _DISPATCHERS[config.dispatcher](config, groups)
