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
       were queued before its barrier). Skipped when another exchange of the group came in between (see
       ``_Buffer.open``): a dispatch followed by its combine, as in every MoE layer, needs none;
    2. fused._count_kernel + fused._push_kernel (``num_sms`` programs): each token's row and metadata row go once to
       each destination that wants it, at slot (this rank, position); program 0 writes this rank's counts row into
       every destination;
    3. barrier (signal pads, release/acquire at system scope): every row bound for this rank has landed;
    4. fused._recv_kernel reads the buffer in place: only the live slots (position < the source's count), straight
       into the expert-major expand_x. Nothing is cleared between calls: stale slots are never read.

combine's way back: the per-slot weighted sums sum_j scale·h[row of (slot, j)] are formed locally first (unpermute,
every SM, fp32 accumulation), then each source's block of B slot rows is copied by the copy engine straight into
that source's return buffer at (this rank, positions 0..B-1), and the source sums its destinations' rows
(unpermute, rank order). Dead slots travel too (a whole block is one DMA); nothing reads them.

Launches: dispatch 1-2 barriers + 3 kernels (count, push, receive); combine 1-2 barriers, 2 kernels (the local
sums, the final sum) and P block copies.

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

from ..ops.permute import unpermute
from .fused import _launch_push

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
# Buffers
# ---------------------------------------------------------------------------------------------------------


def _host_barrier(group, device) -> None:
    """Every rank of ``group`` has reached this point with its device idle (a device all_reduce, then a sync)."""
    import torch.distributed as dist

    flag = torch.zeros(1, dtype=torch.int32, device=device)
    dist.all_reduce(flag, group=group)
    torch.cuda.synchronize(device)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Exchanges:
    """Per EP group: exchanges closed so far, and whether one was ever captured in a CUDA graph."""

    def __init__(self):
        self.closed = 0
        self.captured = False


_EXCHANGES: dict[str, _Exchanges] = {}


class _Buffer:
    """One symmetric allocation: rows [P·B, W] of ``dtype`` then meta [P, MS] int32, on every rank.

    An exchange into it runs ``open()``, the writes into the peers, ``close()``, then the reads of what landed
    here, all on one stream."""

    def __init__(self, group, P, B, W, dtype, MS, device):
        import torch.distributed._symmetric_memory as symm

        self._track_exchanges(group)
        self._peer_views: dict[int, torch.Tensor] = {}
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

    def _track_exchanges(self, group) -> None:
        self.exchanges = _EXCHANGES.setdefault(group.group_name, _Exchanges())
        self.last_exchange = None  # number of the last exchange that wrote into this buffer

    def barrier(self):
        self.hdl.barrier(channel=0)

    def open(self) -> None:
        """Before writing into the peers' copies: wait until every peer has read what the last exchange into this
        buffer left there. That is already known when any other exchange of the group closed after it: a peer
        queued its reads of our last exchange before its writes of the next one, and that one's closing barrier
        waited for those writes. Every rank runs the same exchanges in the same order, so all take the same
        branch. Inside a CUDA-graph capture, and ever after one (replays write the buffers behind this
        bookkeeping's back), the barrier always runs."""
        ex = self.exchanges
        if _capturing():
            ex.captured = True
        if ex.captured or self.last_exchange == ex.closed - 1:
            self.barrier()
        self.last_exchange = ex.closed

    def close(self) -> None:
        """After the writes: every row bound for this rank has landed (signal pads, system-scope release/acquire)."""
        self.barrier()
        self.exchanges.closed += 1

    def peer_rows(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s rows [P·B, W], mapped into this process (a copy into it is a peer-to-peer DMA). Made
        once per peer: a get_buffer call took ~40 us of host time under cProfile (2x H200), on the decode path."""
        view = self._peer_views.get(rank)
        if view is None:
            view = self._peer_views[rank] = self.hdl.get_buffer(rank, tuple(self.rows.shape), self.rows.dtype)
        return view


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
    """Same contract as fused._NcclTransport (dispatch_exchange / replay / reduce_back)."""

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
        buf.open()
        pos, flat = _launch_push(x, ids, scales_TJ, dyn, topo, rows=buf.rows_base, meta=buf.meta_base, peer=True,
                                 slot0=topo.rank * B, src_row=topo.rank, MS=MS, M=M, plan=None, num_sms=num_sms)
        buf.close()
        return _tp_gather(buf.rows, topo), _tp_gather(buf.meta, topo), pos, flat

    def replay(self, x, ctx) -> torch.Tensor:
        """Rows x [T, W] to the slots dispatch chose -> [N, W] (a copy; rows of dead slots are unspecified)."""
        from .fused import _tp_gather

        topo = ctx.topo
        P, B = topo.P, topo.B
        buf = _buffer(topo.group, P, B, x.shape[1], x.dtype, 0, x.device)
        buf.open()
        _launch_push(x, None, None, None, topo, rows=buf.rows_base, meta=None, peer=True, slot0=topo.rank * B,
                     src_row=topo.rank, MS=0, M=0, plan=(ctx.pos_TP, ctx.flat_TP), num_sms=ctx.num_sms)
        buf.close()
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
        buf = _buffer(topo.group, P, B, red.shape[1], red.dtype, 0, red.device)
        me = topo.rank
        buf.open()
        for s in range(P):  # slot rows (source s, positions 0..B-1) -> rank s at (me, 0..B-1)
            buf.peer_rows(s)[me * B:(me + 1) * B].copy_(red[s * B:(s + 1) * B])
        buf.close()  # every destination's block has landed here
        # the rows of this rank's tokens: (destination d, position) at d·B + pos; unpermute reads only those
        return unpermute(buf.rows, ctx.flat_TP, None)


def topo_without_tp(topo):
    import dataclasses

    return dataclasses.replace(topo, tp_group=None, P_tp=1, tp_rank=0)
