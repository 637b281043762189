"""Kernels, one op per file: Triton kernels, launchers, autograd and a pure-PyTorch reference."""

from .gated_act import gated_act, gated_act_ref
from .gmm import gmm, gmm_k, gmm_ref
from .permute import PermuteResult, permute, permute_ref, permuted_rows, unpermute, unpermute_ref

__all__ = ["gated_act", "gated_act_ref", "gmm", "gmm_k", "gmm_ref", "PermuteResult", "permute", "permute_ref", "permuted_rows", "unpermute",
           "unpermute_ref"]
