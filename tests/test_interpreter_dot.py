"""tests/conftest.py's float64 tl.dot under Triton's interpreter: a dot of fp32 tiles equals the float64 product
rounded once to float32, element for element, whatever BLAS the host's numpy uses (float32 sums round each step and
would differ from it in the last place on many elements)."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from moetron._env import triton_interpreter_enabled

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="the interpreter's dot only")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    idx = tl.arange(0, N)
    a = tl.load(a_ptr + idx[:, None] * N + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * N + idx[None, :])
    tl.store(out_ptr + idx[:, None] * N + idx[None, :], tl.dot(a, b, input_precision="ieee"))


def test_interpreter_dot_is_the_float64_product_rounded_once():
    gen = torch.Generator().manual_seed(0)
    n = 64
    a = torch.randn(n, n, generator=gen) * torch.logspace(-3, 3, n)[None, :]  # terms of mixed magnitude
    b = torch.randn(n, n, generator=gen)
    out = torch.full((n, n), float("nan"))
    _dot_kernel[(1,)](a, b, out, N=n)
    assert torch.equal(out, (a.double() @ b.double()).float())
    # what Triton's own interpreter dot computes (numpy's float32 matmul) differs on this data: the check above can fail
    assert not torch.equal(torch.from_numpy(np.matmul(a.numpy(), b.numpy())), out)
