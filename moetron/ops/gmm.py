"""Grouped GEMM: m-grouped ``gmm`` (forward and dgrad) and k-grouped ``gmm_k`` (wgrad).

Legend: M rows of x (routed rows), K reduction dim, N output columns, G groups (experts).

    gmm(x [M, K], w [G, K, N], sizes [G]) -> out [M, N]      out[rows of g] = x[rows of g] @ w[g]
    gmm_k(a [M, Ka], b [M, Nb], sizes [G]) -> out [G, Ka, Nb]  out[g] = a[rows of g]^T @ b[rows of g]

Rows are grouped contiguously: group g owns rows [end[g-1], end[g]). Group sizes stay on the device: each op
is one persistent Triton kernel whose programs first build the tile schedule (row ranges and cumulative
m-tile counts) in registers from the raw sizes, then loop over the tiles, each finding its group with one
compare per schedule entry across lanes. Nothing reads the sizes on the host, so every launch here can be
captured in a CUDA graph.

Layout of this file: tuning constants, Triton kernels, launchers, autograd, public functions, references.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import _env
from ._triton_utils import cdiv, interpreter_bf16_fixups, next_power_of_2, num_sms, to_output_dtype
from ._launch import CachedLauncher, LaunchPlans, per_launch_scratch
from . import _gluon_gmm
from .gated_act import _gate_and_slope
from .._checks import (FLOAT_DTYPES, check_out, check_row_major, check_same_device, check_same_dtype, check_shape,
                       check_consumable, check_single_backward, check_tensor, check_weight_dtype)
from .._compile import compiling, eager_function, or_empty

# ---------------------------------------------------------------------------------------------------------
# Tuning constants
# ---------------------------------------------------------------------------------------------------------


# Tiles the CPU interpreter uses: 16 is the smallest tl.dot takes, so tiny test shapes still span many tiles
# and exercise the tile schedule, group edges and K tails.
_INTERPRETER_CONFIG = dict(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=1, num_stages=1)

# Benchmarks and tuning scripts may pin a config here ({"fwd": {...}, "wgrad": {...}}); empty in normal use.
_CONFIG_OVERRIDES: dict = {}

# Consecutive m-tiles that share one sweep over N before moving on (the L2 swizzle of Triton's matmul
# tutorial): a band of GROUP_M row tiles re-reads the same w[g] column panels while they are hot in L2.
_GROUP_M = 8

# fp32 through the pointer kernel: exact fp32 (SIMT units), and TF32 where the TMA kernel and its swapped form
# cannot run (before Hopper, or operands TMA cannot describe)
_FP32_POINTER_CONFIG = dict(BM=128, BN=64, BK=32, GROUP_M=_GROUP_M, num_warps=4, num_stages=3)

# Per-group K x N at and above which the weight (or weight gradient) of one group counts as large: the
# Mixtral and DeepSeek-V3 EP8 anchor cases (15M-117M elements), not the fine-grained Qwen3 ones (1.5-3M).
_LARGE_OUTPUT = 1 << 23

# At most this many rows per group on average (M <= _FEW_ROWS_PER_GROUP * G: decode and small batches), the
# 16-bit m-grouped GEMMs take 64-row tiles (see _gmm_config, _gmm_gated_config) and the weight gradient of large
# outputs a write-bound config (_gmm_k_config): there every tile holds a handful of real rows, and the GEMM streams
# the active experts' weights (or writes their gradients), so what counts is how many bytes are in flight, not
# the MMA shape. This is a regime switch, not a tuning per batch size: each (G, N, K, dtype) compiles at most two
# kernels per op, and both give bit-identical results (same reduction order). Session 19 H100 sweep
# (benchmarks/NOTES.md, us per call, 128-row default -> 64-row tiles): Mixtral down projection at T=1 / 16 / 256
# tokens 189 / 340 / 342 -> 125 / 324 / 335 and at T=1024 (128 rows per expert) 564 -> 621, so the bound sits
# below that; Qwen3-30B down at T=1 / 16 / 256 17 / 109 / 159 -> 12 / 98 / 148.
_FEW_ROWS_PER_GROUP = 32
# The decode tiles of the m-grouped kernel (GROUP_M added per weight size), and their narrow form (_gmm_config)
_DECODE_TILES = dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=4, flatten=True)
_DECODE_NARROW_TILES = dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=6, flatten=True)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _few_rows(num_rows: int, num_groups: int) -> bool:
    """Whether an m-grouped GEMM of num_rows rows over num_groups groups takes the few-rows tiles (see
    _FEW_ROWS_PER_GROUP)."""
    return num_rows <= _FEW_ROWS_PER_GROUP * num_groups


def _gmm_config(dtype: torch.dtype, n: int, k: int, on_cpu: bool, trans_w: bool = False,
                few_rows: bool = False, few_tiles: bool = False) -> dict:
    """Tile config for the m-grouped kernel, keyed on (dtype, N, K, layout) and never on M itself, so a new
    batch size reuses a compiled kernel; ``few_rows`` (see _few_rows) picks the 16-bit decode tiles, and
    ``few_tiles`` (those tiles would leave SMs idle) their narrow form."""
    tf32 = dtype == torch.float32 and _input_precision(dtype) == "tf32"
    if on_cpu:  # the interpreter runs the swapped form too (tests)
        return dict(_INTERPRETER_CONFIG, swap_ab=tf32 and not trans_w)
    large_weight = k * n >= _LARGE_OUTPUT
    if few_rows and dtype != torch.float32:
        # 64x128 tiles reducing 128 columns a step over 4 stages led the session-19 sweep from 1 to 64 rows per
        # expert on both layouts (Mixtral and Qwen3-30B projections). Where they cannot fill the SMs and each
        # streams a long weight panel (Mixtral's down projection at one token: two experts, 64 tiles), 64x64
        # tiles over 6 stages keep more bytes in flight: 93 against 125 us there (on Qwen3-30B's short panels
        # they lost, 15 against 12 us).
        if few_tiles and large_weight:
            return dict(_DECODE_NARROW_TILES, GROUP_M=16)
        return dict(_DECODE_TILES, GROUP_M=16 if large_weight else _GROUP_M)
    if dtype == torch.float32:
        # fp32 on TF32 with a [G, N, K] weight runs Hopper's TF32 MMA: 128x256x32 tiles led the H100 sweep on
        # every anchor case (240-350 TFLOP/s, 128x64x32 127-156). A [G, K, N] weight is not an operand that MMA
        # reads from shared memory (N, not K, is contiguous): it runs as out^T = w^T x^T (SWAP_AB). Session 14
        # H100 sweep (TFLOP/s): 199-276 on the anchor cases against 83-271 for the [G, N, K] copy of w it
        # replaces, with 128 rows x 256 columns per tile; 256-row tiles gave wrong results under Triton 3.6.
        # Exact fp32 (TF32 off) runs on the SIMT units, where the small tile is kept.
        if tf32 and trans_w:
            return dict(BM=128, BN=256, BK=32, GROUP_M=_GROUP_M, num_warps=8, num_stages=3)
        if tf32:
            return dict(BM=128, BN=256, BK=32, GROUP_M=16 if k * n >= _LARGE_OUTPUT else _GROUP_M, num_warps=8,
                        num_stages=3, swap_ab=True)
        return dict(_FP32_POINTER_CONFIG)
    # H100 sweeps (benchmarks/NOTES.md): 128x256x64 with 8 warps led or tied on 8 of 10 anchor cases; 128x128
    # tiles lost 5-15% everywhere. A flattened persistent loop (the next tile's loads overlap this tile's
    # epilogue) plus TMA stores of interior tiles gained 3-35% on the large [G, K, N] cases (mixtral_up 518 ->
    # 706 TFLOP/s); the TMA store's 64 KB staging buffer leaves room for 3 stages. For [G, N, K] weights
    # (dgrad) the flattened loop with 4 stages and plain stores was as good or better, except with large
    # per-group weights (K*N >= 8M: Mixtral, DeepSeek-V3 EP8), where the TMA-store epilogue won there too.
    # Large per-group weights also want bands of 16 m-tiles, not 8: each w[g] column panel (K x 256) is then
    # fetched from memory half as often (two H100 sweeps: mixtral_up fwd 562-582 -> 683-684 TFLOP/s, dgrad
    # 590-615 -> 686-697; the small-weight cases did not move or lost a little).
    # Narrow [G, K, N] outputs (256 <= N < 1024: the Qwen3-30B down projection's dgrad, N=768) also take 4 stages
    # and plain stores (benchmarks/NOTES.md, session 17, H100: 394.7 -> 369.6 us at T=8192, level at T=32768;
    # session 15 saw the same); at N=1024 and wider the two were level or split by shape: those keep the TMA store.
    if n >= 256:
        if (trans_w or n < 1024) and not large_weight:
            return dict(BM=128, BN=256, BK=64, GROUP_M=_GROUP_M, num_warps=8, num_stages=4, flatten=True)
        return dict(BM=128, BN=256, BK=64, GROUP_M=16 if large_weight else _GROUP_M, num_warps=8, num_stages=3,
                    flatten=True, tma_store=True)
    return dict(BM=128, BN=128, BK=64, GROUP_M=_GROUP_M, num_warps=4, num_stages=4)


def _gmm_k_config(dtype: torch.dtype, ka: int, nb: int, on_cpu: bool, few_rows: bool = False) -> dict:
    """Tile config for the k-grouped kernel: BK x BN output tile per program, BM rows reduced per step;
    ``few_rows`` (see _few_rows) picks the decode tiles of large outputs."""
    if on_cpu:
        return dict(BK=16, BN=16, BM=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BK=64, BN=64, BM=32, num_warps=4, num_stages=3)
    # H100 sweep (benchmarks/NOTES.md): with large per-group outputs (Mixtral, DeepSeek-V3 EP8: K*N >= 8M)
    # 128x256 tiles win by 10-55% (mixtral_up 663 vs 420 TFLOP/s); with small ones (Qwen3 128 experts, the
    # blog shapes) 128x128 tiles reducing 32 rows a step over 5 stages win by ~5-20%, and running them as a
    # persistent flattened loop with 2 programs per SM (one program's epilogue overlaps the other's and its own
    # next loads) gained another 0-10% (qwen3_30b_up 390 -> 433, blog_g32 433 -> 470 TFLOP/s).
    # Large outputs: the 128x256 tiles as a persistent flattened loop (one program per SM) beat the
    # one-program-per-tile launch by 0-8% (mixtral_up 633 -> 684, dsv3_ep8_up 508 -> 541 TFLOP/s). Prefetching
    # each group's last partial row chunk, with plain stores, then beat the TMA-store epilogue everywhere (session
    # 13, H100, us: Mixtral wgrad at T=16 1198 -> 993, T=2048 2574 -> 2244, T=8192 6557 -> 6452, the gmm.py
    # mixtral_up case 6527 -> 5751): with few rows per group a tile is one masked chunk, and a TMA load of it
    # after the loop exposed its whole latency; the prefetch and a TMA store's staging tile do not fit together.
    if ka * nb >= _LARGE_OUTPUT:
        if few_rows:
            # With a few rows per group the tile is one prefetched chunk and the kernel is bound by writing the
            # gradient: 32-row chunks over 2 stages leave room for a TMA store, which hands each 64 KB tile to the
            # copy engine (session-19 H100 sweep, Mixtral up / down, us per call: T=1 726 / 346 -> 640 / 306,
            # T=16 1021 / 433 -> 659 / 314, T=128 1149 / 456 -> 899 / 356; session 13 saw this config lose
            # 5-9% at thousands of rows per group)
            return dict(BK=128, BN=256, BM=32, num_warps=8, num_stages=2, persistent=True, flatten=True,
                        prefetch_tail=True, tma_store=True)
        return dict(BK=128, BN=256, BM=64, num_warps=8, num_stages=3, persistent=True, flatten=True,
                    prefetch_tail=True)
    # Small outputs also prefetch each group's last partial row chunk (session 11, scratch H100 sweep, TFLOP/s):
    # Qwen3-30B-shaped groups of random sizes 414-445 -> 433-462, balanced top-8 routing 430-462 -> 423-482,
    # blog_g128 236-241 -> 254-255; groups that are multiples of 32 rows lost 0-5% (nothing to prefetch).
    # They store 16-bit tiles through TMA (session 15, two H100 sweeps, TFLOP/s: the Qwen3 layer's up / down
    # wgrad 444 -> 474 / 433 -> 468, qwen3_30b_up 440 -> 464, blog_g128 246 -> 259, blog_g8 509 -> 501): a
    # program hands its tile to the copy engine instead of storing it from registers, which the other program
    # on the SM overlaps better. fp32 outputs (main_grad) keep plain stores (see _launch_gmm_k).
    return dict(BK=128, BN=128, BM=32, num_warps=4, num_stages=4, persistent=True, flatten=True, programs_per_sm=2,
                prefetch_tail=True, tma_store=True)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own TF32 switch, so a user comparing against torch.matmul gets the same
    # arithmetic; fp16/bf16 ignore it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _group_schedule(sizes_ptr, M, G, SIZES_ARE_ENDS: tl.constexpr, ZERO_TAIL: tl.constexpr, BM: tl.constexpr,
                    BLOCK_G: tl.constexpr):
    """Every program builds the tile schedule in registers from the raw sizes (a [G] load and two prefix
    sums), so gmm is a single launch. Sizes are clamped into [0, M]: invalid sizes can never drive a kernel
    out of bounds (debug mode rejects them on the host instead). Entry G is the tail [end of the last group,
    M): rows no group owns, written as zeros with ZERO_TAIL, else not scheduled at all (left unwritten).
    Returns per-entry row starts, row ends, first m-tile and tile counts (entries past G are empty)."""
    idx = tl.arange(0, BLOCK_G)
    raw = tl.load(sizes_ptr + idx, mask=idx < G, other=0).to(tl.int64)
    if SIZES_ARE_ENDS:
        raw -= tl.load(sizes_ptr + idx - 1, mask=(idx > 0) & (idx < G), other=0).to(tl.int64)
    counts = tl.maximum(raw, 0)
    inclusive = tl.cumsum(counts, 0)
    starts = tl.minimum(inclusive - counts, M).to(tl.int32)
    ends = tl.where(idx == G, M, tl.minimum(inclusive, M)).to(tl.int32)
    if ZERO_TAIL:
        tiles = tl.where(idx <= G, (ends - starts + BM - 1) // BM, 0)
    else:
        tiles = tl.where(idx < G, (ends - starts + BM - 1) // BM, 0)
    first_tiles = tl.cumsum(tiles, 0) - tiles
    return starts, ends, first_tiles, tiles


@triton.jit
def _group_rows(sizes_ptr, g, M, G, SIZES_ARE_ENDS: tl.constexpr, BLOCK_G: tl.constexpr):
    """[start, end) rows of group g, clamped into [0, M] (never out of bounds; valid sizes give the exact range).
    The k-grouped kernel runs one short-lived program per output tile, so this stays cheap: two scalar loads
    for cumulative ends, one masked sum for counts, instead of the full schedule's two prefix sums."""
    if SIZES_ARE_ENDS:
        start = tl.load(sizes_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
        end = tl.load(sizes_ptr + g).to(tl.int64)
    else:
        idx = tl.arange(0, BLOCK_G)
        counts = tl.maximum(tl.load(sizes_ptr + idx, mask=idx <= g, other=0).to(tl.int64), 0)
        end = tl.sum(counts)
        start = end - tl.sum(tl.where(idx == g, counts, 0))
    start = tl.minimum(tl.maximum(start, 0), M)
    end = tl.minimum(tl.maximum(end, start), M)
    return start.to(tl.int32), end.to(tl.int32)


@triton.jit
def _tile_coords(tile, total_m_tiles, num_n, starts, ends, first_tiles, tiles,
                 BM: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Persistent tile index -> (group g, first row of the tile, group end row, n-tile). Tiles run in bands of
    GROUP_M m-tiles that sweep N together (L2 reuse of w[g]). The group is found by one compare per schedule
    entry across the program's lanes (depth O(1), not a loop over groups) and three masked reductions."""
    tiles_per_band = GROUP_M * num_n
    band = tile // tiles_per_band
    first_m = band * GROUP_M
    band_rows = tl.minimum(total_m_tiles - first_m, GROUP_M)
    in_band = tile % tiles_per_band
    m_tile = first_m + in_band % band_rows
    n_tile = in_band // band_rows
    g = tl.sum(((first_tiles + tiles) <= m_tile).to(tl.int32))
    sel = tl.arange(0, BLOCK_G) == g
    row0 = tl.sum(tl.where(sel, starts + (m_tile - first_tiles) * BM, 0))
    row_end = tl.sum(tl.where(sel, ends, 0))
    return g, row0, row_end, n_tile


@triton.jit
def _gather_rows(gather_ptr, rows, row_ok, num_src_rows, gather_div):
    """Source rows of a gathered operand: row i reads row gather[i] // gather_div of a [num_src_rows, ...] tensor
    (gather_div K: gather holds routed slots t·K+k, as permute's src_slot does, and the row is the slot's token
    t). A negative index (a padding row) or rows outside the caller's mask read nothing; indices past the source
    are clamped so a corrupt index can never read out of bounds. Returns (int64 source rows, the mask of rows to
    load)."""
    src = tl.load(gather_ptr + rows, mask=row_ok, other=-1)
    ok = row_ok & (src >= 0)
    return tl.minimum(tl.maximum(src, 0) // gather_div, num_src_rows - 1).to(tl.int64), ok


@triton.jit
def _x_tile_setup(x_ptr, gather_ptr, row0, row_end, num_src_rows, gather_div, stride_xm, GATHER: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr):
    """With GATHER, the pointers to the k=0 chunk of a tile's gathered x rows and the mask of rows that load
    (rows past row_end and padding rows read zeros); without, placeholders (the tile loads through TMA)."""
    if GATHER:
        rows = row0 + tl.arange(0, BM)
        src_rows, src_ok = _gather_rows(gather_ptr, rows, rows < row_end, num_src_rows, gather_div)
        x_ptrs = x_ptr + src_rows[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    else:
        x_ptrs = x_ptr
        src_ok = tl.full([BM], 1, tl.int1)
    return x_ptrs, src_ok


@triton.jit
def _x_tile(x_desc, x_ptrs, src_ok, row0, k0, K, GATHER: tl.constexpr, BK: tl.constexpr):
    """The [BM, BK] chunk of x at k0 of the tile starting at row0: by TMA, or gathered (see _x_tile_setup)."""
    if GATHER:
        return tl.load(x_ptrs + k0, mask=src_ok[:, None] & ((k0 + tl.arange(0, BK)) < K)[None, :], other=0.0)
    return x_desc.load([row0, k0])


@triton.jit
def _gmm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, sizes_ptr, gather_ptr,
    M, N, K, G, num_programs, num_src_rows, gather_div,
    stride_xm, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_bg, stride_bn,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Persistent m-grouped GEMM. Tile t covers BM rows of one group and BN columns; rows outside the group
    are loaded (or masked) but never stored, so each group boundary costs at most one partial tile.
    GATHER: row i of the GEMM reads x[gather[i] // gather_div] (see _gather_rows)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    starts, ends, first_tiles, tiles = _group_schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BM, BLOCK_G)
    total_m_tiles = tl.sum(tiles)
    total_tiles = total_m_tiles * num_n
    for tile in range(pid, total_tiles, num_programs):
        g, row0, row_end, n_tile = _tile_coords(tile, total_m_tiles, num_n, starts, ends, first_tiles, tiles,
                                                BM, GROUP_M, BLOCK_G)
        rows = row0 + tl.arange(0, BM)
        cols = n_tile * BN + tl.arange(0, BN)
        row_ok = rows < row_end
        col_ok = cols < N
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if g < G:  # the tail group G has no weight: its rows stay zero
            ks = tl.arange(0, BK)
            load_ok = row_ok
            if GATHER:  # padding rows (index -1) load zeros but are still stored (as zeros)
                src_rows, load_ok = _gather_rows(gather_ptr, rows, row_ok, num_src_rows, gather_div)
            else:
                src_rows = rows64
            x_ptrs = x_ptr + src_rows[:, None] * stride_xm + ks[None, :] * stride_xk
            w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn
            for k0 in range(0, K, BK):
                k_ok = (k0 + ks) < K
                a = tl.load(x_ptrs, mask=load_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if BF16_FIXUPS:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BK * stride_xk
                w_ptrs += BK * stride_wk
            if HAS_BIAS:
                bias = tl.load(bias_ptr + g * stride_bg + cols * stride_bn, mask=col_ok, other=0.0)
                acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, to_output_dtype(acc, out_ptr, BF16_FIXUPS), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gmm_tma_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, sizes_ptr, gather_ptr,
    M, N, K, G, num_programs, num_src_rows, gather_div,
    stride_xm, stride_wg, stride_w1,
    stride_bg, stride_bn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    TRANS_W: tl.constexpr,
    SWAP_AB: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    FLATTEN: tl.constexpr,
    TMA_STORE: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """_gmm_kernel with Hopper TMA loads: one descriptor over all rows of x (a tile may read rows of the next
    group, which are computed but never stored; rows past M and the K tail arrive as zeros) and a 3-D
    descriptor over w, so a K tail never reads the next group's weight. Tiles that lie wholly inside their
    group can be stored through a TMA descriptor too (TMA_STORE); tiles that cross a group's end always take
    a masked store, since the next group's rows belong to another program. The loop body has no branch on
    the group (the tail entry G simply runs zero k-steps), so FLATTEN can overlap one tile's epilogue with
    the next tile's loads; WARP_SPECIALIZE puts the loads and the MMAs in separate warp groups.

    The descriptors are built here on the device rather than passed from the host: a host descriptor costs
    ~40 us of Python per launch (benchmarks/NOTES.md), more than a small grouped GEMM takes on the GPU.

    GATHER: row i reads x[gather[i] // gather_div] (the permute folded into the GEMM). Hopper's TMA has no row
    gather, so x then takes pointer loads (pipelined as async copies) while w keeps its descriptor: at the
    Qwen3-30B forward shape that ran within 0-10% of the TMA load of a permuted copy (benchmarks/NOTES.md).

    SWAP_AB (fp32 on TF32 with a [G, K, N] weight): Hopper's TF32 MMA reads a shared-memory operand only with
    its reduction dim contiguous, which x is and a [K, N] w tile is not. Computed as the transposed tile
    out^T = w^T x^T instead, x^T is such an operand, and w^T goes in as the MMA's register operand, whose
    layout is free; the [BN, BM] result is stored transposed."""
    # over the source rows (M without GATHER); a gathering kernel builds but never loads through it
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[num_src_rows, K], strides=[stride_xm, 1],
                                       block_shape=[BM, BK])
    if TRANS_W:  # w is [G, N, K]
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[G, N, K], strides=[stride_wg, stride_w1, 1],
                                           block_shape=[1, BN, BK])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[G, K, N], strides=[stride_wg, stride_w1, 1],
                                           block_shape=[1, BK, BN])
    if TMA_STORE:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                             block_shape=[BM, BN])
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    starts, ends, first_tiles, tiles = _group_schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BM, BLOCK_G)
    total_m_tiles = tl.sum(tiles)
    total_tiles = total_m_tiles * num_n
    for tile in tl.range(pid, total_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        g, row0, row_end, n_tile = _tile_coords(tile, total_m_tiles, num_n, starts, ends, first_tiles, tiles,
                                                BM, GROUP_M, BLOCK_G)
        k_end = tl.where(g < G, K, 0)  # the tail entry has no weight: its rows stay zero
        if SWAP_AB:
            acc = tl.zeros((BN, BM), dtype=tl.float32)  # out^T
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        x_ptrs, src_ok = _x_tile_setup(x_ptr, gather_ptr, row0, row_end, num_src_rows, gather_div, stride_xm,
                                       GATHER, BM, BK)
        for k0 in range(0, k_end, BK):
            a = _x_tile(x_desc, x_ptrs, src_ok, row0, k0, K, GATHER, BK)
            if TRANS_W:
                b = tl.trans(w_desc.load([g, n_tile * BN, k0]).reshape(BN, BK))
            else:
                b = w_desc.load([g, k0, n_tile * BN]).reshape(BK, BN)
            if BF16_FIXUPS:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if SWAP_AB:
                # "+ 0.0" (exact, NaN-preserving) makes w^T a computed value, which the MMA takes from registers;
                # a bare transpose would be copied into a K-major shared buffer and the MMAs serialised
                acc = tl.dot(tl.trans(b) + 0.0, tl.trans(a), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        rows = row0 + tl.arange(0, BM)
        cols = n_tile * BN + tl.arange(0, BN)
        col_ok = cols < N
        if HAS_BIAS:
            # the tail entry G reads group G-1's bias (in bounds) and drops it
            bias = tl.load(bias_ptr + tl.minimum(g, G - 1) * stride_bg + cols * stride_bn, mask=col_ok, other=0.0)
            bias = tl.where(g < G, bias.to(tl.float32), 0.0)
            if SWAP_AB:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        result = to_output_dtype(acc, out_ptr, BF16_FIXUPS)
        if SWAP_AB:  # [BN, BM]: each warp still writes whole 32-byte runs of an output row
            out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
            tl.store(out_ptrs, result, mask=col_ok[:, None] & (rows < row_end)[None, :])
        elif TMA_STORE and row0 + BM <= row_end:
            out_desc.store([row0, n_tile * BN], result)
        else:
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
            tl.store(out_ptrs, result, mask=(rows < row_end)[:, None] & col_ok[None, :])


@triton.jit
def _gmm_gated_tma_kernel(
    x_ptr, w_ptr, scale_ptr, a_ptr, h_ptr, sizes_ptr, gather_ptr,
    M, F_, K, G, num_programs, num_src_rows, gather_div,
    stride_xm, stride_wg, stride_w1, stride_am, stride_hm,
    GELU: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SCALE_BY_SLOT: tl.constexpr,
    GATHER: tl.constexpr,
    STORE_H: tl.constexpr,
    A_TMA_STORE: tl.constexpr,
    FLATTEN: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The first expert GEMM with its gated activation in the epilogue: for w [G, 2F, K] (gate rows [0, F), up
    rows [F, 2F), the trans_w layout) a tile owns BN columns of a [M, F] and accumulates the matching gate and up
    columns of h side by side in one [BM, 2·BN] accumulator: w is read as [G, 2, F, K], so one TMA box brings
    both BN-row panels and the loop runs one MMA per k-step, like the plain forward's 128x256 tile (two MMAs per
    step ran 5-25% slower, benchmarks/NOTES.md, session 18). The epilogue stores a = act(gate)·up (·scale per
    row); the activation sees gate and up rounded to x's dtype first, so a is bit for bit what gmm followed by
    gated_act gives. STORE_H (training) also stores h [M, 2F] for the backward (pointer stores). A_TMA_STORE
    stores the tiles of a that lie wholly inside their group through TMA (masked stores at group edges). Without
    STORE_H h never goes to memory (inference: the separate activation kernel would read it back and write a).
    Schedule, group edges, the zero tail and GATHER as in _gmm_tma_kernel. SCALE_BY_SLOT (with GATHER): row r's
    scale is scale[gather[r]], the routing weight of the slot the row holds, so no permuted copy of the weights is
    needed either."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[num_src_rows, K], strides=[stride_xm, 1],
                                       block_shape=[BM, BK])
    # gate columns past F read zeros (the box is bounded per dimension) and are never stored
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[G, 2, F_, K], strides=[stride_wg, F_ * stride_w1, stride_w1, 1],
                                       block_shape=[1, 2, BN, BK])
    if A_TMA_STORE:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, F_], strides=[stride_am, 1], block_shape=[BM, BN])
    pid = tl.program_id(0)
    num_n = tl.cdiv(F_, BN)
    starts, ends, first_tiles, tiles = _group_schedule(sizes_ptr, M, G, SIZES_ARE_ENDS, ZERO_TAIL, BM, BLOCK_G)
    total_m_tiles = tl.sum(tiles)
    total_tiles = total_m_tiles * num_n
    for tile in tl.range(pid, total_tiles, num_programs, flatten=FLATTEN):
        g, row0, row_end, n_tile = _tile_coords(tile, total_m_tiles, num_n, starts, ends, first_tiles, tiles,
                                                BM, GROUP_M, BLOCK_G)
        k_end = tl.where(g < G, K, 0)  # the tail entry has no weight: its rows stay zero
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        x_ptrs, src_ok = _x_tile_setup(x_ptr, gather_ptr, row0, row_end, num_src_rows, gather_div, stride_xm,
                                       GATHER, BM, BK)
        for k0 in range(0, k_end, BK):
            a = _x_tile(x_desc, x_ptrs, src_ok, row0, k0, K, GATHER, BK)
            b = tl.trans(w_desc.load([g, 0, n_tile * BN, k0]).reshape(2 * BN, BK))
            if BF16_FIXUPS:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        rows = row0 + tl.arange(0, BM)
        cols = n_tile * BN + tl.arange(0, BN)
        row_ok = rows < row_end
        ok = row_ok[:, None] & (cols < F_)[None, :]
        rows64 = rows.to(tl.int64)
        interior = row0 + BM <= row_end
        h_tile = to_output_dtype(acc, a_ptr, BF16_FIXUPS).reshape(BM, 2, BN)  # a has x's dtype: h's rounding
        gate, up = tl.split(tl.permute(h_tile, 0, 2, 1))
        if STORE_H:
            h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
            tl.store(h_ptrs, gate, mask=ok)
            tl.store(h_ptrs + F_, up, mask=ok)
        act, _ = _gate_and_slope(gate.to(tl.float32), GELU)
        out = act * up.to(tl.float32)
        if HAS_SCALE:
            if SCALE_BY_SLOT:  # the row's slot, read as a gathered row of the [T·K] scales: padding rows get 0
                slot, slot_ok = _gather_rows(gather_ptr, rows, row_ok, num_src_rows * gather_div, 1)
                scale = tl.load(scale_ptr + slot, mask=slot_ok, other=0.0)
            else:
                scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
            out = out * scale.to(tl.float32)[:, None]
        out = to_output_dtype(out, a_ptr, BF16_FIXUPS)
        if A_TMA_STORE and interior:
            a_desc.store([row0, n_tile * BN], out)
        else:
            tl.store(a_ptr + rows64[:, None] * stride_am + cols[None, :], out, mask=ok)


