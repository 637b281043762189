"""moetron: Mixture-of-Experts building blocks for PyTorch, with Triton kernels."""

from .ops.gmm import gmm, gmm_k
from .ops.permute import PermuteResult, permute, permuted_rows, unpermute
from .router import RouterConfig, RouterOutput, TopKRouter, exclude_router_counters_from_ddp
from .experts import GroupedExperts, SequentialExperts, SharedExperts
from .layer import MoEConfig, MoELayer
from .parallel import ParallelGroups, ParallelLayout, reduce_gradients

__version__ = "0.1.0.dev0"
__all__ = ["gmm", "gmm_k", "permute", "unpermute", "permuted_rows", "PermuteResult", "RouterConfig",
           "RouterOutput", "TopKRouter", "exclude_router_counters_from_ddp", "MoEConfig", "MoELayer",
           "GroupedExperts", "SequentialExperts", "SharedExperts", "ParallelGroups", "ParallelLayout",
           "reduce_gradients", "__version__"]
