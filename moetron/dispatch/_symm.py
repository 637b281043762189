"""The symmetric-memory transport of the fused dispatch/combine (one node, NVLink): Triton kernels store token rows
straight into the peers' receive buffers.

Legend: P EP ranks, B max tokens per rank, T tokens here, W row width (H, or J scales), M metadata ints per row,
J routing columns per token, N = P·B receive slots (no TP: that runs on NCCL around this transport).

Each exchange owns a symmetric buffer (``torch.distributed._symmetric_memory``, allocated once per size and
rendezvoused over the EP group, multicast off) laid out as

    rows [P·B + 1, W] (source-major: slot s·B + p; the last row stays zero), then meta [P·B, M] int32

and runs as

    1. clear this rank's meta region to -1 (unused slots say "no expert"), then barrier: every peer has finished
       reading what the last exchange left in its buffer (stream order: its reads were queued before its barrier);
    2. ``_push_rows_kernel``: ``num_sms`` programs stride over the tokens; token t's row (and meta row) is stored
       to each destination d with pos[t, d] >= 0, at slot (this rank, pos[t, d]) of d's buffer. The row is loaded
       once per block of W and stored to every destination that wants it;
    3. barrier (signal pads, release/acquire at system scope, after the kernel's stores completed in stream order):
       every row bound for this rank has landed. The receiver then reads its own buffer.

combine's way back is ``_combine_push_kernel``: per receive slot, sum_j scale·h[row of (slot, j)] in fp32, stored
straight into the source rank's return buffer at (this rank, position) — the reduction and the transfer in one
pass, only for slots that hold a token. Then the source sums its destinations' rows (unpermute, rank order).

The barriers are torch's ``SymmetricMemory.barrier`` (a kernel, so the whole step stays CUDA-graph capturable).
Buffers are keyed by size; every rank must make the same calls in the same order (they must anyway: these are
collectives). The first call of each size allocates and rendezvouses (a host-side collective): warm up before
capturing a CUDA graph.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from ..ops.permute import unpermute
from ..ops._triton_utils import next_power_of_2

# Row block per store loop: 16 KiB of bf16 in one program step (the probe's 294 GB/s at 16 programs used blocks of
# 8192 elements and 8 warps). Not swept yet.
_MAX_BLOCK_W = 8192
_NUM_WARPS = 8


def available(group) -> bool:
    """torch symmetric memory importable, an NCCL group of >1 ranks, all of them on this node."""
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    if group is None or not torch.cuda.is_available():
        return False
    try:
        if dist.get_backend(group) != "nccl":
            return False
    except Exception:  # a group object the backend query refuses: not ours to use
        return False
    P = dist.get_world_size(group)
    if P < 2:
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None:  # torchrun: ranks of one node are contiguous
        ranks = dist.get_process_group_ranks(group)
        return len({r // int(local) for r in ranks}) == 1
    return dist.get_world_size() <= torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _push_rows_kernel(
    x_ptr,  # [T, W] rows to send (read if HAS_X)
    meta_ptr,  # [T, P, M] int32 per-destination metadata (read if HAS_META)
    pos_ptr,  # [T, P] int64 position of t in d's region, -1 if t does not go to d
    rows_base_ptr,  # [P] int64 address of each rank's rows region
    meta_base_ptr,  # [P] int64 address of each rank's meta region
    T, W, M, B, me,
    stride_x,
    P: tl.constexpr,
    HAS_X: tl.constexpr,
    HAS_META: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_W)
    mcols = tl.arange(0, BLOCK_M)
    for i in range(0, tl.cdiv(T - pid, nprog)):  # the grid never exceeds T, so T - pid > 0
        t64 = pid + i * nprog
        if HAS_X:
            for w0 in range(0, W, BLOCK_W):
                w = w0 + cols
                in_row = w < W
                v = tl.load(x_ptr + t64 * stride_x + w, mask=in_row)
                for d in tl.static_range(P):
                    p = tl.load(pos_ptr + t64 * P + d)
                    if p >= 0:
                        dst = tl.load(rows_base_ptr + d).to(tl.pointer_type(x_ptr.dtype.element_ty))
                        tl.store(dst + (me * B + p) * W + w, v, mask=in_row)
        if HAS_META:
            for d in tl.static_range(P):
                p = tl.load(pos_ptr + t64 * P + d)
                if p >= 0:
                    m = tl.load(meta_ptr + (t64 * P + d) * M + mcols, mask=mcols < M)
                    dst = tl.load(meta_base_ptr + d).to(tl.pointer_type(tl.int32))
                    tl.store(dst + (me * B + p) * M + mcols, m, mask=mcols < M)


@triton.jit
def _combine_push_kernel(
    h_ptr,  # [R, W] expert outputs (expand_x rows)
    row_of_ptr,  # [N, J] int64 row of each (slot, column), -1 if none
    scale_ptr,  # [N, J] fp32 weights
    rows_base_ptr,  # [P] int64 address of each rank's return-rows region
    N, W, B, me,
    stride_h, stride_s,
    J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Slot n = (source s, position p): out = sum_j scale[n, j]·h[row_of[n, j]] (fp32, j order), stored to rank s
    at (me, p). Slots without a row here are skipped (the source never reads them)."""
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_W)
    for i in range(0, tl.cdiv(N - pid, nprog)):  # the grid never exceeds N
        n64 = pid + i * nprog
        any_row = tl.load(row_of_ptr + n64 * J)
        for j in tl.static_range(1, J):
            any_row = tl.maximum(any_row, tl.load(row_of_ptr + n64 * J + j))
        if any_row >= 0:
            s = n64 // B
            p = n64 - s * B
            dst = tl.load(rows_base_ptr + s).to(tl.pointer_type(h_ptr.dtype.element_ty))
            for w0 in range(0, W, BLOCK_W):
                w = w0 + cols
                in_row = w < W
                acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
                for j in tl.static_range(J):
                    r = tl.load(row_of_ptr + n64 * J + j)
                    if r >= 0:
                        c = tl.load(scale_ptr + n64 * stride_s + j)
                        acc += c * tl.load(h_ptr + r * stride_h + w, mask=in_row, other=0.0).to(tl.float32)
                tl.store(dst + (me * B + p) * W + w, acc.to(h_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------------


class _Buffer:
    """One symmetric allocation: rows [P·B + 1, W] of ``dtype`` then meta [P·B, M] int32, on every rank."""

    def __init__(self, group, P, B, W, dtype, M, device):
        import torch.distributed._symmetric_memory as symm

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off
        esz = torch.empty((), dtype=dtype).element_size()
        self.rows_bytes = -(-(P * B + 1) * W * esz // 256) * 256
        nbytes = self.rows_bytes + P * B * M * 4 + 256
        self.raw = symm.empty(nbytes, dtype=torch.uint8, device=device)
        enable = getattr(symm, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before rendezvous on older torch; deprecated (a no-op) on newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(group.group_name)
        self.hdl = symm.rendezvous(self.raw, group.group_name)
        self.rows = self.raw[:(P * B + 1) * W * esz].view(dtype).view(P * B + 1, W)
        self.rows[P * B].zero_()
        self.meta = self.raw[self.rows_bytes:self.rows_bytes + P * B * M * 4].view(torch.int32).view(P * B, M)
        ptrs = list(self.hdl.buffer_ptrs)
        self.rows_base = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.meta_base = self.rows_base + self.rows_bytes
        torch.cuda.synchronize(device)

    def barrier(self):
        self.hdl.barrier(channel=0)


_BUFFERS: dict = {}


def _buffer(group, P, B, W, dtype, M, device) -> _Buffer:
    key = (group.group_name, P, B, W, dtype, M, str(device))
    if key not in _BUFFERS:
        _BUFFERS[key] = _Buffer(group, P, B, W, dtype, M, device)
    return _BUFFERS[key]


def _block(width: int) -> int:
    return max(16, min(next_power_of_2(max(width, 1)), _MAX_BLOCK_W))


# ---------------------------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------------------------


class SymmTransport:
    """Same contract as fused._NcclTransport (exchange / reduce_back), plus combine_fused."""

    name = "symm"

    def __init__(self, num_sms: int):
        self.num_sms = num_sms

    def exchange(self, x, meta, ctx, keep: bool = True):
        """Rows x [T, W] and meta [T, P, M] to their destinations. Returns (recv_x [N + 1, W], recv_meta [N, M]).
        ``keep=False`` returns recv_x as a view of the symmetric buffer (valid until this rank's next exchange of
        the same size: the caller consumes it at once); otherwise both are copies."""
        topo = ctx.topo
        P, B = topo.P, topo.B
        ref = x if x is not None else meta
        T = ref.shape[0]
        W = x.shape[1] if x is not None else 1
        dtype = x.dtype if x is not None else torch.int32
        M = meta.shape[2] if meta is not None else 1
        buf = _buffer(topo.group, P, B, W, dtype, M, ref.device)
        if meta is not None:
            buf.meta.fill_(-1)
        buf.barrier()
        if T:
            pos = ctx.pos_TP.contiguous()
            grid = (min(self.num_sms, T),)
            _push_rows_kernel[grid](
                x if x is not None else pos, meta if meta is not None else pos, pos, buf.rows_base, buf.meta_base,
                T, W, M, B, topo.rank, x.stride(0) if x is not None else 0,
                P=P, HAS_X=x is not None, HAS_META=meta is not None, BLOCK_W=_block(W),
                BLOCK_M=max(16, next_power_of_2(M)), num_warps=_NUM_WARPS)
        buf.barrier()
        recv_x = recv_meta = None
        if meta is not None:
            recv_meta = buf.meta.clone()
        if x is not None:
            recv_x = buf.rows if not keep else buf.rows.clone()
        if topo.P_tp > 1:  # expert-TP: gather the EP-received buffers over TP with NCCL (fixed size)
            from ._comm import all_gather_flat

            if recv_x is not None:
                g = recv_x.new_empty(topo.N + 1, W)
                g[topo.N].zero_()
                all_gather_flat(g[:topo.N], recv_x[:P * B].contiguous(), topo.tp_group)
                recv_x = g
            if recv_meta is not None:
                g = recv_meta.new_empty(topo.N, M)
                all_gather_flat(g, recv_meta, topo.tp_group)
                recv_meta = g
        return recv_x, recv_meta

    def reduce_back(self, out_NW, ctx, quant=None):
        """y [T, W] = sum over destinations of the slot rows they return (after the TP reduce-scatter)."""
        topo = ctx.topo
        P, B = topo.P, topo.B
        red = out_NW.contiguous()
        if topo.P_tp > 1:
            from ._comm import _reduce_scatter_flat

            red = out_NW.new_empty(P * B, out_NW.shape[1])
            _reduce_scatter_flat(red, out_NW.contiguous(), topo.tp_group)
        if quant == "int8":
            from .fused import _NCCL

            import dataclasses

            return _NCCL.reduce_back(red, dataclasses.replace(ctx, topo=topo_without_tp(topo)), quant)
        W = red.shape[1]
        row_of = torch.arange(P * B, device=red.device)
        if ctx.slot_valid is not None:  # skip slots without a token (their rows are zeros or unused)
            row_of = torch.where(ctx.slot_valid, row_of, -1)
        row_of = row_of[:, None]
        ones = torch.ones(P * B, 1, dtype=torch.float32, device=red.device)
        return self._push_back(red, row_of, ones, ctx, W)

    def combine_fused(self, h, row_of_NJ, scales_NJ, ctx):
        """Weighted per-slot sums pushed straight to the sources (no TP, no autograd)."""
        return self._push_back(h, row_of_NJ, scales_NJ, ctx, h.shape[1])

    def _push_back(self, h, row_of, scales, ctx, W):
        topo = ctx.topo
        P, B = topo.P, topo.B
        buf = _buffer(topo.group, P, B, W, h.dtype, 1, h.device)
        buf.barrier()
        N = P * B
        if N:
            scales = scales.float().contiguous()
            _combine_push_kernel[(min(self.num_sms, N),)](
                h.contiguous(), row_of.contiguous(), scales, buf.rows_base, N, W, B, topo.rank,
                W, scales.stride(0), J=row_of.shape[1], BLOCK_W=_block(W), num_warps=_NUM_WARPS)
        buf.barrier()
        # the rows of this rank's tokens: (destination d, position) at d·B + pos; unpermute reads only those
        return unpermute(buf.rows[:N], ctx.flat_TP, None)


def topo_without_tp(topo):
    import dataclasses

    return dataclasses.replace(topo, tp_group=None, P_tp=1, tp_rank=0)