@triton.jit
def _wgrad_tile(pid, KA, NB, BK: tl.constexpr, BN: tl.constexpr, GROUP_K: tl.constexpr):
    """Program -> (group, k-tile, n-tile) of the k-grouped output. Within a group, bands of GROUP_K k-tiles
    sweep N together, so the programs in flight share a few panels of both operands in L2; a plain n-fastest
    order re-read each dy panel from memory once per k-tile (Mixtral up: 32 passes over a 1.8 GB dy)."""
    num_k = tl.cdiv(KA, BK)
    num_n = tl.cdiv(NB, BN)
    g = pid // (num_k * num_n)
    t = pid % (num_k * num_n)
    per_band = GROUP_K * num_n
    first_k = t // per_band * GROUP_K
    band_k = tl.minimum(num_k - first_k, GROUP_K)
    k_tile = first_k + (t % per_band) % band_k
    n_tile = (t % per_band) // band_k
    return g, k_tile, n_tile


@triton.jit
def _gmm_k_tma_kernel(
    a_ptr, b_ptr, out_ptr, sizes_ptr,
    M, KA, NB, G,
    stride_am, stride_bm,
    stride_og, stride_ok, stride_on,
    ACCUMULATE: tl.constexpr,
    TMA_STORE: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GROUP_K: tl.constexpr,
):
    """_gmm_k_kernel with TMA loads (and optionally a TMA store of the output tile). The descriptors are built
    on the device (see _gmm_tma_kernel) with the group's end as their row count, so the copy engine zero-fills
    the rows of the next group in the last row chunk: the reduction runs as one clean pipelined loop with no
    masking (the next group's rows must not contribute, and 0 * inf there would be NaN)."""
    g, k_tile, n_tile = _wgrad_tile(tl.program_id(0), KA, NB, BK, BN, GROUP_K)
    row_start, row_end = _group_rows(sizes_ptr, g, M, G, SIZES_ARE_ENDS, BLOCK_G)
    rows_visible = tl.maximum(row_end, 1)  # a descriptor needs a positive extent; an empty group loads nothing
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[rows_visible, KA], strides=[stride_am, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[rows_visible, NB], strides=[stride_bm, 1], block_shape=[BM, BN])
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for r0 in range(row_start, row_end, BM):
        a = a_desc.load([r0, k_tile * BK])
        b = b_desc.load([r0, n_tile * BN])
        if BF16_FIXUPS:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    _wgrad_store(acc, out_ptr, g, k_tile, n_tile, G, KA, NB, stride_og, stride_ok, stride_on, ACCUMULATE, TMA_STORE,
                 BF16_FIXUPS, BK, BN)


