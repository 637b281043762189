"""Drop-in entry points with the signatures of the seed operators, so code written against them can switch by
changing an import (``from moetron.compat import npu_gmm``)."""

from __future__ import annotations

import torch

from .ops.gmm import gmm, gmm_k

_GROUP_TYPES = {-1: "no grouping (plain matmul)", 0: "m-grouped", 1: "n-grouped", 2: "k-grouped"}


def npu_gmm(x, weight, bias=None, group_list=None, group_type=0, group_list_type=0, gemm_fusion=False,
            original_weight=None):
    """The seed's ``npu_gmm`` on top of :func:`moetron.gmm` / :func:`moetron.gmm_k` (single tensors only).

    - ``group_type=0`` (m-grouped): ``x [M, K]``, ``weight [G, K, N]``, ``bias [G, N]`` -> ``[M, N]``.
    - ``group_type=2`` (k-grouped, the weight gradient): ``x [K, M]`` (the transposed activations, as callers
      pass ``x.t()``), ``weight [M, N]`` (the output gradient) -> ``[G, K, N]``, grouped over M. With
      ``gemm_fusion=True`` the result is added into ``original_weight.main_grad`` (fp32), which is returned.
    - ``group_type=-1``: plain ``x @ weight (+ bias)``.
    - ``group_type=1`` (n-grouped) is not implemented.

    ``group_list`` is cumulative ends when ``group_list_type=0`` (the default) and per-group counts when 1;
    a Python list or an int tensor on the CPU or x's device.
    """
    if group_type not in _GROUP_TYPES:
        raise ValueError(f"group_type must be one of {sorted(_GROUP_TYPES)}, got {group_type!r}")
    if group_list_type not in (0, 1):
        raise ValueError(f"group_list_type must be 0 (cumulative ends) or 1 (counts), got {group_list_type!r}")
    if isinstance(x, (list, tuple)) or isinstance(weight, (list, tuple)):
        raise TypeError("npu_gmm here takes single tensors for x and weight, got a list; concatenate the rows "
                        "into one x and stack the weights into one [G, K, N] tensor")
    if group_type == 1:
        raise NotImplementedError("npu_gmm group_type=1 (n-grouped) is not implemented in moetron; use "
                                  "group_type=0 on the transposed problem")
    if group_type == -1:
        if group_list is not None:
            raise ValueError("group_list must be None with group_type=-1 (no grouping), got a value")
        out = x @ weight
        return out if bias is None else out + bias
    if group_list is None:
        raise ValueError(f"group_list is required with group_type={group_type}, got None")
    sizes = {"offsets": group_list} if group_list_type == 0 else {"group_sizes": group_list}
    if group_type == 0:
        if gemm_fusion:
            raise ValueError("gemm_fusion=True applies to group_type=2 (the weight gradient), got group_type=0")
        return gmm(x, weight, bias=bias, **sizes)
    # group_type == 2
    if bias is not None:
        raise ValueError("bias must be None with group_type=2 (k-grouped), got a tensor")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [K, M] tensor with group_type=2, got {getattr(x, 'shape', x)}")
    if gemm_fusion:
        main_grad = getattr(original_weight, "main_grad", None)
        if main_grad is None:
            raise ValueError("gemm_fusion=True needs original_weight with an fp32 .main_grad attribute, got "
                             f"{'None' if original_weight is None else 'a weight without main_grad'}")
        return gmm_k(x.t(), weight, out=main_grad, accumulate=True, **sizes)
    return gmm_k(x.t(), weight, **sizes)
