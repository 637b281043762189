"""Fused expert-parallel dispatch / combine with MoeDistributeDispatch / MoeDistributeCombine semantics.

Legend: T tokens on this rank (BS), B = max_tokens_per_rank (the seed's globalBs / epWorldSize), H hidden, K top-k,
J = K + shared_expert_num columns of a token's routing (its K routed experts, then one column per shared expert),
P = EP ranks, P_tp TP ranks, Sh shared-expert ranks (EP ranks [0, Sh), expertShardType 0), E routed experts,
E_l = E / (P - Sh) experts per MoE rank, L experts held here (E_l, or 1 on a shared-expert rank),
N = P_tp·P·B receive slots, R = N·min(K, L) rows of the expert-major buffer (1 row per slot on a shared rank).

    r = dispatch(x [T, H], expert_ids [T, K], group=ep, num_experts=E, ...)
        r.expand_x [R, H]          rows for this rank's L experts: expert-major, then (TP rank, EP source) order,
                                   then token order; rows past r.tokens_per_expert's total are zeros
        r.tokens_per_expert [L]    int64 cumulative row ends (gmm ``offsets``) or counts, on the device
        r.dynamic_scales [R]       fp32 per-row scales when quant="int8" (expand_x is then int8)
        r.handle                   what combine (and the compat entry points) need
    y = combine(h [R, H], r.handle, expert_scales [T, K], shared_expert_x=None)      [T, H]
        y[t] = sum_k expert_scales[t, k] · h(row of (t, k)) + sum of t's shared-expert rows + shared_expert_x[t]

The exchange (one step, either direction):
    source: a token goes to each destination EP rank ONCE, however many of its K experts live there. It lands in
        the fixed region [source rank, B] of the destination's receive buffer, at position pos[t, d] = the number of
        this rank's earlier tokens bound for d (a prefix sum over t: no atomics, so deterministic). A row of
        metadata travels with it: the local expert id of each of its J columns at that destination (-1 elsewhere),
        the routing scales, and the int8 scale. Counts are never exchanged ahead: the receiver reads them from the
        metadata, on the device. No host sync anywhere, and every buffer size comes from shapes, so the whole step
        can be captured in a CUDA graph.
    TP (tp_group): the EP receive buffers are all-gathered over TP (fixed size), so every TP rank holds the slots of
        its experts from all P_tp·P sources; combine reduce-scatters them back (summing F-shard partial sums).
    destination: slot n = (tp rank, source, position) holds a token and the local experts it wants here. Expert l's
        rows are its slots in slot order: row = start[l] + (hits of l in earlier slots), from a cumsum over a
        [N, L] one-hot. ``expand_x`` gathers the slots' rows in that order.
    combine reverses it: each destination sums, per slot, sum_j scale[t, j]·h[row of (slot, j)] in fp32 (so a token
        comes back once per destination rank, not once per expert), reduce-scatters over TP, sends the slot rows
        back, and the source adds its destinations' rows in rank order (fixed order: bitwise deterministic).

Transports (``transport=``, or MOETRON_FUSED_TRANSPORT; "auto" picks "symm" for CUDA tensors on one node when
torch's symmetric memory is available, else "nccl"):
    "nccl": padded fixed-size all_to_all_single of [P, B] rows (plus one of the metadata). Works on any GPUs and on
        gloo (the CPU tests). Sends B rows to every rank whatever the routing.
    "symm": moetron/dispatch/_symm.py: Triton kernels store each token's row straight into the peers' symmetric
        memory (only the rows that are needed), with a barrier before (the peer has consumed the last contents) and
        after (all writes landed). ``num_sms`` programs do the copies.

Autograd: dispatch's backward is a combine-like reduction (weight 1), combine's backward a dispatch-like scatter
(plus the scales' gradient, <dy[t], h(row)>, computed at the destination and sent back). quant="int8" is
forward-only (int8 rows have no gradient); comm_quant="int8" in combine backpropagates as if unquantized.

Precision: the destination rounds its per-slot weighted sum to the rows' dtype before sending it back, so in
bf16 a token's output is rounded once per destination rank plus once at the end (exact in fp32 up to summation
order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd import Function

from .. import _env
from .._checks import check_tensor
from ..ops.permute import unpermute

__all__ = ["dispatch", "combine", "DispatchResult", "FusedHandle", "select_transport"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ID_DTYPES = (torch.int32, torch.int64)
_QUANT_MODES = (None, "int8")
_TRANSPORTS = ("auto", "nccl", "symm")
_COUNT_TYPES = ("cumsum", "count")

# SMs (Triton programs) the symmetric-memory kernels use by default. The 2x H200 probe: 16 programs wrote 294 GB/s
# into the peer, 32 gave 327, 132 gave 358 (anchors/README.md); 24 is the budget.
DEFAULT_NUM_SMS = 24


# ---------------------------------------------------------------------------------------------------------
# Topology and validation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Topo:
    group: object  # EP process group, or None (one process)
    P: int  # EP ranks
    rank: int  # this rank in the EP group
    tp_group: object
    P_tp: int
    tp_rank: int
    E: int  # routed experts
    Sh: int  # shared-expert ranks (EP ranks [0, Sh))
    n_shared: int  # distinct shared experts (each replicated on Sh / n_shared ranks)
    E_l: int  # routed experts per MoE rank
    K: int
    B: int  # max tokens per rank

    @property
    def J(self) -> int:
        return self.K + (self.n_shared if self.Sh else 0)

    @property
    def is_shared_rank(self) -> bool:
        return self.rank < self.Sh

    @property
    def L(self) -> int:
        return 1 if self.is_shared_rank else self.E_l

    @property
    def N(self) -> int:  # receive slots here
        return self.P_tp * self.P * self.B

    @property
    def R(self) -> int:  # rows of expand_x: each slot brings at most min(K, L) distinct local experts
        return self.N * (1 if self.is_shared_rank else min(self.K, self.E_l))

    def first_expert(self) -> int:
        return -1 if self.is_shared_rank else (self.rank - self.Sh) * self.E_l


def _group_info(group):
    if group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _make_topo(x, ids, group, num_experts, max_tokens_per_rank, shared_expert_num, shared_expert_rank_num,
               tp_group) -> _Topo:
    check_tensor("x", x, ndim=2, dtypes=_FLOAT_DTYPES)
    check_tensor("expert_ids", ids, ndim=2, dtypes=_ID_DTYPES)
    T, H = x.shape
    if ids.shape[0] != T:
        raise ValueError(f"expert_ids must be [T, K] with T = x.shape[0] = {T}, got shape {tuple(ids.shape)}")
    if ids.device != x.device:
        raise ValueError(f"expert_ids must be on x's device ({x.device}), got {ids.device}")
    K = ids.shape[1]
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if K < 1 or K > num_experts:
        raise ValueError(f"expert_ids must have 1 <= K <= num_experts = {num_experts} columns (top-k), got K = {K}")
    if H < 1:
        raise ValueError(f"x must have a hidden size H >= 1, got shape {tuple(x.shape)}")
    P, rank = _group_info(group)
    P_tp, tp_rank = _group_info(tp_group)
    Sh, n_sh = shared_expert_rank_num, shared_expert_num
    if not _is_int(Sh) or not 0 <= Sh < P:
        raise ValueError(f"shared_expert_rank_num must be an int in [0, {P}) (EP size {P}; at least one rank must "
                         f"hold routed experts), got {Sh!r}")
    if not _is_int(n_sh) or n_sh < 0:
        raise ValueError(f"shared_expert_num must be a non-negative int, got {n_sh!r}")
    if Sh and (n_sh < 1 or Sh % n_sh):
        raise ValueError(f"shared_expert_num must divide shared_expert_rank_num = {Sh} (each shared expert is "
                         f"replicated on shared_expert_rank_num / shared_expert_num ranks), got {n_sh}")
    if not Sh and n_sh:
        raise ValueError(f"shared_expert_num = {n_sh} needs shared_expert_rank_num > 0 (the ranks that hold them); "
                         "compute a shared expert locally and pass its output to combine as shared_expert_x instead")
    if num_experts % (P - Sh):
        raise ValueError(f"num_experts = {num_experts} must be divisible by the number of MoE ranks "
                         f"(EP size {P} - shared_expert_rank_num {Sh} = {P - Sh})")
    B = T if max_tokens_per_rank is None else max_tokens_per_rank
    if not _is_int(B) or B < 0:
        raise ValueError(f"max_tokens_per_rank must be None or a non-negative int, got {max_tokens_per_rank!r}")
    if T > B:
        raise ValueError(f"x has BS = {T} tokens, more than max_tokens_per_rank = {B} (the seed's globalBs / "
                         "epWorldSize); raise max_tokens_per_rank on every rank")
    return _Topo(group, P, rank, tp_group, P_tp, tp_rank, num_experts, Sh, n_sh if Sh else 0,
                 num_experts // (P - Sh), K, B)


def _check_ids_values(ids: torch.Tensor, E: int) -> None:
    """Range and repeats: free on CPU tensors (always run), a host sync on GPU ones (MOETRON_DEBUG=1 only)."""
    if ids.numel() == 0 or not (ids.device.type == "cpu" or _env.debug_checks_enabled()):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= E:
        raise ValueError(f"expert_ids must lie in [0, num_experts = {E}), got values in [{lo}, {hi}]")
    if ids.shape[1] > 1:
        s = ids.sort(dim=1).values
        rep = (s[:, 1:] == s[:, :-1]).any(1)
        if bool(rep.any()):
            t = int(rep.nonzero()[0, 0])
            raise ValueError(f"expert_ids must not repeat an expert within a token's row; token {t} has "
                             f"{ids[t].tolist()}")


def _debug_same_on_ranks(topo: _Topo, H: int, dtype) -> None:
    """MOETRON_DEBUG=1: every EP/TP rank passes the same H, B, E, K, shared layout (one all_gather_object)."""
    if not _env.debug_checks_enabled():
        return
    from ..parallel import check_same_on_all_ranks

    value = {"H": H, "max_tokens_per_rank": topo.B, "num_experts": topo.E, "K": topo.K, "shared": (topo.Sh,
             topo.n_shared), "dtype": str(dtype)}
    check_same_on_all_ranks("fused dispatch arguments", value, topo.group)
    check_same_on_all_ranks("fused dispatch arguments", value, topo.tp_group)


# ---------------------------------------------------------------------------------------------------------
# Layout maths (torch ops on the device, no host sync)
# ---------------------------------------------------------------------------------------------------------


def _source_plan(ids_TK: torch.Tensor, topo: _Topo):
    """dest_TJ, local_TJ [T, J] (destination EP rank and local expert id per column), pos_TP [T, P] (position of
    token t in destination d's region, -1 if t does not go there) and flat_TP = d·B + pos (or -1)."""
    T, dev, P, B = ids_TK.shape[0], ids_TK.device, topo.P, topo.B
    ids = ids_TK.long()
    moe_rank = torch.div(ids, topo.E_l, rounding_mode="floor")
    dest = topo.Sh + moe_rank
    local = ids - moe_rank * topo.E_l
    if topo.Sh:
        # token t goes to replica t mod reps of every shared expert (from its index: deterministic, balanced)
        reps = topo.Sh // topo.n_shared
        t = torch.arange(T, device=dev)
        d_sh = torch.arange(topo.n_shared, device=dev)[None, :] * reps + (t % reps)[:, None]
        dest = torch.cat([dest, d_sh], 1)
        local = torch.cat([local, torch.zeros_like(d_sh)], 1)
    hit = torch.zeros(T, P, dtype=torch.int32, device=dev).scatter_(1, dest, 1)
    pos = torch.where(hit > 0, torch.cumsum(hit, 0) - 1, -1)
    flat = torch.where(pos >= 0, pos + torch.arange(P, device=dev) * B, -1)
    return dest, local, pos, flat


def _meta_rows(dest_TJ, local_TJ, scales_TJ, dyn_T, P) -> torch.Tensor:
    """[T, P, M] int32: what travels with token t to rank d. Columns [0, J): local expert id of each column at d
    (-1 if the column's expert is elsewhere); then J fp32 scales (bit pattern), then the int8 scale."""
    T, J = dest_TJ.shape
    d = torch.arange(P, device=dest_TJ.device)
    ids = torch.where(dest_TJ[:, None, :] == d[None, :, None], local_TJ[:, None, :], -1).to(torch.int32)
    parts = [ids]
    if scales_TJ is not None:
        parts.append(scales_TJ.float().view(torch.int32)[:, None, :].expand(T, P, J))
    if dyn_T is not None:
        parts.append(dyn_T.float().view(torch.int32)[:, None, None].expand(T, P, 1))
    return torch.cat(parts, 2) if len(parts) > 1 else ids


class _DestPlan(NamedTuple):
    row_of_NJ: torch.Tensor  # [N, J] int64 expand_x row of each (slot, column), -1 if none
    row_slot: torch.Tensor  # [R] int64 slot of each row (N for rows past the total: the zero row)
    row_src: torch.Tensor  # [R] int64 flat (slot, column) of each row (N·J past the total)
    counts_L: torch.Tensor  # [L] int64 rows per local expert
    hits_NL: torch.Tensor  # [N, L] int32 one-hot


def _dest_plan(ids_NJ: torch.Tensor, topo: _Topo) -> _DestPlan:
    N, J = ids_NJ.shape
    L, R, dev = topo.L, topo.R, ids_NJ.device
    ids = ids_NJ.long()
    valid = ids >= 0
    hits = torch.zeros(N, L + 1, dtype=torch.int32, device=dev).scatter_(1, torch.where(valid, ids, L), 1)[:, :L]
    counts = hits.sum(0, dtype=torch.int64)
    start = torch.cumsum(counts, 0) - counts
    row_NL = start + torch.cumsum(hits, 0, dtype=torch.int64) - 1
    row_of = torch.where(valid, row_NL.gather(1, torch.where(valid, ids, 0)), -1)
    dump = torch.where(valid, row_of, R).reshape(-1)
    row_src = torch.full((R + 1,), N * J, dtype=torch.int64, device=dev)
    row_src.index_copy_(0, dump, torch.arange(N * J, device=dev))
    row_src = row_src[:R]
    return _DestPlan(row_of, torch.div(row_src, J, rounding_mode="floor"), row_src, counts, hits)


def _quant_int8(x: torch.Tensor):
    """Per-row dynamic int8: scale = max|x| / 127 (fp32), q = round(x / scale). |x - q·scale| <= scale / 2."""
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.round(xf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------------------
# Transports
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """What a transport needs for one dispatch's exchanges (mutable: slot_valid is known after the exchange)."""
    topo: _Topo
    pos_TP: torch.Tensor  # [T, P] position at each destination, -1 if none
    flat_TP: torch.Tensor  # [T, P] d·B + pos, or -1
    slot_valid: torch.Tensor | None = None  # [P·B] bool: this rank's EP slots (own TP block) holding a token


class _NcclTransport:
    """Fixed-size all_to_all_single over [P, B] rows; TP by all_gather / reduce_scatter of the whole buffer."""

    name = "nccl"

    @staticmethod
    def _pack_index(ctx: _Ctx):
        """(dst [T·P] send row of each (t, d) or the dump row P·B, inv [P·B] token of each send row, 0 if none)."""
        topo = ctx.topo
        T = ctx.flat_TP.shape[0]
        dump = topo.P * topo.B
        dst = torch.where(ctx.flat_TP >= 0, ctx.flat_TP, dump).reshape(-1)
        inv = torch.zeros(dump + 1, dtype=torch.int64, device=dst.device)
        inv.index_copy_(0, dst, torch.arange(T, device=dst.device).repeat_interleave(topo.P))
        return dst, inv[:dump]

    def exchange(self, x, meta, ctx: _Ctx, keep: bool = True):
        """Send x [T, W] rows (any dtype) and meta [T, P, M] int32 to the destinations. Returns (recv_x [N + 1, W]
        with a zero last row, recv_meta [N, M] with -1 ids in unused slots); either may be None. ``keep`` is for
        the symm transport (whose receive buffer is reused); results here are always fresh tensors."""
        topo = ctx.topo
        PB, N = topo.P * topo.B, topo.N
        dst, inv = self._pack_index(ctx)
        recv_x = recv_meta = None
        if x is not None:
            T, W = x.shape
            send = x.index_select(0, inv) if T else x.new_zeros(PB, W)
            recv_x = x.new_empty(N + 1, W)
            recv_x[N].zero_()
            self._a2a_gather(recv_x[:N], send, topo)
        if meta is not None:
            M = meta.shape[2]
            send = torch.full((PB + 1, M), -1, dtype=torch.int32, device=meta.device)
            send.index_copy_(0, dst, meta.reshape(-1, M))
            recv_meta = send.new_empty(N, M)
            self._a2a_gather(recv_meta, send[:PB], topo)
        return recv_x, recv_meta

    @staticmethod
    def _a2a_gather(out, send, topo: _Topo):
        import torch.distributed as dist

        if topo.P_tp == 1:
            if topo.group is None:
                out.copy_(send)
            else:
                dist.all_to_all_single(out, send, group=topo.group)
            return
        mid = send if topo.group is None else torch.empty_like(send)
        if topo.group is not None:
            dist.all_to_all_single(mid, send, group=topo.group)
        from ._comm import all_gather_flat

        all_gather_flat(out, mid, topo.tp_group)

    def reduce_back(self, out_NW, ctx: _Ctx, quant: str | None = None):
        """y [T, W] = sum over destinations d of the slot rows d sends back for t (TP partial sums added first)."""
        import torch.distributed as dist

        topo = ctx.topo
        PB = topo.P * topo.B
        red = out_NW.contiguous()
        if topo.P_tp > 1:
            from ._comm import _reduce_scatter_flat

            red = out_NW.new_empty(PB, out_NW.shape[1])
            _reduce_scatter_flat(red, out_NW.contiguous(), topo.tp_group)
        scale = None
        if quant == "int8":
            red, scale = _quant_int8(red)
        back = torch.empty_like(red) if topo.group is not None else red
        if topo.group is not None:
            dist.all_to_all_single(back, red, group=topo.group)
        if scale is not None:
            s = scale if topo.group is None else torch.empty_like(scale)
            if topo.group is not None:
                dist.all_to_all_single(s, scale, group=topo.group)
            back = back.float() * s[:, None]
        y = unpermute(back, ctx.flat_TP, None)
        return y if scale is None else y.to(out_NW.dtype)


_NCCL = _NcclTransport()


def _symm_transport_available(x: torch.Tensor, group) -> bool:
    if not x.is_cuda or group is None:
        return False
    from . import _symm

    return _symm.available(group)


def select_transport(x: torch.Tensor, group, transport: str = "auto") -> str:
    """The transport ``dispatch`` uses: the argument, else MOETRON_FUSED_TRANSPORT, else "symm" for CUDA tensors
    when torch symmetric memory works and the EP group fits on one node, else "nccl". Every rank computes the same
    answer from the same facts."""
    choice = transport if transport != "auto" else os.environ.get("MOETRON_FUSED_TRANSPORT", "auto")
    if choice not in _TRANSPORTS:
        raise ValueError(f"transport must be one of {_TRANSPORTS}, got {choice!r}")
    if choice == "auto":
        return "symm" if _symm_transport_available(x, group) else "nccl"
    if choice == "symm" and not _symm_transport_available(x, group):
        raise ValueError("transport='symm' needs CUDA tensors, an EP group of more than one rank on one node and "
                         "torch.distributed._symmetric_memory; use 'nccl' or 'auto'")
    return choice


def _get_transport(name: str, num_sms: int):
    if name == "nccl":
        return _NCCL
    from ._symm import SymmTransport

    return SymmTransport(num_sms)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


class _Scatter(Function):
    """x [T, W] -> recv [N + 1, W] (slot rows, zero last row) and recv_meta; adjoint: _Return's forward."""

    @staticmethod
    def forward(ctx, x, meta, tctx, transport, keep=True):
        recv_x, recv_meta = transport.exchange(x, meta, tctx, keep)
        ctx.args = (tctx, transport)
        if recv_meta is not None:
            ctx.mark_non_differentiable(recv_meta)
        return recv_x, recv_meta

    @staticmethod
    def backward(ctx, grad_recv, _grad_meta):
        tctx, transport = ctx.args
        N = tctx.topo.N
        return transport.reduce_back(grad_recv[:N], tctx), None, None, None, None


class _Return(Function):
    """out [N, W] slot rows -> y [T, W] = sum over destinations; adjoint: _Scatter's forward."""

    @staticmethod
    def forward(ctx, out, tctx, transport, quant):
        ctx.args = (tctx, transport)
        return transport.reduce_back(out, tctx, quant)

    @staticmethod
    def backward(ctx, grad_y):
        tctx, transport = ctx.args
        recv, _ = transport.exchange(grad_y.contiguous(), None, tctx)
        return recv[:tctx.topo.N], None, None, None


class _Expand(Function):
    """recv [N + 1, W] -> expand [R, W] = recv[row_slot]; adjoint: per-slot sum of its rows (unpermute)."""

    @staticmethod
    def forward(ctx, recv, plan):
        ctx.plan = plan
        return recv.index_select(0, plan.row_slot)

    @staticmethod
    def backward(ctx, g):
        d = unpermute(g.contiguous(), ctx.plan.row_of_NJ, None)
        return torch.cat([d, d.new_zeros(1, d.shape[1])]), None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


class FusedHandle:
    """Opaque state from ``dispatch`` for ``combine`` (the seed's expandIdx / epRecvCounts / tpRecvCounts)."""

    def __init__(self, topo, tctx, transport, plan, T, H, dtype, scales_src, recv_scales_NJ, counts_type):
        self.topo, self.tctx, self.transport, self.plan = topo, tctx, transport, plan
        self.T, self.H, self.dtype = T, H, dtype
        self.scales_src, self.recv_scales_NJ = scales_src, recv_scales_NJ
        self.counts_type = counts_type

    @property
    def num_rows(self) -> int:
        return self.topo.R

    def ep_recv_counts(self) -> torch.Tensor:
        """[L, P_tp·P] int32 rows each local expert received from each (TP rank, EP source)."""
        t = self.topo
        return self.plan.hits_NL.reshape(t.P_tp * t.P, t.B, t.L).sum(1, dtype=torch.int32).t().contiguous()

    def tp_recv_counts(self) -> torch.Tensor:
        """[P_tp] int32 rows (token, expert) received from each TP rank's block."""
        t = self.topo
        return self.plan.hits_NL.reshape(t.P_tp, -1).sum(1, dtype=torch.int32)

    def __repr__(self) -> str:
        t = self.topo
        return (f"FusedHandle(T={self.T}, H={self.H}, ep={t.P}, tp={t.P_tp}, local_experts={t.L}, "
                f"rows={t.R}, transport={self.transport.name!r})")


class DispatchResult(NamedTuple):
    expand_x: torch.Tensor  # [R, H] expert-major rows (int8 with quant="int8"); rows past the total are zeros
    dynamic_scales: torch.Tensor | None  # [R] fp32 per-row int8 scales (quant="int8"), else None
    tokens_per_expert: torch.Tensor  # [L] int64 cumulative ends ("cumsum") or counts ("count") per local expert
    handle: FusedHandle  # for combine
    expand_scales: torch.Tensor | None  # [R] fp32 routing scale of each row (when expert_scales was given)


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, *, group, num_experts: int,
             expert_scales: torch.Tensor | None = None, max_tokens_per_rank: int | None = None,
             shared_expert_num: int = 0, shared_expert_rank_num: int = 0, quant: str | None = None, tp_group=None,
             tokens_per_expert_type: str = "cumsum", transport: str = "auto",
             num_sms: int = DEFAULT_NUM_SMS) -> DispatchResult:
    """Send each token to the EP ranks holding its experts (once per rank), in gmm-ready expert-major order.

    Args:
        x: ``[T, H]`` fp16/bf16/fp32 this rank's tokens (T may differ per rank, up to max_tokens_per_rank).
        expert_ids: ``[T, K]`` int32/int64 routed expert ids in [0, num_experts), distinct within a row. Expert e
            lives on EP rank ``shared_expert_rank_num + e // E_l``.
        group: the EP process group (None: one process).
        num_experts: E, divisible by the number of MoE ranks (EP size - shared_expert_rank_num).
        expert_scales: optional ``[T, K]`` routing weights; sent along, so a combine given the same tensor (and no
            gradient to it) need not send them again. ``result.expand_scales`` holds each row's weight.
        max_tokens_per_rank: B, the same on every rank; None means T (then every rank must hold the same T).
        shared_expert_num / shared_expert_rank_num: shared experts on EP ranks [0, shared_expert_rank_num)
            (the seed's expertShardType 0); every token also goes to one replica of each, chosen by token index.
        quant: None or "int8" (per-token dynamic int8; expand_x is int8, dynamic_scales fp32; no autograd).
        tp_group: expert-TP group (the seed's TP domain): received rows are all-gathered over it.
        tokens_per_expert_type: "cumsum" (gmm offsets) or "count".
        transport: "auto", "nccl" or "symm" (see the module docstring); num_sms: programs of the symm kernels.

    No host sync, every size from shapes: CUDA-graph capturable. Expert ids are range- and repeat-checked on the
    CPU always and on the GPU with MOETRON_DEBUG=1 (which syncs).
    """
    topo = _make_topo(x, expert_ids, group, num_experts, max_tokens_per_rank, shared_expert_num,
                      shared_expert_rank_num, tp_group)
    T, H = x.shape
    if quant not in _QUANT_MODES:
        raise ValueError(f"quant must be one of {_QUANT_MODES}, got {quant!r}")
    if tokens_per_expert_type not in _COUNT_TYPES:
        raise ValueError(f"tokens_per_expert_type must be one of {_COUNT_TYPES}, got {tokens_per_expert_type!r}")
    if not _is_int(num_sms) or num_sms < 1:
        raise ValueError(f"num_sms must be a positive int, got {num_sms!r}")
    if expert_scales is not None:
        check_tensor("expert_scales", expert_scales, ndim=2, dtypes=_FLOAT_DTYPES)
        if tuple(expert_scales.shape) != tuple(expert_ids.shape):
            raise ValueError(f"expert_scales must have the shape of expert_ids {tuple(expert_ids.shape)}, got "
                             f"{tuple(expert_scales.shape)}")
    _check_ids_values(expert_ids, num_experts)
    _debug_same_on_ranks(topo, H, x.dtype)
    transport_name = select_transport(x, group, transport)
    tr = _get_transport(transport_name, num_sms)

    dest, local, pos, flat = _source_plan(expert_ids, topo)
    scales_TJ = None
    if expert_scales is not None:
        scales_TJ = _extend_scales(expert_scales.detach(), topo)
    x_send, dyn = (x, None) if quant is None else _quant_int8(x.detach())
    meta = _meta_rows(dest, local, scales_TJ, dyn, topo.P)
    tctx = _Ctx(topo, pos, flat)
    # keep=False: the symm transport may hand back its receive buffer itself; _Expand copies out of it at once
    recv_x, recv_meta = _Scatter.apply(x_send, meta, tctx, tr, False)

    J = topo.J
    plan = _dest_plan(recv_meta[:, :J], topo)
    own = recv_meta[topo.tp_rank * topo.P * topo.B:(topo.tp_rank + 1) * topo.P * topo.B, :J]
    tctx.slot_valid = (own >= 0).any(1)
    expand_x = _Expand.apply(recv_x, plan)
    col = J
    recv_scales = expand_scales = dynamic_scales = None
    if scales_TJ is not None:
        recv_scales = recv_meta[:, col:col + J].view(torch.float32)
        pad = torch.cat([recv_scales.reshape(-1), recv_scales.new_zeros(1)])
        expand_scales = pad.index_select(0, plan.row_src)
        col += J
    if quant is not None:
        dyn_N = torch.cat([recv_meta[:, col].view(torch.float32), recv_meta.new_zeros(1).view(torch.float32)])
        dynamic_scales = dyn_N.index_select(0, plan.row_slot)
    tpe = plan.counts_L if tokens_per_expert_type == "count" else torch.cumsum(plan.counts_L, 0)
    handle = FusedHandle(topo, tctx, tr, plan, T, H, x.dtype, expert_scales, recv_scales, tokens_per_expert_type)
    return DispatchResult(expand_x, dynamic_scales, tpe, handle, expand_scales)


def _extend_scales(scales_TK: torch.Tensor, topo: _Topo) -> torch.Tensor:
    """[T, J]: the K routing scales, then weight 1 for each shared-expert column."""
    s = scales_TK.float()
    if topo.J > topo.K:
        s = torch.cat([s, s.new_ones(s.shape[0], topo.J - topo.K)], 1)
    return s


def combine(expand_x: torch.Tensor, handle: FusedHandle, expert_scales: torch.Tensor | None, *,
            shared_expert_x: torch.Tensor | None = None, comm_quant: str | None = None) -> torch.Tensor:
    """Send expert outputs back along dispatch's paths and sum them per token.

    ``y[t] = sum_k expert_scales[t, k] · expand_x[row of (t, k)] + (its shared-expert rows) + shared_expert_x[t]``.

    Args:
        expand_x: ``[R, H]`` expert outputs in dispatch's row order (fp16/bf16/fp32).
        handle: ``dispatch(...).handle``.
        expert_scales: ``[T, K]`` weights (fp32 preferred), or None to reuse the ones given to dispatch.
        shared_expert_x: optional ``[T, H]`` added to the result (a shared expert computed on this rank).
        comm_quant: None or "int8": each destination's per-token sum travels as int8 with an fp32 scale.

    Autograd flows to expand_x, expert_scales and shared_expert_x. No host sync.
    """
    if not isinstance(handle, FusedHandle):
        raise TypeError(f"handle must be the FusedHandle from moetron.dispatch.dispatch, got {type(handle).__name__}")
    topo = handle.topo
    check_tensor("expand_x", expand_x, ndim=2, dtypes=_FLOAT_DTYPES)
    if tuple(expand_x.shape) != (topo.R, handle.H):
        raise ValueError(f"expand_x must be [R, H] = [{topo.R}, {handle.H}] (dispatch's rows and hidden size), got "
                         f"{tuple(expand_x.shape)}")
    if comm_quant not in _QUANT_MODES:
        raise ValueError(f"comm_quant must be one of {_QUANT_MODES}, got {comm_quant!r}")
    T = handle.T
    if shared_expert_x is not None:
        check_tensor("shared_expert_x", shared_expert_x, ndim=2, dtypes=_FLOAT_DTYPES)
        if tuple(shared_expert_x.shape) != (T, handle.H):
            raise ValueError(f"shared_expert_x must be [T, H] = [{T}, {handle.H}], got "
                             f"{tuple(shared_expert_x.shape)}")
    tctx, tr = handle.tctx, handle.transport
    if expert_scales is None:
        if handle.recv_scales_NJ is None:
            raise ValueError("expert_scales is required when dispatch was not given expert_scales")
        scales_NJ = handle.recv_scales_NJ
    else:
        check_tensor("expert_scales", expert_scales, ndim=2, dtypes=_FLOAT_DTYPES)
        if tuple(expert_scales.shape) != (T, topo.K):
            raise ValueError(f"expert_scales must be [T, K] = [{T}, {topo.K}], got {tuple(expert_scales.shape)}")
        wants_grad = torch.is_grad_enabled() and expert_scales.requires_grad
        if expert_scales is handle.scales_src and handle.recv_scales_NJ is not None and not wants_grad:
            scales_NJ = handle.recv_scales_NJ
        else:  # send the (possibly new) scales to the destinations; differentiable
            recv_s, _ = _Scatter.apply(_extend_scales(expert_scales, topo).contiguous(), None, tctx, tr)
            scales_NJ = recv_s[:topo.N]
    needs_grad = torch.is_grad_enabled() and (expand_x.requires_grad or scales_NJ.requires_grad)
    fused = getattr(tr, "combine_fused", None)
    if fused is not None and not needs_grad and topo.P_tp == 1 and comm_quant is None:
        y = fused(expand_x, handle.plan.row_of_NJ, scales_NJ, tctx)
    else:
        out = unpermute(expand_x, handle.plan.row_of_NJ, scales_NJ)  # [N, H] per-slot weighted sums
        y = _Return.apply(out, tctx, tr, comm_quant)
    if shared_expert_x is not None:
        y = y + shared_expert_x.to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------------------
# The layer's dispatcher (MoEConfig.dispatcher = "fused")
# ---------------------------------------------------------------------------------------------------------

from . import Dispatched, TokenDispatcher  # noqa: E402


class FusedDispatcher(TokenDispatcher):
    """``dispatch`` / ``combine`` behind MoELayer: EP over the "ep" group, expert TP over "etp" (the seed's TP
    domain: received rows all-gathered, partial outputs reduce-scattered). Dropless; no host sync.

    ``max_tokens_per_rank`` (attribute, default None = this call's T): set it when ranks hold different token
    counts, to the same bound on every rank. ``transport`` / ``num_sms``: see ``dispatch``."""

    name = "fused"

    def __init__(self, config, groups):
        super().__init__(config, groups)
        if config.capacity_factor is not None:
            raise ValueError(f"MoEConfig.capacity_factor must be None with dispatcher='fused' (it is dropless), "
                             f"got {config.capacity_factor!r}")
        if config.pad_to != 1:
            raise ValueError(f"MoEConfig.pad_to must be 1 with dispatcher='fused' (rows are dense per expert), got "
                             f"{config.pad_to!r}")
        self.ep_group, self.etp_group = groups.get("ep"), groups.get("etp")
        self.max_tokens_per_rank: int | None = None
        self.transport = "auto"
        self.num_sms = DEFAULT_NUM_SMS

    def dispatch(self, x_TH, probs_TK, ids_TK) -> Dispatched:
        E = self.config.num_experts
        if self.max_tokens_per_rank is None:
            from .allgather import check_same_tokens

            check_same_tokens(x_TH.shape[0], self.groups.get("ep_etp"), "dispatcher='fused' without "
                              "max_tokens_per_rank")
        r = dispatch(x_TH, ids_TK, group=self.ep_group, num_experts=E, expert_scales=probs_TK,
                     max_tokens_per_rank=self.max_tokens_per_rank, tp_group=self.etp_group,
                     transport=self.transport, num_sms=self.num_sms)
        ids = ids_TK.reshape(-1).long()
        kept = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
        num_dropped = torch.zeros((), dtype=torch.int64, device=ids.device)
        return Dispatched(r.expand_x, r.tokens_per_expert, kept, num_dropped, (r.handle, probs_TK))

    def combine(self, h, handle):
        fh, probs_TK = handle
        return combine(h, fh, probs_TK)
