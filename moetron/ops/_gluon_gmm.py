"""The m-grouped GEMM on Hopper written in Gluon (Triton's lower-level dialect), for large 16-bit problems.

Why: a group's last 128-row tile is on average about half empty (Qwen3-30B at T=8192: groups of ~460-580 rows, so
~12% of the MMAs multiply rows of the next group and are masked at the store). The `tl` kernel's 128x256 tile
runs as two warpgroups of 64 rows each, but as one program, so both always issue their MMAs. Here the two
warpgroups are separate partitions of a warp-specialized kernel (``gl.warp_specialize``), fed by a one-warp TMA
producer: each owns 64 rows of the tile and the second skips its MMAs when the group has no rows left for it,
which leaves the SM's tensor cores to the first. Both read the same weight panel from shared memory, so the
weight traffic per FLOP stays that of the 128x256 tile (64-row tiles alone would double it).

Three kernels: ``_gmm_ws_kernel`` (gmm's forward and dx), ``_gmm_gated_ws_kernel`` (the first expert GEMM with
SwiGLU in its epilogue, as ``gmm_gated``) and ``_gmm_k_ws_kernel`` (the k-grouped weight gradient, see its
section). Same arithmetic as the `tl` kernels (the same k-steps, fp32 accumulation in the same order, the same
roundings), so the results are bitwise equal (tests/gpu/test_gluon_gmm_gpu.py). Used only where they were measured
faster (see ``eligible``, ``gated_eligible`` and ``k_eligible``); everything else keeps the `tl` kernels.
``MOETRON_GLUON=0`` turns them off (read when gmm plans a launch for a new shape; a shape already planned keeps its
kernel).
"""


import functools
import os
import warnings

import torch
import triton

try:  # Gluon ships with recent Triton releases (3.6 on the H100 machine); its Hopper TMA / wgmma module is needed
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

from .._env import triton_interpreter_enabled
from ._launch import CachedLauncher

if gluon is not None:
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later releases
    # async_load / async_store (same leading arguments) and make the old names raise
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # and the CTA-wide (in a warp-specialized partition: partition-wide) barrier thread_barrier, later barrier
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # constexpr globals, so the kernels can read them
    TILE_M = gl.constexpr(128)  # two warpgroups of HALF rows
    HALF = gl.constexpr(64)
    BLOCK_N = gl.constexpr(256)
    BLOCK_K = gl.constexpr(64)
    # each consumer warpgroup's [64, 256] accumulator: one m64n256k16 wgmma per 16 of K
    ACC_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16]))


_unsupported: str | None = None  # why a kernel failed to compile here, if one did (then neither is tried again)


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def _runs_on(x: torch.Tensor) -> bool:
    """The Gluon kernels are on (Gluon present and compiling here, not turned off) and x is on an sm_90 GPU."""
    if gluon is None or _unsupported or os.environ.get("MOETRON_GLUON", "1") == "0" or triton_interpreter_enabled():
        return False
    return x.is_cuda and _hopper(x.device.index or 0)


