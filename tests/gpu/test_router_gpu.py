"""TopKRouter on the GPU: the bf16-activation path runs the fp32 gate GEMMs as bf16 tensor-core GEMMs over an
exact bf16 split; its logits and gradients must stay at fp32 accuracy against a float64 reference."""

import pytest
import torch

from moetron.router import RouterConfig, TopKRouter, _use_split_gemm
from tests._tolerance import assert_close_to_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("T,H,E,K", [(8192, 2048, 128, 8), (1000, 1024, 64, 8), (3, 96, 7, 2)])
def test_split_gate_gemm_has_fp32_accuracy(T, H, E, K):
    torch.manual_seed(T + E)
    router = TopKRouter(RouterConfig(hidden_size=H, num_experts=E, top_k=K, z_loss_coeff=1e-3), device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert _use_split_gemm(x, router.weight, torch.float32)
    router(x).probs.sum().backward()  # training: the aux and z losses add their gradients through the logits

    router.eval()  # no losses: the logits' gradient is g alone
    x.grad, router.weight.grad = None, None
    out = router(x)
    g = torch.randn_like(out.logits)
    out.logits.backward(g)
    w64, x64, g64 = router.weight.detach().double(), x.detach().double(), g.double()
    assert_close_to_ref("logits", out.logits, x64 @ w64.t(), x.detach().float() @ router.weight.detach().t())
    assert_close_to_ref("dx", x.grad, g64 @ w64, (g @ router.weight.detach()).bfloat16())
    assert_close_to_ref("dw", router.weight.grad, g64.t() @ x64, g.t() @ x.detach().float())


def _routing_ref(logits, k, aux_coeff, z_coeff, g):
    """softmax over the k selected logits, aux and z losses, their gradient into the logits; in logits' dtype."""
    lg = logits.detach().clone().requires_grad_(True)
    T, E = lg.shape
    top, ids = torch.topk(lg, k, dim=-1)
    probs = torch.softmax(top, dim=-1)
    counts = torch.zeros(E, dtype=lg.dtype, device=lg.device).scatter_add_(0, ids.reshape(-1),
                                                                         torch.ones_like(ids.reshape(-1), dtype=lg.dtype))
    aux = (torch.softmax(lg, dim=-1).sum(0) * counts).sum() * E / (k * T * T)
    z = torch.logsumexp(lg, dim=-1).square().sum() / T
    ((probs * g).sum() + aux_coeff * aux + z_coeff * z).backward()
    return probs, ids, aux, z, lg.grad


@pytest.mark.parametrize("T,E,K", [(8192, 128, 8), (4099, 64, 8), (3000, 8, 2)])
def test_fused_routing_kernels_against_float64(T, E, K):
    from moetron.ops.routing import softmax_topk

    torch.manual_seed(T)
    logits = torch.randn(T, E, device="cuda") * 2
    g = torch.randn(T, K, device="cuda")
    lg = logits.clone().requires_grad_(True)
    probs, ids, counts, losses = softmax_topk(lg, K, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    (probs * g).sum().backward()
    p64, ids64, aux64, z64, d64 = _routing_ref(logits.double(), K, 0.01, 1e-3, g.double())
    p32, _, aux32, z32, d32 = _routing_ref(logits, K, 0.01, 1e-3, g)
    assert torch.equal(ids, ids64)
    assert torch.equal(counts, torch.bincount(ids64.reshape(-1), minlength=E))
    assert_close_to_ref("probs", probs, p64, p32)
    assert_close_to_ref("aux_loss", losses["aux_loss"], aux64, aux32)
    assert_close_to_ref("z_loss", losses["z_loss"], z64, z32)
    assert_close_to_ref("dlogits", lg.grad, d64, d32)
