"""The ``device`` fixture of the op tests: each test runs once per path. On a GPU machine that is CUDA (the Triton
kernels); without one, the PyTorch path and the Triton kernels under the interpreter, both on CPU tensors."""

import pytest
import torch

PATHS = {"cuda": ("cuda", "auto")} if torch.cuda.is_available() else {"torch": ("cpu", "torch"),
                                                                       "triton": ("cpu", "triton")}


@pytest.fixture(params=list(PATHS))
def device(request, monkeypatch):
    device, backend = PATHS[request.param]
    monkeypatch.setenv("MOETRON_BACKEND", backend)
    return device