@triton.jit
def _wgrad_store(acc, out_ptr, g, k_tile, n_tile, G, KA, NB, stride_og, stride_ok, stride_on,
                 ACCUMULATE: tl.constexpr, TMA_STORE: tl.constexpr, BF16_FIXUPS: tl.constexpr,
                 BK: tl.constexpr, BN: tl.constexpr):
    """Write (or add into) the [BK, BN] tile of out[g]."""
    if TMA_STORE:  # out is [G, KA, NB] with a unit last stride
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[G, KA, NB], strides=[stride_og, stride_ok, 1],
                                             block_shape=[1, BK, BN])
        if ACCUMULATE:
            acc += out_desc.load([g, k_tile * BK, n_tile * BN]).reshape(BK, BN).to(tl.float32)
        out_desc.store([g, k_tile * BK, n_tile * BN], to_output_dtype(acc, out_ptr, BF16_FIXUPS).reshape(1, BK, BN))
    else:
        ks = k_tile * BK + tl.arange(0, BK)
        ns = n_tile * BN + tl.arange(0, BN)
        out_ptrs = out_ptr + g.to(tl.int64) * stride_og + ks[:, None] * stride_ok + ns[None, :] * stride_on
        mask = (ks < KA)[:, None] & (ns < NB)[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, to_output_dtype(acc, out_ptr, BF16_FIXUPS), mask=mask)


