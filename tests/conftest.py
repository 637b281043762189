"""Test setup. Without a GPU, Triton kernels run in Triton's CPU interpreter; that must be switched on before
triton.jit decorates anything, hence here, before any moetron import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
