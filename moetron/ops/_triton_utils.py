"""Small @triton.jit helpers shared by the ops."""

import functools

import torch
import triton
import triton.language as tl


def interpreter_bf16_fixups(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t`` needs the BF16_FIXUPS path. Triton's CPU interpreter (3.9) gets bf16 wrong in
    two places: tl.dot on bf16 tiles multiplies the raw bits, and fp32 -> bf16 rounding is off. Under the
    interpreter, bf16 tiles go to fp32 before the dot (exact; the accumulation is fp32 either way) and the output
    rounding is done on the bits (``to_output_dtype``)."""
    return (not t.is_cuda) and t.dtype == torch.bfloat16


@triton.jit
def to_bf16(v, BF16_FIXUPS: tl.constexpr):
    """fp32 -> bf16, rounding to nearest even as the GPU does. Triton 3.9's CPU interpreter rounds fp32 -> bf16
    incorrectly (toward zero / half-up without carry), so under it (BF16_FIXUPS) the rounding is done on the bit
    pattern: add half an ulp (minus one when the kept lsb is even) and drop the low 16 bits."""
    if BF16_FIXUPS:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(tl.bfloat16)


@triton.jit
def to_output_dtype(acc, out_ptr, BF16_FIXUPS: tl.constexpr):
    """fp32 -> the element type of out_ptr, rounding to nearest even (``to_bf16`` for bf16)."""
    if out_ptr.dtype.element_ty == tl.float32:
        return acc
    elif out_ptr.dtype.element_ty == tl.bfloat16:
        return to_bf16(acc, BF16_FIXUPS)
    else:
        return acc.to(out_ptr.dtype.element_ty)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). triton.cdiv is a constexpr function whose call costs ~10 us of host time in
    Triton 3.6, which adds up on the launch path."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of two >= n (n >= 1); see cdiv for why not triton's."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: grids are sized from it per launch)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