@triton.jit
def _gmm_k_tma_persistent_kernel(
    a_ptr, b_ptr, out_ptr, sizes_ptr,
    M, KA, NB, G, num_programs,
    stride_am, stride_bm,
    stride_og, stride_ok, stride_on,
    ACCUMULATE: tl.constexpr,
    TMA_STORE: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    PREFETCH_TAIL: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GROUP_K: tl.constexpr,
):
    """Persistent variant of _gmm_k_tma_kernel (``persistent`` in a wgrad config; the GPU default). With 128 groups
    a tile reduces only ~512 rows, so its prologue and epilogue weigh as much as its MMAs; one long-lived program
    per SM walking the tiles (FLATTEN: the next tile's loads overlap this tile's store) is the standard cure. The
    descriptors span all M rows (built once per program), so the chunk that crosses the group's end is masked on
    both operands after the loop, as 0 * inf would be NaN; PREFETCH_TAIL loads that chunk before the loop."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, KA], strides=[stride_am, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[M, NB], strides=[stride_bm, 1], block_shape=[BM, BN])
    total_tiles = G * tl.cdiv(KA, BK) * tl.cdiv(NB, BN)
    for tile in tl.range(tl.program_id(0), total_tiles, num_programs, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        g, k_tile, n_tile = _wgrad_tile(tile, KA, NB, BK, BN, GROUP_K)
        row_start, row_end = _group_rows(sizes_ptr, g, M, G, SIZES_ARE_ENDS, BLOCK_G)
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        full_end = row_start + (row_end - row_start) // BM * BM
        if PREFETCH_TAIL:
            # the last partial chunk through masked pointer loads issued before the loop, so their latency hides
            # behind it (after the loop, a TMA load would wait out its full latency once per tile); rows past
            # the group's end read as zeros, never the next group's values
            tail_rows = (full_end + tl.arange(0, BM)).to(tl.int64)
            tail_ok = tail_rows < row_end
            ks = k_tile * BK + tl.arange(0, BK)
            ns = n_tile * BN + tl.arange(0, BN)
            a_tail = tl.load(a_ptr + tail_rows[:, None] * stride_am + ks[None, :],
                             mask=tail_ok[:, None] & (ks < KA)[None, :], other=0.0)
            b_tail = tl.load(b_ptr + tail_rows[:, None] * stride_bm + ns[None, :],
                             mask=tail_ok[:, None] & (ns < NB)[None, :], other=0.0)
        for r0 in range(row_start, full_end, BM):
            a = a_desc.load([r0, k_tile * BK])
            b = b_desc.load([r0, n_tile * BN])
            if BF16_FIXUPS:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        if PREFETCH_TAIL:
            if full_end < row_end:
                if BF16_FIXUPS:
                    acc = tl.dot(tl.trans(a_tail.to(tl.float32)), b_tail.to(tl.float32), acc,
                                 input_precision=INPUT_PRECISION)
                else:
                    acc = tl.dot(tl.trans(a_tail), b_tail, acc, input_precision=INPUT_PRECISION)
        elif full_end < row_end:
            row_ok = (full_end + tl.arange(0, BM)) < row_end
            a = tl.where(row_ok[:, None], a_desc.load([full_end, k_tile * BK]), 0.0)
            b = tl.where(row_ok[:, None], b_desc.load([full_end, n_tile * BN]), 0.0)
            if BF16_FIXUPS:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        _wgrad_store(acc, out_ptr, g, k_tile, n_tile, G, KA, NB, stride_og, stride_ok, stride_on, ACCUMULATE,
                     TMA_STORE, BF16_FIXUPS, BK, BN)


@triton.jit
def _gmm_k_kernel(
    a_ptr, b_ptr, out_ptr, sizes_ptr,
    M, KA, NB, G,
    stride_am, stride_ak,
    stride_bm, stride_bn,
    stride_og, stride_ok, stride_on,
    ACCUMULATE: tl.constexpr,
    SIZES_ARE_ENDS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_FIXUPS: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GROUP_K: tl.constexpr,
):
    """k-grouped GEMM: one program owns one [BK, BN] tile of out[g] and reduces over all of group g's rows in
    a fixed order, so the result is deterministic (no split-K atomics). Empty groups store exact zeros."""
    g, k_tile, n_tile = _wgrad_tile(tl.program_id(0), KA, NB, BK, BN, GROUP_K)
    row_start, row_end = _group_rows(sizes_ptr, g, M, G, SIZES_ARE_ENDS, BLOCK_G)

    ks = k_tile * BK + tl.arange(0, BK)
    ns = n_tile * BN + tl.arange(0, BN)
    k_ok = ks < KA
    n_ok = ns < NB
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for r0 in range(row_start, row_end, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * stride_bm + ns[None, :] * stride_bn,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if BF16_FIXUPS:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + g.to(tl.int64) * stride_og + ks[:, None] * stride_ok + ns[None, :] * stride_on
    mask = k_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, to_output_dtype(acc, out_ptr, BF16_FIXUPS), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers (inputs already validated)
# ---------------------------------------------------------------------------------------------------------




class _Groups:
    """Group sizes as the kernels consume them: the caller's tensor (counts, or cumulative ends when
    ``are_ends``) on the compute device. The kernels derive the schedule from it themselves."""

    def __init__(self, sizes: torch.Tensor, are_ends: bool, num_rows: int, zero_tail: bool = True):
        self.sizes = sizes
        self.are_ends = are_ends
        self.num_rows = num_rows
        # rows past the last group: written as zeros, or (False) left as they are, in the forward and in dx
        self.zero_tail = zero_tail
        self.num_groups = sizes.numel()
        self._host_counts: list[int] | None = None

    def kernel_args(self, m_grouped: bool = True) -> dict:
        # one lane per schedule entry (G groups + the tail); the k-grouped kernels have no tail rows
        args = dict(SIZES_ARE_ENDS=self.are_ends, BLOCK_G=max(16, next_power_of_2(self.num_groups + 1)))
        if m_grouped:
            args["ZERO_TAIL"] = self.zero_tail
        return args

    def host_counts(self) -> list[int]:
        """Per-group row counts, clamped exactly as the device schedule clamps them. Syncs if the sizes live
        on the GPU; only the torch backend calls it."""
        if self._host_counts is None:
            raw = self.sizes.tolist()
            if self.are_ends:
                raw = [raw[0]] + [b - a for a, b in zip(raw, raw[1:])] if raw else []
            counts, end = [], 0
            for c in raw:
                c = min(max(int(c), 0), self.num_rows - end)
                counts.append(c)
                end += c
            self._host_counts = counts
        return self._host_counts


_launch_gmm_pointer = CachedLauncher(_gmm_kernel)
_launch_gmm_tma = CachedLauncher(_gmm_tma_kernel, device_scratch=True)
_launch_gmm_gated = CachedLauncher(_gmm_gated_tma_kernel, device_scratch=True)
_launch_gmm_k_pointer = CachedLauncher(_gmm_k_kernel)
_launch_gmm_k_tma = CachedLauncher(_gmm_k_tma_kernel, device_scratch=True)
_launch_gmm_k_tma_persistent = CachedLauncher(_gmm_k_tma_persistent_kernel, device_scratch=True)


def _tma_eligible(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need Hopper or newer (or the interpreter), a unit last stride, and 16-byte aligned
    base pointers and row strides. MOETRON_TMA=0 turns them off (benchmarks compare both paths)."""
    setting = os.environ.get("MOETRON_TMA", "auto")
    if setting == "0":
        return False
    t0 = tensors[0]
    if t0.is_cuda:
        if _capability(t0.device.index or 0)[0] < 9:
            return False
    elif setting != "1":  # the interpreter runs TMA kernels only when asked (tests do)
        return False
    for t in tensors:
        size = t.element_size()
        strides = t.stride()
        if strides[-1] != 1 or t.data_ptr() % 16 or 0 in t.shape:
            return False
        for st in strides[:-1]:
            if st <= 0 or (st * size) % 16:  # broadcast (stride 0) operands take the pointer kernel
                return False
    return True


