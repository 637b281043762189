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
