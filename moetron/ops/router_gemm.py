"""The router's GEMMs in fp32 accuracy on bf16 tensor cores: one kernel forward, two backward.

Legend: T tokens, H hidden, E experts, S chunks of tokens in the weight gradient.

    router_logits(x [T, H] bf16, w [E, H] fp32 or bf16) -> logits [T, E] fp32        (autograd: dx, dw)
    router_logits(x, w, pass_tokens=True) -> (logits, tokens [T, H])   tokens: x, whose gradient joins dx in-kernel

Why: the gate maths runs in fp32 (Megatron's default), but an fp32 GEMM runs on the H100's SIMT units at a
fraction of tensor-core speed. An fp32 value is exactly the sum of three bf16 values (each the rounding of what the
previous ones left), and x is exact in bf16, so ``x @ w.T`` is a sum of bf16 products with fp32 accumulation:
as accurate as one fp32 GEMM. moetron/router.py did this with PyTorch ops (split, concatenate, one cuBLAS GEMM,
sum; ~10 ops forward and ~16 backward); at a Qwen3-30B layer with T=8192 those took ~0.9 ms of host time per
training step, and that step is close to host-bound (benchmarks/NOTES.md). Here each kernel splits its tiles in
registers:

- forward: ``logits = Σ_j x @ w_j.T`` (j over the three parts of w; one part for a bf16 w);
- ``dx = Σ g_i @ w_j`` over the pairs (i, j) with i + j <= 1 (part i is ~2^-8i of the whole, so the other
  products sit near 2^-16 of it: below the bf16 rounding of dx, x's dtype, by a factor ~2^8);
- ``dw = Σ_i g_i.T @ x``: S programs per output tile each reduce a chunk of tokens into an fp32 partial
  [S, E, H], summed in a fixed order afterwards (deterministic, no atomics). All three parts of g for an fp32
  weight; for a bf16 one, whose gradient is rounded to bf16, the first two (as for dx).

Under Triton's CPU interpreter (tests) bf16 dots and fp32 -> bf16 rounding are wrong (_triton_utils), so there the
parts are rounded on their bits and multiplied in fp32: the same exact products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import CachedLauncher
from ._triton_utils import cdiv, next_power_of_2, num_sms, to_bf16, to_output_dtype
from .._compile import compiling, eager_function, or_empty


@triton.jit
def _split3(v, FIXUPS: tl.constexpr):
    """An fp32 tile as three bf16 tiles, largest first, whose sum is exactly v (fp32's 24 significand bits)."""
    p0, p1 = _split2(v, FIXUPS)
    p2 = to_bf16(v - p0.to(tl.float32) - p1.to(tl.float32), FIXUPS)
    return p0, p1, p2


@triton.jit
def _split2(v, FIXUPS: tl.constexpr):
    """The two largest of _split3's parts: v to ~2^-16 of itself."""
    p0 = to_bf16(v, FIXUPS)
    return p0, to_bf16(v - p0.to(tl.float32), FIXUPS)


@triton.jit
def _dot(a, b, acc, FIXUPS: tl.constexpr):
    """acc + a @ b for bf16 tiles with fp32 accumulation (fp32 products under the interpreter: exact too)."""
    if FIXUPS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _router_logits_kernel(
    x_ptr,  # [T, H] bf16
    w_ptr,  # [E, H] fp32 (SPLIT_W) or bf16
    out_ptr,  # out [T, E] fp32
    T, E, H,
    stride_xt, stride_we, stride_ot,
    SPLIT_W: tl.constexpr,
    FIXUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] tile of logits per program, reducing over H."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    experts = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, expert_ok = rows < T, experts < E
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < H
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + experts[None, :] * stride_we + ks[:, None], mask=expert_ok[None, :] & k_ok[:, None],
                    other=0.0)  # [BK, BN]: w transposed
        if SPLIT_W:
            w0, w1, w2 = _split3(w, FIXUPS)
            acc = _dot(x, w2, acc, FIXUPS)
            acc = _dot(x, w1, acc, FIXUPS)
            acc = _dot(x, w0, acc, FIXUPS)
        else:
            acc = _dot(x, w, acc, FIXUPS)
    tl.store(out_ptr + rows[:, None] * stride_ot + experts[None, :], acc, mask=row_ok[:, None] & expert_ok[None, :])


