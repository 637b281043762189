"""Fused expert-parallel dispatch / combine with MoeDistributeDispatch / MoeDistributeCombine semantics.

Legend: T tokens on this rank (BS), B = max_tokens_per_rank (the seed's globalBs / epWorldSize), H hidden, K top-k,
J = K + shared_expert_num columns of a token's routing (its K routed experts, then one column per shared expert),
P = EP ranks, P_tp TP ranks, Sh shared-expert ranks (EP ranks [0, Sh), expertShardType 0), E routed experts,
E_l = E / (P - Sh) experts per MoE rank, L experts held here (E_l, or 1 on a shared-expert rank),
N = P_tp·P·B receive slots, R = N·min(K, L) rows of the expert-major buffer (1 row per slot on a shared rank).

    r = dispatch(x [T, H], expert_ids [T, K], group=ep, num_experts=E, ...)
        r.expand_x [R, H]          rows for this rank's L experts: expert-major, then (TP rank, EP source) order,
                                   then token order; rows past r.tokens_per_expert's total are zeros
                                   (unspecified with zero_padding=False)
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
        rows are its slots in slot order: row = start[l] + (rows of l from earlier sources) + q, where q, the
        column's rank among its source's columns for l, is computed by the sender and travels in the metadata,
        and each source writes its per-expert counts next to its slots. One receive kernel copies the live slots
        straight into ``expand_x`` in that order (three Triton kernels in all: count, push, receive).
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
import triton
import triton.language as tl
from torch.autograd import Function

from .. import _env
from .._checks import FLOAT_DTYPES, check_tensor
from ..ops._launch import CachedLauncher
from ..ops.permute import unpermute
from .._compile import eager_function

__all__ = ["dispatch", "combine", "DispatchResult", "FusedHandle", "select_transport"]

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
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
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
# Kernels (shared by both transports; they run under Triton's CPU interpreter too)
#
# A "virtual expert" ve numbers every routing column: ve = expert id for the K routed columns, E + d for the shared
# column that goes to shared-expert rank d. Its destination is Sh + ve // E_l (routed) or ve - E (shared), its local
# expert there ve % E_l (routed) or 0 (shared). EV = E + Sh of them.
#
# Sender (G programs, program g owns tokens [g·chunk, (g+1)·chunk)):
#   _count_kernel: per program, how many columns hit each ve and how many tokens hit each destination (one-hot sums
#       in registers, one store per program).
#   _push_kernel: program g adds the rows of programs < g (its base), then walks its tokens in order: a token's
#       position at destination d = base + earlier tokens of the chunk bound for d (pos), and each column's rank among
#       this rank's columns for the same ve (q). Positions only depend on token order: deterministic. It stores the
#       row once per destination (slot (source, pos)), with a metadata row (local expert per column or -1, q per
#       column, scales, int8 scale), and program 0 writes the per-destination counts row (live slots, then columns
#       per local expert). The copies move TB tokens per step. The same kernel replays a stored plan (PLAN=False)
#       for the other exchanges.
# Receiver:
#   _recv_kernel: from the counts rows of all sources, expert l's rows start at start[l] + (rows of l from earlier
#       sources); a column's row is that + q. Each program recomputes this small table (sources x local experts)
#       into its own scratch row, then copies each live slot's row to its columns' rows, writes row_of [N, J]
#       (-1 for dead slots and other ranks' columns), the scales, and zeros past the total. Dead slots are never
#       read: nothing has to be cleared between calls.
# ---------------------------------------------------------------------------------------------------------

# Token block of the plan loops: BT·J_PAD = 64 (token, column) pairs compared pairwise (a [64, 64] tile).
_PAIRS = 64
# Row block per copy loop: 16 KiB of bf16 per program step (the probe's 294 GB/s at 16 programs used 8192-element
# blocks and 8 warps). Not swept yet.
_MAX_BLOCK_W = 8192
_NUM_WARPS = 8
_RECV_PROGRAMS_PER_SM = 4


@triton.jit
def _columns(ids_ptr, t, j, lim, K, E, E_l, Sh, reps, J: tl.constexpr):
    """Virtual expert, destination and local expert of (token t, column j); valid = t < lim and j < J."""
    valid = (t < lim) & (j < J)
    routed = j < K
    e = tl.load(ids_ptr + t * K + j, mask=valid & routed, other=0).to(tl.int64)
    ve = tl.where(routed, e, E + (j - K) * reps + t % reps)
    dest = tl.where(ve < E, Sh + ve // E_l, ve - E)
    local = tl.where(ve < E, ve % E_l, 0)
    return ve, dest, local, valid


@triton.jit
def _first_at_dest(dest, tt, i, valid):
    """Per (token, column) pair i of a block: valid and no earlier valid column of the same token (tt) is bound for
    the same destination. A token counts, and travels, once per destination: at its first column there. The count
    and push kernels must agree on this exactly."""
    dup = (dest[:, None] == dest[None, :]) & (tt[:, None] == tt[None, :]) & (i[None, :] < i[:, None]) & valid[None, :]
    return valid & (tl.sum(dup.to(tl.int32), 1) == 0)


@triton.jit
def _sum_rows(ptr, n_rows, stride, cols, col_ok, RB: tl.constexpr, WIDTH: tl.constexpr):
    """Column sums of rows [0, n_rows) of a row-major int32 table, RB rows per load: one wide load per step instead
    of a chain of n_rows dependent narrow ones (2x H200, DeepSeek-V3 decode: push kernel 69 -> 63 us)."""
    rr = tl.arange(0, RB)
    acc = tl.zeros((WIDTH,), tl.int32)
    for r0 in range(0, n_rows, RB):
        r = r0 + rr
        acc += tl.sum(tl.load(ptr + r[:, None] * stride + cols[None, :], mask=(r < n_rows)[:, None] & col_ok[None, :],
                              other=0), 0)
    return acc


@triton.jit
def _count_kernel(ids_ptr, hist_ptr, hits_ptr, T, K, E, E_l, Sh, reps, chunk, EV, P,
                  J: tl.constexpr, J_PAD: tl.constexpr, EV_PAD: tl.constexpr, P_PAD: tl.constexpr,
                  BT: tl.constexpr):
    """Per program (a chunk of tokens): hist[g, ve] = its (token, column) pairs per virtual expert, hits[g, d] = its
    tokens bound for destination d. Counted in registers with one-hot sums (no atomics: many lanes hitting the
    same few counters serialise) and stored once."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BT * J_PAD)
    tt = i // J_PAD
    jj = i % J_PAD
    ev = tl.arange(0, EV_PAD)
    pd = tl.arange(0, P_PAD)
    hist = tl.zeros((EV_PAD,), tl.int32)
    hits = tl.zeros((P_PAD,), tl.int32)
    t_lo = g * chunk
    t_hi = tl.minimum(t_lo + chunk, T)
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tt
        ve, dest, local, valid = _columns(ids_ptr, t, jj, t_hi, K, E, E_l, Sh, reps, J)
        hist += tl.sum(((ve[:, None] == ev[None, :]) & valid[:, None]).to(tl.int32), 0)
        first = _first_at_dest(dest, tt, i, valid)
        hits += tl.sum(((dest[:, None] == pd[None, :]) & first[:, None]).to(tl.int32), 0)
    tl.store(hist_ptr + g * EV + ev, hist, mask=ev < EV)
    tl.store(hits_ptr + g * P + pd, hits, mask=pd < P)


