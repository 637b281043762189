"""Kernels, one op per file: Triton kernels, launchers, autograd and a pure-PyTorch reference."""

from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .gated_act import gated_act, gated_act_ref
from .gmm import gmm, gmm_k, gmm_ref
from .permute import PermuteResult, permute, permute_ref, permuted_rows, unpermute, unpermute_ref
from .rmsnorm import add_rms_norm, rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref

__all__ = ["add_rms_norm", "apply_rotary", "apply_rotary_ref", "gated_act", "gated_act_ref", "gmm", "gmm_k", "gmm_ref",
           "linear_cross_entropy", "linear_cross_entropy_ref",
           "PermuteResult", "permute", "permute_ref", "permuted_rows", "rms_norm", "rms_norm_ref", "unpermute",
           "unpermute_ref"]
