"""Kernels, one op per file: Triton kernels, launchers, autograd and a pure-PyTorch reference."""

from .gmm import gmm, gmm_k, gmm_ref

__all__ = ["gmm", "gmm_k", "gmm_ref"]
