"""Kernels, one op per file: Triton kernels, launchers, autograd and a pure-PyTorch reference."""

from .gmm import gmm, gmm_k, gmm_ref
from .permute import PermuteResult, permute, permute_ref, permuted_rows, unpermute, unpermute_ref

__all__ = ["gmm", "gmm_k", "gmm_ref", "PermuteResult", "permute", "permute_ref", "permuted_rows", "unpermute",
           "unpermute_ref"]