@triton.jit
def _router_dx_kernel(
    g_ptr,  # [T, E] fp32 gradient of the logits
    w_ptr,  # [E, H] fp32 (SPLIT_W) or bf16
    dx_ptr,  # out [T, H] x's dtype
    add_ptr,  # [T, H] x's dtype, added to dx (read only if ADD)
    T, E, H,
    stride_gt, stride_we, stride_dxt, stride_addt,
    SPLIT_W: tl.constexpr,
    ADD: tl.constexpr,
    FIXUPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] tile of dx = g @ w per program, reducing over E; the part products above dx's bf16 rounding.
    ADD: dx = round(round(g @ w) + add), the two roundings of g @ w followed by a separate add in x's dtype, so the
    result is bit for bit what autograd's sum of the two gradients gives."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < T, cols < H
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for e0 in range(0, E, BK):
        es = e0 + tl.arange(0, BK)
        e_ok = es < E
        g = tl.load(g_ptr + rows[:, None] * stride_gt + es[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        w = tl.load(w_ptr + es[:, None] * stride_we + cols[None, :], mask=e_ok[:, None] & col_ok[None, :], other=0.0)
        g0, g1 = _split2(g, FIXUPS)
        if SPLIT_W:
            w0, w1 = _split2(w, FIXUPS)
            # smallest products first
            acc = _dot(g0, w1, acc, FIXUPS)
            acc = _dot(g1, w0, acc, FIXUPS)
            acc = _dot(g0, w0, acc, FIXUPS)
        else:
            acc = _dot(g1, w, acc, FIXUPS)
            acc = _dot(g0, w, acc, FIXUPS)
    ok = row_ok[:, None] & col_ok[None, :]
    dx = to_output_dtype(acc, dx_ptr, FIXUPS)
    if ADD:
        other = tl.load(add_ptr + rows[:, None] * stride_addt + cols[None, :], mask=ok, other=0.0)
        dx = to_output_dtype(dx.to(tl.float32) + other.to(tl.float32), dx_ptr, FIXUPS)
    tl.store(dx_ptr + rows[:, None] * stride_dxt + cols[None, :], dx, mask=ok)


@triton.jit
def _router_dw_kernel(
    g_ptr,  # [T, E] fp32
    x_ptr,  # [T, H] bf16
    partial_ptr,  # out [S, E, H] fp32: chunk s's sum of g.T @ x over its tokens
    T, E, H, CHUNK,
    stride_gt, stride_xt,
    THREE_PARTS: tl.constexpr,
    FIXUPS: tl.constexpr,
    BE: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    """Program (e-tile, h-tile, chunk s): partial[s] tile = Σ over tokens [s·CHUNK, (s+1)·CHUNK) of g.T @ x."""
    experts = tl.program_id(0) * BE + tl.arange(0, BE)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    chunk = tl.program_id(2)
    expert_ok, col_ok = experts < E, cols < H
    t_begin = chunk.to(tl.int64) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    acc = tl.zeros((BE, BN), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BT):
        ts = t0 + tl.arange(0, BT)
        t_ok = ts < t_end
        g = tl.load(g_ptr + ts[None, :] * stride_gt + experts[:, None], mask=t_ok[None, :] & expert_ok[:, None],
                    other=0.0)  # [BE, BT]: g transposed
        x = tl.load(x_ptr + ts[:, None] * stride_xt + cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        if THREE_PARTS:
            g0, g1, g2 = _split3(g, FIXUPS)
            acc = _dot(g2, x, acc, FIXUPS)
        else:
            g0, g1 = _split2(g, FIXUPS)
        acc = _dot(g1, x, acc, FIXUPS)
        acc = _dot(g0, x, acc, FIXUPS)
    out = partial_ptr + chunk.to(tl.int64) * E * H + experts[:, None].to(tl.int64) * H + cols[None, :]
    tl.store(out, acc, mask=expert_ok[:, None] & col_ok[None, :])


_launch_logits = CachedLauncher(_router_logits_kernel)
_launch_dx = CachedLauncher(_router_dx_kernel)
_launch_dw = CachedLauncher(_router_dw_kernel)

# Tiles per kernel on the GPU, and under the interpreter (small, so the tests' unaligned shapes span several tiles
# and ragged edges). tests/test_sm90_compile.py sets _GPU_TILES_ON_CPU to record the GPU specializations
# (tiles and real bf16 dots) from an interpreter run.
_GPU_TILES_ON_CPU = False
_CPU_TILES = dict(BM=16, BN=16, BK=16, BE=16, BT=16, num_warps=1, num_stages=1)


def _expert_tile(E: int) -> int:
    return min(128, max(16, next_power_of_2(E)))


def _config(kind: str, t: torch.Tensor, E: int, split_w: bool = False) -> tuple[dict, bool]:
    """(tiles and launch options, FIXUPS) of kernel ``kind`` for operands on t's device; ``split_w``: an fp32
    router weight, split into three bf16 parts in registers."""
    if not (t.is_cuda or _GPU_TILES_ON_CPU):
        return _CPU_TILES, True
    # H100 sweep at Qwen3-30B's router (E=128, H=2048; benchmarks/NOTES.md, session 11), us per call at T=32768:
    # logits 64-row tiles 252 -> 128-row tiles 145 (but 128-row tiles leave SMs idle below ~128 tiles' worth
    # of tokens, so small batches keep 64); dx 128x64 434 -> 128x256 262 (each g tile is split once per 256
    # columns of H instead of per 64); dw 128x64 264 -> 128x128 with 8 warps 136. With a bf16 weight (session 16,
    # T=8192 / 2048, us with L2 flushed): 64-row logits tiles reducing 128 columns a step, 32.0 -> 24.4 / 20.8 ->
    # 15.6 (half the steps of a latency-bound loop); an fp32 weight's three parts keep 64 (register room).
    # Session 25 (T=8192, bf16 weight, do_bench us with L2 flushed, bitwise the same): logits with 4 stages
    # 24.3-25.1 -> 22.2-22.8; dx on 64x256 tiles with 4 warps 48.1-48.7 -> 42.3-43.0.
    if kind == "logits":
        if t.shape[0] >= 128 * (num_sms(t.device.index or 0) if t.is_cuda else 1):  # CPU: the compile test
            return dict(BM=128, BN=_expert_tile(E), BK=64, num_warps=8, num_stages=3), False
        if split_w:
            return dict(BM=64, BN=_expert_tile(E), BK=64, num_warps=4, num_stages=3), False
        return dict(BM=64, BN=_expert_tile(E), BK=128, num_warps=4, num_stages=4), False
    if kind == "dx":
        if split_w:
            return dict(BM=128, BN=256, BK=min(64, _expert_tile(E)), num_warps=8, num_stages=2), False
        return dict(BM=64, BN=256, BK=min(64, _expert_tile(E)), num_warps=4, num_stages=2), False
    return dict(BE=_expert_tile(E), BN=128, BT=64, num_warps=8, num_stages=3), False


def _launch(launcher, grid, args, constexprs, cfg):
    launcher(grid, args, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    E = w.shape[0]
    out = torch.empty(T, E, dtype=torch.float32, device=x.device)
    cfg, fixups = _config("logits", x, E, split_w=w.dtype == torch.float32)
    _launch(_launch_logits, (cdiv(T, cfg["BM"]), cdiv(E, cfg["BN"])),
            (x, w, out, T, E, H, x.stride(0), w.stride(0), out.stride(0)),
            dict(SPLIT_W=w.dtype == torch.float32, FIXUPS=fixups, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"]), cfg)
    return out


def _dx(g: torch.Tensor, w: torch.Tensor, x_dtype: torch.dtype, add: torch.Tensor | None = None) -> torch.Tensor:
    """g @ w in x's dtype, plus ``add`` ([T, H] in x's dtype, unit last stride) when given."""
    T, E = g.shape
    H = w.shape[1]
    dx = torch.empty(T, H, dtype=x_dtype, device=g.device)
    cfg, fixups = _config("dx", g, E, split_w=w.dtype == torch.float32)
    _launch(_launch_dx, (cdiv(T, cfg["BM"]), cdiv(H, cfg["BN"])),
            (g, w, dx, dx if add is None else add, T, E, H, g.stride(0), w.stride(0), dx.stride(0),
             0 if add is None else add.stride(0)),
            dict(SPLIT_W=w.dtype == torch.float32, ADD=add is not None, FIXUPS=fixups, BM=cfg["BM"], BN=cfg["BN"],
                 BK=cfg["BK"]), cfg)
    return dx


def _dw(g: torch.Tensor, x: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    T, E = g.shape
    H = x.shape[1]
    cfg, fixups = _config("dw", g, E)
    if g.is_cuda:
        tiles = cdiv(E, cfg["BE"]) * cdiv(H, cfg["BN"])
        # enough token chunks for ~2 programs per SM, each chunk at least 4 steps of BT tokens
        chunks = max(1, min(cdiv(2 * num_sms(g.device.index or 0), tiles), cdiv(T, 4 * cfg["BT"])))
    else:
        chunks = min(3, cdiv(T, cfg["BT"]))  # several chunks, so the tests cover the final sum
    chunk = cdiv(cdiv(T, chunks), cfg["BT"]) * cfg["BT"]
    chunks = cdiv(T, chunk)
    partial = torch.empty(chunks, E, H, dtype=torch.float32, device=g.device)
    _launch(_launch_dw, (cdiv(E, cfg["BE"]), cdiv(H, cfg["BN"]), chunks),
            (g, x, partial, T, E, H, chunk, g.stride(0), x.stride(0)),
            dict(THREE_PARTS=w_dtype == torch.float32, FIXUPS=fixups, BE=cfg["BE"], BN=cfg["BN"], BT=cfg["BT"]), cfg)
    dw = partial[0] if chunks == 1 else partial.sum(dim=0)
    return dw if w_dtype == torch.float32 else dw.to(w_dtype)


def _backward(g, x, w, need_dx: bool, need_dw: bool, add=None):
    """(dx, dw) for the logits' gradient g; ``add`` ([T, H] in x's dtype, or None) is added into dx in its kernel."""
    g = g.float().contiguous()
    return _dx(g, w, x.dtype, add=add) if need_dx else None, _dw(g, x, w.dtype) if need_dw else None


@eager_function
class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _logits(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return _backward(g, x, w, *ctx.needs_input_grad[:2])


@eager_function
class _RouterLogitsPassingTokens(torch.autograd.Function):
    """``_RouterLogits`` that also returns x, as a view carrying this node, for the caller to hand the experts. The
    experts' gradient for x then arrives here as the second output's gradient and is added inside the dx kernel:
    without this, x has two consumers and autograd sums their gradients in a pass of its own over [T, H]
    (33 us of a ~4.5 ms Qwen3-30B layer step at T=8192 on the H100). Same bits as that sum."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.set_materialize_grads(False)
        return _logits(x, w), x

    @staticmethod
    def backward(ctx, g, g_tokens):
        x, w = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if g is None:  # the logits went unused
            return g_tokens if need_dx else None, None
        # autograd hands g_tokens in tokens' shape and dtype (x's); the kernel reads it with a unit last stride
        if g_tokens is not None and g_tokens.stride(1) != 1:
            g_tokens = g_tokens.contiguous()
        return _backward(g, x, w, need_dx, need_dw, add=g_tokens)


# Under torch.compile: the same kernels as custom ops with a registered autograd formula (no graph break; see
# moetron/_compile.py)
@torch.library.custom_op("moetron::router_logits", mutates_args=(), schema="(Tensor x, Tensor w) -> Tensor")
def _router_logits_op(x, w):
    return _logits(x, w)


@_router_logits_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)


@torch.library.custom_op("moetron::router_logits_backward", mutates_args=(),
                         schema="(Tensor g, Tensor x, Tensor w, bool need_dx, bool need_dw) -> (Tensor, Tensor)")
def _router_logits_backward_op(g, x, w, need_dx, need_dw):
    dx, dw = _backward(g, x, w, need_dx, need_dw)
    return or_empty(dx, x), or_empty(dw, w)


@_router_logits_backward_op.register_fake
def _(g, x, w, need_dx, need_dw):
    return torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(w) if need_dw else w.new_empty(0)


def _router_logits_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _router_logits_op_backward(ctx, g):
    x, w = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.moetron.router_logits_backward(g, x, w, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None


_router_logits_op.register_autograd(_router_logits_op_backward, setup_context=_router_logits_op_setup)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``router_logits`` takes these operands: bf16 x and an fp32 or bf16 weight, both row-major and
    non-empty (the router's training case; everything else runs one GEMM in the router dtype)."""
    return (x.dtype == torch.bfloat16 and w.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and w.dim() == 2 and x.shape[1] == w.shape[1] and x.numel() > 0 and w.numel() > 0
            and x.stride(1) == 1 and w.stride(1) == 1 and x.device == w.device)


def router_logits(x: torch.Tensor, w: torch.Tensor, *, pass_tokens: bool = False):
    """fp32 ``x @ w.T`` for bf16 ``x [T, H]`` and fp32 (or bf16) ``w [E, H]``, as accurate as an fp32 GEMM, with
    autograd (dx in x's dtype, dw in w's). Triton kernels; the caller checks ``applies(x, w)`` first.

    ``pass_tokens=True`` returns ``(logits, tokens)``: ``tokens`` is x (a view of it, same values) for the caller's
    other uses of x, whose gradient the backward then adds into dx in the dx kernel itself instead of autograd
    adding it in a separate pass. Under torch.compile ``tokens`` is x itself."""
    if not isinstance(pass_tokens, bool):  # a truthy non-bool would silently change what is returned
        raise TypeError(f"router_logits: pass_tokens must be a bool, got {type(pass_tokens).__name__} "
                        f"{pass_tokens!r}")
    if not applies(x, w):
        raise ValueError(f"router_logits takes bf16 x [T, H] and an fp32/bf16 w [E, H] with the same H, row-major "
                         f"and non-empty, on one device; got x {x.dtype} {tuple(x.shape)} on {x.device}, "
                         f"w {w.dtype} {tuple(w.shape)} on {w.device}")
    if compiling():
        logits = torch.ops.moetron.router_logits(x, w)
        return (logits, x) if pass_tokens else logits
    if pass_tokens:
        return _RouterLogitsPassingTokens.eager_apply(x, w)
    return _RouterLogits.eager_apply(x, w)
