"""MoELayer (router -> permute -> grouped experts -> unpermute + shared experts) against independent oracles.

1. A float64 reference of the whole layer written plainly below: its own routing maths (per-token loops), its
   own capacity competition (a Python recount), its own expert loop and activations, its own aux losses. It
   shares no code with moetron; it only receives a copy of the layer's weights. Outputs and ALL gradients
   (x, router weight, expert weights and biases, shared-expert weights) must meet the DESIGN.md tolerance rule:
   the layer's max error against the float64 reference is at most twice the error of the same reference run in
   the layer's dtype, plus a tiny slack. Counts (kept / routed per expert, dropped) must match exactly.
   The layer runs in fp32 on the torch backend for most cases: moetron.gmm and permute take fp16/bf16/fp32
   only, so a float64 layer is not possible; fp32 against float64 with the rule above is tight (~1e-7).
   A few small cases run the Triton kernels (interpreter on CPU) in bf16 and fp32.
2. Real peers: Hugging Face transformers' Qwen3-MoE, Qwen2-MoE, Mixtral and DeepSeek-V3 MoE blocks, built from
   tiny random configs, with their weights copied into a MoELayer. Their float64 run is the reference, their
   fp32 run the baseline.

Inputs are continuous random draws under fixed seeds, so top-k and capacity ties do not occur. Shapes are tiny.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetron import GroupedExperts, MoEConfig, MoELayer, SequentialExperts, SharedExperts
from moetron.router import AuxLossAutoScaler
from tests._tolerance import assert_close_to_ref

F64 = torch.float64
H, FF = 16, 12  # hidden and expert ffn widths: FF is not a multiple of the interpreter's 16-wide tiles


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "torch")
    monkeypatch.delenv("MOETRON_DEBUG", raising=False)
    monkeypatch.setattr(AuxLossAutoScaler, "loss_scale", 1.0)


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """torch.empty / empty_like fill their result with NaN (floats) or a wild value (ints) while the test runs,
    so a buffer row that a kernel forgets to write cannot pass for a zero."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    wild = {torch.bool: True, torch.int8: -77, torch.uint8: 200}  # values each dtype can hold

    def poison(t):
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else wild.get(t.dtype, -777))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


# ---------------------------------------------------------------------------------------------------------
# The reference, written from the formulas (Megatron-Core semantics, see moetron/router.py's docstring)
# ---------------------------------------------------------------------------------------------------------


def best(values, k):
    """Indices of the k largest values, largest first."""
    return sorted(range(len(values)), key=lambda i: -float(values[i]))[:k]


def softmax_vec(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def sigmoid_vec(v):
    return 1.0 / (1.0 + torch.exp(-v))


def sinkhorn_ref(logits):
    """Megatron's published sinkhorn on exp(logits): scale rows to 1/T and columns to 1/E until the column
    scaling moves by less than 1e-4 on average."""
    cost = torch.exp(logits.double())
    T, E = cost.shape
    r, c = torch.ones(T, dtype=F64), torch.ones(E, dtype=F64)
    while True:
        r = (1.0 / T) / ((c * cost).sum(1) + 1e-8)
        c_new = (1.0 / E) / ((r[:, None] * cost).sum(0) + 1e-8)
        done = (c_new - c).abs().mean().item() <= 1e-4
        c = c_new
        if done:
            return c * cost * r[:, None]


def activation_ref(h, activation, f):
    """Activation formulas written out (no torch.nn.functional)."""
    if activation in ("swiglu", "geglu"):
        g, u = h[..., :f], h[..., f:]
        if activation == "swiglu":
            return g * sigmoid_vec(g) * u
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))) * u
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return torch.clamp(h, min=0.0) ** 2  # relu2


def switch_loss_ref(score_rows, K, E):
    """E / (K T^2) * sum_e (sum_t score[t, e]) * count[e], counts from a plain top-k of each score row."""
    T = len(score_rows)
    counts = [0] * E
    for row in score_rows:
        for e in best(row.detach().tolist(), K):
            counts[e] += 1
    total = sum(score_rows)
    return E / (K * T * T) * sum(total[e] * counts[e] for e in range(E))


def capacity_ref(T, cfg):
    if cfg.capacity_factor is None:
        return None
    c = math.ceil(Fraction(T * cfg.top_k) * Fraction(cfg.capacity_factor) / cfg.num_experts)
    return math.ceil(c / cfg.pad_to) * cfg.pad_to