@triton.jit
def _push_kernel(
    x_ptr,  # [T, W] rows to send
    ids_ptr,  # [T, K] expert ids (PLAN)
    scale_ptr,  # [T, J] fp32 routing scales (HAS_SCALES)
    dyn_ptr,  # [T] fp32 int8 scales (HAS_DYN)
    hist_ptr, hits_ptr,  # [G·SUB, EV], [G·SUB, P] int32 from _count_kernel (PLAN): SUB rows per program here
    run_ptr,  # [G, EV + P] int32 scratch (PLAN)
    q_ptr,  # [T, J] int32 scratch: rank of each column among this rank's columns of its ve (PLAN)
    pos_ptr, flat_ptr,  # [T, P] int32: position at d / d·B + position, -1 if t does not go to d (written if PLAN)
    rows_ptr,  # PEER: [P] int64 address of each destination's rows; else the [P·B, W] send buffer
    meta_ptr,  # PEER: [P] int64 address of each destination's meta region; else the [P, MS] int32 send buffer
    T, W, stride_x, K, E, E_l, Sh, reps, chunk, EV, B, slot0, src_row, MS, M, G, SUB,
    P: tl.constexpr, J: tl.constexpr, J_PAD: tl.constexpr, EV_PAD: tl.constexpr, P_PAD: tl.constexpr,
    M_PAD: tl.constexpr, CS_PAD: tl.constexpr, BT: tl.constexpr, BLOCK_W: tl.constexpr, TB: tl.constexpr,
    PEER: tl.constexpr, PLAN: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_DYN: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    t_lo = g * chunk
    t_hi = tl.minimum(t_lo + chunk, T)
    RS = EV + P
    if PLAN:
        i = tl.arange(0, BT * J_PAD)
        tt = i // J_PAD
        jj = i % J_PAD
        ev = tl.arange(0, EV_PAD)
        pd = tl.arange(0, P_PAD)
        # the count kernel's rows of every earlier token
        acc_e = _sum_rows(hist_ptr, g * SUB, EV, ev, ev < EV, 16, EV_PAD)
        acc_p = _sum_rows(hits_ptr, g * SUB, P, pd, pd < P, 16, P_PAD)
        tl.store(run_ptr + g * RS + ev, acc_e, mask=ev < EV)
        tl.store(run_ptr + g * RS + EV + pd, acc_p, mask=pd < P)
        tb = tl.arange(0, BT)
        for t0 in range(t_lo, t_hi, BT):
            tok = t0 + tb
            none = tl.full((BT, P_PAD), -1, tl.int32)
            tp_mask = (tok < t_hi)[:, None] & (pd < P)[None, :]
            tl.store(pos_ptr + tok[:, None] * P + pd[None, :], none, mask=tp_mask)
            tl.store(flat_ptr + tok[:, None] * P + pd[None, :], none, mask=tp_mask)
            tl.debug_barrier()  # run's stores (and the -1s) before the loads below
            t = t0 + tt
            ve, dest, local, valid = _columns(ids_ptr, t, jj, t_hi, K, E, E_l, Sh, reps, J)
            earlier = i[None, :] < i[:, None]
            later = i[None, :] > i[:, None]
            same = (ve[:, None] == ve[None, :]) & valid[None, :]
            q = tl.load(run_ptr + g * RS + ve, mask=valid, other=0) + tl.sum((same & earlier).to(tl.int32), 1)
            last_e = valid & (tl.sum((same & later).to(tl.int32), 1) == 0)
            first = _first_at_dest(dest, tt, i, valid)
            same_d = (dest[:, None] == dest[None, :]) & first[None, :]
            pos = tl.load(run_ptr + g * RS + EV + dest, mask=first, other=0) + \
                tl.sum((same_d & earlier).to(tl.int32), 1)
            last_d = first & (tl.sum((same_d & later).to(tl.int32), 1) == 0)
            tl.debug_barrier()  # every load of run before it moves on
            tl.store(run_ptr + g * RS + ve, q + 1, mask=last_e)
            tl.store(run_ptr + g * RS + EV + dest, pos + 1, mask=last_d)
            tl.store(q_ptr + t * J + jj, q, mask=valid)
            tl.store(pos_ptr + t * P + dest, pos, mask=first)
            tl.store(flat_ptr + t * P + dest, (dest * B + pos).to(tl.int32), mask=first)
            tl.debug_barrier()
        if g == 0:  # the counts row for each destination: live slots, then columns per local expert
            c = tl.arange(0, CS_PAD)
            hits_all = _sum_rows(hits_ptr, G * SUB, P, pd, pd < P, 16, P_PAD)
            for d in tl.static_range(P):
                first_ve = tl.where(d < Sh, E + d, (d - Sh) * E_l)
                n_loc = tl.where(d < Sh, 1, E_l)
                cm = (c >= 1) & (c <= n_loc)
                row = _sum_rows(hist_ptr + first_ve - 1, G * SUB, EV, c, cm, 16, CS_PAD)
                row += tl.where(c == 0, tl.sum(tl.where(pd == d, hits_all, 0)), 0)
                if PEER:
                    dst = tl.load(meta_ptr + d).to(tl.pointer_type(tl.int32)) + src_row * MS + B * M
                else:
                    dst = meta_ptr + d * MS + src_row * MS + B * M
                tl.store(dst + c, row, mask=c <= n_loc)
        tl.debug_barrier()  # pos / q of the chunk before the copies read them
    # the copies: TB tokens per step, so each program has TB rows in flight (one row at a time left a program
    # waiting on each load's latency: 24 programs moved ~85 GB/s)
    cols = tl.arange(0, BLOCK_W)
    tb = tl.arange(0, TB)
    mc = tl.arange(0, M_PAD)
    for t0 in range(t_lo, t_hi, TB):
        tok = t0 + tb
        tok_ok = tok < t_hi
        for w0 in range(0, W, BLOCK_W):
            w = w0 + cols
            in_row = w < W
            v = tl.load(x_ptr + tok[:, None] * stride_x + w[None, :], mask=tok_ok[:, None] & in_row[None, :])
            for d in tl.static_range(P):
                p = tl.load(pos_ptr + tok * P + d, mask=tok_ok, other=-1)
                if PEER:
                    dst = tl.load(rows_ptr + d).to(tl.pointer_type(x_ptr.dtype.element_ty))
                else:
                    dst = rows_ptr + d * B * W
                slot = (slot0 + p).to(tl.int64)
                tl.store(dst + slot[:, None] * W + w[None, :], v, mask=(p >= 0)[:, None] & in_row[None, :])
        if PLAN:
            tm = tok[:, None] + tl.zeros((TB, M_PAD), tl.int64)
            mm = mc[None, :] + tl.zeros((TB, M_PAD), tl.int32)
            ve, dest, local, valid = _columns(ids_ptr, tm, mm, T, K, E, E_l, Sh, reps, J)
            live = tok_ok[:, None]
            qv = tl.load(q_ptr + tm * J + mm - J, mask=live & (mm >= J) & (mm < 2 * J), other=0)
            meta = tl.where(mm < J, local, qv)
            dcol = 2 * J
            if HAS_SCALES:
                in_sc = (mm >= dcol) & (mm < dcol + J)
                sv = tl.load(scale_ptr + tm * J + mm - dcol, mask=live & in_sc, other=0.0)
                meta = tl.where(in_sc, sv.to(tl.int32, bitcast=True), meta)
                dcol += J
            if HAS_DYN:
                dv = tl.load(dyn_ptr + tm + mm * 0, mask=live & (mm == dcol), other=0.0)
                meta = tl.where(mm == dcol, dv.to(tl.int32, bitcast=True), meta)
            for d in tl.static_range(P):
                p = tl.load(pos_ptr + tok * P + d, mask=tok_ok, other=-1)
                row = tl.where((mm < J) & (dest != d), -1, meta).to(tl.int32)
                if PEER:
                    dst = tl.load(meta_ptr + d).to(tl.pointer_type(tl.int32))
                else:
                    dst = meta_ptr + d * MS
                tl.store(dst + src_row * MS + p.to(tl.int64)[:, None] * M + mm, row,
                         mask=(p >= 0)[:, None] & (mm < M))


@triton.jit
def _recv_kernel(
    rows_ptr,  # [S·B, W] received slot rows (slot s·B + p)
    meta_ptr,  # [S, MS] int32: per source, B metadata rows of M ints, then its counts row
    out_ptr,  # [R, W] expand_x
    row_of_ptr,  # [N, J] int32 out
    sc_out_ptr,  # [N, J] fp32 out (HAS_SCALES)
    es_ptr,  # [R] fp32 out: each row's scale (HAS_SCALES)
    dyn_out_ptr,  # [R] fp32 out (HAS_DYN)
    tpe_ptr,  # [L] int64 out
    cnt_out_ptr,  # [S, CS] int32 out: a copy of the counts rows
    base_ptr,  # [G, S_PAD·L_PAD] int32 scratch
    N, W, B, MS, M, R, S, L, CS,
    J: tl.constexpr, J_PAD: tl.constexpr, S_PAD: tl.constexpr, L_PAD: tl.constexpr, CS_PAD: tl.constexpr,
    BLOCK_W: tl.constexpr, SB: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_DYN: tl.constexpr,
    CUMSUM: tl.constexpr, ZERO_ROWS: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0)
    sr = tl.arange(0, S_PAD).to(tl.int64)
    lc = tl.arange(0, L_PAD)
    tab = tl.load(meta_ptr + sr[:, None] * MS + B * M + 1 + lc[None, :], mask=(sr < S)[:, None] & (lc < L)[None, :],
                  other=0)
    off = tl.cumsum(tab, 0) - tab  # rows of expert l from earlier sources
    tot = tl.sum(tab, 0)
    start = tl.cumsum(tot, 0) - tot
    total = tl.sum(tot, 0)
    tl.store(base_ptr + g * S_PAD * L_PAD + sr[:, None] * L_PAD + lc[None, :], start[None, :] + off)
    if g == 0:
        if CUMSUM:
            tl.store(tpe_ptr + lc, (start + tot).to(tl.int64), mask=lc < L)
        else:
            tl.store(tpe_ptr + lc, tot.to(tl.int64), mask=lc < L)
        cc = tl.arange(0, CS_PAD)
        cnt = tl.load(meta_ptr + sr[:, None] * MS + B * M + cc[None, :], mask=(sr < S)[:, None] & (cc < CS)[None, :])
        tl.store(cnt_out_ptr + sr[:, None] * CS + cc[None, :], cnt, mask=(sr < S)[:, None] & (cc < CS)[None, :])
    tl.debug_barrier()
    # SB slots per step (a row at a time left each program waiting on every load)
    jc = tl.arange(0, J_PAD)
    jm = jc < J
    cols = tl.arange(0, BLOCK_W)
    sb = tl.arange(0, SB)
    for n0 in range(g * SB, N, G * SB):
        n = n0 + sb
        n_ok = n < N
        s = n // B
        p = n - s * B
        live = tl.load(meta_ptr + s * MS + B * M, mask=n_ok, other=0)
        is_live = n_ok & (p < live)  # dead slots get row_of -1 and scale 0; their rows are never read
        mrow = s * MS + p * M
        col_ok = is_live[:, None] & jm[None, :]
        loc = tl.load(meta_ptr + mrow[:, None] + jc[None, :], mask=col_ok, other=-1)
        here = loc >= 0
        q = tl.load(meta_ptr + mrow[:, None] + J + jc[None, :], mask=col_ok & here, other=0)
        base = tl.load(base_ptr + g * S_PAD * L_PAD + s[:, None] * L_PAD + loc, mask=here, other=0)
        rows = tl.where(here, base + q, -1)
        tl.store(row_of_ptr + n[:, None] * J + jc[None, :], rows, mask=n_ok[:, None] & jm[None, :])
        if HAS_SCALES:
            sc = tl.load(meta_ptr + mrow[:, None] + 2 * J + jc[None, :], mask=col_ok & here,
                         other=0).to(tl.float32, bitcast=True)
            tl.store(sc_out_ptr + n[:, None] * J + jc[None, :], sc, mask=n_ok[:, None] & jm[None, :])
            tl.store(es_ptr + rows, sc, mask=here)
        if HAS_DYN:
            dcol = 3 * J if HAS_SCALES else 2 * J
            dv = tl.load(meta_ptr + mrow + dcol, mask=is_live, other=0).to(tl.float32, bitcast=True)
            tl.store(dyn_out_ptr + rows, dv[:, None] + tl.zeros((SB, J_PAD), tl.float32), mask=here)
        for w0 in range(0, W, BLOCK_W):
            w = w0 + cols
            in_row = w < W
            v = tl.load(rows_ptr + n[:, None] * W + w[None, :], mask=is_live[:, None] & in_row[None, :])
            for j in tl.static_range(J):
                r = tl.sum(tl.where(jc[None, :] == j, rows, 0), 1).to(tl.int64)
                tl.store(out_ptr + r[:, None] * W + w[None, :], v, mask=(r >= 0)[:, None] & in_row[None, :])
    # rows past the total are zeros (only those: the live rows were written above); their scales always are
    for r0 in range(total.to(tl.int64) + g * SB, R, G * SB):
        r = r0 + sb
        r_ok = r < R
        if ZERO_ROWS:
            for w0 in range(0, W, BLOCK_W):
                w = w0 + cols
                tl.store(out_ptr + r[:, None] * W + w[None, :], tl.zeros((SB, BLOCK_W), out_ptr.dtype.element_ty),
                         mask=r_ok[:, None] & (w < W)[None, :])
        if HAS_SCALES:
            tl.store(es_ptr + r, tl.zeros((SB,), tl.float32), mask=r_ok)
        if HAS_DYN:
            tl.store(dyn_out_ptr + r, tl.zeros((SB,), tl.float32), mask=r_ok)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _block_w(width: int) -> int:
    return max(16, min(_pow2(width), _MAX_BLOCK_W))


def _copy_tokens(width: int) -> int:
    """Tokens per step of the push kernel's copy loop: TB x BLOCK_W <= _MAX_BLOCK_W x 2 elements in flight."""
    return max(1, min(16, 2 * _MAX_BLOCK_W // _block_w(width)))


_COUNT = CachedLauncher(_count_kernel)
_PUSH = CachedLauncher(_push_kernel)
_RECV = CachedLauncher(_recv_kernel)


# The count kernel runs _COUNT_SUB programs per push program, each over a _COUNT_SUB-th of its tokens: it is a
# serial walk over token blocks, and 24 programs of it took ~200 us at 4096 tokens (H200).
_COUNT_SUB = 8


def _plan_grid(T: int, num_sms: int) -> tuple[int, int, int]:
    """(push programs G, tokens per push program, tokens per count program): at least one program (it writes the
    counts rows even when T = 0); a push program's tokens are exactly those of _COUNT_SUB count programs."""
    G = max(1, min(num_sms, T))
    sub_chunk = max(1, -(-T // (G * _COUNT_SUB)))
    chunk = sub_chunk * _COUNT_SUB
    return max(1, -(-T // chunk)), chunk, sub_chunk


def _launch_push(x, ids, scales_TJ, dyn, topo: "_Topo", *, rows, meta, peer: bool, slot0: int, src_row: int,
                 MS: int, M: int, plan, num_sms: int):
    """Sender side of one exchange. ``plan`` is None (compute it: returns (pos_TP, flat_TP)) or the (pos, flat) of an
    earlier dispatch (replay: rows only)."""
    T, W = x.shape
    dev = x.device
    P, B, J, K = topo.P, topo.B, topo.J, topo.K
    G, chunk, sub_chunk = _plan_grid(T, num_sms)
    EV = topo.E + topo.Sh
    reps = topo.Sh // topo.n_shared if topo.Sh else 1
    J_PAD = _pow2(J)
    BT = max(1, _PAIRS // J_PAD)
    EV_PAD, P_PAD, CS_PAD = _pow2(EV), _pow2(P), _pow2(topo.E_l + 1)
    M_PAD = max(16, _pow2(M)) if M else 16
    is_plan = plan is None
    i32 = torch.int32
    if is_plan:
        pos = torch.empty(T, P, dtype=i32, device=dev)
        flat = torch.empty(T, P, dtype=i32, device=dev)
        hist = torch.empty(G * _COUNT_SUB, EV, dtype=i32, device=dev)
        hits = torch.empty(G * _COUNT_SUB, P, dtype=i32, device=dev)
        run = torch.empty(G, EV + P, dtype=i32, device=dev)
        q = torch.empty(max(T, 1), J, dtype=i32, device=dev)
        ids = ids.contiguous()
        _COUNT((G * _COUNT_SUB,), [ids, hist, hits, T, K, topo.E, topo.E_l, topo.Sh, reps, sub_chunk, EV, P],
               dict(J=J, J_PAD=J_PAD, EV_PAD=EV_PAD, P_PAD=P_PAD, BT=BT), num_warps=4)
    else:
        pos, flat = plan
        hist = hits = run = q = pos
        ids = pos
    sc = scales_TJ if scales_TJ is not None else pos
    dy = dyn if dyn is not None else pos
    _PUSH((G,), [x, ids, sc, dy, hist, hits, run, q, pos, flat, rows, meta if meta is not None else pos,
                 T, W, x.stride(0), K, topo.E, topo.E_l, topo.Sh, reps, chunk, EV, B, slot0, src_row, MS, M, G,
                 _COUNT_SUB],
          dict(P=P, J=J, J_PAD=J_PAD, EV_PAD=EV_PAD, P_PAD=P_PAD, M_PAD=M_PAD, CS_PAD=CS_PAD, BT=BT,
               BLOCK_W=_block_w(W), TB=_copy_tokens(W), PEER=peer, PLAN=is_plan, HAS_SCALES=scales_TJ is not None,
               HAS_DYN=dyn is not None), num_warps=_NUM_WARPS)
    return pos, flat


def _meta_width(topo: "_Topo", has_scales: bool, has_dyn: bool) -> tuple[int, int]:
    """(M ints per slot, ints per source block MS = B·M + counts row)."""
    M = 2 * topo.J + (topo.J if has_scales else 0) + (1 if has_dyn else 0)
    return M, topo.B * M + topo.E_l + 1


class _Received(NamedTuple):
    row_of_NJ: torch.Tensor  # [N, J] int32 expand_x row of each (slot, column), -1 if none
    counts_SC: torch.Tensor  # [S, 1 + E_l] int32 per source block: live slots, then columns per local expert
    scales_NJ: torch.Tensor | None  # [N, J] fp32 routing scales (0 where row_of is -1)


def _launch_recv(rows, meta, topo: "_Topo", M: int, MS: int, *, has_scales, has_dyn, cumsum, num_sms,
                 zero_padding):
    """Receiver side: expert-major expand_x and everything combine needs, from the received slots."""
    N, R, J, L, B = topo.N, topo.R, topo.J, topo.L, topo.B
    S = topo.P_tp * topo.P
    W = rows.shape[1]
    dev = rows.device
    # a local HBM copy (and the zeros past the total, which the API promises): 4x the transport's programs, as
    # nothing else runs then. Predicted, not measured: 24 programs would cap it near 0.5 TB/s.
    G = max(1, min(_RECV_PROGRAMS_PER_SM * num_sms, N))
    S_PAD, L_PAD = _pow2(S), _pow2(L)
    out = rows.new_empty(R, W)
    row_of = torch.empty(N, J, dtype=torch.int32, device=dev)
    sc = torch.empty(N, J, dtype=torch.float32, device=dev) if has_scales else None
    es = torch.empty(R, dtype=torch.float32, device=dev) if has_scales else None
    dyn = torch.empty(R, dtype=torch.float32, device=dev) if has_dyn else None
    tpe = torch.empty(L, dtype=torch.int64, device=dev)
    CS = topo.E_l + 1
    cnt = torch.empty(S, CS, dtype=torch.int32, device=dev)
    base = torch.empty(G, S_PAD * L_PAD, dtype=torch.int32, device=dev)
    dummy = row_of
    _RECV((G,), [rows, meta, out, row_of, sc if has_scales else dummy, es if has_scales else dummy,
                 dyn if has_dyn else dummy, tpe, cnt, base, N, W, B, MS, M, R, S, L, CS],
          dict(J=J, J_PAD=_pow2(J), S_PAD=S_PAD, L_PAD=L_PAD, CS_PAD=_pow2(CS), BLOCK_W=_block_w(W),
               SB=_copy_tokens(W), HAS_SCALES=has_scales, HAS_DYN=has_dyn, CUMSUM=cumsum, ZERO_ROWS=zero_padding),
         num_warps=_NUM_WARPS)
    return out, es, dyn, tpe, _Received(row_of, cnt, sc)


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
    """What a transport needs for one dispatch's later exchanges (set by dispatch)."""
    topo: _Topo
    pos_TP: torch.Tensor  # [T, P] int32 position at each destination, -1 if none
    flat_TP: torch.Tensor  # [T, P] int32 d·B + pos, or -1
    num_sms: int = DEFAULT_NUM_SMS
    recv: _Received | None = None  # this rank's receive-side plan (after the exchange)
    _slot_live: torch.Tensor | None = None

    @property
    def slot_valid(self) -> torch.Tensor:
        """[P·B] bool: this rank's EP slots (own TP block) holding a token (computed once, on the device)."""
        if self._slot_live is None:
            t = self.topo
            own = self.recv.row_of_NJ[t.tp_rank * t.P * t.B:(t.tp_rank + 1) * t.P * t.B]
            self._slot_live = (own >= 0).any(1)
        return self._slot_live


def _tp_gather(t: torch.Tensor, topo: _Topo) -> torch.Tensor:
    """Expert-TP: the EP-received block all-gathered over TP (fixed size, TP-rank-major)."""
    if topo.P_tp == 1:
        return t
    from ._comm import all_gather_flat

    g = t.new_empty((topo.P_tp * t.shape[0],) + tuple(t.shape[1:]))
    all_gather_flat(g, t.contiguous(), topo.tp_group)
    return g


class _NcclTransport:
    """Fixed-size all_to_all_single of the [P, B] slot rows (and of the metadata blocks); TP by all_gather /
    reduce_scatter of the whole buffer. Works on gloo (the CPU tests)."""

    name = "nccl"

    def dispatch_exchange(self, x, ids, scales_TJ, dyn, topo: _Topo, M: int, MS: int, num_sms: int):
        """-> (recv rows [N, W], recv meta [S, MS], pos_TP, flat_TP)."""
        P, B = topo.P, topo.B
        send_rows = x.new_empty(P * B, x.shape[1])
        send_meta = torch.empty(P, MS, dtype=torch.int32, device=x.device)
        pos, flat = _launch_push(x, ids, scales_TJ, dyn, topo, rows=send_rows, meta=send_meta, peer=False, slot0=0,
                                 src_row=0, MS=MS, M=M, plan=None, num_sms=num_sms)
        rows = self._a2a(send_rows, topo)
        meta = self._a2a(send_meta, topo)
        return _tp_gather(rows, topo), _tp_gather(meta, topo), pos, flat

    def replay(self, x, ctx: _Ctx) -> torch.Tensor:
        """Rows x [T, W] to the slots dispatch chose -> [N, W] (rows of dead slots are unspecified)."""
        topo = ctx.topo
        send = x.new_empty(topo.P * topo.B, x.shape[1])
        _launch_push(x, None, None, None, topo, rows=send, meta=None, peer=False, slot0=0, src_row=0, MS=0, M=0,
                     plan=(ctx.pos_TP, ctx.flat_TP), num_sms=ctx.num_sms)
        return _tp_gather(self._a2a(send, topo), topo)

    @staticmethod
    def _a2a(send, topo: _Topo):
        import torch.distributed as dist

        if topo.group is None:
            return send
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=topo.group)
        return out

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


_SYMM_TRANSPORTS: dict = {}


def _get_transport(name: str, num_sms: int):
    if name == "nccl":
        return _NCCL
    tr = _SYMM_TRANSPORTS.get(num_sms)
    if tr is None:
        from ._symm import SymmTransport

        tr = _SYMM_TRANSPORTS[num_sms] = SymmTransport(num_sms)
    return tr


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


@eager_function
class _Dispatch(Function):
    """x [T, H] -> expand_x [R, H] (exchange + expert-major gather); adjoint: per-slot sums of the row gradients
    (unpermute with row_of), sent back and summed per token (reduce_back)."""

    @staticmethod
    def forward(ctx, x, ids, scales_TJ, dyn, topo, tr, num_sms, cumsum, zero_padding):
        has_scales, has_dyn = scales_TJ is not None, dyn is not None
        M, MS = _meta_width(topo, has_scales, has_dyn)
        rows, meta, pos, flat = tr.dispatch_exchange(x, ids, scales_TJ, dyn, topo, M, MS, num_sms)
        out, es, dyn_R, tpe, recv = _launch_recv(rows, meta, topo, M, MS, has_scales=has_scales, has_dyn=has_dyn,
                                                 cumsum=cumsum, num_sms=num_sms, zero_padding=zero_padding)
        tctx = _Ctx(topo, pos, flat, num_sms, recv)
        ctx.args = (tctx, tr)
        extras = [t for t in (es, dyn_R, tpe) if t is not None]
        ctx.mark_non_differentiable(*extras)
        return out, es, dyn_R, tpe, tctx

    @staticmethod
    def backward(ctx, g, *_):
        tctx, tr = ctx.args
        d = unpermute(g.contiguous(), tctx.recv.row_of_NJ, None)
        return tr.reduce_back(d, tctx), None, None, None, None, None, None, None, None


@eager_function
class _Scatter(Function):
    """x [T, W] -> [N, W] slot rows (replaying dispatch's plan); adjoint: _Return's forward."""

    @staticmethod
    def forward(ctx, x, tctx, transport):
        ctx.args = (tctx, transport)
        return transport.replay(x.contiguous(), tctx)

    @staticmethod
    def backward(ctx, grad_recv):
        tctx, transport = ctx.args
        return transport.reduce_back(grad_recv, tctx), None, None


@eager_function
class _Return(Function):
    """out [N, W] slot rows -> y [T, W] = sum over destinations; adjoint: _Scatter's forward."""

    @staticmethod
    def forward(ctx, out, tctx, transport, quant):
        ctx.args = (tctx, transport)
        return transport.reduce_back(out, tctx, quant)

    @staticmethod
    def backward(ctx, grad_y):
        tctx, transport = ctx.args
        return transport.replay(grad_y.contiguous(), tctx), None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


class FusedHandle:
    """Opaque state from ``dispatch`` for ``combine`` (the seed's expandIdx / epRecvCounts / tpRecvCounts)."""

    def __init__(self, topo, tctx, transport, T, H, dtype, scales_src, counts_type):
        self.topo, self.tctx, self.transport = topo, tctx, transport
        self.T, self.H, self.dtype = T, H, dtype
        self.scales_src = scales_src
        self.counts_type = counts_type

    @property
    def recv_scales_NJ(self) -> torch.Tensor | None:
        return self.tctx.recv.scales_NJ

    @property
    def row_of_NJ(self) -> torch.Tensor:
        return self.tctx.recv.row_of_NJ

    @property
    def num_rows(self) -> int:
        return self.topo.R

    def _counts_LS(self) -> torch.Tensor:
        t = self.topo
        return self.tctx.recv.counts_SC[:, 1:1 + t.L]

    def ep_recv_counts(self) -> torch.Tensor:
        """[L, P_tp·P] int32 rows each local expert received from each (TP rank, EP source)."""
        return self._counts_LS().t().contiguous()

    def tp_recv_counts(self) -> torch.Tensor:
        """[P_tp] int32 rows (token, expert) received from each TP rank's block."""
        t = self.topo
        return self._counts_LS().reshape(t.P_tp, -1).sum(1, dtype=torch.int32)

    def __repr__(self) -> str:
        t = self.topo
        return (f"FusedHandle(T={self.T}, H={self.H}, ep={t.P}, tp={t.P_tp}, local_experts={t.L}, "
                f"rows={t.R}, transport={self.transport.name!r})")


class DispatchResult(NamedTuple):
    expand_x: torch.Tensor  # [R, H] expert-major rows (int8 with quant="int8"); rows past the total are zeros
    # (unspecified with zero_padding=False)
    dynamic_scales: torch.Tensor | None  # [R] fp32 per-row int8 scales (quant="int8"), else None
    tokens_per_expert: torch.Tensor  # [L] int64 cumulative ends ("cumsum") or counts ("count") per local expert
    handle: FusedHandle  # for combine
    expand_scales: torch.Tensor | None  # [R] fp32 routing scale of each row (when expert_scales was given)


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, *, group, num_experts: int,
             expert_scales: torch.Tensor | None = None, max_tokens_per_rank: int | None = None,
             shared_expert_num: int = 0, shared_expert_rank_num: int = 0, quant: str | None = None, tp_group=None,
             tokens_per_expert_type: str = "cumsum", transport: str = "auto",
             num_sms: int = DEFAULT_NUM_SMS, zero_padding: bool = True) -> DispatchResult:
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
        zero_padding: write zeros into the rows of ``expand_x`` past the total (R is sized for the worst case, so
            at prefill these can be half of it). False leaves them unspecified (their scales are still zero):
            right for ``gmm`` with ``offsets=tokens_per_expert``, which never reads them, and what the MoE layer
            uses; the compat entry points keep the zeros.

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
    if not isinstance(zero_padding, bool):
        raise TypeError(f"zero_padding must be a bool, got {zero_padding!r}")
    if not x.is_cuda and not _env.triton_interpreter_enabled():
        # the kernels are Triton's: CPU tensors run only under its interpreter (tests); say so, not crash in one
        raise ValueError(f"x must be a CUDA tensor for the fused dispatch kernels, got a tensor on {x.device}; on CPU "
                         "they run only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    if expert_scales is not None:
        check_tensor("expert_scales", expert_scales, ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(expert_scales.shape) != tuple(expert_ids.shape):
            raise ValueError(f"expert_scales must have the shape of expert_ids {tuple(expert_ids.shape)}, got "
                             f"{tuple(expert_scales.shape)}")
    _check_ids_values(expert_ids, num_experts)
    _debug_same_on_ranks(topo, H, x.dtype)
    transport_name = select_transport(x, group, transport)
    tr = _get_transport(transport_name, num_sms)

    scales_TJ = None
    if expert_scales is not None:
        scales_TJ = _extend_scales(expert_scales.detach(), topo).contiguous()
    x_send, dyn = (x, None) if quant is None else _quant_int8(x.detach())
    expand_x, expand_scales, dynamic_scales, tpe, tctx = _Dispatch.eager_apply(
        x_send.contiguous(), expert_ids, scales_TJ, dyn, topo, tr, num_sms, tokens_per_expert_type == "cumsum",
        zero_padding)
    handle = FusedHandle(topo, tctx, tr, T, H, x.dtype, expert_scales, tokens_per_expert_type)
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
    check_tensor("expand_x", expand_x, ndim=2, dtypes=FLOAT_DTYPES)
    if tuple(expand_x.shape) != (topo.R, handle.H):
        raise ValueError(f"expand_x must be [R, H] = [{topo.R}, {handle.H}] (dispatch's rows and hidden size), got "
                         f"{tuple(expand_x.shape)}")
    if comm_quant not in _QUANT_MODES:
        raise ValueError(f"comm_quant must be one of {_QUANT_MODES}, got {comm_quant!r}")
    T = handle.T
    if shared_expert_x is not None:
        check_tensor("shared_expert_x", shared_expert_x, ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(shared_expert_x.shape) != (T, handle.H):
            raise ValueError(f"shared_expert_x must be [T, H] = [{T}, {handle.H}], got "
                             f"{tuple(shared_expert_x.shape)}")
    tctx, tr = handle.tctx, handle.transport
    if expert_scales is None:
        if handle.recv_scales_NJ is None:
            raise ValueError("expert_scales is required when dispatch was not given expert_scales")
        scales_NJ = handle.recv_scales_NJ
    else:
        check_tensor("expert_scales", expert_scales, ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(expert_scales.shape) != (T, topo.K):
            raise ValueError(f"expert_scales must be [T, K] = [{T}, {topo.K}], got {tuple(expert_scales.shape)}")
        wants_grad = torch.is_grad_enabled() and expert_scales.requires_grad
        if expert_scales is handle.scales_src and handle.recv_scales_NJ is not None and not wants_grad:
            scales_NJ = handle.recv_scales_NJ
        else:  # send the (possibly new) scales to the destinations; differentiable
            scales_NJ = _Scatter.eager_apply(_extend_scales(expert_scales, topo).contiguous(), tctx, tr)
    out = unpermute(expand_x, handle.row_of_NJ, scales_NJ)  # [N, H] per-slot weighted sums, all SMs
    y = _Return.eager_apply(out, tctx, tr, comm_quant)  # each slot's sum back to its source, summed there
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
        # zero_padding=False: the experts' gmm never reads the rows past the total (it writes zeros there itself)
        r = dispatch(x_TH, ids_TK, group=self.ep_group, num_experts=E, expert_scales=probs_TK,
                     max_tokens_per_rank=self.max_tokens_per_rank, tp_group=self.etp_group,
                     transport=self.transport, num_sms=self.num_sms, zero_padding=False)
        ids = ids_TK.reshape(-1).long()
        kept = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
        num_dropped = torch.zeros((), dtype=torch.int64, device=ids.device)
        return Dispatched(r.expand_x, r.tokens_per_expert, kept, num_dropped, (r.handle, probs_TK))

    def combine(self, h, handle):
        fh, probs_TK = handle
        return combine(h, fh, probs_TK)
