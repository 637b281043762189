"""The symmetric-memory transport of the fused dispatch/combine (one node, NVLink): Triton kernels store token rows
straight into the peers' receive buffers.

Legend: P EP ranks, B max tokens per rank, T tokens here, W row width (H, or J scales), M metadata ints per slot,
MS = B·M + E_l + 1 ints per source block, J routing columns per token, N = P·B receive slots (no TP: that runs on
NCCL around this transport).

Each exchange kind owns a symmetric buffer (``torch.distributed._symmetric_memory``, allocated once per size and
rendezvoused over the EP group, multicast off) laid out as

    rows [P·B, W] (source-major: slot s·B + p), then meta [P, MS] int32 (source s's B metadata rows, then its counts
    row: live slots, columns per local expert)

and a dispatch runs as

    1. barrier: every peer has finished reading what the last exchange left in its buffer (stream order: its reads
       were queued before its barrier);
    2. fused._count_kernel + fused._push_kernel (``num_sms`` programs): each token's row and metadata row go once to
       each destination that wants it, at slot (this rank, position); program 0 writes this rank's counts row into
       every destination;
    3. barrier (signal pads, release/acquire at system scope): every row bound for this rank has landed;
    4. fused._recv_kernel reads the buffer in place: only the live slots (position < the source's count), straight
       into the expert-major expand_x. Nothing is cleared between calls: stale slots are never read.

combine's way back is ``_combine_push_kernel``: per receive slot, sum_j scale·h[row of (slot, j)] in fp32, stored
straight into the source rank's return buffer at (this rank, position) — the reduction and the transfer in one
pass, only for slots that hold a token. Then the source sums its destinations' rows (unpermute, rank order).

Launches: dispatch 2 barriers + 3 kernels (count, push, receive); combine 2 barriers + 2 kernels (push, unpermute).

The barriers are torch's ``SymmetricMemory.barrier`` (a kernel, so the whole step stays CUDA-graph capturable).
Buffers are keyed by shapes only (never by routing), so every rank allocates the same buffers in the same order and
runs the same barriers whatever its tokens; they must, as with any collective. The first call of each size allocates
and rendezvouses (host-side collectives): warm up before capturing a CUDA graph.

Allocation protocol (the mixtral hang): some torch releases zero a new buffer's signal pad with an asynchronous
memset queued behind this rank's pending work. A faster peer could rendezvous, pass its own setup and signal into
that pad before the memset ran; the memset then erased the signal, this rank waited forever in the barrier and the
peer in its next one. So a new buffer is (a) allocated, (b) the device synchronized (the pad really is zero),
(c) rendezvoused, and (d) followed by a group-wide host barrier (an all_reduce on the device, then a device sync)
before any rank may signal into it.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from ..ops._launch import CachedLauncher
from ..ops.permute import unpermute
from .fused import _NUM_WARPS, _block_w, _launch_push

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
def _combine_push_kernel(
    h_ptr,  # [R, W] expert outputs (expand_x rows)
    row_of_ptr,  # [N, J] int32/int64 row of each (slot, column), -1 if none
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
        any_row = tl.load(row_of_ptr + n64 * J).to(tl.int64)
        for j in tl.static_range(1, J):
            any_row = tl.maximum(any_row, tl.load(row_of_ptr + n64 * J + j).to(tl.int64))
        if any_row >= 0:
            s = n64 // B
            p = n64 - s * B
            dst = tl.load(rows_base_ptr + s).to(tl.pointer_type(h_ptr.dtype.element_ty))
            for w0 in range(0, W, BLOCK_W):
                w = w0 + cols
                in_row = w < W
                acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
                for j in tl.static_range(J):
                    r = tl.load(row_of_ptr + n64 * J + j).to(tl.int64)
                    if r >= 0:
                        c = tl.load(scale_ptr + n64 * stride_s + j)
                        acc += c * tl.load(h_ptr + r * stride_h + w, mask=in_row, other=0.0).to(tl.float32)
                tl.store(dst + (me * B + p) * W + w, acc.to(h_ptr.dtype.element_ty), mask=in_row)


_COMBINE = CachedLauncher(_combine_push_kernel)


# ---------------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------------


def _host_barrier(group, device) -> None:
    """Every rank of ``group`` has reached this point with its device idle (a device all_reduce, then a sync)."""
    import torch.distributed as dist

    flag = torch.zeros(1, dtype=torch.int32, device=device)
    dist.all_reduce(flag, group=group)
    torch.cuda.synchronize(device)


class _Buffer:
    """One symmetric allocation: rows [P·B, W] of ``dtype`` then meta [P, MS] int32, on every rank."""

    def __init__(self, group, P, B, W, dtype, MS, device):
        import torch.distributed._symmetric_memory as symm

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off
        esz = torch.empty((), dtype=dtype).element_size()
        self.rows_bytes = -(-P * B * W * esz // 256) * 256
        nbytes = self.rows_bytes + P * MS * 4 + 256
        self.raw = symm.empty(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)  # (b): the allocation's signal-pad zeroing has run on this device
        enable = getattr(symm, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before rendezvous on older torch; deprecated (a no-op) on newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(group.group_name)
        self.hdl = symm.rendezvous(self.raw, group.group_name)
        self.rows = self.raw[:P * B * W * esz].view(dtype).view(P * B, W)
        self.meta = self.raw[self.rows_bytes:self.rows_bytes + P * MS * 4].view(torch.int32).view(P, MS)
        ptrs = list(self.hdl.buffer_ptrs)
        self.rows_base = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.meta_base = self.rows_base + self.rows_bytes
        torch.cuda.synchronize(device)
        _host_barrier(group, device)  # (d): nobody signals into a pad before every rank finished (a)-(c)

    def barrier(self):
        self.hdl.barrier(channel=0)


_BUFFERS: dict = {}


def _buffer(group, P, B, W, dtype, MS, device) -> _Buffer:
    """The buffer for these shapes (allocated on first use: a collective; the key holds shapes only)."""
    key = (group.group_name, P, B, W, dtype, MS, str(device))
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = _Buffer(group, P, B, W, dtype, MS, device)
    return buf


# ---------------------------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------------------------


class SymmTransport:
    """Same contract as fused._NcclTransport (dispatch_exchange / replay / reduce_back), plus combine_fused."""

    name = "symm"

    def __init__(self, num_sms: int):
        self.num_sms = num_sms

    def dispatch_exchange(self, x, ids, scales_TJ, dyn, topo, M: int, MS: int, num_sms: int):
        """-> (recv rows [N, W], recv meta [S, MS], pos_TP, flat_TP). Without TP the rows and meta are views of the
        symmetric buffer, valid until this rank's next dispatch of the same shapes: the caller reads them at once
        (fused._recv_kernel, queued right after)."""
        from .fused import _tp_gather

        P, B = topo.P, topo.B
        buf = _buffer(topo.group, P, B, x.shape[1], x.dtype, MS, x.device)
        buf.barrier()
        pos, flat = _launch_push(x, ids, scales_TJ, dyn, topo, rows=buf.rows_base, meta=buf.meta_base, peer=True,
                                 slot0=topo.rank * B, src_row=topo.rank, MS=MS, M=M, plan=None, num_sms=num_sms)
        buf.barrier()
        return _tp_gather(buf.rows, topo), _tp_gather(buf.meta, topo), pos, flat

    def replay(self, x, ctx) -> torch.Tensor:
        """Rows x [T, W] to the slots dispatch chose -> [N, W] (a copy; rows of dead slots are unspecified)."""
        from .fused import _tp_gather

        topo = ctx.topo
        P, B = topo.P, topo.B
        buf = _buffer(topo.group, P, B, x.shape[1], x.dtype, 0, x.device)
        buf.barrier()
        _launch_push(x, None, None, None, topo, rows=buf.rows_base, meta=None, peer=True, slot0=topo.rank * B,
                     src_row=topo.rank, MS=0, M=0, plan=(ctx.pos_TP, ctx.flat_TP), num_sms=ctx.num_sms)
        buf.barrier()
        recv = buf.rows.clone()
        return _tp_gather(recv, topo)

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
        row_of = torch.where(ctx.slot_valid, row_of, -1)[:, None]  # skip slots without a token
        ones = torch.ones(P * B, 1, dtype=torch.float32, device=red.device)
        return self._push_back(red, row_of, ones, ctx, W)

    def combine_fused(self, h, row_of_NJ, scales_NJ, ctx):
        """Weighted per-slot sums pushed straight to the sources (no TP, no autograd)."""
        return self._push_back(h, row_of_NJ, scales_NJ, ctx, h.shape[1])

    def _push_back(self, h, row_of, scales, ctx, W):
        topo = ctx.topo
        P, B = topo.P, topo.B
        buf = _buffer(topo.group, P, B, W, h.dtype, 0, h.device)
        N = P * B
        h = h.contiguous()
        scales = scales.float().contiguous()
        buf.barrier()
        if N:
            _COMBINE((min(self.num_sms, N),), [h, row_of.contiguous(), scales, buf.rows_base, N, W, B, topo.rank,
                                               h.stride(0), scales.stride(0)],
                     dict(J=row_of.shape[1], BLOCK_W=_block_w(W)), num_warps=_NUM_WARPS)
        buf.barrier()
        # the rows of this rank's tokens: (destination d, position) at d·B + pos; unpermute reads only those
        return unpermute(buf.rows, ctx.flat_TP, None)


def topo_without_tp(topo):
    import dataclasses

    return dataclasses.replace(topo, tp_group=None, P_tp=1, tp_rank=0)