_FWD_PLANS = LaunchPlans()
_WGRAD_PLANS = LaunchPlans()


def _plan_key(tensors, extra) -> tuple | None:
    """The LaunchPlans key of a CUDA launch on ``tensors`` (None: take the full path). Shapes, strides and
    dtypes decide every non-tensor argument and the specialization; addresses only through their 16-byte
    alignment, so misaligned operands (rare) always take the full path. The TF32 switch decides fp32 inputs'
    precision, MOETRON_TMA the kernel."""
    t0 = tensors[0]
    if not t0.is_cuda or _CONFIG_OVERRIDES:
        return None
    parts = [torch._C._cuda_getDevice(), t0.device.index, os.environ.get("MOETRON_TMA", "auto"),
             torch.backends.cuda.matmul.allow_tf32, *extra]
    for t in tensors:
        if t.data_ptr() % 16:
            return None
        parts += (t.shape, t.stride(), t.dtype)
    return tuple(parts)


def _launch_gmm(x, w, bias, groups: _Groups, out, trans_w: bool, gather=None, gather_div: int = 1):
    """out = the m-grouped GEMM of x (of x[gather // gather_div] when gather [M] is given) with w, on the GPU or
    the interpreter."""
    tensors = (x, w, bias if bias is not None else out, out, groups.sizes,
               gather if gather is not None else groups.sizes)
    plan_key = _plan_key(tensors, (trans_w, bias is None, groups.are_ends, gather is None, gather_div,
                                   groups.zero_tail))
    if plan_key is not None and _FWD_PLANS.run(plan_key, tensors):
        return out
    M, N = out.shape
    K = x.shape[1]
    G = groups.num_groups
    tma = _tma_eligible(x, w)
    few_rows = tma and _few_rows(M, G)  # the decode tiles are sized for the TMA kernel's shared memory
    # decode tiles that cannot fill the SMs: at most M // BM full m-tiles plus one partial tile per non-empty group
    # (or the tail), times the n-tiles
    bm, bn = _DECODE_TILES["BM"], _DECODE_TILES["BN"]
    few_tiles = few_rows and x.is_cuda and (M // bm + min(G + 1, M)) * cdiv(N, bn) < num_sms(x.device.index or 0)
    if not _CONFIG_OVERRIDES.get("fwd") and _gluon_gmm.eligible(x, w, out, bias is not None, gather is not None,
                                                                 few_rows):
        launched = _gluon_gmm.launch(x, w, groups, out, trans_w, num_sms(x.device.index or 0))
        if launched is not None:  # else it does not compile with this Triton: the tl kernel below
            if plan_key is not None:  # its tensor arguments are x, w, out and the sizes: entries 0, 1, 3, 4
                _FWD_PLANS.add(plan_key, *launched, pick=(0, 1, 3, 4))
            return out
    cfg = _CONFIG_OVERRIDES.get("fwd") or _gmm_config(x.dtype, N, K, on_cpu=not x.is_cuda, trans_w=trans_w,
                                                      few_rows=few_rows, few_tiles=few_tiles)
    tma = cfg.get("tma", True) and tma
    if cfg.get("swap_ab") and not tma:  # the pointer kernel (before Hopper) has no swapped form
        cfg = dict(_FP32_POINTER_CONFIG) if x.is_cuda else dict(_INTERPRETER_CONFIG)
    num_n = cdiv(N, cfg["BN"])
    max_tiles = (cdiv(M, cfg["BM"]) + G) * num_n  # each group adds at most one partial m-tile
    programs = num_sms(x.device.index or 0) * cfg.get("programs_per_sm", 1) if x.is_cuda else 4
    programs = max(1, min(programs, max_tiles))
    constexprs = dict(
        HAS_BIAS=bias is not None,
        GATHER=gather is not None,
        **groups.kernel_args(),
        INPUT_PRECISION=_input_precision(x.dtype),
        BF16_FIXUPS=interpreter_bf16_fixups(x),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
    )
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    bias_arg = bias if bias is not None else out
    bias_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    gather_arg = gather if gather is not None else groups.sizes  # never read without GATHER
    if tma:
        tma_store = cfg.get("tma_store", False) and _tma_eligible(out)
        launcher = _launch_gmm_tma
        args = (x, w, bias_arg, out, groups.sizes, gather_arg, M, N, K, G, programs, x.shape[0], gather_div,
                x.stride(0), w.stride(0), w.stride(1), *bias_strides, out.stride(0))
        constexprs.update(TRANS_W=trans_w, SWAP_AB=cfg.get("swap_ab", False),
                          WARP_SPECIALIZE=cfg.get("warp_specialize", False), FLATTEN=cfg.get("flatten", False),
                          TMA_STORE=tma_store)
    else:
        # w[g] element (k, n): [G, K, N] row-major, or [G, N, K] row-major read transposed
        stride_wk, stride_wn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
        launcher = _launch_gmm_pointer
        args = (x, w, bias_arg, out, groups.sizes, gather_arg, M, N, K, G, programs, x.shape[0], gather_div,
                x.stride(0), x.stride(1), w.stride(0), stride_wk, stride_wn, *bias_strides, out.stride(0),
                out.stride(1))
    launcher((programs,), args, constexprs, **options)
    if plan_key is not None:
        _FWD_PLANS.add(plan_key, launcher, (programs,), args, constexprs, options)
    return out


def _gmm_gated_config(on_cpu: bool, large_weight: bool, few_rows: bool = False) -> dict:
    """Config of ``_gmm_gated_tma_kernel``: BN columns of a per tile, so a [BM, 2·BN] accumulator.
    H100 sweeps (benchmarks/NOTES.md, session 18, us at T=8192, gmm + gated_act in brackets): small per-expert
    weights keep 4 stages and pointer stores (inference Qwen3 725 [776], OLMoE 855 [962]; with h stored 758,
    914); large ones (Mixtral) want the plain forward's bands of 16 m-tiles with 3 stages and TMA stores
    (inference 5412-5567 [5729-5807]). With h stored too, large weights gained in one sweep (5597-5712 with h
    TMA-stored [5751-5807]) and lost in the next (5753-5800 [5729-5776]): storing h costs ~300 us there, so
    ``gmm_gated`` leaves that case to gmm + gated_act on the GPU (the interpreter still runs it, for the tests)."""
    if on_cpu:  # the interpreter takes the large-weight epilogue too (tests patch _LARGE_OUTPUT to reach it)
        return dict(_INTERPRETER_CONFIG, flatten=False, a_tma_store=large_weight)
    if few_rows:
        # decode and small batches (see _FEW_ROWS_PER_GROUP): 64-row tiles of 64 gate and 64 up columns, 128 per
        # k-step, 4 stages; session-19 H100 sweep, us per call: Mixtral at T=1 / 16 / 256 tokens 201 / 684 / 693
        # -> 180 / 637 / 685, Qwen3-30B 36 / 203 / 306 -> 24 / 186 / 284
        return dict(BM=64, BN=64, BK=128, GROUP_M=16 if large_weight else _GROUP_M, num_warps=4, num_stages=4,
                    flatten=True, a_tma_store=False)
    if large_weight:
        return dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=3, flatten=True, a_tma_store=True)
    return dict(BM=128, BN=128, BK=64, GROUP_M=_GROUP_M, num_warps=8, num_stages=4, flatten=True, a_tma_store=False)


_GATED_PLANS = LaunchPlans()

# Benchmarks switch the fused activation off here, to time it against gmm followed by gated_act.
GATED_EPILOGUE = True


