"""MoELayer under activation checkpointing (torch.utils.checkpoint, reentrant and not), as fine-tuning scripts
enable it: over several micro-batches, each run forward then backward, the input and parameter gradients and the
aux-loss-free expert bias after its update are bitwise those of the same steps without checkpointing.

Why this can go wrong: the router accumulates counts in the forward (global aux loss, expert bias). Reentrant
checkpointing runs the first forward under no_grad, where nothing is counted, and counts in the recomputation;
non-reentrant checkpointing counts in both passes, so the counters hold every micro-batch twice. The global aux
loss uses their mean over calls and the bias update their sign against the mean, which a uniform doubling leaves
unchanged when each micro-batch's recomputation follows its own forward (this test's order); schedules that run
several forwards before their backwards (pipeline parallelism) would see different means there."""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moetron.layer import MoEConfig, MoELayer

CONFIGS = {
    # softmax with aux and z-loss: the fused routing kernels on Triton's path
    "softmax_aux_z": dict(load_balancing=("aux_loss",), z_loss_coeff=1e-2),
    # sigmoid with the global aux loss and the expert bias: both counters
    "sigmoid_global_aux_bias": dict(score_function="sigmoid", load_balancing=("global_aux_loss",), expert_bias=True,
                                    z_loss_coeff=1e-2),
}


def _steps(layer, xs, mode):
    grads = []
    for x in xs:
        xg = x.clone().requires_grad_(True)
        y = layer(xg) if mode == "none" else checkpoint(layer, xg, use_reentrant=mode == "reentrant")
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        grads.append(xg.grad)
    if layer.router.expert_bias is not None:
        layer.router.update_expert_bias()
        grads.append(layer.router.expert_bias.clone())
    return grads + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpointed_steps_match(monkeypatch, config, mode, backend):
    monkeypatch.setenv("MOETRON_BACKEND", backend)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, aux_loss_coeff=0.1,
                    **CONFIGS[config])
    plain = MoELayer(cfg, device=device)
    checkpointed = copy.deepcopy(plain)
    xs = [torch.randn(20, 32, device=device) for _ in range(3)]
    for got, want in zip(_steps(checkpointed, xs, mode), _steps(plain, xs, "none")):
        assert torch.equal(got, want)
