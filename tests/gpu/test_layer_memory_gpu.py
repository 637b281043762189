"""MoEConfig.reuse_activation_memory on the GPU: the experts' backward writes its gradients over the activations it
has finished with, so a training step's peak memory drops by about one [T·K, 2F] buffer, with bitwise the same
gradients. Memory is counted by the caching allocator (deterministic), not timed."""

import pytest
import torch

from moetron import MoEConfig, MoELayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step_peak(reuse: bool, x, dy):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=256, ffn_hidden_size=1024, num_experts=8, top_k=2, reuse_activation_memory=reuse)
    layer = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
    xi = x.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(xi).backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak, [xi.grad] + [p.grad for p in layer.parameters()]


def test_reusing_activation_memory_lowers_the_backward_peak():
    T, H, F, K = 4096, 256, 1024, 2
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    kept_peak, kept_grads = _step_peak(False, x, dy)
    reused_peak, reused_grads = _step_peak(True, x, dy)
    for a, b in zip(kept_grads, reused_grads):
        assert torch.equal(a, b)
    h_bytes = T * K * 2 * F * 2  # the first projection's [T·K, 2F] bf16 output
    # without reuse the peak is the gated activation's backward: x_perm, h, da and a new dh; with it, dh is
    # written over h (and da over the activation), and the peak falls to the forward's
    assert kept_peak - reused_peak >= h_bytes // 2, (kept_peak, reused_peak, h_bytes)