def reference_layer(x, P, cfg: MoEConfig, *, expert_bias=None, training=True, seq_len=None, dtype=F64,
                    route_dtype=F64):
    """The whole layer on x [T, H]. P: {layer parameter name: tensor}. Experts run in ``dtype``, routing in
    ``route_dtype``. Returns (y [T, H], coefficient-weighted loss sum to add to the objective, info)."""
    E, K, f = cfg.num_experts, cfg.top_k, cfg.ffn_hidden_size
    T = x.shape[0]
    logits = x.to(route_dtype) @ P["router.weight"].to(route_dtype).t()
    sinkhorn = cfg.load_balancing == ("sinkhorn",)
    norm = cfg.norm_topk_prob
    if norm is None:
        norm = cfg.score_function == "sigmoid" or not cfg.pre_softmax
    sk = sinkhorn_ref(logits.detach()) if sinkhorn and training else None

    # routing, one token at a time
    probs, ids = [], []
    for t in range(T):
        l = logits[t]
        if sinkhorn:
            w = sigmoid_vec(l) if K == 1 else softmax_vec(l)
            chosen = best((sk[t] if training else w).detach().tolist(), K)
            p = torch.stack([w[e] for e in chosen])
        else:
            if cfg.score_function == "softmax":
                s = softmax_vec(l)
                key = (s if cfg.pre_softmax else l).detach().tolist()
            else:
                s = sigmoid_vec(l)
                key = s.detach().tolist()
                if expert_bias is not None:
                    key = [v + float(b) for v, b in zip(key, expert_bias)]
            allowed = list(range(E))
            if cfg.num_groups:
                n = E // cfg.num_groups
                group_score = [sum(sorted(key[g * n:(g + 1) * n], reverse=True)[:K // cfg.group_topk])
                               for g in range(cfg.num_groups)]
                groups = best(group_score, cfg.group_topk)
                allowed = [e for e in range(E) if e // n in groups]
            chosen = sorted(allowed, key=lambda e: -key[e])[:K]
            if cfg.score_function == "softmax" and not cfg.pre_softmax:
                p = softmax_vec(torch.stack([l[e] for e in chosen]))
            else:
                p = torch.stack([s[e] for e in chosen])
                if norm and K > 1:
                    p = p / p.sum()
            if cfg.scaling_factor is not None:
                p = p * cfg.scaling_factor
        probs.append(p)
        ids.append(chosen)

    # capacity: a recount per expert
    routed = [sum(row.count(e) for row in ids) for e in range(E)]
    kept = {(t, k) for t in range(T) for k in range(K)}
    C = capacity_ref(T, cfg)
    if C is not None:
        for e in range(E):
            slots = [(t, k) for t in range(T) for k in range(K) if ids[t][k] == e]
            if len(slots) > C:
                if cfg.drop_policy == "probs":
                    ranked = sorted(slots, key=lambda s: (-float(probs[s[0]][s[1]].detach()), s))
                else:
                    ranked = slots
                kept -= set(ranked[C:])
    kept_counts = [sum(1 for (t, k) in kept if ids[t][k] == e) for e in range(E)]

    # experts, one slot at a time
    w1 = P.get("experts.gate_up_proj", P.get("experts.up_proj"))
    b1 = P.get("experts.gate_up_proj_bias", P.get("experts.up_proj_bias"))
    w2, b2 = P["experts.down_proj"], P.get("experts.down_proj_bias")
    xd = x.to(dtype)
    rows = []
    for t in range(T):
        acc = torch.zeros(x.shape[1], dtype=dtype)
        for k in range(K):
            if (t, k) not in kept:
                continue
            e = ids[t][k]
            h = xd[t] @ w1[e].to(dtype).t()
            if b1 is not None:
                h = h + b1[e].to(dtype)
            o = activation_ref(h, cfg.activation, f) @ w2[e].to(dtype).t()
            if b2 is not None:
                o = o + b2[e].to(dtype)
            acc = acc + probs[t][k].to(dtype) * o
        rows.append(acc)
    y = torch.stack(rows) if rows else torch.zeros(0, x.shape[1], dtype=dtype)

    # shared experts
    if cfg.shared_expert_ffn_hidden_size is not None:
        up = xd @ P["shared_experts.up_proj.weight"].to(dtype).t()
        if cfg.activation in ("swiglu", "geglu"):
            up = torch.cat([xd @ P["shared_experts.gate_proj.weight"].to(dtype).t(), up], dim=-1)
        ys = activation_ref(up, cfg.activation, cfg.shared_expert_ffn_hidden_size)
        ys = ys @ P["shared_experts.down_proj.weight"].to(dtype).t()
        if cfg.shared_expert_gate:
            ys = sigmoid_vec(xd @ P["shared_experts.gate.weight"].to(dtype).t()) * ys
        y = y + ys

    # losses
    losses = {}
    if training and not sinkhorn and T > 0:
        if cfg.score_function == "softmax":
            score_rows = [softmax_vec(logits[t]) for t in range(T)]
        else:
            score_rows = [sigmoid_vec(logits[t]) / sigmoid_vec(logits[t]).sum() for t in range(T)]
        for name in cfg.load_balancing:
            if name in ("aux_loss", "global_aux_loss"):  # one call: the running mean counts are this call's
                losses[name] = switch_loss_ref(score_rows, K, E)
            elif name == "seq_aux_loss":
                per_seq = [switch_loss_ref(score_rows[b:b + seq_len], K, E) for b in range(0, T, seq_len)]
                losses[name] = sum(per_seq) / len(per_seq)
        if cfg.z_loss_coeff is not None:
            losses["z_loss"] = sum(torch.logsumexp(logits[t], 0) ** 2 for t in range(T)) / T
    coeffs = cfg.aux_loss_coeff
    if not isinstance(coeffs, tuple):
        coeffs = (coeffs,) * len(cfg.load_balancing)
    coeff = dict(zip(cfg.load_balancing, coeffs), z_loss=cfg.z_loss_coeff)
    extra = sum((coeff[n] * v for n, v in losses.items()), torch.zeros((), dtype=route_dtype))
    info = dict(kept=kept_counts, routed=routed, dropped=T * K - len(kept), losses=losses, capacity=C)
    return y, extra, info


# ---------------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------------


def make_cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=H, ffn_hidden_size=FF, num_experts=6, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


@torch.no_grad()
def randomize(layer: MoELayer, seed: int) -> None:
    """Weights of a realistic scale (logits ~ N(0, 1)), biases and expert bias non-zero."""
    g = torch.Generator().manual_seed(seed + 1000)
    for name, p in layer.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(0.1 * torch.randn(layer.router.expert_bias.shape, generator=g))


def _select_backend(monkeypatch, backend: str) -> str:
    """Routes the layer to a backend and returns the device its tensors go on: "triton" means the CUDA kernels
    on a GPU machine and Triton's interpreter on CPU tensors elsewhere."""
    if backend == "triton" and torch.cuda.is_available():
        monkeypatch.setenv("MOETRON_BACKEND", "auto")
        return "cuda"
    monkeypatch.setenv("MOETRON_BACKEND", backend)
    return "cpu"


def check_layer(cfg: MoEConfig, *, shape=(12, H), seed=0, dtype=torch.float32, training=True, seq_len=None,
                setup=None, x=None, device="cpu"):
    """Runs the layer and the reference (float64, and in the layer's dtype as the baseline); checks output,
    every gradient, counts and loss values. Returns (layer, info)."""
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    randomize(layer, seed)
    if setup is not None:
        setup(layer)
    layer.to(device, dtype).train(training)
    if x is None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = x.to(device, dtype)
    x_l = x.clone().requires_grad_()
    y = layer(x_l, seq_len)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 7)).to(device, dtype)
    y.backward(dy)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    got = [x_l.grad] + [p.grad for _, p in layer.named_parameters()]

    bias = layer.router.expert_bias
    bias = None if bias is None else bias.tolist()
    if seq_len is None and len(shape) == 3:
        seq_len = shape[1]

    def run_reference(ref_dtype, route_dtype):
        xr = x.detach().cpu().reshape(-1, H).to(ref_dtype).requires_grad_()
        P = {n: p.detach().cpu().to(ref_dtype).requires_grad_() for n, p in layer.named_parameters()}
        y_r, extra, info = reference_layer(xr, P, cfg, expert_bias=bias, training=training, seq_len=seq_len,
                                           dtype=ref_dtype, route_dtype=route_dtype)
        objective = (y_r * dy.cpu().reshape(-1, H).to(ref_dtype)).sum() + extra.to(ref_dtype)
        inputs = [xr] + list(P.values())
        grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
        grads[0] = grads[0].reshape(x.shape)
        return y_r.reshape(x.shape), grads, info

    y_ref, g_ref, info = run_reference(F64, F64)
    y_base, g_base, _ = run_reference(dtype, torch.float32 if dtype != F64 else F64)
    assert_close_to_ref("y", y, y_ref, y_base)
    for name, a, r, b in zip(names, got, g_ref, g_base):
        assert a is not None, f"no gradient reached {name}"
        assert_close_to_ref(f"grad of {name}", a, r, b)

    stats = layer.last_stats
    assert stats["tokens_per_expert"].tolist() == info["kept"]
    assert stats["routed_tokens_per_expert"].tolist() == info["routed"]
    assert int(stats["num_dropped"]) == info["dropped"]
    assert set(stats["losses"]) == set(info["losses"])
    for name, value in info["losses"].items():
        torch.testing.assert_close(stats["losses"][name].double().cpu(), value.detach(), rtol=2e-5, atol=1e-7)
    return layer, info


# ---------------------------------------------------------------------------------------------------------
# Layer against the reference: routers, balancing, drops, padding, activations, biases, shared experts
# ---------------------------------------------------------------------------------------------------------

ROUTING_CASES = {
    # top-k on the logits, softmax over the k (Mixtral), with the switch aux loss
    "softmax": dict(),
    # softmax over all experts then top-k, unnormalised (Qwen norm_topk_prob=False), plus the z-loss
    "pre_softmax": dict(pre_softmax=True, z_loss_coeff=1e-3),
    # pre-softmax renormalised over the k (Qwen norm_topk_prob=True)
    "pre_softmax_norm": dict(pre_softmax=True, norm_topk_prob=True),
    # DeepSeek-V3: sigmoid, expert bias for selection only, group-limited, scaled, no aux loss
    "sigmoid_bias_groups": dict(num_experts=8, top_k=4, score_function="sigmoid", expert_bias=True, num_groups=4,
                                group_topk=2, scaling_factor=2.5, load_balancing="none"),
    # sigmoid with the sequence-level aux loss (sigmoid scores normalised over E for the loss)
    "sigmoid_seq_aux": dict(score_function="sigmoid", load_balancing="seq_aux_loss", aux_loss_coeff=0.1),
    # group-limited softmax: a group scores by the sum of its top K // group_topk logits
    "softmax_groups": dict(num_experts=8, top_k=4, num_groups=4, group_topk=2),
    # routed scaling factor on softmax probs
    "scaling": dict(scaling_factor=1.7, pre_softmax=True),
    # sinkhorn selection, sigmoid weight for K=1
    "sinkhorn_k1": dict(top_k=1, load_balancing="sinkhorn"),
    # sinkhorn selection, softmax weight for K>1
    "sinkhorn_k2": dict(load_balancing="sinkhorn"),
    # all three aux losses at once, each with its own coefficient, plus z-loss
    "all_aux": dict(load_balancing=("aux_loss", "seq_aux_loss", "global_aux_loss"), aux_loss_coeff=(0.1, 0.05, 0.2),
                    z_loss_coeff=0.01),
    # z-loss alone, no balancing loss
    "z_only": dict(load_balancing="none", z_loss_coeff=0.05),
    # fp64 routing maths
    "router_fp64": dict(router_dtype="fp64", aux_loss_coeff=0.3),
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_routing_options(case):
    kw = ROUTING_CASES[case]
    seq = 4 if "seq_aux_loss" in str(kw.get("load_balancing")) else None
    check_layer(make_cfg(**kw), shape=(3, 4, H) if seq else (12, H), seed=len(case))


def test_eval_mode_has_no_losses_and_sinkhorn_selects_plainly():
    # eval: no losses, and sinkhorn falls back to a plain top-k of its weights
    layer, info = check_layer(make_cfg(load_balancing="sinkhorn"), training=False, seed=3)
    assert layer.last_stats["losses"] == {} and info["losses"] == {}


DROP_CASES = {
    # capacity 0.5·T·K/E: about half the slots dropped, highest probs kept, static E·C buffer
    "probs_padded": dict(capacity_factor=0.5, drop_policy="probs", pad_to_capacity=True),
    # same, kept rows packed (GEMMs only on kept rows)
    "probs_packed": dict(capacity_factor=0.5, drop_policy="probs", pad_to_capacity=False),
    # first slots in token order kept; C = ceil(24 / 6 * 0.6) = ceil(2.4) = 3 (rounds up, not down)
    "position_padded": dict(capacity_factor=0.6, drop_policy="position", pad_to_capacity=True),
    # C = ceil(2.8) = 3
    "position_packed": dict(capacity_factor=0.7, drop_policy="position", pad_to_capacity=False),
    # capacity rounded up to pad_to=8: C = ceil(24 / 6 * 1.25) = 5 -> 8
    "probs_pad8": dict(capacity_factor=1.25, pad_to=8, pad_to_capacity=True),
    # C = ceil(24 / 6 * 0.25) = 1 -> 2 with pad_to=2, kept rows packed, each expert's count padded to 2
    "position_pad2_packed": dict(capacity_factor=0.25, pad_to=2, drop_policy="position"),
    # sigmoid with expert bias and a capacity: drops ranked by the (scaled) sigmoid probs
    "sigmoid_probs": dict(score_function="sigmoid", expert_bias=True, scaling_factor=2.0, capacity_factor=0.5,
                          load_balancing="none"),
}


@pytest.mark.parametrize("case", DROP_CASES)
def test_capacity_drops(case):
    layer, info = check_layer(make_cfg(**DROP_CASES[case]), seed=10 + len(case))
    if DROP_CASES[case]["capacity_factor"] < 1:
        assert info["dropped"] > 0, "the case should drop slots"
    assert info["capacity"] == layer.config.capacity(12)


def test_padded_and_packed_capacity_layouts_agree():
    # the same routing laid out two ways must give the same numbers
    outs = []
    for pad in (True, False):
        torch.manual_seed(0)
        layer = MoELayer(make_cfg(capacity_factor=0.5, pad_to_capacity=pad, pad_to=2))
        randomize(layer, 0)
        x = torch.randn(10, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, layer.router.weight.grad, layer.experts.gate_up_proj.grad,
                     layer.stats()))
    for a, b in zip(outs[0][:4], outs[1][:4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert outs[0][4] == outs[1][4]


EXPERT_CASES = {
    # each expert's rows padded to a multiple of 8 (dropless)
    "pad_to_8": dict(pad_to=8),
    "geglu_bias": dict(activation="geglu", expert_linear_bias=True),
    "gelu_bias": dict(activation="gelu", expert_linear_bias=True),
    "relu2": dict(activation="relu2"),
    "swiglu_bias": dict(expert_linear_bias=True),
    # DeepSeek-style shared experts (no gate)
    "shared": dict(shared_expert_ffn_hidden_size=20),
    # Qwen2-MoE style gated shared expert
    "shared_gate": dict(shared_expert_ffn_hidden_size=20, shared_expert_gate=True),
    # non-gated activation in the shared expert too, with padding and biases
    "shared_gate_relu2_pad": dict(activation="relu2", shared_expert_ffn_hidden_size=8, shared_expert_gate=True,
                                  pad_to=8, expert_linear_bias=True),
}


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_experts_options(case):
    check_layer(make_cfg(**EXPERT_CASES[case]), seed=20 + len(case))


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------


def _all_to_expert(e):
    """Router weights that send every (positive) token to expert e first."""
    def setup(layer):
        with torch.no_grad():
            w = -torch.rand(layer.router.weight.shape)
            w[e] = 1.0 + torch.rand(w.shape[1])
            layer.router.weight.copy_(w)
    return setup


def test_every_token_to_one_expert():
    # K=1: expert 2 gets all tokens, every other expert none
    x = torch.rand(9, H) + 0.1
    layer, info = check_layer(make_cfg(top_k=1), x=x, setup=_all_to_expert(2))
    assert info["kept"] == [0, 0, 9, 0, 0, 0]


def test_every_token_to_one_expert_over_capacity():
    # the overloaded expert keeps C = ceil(9 / 6 * 2) = 3 rows, 6 slots dropped, under both policies
    x = torch.rand(9, H) + 0.1
    for policy in ("probs", "position"):
        _, info = check_layer(make_cfg(top_k=1, capacity_factor=2.0, drop_policy=policy), x=x,
                              setup=_all_to_expert(2))
        assert info["kept"] == [0, 0, 3, 0, 0, 0] and info["dropped"] == 6


def test_experts_without_tokens():
    # 2 tokens, top-1 of 8 experts: at least 6 experts idle; their weight gradients are exactly zero
    layer, info = check_layer(make_cfg(num_experts=8, top_k=1), shape=(2, H), seed=5)
    idle = [e for e, c in enumerate(info["kept"]) if c == 0]
    assert len(idle) >= 6
    assert layer.experts.gate_up_proj.grad[idle].abs().max() == 0
    assert layer.experts.down_proj.grad[idle].abs().max() == 0


def test_single_token():
    check_layer(make_cfg(), shape=(1, H), seed=6)


def test_single_token_with_capacity():
    # T=1, K=2, E=6, factor 1: C = ceil(2/6) = 1, nothing dropped (K distinct experts)
    check_layer(make_cfg(capacity_factor=1.0), shape=(1, H), seed=6)


def test_k_equals_e():
    check_layer(make_cfg(num_experts=4, top_k=4), seed=7)


def test_prime_number_of_experts():
    check_layer(make_cfg(num_experts=7, top_k=3, shared_expert_ffn_hidden_size=8), seed=8)


def test_batched_input_shape():
    # [B, S, H] in, same shape out; seq_len for seq_aux_loss inferred as S
    check_layer(make_cfg(load_balancing=("aux_loss", "seq_aux_loss")), shape=(2, 5, H), seed=9)


def test_no_tokens():
    layer = MoELayer(make_cfg(shared_expert_ffn_hidden_size=8))
    x = torch.randn(0, H, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, H)
    y.sum().backward()
    assert layer.stats()["tokens_per_expert"] == [0] * 6


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the reference
# ---------------------------------------------------------------------------------------------------------

TRITON_CASES = {
    # fp32, dropless, no expert biases: the routing weights are applied in the experts (row_scale)
    "fp32_dropless_weights_in_experts": (torch.float32, dict(z_loss_coeff=1e-3)),
    # fp32, dropless, padded to 8, biases and a gated shared expert
    "fp32_pad8_shared": (torch.float32, dict(pad_to=8, expert_linear_bias=True, shared_expert_ffn_hidden_size=8,
                                             shared_expert_gate=True)),
    # bf16, probs drops into a static E·C buffer
    "bf16_capacity_padded": (torch.bfloat16, dict(capacity_factor=0.75, pad_to_capacity=True)),
    # bf16, sigmoid with expert bias, position drops packed
    "bf16_sigmoid_packed": (torch.bfloat16, dict(score_function="sigmoid", expert_bias=True, capacity_factor=0.75,
                                                 drop_policy="position", load_balancing="none", pad_to=4)),
}


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_path(case, monkeypatch, poisoned_alloc):
    dtype, kw = TRITON_CASES[case]
    check_layer(make_cfg(num_experts=5, **kw), shape=(10, H), dtype=dtype, seed=30 + len(case),
                device=_select_backend(monkeypatch, "triton"))


# ---------------------------------------------------------------------------------------------------------
# Stats, expert bias, experts modules
# ---------------------------------------------------------------------------------------------------------


def test_stats():
    layer = MoELayer(make_cfg(capacity_factor=0.5, z_loss_coeff=1e-3))
    randomize(layer, 1)
    assert layer.stats() == {}
    layer(torch.randn(12, H))
    s = layer.last_stats
    assert all(isinstance(v, torch.Tensor) for k, v in s.items() if k != "losses")
    st = layer.stats()
    kept = s["tokens_per_expert"].tolist()
    assert st["tokens_per_expert"] == kept
    assert st["routed_tokens_per_expert"] == s["routed_tokens_per_expert"].tolist()
    assert sum(st["routed_tokens_per_expert"]) == 24
    assert st["num_dropped"] == 24 - sum(kept) > 0
    assert st["load_imbalance"] == pytest.approx(max(kept) / (sum(kept) / 6))
    assert set(st["losses"]) == {"aux_loss", "z_loss"}
    assert all(isinstance(v, float) for v in st["losses"].values())
    layer.eval()
    layer(torch.randn(12, H))
    assert layer.stats()["losses"] == {}


def test_update_expert_bias_delegates_to_router():
    layer = MoELayer(make_cfg(score_function="sigmoid", expert_bias=True, load_balancing="none",
                              bias_update_rate=0.01))
    layer(torch.randn(12, H))
    counts = layer.last_stats["routed_tokens_per_expert"].float()
    layer.update_expert_bias()
    expected = torch.sign(counts.mean() - counts) * 0.01
    torch.testing.assert_close(layer.router.expert_bias, expected)


def test_expert_bias_without_config_raises():
    with pytest.raises(RuntimeError, match="expert_bias"):
        MoELayer(make_cfg()).update_expert_bias()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "row_scale"])
def test_grouped_experts_match_sequential(activation, backend, scaled, monkeypatch):
    # offsets with an empty first group, an empty middle group and a tail of rows no expert owns
    device = _select_backend(monkeypatch, backend)
    torch.manual_seed(0)
    grouped = GroupedExperts(4, H, FF, activation, bias=True)
    with torch.no_grad():
        for p in grouped.parameters():
            p.normal_()
    seq = SequentialExperts(4, H, FF, activation, bias=True)
    seq.load_state_dict(grouped.state_dict())
    grouped.to(device), seq.to(device)
    offsets = torch.tensor([0, 5, 5, 11], device=device)
    x = torch.randn(14, H).to(device)
    scale = (torch.rand(14) + 0.5).to(device) if scaled else None  # row_scale multiplies the activation
    outs = []
    for mod in (grouped, seq):
        xi = x.clone().requires_grad_()
        si = scale.clone().requires_grad_() if scaled else None
        y = mod(xi, offsets, row_scale=si)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        outs.append([y, xi.grad] + [p.grad for p in mod.parameters()] + ([si.grad] if scaled else []))
    assert outs[0][0][11:].abs().max() == 0  # tail rows are zero
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_parameter_layout():
    # Hugging Face v5 names and shapes
    g = GroupedExperts(3, H, FF)
    assert dict((n, tuple(p.shape)) for n, p in g.named_parameters()) == {
        "gate_up_proj": (3, 2 * FF, H), "down_proj": (3, H, FF)}
    g = GroupedExperts(3, H, FF, "relu2", bias=True)
    assert dict((n, tuple(p.shape)) for n, p in g.named_parameters()) == {
        "up_proj": (3, FF, H), "down_proj": (3, H, FF), "up_proj_bias": (3, FF), "down_proj_bias": (3, H)}
    s = SharedExperts(H, 8, gate=True)
    assert {n for n, _ in s.named_parameters()} == {"gate_proj.weight", "up_proj.weight", "down_proj.weight",
                                                     "gate.weight"}
    assert abs(g.down_proj.std().item() - 0.02) < 0.01  # normal(0, 0.02) init


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_experts_in_the_autocast_dtype(backend, monkeypatch):
    """Under autocast the GEMMs run in bf16; the fp32 expert weights go to gmm as they are, so their gradients are
    fp32 from the GEMM's accumulator, and a second backward adds into them in place."""
    device = _select_backend(monkeypatch, backend)
    layer = MoELayer(make_cfg(shared_expert_ffn_hidden_size=8)).to(device)
    randomize(layer, 0)
    x = torch.randn(8, H, device=device)
    ref = layer(x)
    ref.sum().backward()
    ref_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    experts = {"experts.gate_up_proj": layer.experts.gate_up_proj, "experts.down_proj": layer.experts.down_proj}
    for name, p in experts.items():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0.05, atol=0.05)
    first = {name: (p.grad.data_ptr(), p.grad.clone()) for name, p in experts.items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    for name, p in experts.items():
        assert p.grad.data_ptr() == first[name][0]
        torch.testing.assert_close(p.grad, 2 * first[name][1], rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# Errors
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(), dict(activation="relu2", pad_to=4), dict(dispatcher="allgather")],
                         ids=["swiglu", "relu2_padded", "allgather"])