def _tma_rows(*tensors: torch.Tensor) -> bool:
    """Each 2-D tensor has unit column stride and 16-byte aligned rows and start (TMA's requirements)."""
    return all(t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def _fits(x: torch.Tensor, w: torch.Tensor, N: int, has_bias: bool, gathered: bool, few_rows: bool) -> bool:
    """The conditions on x and w [G, ., .] (N output columns of the MMA) that both m-grouped kernels share."""
    if not _runs_on(x) or has_bias or gathered or few_rows:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return False
    K = x.shape[1]
    # per-group weights of at most 8M elements: Mixtral's (58M) ran 0.62-0.84x the tl kernel, whose 16-m-tile
    # bands and plain stores suit them (session 23)
    if K % 64 or N < 256 or N * K >= 8 * 2**20 or not w.is_contiguous() or w.shape[0] * max(N, K) >= 2**31:
        return False
    return _tma_rows(x) and w.data_ptr() % 16 == 0


def eligible(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, has_bias: bool, gathered: bool,
             few_rows: bool) -> bool:
    """Whether ``gmm``'s forward / dx launch takes ``_gmm_ws_kernel``: an sm_90 GPU, 16-bit x, w and out of one
    dtype, no bias or row gather, a contiguous weight, TMA-aligned rows, K a multiple of 64 (a [G, K, N] weight's
    last k-step would otherwise read the next group's rows), N >= 256, a per-group weight under 8M elements, and
    more than decode-sized row counts (the 64-row decode tiles stay). Measured on Qwen3-30B, OLMoE, Mixtral and the
    grouped-GEMM blog shapes (benchmarks/NOTES.md, session 23)."""
    N = out.shape[1]
    return _fits(x, w, N, has_bias, gathered, few_rows) and out.dtype == x.dtype and _tma_rows(out) and N % 8 == 0


def gated_eligible(x: torch.Tensor, w: torch.Tensor, activation: str, gathered: bool, few_rows: bool) -> bool:
    """Whether ``gmm_gated`` takes ``_gmm_gated_ws_kernel``: ``eligible``'s conditions for x @ w^T with w
    [G, 2F, K], SwiGLU, F a multiple of 128 (a tile's gate columns must not run into the up rows), and a per-group
    weight under 4M elements: Qwen3-30B's (3.1M) ran 1.056x the tl kernel, OLMoE's (4.2M) 0.99x (session 23)."""
    return (activation == "swiglu" and w.shape[1] % 256 == 0 and w.shape[1] * x.shape[1] < 4 * 2**20
            and _fits(x, w, w.shape[1], False, gathered, few_rows))


def k_eligible(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, few_rows: bool) -> bool:
    """Whether gmm's weight gradient out[g] (+)= a[rows of g]^T @ b[rows of g] takes ``_gmm_k_ws_kernel``: an sm_90
    GPU, a, b and out of one 16-bit dtype (an fp32 main_grad keeps the tl kernel: its tile would not fit), a's width
    a multiple of 128, per-group outputs under 8M elements (from there the tl kernel takes 128x256 tiles itself),
    TMA-aligned rows, a contiguous out, and more than decode-sized row counts (the tl kernel's write-bound decode
    config stays). Measured on Qwen3-30B, OLMoE and the grouped-GEMM blog shapes (benchmarks/NOTES.md, session 25)."""
    if not _runs_on(a) or few_rows or a.dtype not in (torch.bfloat16, torch.float16):
        return False
    if b.dtype != a.dtype or out.dtype != a.dtype or not out.is_contiguous() or out.data_ptr() % 16:
        return False
    KA, NB = a.shape[1], b.shape[1]
    return KA % 128 == 0 and NB % 8 == 0 and KA * NB < 8 * 2**20 and out.shape[0] * KA < 2**31 and _tma_rows(a, b)


if gluon is not None:

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _schedule(sizes_ptr, M, G, SIZES_ARE_ENDS: gl.constexpr, ZERO_TAIL: gl.constexpr, BLOCK_G: gl.constexpr,
                  NUM_WARPS: gl.constexpr):
        """The m-tile schedule, as `gmm.py`'s ``_group_schedule`` builds it (same clamping of invalid sizes):
        per-entry row starts and ends, m-tile counts and their inclusive prefix; entry G is the tail of rows past
        the last group (zeroed when ZERO_TAIL)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        idx = gl.arange(0, BLOCK_G, layout=layout)
        raw = gl.load(sizes_ptr + idx, mask=idx < G, other=0).to(gl.int32)
        if SIZES_ARE_ENDS:
            raw -= gl.load(sizes_ptr + idx - 1, mask=(idx > 0) & (idx < G), other=0).to(gl.int32)
        counts = gl.maximum(raw, 0)
        inclusive = gl.associative_scan(counts, 0, _add)
        starts = gl.minimum(inclusive - counts, M)
        ends = gl.where(idx == G, M, gl.minimum(inclusive, M))
        if ZERO_TAIL:
            tiles = gl.where(idx <= G, (ends - starts + TILE_M - 1) // TILE_M, 0)
        else:
            tiles = gl.where(idx < G, (ends - starts + TILE_M - 1) // TILE_M, 0)
        tile_ends = gl.associative_scan(tiles, 0, _add)
        return idx, starts, ends, tiles, tile_ends, gl.sum(tiles, axis=0)

    @gluon.jit
    def _locate(tile, num_n, TILE_N: gl.constexpr, idx, starts, ends, tiles, tile_ends):
        """(entry, first row, end row, first column) of the flat tile index ``tile``: the one tile order that the
        producer and both consumers walk. The n-tiles of one m-tile run side by side, so the programs in flight
        share a few x row panels and the weights of a few groups in L2."""
        m_tile = tile // num_n
        g = gl.sum((tile_ends <= m_tile).to(gl.int32), axis=0)
        mine = idx == g
        first_tile = gl.sum(gl.where(mine, tile_ends - tiles, 0), axis=0)
        row0 = gl.sum(gl.where(mine, starts, 0), axis=0) + (m_tile - first_tile) * TILE_M
        return g, row0, gl.sum(gl.where(mine, ends, 0), axis=0), tile % num_n * TILE_N

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sizes_ptr, M, N, K, G, num_programs,
                  TRANS_W: gl.constexpr, GATED: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr, ZERO_TAIL: gl.constexpr,
                  BLOCK_G: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One warp: TMA loads of each k-step's x rows [128, BK] and weight panel into the ring. GATED: w is
        [G, 2N, K] (gate rows, then up rows) and the panel is N-tile's 128 gate rows above its 128 up rows."""
        idx, starts, ends, tiles, tile_ends, total_m = _schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G,
                                                                 1)
        tile_n: gl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
        num_n = gl.cdiv(N, tile_n)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes * (2 if GATED else 1)
        p = 0
        for tile in range(gl.program_id(0), total_m * num_n, num_programs):
            g, row0, row_end, n0 = _locate(tile, num_n, tile_n, idx, starts, ends, tiles, tile_ends)
            for k0 in range(0, K, BLOCK_K):
                s = p % NUM_STAGES
                mbarrier.wait(empty.index(s), ((p // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [row0, k0], ready.index(s), a_bufs.index(s))
                # the tail entry (g == G) loads rows past the weight's end: zero-filled, and never multiplied
                if GATED:
                    b_buf = b_bufs.index(s)
                    _tma_load(b_desc, [g * 2 * N + n0, k0], ready.index(s), b_buf.slice(0, tile_n))
                    _tma_load(b_desc, [g * 2 * N + N + n0, k0], ready.index(s), b_buf.slice(tile_n, tile_n))
                elif TRANS_W:
                    _tma_load(b_desc, [g * N + n0, k0], ready.index(s), b_bufs.index(s))
                else:
                    _tma_load(b_desc, [g * K + k0, n0], ready.index(s), b_bufs.index(s))
                p += 1

    @gluon.jit
    def _mainloop(WG: gl.constexpr, a_bufs, b_bufs, ready, empty, c, multiplies, K, TRANS_W: gl.constexpr,
                  NUM_STAGES: gl.constexpr):
        """This warpgroup's [64, 256] accumulator of one tile: every k-step's slot is waited for and released,
        its MMAs issued only if ``multiplies``. Returns it and the advanced slot counter."""
        acc = gl.zeros((HALF, BLOCK_N), dtype=gl.float32, layout=ACC_LAYOUT)
        for k0 in range(0, K, BLOCK_K):
            s = c % NUM_STAGES
            mbarrier.wait(ready.index(s), (c // NUM_STAGES) & 1)
            if multiplies:
                if TRANS_W:
                    b = b_bufs.index(s).permute((1, 0))
                else:
                    b = b_bufs.index(s)
                acc = warpgroup_mma(a_bufs.index(s).slice(WG * HALF, HALF), b, acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc, ))
            if k0 > 0:  # the MMA before this one has finished reading its slot
                mbarrier.arrive(empty.index((c - 1) % NUM_STAGES))
            c += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((c - 1) % NUM_STAGES))
        return acc, c

    @gluon.jit
    def _consumer(WG: gl.constexpr, a_bufs, b_bufs, c_bufs, ready, empty, y_desc, y_ptr, stride_ym, sizes_ptr,
                  M, N, K, G, num_programs, TRANS_W: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr,
                  ZERO_TAIL: gl.constexpr, BLOCK_G: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One warpgroup: rows [WG * 64, WG * 64 + 64) of every tile. Rows past the entry's end are never
        stored; a half with none of them left issues no MMAs at all."""
        idx, starts, ends, tiles, tile_ends, total_m = _schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G,
                                                                 4)
        num_n = gl.cdiv(N, BLOCK_N)
        c_buf = c_bufs.index(WG)
        c = 0
        for tile in range(gl.program_id(0), total_m * num_n, num_programs):
            g, row0, row_end, n0 = _locate(tile, num_n, BLOCK_N, idx, starts, ends, tiles, tile_ends)
            my_row0 = row0 + WG * HALF
            stores = my_row0 < row_end
            multiplies = stores & (g < G)  # the tail entry stores zeros
            acc, c = _mainloop(WG, a_bufs, b_bufs, ready, empty, c, multiplies, K, TRANS_W, NUM_STAGES)
            if stores:
                out = acc.to(y_desc.dtype)
                if my_row0 + HALF <= row_end:
                    tma.store_wait(0)  # this warpgroup's previous store has read its staging buffer
                    c_buf.store(out)
                    fence_async_shared()
                    _tma_store(y_desc, [my_row0, n0], c_buf)
                else:  # the entry ends inside these 64 rows: a masked store, the next group's rows untouched
                    rows = my_row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, ACC_LAYOUT))
                    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
                    ptrs = y_ptr + gl.expand_dims(rows.to(gl.int64) * stride_ym, 1) + gl.expand_dims(cols, 0)
                    gl.store(ptrs, out, mask=gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < N, 0))
        tma.store_wait(0)

    @gluon.jit
    def _gmm_ws_kernel(x_ptr, w_ptr, y_ptr, sizes_ptr, M, N, K, G, num_programs, stride_xm, stride_ym,
                       TRANS_W: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr, ZERO_TAIL: gl.constexpr,
                       BLOCK_G: gl.constexpr, NUM_STAGES: gl.constexpr):
        """y[rows of g] = x[rows of g] @ w[g] (w [G, K, N]; [G, N, K] read transposed with TRANS_W); rows past the
        last group are zeroed with ZERO_TAIL, else left as they are. Persistent, one program per SM."""
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        layout: gl.constexpr = gl.NVMMASharedLayout(128, 16, rank=2)  # every tile has >= 128-byte rows
        a_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [TILE_M, BLOCK_K], layout)
        if TRANS_W:
            b_desc = tma.make_tensor_descriptor(w_ptr, [G * N, K], [K, 1], [BLOCK_N, BLOCK_K], layout)
        else:
            b_desc = tma.make_tensor_descriptor(w_ptr, [G * K, N], [N, 1], [BLOCK_K, BLOCK_N], layout)
        y_desc = tma.make_tensor_descriptor(y_ptr, [M, N], [stride_ym, 1], [HALF, BLOCK_N], layout)
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, TILE_M, BLOCK_K], layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + b_desc.block_type.shape, layout)
        c_bufs = gl.allocate_shared_memory(dtype, [2, HALF, BLOCK_N], layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both warpgroups release each slot
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, c_bufs, ready, empty, y_desc, y_ptr, stride_ym, sizes_ptr, M, N, K, G,
                         num_programs, TRANS_W, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
            (_consumer, (1, a_bufs, b_bufs, c_bufs, ready, empty, y_desc, y_ptr, stride_ym, sizes_ptr, M, N, K, G,
                         num_programs, TRANS_W, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, sizes_ptr, M, N, K, G, num_programs, TRANS_W,
                         False, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
        ], [4, 1], [232, 40])

    _launch_ws = CachedLauncher(_gmm_ws_kernel, device_scratch=True)

    @gluon.jit
    def _gated_consumer(WG: gl.constexpr, a_bufs, b_bufs, c_bufs, ready, empty, h_desc, o_desc, a_ptr, h_ptr,
                        scale_ptr, stride_am, stride_hm, sizes_ptr, M, F, K, G, num_programs, HAS_SCALE: gl.constexpr,
                        STORE_H: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr, ZERO_TAIL: gl.constexpr,
                        BLOCK_G: gl.constexpr, NUM_STAGES: gl.constexpr):
        """_consumer for the first expert GEMM with SwiGLU in its epilogue: the accumulator holds 128 gate columns
        beside their 128 up columns. h is rounded to x's dtype (as gmm stores it), a = silu(gate) * up (* scale per
        row) computed from that rounding (as gated_act would), so the bits are the tl kernel's. With STORE_H a
        warpgroup's full 64-row half goes through its staging tile: h by two TMA stores, gate and up read back
        from it, a staged over its first half and TMA-stored; a half that crosses the group's end (or inference,
        without STORE_H) uses masked pointer stores."""
        tile_n: gl.constexpr = BLOCK_N // 2
        idx, starts, ends, tiles, tile_ends, total_m = _schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G,
                                                                 4)
        num_n = gl.cdiv(F, tile_n)
        c_buf = c_bufs.index(WG)
        c = 0
        for tile in range(gl.program_id(0), total_m * num_n, num_programs):
            g, row0, row_end, n0 = _locate(tile, num_n, tile_n, idx, starts, ends, tiles, tile_ends)
            my_row0 = row0 + WG * HALF
            stores = my_row0 < row_end
            acc, c = _mainloop(WG, a_bufs, b_bufs, ready, empty, c, stores & (g < G), K, True, NUM_STAGES)
            if stores:
                h = acc.to(a_ptr.dtype.element_ty)
                if STORE_H and my_row0 + HALF <= row_end:
                    # interior: h through the staging tile by TMA, gate and up read back from it, a through TMA
                    tma.store_wait(0)
                    c_buf.store(h)
                    fence_async_shared()
                    _tma_store(h_desc, [my_row0, n0], c_buf.slice(0, tile_n, dim=1))
                    _tma_store(h_desc, [my_row0, F + n0], c_buf.slice(tile_n, tile_n, dim=1))
                    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
                    g_b = c_buf.slice(0, tile_n, dim=1).load(blk).to(gl.float32)
                    u_b = c_buf.slice(tile_n, tile_n, dim=1).load(blk).to(gl.float32)
                    o_b = g_b * (1.0 / (1.0 + gl.exp(-g_b))) * u_b
                    if HAS_SCALE:
                        rows_b = my_row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, blk))
                        o_b = o_b * gl.expand_dims(gl.load(scale_ptr + rows_b).to(gl.float32), 1)
                    tma.store_wait(0)
                    a_stage = c_buf.slice(0, tile_n, dim=1)
                    a_stage.store(o_b.to(a_ptr.dtype.element_ty))
                    fence_async_shared()
                    _tma_store(o_desc, [my_row0, n0], a_stage)
                else:
                    if STORE_H:  # column j < 128 is gate column n0 + j, the rest up column F + n0 + j - 128
                        rows = my_row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, ACC_LAYOUT))
                        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
                        h_cols = gl.where(cols < tile_n, n0 + cols, F + n0 + cols - tile_n)
                        gl.store(h_ptr + gl.expand_dims(rows.to(gl.int64) * stride_hm, 1) + gl.expand_dims(h_cols, 0),
                                 h, mask=gl.expand_dims(rows < row_end, 1))
                    gate, up = gl.split(gl.permute(gl.reshape(h, [HALF, 2, tile_n]), [0, 2, 1]))
                    gate = gate.to(gl.float32)
                    out = gate * (1.0 / (1.0 + gl.exp(-gate))) * up.to(gl.float32)
                    out_layout: gl.constexpr = out.type.layout
                    rows_o = my_row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_layout))
                    if HAS_SCALE:
                        scale = gl.load(scale_ptr + rows_o, mask=rows_o < row_end, other=0.0)
                        out = out * gl.expand_dims(scale.to(gl.float32), 1)
                    cols_o = n0 + gl.arange(0, tile_n, layout=gl.SliceLayout(0, out_layout))
                    ptrs = a_ptr + gl.expand_dims(rows_o.to(gl.int64) * stride_am, 1) + gl.expand_dims(cols_o, 0)
                    gl.store(ptrs, out.to(a_ptr.dtype.element_ty), mask=gl.expand_dims(rows_o < row_end, 1))
        tma.store_wait(0)

    @gluon.jit
    def _gmm_gated_ws_kernel(x_ptr, w_ptr, scale_ptr, a_ptr, h_ptr, sizes_ptr, M, F, K, G, num_programs, stride_xm,
                             stride_am, stride_hm, HAS_SCALE: gl.constexpr, STORE_H: gl.constexpr,
                             SIZES_ARE_ENDS: gl.constexpr, ZERO_TAIL: gl.constexpr, BLOCK_G: gl.constexpr,
                             NUM_STAGES: gl.constexpr):
        """a = silu(h[:, :F]) * h[:, F:] (* scale per row) for h[rows of g] = x[rows of g] @ w[g]^T, w [G, 2F, K];
        h stored too with STORE_H. The tail entry's rows get zeros, as with ZERO_TAIL in _gmm_ws_kernel."""
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        layout: gl.constexpr = gl.NVMMASharedLayout(128, 16, rank=2)
        a_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [TILE_M, BLOCK_K], layout)
        b_desc = tma.make_tensor_descriptor(w_ptr, [G * 2 * F, K], [K, 1], [BLOCK_N // 2, BLOCK_K], layout)
        a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, TILE_M, BLOCK_K], layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_K], layout)
        # h's staging (STORE_H), one [64, 256] tile per warpgroup: gate columns, then up columns
        h_desc = tma.make_tensor_descriptor(h_ptr, [M, 2 * F], [stride_hm, 1], [HALF, BLOCK_N // 2], layout)
        o_desc = tma.make_tensor_descriptor(a_ptr, [M, F], [stride_am, 1], [HALF, BLOCK_N // 2], layout)
        c_bufs = gl.allocate_shared_memory(dtype, [2, HALF, BLOCK_N], layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        gl.warp_specialize([
            (_gated_consumer, (0, a_bufs, b_bufs, c_bufs, ready, empty, h_desc, o_desc, a_ptr, h_ptr, scale_ptr,
                               stride_am, stride_hm, sizes_ptr, M, F, K, G, num_programs, HAS_SCALE, STORE_H,
                               SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
            (_gated_consumer, (1, a_bufs, b_bufs, c_bufs, ready, empty, h_desc, o_desc, a_ptr, h_ptr, scale_ptr,
                               stride_am, stride_hm, sizes_ptr, M, F, K, G, num_programs, HAS_SCALE, STORE_H,
                               SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, sizes_ptr, M, F, K, G, num_programs, True,
                         True, SIZES_ARE_ENDS, ZERO_TAIL, BLOCK_G, NUM_STAGES)),
        ], [4, 1], [232, 40])

    _launch_gated_ws = CachedLauncher(_gmm_gated_ws_kernel, device_scratch=True)

    # ---- the k-grouped weight gradient ------------------------------------------------------------------------
    # out[g] = a[rows of g]^T @ b[rows of g] for a [M, KA], b [M, NB] and out [G, KA, NB] (gmm's dw: a is dy or x,
    # b the other), added into out with ACCUMULATE. The `tl` kernel runs 128x128 output tiles, two programs per SM,
    # and at Qwen3-30B's shapes it is bound by the L2 traffic those tiles need: each 32-row step brings 16 KB of
    # operands for 1 MFLOP (64 FLOP/B). Here a tile is 128x256 (87 FLOP/B), split over two consumer warpgroups that
    # each own 64 of its rows (64 of a's columns) and read the whole b chunk, fed by a one-warp TMA producer that runs
    # ahead across tiles. Each warpgroup stores its half of the tile through its own staging buffer by TMA; with
    # ACCUMULATE that buffer first receives the stored values by TMA, issued as soon as the previous store has read
    # it, so the load overlaps a whole main loop.
    BLOCK_R = gl.constexpr(32)  # rows reduced per step, as the tl kernel's BM (same accumulation order)
    TILE_KA = gl.constexpr(128)  # output rows (a's columns) per tile: two warpgroups of HALF

    @gluon.jit
    def _k_group_rows(sizes_ptr, g, M, SIZES_ARE_ENDS: gl.constexpr, BLOCK_G: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Group g's rows [start, end), clamped as gmm.py's ``_group_rows`` clamps them."""
        if SIZES_ARE_ENDS:
            end = gl.load(sizes_ptr + g).to(gl.int32)
            start = gl.load(sizes_ptr + g - 1, mask=g > 0, other=0).to(gl.int32)
        else:
            layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
            idx = gl.arange(0, BLOCK_G, layout=layout)
            counts = gl.maximum(gl.load(sizes_ptr + idx, mask=idx <= g, other=0).to(gl.int32), 0)
            end = gl.sum(counts, axis=0)
            start = end - gl.sum(gl.where(idx == g, counts, 0), axis=0)
        start = gl.minimum(gl.maximum(start, 0), M)
        return start, gl.minimum(gl.maximum(end, start), M)

    @gluon.jit
    def _k_locate(tile, num_k, num_n, GROUP_K: gl.constexpr):
        """(group, k-tile, n-tile) of a flat tile index, in gmm.py's ``_wgrad_tile`` order: within a group, bands of
        GROUP_K k-tiles sweep N together, so the tiles in flight share a few operand panels in L2."""
        g = tile // (num_k * num_n)
        r = tile % (num_k * num_n)
        per_band = GROUP_K * num_n
        first_k = r // per_band * GROUP_K
        band_k = gl.minimum(num_k - first_k, GROUP_K)
        return g, first_k + (r % per_band) % band_k, (r % per_band) // band_k

    @gluon.jit
    def _k_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sizes_ptr, M, KA, NB, total_tiles, num_programs,
                    SIZES_ARE_ENDS: gl.constexpr, BLOCK_G: gl.constexpr, GROUP_K: gl.constexpr,
                    NUM_STAGES: gl.constexpr):
        """One warp: each step's two 64-column halves of a (one per warpgroup) and its 256 columns of b."""
        num_k = KA // TILE_KA
        num_n = gl.cdiv(NB, BLOCK_N)
        nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        p = 0
        for tile in range(gl.program_id(0), total_tiles, num_programs):
            g, kt, nt = _k_locate(tile, num_k, num_n, GROUP_K)
            row_start, row_end = _k_group_rows(sizes_ptr, g, M, SIZES_ARE_ENDS, BLOCK_G, 1)
            for r0 in range(row_start, gl.maximum(row_end, row_start + 1), BLOCK_R):  # an empty group: one step
                s = p % NUM_STAGES
                mbarrier.wait(empty.index(s), ((p // NUM_STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [r0, kt * TILE_KA], ready.index(s), a_bufs.index(2 * s))
                _tma_load(a_desc, [r0, kt * TILE_KA + HALF], ready.index(s), a_bufs.index(2 * s + 1))
                _tma_load(b_desc, [r0, nt * BLOCK_N], ready.index(s), b_bufs.index(s))
                p += 1

    @gluon.jit
    def _k_zero_rows(buf, valid, layout: gl.constexpr):
        """Rows >= valid of a shared-memory tile set to zero."""
        rows = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
        tile = buf.load(layout)
        buf.store(gl.where(gl.expand_dims(rows < valid, 1), tile, gl.zeros_like(tile)))

    @gluon.jit
    def _k_consumer(WG: gl.constexpr, a_bufs, b_bufs, c_bufs, ready, empty, zeroed, c_bars, out_desc, sizes_ptr, M,
                    KA, NB, total_tiles, num_programs, ACCUMULATE: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr,
                    BLOCK_G: gl.constexpr, GROUP_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """One warpgroup: rows [WG * 64, WG * 64 + 64) of each [128, 256] output tile. In the step that crosses the
        group's end, the rows past it (the next group's, or rows past M that TMA zero-filled) are zeroed in both
        operands before the MMA, as 0 * inf would be NaN: this warpgroup's a half and its 128 columns of b, after
        which the two warpgroups meet on ``zeroed`` (each MMA reads all of b)."""
        num_k = KA // TILE_KA
        num_n = gl.cdiv(NB, BLOCK_N)
        a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        b_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        c_buf = c_bufs.index(WG)
        c_bar = c_bars.index(WG)
        pid = gl.program_id(0)
        my_tiles = gl.cdiv(total_tiles - pid, num_programs)
        if ACCUMULATE:  # the first tile's stored values, into the staging buffer
            g0, kt0, nt0 = _k_locate(pid, num_k, num_n, GROUP_K)
            mbarrier.expect(c_bar, out_desc.block_type.nbytes, pred=my_tiles > 0)
            _tma_load(out_desc, [g0 * KA + kt0 * TILE_KA + WG * HALF, nt0 * BLOCK_N], c_bar, c_buf,
                      pred=my_tiles > 0)
        c = 0
        crossings = 0
        for t in range(my_tiles):
            tile = pid + t * num_programs
            g, kt, nt = _k_locate(tile, num_k, num_n, GROUP_K)
            row_start, row_end = _k_group_rows(sizes_ptr, g, M, SIZES_ARE_ENDS, BLOCK_G, 4)
            acc = gl.zeros((HALF, BLOCK_N), dtype=gl.float32, layout=ACC_LAYOUT)
            for r0 in range(row_start, gl.maximum(row_end, row_start + 1), BLOCK_R):
                s = c % NUM_STAGES
                mbarrier.wait(ready.index(s), (c // NUM_STAGES) & 1)
                valid = row_end - r0
                if valid < BLOCK_R:
                    _k_zero_rows(a_bufs.index(2 * s + WG), valid, a_layout)
                    _k_zero_rows(b_bufs.index(s).slice(WG * (BLOCK_N // 2), BLOCK_N // 2, dim=1), valid, b_layout)
                    fence_async_shared()
                    _barrier()
                    mbarrier.arrive(zeroed)
                    mbarrier.wait(zeroed, crossings & 1)
                    crossings += 1
                acc = warpgroup_mma(a_bufs.index(2 * s + WG).permute((1, 0)), b_bufs.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                if r0 > row_start:  # the MMA before this one has finished reading its slot
                    mbarrier.arrive(empty.index((c - 1) % NUM_STAGES))
                c += 1
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index((c - 1) % NUM_STAGES))
            if ACCUMULATE:
                mbarrier.wait(c_bar, t & 1)
                acc = acc + c_buf.load(ACC_LAYOUT).to(gl.float32)
                _barrier()  # every lane has read the stored values before any overwrites them
            else:
                tma.store_wait(0)  # this warpgroup's previous store has read its staging buffer
            c_buf.store(acc.to(out_desc.dtype))
            fence_async_shared()
            _barrier()
            _tma_store(out_desc, [g * KA + kt * TILE_KA + WG * HALF, nt * BLOCK_N], c_buf)
            if ACCUMULATE:  # the next tile's stored values, once this store has read the buffer
                tma.store_wait(0)
                more = t + 1 < my_tiles
                gn, ktn, ntn = _k_locate(gl.minimum(tile + num_programs, total_tiles - 1), num_k, num_n, GROUP_K)
                mbarrier.expect(c_bar, out_desc.block_type.nbytes, pred=more)
                _tma_load(out_desc, [gn * KA + ktn * TILE_KA + WG * HALF, ntn * BLOCK_N], c_bar, c_buf, pred=more)
        tma.store_wait(0)

    @gluon.jit
    def _gmm_k_ws_kernel(a_ptr, b_ptr, out_ptr, sizes_ptr, M, KA, NB, G, num_programs, stride_am, stride_bm,
                         ACCUMULATE: gl.constexpr, SIZES_ARE_ENDS: gl.constexpr, BLOCK_G: gl.constexpr,
                         GROUP_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """out[g] (+)= a[rows of g]^T @ b[rows of g]: a [M, KA] with KA a multiple of 128, b [M, NB], out
        [G, KA, NB] contiguous (viewed as [G * KA, NB]: a tile never crosses a group's rows). Persistent, one
        program per SM; the rounding is the tl kernel's (fp32 sum plus the stored value, rounded once)."""
        dtype: gl.constexpr = a_ptr.dtype.element_ty
        layout: gl.constexpr = gl.NVMMASharedLayout(128, 16, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, KA], [stride_am, 1], [BLOCK_R, HALF], layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, [M, NB], [stride_bm, 1], [BLOCK_R, BLOCK_N], layout)
        out_desc = tma.make_tensor_descriptor(out_ptr, [G * KA, NB], [NB, 1], [HALF, BLOCK_N], layout)
        a_bufs = gl.allocate_shared_memory(dtype, [2 * NUM_STAGES, BLOCK_R, HALF], layout)
        b_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_R, BLOCK_N], layout)
        c_bufs = gl.allocate_shared_memory(dtype, [2, HALF, BLOCK_N], layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        zeroed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        c_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both warpgroups release each slot
        mbarrier.init(zeroed, count=2)
        mbarrier.init(c_bars.index(0), count=1)
        mbarrier.init(c_bars.index(1), count=1)
        total_tiles = G * (KA // TILE_KA) * gl.cdiv(NB, BLOCK_N)
        gl.warp_specialize([
            (_k_consumer, (0, a_bufs, b_bufs, c_bufs, ready, empty, zeroed, c_bars, out_desc, sizes_ptr, M, KA, NB,
                           total_tiles, num_programs, ACCUMULATE, SIZES_ARE_ENDS, BLOCK_G, GROUP_K, NUM_STAGES)),
            (_k_consumer, (1, a_bufs, b_bufs, c_bufs, ready, empty, zeroed, c_bars, out_desc, sizes_ptr, M, KA, NB,
                           total_tiles, num_programs, ACCUMULATE, SIZES_ARE_ENDS, BLOCK_G, GROUP_K, NUM_STAGES)),
            (_k_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, sizes_ptr, M, KA, NB, total_tiles,
                           num_programs, SIZES_ARE_ENDS, BLOCK_G, GROUP_K, NUM_STAGES)),
        ], [4, 1], [232, 40])

    _launch_k_ws = CachedLauncher(_gmm_k_ws_kernel, device_scratch=True)


def _first_launch_or_none(launcher, grid, args, constexprs: dict, options: dict):
    """Launch; returns (launcher, grid, args, constexprs, options), what ``LaunchPlans.add`` takes after its key.
    If a kernel that has never compiled here fails to, remember why, warn once, and return None (nothing ran, so
    the caller's tl kernel computes the call, and every later one)."""
    global _unsupported
    try:
        launcher(grid, args, constexprs, **options)
    except Exception as err:  # noqa: BLE001 - a Triton whose Gluon API differs from 3.6's, for which this was written
        if launcher._compiled:  # it has compiled and run before: a real error
            raise
        _unsupported = f"{type(err).__name__}: {err}"
        warnings.warn(f"moetron: the Gluon grouped GEMM does not compile with Triton {triton.__version__}; using "
                      f"the tl kernels ({_unsupported.splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)
        return None
    return launcher, grid, args, constexprs, options


def launch(x, w, groups, out, trans_w: bool, programs: int):
    """out = gmm(x, w) through ``_gmm_ws_kernel`` (``eligible`` was checked); returns the launch (see
    ``_first_launch_or_none``) so the caller can keep a launch plan, or None (nothing launched) if the kernel does
    not compile with this Triton."""
    M, K = x.shape
    N = out.shape[1]
    G = groups.num_groups
    args = (x, w, out, groups.sizes, M, N, K, G, programs, x.stride(0), out.stride(0))
    # 3 stages: 3 x (16 + 32) KB of operands + 2 x 32 KB of store staging = 208 KB of the SM's 227
    constexprs = dict(TRANS_W=trans_w, SIZES_ARE_ENDS=groups.are_ends, ZERO_TAIL=groups.zero_tail,
                      BLOCK_G=max(32, 1 << G.bit_length()), NUM_STAGES=3)
    return _first_launch_or_none(_launch_ws, (programs,), args, constexprs, dict(num_warps=4))


GATED_STAGES = 3  # 3 x 48 KB of operands + 2 x 32 KB of h's staging


def launch_gated(x, w, scale, groups, a, h, programs: int):
    """a (and h, when given) through ``_gmm_gated_ws_kernel`` (``gated_eligible`` was checked); returns the launcher
    and its arguments (tensors x, w, scale, a, h, sizes: the order of ``gmm_gated``'s own tensor list), or None as
    ``launch`` does."""
    M, K = x.shape
    F_ = w.shape[1] // 2
    G = groups.num_groups
    args = (x, w, scale if scale is not None else a, a, h if h is not None else a, groups.sizes, M, F_, K, G,
            programs, x.stride(0), a.stride(0), (h if h is not None else a).stride(0))
    constexprs = dict(HAS_SCALE=scale is not None, STORE_H=h is not None, SIZES_ARE_ENDS=groups.are_ends,
                      ZERO_TAIL=groups.zero_tail, BLOCK_G=max(32, 1 << G.bit_length()), NUM_STAGES=GATED_STAGES)
    return _first_launch_or_none(_launch_gated_ws, (programs,), args, constexprs, dict(num_warps=4))


K_STAGES = 6  # 6 x 24 KB of operands + 2 x 32 KB of store staging
# k-tiles per band of the tile order (gmm.py's tl kernel takes 8): with gradients accumulating, Qwen3-30B's up
# projection ran 938-990 us against 973-1044 with 8, level elsewhere (session 25, H100)
K_GROUP_K = 4


def launch_k(a, b, groups, out, accumulate: bool, max_programs: int):
    """out (+)= the k-grouped GEMM of a and b through ``_gmm_k_ws_kernel`` (``k_eligible`` was checked); returns
    the launch (its tensors a, b, out, sizes: ``_launch_gmm_k``'s order), or None, as ``launch`` does.
    ``max_programs``: at most one per SM; no more are launched than there are output tiles."""
    M, KA = a.shape
    NB = b.shape[1]
    G = groups.num_groups
    programs = max(1, min(max_programs, G * (KA // TILE_KA.value) * triton.cdiv(NB, BLOCK_N.value)))
    args = (a, b, out, groups.sizes, M, KA, NB, G, programs, a.stride(0), b.stride(0))
    constexprs = dict(ACCUMULATE=accumulate, SIZES_ARE_ENDS=groups.are_ends, BLOCK_G=max(32, 1 << G.bit_length()),
                      GROUP_K=K_GROUP_K, NUM_STAGES=K_STAGES)
    return _first_launch_or_none(_launch_k_ws, (programs,), args, constexprs, dict(num_warps=4))
