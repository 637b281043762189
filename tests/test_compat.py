"""moetron.compat.npu_gmm follows the seed operator's signature and semantics (float64 references)."""

import pytest
import torch

from moetron.compat import npu_gmm
from tests._tolerance import assert_close_to_ref


def _loop(x, w, counts, bias=None):
    out, s = [], 0
    for g, c in enumerate(counts):
        out.append(x[s:s + c] @ w[g] + (0 if bias is None else bias[g]))
        s += c
    return torch.cat(out)


@pytest.mark.parametrize("group_list_type", [0, 1], ids=["cumulative", "counts"])
def test_m_grouped(group_list_type):
    counts = [4, 0, 9, 3]  # an empty group; group_list as a Python list
    x, w, b = torch.randn(16, 12), torch.randn(4, 12, 10), torch.randn(4, 10)
    group_list = torch.cumsum(torch.tensor(counts), 0).tolist() if group_list_type == 0 else counts
    out = npu_gmm(x, w, bias=b, group_list=group_list, group_type=0, group_list_type=group_list_type)
    assert_close_to_ref("y", out, _loop(x.double(), w.double(), counts, b.double()), _loop(x, w, counts, b))


def test_k_grouped_and_gemm_fusion():
    """group_type=2 takes x transposed ([K, M]) and the output gradient [M, N]; gemm_fusion adds the result
    into original_weight.main_grad and returns it."""
    counts = [5, 0, 7]
    x, dy = torch.randn(12, 6), torch.randn(12, 4)
    expected = torch.stack([x[s:s + c].double().t() @ dy[s:s + c].double()
                            for s, c in zip([0, 5, 5], counts)])
    got = npu_gmm(x.t(), dy, group_list=torch.tensor(counts), group_type=2, group_list_type=1)
    assert_close_to_ref("dw", got, expected, torch.stack([x[s:s + c].t() @ dy[s:s + c]
                                                          for s, c in zip([0, 5, 5], counts)]))
    weight = torch.nn.Parameter(torch.randn(3, 6, 4))
    weight.main_grad = torch.ones(3, 6, 4)
    returned = npu_gmm(x.t(), dy, group_list=[5, 5, 12], group_type=2, gemm_fusion=True, original_weight=weight)
    assert returned is weight.main_grad
    assert torch.allclose(weight.main_grad.double(), expected + 1, atol=1e-5)


def test_plain_matmul():
    x, w, b = torch.randn(5, 3), torch.randn(3, 2), torch.randn(2)
    assert torch.allclose(npu_gmm(x, w, bias=b, group_type=-1), x @ w + b)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"group_type": 1, "group_list": [2, 4]}, NotImplementedError, "n-grouped"),
    ({"group_type": 3, "group_list": [2, 4]}, ValueError, "group_type must be one of"),
    ({"group_type": 0, "group_list": [2, 4], "group_list_type": 2}, ValueError, "group_list_type must be"),
    ({"group_type": 0}, ValueError, "group_list is required"),
    ({"group_type": 0, "group_list": [2, 4], "gemm_fusion": True}, ValueError, "gemm_fusion=True applies"),
    ({"group_type": 2, "group_list": [2, 4], "gemm_fusion": True}, ValueError, "needs original_weight"),
    ({"group_type": -1, "group_list": [2, 4]}, ValueError, "group_list must be None"),
])
def test_bad_arguments(kwargs, exc, match):
    x, w = torch.randn(4, 3), torch.randn(2, 3, 5)
    if kwargs.get("group_type") == 2:
        x, w = torch.randn(3, 4), torch.randn(4, 5)
    with pytest.raises(exc, match=match):
        npu_gmm(x, w, **kwargs)


def test_list_inputs_are_refused():
    with pytest.raises(TypeError, match="single tensors"):
        npu_gmm([torch.randn(2, 3)], [torch.randn(3, 4)], group_list=[2])