def test_reused_activation_memory_is_bitwise_the_same_and_backward_runs_once(backend, kw, monkeypatch):
    """reuse_activation_memory (the default) writes gradients over the permuted rows and the expert activations:
    outputs and every gradient bitwise equal to the layer that keeps them; a second backward raises a clear error
    instead of reading overwritten buffers, and with the option off it runs."""
    device = _select_backend(monkeypatch, backend)
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    dy = torch.randn(11, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    runs = []
    for reuse in (False, True):
        layer = MoELayer(make_cfg(reuse_activation_memory=reuse, z_loss_coeff=1e-3, **kw), dtype=torch.bfloat16)
        randomize(layer, 7)
        layer.to(device)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy, retain_graph=True)
        runs.append([t.clone() for t in [y, xi.grad] + [p.grad for p in layer.parameters()]])
        if reuse:
            with pytest.raises(RuntimeError, match="can run once"):
                y.backward(dy)
        else:
            y.backward(dy)  # a second backward through the kept graph works
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_accumulation_over_micro_batches(backend, monkeypatch):
    """Two micro-batches backward in turn: every parameter's .grad is the sum of the two batches' gradients, the
    expert weights' added into .grad by the weight-gradient kernel (moetron/ops/gmm.py ``_grad_to_add_into``;
    one rounding of the sum, so compared against float64 with the tolerance rule, autograd's own accumulation
    being the baseline), the others by autograd."""
    device = _select_backend(monkeypatch, backend)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(9, H, generator=gen), torch.randn(9, H, generator=gen)) for _ in range(2)]

    def grads(dtype, fuse):
        monkeypatch.setenv("MOETRON_FUSE_GRAD_ACCUMULATION", "1" if fuse else "0")
        layer = MoELayer(make_cfg(z_loss_coeff=1e-3), dtype=dtype)
        randomize(layer, 11)
        layer.to(device)
        for x, dy in batches:
            layer(x.to(dtype).to(device)).backward(dy.to(dtype).to(device))
        return {name: p.grad for name, p in layer.named_parameters()}

    fused, autograd_way = grads(torch.bfloat16, True), grads(torch.bfloat16, False)
    exact = {name: torch.zeros(g.shape, dtype=F64) for name, g in fused.items()}
    monkeypatch.setenv("MOETRON_BACKEND", "torch")
    weights = MoELayer(make_cfg(z_loss_coeff=1e-3), dtype=torch.bfloat16)
    randomize(weights, 11)
    for x, dy in batches:  # each batch alone, fp32 on the torch path (the layer's widest dtype), summed in fp64
        layer = MoELayer(make_cfg(z_loss_coeff=1e-3), dtype=torch.float32)
        layer.load_state_dict({k: v.float() for k, v in weights.state_dict().items()})  # the same bf16 values
        layer(x.to(torch.bfloat16).float()).backward(dy.to(torch.bfloat16).float())
        for name, p in layer.named_parameters():
            exact[name] += p.grad.double()
    for name in exact:
        assert_close_to_ref(f"accumulated {name}", fused[name], exact[name], autograd_way[name])


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=7), r"MoEConfig\.top_k"),
    (dict(num_experts=6, num_groups=4, group_topk=1), r"MoEConfig\.num_groups"),
    (dict(expert_bias=True), r"MoEConfig\.expert_bias"),
    (dict(ffn_hidden_size=0), r"MoEConfig\.ffn_hidden_size"),
    (dict(activation="tanh"), r"MoEConfig\.activation"),
    (dict(capacity_factor=0.0), r"MoEConfig\.capacity_factor"),
    (dict(drop_policy="random"), r"MoEConfig\.drop_policy"),
    (dict(pad_to_capacity=True), r"MoEConfig\.pad_to_capacity"),
    (dict(pad_to=0), r"MoEConfig\.pad_to"),
    (dict(shared_expert_ffn_hidden_size=-1), r"MoEConfig\.shared_expert_ffn_hidden_size"),
    (dict(shared_expert_gate=True), r"MoEConfig\.shared_expert_gate"),
    (dict(dispatcher="nccl"), r"MoEConfig\.dispatcher"),
    (dict(reuse_activation_memory=1), r"MoEConfig\.reuse_activation_memory"),
    (dict(load_balancing="sinkhorn", score_function="sigmoid"), r"MoEConfig\.score_function"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make_cfg(**kw)


def test_fused_dispatcher_in_one_process_matches_local(monkeypatch):
    # dispatcher="fused" with one process: the same output as "local" (multi-rank: tests/test_fused_dispatch.py)
    from moetron import _env

    if not _env.triton_interpreter_enabled():  # a GPU machine: CPU tensors get a clear error instead
        with pytest.raises(ValueError, match="x must be a CUDA tensor for the fused dispatch kernels"):
            MoELayer(make_cfg(dispatcher="fused"))(torch.randn(3, H))
        pytest.skip("the fused kernels run on CPU tensors only under Triton's interpreter (CPU test machines)")
    monkeypatch.setattr(_env, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="x must be a CUDA tensor for the fused dispatch kernels"):
        MoELayer(make_cfg(dispatcher="fused"))(torch.randn(3, H))
    monkeypatch.undo()
    torch.manual_seed(0)
    local, fused = MoELayer(make_cfg()), MoELayer(make_cfg(dispatcher="fused"))
    fused.load_state_dict(local.state_dict())
    x = torch.randn(2, 5, local.config.hidden_size)
    torch.testing.assert_close(fused(x), local(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="capacity_factor must be None with dispatcher='fused'"):
        MoELayer(make_cfg(dispatcher="fused", capacity_factor=1.0))


def test_expert_parallel_dispatchers_need_parallel_groups_to_spread_experts():
    # in one process "allgather" and "alltoall" hold every expert; "local" refuses a layout that spreads them
    assert MoELayer(make_cfg(dispatcher="alltoall")).experts.num_experts == 6
    with pytest.raises(TypeError, match="parallel must be None or a moetron.parallel.ParallelGroups"):
        MoELayer(make_cfg(), parallel="ep=2")


def test_router_config_round_trip():
    cfg = make_cfg(score_function="sigmoid", expert_bias=True, num_groups=3, group_topk=1, load_balancing="none")
    rc = cfg.router_config()
    assert (rc.num_experts, rc.top_k, rc.score_function, rc.expert_bias, rc.num_groups) == (6, 2, "sigmoid", True, 3)
    assert cfg.load_balancing == ("none",)
    assert dataclasses.replace(cfg, bias_update_rate=0.1).bias_update_rate == 0.1
    with pytest.raises(ValueError, match=r"MoEConfig\.group_topk"):  # replace() validates again
        dataclasses.replace(cfg, top_k=3)


def test_wrong_hidden_size():
    layer = MoELayer(make_cfg())
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 16\]"):
        layer(torch.randn(4, H + 1))


def test_forward_routed_bad_input():
    experts = GroupedExperts(3, H, FF)
    row_map, src_slot, offsets = torch.zeros(4, 1, dtype=torch.int32), torch.arange(4), torch.tensor([4, 4, 4])
    with pytest.raises(ValueError, match=r"x must have shape \[T, 16\] \(hidden_size\), got \(4, 17\)"):
        experts.forward_routed(torch.randn(4, H + 1), torch.ones(4, 1), src_slot, row_map, offsets)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        experts.forward_routed(torch.randn(4), torch.ones(4, 1), src_slot, row_map, offsets)


def test_grouped_experts_zero_tail_must_be_a_bool():
    experts = GroupedExperts(3, H, FF)
    with pytest.raises(TypeError, match="zero_tail must be a bool, got NoneType"):
        experts(torch.randn(4, H), torch.tensor([1, 2, 4]), zero_tail=None)
    with torch.no_grad(), pytest.raises(TypeError, match="zero_tail must be a bool, got int"):
        experts(torch.randn(4, H), torch.tensor([1, 2, 4]), zero_tail=0)


def test_grouped_experts_memory_reuse_flags_are_checked():
    with pytest.raises(ValueError, match="reuse_activation_memory must be a bool, got 1"):
        GroupedExperts(3, H, FF, reuse_activation_memory=1)
    experts = GroupedExperts(3, H, FF)
    with pytest.raises(TypeError, match="consume_input must be a bool, got str"):
        experts(torch.randn(4, H), torch.tensor([1, 2, 4]), consume_input="yes")
    # a leaf the caller owns is not an intermediate: its gradient would overwrite its data
    with pytest.raises(ValueError, match="consume_x=True needs x to be an intermediate result"):
        experts(torch.randn(4, H, requires_grad=True), torch.tensor([1, 2, 4]), consume_input=True)


def test_wrong_dtype():
    layer = MoELayer(make_cfg())
    with pytest.raises(TypeError, match="x must have the experts' dtype"):
        layer(torch.randn(4, H, dtype=torch.bfloat16))


def test_nan_logits_detected(monkeypatch):
    x = torch.randn(4, H)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        MoELayer(make_cfg(debug_nan_check=True))(x)
    monkeypatch.setenv("MOETRON_DEBUG", "1")
    with pytest.raises(ValueError, match="NaN"):
        MoELayer(make_cfg())(x)


# ---------------------------------------------------------------------------------------------------------
# Real peers: Hugging Face transformers MoE blocks
# ---------------------------------------------------------------------------------------------------------


def _hf_check(block, layer, names, shape=(2, 5, H), seed=0):
    """block: an HF MoE block (random weights); names: {layer param: block param}. Copies the weights, then
    compares output and gradients: the block in float64 is the reference, the block in fp32 the baseline."""
    with torch.no_grad():
        hf = dict(block.named_parameters())
        own = dict(layer.named_parameters())
        assert set(own) == set(names), sorted(own)
        for mine, theirs in names.items():
            own[mine].copy_(hf[theirs])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))

    def run(module, dtype, param_names):
        module = module.to(dtype)
        module.zero_grad(set_to_none=True)
        xi = x.to(dtype).clone().requires_grad_()
        y = module(xi)
        y.backward(dy.to(dtype))
        params = dict(module.named_parameters())
        return y.detach(), [xi.grad] + [params[n].grad.clone() for n in param_names]

    y, grads = run(layer, torch.float32, list(names))
    y_ref, g_ref = run(block, F64, list(names.values()))
    y_base, g_base = run(block, torch.float32, list(names.values()))
    assert_close_to_ref("y", y, y_ref, y_base)
    for name, a, r, b in zip(["x"] + list(names), grads, g_ref, g_base):
        assert_close_to_ref(f"grad of {name}", a, r, b)


