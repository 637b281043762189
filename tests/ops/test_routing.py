"""The fused softmax top-k routing kernels (moetron/ops/routing.py), run in Triton's interpreter.

The router takes them on Triton's path for softmax scores without groups, expert bias or sinkhorn, fp32 gate
maths and at most the "aux_loss" balancing type. Each case goes through ``tests/test_router.compare``: the float64
reference written from the formulas (per-token loops, no shared code) checks ids and counts exactly, and probs,
the loss values and the gradients of x and the router weight (injected loss gradients included). Token counts
span several programs of the forward kernel (BT = 4096 / BE rows each), with a ragged last one.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from moetron.router import AuxLossAutoScaler, RouterConfig, TopKRouter
from tests.test_router import cfg, compare, make_router, one_expert_setup

routing = importlib.import_module("moetron.ops.routing")

# CPU tensors on Triton's path need the interpreter, which conftest.py switches on only without a GPU; on a GPU the
# fused routing kernels are checked by tests/gpu/test_router_gpu.py.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (CPU tensors on Triton's path)")


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    monkeypatch.setattr(AuxLossAutoScaler, "loss_scale", 1.0)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the router's calls of the fused op, so a case cannot pass on the PyTorch code by accident."""
    calls = []
    real = routing.softmax_topk

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(routing, "softmax_topk", spy)
    return calls


CASES = {
    "softmax over the k selected logits": (dict(), 16),
    "pre-softmax": (dict(pre_softmax=True), 16),
    "pre-softmax renormalised": (dict(pre_softmax=True, norm_topk_prob=True), 16),
    "scaling factor": (dict(scaling_factor=2.5), 16),
    "aux loss": (dict(load_balancing="aux_loss", aux_loss_coeff=0.1), 16),
    "aux + z-loss, pre-softmax renormalised": (dict(load_balancing="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01,
                                                    pre_softmax=True, norm_topk_prob=True), 16),
    "z-loss alone": (dict(z_loss_coeff=0.05), 16),
    "coeff 0 reports the loss without its gradient": (dict(load_balancing="aux_loss", aux_loss_coeff=0.0), 16),
    "one token": (dict(load_balancing="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01), 1),
    "K = E": (dict(num_experts=5, top_k=5, load_balancing="aux_loss", aux_loss_coeff=0.1), 8),
    "prime E, pre-softmax": (dict(num_experts=7, top_k=3, pre_softmax=True, load_balancing="aux_loss",
                                  aux_loss_coeff=0.1), 14),
    "three programs, ragged (E = 8: 512 rows each)": (dict(load_balancing="aux_loss", aux_loss_coeff=0.1,
                                                           z_loss_coeff=0.01), 1100),
    "E = 128, K = 8 (Qwen3), two programs": (dict(num_experts=128, top_k=8, pre_softmax=True, norm_topk_prob=True,
                                                  load_balancing="aux_loss", aux_loss_coeff=0.01), 40),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kw,T", list(CASES.values()), ids=list(CASES))
def test_fused_router_matches_reference(kw, T, training, fused_calls):
    compare(cfg(**kw), T=T, seed=5, training=training)
    assert fused_calls, "the router did not take the fused path"


def test_every_token_to_one_expert(fused_calls):
    c = cfg(top_k=1, load_balancing="aux_loss", aux_loss_coeff=0.1, z_loss_coeff=0.01)
    router, x = one_expert_setup(c)
    out, _ = compare(c, T=12, seed=20, router=router, x=x)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 12, 0, 0, 0, 0]
    assert fused_calls


def test_loss_scale_is_read_at_backward_time(fused_calls):
    # AuxLossAutoScaler's contract: the scale in force when backward runs multiplies the injected gradient
    c = cfg(load_balancing="aux_loss", aux_loss_coeff=0.5, z_loss_coeff=0.1)
    grads = []
    for scale in (1.0, 3.0, torch.tensor(3.0)):
        router = make_router(c, seed=6)
        out = router(torch.randn(20, 16, generator=torch.Generator().manual_seed(6)))
        AuxLossAutoScaler.loss_scale = scale
        (out.probs * 0).sum().backward()  # only the injected loss gradients reach the weight
        grads.append(router.weight.grad.clone())
        AuxLossAutoScaler.loss_scale = 1.0
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 3 * grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[1], rtol=0, atol=0)
    assert len(fused_calls) == 3


def test_outputs_fully_written_and_deterministic(monkeypatch):
    # poisoned allocations: an element the kernels forget to write shows up as NaN or a wild id
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -777) if t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    logits = torch.randn(700, 24) * 2
    runs = []
    for _ in range(2):
        lg = logits.clone().requires_grad_(True)
        probs, ids, counts, losses = routing.softmax_topk(lg, 4, aux_loss_coeff=0.1, z_loss_coeff=0.01)
        (probs * torch.linspace(-1, 1, 4)).sum().backward()
        runs.append((probs, ids, counts, losses["aux_loss"], losses["z_loss"], lg.grad))
    for t in runs[0]:
        assert not (t.isnan().any() if t.is_floating_point() else (t < 0).any())
    assert runs[0][1].max() < 24 and int(runs[0][2].sum()) == 700 * 4
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_not_fused_where_the_maths_differs(fused_calls):
    # sigmoid scores, groups, expert bias, sequence / global aux losses and fp64 keep the PyTorch code
    for kw in (dict(score_function="sigmoid"), dict(num_experts=12, top_k=4, num_groups=4, group_topk=2),
               dict(score_function="sigmoid", expert_bias=True),
               dict(load_balancing="seq_aux_loss", aux_loss_coeff=0.1),
               dict(load_balancing="global_aux_loss", aux_loss_coeff=0.1), dict(router_dtype="fp64")):
        router = TopKRouter(RouterConfig(**{**dict(hidden_size=16, num_experts=8, top_k=2), **kw}))
        router(torch.randn(8, 16), seq_len=4)
    assert not fused_calls


def test_bad_input_raises():
    with pytest.raises(ValueError, match="float32"):
        routing.softmax_topk(torch.randn(4, 8, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="k <= min"):
        routing.softmax_topk(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="T > 0"):
        routing.softmax_topk(torch.randn(0, 8), 2)