def gmm_gated(x: torch.Tensor, w: torch.Tensor, groups: _Groups, activation: str,
              row_scale: torch.Tensor | None = None, gather: torch.Tensor | None = None, gather_div: int = 1,
              scale_by_slot: bool = False, h_out: torch.Tensor | None = None):
    """The first expert GEMM and its gated activation in one kernel (``_gmm_gated_tma_kernel``), no autograd:
    ``a = act(h[:, :F]) * h[:, F:] (* row_scale)`` for ``h = gmm(x (or x[gather // gather_div]), w,
    trans_w=True)`` with ``w [G, 2F, K]``; with ``scale_by_slot`` row r's scale is ``row_scale[gather[r]]`` (0
    for a padding row). ``h_out [M, 2F]`` (contiguous, x's dtype): h is stored there too (for a backward).
    Returns ``a [M, F]``, bit for bit what ``gmm`` then ``gated_act`` give; or None where the kernel does not
    apply (not Hopper/TMA, fp32, misaligned operands), and the caller runs the two steps. M is
    ``groups.num_rows``."""
    if (not GATED_EPILOGUE or activation not in ("swiglu", "geglu") or x.dtype not in (torch.bfloat16, torch.float16)
            or not _env.use_triton(x) or x.shape[0] == 0 or x.shape[1] == 0 or w.shape[1] % 2
            or not _tma_eligible(x, w)):
        return None
    large_weight = w[0].numel() >= _LARGE_OUTPUT
    if large_weight and h_out is not None and x.is_cuda:
        return None  # storing h too ran no faster than gmm + gated_act there (see _gmm_gated_config)
    M, F_, K = groups.num_rows, w.shape[1] // 2, x.shape[1]
    a = torch.empty(M, F_, dtype=x.dtype, device=x.device)
    if M == 0 or F_ == 0:
        return a
    # the tensors in the order the kernel takes them (placeholders for absent ones are never read)
    tensors = (x, w, row_scale if row_scale is not None else a, a, h_out if h_out is not None else a, groups.sizes,
               gather if gather is not None else groups.sizes)
    plan_key = _plan_key(tensors, (activation, groups.are_ends, gather is None, gather_div, row_scale is None,
                                   scale_by_slot, groups.zero_tail, h_out is None))
    if plan_key is not None and _GATED_PLANS.run(plan_key, tensors):
        return a
    G = groups.num_groups
    if (not _CONFIG_OVERRIDES.get("gated") and not scale_by_slot and x.shape[0] == M
            and _gluon_gmm.gated_eligible(x, w, activation, gather is not None, _few_rows(M, G))):
        launched = _gluon_gmm.launch_gated(x, w, row_scale, groups, a, h_out, num_sms(x.device.index or 0))
        if launched is not None:  # else it does not compile with this Triton: the tl kernel below
            if plan_key is not None:  # x, w, scale, a, h, sizes: the first six of tensors
                _GATED_PLANS.add(plan_key, *launched, pick=(0, 1, 2, 3, 4, 5))
            return a
    cfg = _CONFIG_OVERRIDES.get("gated") or _gmm_gated_config(not x.is_cuda, large_weight, _few_rows(M, G))
    max_tiles = (cdiv(M, cfg["BM"]) + G) * cdiv(F_, cfg["BN"])
    programs = max(1, min(num_sms(x.device.index or 0) if x.is_cuda else 4, max_tiles))
    args = (*tensors, M, F_, K, G, programs, x.shape[0], gather_div, x.stride(0), w.stride(0), w.stride(1),
            a.stride(0), tensors[4].stride(0))
    # a as a TMA box needs a 16-byte aligned row pitch; else pointer stores
    pitch_ok = (F_ * x.element_size()) % 16 == 0
    constexprs = dict(GELU=activation == "geglu", HAS_SCALE=row_scale is not None, SCALE_BY_SLOT=scale_by_slot,
                      GATHER=gather is not None, STORE_H=h_out is not None,
                      A_TMA_STORE=cfg.get("a_tma_store", False) and pitch_ok, FLATTEN=cfg.get("flatten", False),
                      **groups.kernel_args(), BF16_FIXUPS=interpreter_bf16_fixups(x), BM=cfg["BM"], BN=cfg["BN"],
                      BK=cfg["BK"], GROUP_M=cfg["GROUP_M"])
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _launch_gmm_gated((programs,), args, constexprs, **options)
    if plan_key is not None:
        _GATED_PLANS.add(plan_key, _launch_gmm_gated, (programs,), args, constexprs, options)
    return a


def _launch_gmm_k(a, b, groups: _Groups, out, accumulate: bool):
    tensors = (a, b, out, groups.sizes)
    plan_key = _plan_key(tensors, (accumulate, groups.are_ends))
    if plan_key is not None and _WGRAD_PLANS.run(plan_key, tensors):
        return out
    KA, NB = a.shape[1], b.shape[1]
    G = groups.num_groups
    # the decode config was measured with 16-bit outputs only (its TMA store does not take fp32 main_grad tiles)
    few_rows = _few_rows(a.shape[0], G) and out.element_size() == 2
    if not _CONFIG_OVERRIDES.get("wgrad") and _gluon_gmm.k_eligible(a, b, out, few_rows):
        launched = _gluon_gmm.launch_k(a, b, groups, out, accumulate, num_sms(a.device.index or 0))
        if launched is not None:  # else it does not compile with this Triton: the tl kernel below
            if plan_key is not None:  # its tensor arguments are `tensors` in order
                _WGRAD_PLANS.add(plan_key, *launched)
            return out
    cfg = _CONFIG_OVERRIDES.get("wgrad") or _gmm_k_config(a.dtype, KA, NB, on_cpu=not a.is_cuda, few_rows=few_rows)
    grid = (G * cdiv(KA, cfg["BK"]) * cdiv(NB, cfg["BN"]),)
    constexprs = dict(
        ACCUMULATE=accumulate,
        **groups.kernel_args(m_grouped=False),
        INPUT_PRECISION=_input_precision(a.dtype),
        BF16_FIXUPS=interpreter_bf16_fixups(a) or interpreter_bf16_fixups(out),
        BK=cfg["BK"], BN=cfg["BN"], BM=cfg["BM"], GROUP_K=cfg.get("GROUP_K", _GROUP_M),
    )
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("tma", True) and _tma_eligible(a, b):
        # a 16-bit output tile only: an fp32 one (main_grad) would need a 128 KB staging buffer beside the stages
        constexprs["TMA_STORE"] = cfg.get("tma_store", False) and out.element_size() == 2 and _tma_eligible(out)
        strides = (a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2))
        if cfg.get("persistent", False):
            programs = num_sms(a.device.index or 0) * cfg.get("programs_per_sm", 1) if a.is_cuda else 4
            grid = (max(1, min(programs, grid[0])),)
            launcher = _launch_gmm_k_tma_persistent
            args = (a, b, out, groups.sizes, a.shape[0], KA, NB, G, grid[0], *strides)
            constexprs.update(FLATTEN=cfg.get("flatten", False), WARP_SPECIALIZE=cfg.get("warp_specialize", False),
                              PREFETCH_TAIL=cfg.get("prefetch_tail", False))
        else:
            launcher = _launch_gmm_k_tma
            args = (a, b, out, groups.sizes, a.shape[0], KA, NB, G, *strides)
    else:
        launcher = _launch_gmm_k_pointer
        args = (a, b, out, groups.sizes, a.shape[0], KA, NB, G, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                out.stride(0), out.stride(1), out.stride(2))
    launcher(grid, args, constexprs, **options)
    if plan_key is not None:
        _WGRAD_PLANS.add(plan_key, launcher, grid, args, constexprs, options)
    return out


def _torch_gmm(x, w, bias, groups: _Groups, out, trans_w: bool):
    """Plain PyTorch path (the CPU backend): fp32 accumulation, one rounding, tail rows zeroed. fp32 whatever the
    caller's autocast (a backward run inside an autocast region would otherwise multiply in bf16)."""
    start = 0
    with torch.autocast(x.device.type, enabled=False):
        for g, count in enumerate(groups.host_counts()):
            if count:
                wg = w[g].float()
                acc = x[start:start + count].float() @ (wg.t() if trans_w else wg)
                if bias is not None:
                    acc += bias[g].float()
                out[start:start + count] = acc.to(out.dtype)
            start += count
    out[start:].zero_()
    return out


def _torch_gmm_k(a, b, groups: _Groups, out, accumulate: bool):
    start = 0
    with torch.autocast(a.device.type, enabled=False):  # fp32, as in _torch_gmm
        for g, count in enumerate(groups.host_counts()):
            acc = a[start:start + count].float().t() @ b[start:start + count].float()
            if accumulate:
                acc += out[g].float()
            out[g] = acc.to(out.dtype)
            start += count
    return out


