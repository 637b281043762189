"""Test setup. Without a GPU, Triton kernels run in Triton's CPU interpreter; that must be switched on before
triton.jit decorates anything, hence here, before any moetron import."""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moetron._env import triton_interpreter_enabled  # noqa: E402  (imported once TRITON_INTERPRET is set)


def _make_interpreter_dots_host_independent() -> None:
    """Under the interpreter each ``tl.dot`` is a numpy matmul, and numpy's float32 matmul sums in the order of the
    host's BLAS kernel, which OpenBLAS picks at run time per CPU model. Two kernels that tile one product
    differently (the fused gated GEMM against gmm followed by gated_act) then rounded an element one ulp apart on an
    AMD EPYC host and not on earlier hosts, so bit-for-bit tests between kernels passed or failed by host. Here the
    dot runs in float64, where each product of fp16, bf16 (widened to fp32 by the kernels' interpreter fix-ups) or
    fp32 operands is exact and the sum of a k-step's K products carries an error near K * 2^-53 of their magnitude,
    far below float32's 2^-24; rounded once to float32, the dot is then the same in any summation order (short of a
    sum within that distance of a rounding boundary). The accumulator is added as before, in float32.
    fp8 operands and integer dots keep Triton's own path."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    triton_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        fp8 = any(t.dtype.primitive_bitwidth == 8 and t.dtype.is_floating() for t in (a, b))
        if fp8 or d.data.dtype != np.float32:
            return triton_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(np.float32)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


if triton_interpreter_enabled():
    _make_interpreter_dots_host_independent()