@torch.no_grad()
def _randomize_hf(block, seed):
    g = torch.Generator().manual_seed(seed)
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


ROUTED = {"router.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
          "experts.down_proj": "experts.down_proj"}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_hf_qwen3_moe(norm_topk_prob):
    tr = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hf_cfg = tr.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=FF, num_experts=6, num_experts_per_tok=2,
                               norm_topk_prob=norm_topk_prob, hidden_act="silu")
    block = Qwen3MoeSparseMoeBlock(hf_cfg).train()
    _randomize_hf(block, 1)
    # norm_topk_prob=True is Megatron's default top-k-then-softmax; False is pre-softmax without renormalising
    cfg = make_cfg(pre_softmax=not norm_topk_prob, load_balancing="none")
    _hf_check(block, MoELayer(cfg), ROUTED)


def test_hf_mixtral_and_its_aux_loss():
    tr = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
    hf_cfg = tr.MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=5, num_experts_per_tok=2,
                              router_jitter_noise=0.0, hidden_act="silu")
    block = MixtralSparseMoeBlock(hf_cfg).train()
    _randomize_hf(block, 2)
    layer = MoELayer(make_cfg(num_experts=5, load_balancing="none"))
    _hf_check(block, layer, ROUTED, seed=2)
    # Mixtral's load-balancing loss is K times Megatron's switch loss (it sums the per-k token fractions)
    aux_layer = MoELayer(make_cfg(num_experts=5))
    aux_layer.load_state_dict(layer.state_dict())
    x = torch.randn(10, H)
    aux_layer(x)
    logits = block.gate(x)[0]
    hf_aux = load_balancing_loss_func((logits,), num_experts=5, top_k=2)
    torch.testing.assert_close(2 * aux_layer.last_stats["losses"]["aux_loss"], hf_aux.float(), rtol=1e-5,
                               atol=1e-6)