def _gathered(x: torch.Tensor, gather: torch.Tensor, gather_div: int = 1) -> torch.Tensor:
    """x[gather // gather_div] with zero rows where gather < 0 (the torch path of a gathered operand)."""
    keep = gather >= 0
    if x.shape[0] == 0:
        return x.new_zeros(gather.shape[0], x.shape[1])
    return torch.where(keep[:, None], x.index_select(0, torch.where(keep, gather, 0).long() // gather_div), 0)


def _run_gmm(x, w, bias, groups, out, trans_w, gather=None, gather_div: int = 1):
    """out = gmm(x, w); with gather [M], row i reads x[gather[i] // gather_div] (zeros where gather[i] < 0)."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    if x.shape[0] != 0 and x.shape[1] != 0 and _env.use_triton(x):
        return _launch_gmm(x, w, bias, groups, out, trans_w, gather, gather_div)
    if gather is not None:
        x = _gathered(x, gather, gather_div)
    return _torch_gmm(x, w, bias, groups, out, trans_w)  # also the empty reduction: bias only, tail rows zero


def _run_gmm_k(a, b, groups, out, accumulate):
    if out.numel() == 0:
        return out
    if a.shape[0] == 0:
        if not accumulate:
            out.zero_()
        return out
    if _env.use_triton(a):
        return _launch_gmm_k(a, b, groups, out, accumulate)
    return _torch_gmm_k(a, b, groups, out, accumulate)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


@eager_function
class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, groups: _Groups, trans_w: bool, main_grad, consume_x: bool):
        M, N = x.shape[0], (w.shape[1] if trans_w else w.shape[2])
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        w_run = w.to(x.dtype)  # w itself unless it is an fp32 weight for 16-bit x (see gmm)
        _run_gmm(x, w_run, bias, groups, out, trans_w)
        _node_setup(ctx, x, w, bias, groups, trans_w, main_grad, consume_x, w_run)
        return out

    @staticmethod
    def backward(ctx, dy):
        return (*_node_backward(ctx, dy), None, None, None, None)


def _node_setup(ctx, x, w, bias, groups: _Groups, trans_w: bool, main_grad, consume_x: bool, w_run=None):
    """What ``_node_backward`` reads, saved by the forward of a gmm autograd node. ``w_run``: the copy of an fp32
    w in x's dtype that the forward ran on (the backward's dx runs on it too), or None / w itself."""
    ctx.save_for_backward(x, w if w_run is None else w_run)
    # an fp32 w behind a 16-bit copy: its gradient is made in fp32 (and, accumulating, added into a leaf's .grad);
    # a leaf is kept here anyway (its module holds it), any other w is not kept alive for this
    mixed = w_run is not None and w_run is not w
    ctx.weight, ctx.weight_dtype = (w if mixed and w.is_leaf else None), w.dtype
    ctx.groups, ctx.trans_w, ctx.main_grad, ctx.consume_x, ctx.ran = groups, trans_w, main_grad, consume_x, False
    ctx.bias_dtype = None if bias is None else bias.dtype


def _node_backward(ctx, dy):
    """(dx, dw, dbias) of a gmm autograd node set up by ``_node_setup``; its inputs x, w, bias come first."""
    if ctx.consume_x:
        check_single_backward(ctx, "gmm(consume_x=True)", "writes dx over x")
    x, w = ctx.saved_tensors
    weight = w if ctx.weight is None else ctx.weight  # the node's input: w, or the fp32 leaf behind w
    need_dx, need_dw, need_dbias = ctx.needs_input_grad[:3]
    add_into = _grad_to_add_into(weight) if need_dw and ctx.main_grad is None else None
    dx, dw, dbias = _gmm_backward(dy.contiguous(), x, w, ctx.groups, ctx.trans_w, need_dx, need_dw, need_dbias,
                                  ctx.bias_dtype, ctx.main_grad, into_x=ctx.consume_x, add_into=add_into,
                                  weight=weight, dw_dtype=ctx.weight_dtype)
    if add_into is not None:
        # dw is w.grad with this gradient added: with w.grad unset, autograd's AccumulateGrad takes dw as the new
        # w.grad (the same memory, no copy) instead of adding it to the old one, and runs w's hooks as usual
        weight.grad = None
    if dx is x:  # whoever else saved x for backward now fails autograd's version check instead of reading dx
        torch.autograd.graph.increment_version(x)
    return dx, dw, dbias


def _grad_to_add_into(w: torch.Tensor) -> torch.Tensor | None:
    """``w.grad`` when this backward may add w's gradient into it in place, else None.

    Gradient accumulation (micro-batches, or gradients zeroed without set_to_none) makes autograd add each new
    weight gradient to the stored one: a second pass that reads both and writes the sum, three passes over the
    gradient in all. At Qwen3-30B-A3B shapes that is 1.2 GB of bf16 expert gradients per layer, 0.8-1.2 ms per
    layer and micro-batch on an H100 (benchmarks/NOTES.md, session 20). Instead the weight-gradient kernel reads
    each tile of the stored gradient after its loop and writes the sum over it: one extra read inside a
    compute-bound kernel (~0.3 ms there). The sum is rounded once (autograd's way rounds the new gradient to w's
    dtype first, then the sum), so it is closer to the exact sum, not bit for bit autograd's.

    Taken only where nothing can tell the difference: the backward keeps no graph of its own (no create_graph),
    w is a leaf whose AccumulateGrad node runs in this backward (not under ``torch.autograd.grad``, nor outside
    ``backward(inputs=...)``), ``w.grad`` is a plain (no subclass), dense, contiguous, non-view tensor of w's
    dtype, shape and device (a DDP bucket view keeps autograd's path), and w has no tensor hooks (a hook sees the
    new gradient alone, not the sum). Hooks registered on w's AccumulateGrad node itself cannot be inspected: a
    pre-hook there would see the sum. ``MOETRON_FUSE_GRAD_ACCUMULATION=0`` turns it off."""
    if torch.is_grad_enabled() or not w.is_leaf or not w.requires_grad or not _env.fuse_grad_accumulation_enabled():
        return None
    grad = w.grad
    if (grad is None or type(grad) is not torch.Tensor or grad.layout != torch.strided or grad.dtype != w.dtype
            or grad.shape != w.shape or grad.device != w.device or grad.requires_grad or grad._is_view()
            or not grad.is_contiguous() or w._backward_hooks):
        return None
    try:
        will_accumulate = torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(w).node)
    except (RuntimeError, AttributeError):  # torch.autograd.grad on a leaf (it captures, never accumulates)
        return None
    return grad if will_accumulate else None


def _gmm_backward(dy, x, w, groups: _Groups, trans_w: bool, need_dx: bool, need_dw: bool, need_dbias: bool,
                  bias_dtype, main_grad, into_x: bool = False, add_into: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, dw_dtype: torch.dtype | None = None):
    """(dx, dw, dbias) of ``gmm``, None where not needed; dw None too when it went into ``main_grad``.
    ``into_x``: dx is written over x (the last use of x: the weight gradient, which reads it, runs first).
    ``add_into``: a tensor shaped like w that the weight gradient is added into, returned as dw. ``weight``: the
    tensor whose gradient dw is (default w; the fp32 weight behind a 16-bit copy w), ``dw_dtype`` dw's dtype
    (default w's; fp32 for such a weight)."""
    weight = w if weight is None else weight
    dx = dw = dbias = None
    if need_dw:
        # dw[g] = x_g^T dy_g  ([G, K, N]); for a [G, N, K] weight it is dy_g^T x_g
        a, b = (dy, x) if trans_w else (x, dy)
        if main_grad is not None:
            _run_gmm_k(a, b, groups, main_grad, accumulate=True)
            if hasattr(weight, "grad_added_to_main_grad"):
                weight.grad_added_to_main_grad = True
        elif add_into is not None:
            dw = _run_gmm_k(a, b, groups, add_into, accumulate=True)
        else:
            dw = torch.empty(w.shape, dtype=dw_dtype or w.dtype, device=w.device)
            _run_gmm_k(a, b, groups, dw, accumulate=False)
    if need_dbias:
        ones = torch.ones(1, 1, dtype=dy.dtype, device=dy.device).expand(dy.shape[0], 1)
        dbias = torch.empty(groups.num_groups, 1, dy.shape[1], dtype=bias_dtype, device=dy.device)
        _run_gmm_k(ones, dy, groups, dbias, accumulate=False)
        dbias = dbias.squeeze(1)
    if need_dx:
        dx = x if into_x else torch.empty_like(x)
        _run_gmm(dy, w, None, groups, dx, not trans_w)
    return dx, dw, dbias


# Under torch.compile the same forward and backward run as two custom ops with a registered autograd formula, so
# a compiled graph keeps them (no graph break; see moetron/_compile.py). They take the raw group sizes and check
# and place them at run time, as ``gmm`` does eagerly.
@torch.library.custom_op("moetron::gmm", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor? bias, Tensor sizes, bool sizes_are_ends, bool trans_w, "
                                "bool zero_tail) -> Tensor")
def _gmm_op(x, w, bias, sizes, sizes_are_ends, trans_w, zero_tail):
    groups = _op_groups(sizes, sizes_are_ends, x, w.shape[0], zero_tail)
    out = torch.empty(x.shape[0], w.shape[1] if trans_w else w.shape[2], dtype=x.dtype, device=x.device)
    with per_launch_scratch():
        return _run_gmm(x, w.to(x.dtype), bias, groups, out, trans_w)


@_gmm_op.register_fake
def _(x, w, bias, sizes, sizes_are_ends, trans_w, zero_tail):
    return x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])


@torch.library.custom_op("moetron::gmm_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor w, Tensor sizes, bool sizes_are_ends, bool trans_w, "
                                "bool zero_tail, bool need_dx, bool need_dw, bool need_dbias, ScalarType? bias_dtype) "
                                "-> (Tensor, Tensor, Tensor)")
def _gmm_backward_op(dy, x, w, sizes, sizes_are_ends, trans_w, zero_tail, need_dx, need_dw, need_dbias, bias_dtype):
    groups = _op_groups(sizes, sizes_are_ends, x, w.shape[0], zero_tail)
    with per_launch_scratch():
        # an fp32 w for 16-bit x: dx runs on its copy in x's dtype (made again here), dw comes out in fp32
        grads = _gmm_backward(dy.contiguous(), x, w.to(x.dtype), groups, trans_w, need_dx, need_dw, need_dbias,
                              bias_dtype, None, dw_dtype=w.dtype)
    return tuple(or_empty(g, dy) for g in grads)


@_gmm_backward_op.register_fake
def _(dy, x, w, sizes, sizes_are_ends, trans_w, zero_tail, need_dx, need_dw, need_dbias, bias_dtype):
    return (torch.empty_like(x) if need_dx else dy.new_empty(0), torch.empty_like(w) if need_dw else dy.new_empty(0),
            dy.new_empty(w.shape[0], dy.shape[1], dtype=bias_dtype) if need_dbias else dy.new_empty(0))


def _op_groups(sizes, are_ends, x, num_groups, zero_tail) -> _Groups:
    return _make_groups(None if are_ends else sizes, sizes if are_ends else None, num_groups, x.shape[0], x.device,
                        zero_tail=zero_tail)


def _gmm_op_setup(ctx, inputs, output):
    x, w, bias, sizes, sizes_are_ends, trans_w, zero_tail = inputs
    ctx.save_for_backward(x, w, sizes)
    ctx.flags = (sizes_are_ends, trans_w, zero_tail)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gmm_op_backward(ctx, dy):
    x, w, sizes = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = torch.ops.moetron.gmm_backward(dy, x, w, sizes, *ctx.flags, *need, ctx.bias_dtype)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


_gmm_op.register_autograd(_gmm_op_backward, setup_context=_gmm_op_setup)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_host_sizes(name: str, values: list[int], are_ends: bool, num_rows: int):
    """Full check of sizes we can read without a device sync (CPU tensors, or any tensor in debug mode)."""
    if are_ends:
        prev = 0
        for g, end in enumerate(values):
            if end < prev:
                raise ValueError(f"{name} must be non-decreasing cumulative row ends starting at >= 0, got "
                                 f"{name}[{g}] = {end} after {prev}")
            prev = end
        total = values[-1] if values else 0
    else:
        negative = [(g, c) for g, c in enumerate(values) if c < 0]
        if negative:
            g, c = negative[0]
            raise ValueError(f"{name} must be non-negative row counts, got {name}[{g}] = {c}")
        total = sum(values)
    if total > num_rows:
        raise ValueError(f"{name} must cover at most the {num_rows} rows of x, but the groups add up to {total}")


