"""The model on a GPU runs moetron's fused RMSNorm and rotary kernels (the CPU keeps torch's ops): its loss and
gradients must match the same weights run on the CPU in float32 (torch's rms_norm and the rotate-half formula
there), and under bf16 autocast stay close to them."""

import pytest
import torch

from moetron.models import ModelConfig, MoETransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
           num_experts=4, top_k=2, moe_ffn_hidden_size=32, first_k_dense=1, dense_ffn_hidden_size=96)


@pytest.mark.parametrize("qk_norm_per_head", [True, False])
def test_gpu_loss_and_grads_match_cpu(qk_norm_per_head):
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG, qk_norm=True, qk_norm_per_head=qk_norm_per_head)
    ref = MoETransformer(cfg)
    gpu = MoETransformer(cfg, device="cuda")
    gpu.load_state_dict(ref.state_dict())
    with torch.no_grad():  # norm weights away from 1 so that dweight and the weight's effect are both tested
        for (name, p_ref), p_gpu in zip(ref.named_parameters(), gpu.parameters()):
            if name.endswith("norm.weight"):
                p_ref.uniform_(0.5, 1.5)
                p_gpu.copy_(p_ref)
    x = torch.randint(0, 64, (3, 20))
    y = torch.randint(0, 64, (3, 20))
    loss_ref = ref(x, y)
    loss_ref.backward()
    loss = gpu(x.cuda(), y.cuda())
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for (name, p_ref), p_gpu in zip(ref.named_parameters(), gpu.parameters()):
        g_ref, g = p_ref.grad, p_gpu.grad
        assert g is not None, name
        scale = g_ref.abs().max().item()
        err = (g.cpu() - g_ref).abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-6), f"{name}: max error {err:.3g} vs scale {scale:.3g}"

    # bf16 autocast (the training setting): the norms write bf16, the loss stays close to float32's
    gpu.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_bf16 = gpu(x.cuda(), y.cuda())
    loss_bf16.backward()
    assert abs(loss_bf16.item() - loss_ref.item()) <= 2e-2 * abs(loss_ref.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