def test_hf_deepseek_v3_moe():
    tr = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    # K // topk_group = 2: HF scores a group by its top-2 experts, Megatron by its top K // group_topk
    hf_cfg = tr.DeepseekV3Config(hidden_size=H, moe_intermediate_size=FF, n_routed_experts=8, num_experts_per_tok=4,
                                 n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 n_shared_experts=2, hidden_act="silu")
    block = DeepseekV3MoE(hf_cfg).train()
    _randomize_hf(block, 3)
    bias = 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(4))
    block.gate.e_score_correction_bias.copy_(bias)
    cfg = make_cfg(num_experts=8, top_k=4, score_function="sigmoid", expert_bias=True, num_groups=4, group_topk=2,
                   scaling_factor=2.5, norm_topk_prob=True, load_balancing="none",
                   shared_expert_ffn_hidden_size=2 * FF)
    layer = MoELayer(cfg)
    layer.router.expert_bias.copy_(bias)
    names = dict(ROUTED)
    names.update({f"shared_experts.{p}.weight": f"shared_experts.{p}.weight"
                  for p in ("gate_proj", "up_proj", "down_proj")})
    _hf_check(block, layer, names, seed=3)


def test_hf_qwen2_moe_shared_expert_gate():
    tr = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    hf_cfg = tr.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=FF, shared_expert_intermediate_size=20,
                               num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu")
    block = Qwen2MoeSparseMoeBlock(hf_cfg).train()
    _randomize_hf(block, 5)
    cfg = make_cfg(pre_softmax=True, load_balancing="none", shared_expert_ffn_hidden_size=20,
                   shared_expert_gate=True)
    names = dict(ROUTED)
    names.update({f"shared_experts.{p}.weight": f"shared_expert.{p}.weight"
                  for p in ("gate_proj", "up_proj", "down_proj")})
    names["shared_experts.gate.weight"] = "shared_expert_gate.weight"
    _hf_check(block, MoELayer(cfg), names, seed=5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routing_weights_move_into_the_experts_only_without_a_down_bias(backend, monkeypatch):
    """The local dispatcher hands each row's prob to the experts (applied before the second GEMM) only when that
    equals weighting the expert output: with a down bias, (p * a) W2 + b2 != p * (a W2 + b2); and only where the
    Triton kernels run (the PyTorch path keeps the weighted combine, which is cheaper there)."""
    device = _select_backend(monkeypatch, backend)
    layer = MoELayer(make_cfg()).to(device)
    assert layer.dispatcher.weights_in_experts
    assert not MoELayer(make_cfg(expert_linear_bias=True)).dispatcher.weights_in_experts
    x = torch.randn(6, H, device=device)
    route = layer.router(x)
    d = layer.dispatcher.dispatch(x, route.probs, route.expert_ids)
    if backend == "triton":
        assert d.row_probs is not None and d.row_probs.shape == (d.x.shape[0],)
    else:
        assert d.row_probs is None


FOLD_CASES = {
    "bf16_dropless": (torch.bfloat16, dict()),
    "fp32_pad8": (torch.float32, dict(pad_to=8)),
    "bf16_capacity_padded": (torch.bfloat16, dict(capacity_factor=0.75, pad_to_capacity=True)),
    "fp32_position_packed": (torch.float32, dict(capacity_factor=0.75, drop_policy="position", pad_to=4)),
}


@pytest.mark.parametrize("case", FOLD_CASES)
def test_inference_folds_the_permute_into_the_first_gemm(case, monkeypatch, poisoned_alloc):
    """Without autograd the first expert GEMM gathers the token rows itself (moetron/ops/routed_experts.py): same
    output, bit for bit, and same statistics as the permuted copy, for every layout; with autograd it is not used."""
    dtype, kw = FOLD_CASES[case]
    device = _select_backend(monkeypatch, "triton")
    torch.manual_seed(3)
    layer = MoELayer(make_cfg(num_experts=5, **kw))
    randomize(layer, 3)
    layer.to(device, dtype).eval()
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    results = {}
    for fold in ("1", "0"):
        monkeypatch.setenv("MOETRON_FOLD_PERMUTE", fold)
        with torch.no_grad():
            assert layer._gathers_rows(x, layer.router(x).probs) == (fold == "1")
            results[fold] = (layer(x), layer.stats())
    assert torch.equal(results["1"][0], results["0"][0])
    assert results["1"][1] == results["0"][1]
    monkeypatch.setenv("MOETRON_FOLD_PERMUTE", "1")
    assert not layer._gathers_rows(x.requires_grad_(), layer.router(x).probs)  # training keeps the permuted copy


def test_inference_folds_large_experts_only_at_decode_sizes(monkeypatch):
    """Experts above the fold's weight limit (Mixtral's) fold only with few rows per expert
    (gmm._FEW_ROWS_PER_GROUP), where the GEMMs stream the weights whatever loads x; the output is the same bits."""
    routed = importlib.import_module("moetron.ops.routed_experts")
    gmm_module = importlib.import_module("moetron.ops.gmm")
    device = _select_backend(monkeypatch, "triton")
    monkeypatch.setenv("MOETRON_FOLD_PERMUTE", "1")
    monkeypatch.setattr(routed, "FOLD_MAX_WEIGHT", 1)  # every expert counts as large
    torch.manual_seed(5)
    layer = MoELayer(make_cfg(num_experts=5))
    randomize(layer, 5)
    layer.to(device, torch.bfloat16).eval()
    x = torch.randn(10, H, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    with torch.no_grad():
        probs = layer.router(x).probs
        assert layer._gathers_rows(x, probs)  # 10 tokens x top-k over 5 experts: decode-sized
        folded = layer(x)
        monkeypatch.setattr(gmm_module, "_FEW_ROWS_PER_GROUP", 1)  # now too many rows per expert
        assert not layer._gathers_rows(x, probs)
        assert torch.equal(layer(x), folded)


class _AtenOps(TorchDispatchMode):
    """The names of the aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_folded_inference_computes_nothing_outside_its_kernels(monkeypatch):
    """At inference the first GEMM reads each row's token and routing weight through permute's slot index itself
    (gmm's gather_div, the gated epilogue's scale_by_slot), so the forward builds no per-row index or weight
    tensor with torch ops: eleven small kernels per call at decode sizes before (benchmarks/NOTES.md, session 17).
    Only allocations and views may run outside the Triton kernels (and, on CPU, the interpreter's own copies)."""
    device = _select_backend(monkeypatch, "triton")
    monkeypatch.setenv("MOETRON_TMA", "1")  # the gated epilogue is a TMA kernel (the interpreter runs it when asked)
    layer = MoELayer(make_cfg(num_experts=5))
    randomize(layer, 5)
    layer.to(device, torch.bfloat16).eval()
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    with torch.no_grad():
        assert layer._gathers_rows(x.reshape(-1, H), layer.router(x.reshape(-1, H)).probs)
        with _AtenOps() as ops:
            layer(x)
    allowed = {"empty", "empty_like", "new_empty", "zeros", "full", "view", "_unsafe_view", "reshape", "select",
               "slice", "alias", "detach", "set_", "copy_"}
    assert ops.names - allowed == set()


def test_row_scale_of_the_wrong_length_raises():
    experts = GroupedExperts(3, H, FF)
    with pytest.raises(ValueError, match=r"row_scale must have one entry per row of x \(5\), got 4"):
        experts(torch.randn(5, H), torch.tensor([2, 4, 5]), row_scale=torch.ones(4))


def test_meta_device_build_then_to_empty_and_reset():
    # the large-model init flow (FSDP2, torchtitan): build on the meta device, allocate with to_empty (which leaves
    # every tensor uninitialised), then reset_parameters. The expert bias and the counters must come back as zeros:
    # a garbage bias would steer the routing, garbage counters the global aux loss.
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=6, top_k=2, score_function="sigmoid",
                    expert_bias=True, load_balancing=("global_aux_loss",), shared_expert_ffn_hidden_size=12,
                    shared_expert_gate=True)
    with torch.device("meta"):
        layer = MoELayer(cfg)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(layer.parameters()) + list(layer.buffers()):
            t.fill_(float("nan"))  # what to_empty may hand back
    torch.manual_seed(5)
    layer.reset_parameters()
    for name, buf in layer.named_buffers():
        assert torch.equal(buf, torch.zeros_like(buf)), name
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    fresh = MoELayer(cfg)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(10, 16)
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)
    assert torch.equal(layer.router.global_tokens_per_expert, fresh.router.global_tokens_per_expert)