def _make_groups(group_sizes, offsets, num_groups: int, num_rows: int, device: torch.device,
                 group_arg: str = "w", zero_tail: bool = True, read_values: bool = True) -> _Groups:
    """The checked ``_Groups`` of a public call. ``read_values=False`` (a call that hands the sizes to a custom op,
    which makes its own ``_Groups`` at run time) checks only what the tensor's metadata tells and leaves the
    sizes where they are."""
    if (group_sizes is None) == (offsets is None):
        raise ValueError("pass exactly one of group_sizes (per-group row counts) or offsets (cumulative row "
                         f"ends), got {'both' if group_sizes is not None else 'neither'}")
    name, sizes = ("group_sizes", group_sizes) if group_sizes is not None else ("offsets", offsets)
    are_ends = offsets is not None
    if isinstance(sizes, (list, tuple)):
        sizes = torch.tensor(sizes, dtype=torch.int64)
    check_tensor(name, sizes, ndim=1, dtypes=_INDEX_DTYPES)
    if sizes.numel() != num_groups:
        raise ValueError(f"{name} must have one entry per group of {group_arg} ({num_groups}), got "
                         f"{sizes.numel()} entries")
    if sizes.device != device and sizes.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU or on x's device ({device}), got {sizes.device}")
    if not read_values:
        return _Groups(sizes, are_ends, num_rows, zero_tail)
    if sizes.device.type == "cpu" or _env.debug_checks_enabled():
        # CPU values are free to read; GPU values are read only in debug mode (this syncs).
        _check_host_sizes(name, sizes.tolist(), are_ends, num_rows)
    if sizes.device != device:
        sizes = sizes.to(device, non_blocking=True)
    return _Groups(sizes.contiguous(), are_ends, num_rows, zero_tail)


def gmm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor | None = None, *,
        offsets: torch.Tensor | None = None, trans_w: bool = False, bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None, zero_tail: bool = True, consume_x: bool = False) -> torch.Tensor:
    """m-grouped GEMM: ``out[rows of g] = x[rows of g] @ w[g] (+ bias[g])``.

    Args:
        x: ``[M, K]`` fp16, bf16 or fp32, contiguous in its last dim. Group g owns a contiguous run of rows.
            fp32 follows ``torch.backends.cuda.matmul.allow_tf32``: exact fp32 products when it is off (the
            default), TF32 tensor cores when it is on. Triton's TF32 truncates the operands where cuBLAS rounds
            them, so expect about twice cuBLAS's TF32 error then.
        w: ``[G, K, N]`` (or ``[G, N, K]`` with ``trans_w=True``, the Hugging Face v5 experts layout),
            contiguous, on x's device, in x's dtype, or fp32 with fp16/bf16 x (mixed precision, as under
            ``torch.autocast`` with fp32 weights: the GEMMs run on w rounded to x's dtype, and w's gradient is
            made in fp32 by the weight-gradient kernel, not rounded to x's dtype and cast back).
        group_sizes: ``[G]`` int32/int64 rows per group, on x's device or the CPU. Empty groups are fine.
        offsets: ``[G]`` cumulative row ends instead of ``group_sizes`` (torch ``offs`` / npu_gmm
            ``group_list``). Pass exactly one of the two.
        trans_w: read ``w`` as ``[G, N, K]``.
        bias: optional ``[G, N]`` in x's dtype or fp32.
        out: optional ``[M, N]`` output in x's dtype, unit stride along N (not allowed while autograd records).
        zero_tail: write zeros to the rows past the last group (when the sizes add up to less than M), here and
            in the backward's dx. False leaves them unwritten (uninitialised unless ``out`` is given): for
            worst-case-sized buffers whose unused tail nothing reads (a sync-free dispatcher's), it saves
            writing it. The CPU path writes zeros either way.
        consume_x: x is an intermediate that nothing else reads after this call (an MoE layer's permuted
            tokens): the backward computes the weight gradient first and then writes dx over x, instead of
            allocating a second ``[M, K]`` buffer. The backward can then run once: a second one
            (``retain_graph=True``) raises. Ignored under torch.compile.

    Returns:
        ``[M, N]`` in x's dtype, accumulated in fp32. Rows past the last group are zeros (with ``zero_tail``).

    Autograd: dx is a grouped GEMM with the weight transposed, dw a k-grouped GEMM (``gmm_k``), dbias the
    per-group sum of dy. If ``w`` has an fp32 ``main_grad`` attribute (Megatron's gradient-accumulation
    fusion), its weight gradient is added into ``w.main_grad`` and ``w.grad`` stays None.

    Sizes on the GPU are never read by the host; on CUDA this is one Triton kernel launch, and it can be
    captured in a CUDA graph. Sizes on the CPU are checked on the host. GPU sizes
    are checked only with ``MOETRON_DEBUG=1``; otherwise invalid ones are clamped to [0, M] (never out of
    bounds, result unspecified).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=3, dtypes=FLOAT_DTYPES)
    check_weight_dtype("w", w, x)
    check_same_device("w", w, "x", x)
    M, K = x.shape
    G = w.shape[0]
    if G == 0:
        raise ValueError("w must hold at least one group, got shape " f"{tuple(w.shape)}")
    w_k, N = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    if w_k != K:
        layout = "[G, N, K] (trans_w=True)" if trans_w else "[G, K, N]"
        raise ValueError(f"w must be {layout} with K = x.shape[1] = {K}, got w.shape = {tuple(w.shape)}")
    check_row_major("x", x)
    if not w.is_contiguous():
        raise ValueError(f"w must be contiguous, got strides {tuple(w.stride())} for shape {tuple(w.shape)}; "
                         "call .contiguous() first, or pass the untransposed tensor with trans_w=True")
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=(x.dtype, torch.float32))
        check_shape("bias", bias, (G, N), "[G, N]")
        check_same_device("bias", bias, "x", x)
    if not isinstance(zero_tail, bool):
        raise TypeError(f"zero_tail must be a bool, got {type(zero_tail).__name__}")
    check_consumable("x", x, consume_x)
    main_grad = getattr(w, "main_grad", None)
    # under torch.compile: one custom op (fused main_grad accumulation and out= stay eager, behind a graph break)
    as_op = compiling() and out is None and main_grad is None
    groups = _make_groups(group_sizes, offsets, G, M, x.device, zero_tail=zero_tail, read_values=not as_op)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not (as_op or needs_grad):
        w = w.to(x.dtype)  # an fp32 weight for 16-bit x: the GEMM's copy (the node and the op make their own)
    if as_op:
        return torch.ops.moetron.gmm(x, w, bias, groups.sizes, groups.are_ends, trans_w, zero_tail)
    if out is not None:
        check_out(out, needs_grad=needs_grad, grad_inputs="an input", dtype=x.dtype, shape=(M, N), what="[M, N]",
                  like_name="x", like=x)
        return _run_gmm(x, w, bias, groups, out, trans_w)
    if not needs_grad:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        return _run_gmm(x, w, bias, groups, out, trans_w)
    return _GroupedMatmul.eager_apply(x, w, bias, groups, trans_w, checked_main_grad(w), consume_x)


def checked_main_grad(w: torch.Tensor) -> torch.Tensor | None:
    """``w.main_grad`` (Megatron's fp32 gradient-accumulation buffer) when w has one, validated; else None."""
    main_grad = getattr(w, "main_grad", None)
    if main_grad is not None:
        check_tensor("w.main_grad", main_grad, dtypes=(torch.float32,))
        check_shape("w.main_grad", main_grad, tuple(w.shape), "the shape of w")
        check_same_device("w.main_grad", main_grad, "w", w)
    return main_grad


def gmm_k(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor | None = None, *,
          offsets: torch.Tensor | None = None, out: torch.Tensor | None = None,
          accumulate: bool = False) -> torch.Tensor:
    """k-grouped GEMM (the weight gradient): ``out[g] = x[rows of g]^T @ dy[rows of g]``.

    Args:
        x: ``[M, K]`` fp16, bf16 or fp32.
        dy: ``[M, N]``, same dtype and device as x. The grouped (reduction) axis is the row axis of both.
        group_sizes / offsets: ``[G]`` int32/int64 per-group row counts or cumulative ends; exactly one.
        out: optional ``[G, K, N]`` in x's dtype or fp32 (for example a Megatron-style ``main_grad``).
        accumulate: add into ``out`` instead of overwriting it (npu_gmm's ``gemm_fusion``); needs ``out``.

    Returns:
        ``[G, K, N]``: ``out`` if given, else a new tensor in x's dtype. Accumulation is fp32, in a fixed
        order (no atomics), so results are deterministic; empty groups give exact zeros (or leave ``out``
        unchanged when accumulating). Not differentiable.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("dy", dy, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_dtype("dy", dy, "x", x)
    check_same_device("dy", dy, "x", x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must have as many rows as x ({x.shape[0]}), got dy.shape = {tuple(dy.shape)}")
    M, K = x.shape
    N = dy.shape[1]
    sizes = group_sizes if group_sizes is not None else offsets
    G = len(sizes) if isinstance(sizes, (list, tuple)) else (sizes.numel() if sizes is not None else 0)
    groups = _make_groups(group_sizes, offsets, G, M, x.device, group_arg="the output")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out= (the tensor to add into), got out=None")
        out = torch.empty(G, K, N, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, ndim=3, dtypes=(x.dtype, torch.float32))
        check_shape("out", out, (G, K, N), "[G, K, N]")
        check_same_device("out", out, "x", x)
    return _run_gmm_k(x, dy, groups, out, accumulate)


# ---------------------------------------------------------------------------------------------------------
# Reference (readable, slow): what the kernels compute, written as the blog's per-group loop.
# ---------------------------------------------------------------------------------------------------------


def gmm_ref(x, w, group_sizes, trans_w=False, bias=None):
    """Per-group loop of ``torch.matmul`` in x's dtype; tail rows are zero. ``group_sizes`` is a list of ints."""
    out = torch.zeros(x.shape[0], w.shape[1] if trans_w else w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for g, count in enumerate(group_sizes):
        wg = w[g].t() if trans_w else w[g]
        out[start:start + count] = x[start:start + count] @ wg + (0 if bias is None else bias[g].to(x.dtype))
        start += count
    return out
