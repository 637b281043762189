"""Token permute / unpermute: group routed token rows by expert, and sum expert outputs back per token.

Legend: T tokens, H hidden, E experts, K top-k, R routed rows (T·K slots), R_out rows of the permuted buffer.

    permute(x [T, H], expert_ids [T, K], E) -> x_permuted [R_out, H], row_map [T, K], counts ...
    unpermute(y_permuted [R_out, H], row_map [T, K], probs [T, K]) -> y [T, H]
        y[t] = sum_k probs[t, k] * y_permuted[row_map[t, k]]       (dropped slots, row_map = -1, add nothing)

Slot (t, k) is flat index r = t·K + k. The permuted layout is expert-major, and inside one expert the kept slots
appear in increasing r, i.e. (token, k) order. No atomics decide any order, so the layout is a pure function of
the routing, and nothing is read back on the host. The indices come from a two-pass counting sort in Triton
(per-chunk expert histograms, a prefix scan over chunks, then ranks from a cumsum down a one-hot tile); the torch
backend, E > 1024 and the probs drop competition use stable sorts and binary searches in torch instead. The
data movement is Triton: one program per token (permute, which scatters the token's row to its K rows while
extra programs zero the rows no slot fills; unpermute, and the backward of permute; and the backward of an
unweighted unpermute, a copy) or per destination row (the backward of a weighted unpermute), each sweeping H in
blocks. Every output row is written by exactly one program, padding rows included, so no output is memset first.

Three layouts, all with a size R_out the host knows without looking at the routing (``permuted_rows``):

- dropless, ``pad_to=1``: R_out = R; expert e owns rows [offsets[e-1], offsets[e]).
- dropless, ``pad_to=p>1``: each expert's segment is its count rounded up to a multiple of p (real rows first,
  then zero rows). R_out = R + min(E, R)·(p-1) is an upper bound; the rows in [offsets[E-1], R_out) belong to no
  expert and are zeros (a grouped GEMM treats them as its zero tail).
- ``capacity=C``: expert e owns rows [e·C, (e+1)·C), R_out = E·C; unused rows are zeros. Experts over capacity
  drop slots (row_map -1), chosen by ``drop_policy``.

Layout of this file: tuning constants, Triton kernels, index computation, launchers, autograd, public
functions, references.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import _env
from ._launch import CachedLauncher
from ._triton_utils import cdiv, next_power_of_2, to_output_dtype
from .._checks import FLOAT_DTYPES, check_out, check_row_major, check_same_device, check_shape, check_tensor
from .._compile import compiling, eager_function, or_empty

# ---------------------------------------------------------------------------------------------------------
# Tuning constants
# ---------------------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int32, torch.int64)
_DROP_POLICIES = ("probs", "position")

# Block of H the CPU interpreter uses: small, so tiny test widths still span several blocks and a ragged tail.
_INTERPRETER_BLOCK_H = 16

# On GPU one program moves one row, 4 KiB per loop step (2048 bf16 / 1024 fp32 elements) at 4 warps. Swept on
# the H100 (bf16, T=4096-16384, K=8, H=2048-7168; BLOCK_H 512-8192 x 4-16 warps): permute sits at 2.95-3.7 TB/s
# (read + write; the tokens are read K times, so L2 helps past the 3.0 TB/s copy ceiling) for any block from
# 1024 up at 4 warps, unpermute at 2.4-2.9 TB/s; the backward of unpermute (which also reads y for dprobs)
# peaks at 2048 (2.1-2.2 TB/s) and falls to 0.85-1.4 TB/s at 8192, and 16 warps lose everywhere.
_BLOCK_BYTES = 4096


# The index kernels hold a [SUB, BLOCK_E] one-hot tile of slots x experts, about 4096 int32 (16 registers a
# thread at 4 warps). Chunks of 256 slots give 128 programs at T=4096, K=8. Not swept; on the H100 a dropless
# routing call took 73-137 us (T·K = 8K-131K slots, E = 8-256, mostly launch time) against ~0.8 ms for the
# same bookkeeping in ~30 torch ops. Past 1024 experts the tile would be a few slots tall, so routing falls
# back to the torch sort path there.
_MAX_TRITON_EXPERTS = 1024
_INDEX_CHUNK = 256
_INDEX_TILE = 4096
# The chunk prefix scan: one program per 32 experts, 128 chunks ([128, 32] int32 tile) per step.
_PREFIX_BLOCK_E = 32


def _index_config(num_experts: int, num_slots: int, on_cpu: bool) -> dict:
    block_e = max(16, next_power_of_2(num_experts))
    if on_cpu:  # tiny chunks, so test shapes span several chunks and sub-blocks
        return dict(CHUNK=16, SUB=8, BLOCK_E=block_e, PREFIX_BLOCK_C=2, num_warps=1, prefix_warps=1)
    # Up to one chunk of slots (decode sizes) the place kernel counts them itself: one launch. Past that, chunks
    # of 128 slots and 2 warps per program for up to 128 experts (session 16, H100, torch.profiler, us for count +
    # prefix + place at 128 experts, top-8): T=8192 11.1 + 3.9 + 26.5 -> 4.8 + 8.2 + 15.2, T=32768 28.0 + 12.7 +
    # 76.3 -> 13.5 + 29.5 + 54.6; more programs of a serial chunk loop in flight on each SM.
    chunk = _INDEX_CHUNK if num_slots <= _INDEX_CHUNK else _INDEX_CHUNK // 2
    sub = max(8, min(chunk, _INDEX_TILE // block_e))
    return dict(CHUNK=chunk, SUB=sub, BLOCK_E=block_e, PREFIX_BLOCK_C=128, num_warps=2 if block_e <= 128 else 4,
                prefix_warps=4)


def _block_config(h: int, element_size: int, on_cpu: bool) -> dict:
    """Block width over H and warps; keyed on (H, dtype) only, so a new token count reuses the kernel."""
    if on_cpu:
        return dict(BLOCK_H=_INTERPRETER_BLOCK_H, num_warps=1)
    return dict(BLOCK_H=max(16, min(next_power_of_2(h), _BLOCK_BYTES // element_size)), num_warps=4)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _splat(value, BLOCK: tl.constexpr):
    """A scalar as a [BLOCK] vector. Masks are built from vectors only: Triton 3.9's interpreter turns
    ``vector_bool & scalar_bool`` into an int32 array that tl.load then refuses as a mask."""
    return tl.zeros((BLOCK,), dtype=value.dtype) + value


@triton.jit
def _permute_kernel(
    x_ptr,  # [T, H]
    src_slot_ptr,  # [R_out] int64: flat slot t*K+k that fills each destination row, or -1 (a zero row)
    probs_ptr,  # [R] flat probs (read only if HAS_PROBS)
    out_ptr,  # out [R_out, H]
    probs_out_ptr,  # out [R_out] (written only if HAS_PROBS)
    H, K,
    stride_xt, stride_or,
    HAS_PROBS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per destination row: copy the source token's row (or zeros), and its prob (or 0)."""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(src_slot_ptr + row)
    keep = slot >= 0
    token = tl.where(keep, slot // K, 0)
    cols = tl.arange(0, BLOCK_H)
    keep_h = _splat(slot, BLOCK_H) >= 0
    for h0 in range(0, H, BLOCK_H):
        h = h0 + cols
        in_row = h < H
        v = tl.load(x_ptr + token * stride_xt + h, mask=in_row & keep_h, other=0.0)
        tl.store(out_ptr + row * stride_or + h, v, mask=in_row)
    if HAS_PROBS:
        p = tl.load(probs_ptr + tl.where(keep, slot, 0), mask=keep, other=0.0)
        tl.store(probs_out_ptr + row, p)


@triton.jit
def _permute_scatter_kernel(
    x_ptr,  # [T, H]
    row_map_ptr,  # [R] int32/int64: destination row of each slot, -1 if dropped
    src_slot_ptr,  # [R_out] int64: slot of each row, -1 for rows no slot fills (zeroed here)
    probs_ptr,  # [R] flat probs (read only if HAS_PROBS)
    out_ptr,  # out [R_out, H]
    probs_out_ptr,  # out [R_out] (written only if HAS_PROBS)
    T, R_out, H, K,
    stride_xt, stride_or,
    HAS_PROBS: tl.constexpr,
    ZERO_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Programs [0, T): token t reads its row of x once and writes it to each of its K destination rows (with its
    prob). Programs past T: ZERO_ROWS rows each, writing zeros (and prob 0) to the rows no slot fills. Every row
    is written exactly once. Against a program per destination row (``_permute_kernel``) x is read once instead
    of K times."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    if pid < T:
        t = pid.to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + cols
            in_row = h < H
            v = tl.load(x_ptr + t * stride_xt + h, mask=in_row, other=0.0)
            for k in range(0, K):
                row = tl.load(row_map_ptr + t * K + k).to(tl.int64)
                row_h = _splat(row, BLOCK_H)
                keep_h = (row_h >= 0) & (row_h < R_out)
                tl.store(out_ptr + tl.where(keep_h, row_h, 0) * stride_or + h, v, mask=in_row & keep_h)
        if HAS_PROBS:
            for k in range(0, K):
                row = tl.load(row_map_ptr + t * K + k).to(tl.int64)
                keep = (row >= 0) & (row < R_out)
                p = tl.load(probs_ptr + t * K + k)
                tl.store(probs_out_ptr + tl.where(keep, row, 0), p, mask=keep)
    else:
        zeros = tl.zeros((BLOCK_H,), dtype=out_ptr.dtype.element_ty)
        for i in range(0, ZERO_ROWS):
            row = (pid - T).to(tl.int64) * ZERO_ROWS + i
            slot = tl.load(src_slot_ptr + row, mask=row < R_out, other=0)
            empty_h = (_splat(slot, BLOCK_H) < 0) & (_splat(row, BLOCK_H) < R_out)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + cols
                tl.store(out_ptr + tl.where(empty_h, row, 0) * stride_or + h, zeros, mask=(h < H) & empty_h)
            if HAS_PROBS:
                tl.store(probs_out_ptr + row, tl.zeros((), dtype=probs_out_ptr.dtype.element_ty),
                         mask=(slot < 0) & (row < R_out))


@triton.jit
def _unpermute_kernel(
    y_ptr,  # [R_out, H]
    row_map_ptr,  # [R] int32/int64: row of each slot, -1 if dropped
    probs_ptr,  # [R] flat probs (read only if HAS_PROBS)
    out_ptr,  # out [T, H]
    values_ptr,  # [R_out] per-row values (read only if GATHER_VALUES)
    values_out_ptr,  # out [R] (written only if GATHER_VALUES)
    R_out, H, K,
    stride_yr, stride_ot,
    HAS_PROBS: tl.constexpr,
    GATHER_VALUES: tl.constexpr,
    ROUND_BF16_BITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per token: out[t] = sum over k, in k order, of probs[t, k] * y[row_map[t, k]], in fp32.
    With GATHER_VALUES also values_out[t, k] = values[row_map[t, k]] (0 if dropped): the permute backward's
    probs gradient, which would otherwise take a gather and two wheres of its own.
    Rows outside [0, R_out) count as dropped, so a corrupt row_map can never read out of bounds."""
    t = tl.program_id(0).to(tl.int64)
    if GATHER_VALUES:
        for k in range(0, K):
            row = tl.load(row_map_ptr + t * K + k).to(tl.int64)
            keep = (row >= 0) & (row < R_out)
            v = tl.load(values_ptr + tl.where(keep, row, 0), mask=keep, other=0.0)
            tl.store(values_out_ptr + t * K + k, tl.where(keep, v, 0.0))
    cols = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + cols
        in_row = h < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in range(0, K):
            row = tl.load(row_map_ptr + t * K + k).to(tl.int64)
            keep = (row >= 0) & (row < R_out)
            row_h = _splat(row, BLOCK_H)
            keep_h = (row_h >= 0) & (row_h < R_out)
            v = tl.load(y_ptr + tl.where(keep, row, 0) * stride_yr + h, mask=in_row & keep_h, other=0.0)
            v = v.to(tl.float32)
            if HAS_PROBS:
                p = tl.load(probs_ptr + t * K + k).to(tl.float32)
                # where, not a product: a dropped slot adds exactly 0 even if its prob is inf or NaN
                v = tl.where(keep_h, v * p, 0.0)
            acc += v
        tl.store(out_ptr + t * stride_ot + h, to_output_dtype(acc, out_ptr, ROUND_BF16_BITS), mask=in_row)


@triton.jit
def _unpermute_bwd_kernel(
    dy_ptr,  # [T, H] gradient of unpermute's output
    y_ptr,  # [R_out, H] unpermute's input (read only if NEED_DPROBS)
    src_slot_ptr,  # [R_out] int64: slot of each row, or -1
    probs_ptr,  # [R] flat probs
    dy_perm_ptr,  # out [R_out, H]
    dprobs_ptr,  # out [R] fp32, zero-filled by the caller; written at kept slots only if NEED_DPROBS
    H, K,
    stride_dyt, stride_yr, stride_dpr,
    NEED_DPROBS: tl.constexpr,
    ROUND_BF16_BITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Weighted unpermute's backward, one program per row of y_permuted: dy_perm[row] = probs[slot] * dy[token] (0
    for rows no slot fills), and dprobs[slot] = <dy[token], y[row]>. A kept slot has exactly one row, so each dot
    product is one program's. (Without probs the backward is a copy: permute's token scatter.)"""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(src_slot_ptr + row)
    keep = slot >= 0
    safe_slot = tl.where(keep, slot, 0)
    token = safe_slot // K
    p = tl.load(probs_ptr + safe_slot, mask=keep, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_H)
    keep_h = _splat(slot, BLOCK_H) >= 0
    dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + cols
        in_row = h < H
        d = tl.load(dy_ptr + token * stride_dyt + h, mask=in_row & keep_h, other=0.0).to(tl.float32)
        g = tl.where(keep_h, d * p, 0.0)
        tl.store(dy_perm_ptr + row * stride_dpr + h, to_output_dtype(g, dy_perm_ptr, ROUND_BF16_BITS), mask=in_row)
        if NEED_DPROBS:
            v = tl.load(y_ptr + row * stride_yr + h, mask=in_row & keep_h, other=0.0).to(tl.float32)
            dot += d * v
    if NEED_DPROBS:
        tl.store(dprobs_ptr + safe_slot, tl.sum(dot, axis=0), mask=keep)


@triton.jit
def _expert_hits(ids_ptr, slots, R, E, experts):
    """[SUB, BLOCK_E] int32 one-hot of the expert of each slot; all-zero rows for slots past R and for ids
    outside [0, E) (checked in the ids' own width, so a huge int64 id cannot alias a valid one)."""
    raw = tl.load(ids_ptr + slots, mask=slots < R, other=-1)
    valid = (raw >= 0) & (raw < E)
    ids = tl.where(valid, raw, -1).to(tl.int32)
    return ((ids[:, None] == experts[None, :]) & (experts < E)[None, :]).to(tl.int32)


@triton.jit
def _chunk_len(chunk, R, CHUNK: tl.constexpr):
    """Slots of chunk ``chunk`` that exist: the last chunk's sub-blocks past R hold none, and skipping them is
    what keeps a decode-sized batch (R = a few slots) from paying for a whole chunk of serial steps (~27 us on an
    H100 at 129 experts; benchmarks/NOTES.md, session 13)."""
    return tl.minimum(CHUNK, R - chunk * CHUNK)


@triton.jit
def _expert_count_kernel(
    ids_ptr,  # [R] int32/int64 expert of each slot
    chunk_counts_ptr,  # out [num_chunks, E] int32: slots of each expert inside each chunk of CHUNK slots
    R, E,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Pass 1 of the counting sort: per-chunk expert histogram, as one-hot column sums (no atomics)."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, _chunk_len(chunk, R, CHUNK), SUB):
        slots = chunk * CHUNK + s0 + tl.arange(0, SUB)
        counts += tl.sum(_expert_hits(ids_ptr, slots, R, E, experts), axis=0)
    tl.store(chunk_counts_ptr + chunk * E + experts, counts, mask=experts < E)


@triton.jit
def _chunk_prefix_kernel(
    counts_ptr,  # [num_chunks, E] int32
    prefix_ptr,  # out [num_chunks, E] int32: inclusive prefix sums over chunks
    num_chunks, E,
    BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Between the two passes: each program scans BLOCK_E expert columns down all chunks, BLOCK_C chunks per
    step. torch.cumsum over dim 0 of this short, wide int32 matrix took ~47 us on the H100 (256 x 128); this
    takes a few."""
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        offs = chunks[:, None] * E + experts[None, :]
        mask = (chunks < num_chunks)[:, None] & (experts < E)[None, :]
        tile = tl.load(counts_ptr + offs, mask=mask, other=0)
        tl.store(prefix_ptr + offs, tl.cumsum(tile, axis=0) + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)


@triton.jit
def _place_kernel(
    ids_ptr,  # [R] int32/int64
    prefix_ptr,  # [num_chunks, E] int32: inclusive prefix sums of chunk_counts over chunks
    row_map_ptr,  # out [R] int32: destination row of each slot, -1 if dropped
    src_slot_ptr,  # [R_out] int64, pre-filled with -1: the slot of each row that receives one
    tokens_ptr, padded_ptr,  # out [E] int64: kept slots, segment size
    offsets_ptr,  # out [E] int32: cumulative segment ends
    dropped_ptr,  # out [] int64
    R, E, num_chunks, pad_to, capacity,
    HAS_CAPACITY: tl.constexpr,
    COUNT_HERE: tl.constexpr,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Pass 2: a slot's rank inside its expert is (slots of that expert in earlier chunks) + (earlier slots of
    it in this chunk, a cumsum down the one-hot tile); its row is the expert's segment start plus the rank.
    Every program recomputes the [E] segment starts from the totals: cheaper than another launch.
    COUNT_HERE (at most one chunk: decode-sized batches): the one program counts its chunk itself first, so the
    count and prefix kernels are not launched and ``prefix_ptr`` is not read."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    if COUNT_HERE:
        totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for s0 in range(0, _chunk_len(chunk, R, CHUNK), SUB):
            totals += tl.sum(_expert_hits(ids_ptr, s0 + tl.arange(0, SUB), R, E, experts), axis=0)
    else:
        totals = tl.load(prefix_ptr + (num_chunks - 1) * E + experts, mask=e_ok, other=0)
    if HAS_CAPACITY:
        kept = tl.minimum(totals, capacity)
        seg = tl.where(e_ok, capacity, 0)
    else:
        kept = totals
        seg = (totals + pad_to - 1) // pad_to * pad_to
    seg_end = tl.cumsum(seg, axis=0)
    seg_start = seg_end - seg
    if COUNT_HERE:
        running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    else:
        running = tl.load(prefix_ptr + tl.maximum(chunk - 1, 0) * E + experts, mask=e_ok, other=0)
        running = tl.where(chunk > 0, running, 0)  # slots of each expert in earlier chunks
    for s0 in range(0, _chunk_len(chunk, R, CHUNK), SUB):
        slots = chunk * CHUNK + s0 + tl.arange(0, SUB)
        hits = _expert_hits(ids_ptr, slots, R, E, experts)
        rank = tl.sum(hits * (tl.cumsum(hits, axis=0) - 1 + running[None, :]), axis=1)
        start = tl.sum(hits * seg_start[None, :], axis=1)
        keep = tl.sum(hits, axis=1) > 0
        if HAS_CAPACITY:
            keep = keep & (rank < capacity)
        dest = tl.where(keep, start + rank, -1)
        tl.store(row_map_ptr + slots, dest, mask=slots < R)
        tl.store(src_slot_ptr + tl.where(keep, dest, 0), slots.to(tl.int64), mask=keep)
        running += tl.sum(hits, axis=0)
    if chunk == 0:
        tl.store(tokens_ptr + experts, kept.to(tl.int64), mask=e_ok)
        tl.store(padded_ptr + experts, seg.to(tl.int64), mask=e_ok)
        tl.store(offsets_ptr + experts, seg_end, mask=e_ok)
        tl.store(dropped_ptr, R - tl.sum(kept, axis=0).to(tl.int64))


# ---------------------------------------------------------------------------------------------------------
# Index computation (on the device; nothing is read on the host)
# ---------------------------------------------------------------------------------------------------------


class _Routing(NamedTuple):
    row_map_R: torch.Tensor  # [R] int32, -1 for dropped slots
    src_slot: torch.Tensor  # [R_out] int64, inverse of row_map: slot of each row, -1 for zero rows
    tokens_per_expert: torch.Tensor  # [E] int64 kept slots
    padded_tokens_per_expert: torch.Tensor  # [E] int64
    offsets: torch.Tensor  # [E] int32 cumulative ends
    num_dropped: torch.Tensor  # 0-dim int64


def _sanitize_ids(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[R] int64 ids, with every id outside [0, E) replaced by E ('no expert')."""
    ids_R = expert_ids_TK.reshape(-1).to(torch.int64)
    return torch.where((ids_R >= 0) & (ids_R < num_experts), ids_R, num_experts)


def _group_by_expert(ids_R: torch.Tensor, num_experts: int):
    """Stable sort of slots by expert id (ids in [0, E], E meaning 'no expert', sorting last).

    Returns (ids_sorted [R], order_R [R], rank_sorted [R], counts_E [E]): order_R[i] is the slot at sorted
    position i and rank_sorted[i] its rank inside its expert. Ties keep their input order, which is what makes
    the layout deterministic."""
    ids_sorted, order_R = torch.sort(ids_R, stable=True)
    experts = torch.arange(num_experts + 1, device=ids_R.device)
    starts_E1 = torch.searchsorted(ids_sorted, experts)  # entry E: first 'no expert' slot
    counts_E = torch.searchsorted(ids_sorted, experts[:-1], right=True) - starts_E1[:-1]
    rank_sorted = torch.arange(ids_R.numel(), device=ids_R.device) - starts_E1[ids_sorted]
    return ids_sorted, order_R, rank_sorted, counts_E


def _invert(dest_R: torch.Tensor, slots_R: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[R_out] int64 slot of each destination row, -1 where no slot lands. Slots with dest outside
    [0, num_rows) are parked in a scratch entry past the end, so they can never write out of bounds."""
    valid = (dest_R >= 0) & (dest_R < num_rows)
    inv = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=dest_R.device)
    inv.scatter_(0, torch.where(valid, dest_R.long(), num_rows), slots_R)
    return inv[:num_rows]


def _drop_by_probs(ids_R: torch.Tensor, probs_R: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """ids_R with the slots that lose the probs competition set to E: inside each expert, slots ranked by prob
    (descending), ties to the lower slot index, i.e. the lower token. Two stable sorts: by prob, then by
    expert."""
    by_prob = torch.sort(probs_R, descending=True, stable=True).indices
    _, inner, rank_sorted, _ = _group_by_expert(ids_R[by_prob], num_experts)
    order_R = by_prob[inner]
    kept_sorted = rank_sorted < capacity
    kept_R = torch.empty_like(kept_sorted).scatter_(0, order_R, kept_sorted)
    return torch.where(kept_R, ids_R, num_experts)


def _route_torch(ids_R, num_experts, pad_to, capacity, num_rows) -> _Routing:
    """Index bookkeeping with torch ops (sort + binary search). ids_R: [R] int64 in [0, E]. With a capacity,
    the first C slots of each expert in slot order are kept."""
    E, R = num_experts, ids_R.numel()
    device = ids_R.device
    ids_sorted, order_R, rank_sorted, counts_E = _group_by_expert(ids_R, E)
    if capacity is None:
        kept_E = counts_E
        padded_E = (counts_E + (pad_to - 1)) // pad_to * pad_to
        ends_E = torch.cumsum(padded_E, 0)
        seg_start_E1 = torch.cat([ends_E - padded_E, ends_E.new_zeros(1)])  # entry E unused (dropped slots)
        kept_sorted = ids_sorted < E
    else:
        kept_E = counts_E.clamp(max=capacity)
        padded_E = torch.full((E,), capacity, dtype=torch.int64, device=device)
        ends_E = torch.cumsum(padded_E, 0)
        seg_start_E1 = torch.arange(E + 1, device=device) * capacity
        kept_sorted = (ids_sorted < E) & (rank_sorted < capacity)
    dest_sorted = torch.where(kept_sorted, seg_start_E1[ids_sorted] + rank_sorted, -1)
    row_map_R = torch.empty_like(dest_sorted).scatter_(0, order_R, dest_sorted)
    return _Routing(
        row_map_R=row_map_R.to(torch.int32),
        src_slot=_invert(dest_sorted, order_R, num_rows),
        tokens_per_expert=kept_E,
        padded_tokens_per_expert=padded_E,
        offsets=ends_E.to(torch.int32),
        num_dropped=R - kept_E.sum(),
    )


def _route_triton(ids_R, num_experts, pad_to, capacity, num_rows) -> _Routing:
    """Index bookkeeping in three Triton kernels (a counting sort, with a prefix scan between its two passes), or
    in one when the slots fit one chunk, instead of some 30 small torch ops, which cost ~0.8 ms of CPU time per
    call on the H100 host (GPU time ~0.13 ms). ids_R: [R] int32/int64, raw (the kernels treat ids outside [0, E)
    as dropped)."""
    E, R = num_experts, ids_R.numel()
    device = ids_R.device
    cfg = _index_config(E, R, on_cpu=not ids_R.is_cuda)
    num_chunks = cdiv(R, cfg["CHUNK"])
    row_map_R = torch.empty(R, dtype=torch.int32, device=device)
    src_slot = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    tokens_E = torch.empty(E, dtype=torch.int64, device=device)
    padded_E = torch.empty(E, dtype=torch.int64, device=device)
    offsets_E = torch.empty(E, dtype=torch.int32, device=device)
    dropped = torch.empty((), dtype=torch.int64, device=device)
    count_here = num_chunks <= 1  # decode sizes: one launch instead of three (no slots: it writes the outputs)
    if count_here:
        prefix = offsets_E  # not read
    else:
        chunk_counts = torch.empty(num_chunks, E, dtype=torch.int32, device=device)
        _launch_count((num_chunks,), (ids_R, chunk_counts, R, E),
                      dict(CHUNK=cfg["CHUNK"], SUB=cfg["SUB"], BLOCK_E=cfg["BLOCK_E"]), num_warps=cfg["num_warps"])
        prefix = torch.empty_like(chunk_counts)
        block_e = min(cfg["BLOCK_E"], _PREFIX_BLOCK_E)
        _launch_prefix((cdiv(E, block_e),), (chunk_counts, prefix, num_chunks, E),
                       dict(BLOCK_C=cfg["PREFIX_BLOCK_C"], BLOCK_E=block_e), num_warps=cfg["prefix_warps"])
    _launch_place(
        (max(num_chunks, 1),),
        (ids_R, prefix, row_map_R, src_slot, tokens_E, padded_E, offsets_E, dropped,
         R, E, max(num_chunks, 1), pad_to, 0 if capacity is None else capacity),
        dict(HAS_CAPACITY=capacity is not None, COUNT_HERE=count_here, CHUNK=cfg["CHUNK"], SUB=cfg["SUB"],
             BLOCK_E=cfg["BLOCK_E"]),
        num_warps=cfg["num_warps"],
    )
    return _Routing(row_map_R, src_slot, tokens_E, padded_E, offsets_E, dropped)


def _route(expert_ids_TK, num_experts, probs_TK, pad_to, capacity, drop_policy, num_rows) -> _Routing:
    """All index bookkeeping of ``permute``. Ids outside [0, E) are treated as dropped (and counted)."""
    E = num_experts
    triton_index = _env.use_triton(expert_ids_TK) and E <= _MAX_TRITON_EXPERTS
    if capacity is not None and drop_policy == "probs":
        # the probs competition needs a ranking inside each expert: sorts, on either backend; afterwards no
        # expert holds more than C slots, so the layout step below drops nothing more
        ids_R = _drop_by_probs(_sanitize_ids(expert_ids_TK, E), probs_TK.reshape(-1), E, capacity)
    elif triton_index:
        ids_R = expert_ids_TK.reshape(-1)
    else:
        ids_R = _sanitize_ids(expert_ids_TK, E)
    if triton_index:
        return _route_triton(ids_R, E, pad_to, capacity, num_rows)
    return _route_torch(ids_R, E, pad_to, capacity, num_rows)


# ---------------------------------------------------------------------------------------------------------
# Launchers (inputs already validated; flat index tensors contiguous)
# ---------------------------------------------------------------------------------------------------------

# Cached launches (ops/_launch.py): Triton's kernel[grid](...) costs tens of microseconds of host time per call.
_launch_count = CachedLauncher(_expert_count_kernel)
_launch_prefix = CachedLauncher(_chunk_prefix_kernel)
_launch_place = CachedLauncher(_place_kernel)
_launch_permute = CachedLauncher(_permute_kernel)
_launch_permute_scatter = CachedLauncher(_permute_scatter_kernel)
_launch_unpermute = CachedLauncher(_unpermute_kernel)
_launch_unpermute_bwd = CachedLauncher(_unpermute_bwd_kernel)




# Benchmarks switch the token-scatter permute off here, to time it against a program per destination row.
PERMUTE_SCATTER = True
_ZERO_ROWS = 16  # rows per zeroing program of _permute_scatter_kernel
# Warps of _permute_scatter_kernel on the GPU: 2 beat 4 and 8 (session 18, H100, us per call with 4 KB blocks: Qwen3
# T=8192 116 / 123 / 137, T=32768 470 / 497 / 547, Mixtral T=8192 75.5 / 76.1 / 80.1; scratch_dev/permute_sweep.py):
# more small programs in flight per SM for a pass that only moves rows.
_SCATTER_WARPS = 2


def _run_permute(x, src_slot, K, probs_R, out, probs_out, row_map_R):
    """out[row] = x[src_slot[row] // K] (zeros where src_slot = -1); probs_out[row] = probs_R[src_slot[row]].
    ``row_map_R`` (the inverse of src_slot) lets the Triton path read each token's row once."""
    R_out, H = out.shape
    if R_out == 0:
        return
    if _env.use_triton(x):
        cfg = _block_config(H, x.element_size(), on_cpu=not x.is_cuda)
        has_probs = probs_out is not None
        T = x.shape[0]
        if PERMUTE_SCATTER:  # with T = 0 only the zeroing programs run
            zero_rows = 2 if not x.is_cuda else _ZERO_ROWS  # several zeroing programs in the tests' small buffers
            _launch_permute_scatter(
                (T + cdiv(R_out, zero_rows),),
                (x, row_map_R, src_slot, probs_R if has_probs else src_slot, out,
                 probs_out if has_probs else src_slot, T, R_out, H, K, x.stride(0), out.stride(0)),
                dict(HAS_PROBS=has_probs, ZERO_ROWS=zero_rows, BLOCK_H=cfg["BLOCK_H"]),
                num_warps=min(cfg["num_warps"], _SCATTER_WARPS),
            )
            return
        _launch_permute(
            (R_out,),
            (x, src_slot, probs_R if has_probs else src_slot, out, probs_out if has_probs else src_slot,
             H, K, x.stride(0), out.stride(0)),
            dict(HAS_PROBS=has_probs, BLOCK_H=cfg["BLOCK_H"]), num_warps=cfg["num_warps"],
        )
        return
    keep = src_slot >= 0
    if x.shape[0] == 0:  # capacity layout of an empty batch: all rows are zeros
        out.zero_()
    else:
        token = torch.where(keep, src_slot // K, 0)
        out.copy_(torch.where(keep[:, None], x.index_select(0, token), 0))
    if probs_out is not None:
        if probs_R.numel() == 0:
            probs_out.zero_()
        else:
            probs_out.copy_(torch.where(keep, probs_R[torch.where(keep, src_slot, 0)], 0))


def _run_unpermute(y, row_map_R, probs_R, K, out, values=None, values_out=None):
    """out[t] = sum_k probs[t, k] * y[row_map[t, k]] over kept slots, k in order, fp32 accumulation. With
    ``values`` [R_out] also ``values_out`` [R] = values[row_map] (0 for dropped slots)."""
    T, H = out.shape
    gather_values = values is not None
    if T == 0 or (H == 0 and not gather_values):
        return
    R_out = y.shape[0]
    if _env.use_triton(y) and H > 0:
        cfg = _block_config(H, y.element_size(), on_cpu=not y.is_cuda)
        has_probs = probs_R is not None
        _launch_unpermute(
            (T,),
            (y, row_map_R, probs_R if has_probs else row_map_R, out, values if gather_values else row_map_R,
             values_out if gather_values else row_map_R, R_out, H, K, y.stride(0), out.stride(0)),
            dict(HAS_PROBS=has_probs, GATHER_VALUES=gather_values, ROUND_BF16_BITS=not y.is_cuda,
                 BLOCK_H=cfg["BLOCK_H"]),
            num_warps=cfg["num_warps"],
        )
        return
    if gather_values:
        values_out.copy_(_gather_slots(values, row_map_R))
    row_map_TK = row_map_R.view(T, K).to(torch.int64)
    keep_TK = (row_map_TK >= 0) & (row_map_TK < R_out)
    rows_TK = torch.where(keep_TK, row_map_TK, 0)
    acc = torch.zeros(T, H, dtype=torch.float32, device=out.device)
    for k in range(K):
        if R_out == 0:
            break
        v = y.index_select(0, rows_TK[:, k]).float()
        if probs_R is not None:
            v = v * probs_R.view(T, K)[:, k, None].float()
        acc += torch.where(keep_TK[:, k, None], v, 0.0)
    out.copy_(acc)


def _run_unpermute_bwd(dy, y, src_slot, probs_R, K, dy_perm, dprobs_R):
    """dy_perm[row] = probs[slot] * dy[slot // K] (zeros where src_slot = -1); if dprobs_R (fp32, zero-filled)
    is given, dprobs_R[slot] = <dy[slot // K], y[row]> for each kept slot. Without probs, use ``_run_permute``."""
    R_out, H = dy_perm.shape
    if R_out == 0:
        return
    need_dprobs = dprobs_R is not None
    if _env.use_triton(dy):
        cfg = _block_config(H, dy.element_size(), on_cpu=not dy.is_cuda)
        _launch_unpermute_bwd(
            (R_out,),
            (dy, y if need_dprobs else dy, src_slot, probs_R, dy_perm, dprobs_R if need_dprobs else src_slot, H, K,
             dy.stride(0), y.stride(0) if need_dprobs else 0, dy_perm.stride(0)),
            dict(NEED_DPROBS=need_dprobs, ROUND_BF16_BITS=not dy.is_cuda,
                 BLOCK_H=cfg["BLOCK_H"]),
            num_warps=cfg["num_warps"],
        )
        return
    if dy.shape[0] == 0:
        dy_perm.zero_()
        return
    keep = src_slot >= 0
    slot = torch.where(keep, src_slot, 0)
    d = dy.index_select(0, slot // K).float()
    g = d * probs_R[slot].float()[:, None]
    dy_perm.copy_(torch.where(keep[:, None], g, 0.0))
    if need_dprobs:
        dots = torch.where(keep, (d * y.float()).sum(1), 0.0)
        scratch = torch.zeros(dprobs_R.numel() + 1, dtype=torch.float32, device=dy.device)
        scratch.scatter_(0, torch.where(keep, slot, dprobs_R.numel()), dots)
        dprobs_R.copy_(scratch[:-1])


def _gather_slots(values_rows: torch.Tensor, row_map_R: torch.Tensor) -> torch.Tensor:
    """[R] values_rows[row_map[r]], 0 where the slot was dropped (row_map = -1)."""
    keep = row_map_R >= 0
    if values_rows.numel() == 0:
        return torch.zeros(row_map_R.shape, dtype=values_rows.dtype, device=values_rows.device)
    picked = values_rows[torch.where(keep, row_map_R, 0).long()]
    return torch.where(keep, picked, 0)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


def _permute_forward(x, probs, row_map_R, K, src_slot, num_rows, out):
    """(x_permuted, probs_permuted or None), into ``out`` when given."""
    x_perm = out if out is not None else torch.empty(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    probs_R = None if probs is None else probs.reshape(-1).contiguous()
    probs_perm = None if probs is None else torch.empty(num_rows, dtype=probs.dtype, device=x.device)
    _run_permute(x, src_slot, K, probs_R, x_perm, probs_perm, row_map_R)
    return x_perm, probs_perm


@eager_function
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, row_map_TK, src_slot, num_rows):
        x_perm, probs_perm = _permute_forward(x, probs, row_map_TK.reshape(-1), row_map_TK.shape[1], src_slot,
                                              num_rows, None)
        ctx.save_for_backward(row_map_TK)
        ctx.x_shape = x.shape
        return x_perm, probs_perm

    @staticmethod
    @once_differentiable
    def backward(ctx, dx_perm, dprobs_perm):
        (row_map_TK,) = ctx.saved_tensors
        need_dprobs = ctx.needs_input_grad[1] and dprobs_perm is not None
        return (*_permute_backward(dx_perm, dprobs_perm, row_map_TK, ctx.x_shape, ctx.needs_input_grad[0],
                                   need_dprobs), None, None, None)


def _unpermute_forward(y_perm, probs, row_map_TK, out=None):
    """(out [T, H], row_map_R [T·K], probs_R [T·K] or None) of ``unpermute``, into ``out`` when given."""
    T, K = row_map_TK.shape
    row_map_R = row_map_TK.reshape(T * K).contiguous()
    probs_R = None if probs is None else probs.reshape(T * K).contiguous()
    if out is None:
        out = torch.empty(T, y_perm.shape[1], dtype=y_perm.dtype, device=y_perm.device)
    _run_unpermute(y_perm, row_map_R, probs_R, K, out)
    return out, row_map_R, probs_R


def _permute_backward(dx_perm, dprobs_perm, row_map_TK, x_shape, need_dx: bool, need_dprobs: bool):
    """(dx [T, H], dprobs [T, K]) of ``permute``, None where not needed."""
    T, K = row_map_TK.shape
    row_map_R = row_map_TK.reshape(T * K)
    dx = dprobs = None
    if need_dprobs:
        dprobs = torch.empty(T * K, dtype=dprobs_perm.dtype, device=dprobs_perm.device)
    if need_dx:
        # the adjoint of a copy into k rows is the unweighted sum of those k rows; the same pass over the row map
        # gathers the probs gradient
        dx = torch.empty(x_shape, dtype=dx_perm.dtype, device=dx_perm.device)
        _run_unpermute(dx_perm.contiguous(), row_map_R, None, K, dx,
                       dprobs_perm.contiguous() if need_dprobs else None, dprobs)
    elif need_dprobs:
        dprobs.copy_(_gather_slots(dprobs_perm, row_map_R))
    return dx, None if dprobs is None else dprobs.view(T, K)


@eager_function
class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, probs, row_map_TK, src_slot=None):
        K = row_map_TK.shape[1]
        out, row_map_R, probs_R = _unpermute_forward(y_perm, probs, row_map_TK)
        need_y = probs is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(y_perm if need_y else None, probs_R, row_map_R, src_slot)
        ctx.K, ctx.y_shape, ctx.probs_dtype = K, y_perm.shape, None if probs is None else probs.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y_perm, probs_R, row_map_R, src_slot = ctx.saved_tensors
        need_dprobs = ctx.probs_dtype is not None and ctx.needs_input_grad[1]
        dy_perm, dprobs = _unpermute_backward(dy, y_perm, probs_R, row_map_R, src_slot, ctx.K, ctx.y_shape,
                                              ctx.needs_input_grad[0], need_dprobs, ctx.probs_dtype)
        return dy_perm, dprobs, None, None


def _unpermute_backward(dy, y_perm, probs_R, row_map_R, src_slot, K, y_shape, need_dy_perm: bool, need_dprobs: bool,
                        probs_dtype):
    """(dy_perm [R_out, H], dprobs [T, K]) of ``unpermute``, None where not needed. ``y_perm`` is needed only
    for dprobs."""
    if not (need_dy_perm or need_dprobs):
        return None, None
    dy = dy.contiguous()
    if src_slot is None:
        # valid row_maps (from permute) are injective, so inverting them is a plain scatter
        src_slot = _invert(row_map_R.long(), torch.arange(row_map_R.numel(), device=dy.device), y_shape[0])
    dy_perm = torch.empty(y_shape, dtype=dy.dtype, device=dy.device)
    if probs_R is None:
        # the adjoint of an unweighted sum is a copy of each token's gradient to its rows: permute's token
        # scatter, which reads dy once per token where a program per row reads it K times
        _run_permute(dy, src_slot, K, None, dy_perm, None, row_map_R)
        return dy_perm, None
    dprobs_R = torch.zeros(row_map_R.numel(), dtype=torch.float32, device=dy.device) if need_dprobs else None
    _run_unpermute_bwd(dy, y_perm, src_slot, probs_R, K, dy_perm, dprobs_R)
    dprobs = dprobs_R.view(-1, K).to(probs_dtype) if need_dprobs else None
    return (dy_perm if need_dy_perm else None), dprobs


# ---------------------------------------------------------------------------------------------------------
# Custom ops: the same steps under torch.compile, kept in the graph with a registered autograd formula (no graph
# break; see moetron/_compile.py). An empty output stands for None (``or_empty``).
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("moetron::route", mutates_args=(),
                         schema="(Tensor expert_ids, int num_experts, Tensor? probs, int pad_to, int? capacity, "
                                "str drop_policy, SymInt num_rows, bool check_ids) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _route_op(expert_ids, num_experts, probs, pad_to, capacity, drop_policy, num_rows, check_ids):
    if check_ids:
        _check_expert_ids(expert_ids, num_experts)
    return tuple(_route(expert_ids, num_experts, probs, pad_to, capacity, drop_policy, num_rows))


@_route_op.register_fake
def _(expert_ids, num_experts, probs, pad_to, capacity, drop_policy, num_rows, check_ids):
    counts = expert_ids.new_empty(num_experts, dtype=torch.int64)
    return (expert_ids.new_empty(expert_ids.numel(), dtype=torch.int32), counts.new_empty(num_rows), counts,
            counts.new_empty(num_experts), counts.new_empty(num_experts, dtype=torch.int32), counts.new_empty(()))


@torch.library.custom_op("moetron::permute", mutates_args=(),
                         schema="(Tensor x, Tensor? probs, Tensor row_map, Tensor src_slot, SymInt num_rows) "
                                "-> (Tensor, Tensor)")
def _permute_op(x, probs, row_map, src_slot, num_rows):
    x_perm, probs_perm = _permute_forward(x, probs, row_map.reshape(-1), row_map.shape[1], src_slot, num_rows, None)
    return x_perm, or_empty(probs_perm, x)


@_permute_op.register_fake
def _(x, probs, row_map, src_slot, num_rows):
    return x.new_empty(num_rows, x.shape[1]), x.new_empty(0) if probs is None else probs.new_empty(num_rows)


@torch.library.custom_op("moetron::permute_backward", mutates_args=(),
                         schema="(Tensor dx_perm, Tensor dprobs_perm, Tensor row_map, SymInt[] x_shape, bool need_dx, "
                                "bool need_dprobs) -> (Tensor, Tensor)")
def _permute_backward_op(dx_perm, dprobs_perm, row_map, x_shape, need_dx, need_dprobs):
    dx, dprobs = _permute_backward(dx_perm, dprobs_perm, row_map, x_shape, need_dx, need_dprobs)
    return or_empty(dx, dx_perm), or_empty(dprobs, dx_perm)


@_permute_backward_op.register_fake
def _(dx_perm, dprobs_perm, row_map, x_shape, need_dx, need_dprobs):
    return (dx_perm.new_empty(x_shape) if need_dx else dx_perm.new_empty(0),
            dprobs_perm.new_empty(row_map.shape) if need_dprobs else dx_perm.new_empty(0))


def _permute_op_setup(ctx, inputs, output):
    x, probs, row_map, src_slot, num_rows = inputs
    ctx.save_for_backward(row_map)
    ctx.x_shape = list(x.shape)
    ctx.has_probs = probs is not None


def _permute_op_backward(ctx, dx_perm, dprobs_perm):
    (row_map,) = ctx.saved_tensors
    need_dx, need_dprobs = ctx.needs_input_grad[0], ctx.has_probs and ctx.needs_input_grad[1]
    if need_dprobs and dprobs_perm is None:
        dprobs_perm = dx_perm.new_zeros(dx_perm.shape[0], dtype=torch.float32)
    dx, dprobs = torch.ops.moetron.permute_backward(dx_perm, dprobs_perm if need_dprobs else dx_perm.new_empty(0),
                                                    row_map, ctx.x_shape, need_dx, need_dprobs)
    return dx if need_dx else None, dprobs if need_dprobs else None, None, None, None


_permute_op.register_autograd(_permute_op_backward, setup_context=_permute_op_setup)


@torch.library.custom_op("moetron::unpermute", mutates_args=(),
                         schema="(Tensor y_perm, Tensor? probs, Tensor row_map, Tensor? src_slot) -> Tensor")
def _unpermute_op(y_perm, probs, row_map, src_slot):
    _check_row_map(row_map, y_perm.shape[0])
    return _unpermute_forward(y_perm, probs, row_map)[0]


@_unpermute_op.register_fake
def _(y_perm, probs, row_map, src_slot):
    return y_perm.new_empty(row_map.shape[0], y_perm.shape[1])


@torch.library.custom_op("moetron::unpermute_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor? y_perm, Tensor? probs, Tensor row_map, Tensor? src_slot, "
                                "SymInt num_rows, bool need_dy_perm, bool need_dprobs) -> (Tensor, Tensor)")
def _unpermute_backward_op(dy, y_perm, probs, row_map, src_slot, num_rows, need_dy_perm, need_dprobs):
    T, K = row_map.shape
    probs_R = None if probs is None else probs.reshape(T * K).contiguous()
    dy_perm, dprobs = _unpermute_backward(dy, y_perm, probs_R, row_map.reshape(T * K).contiguous(), src_slot, K,
                                          (num_rows, dy.shape[1]), need_dy_perm, need_dprobs,
                                          None if probs is None else probs.dtype)
    return or_empty(dy_perm, dy), or_empty(dprobs, dy)


@_unpermute_backward_op.register_fake
def _(dy, y_perm, probs, row_map, src_slot, num_rows, need_dy_perm, need_dprobs):
    return (dy.new_empty(num_rows, dy.shape[1]) if need_dy_perm else dy.new_empty(0),
            probs.new_empty(row_map.shape) if need_dprobs else dy.new_empty(0))


def _unpermute_op_setup(ctx, inputs, output):
    y_perm, probs, row_map, src_slot = inputs
    ctx.save_for_backward(y_perm if probs is not None else None, probs, row_map, src_slot)
    ctx.num_rows = y_perm.shape[0]


def _unpermute_op_backward(ctx, dy):
    y_perm, probs, row_map, src_slot = ctx.saved_tensors
    need_dy_perm, need_dprobs = ctx.needs_input_grad[0], probs is not None and ctx.needs_input_grad[1]
    dy_perm, dprobs = torch.ops.moetron.unpermute_backward(dy, y_perm, probs, row_map, src_slot, ctx.num_rows,
                                                           need_dy_perm, need_dprobs)
    return dy_perm if need_dy_perm else None, dprobs if need_dprobs else None, None, None


_unpermute_op.register_autograd(_unpermute_op_backward, setup_context=_unpermute_op_setup)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


class PermuteResult(NamedTuple):
    """What ``permute`` returns. All tensors live on x's device; none was read by the host."""

    x_permuted: torch.Tensor  # [R_out, H] x's dtype: expert-major rows, zeros for padding / unused / tail rows
    tokens_per_expert: torch.Tensor  # [E] int64: rows kept per expert, before padding
    padded_tokens_per_expert: torch.Tensor  # [E] int64: segment size per expert (count rounded up, or C)
    offsets: torch.Tensor  # [E] int32: cumulative segment ends (a grouped GEMM's offsets=)
    row_map: torch.Tensor  # [T, K] int32: destination row of slot (t, k), -1 if dropped
    probs_permuted: torch.Tensor | None  # [R_out] probs' dtype: prob of each row, 0 for zero rows
    num_dropped: torch.Tensor  # 0-dim int64: slots dropped (over capacity, or with an out-of-range id)
    src_slot: torch.Tensor  # [R_out] int64: flat slot t*K+k of each row, -1 for zero rows (row_map's inverse)


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def permuted_rows(num_tokens: int, topk: int, num_experts: int, *, pad_to: int = 1,
                  capacity: int | None = None) -> int:
    """R_out, the row count of ``permute``'s output, from shapes alone (no device data).

    ``E·C`` with a capacity; otherwise ``T·K + min(E, T·K)·(pad_to - 1)``: padding adds fewer than pad_to rows
    to each expert that received any slot, and at most min(E, T·K) experts do."""
    routed = num_tokens * topk
    if capacity is not None:
        return num_experts * capacity
    return routed + min(num_experts, routed) * (pad_to - 1)


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, *, probs: torch.Tensor | None = None,
            pad_to: int = 1, capacity: int | None = None, drop_policy: str = "probs",
            out: torch.Tensor | None = None) -> PermuteResult:
    """Group the routed copies of each token's row by expert.

    Args:
        x: ``[T, H]`` fp16, bf16 or fp32, contiguous in its last dim.
        expert_ids: ``[T, K]`` int32/int64, values in [0, E), on x's device. A token may repeat an expert.
        num_experts: E >= 1.
        probs: optional ``[T, K]`` routing weights (fp32; fp16/bf16 accepted), on x's device. Needed for
            ``drop_policy="probs"`` with a capacity; permuted alongside x when given (differentiable).
        pad_to: round each expert's row count up to a multiple of this (e.g. 16 or 128 for fp8 GEMMs); the
            extra rows are zeros. With a capacity, the capacity must be a multiple of it.
        capacity: keep at most C slots per expert, in a static ``[E·C, H]`` layout (expert e owns rows
            [e·C, (e+1)·C)); None (default) is dropless.
        drop_policy: which slots an expert over capacity keeps: ``"probs"``, the C with the highest probs (ties
            to the lower token index, then lower k); ``"position"``, the first C in token order.
        out: optional ``[R_out, H]`` buffer in x's dtype for ``x_permuted`` (for example a communication
            buffer); not allowed while autograd records.

    Returns:
        ``PermuteResult`` (see its fields). ``R_out = permuted_rows(T, K, E, pad_to=..., capacity=...)``: T·K
        dropless; T·K + min(E, T·K)·(pad_to-1) with padding, where rows in [offsets[-1], R_out) are a zero
        tail owned by no expert; E·C with a capacity. Inside each expert's segment the kept slots come first,
        in (token, k) order, then zero rows.

    Autograd: grad of x is the unweighted sum of each token's k rows of grad(x_permuted); grad of probs
    gathers grad(probs_permuted). Double backward is not supported.

    Nothing reads routing data on the host, so the call can be captured in a CUDA graph. On CUDA the index work
    is two Triton kernels and a cumsum (about 0.1 ms of CPU time per call on the H100 host); the probs drop
    competition adds torch sorts (about 0.5 ms more), as does E > 1024. Expert ids on a GPU are
    range-checked only with ``MOETRON_DEBUG=1`` (that syncs); otherwise an id outside [0, E) drops its slot
    (row_map -1, counted in num_dropped). CPU ids are always checked.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_row_major("x", x)
    check_tensor("expert_ids", expert_ids, ndim=2, dtypes=_INDEX_DTYPES)
    check_same_device("expert_ids", expert_ids, "x", x)
    T, H = x.shape
    if expert_ids.shape[0] != T:
        raise ValueError(f"expert_ids must be [T, K] with T = x.shape[0] = {T}, got shape "
                         f"{tuple(expert_ids.shape)}")
    K = expert_ids.shape[1]
    _check_int("num_experts", num_experts, 1)
    _check_int("pad_to", pad_to, 1)
    if capacity is not None:
        _check_int("capacity", capacity, 0)
        if capacity % pad_to:
            raise ValueError(f"capacity must be a multiple of pad_to ({pad_to}) so every expert's segment stays "
                             f"aligned, got capacity={capacity}")
    if drop_policy not in _DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {_DROP_POLICIES}, got {drop_policy!r}")
    if probs is not None:
        check_tensor("probs", probs, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("probs", probs, (T, K), "[T, K], the shape of expert_ids")
        check_same_device("probs", probs, "x", x)
    elif capacity is not None and drop_policy == "probs":
        raise ValueError("drop_policy='probs' with a capacity needs probs (to rank the slots), got probs=None; "
                         "pass probs or use drop_policy='position'")
    num_rows = permuted_rows(T, K, num_experts, pad_to=pad_to, capacity=capacity)
    if num_rows >= 2**31:
        raise ValueError(f"the permuted buffer would have {num_rows} rows; row_map and offsets are int32, so "
                         "it must stay below 2**31")
    if not compiling():  # compiled, the route op checks them when it runs
        _check_expert_ids(expert_ids, num_experts)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (probs is not None and probs.requires_grad))
    if out is not None:
        check_out(out, needs_grad=needs_grad, grad_inputs="x or probs", dtype=x.dtype, shape=(num_rows, H),
                  what="[R_out, H], R_out from permuted_rows()", like_name="x", like=x)
    return _permute(x, expert_ids, num_experts, probs, pad_to, capacity, drop_policy, num_rows, out,
                    check_ids=compiling())


def _check_expert_ids(expert_ids, num_experts):
    if expert_ids.numel() and (expert_ids.device.type == "cpu" or _env.debug_checks_enabled()):
        lo, hi = int(expert_ids.min()), int(expert_ids.max())  # free on the CPU; a sync in GPU debug mode
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, num_experts) = [0, {num_experts}), got values in "
                             f"[{lo}, {hi}]")


def _check_row_map(row_map, num_rows):
    if row_map.numel() and (row_map.device.type == "cpu" or _env.debug_checks_enabled()):
        lo, hi = int(row_map.min()), int(row_map.max())  # free on the CPU; a sync in GPU debug mode
        if lo < -1 or hi >= num_rows:
            raise ValueError(f"row_map must hold rows of y_permuted in [0, {num_rows}) or -1 (dropped), got values "
                             f"in [{lo}, {hi}]")


def _permute(x, expert_ids, num_experts, probs, pad_to, capacity, drop_policy, num_rows, out,
             check_ids: bool = False) -> PermuteResult:
    """``permute`` after validation (tests call it directly to feed it out-of-range ids). ``check_ids``: the ids
    still need ``permute``'s range check (a compiled call makes it in the route op)."""
    rank_probs = None if probs is None else probs.detach()
    if compiling():
        routing = _Routing(*torch.ops.moetron.route(expert_ids, num_experts, rank_probs, pad_to, capacity,
                                                    drop_policy, num_rows, check_ids))
    else:
        routing = _route(expert_ids, num_experts, rank_probs, pad_to, capacity, drop_policy, num_rows)
    row_map_TK = routing.row_map_R.view(expert_ids.shape)
    if compiling() and out is None:
        x_perm, probs_perm = torch.ops.moetron.permute(x, probs, row_map_TK, routing.src_slot, num_rows)
        probs_perm = None if probs is None else probs_perm
    elif torch.is_grad_enabled() and (x.requires_grad or (probs is not None and probs.requires_grad)):
        x_perm, probs_perm = _Permute.eager_apply(x, probs, row_map_TK, routing.src_slot, num_rows)
    else:
        x_perm, probs_perm = _permute_forward(x, probs, routing.row_map_R, expert_ids.shape[1], routing.src_slot,
                                              num_rows, out)
    return PermuteResult(
        x_permuted=x_perm,
        tokens_per_expert=routing.tokens_per_expert,
        padded_tokens_per_expert=routing.padded_tokens_per_expert,
        offsets=routing.offsets,
        row_map=row_map_TK,
        probs_permuted=probs_perm,
        num_dropped=routing.num_dropped,
        src_slot=routing.src_slot,
    )


def unpermute(y_permuted: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None = None, *,
              num_tokens: int | None = None, out: torch.Tensor | None = None,
              src_slot: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each token's expert rows back: ``y[t] = sum_k probs[t, k] * y_permuted[row_map[t, k]]``.

    Args:
        y_permuted: ``[R_out, H]`` fp16, bf16 or fp32 (expert outputs in ``permute``'s layout), contiguous in
            its last dim. Padding rows are never read.
        row_map: ``[T, K]`` int32/int64 from ``permute``; -1 marks a dropped slot, which adds nothing.
        probs: optional ``[T, K]`` weights (fp32; fp16/bf16 accepted); None sums unweighted.
        num_tokens: T, if given it must equal ``row_map.shape[0]`` (a guard against a mismatched row_map).
        out: optional ``[T, H]`` output in y's dtype; not allowed while autograd records.
        src_slot: optional ``[R_out]`` int64 inverse of row_map, ``PermuteResult.src_slot`` of the permute that
            made row_map. The backward then reuses it instead of inverting row_map (about ten small ops).

    Returns:
        ``[T, H]`` in y's dtype: fp32 accumulation in k order, one rounding at the end; deterministic.

    Autograd: grad of y_permuted is dy[t] * probs[t, k] scattered to row row_map[t, k] (zeros at rows no slot
    uses); grad of probs is <dy[t], y_permuted[row_map[t, k]]> (0 for dropped slots). The backward assumes that
    row_map is injective, as ``permute`` makes it.

    No host sync. Rows of a GPU row_map are range-checked only with ``MOETRON_DEBUG=1``; otherwise a row outside
    [0, R_out) is treated as dropped (never read or written out of bounds). A CPU row_map is always checked.
    """
    check_tensor("y_permuted", y_permuted, ndim=2, dtypes=FLOAT_DTYPES)
    check_row_major("y_permuted", y_permuted)
    check_tensor("row_map", row_map, ndim=2, dtypes=_INDEX_DTYPES)
    check_same_device("row_map", row_map, "y_permuted", y_permuted)
    T, K = row_map.shape
    R_out, H = y_permuted.shape
    if num_tokens is not None:
        _check_int("num_tokens", num_tokens, 0)
        if num_tokens != T:
            raise ValueError(f"num_tokens must equal row_map.shape[0] = {T} (row_map is [T, K]), got {num_tokens}")
    if probs is not None:
        check_tensor("probs", probs, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("probs", probs, (T, K), "[T, K], the shape of row_map")
        check_same_device("probs", probs, "y_permuted", y_permuted)
    if not compiling():  # compiled, the unpermute op checks it when it runs
        _check_row_map(row_map, R_out)
    if src_slot is not None:
        check_tensor("src_slot", src_slot, ndim=1, dtypes=(torch.int64,))
        check_shape("src_slot", src_slot, (R_out,), "[R_out], PermuteResult.src_slot of the permute behind row_map")
        check_same_device("src_slot", src_slot, "y_permuted", y_permuted)
    needs_grad = torch.is_grad_enabled() and (y_permuted.requires_grad
                                              or (probs is not None and probs.requires_grad))
    if out is not None:
        check_out(out, needs_grad=needs_grad, grad_inputs="y_permuted or probs", dtype=y_permuted.dtype,
                  shape=(T, H), what="[T, H]", like_name="y_permuted", like=y_permuted)
        return _unpermute_forward(y_permuted, probs, row_map, out)[0]
    if compiling():
        return torch.ops.moetron.unpermute(y_permuted, probs, row_map, src_slot)
    return _Unpermute.eager_apply(y_permuted, probs, row_map, src_slot)


# ---------------------------------------------------------------------------------------------------------
# References (readable, slow, read everything on the host)
# ---------------------------------------------------------------------------------------------------------


def permute_ref(x, expert_ids, num_experts, probs=None, pad_to=1, capacity=None, drop_policy="probs"):
    """Per-expert loop: returns (x_permuted, row_map [T, K] int64, tokens_per_expert list). Syncs."""
    T, K = expert_ids.shape
    ids = expert_ids.tolist()
    p = probs.tolist() if probs is not None else None
    rows = permuted_rows(T, K, num_experts, pad_to=pad_to, capacity=capacity)
    x_perm = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
    row_map = torch.full((T, K), -1, dtype=torch.int64)
    counts, start = [], 0
    for e in range(num_experts):
        slots = [(t, k) for t in range(T) for k in range(K) if ids[t][k] == e]
        if capacity is not None and len(slots) > capacity:
            if drop_policy == "probs":
                slots = sorted(sorted(slots, key=lambda s: (-p[s[0]][s[1]], s))[:capacity])
            else:
                slots = slots[:capacity]
        for i, (t, k) in enumerate(slots):
            x_perm[start + i] = x[t]
            row_map[t, k] = start + i
        counts.append(len(slots))
        start += capacity if capacity is not None else -(-len(slots) // pad_to) * pad_to
    return x_perm, row_map, counts


def unpermute_ref(y_permuted, row_map, probs=None):
    """Loop over k in y's dtype: ``y[t] += probs[t, k] * y_permuted[row_map[t, k]]`` for kept slots."""
    T, K = row_map.shape
    y = torch.zeros(T, y_permuted.shape[1], dtype=y_permuted.dtype, device=y_permuted.device)
    for k in range(K):
        kept = row_map[:, k] >= 0
        rows = y_permuted[row_map[:, k].clamp(min=0).long()]
        w = probs[:, k, None].to(y.dtype) if probs is not None else 1
        y = y + torch.where(kept[:, None], rows * w, 0)
    return y
