"""The router's fp32 GEMMs on bf16 tensor cores (moetron/ops/router_gemm.py), in Triton's interpreter (on a GPU
machine, on CUDA): logits, dx and dw against float64, under the DESIGN.md rule with an fp32 GEMM (bf16 dx) as
the baseline. Shapes are unaligned and span several tiles and token chunks; every allocation is poisoned."""

from __future__ import annotations

import importlib

import pytest
import torch

from moetron.router import RouterConfig, TopKRouter
from tests._tolerance import assert_close_to_ref

router_gemm = importlib.import_module("moetron.ops.router_gemm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "triton" if DEVICE == "cpu" else "auto")


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty fills with NaN: an output element (or a partial chunk) the kernels skip shows up."""
    real = torch.empty

    def empty(*a, **k):
        t = real(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    monkeypatch.setattr(torch, "empty", empty)


def _inputs(T, H, E, w_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).bfloat16()
    w = (torch.randn(E, H, generator=gen) * 0.05).to(w_dtype)
    g = torch.randn(T, E, generator=gen)
    return x.to(DEVICE), w.to(DEVICE), g.to(DEVICE)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,E", [
    (37, 45, 7),  # nothing aligned: ragged tiles in every dimension
    (50, 130, 20),  # several tiles of tokens, hidden and experts, several token chunks in dw
    (1, 16, 1),  # one token, one expert
    (70, 24, 33),  # E past a power of two
])
def test_matches_float64(T, H, E, w_dtype, poisoned):
    x, w, g = _inputs(T, H, E, w_dtype, seed=T * 100 + E)
    x_leaf, w_leaf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = router_gemm.router_logits(x_leaf, w_leaf)
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    logits.backward(g)
    x64, w64, g64 = x.double().cpu(), w.double().cpu(), g.double().cpu()
    xf, wf, gf = x.float(), w.float(), g
    # a tenth of the usual slack: a missing third part of w (~2^-17 relative) would hide under 1e-5
    assert_close_to_ref("logits", logits, (x64 @ w64.t()).to(logits.device), xf @ wf.t(), slack=1e-6)
    assert x_leaf.grad.dtype == torch.bfloat16 and w_leaf.grad.dtype == w_dtype
    assert_close_to_ref("dx", x_leaf.grad, (g64 @ w64).to(DEVICE), (gf @ wf).bfloat16())
    assert_close_to_ref("dw", w_leaf.grad, (g64.t() @ x64).to(DEVICE), (gf.t() @ xf).to(w_dtype), slack=1e-6)


def test_one_gradient_at_a_time_and_deterministic():
    x, w, g = _inputs(45, 40, 9, torch.float32, seed=3)
    runs = []
    for _ in range(2):
        x_leaf, w_leaf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        router_gemm.router_logits(x_leaf, w_leaf).backward(g)
        runs.append((x_leaf.grad, w_leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    w_only = w.clone().requires_grad_(True)
    router_gemm.router_logits(x, w_only).backward(g)
    assert torch.equal(w_only.grad, runs[0][1])
    x_only = x.clone().requires_grad_(True)
    router_gemm.router_logits(x_only, w).backward(g)
    assert torch.equal(x_only.grad, runs[0][0])


@pytest.mark.parametrize("uses", ["both", "logits_only", "tokens_only"])
def test_passing_tokens_adds_their_gradient_in_the_dx_kernel(uses, poisoned):
    """``pass_tokens=True``: tokens has x's values, and x's gradient is bit for bit what autograd's own sum of the
    logits' and the tokens' gradients gives (the unfused form, run beside it), w's gradient unchanged; with only
    one of the two outputs used, x's gradient is that one's."""
    T, H, E = 50, 130, 20  # several tiles in every dimension, ragged edges
    x, w, g = _inputs(T, H, E, torch.bfloat16, seed=11)
    u = torch.randn(T, H, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def loss(logits, tokens):
        parts = []
        if uses != "tokens_only":
            parts.append((logits * g).sum())
        if uses != "logits_only":
            parts.append((tokens.float() * u).sum())
        return sum(parts)

    x_leaf, w_leaf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits, tokens = router_gemm.router_logits(x_leaf, w_leaf, pass_tokens=True)
    assert torch.equal(tokens, x) and tokens is not x_leaf and tokens.data_ptr() == x_leaf.data_ptr()
    loss(logits, tokens).backward()
    x_twin, w_twin = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss(router_gemm.router_logits(x_twin, w_twin), x_twin).backward()
    assert torch.equal(x_leaf.grad, x_twin.grad)
    if uses == "tokens_only":
        assert w_leaf.grad is None and w_twin.grad is None
    else:
        assert torch.equal(w_leaf.grad, w_twin.grad)


def test_router_takes_it_for_bf16_activations(monkeypatch):
    """TopKRouter with bf16 x and fp32 gate maths runs these kernels on Triton's path (a spy counts the calls),
    and its logits and gradients match the PyTorch backend's within the rule."""
    calls = []
    real = router_gemm.router_logits
    monkeypatch.setattr(router_gemm, "router_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = RouterConfig(hidden_size=40, num_experts=12, top_k=3, load_balancing="aux_loss", aux_loss_coeff=0.1)
    torch.manual_seed(0)
    router = TopKRouter(cfg).to(DEVICE)
    x = torch.randn(29, 40, device=DEVICE).bfloat16()
    results = []
    for backend in ("triton" if DEVICE == "cpu" else "auto", "torch"):
        monkeypatch.setenv("MOETRON_BACKEND", backend)
        router.weight.grad = None
        xi = x.clone().requires_grad_(True)
        out = router(xi)
        (out.probs * torch.arange(1.0, 4.0, device=DEVICE)).sum().backward()
        results.append((out.logits.detach(), xi.grad, router.weight.grad))
    assert len(calls) == 1
    x64, w64 = x.double().cpu(), router.weight.detach().double().cpu()
    ref = x64 @ w64.t()
    assert_close_to_ref("logits", results[0][0], ref.to(DEVICE), results[1][0])
    for name, got, want in zip(("dx", "dw"), results[0][1:], results[1][1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("x_dtype,w_dtype,why", [
    (torch.float32, torch.float32, "fp32 activations take one fp32 GEMM"),
    (torch.float16, torch.float32, "fp16 activations"),
    (torch.bfloat16, torch.float64, "an fp64 weight"),
])
def test_applies_only_to_its_case(x_dtype, w_dtype, why):
    x = torch.zeros(4, 8, dtype=x_dtype)
    w = torch.zeros(3, 8, dtype=w_dtype)
    assert not router_gemm.applies(x, w), why
    with pytest.raises(ValueError, match="router_logits takes bf16 x"):
        router_gemm.router_logits(x, w)
    assert router_gemm.applies(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(3, 8))
    assert not router_gemm.applies(torch.zeros(0, 8, dtype=torch.bfloat16), torch.zeros(3, 8))
    assert not router_gemm.applies(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(3, 9))


def test_moe_layer_hands_the_experts_the_routers_tokens(monkeypatch):
    """MoELayer dispatches RouterOutput.tokens, so x's gradient from the experts is added in the router's dx kernel
    (a spy sees the dx kernel take it), with the same output and x gradient, bit for bit, as when the router
    hands back x itself and autograd sums the two gradients."""
    from moetron.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2), device=DEVICE,
                     dtype=torch.bfloat16)
    x = torch.randn(19, 32, device=DEVICE).bfloat16()
    u = torch.randn(19, 32, device=DEVICE)
    added = []
    real_dx = router_gemm._dx
    monkeypatch.setattr(router_gemm, "_dx", lambda *a, add=None: added.append(add is not None) or real_dx(*a, add=add))

    def run():
        layer.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_(True)
        y = layer(x_leaf)
        (y.float() * u).sum().backward()
        return y.detach(), x_leaf.grad, layer.router.weight.grad

    fused = run()
    assert added == [True]
    real_logits = router_gemm.router_logits
    monkeypatch.setattr(router_gemm, "router_logits",
                        lambda x, w, pass_tokens=False: (real_logits(x, w), x) if pass_tokens else real_logits(x, w))
    plain = run()
    assert added == [True, False]
    for name, got, want in zip(("y", "dx", "dw"), fused, plain):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("flag", [1, "yes", None])
def test_router_logits_pass_tokens_must_be_a_bool(flag):
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w = torch.randn(8, 32)
    with pytest.raises(TypeError, match="pass_tokens must be a bool"):
        router_gemm.router_logits(x, w, pass_tokens=flag)
