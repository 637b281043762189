"""moetron: Mixture-of-Experts building blocks for PyTorch, with Triton kernels."""

from .ops.gmm import gmm, gmm_k

__version__ = "0.1.0.dev0"
__all__ = ["gmm", "gmm_k", "__version__"]
