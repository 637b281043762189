"""TopKRouter against a plainly written float64 reference (per-token Python loops, no code shared with the router).

Every case draws fresh continuous random inputs under a fixed seed, so top-k ties do not occur, and compares:
expert ids and counts exactly; probs, each loss value and the gradients w.r.t. x and the router weight (the
injected loss gradients included) within tolerances. Shapes are tiny: the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moetron.router import AuxLossAutoScaler, RouterConfig, RouterOutput, TopKRouter

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# float64 reference, written from the formulas (see moetron/router.py docstring for the sources)
# ---------------------------------------------------------------------------------------------------------


def ranked(values) -> list[int]:
    """Indices of values, largest first."""
    values = [float(v) for v in (values.detach() if torch.is_tensor(values) else values)]
    return sorted(range(len(values)), key=lambda i: -values[i])


def softmax_row(l):
    e = torch.exp(l - l.max())
    return e / e.sum()


def sigmoid_row(l):
    return 1.0 / (1.0 + torch.exp(-l))


def ref_sinkhorn(logits):
    """Megatron-Core's sinkhorn as published: exp of the raw logits, loop until the column scaling settles."""
    cost = torch.exp(logits)
    T, E = cost.shape
    d0, d1 = torch.ones(T, dtype=F64), torch.ones(E, dtype=F64)
    d1_old, error = d1, 1e9
    while error > 1e-4:
        d0 = (1.0 / T) / ((d1 * cost).sum(1) + 1e-8)
        d1 = (1.0 / E) / ((d0[:, None] * cost).sum(0) + 1e-8)
        error = (d1_old - d1).abs().mean().item()
        d1_old = d1
    return d1 * cost * d0[:, None]


def ref_switch_loss(score_rows, K, E):
    """E / (K T^2) * sum_e (sum_t score[t, e]) * count[e], counts from a plain top-k of each row."""
    T = len(score_rows)
    counts = [0] * E
    for row in score_rows:
        for e in ranked(row)[:K]:
            counts[e] += 1
    P = sum(score_rows)
    return E / (K * T * T) * sum(P[e] * counts[e] for e in range(E)), counts


def ref_forward(x, w, cfg: RouterConfig, *, bias=None, training=True, seq_len=None, count_history=None):
    """Returns probs [T, K], ids [T, K], counts [E] and the losses (without coefficients), all float64 and
    differentiable w.r.t. x and w. count_history: list that global-aux counts are appended to across calls."""
    E, K = cfg.num_experts, cfg.top_k
    logits = x.to(F64) @ w.to(F64).t()
    T = logits.shape[0]
    sinkhorn = cfg.load_balancing == ("sinkhorn",)
    norm = ref_sinkhorn(logits.detach()) if sinkhorn and training else None
    probs, ids = [], []
    for t in range(T):
        l = logits[t]
        if sinkhorn:
            weights = sigmoid_row(l) if K == 1 else softmax_row(l)
            chosen = ranked(norm[t] if training else weights.detach())[:K]
            p = torch.stack([weights[e] for e in chosen])
        else:
            if cfg.score_function == "softmax":
                s = softmax_row(l)
                sel = (s if cfg.pre_softmax else l).detach().tolist()
            else:
                s = sigmoid_row(l)
                sel = s.detach().tolist()
                if bias is not None:
                    sel = [v + float(b) for v, b in zip(sel, bias)]
            allowed = list(range(E))
            if cfg.num_groups:
                n = E // cfg.num_groups
                group_score = [sum(sorted(sel[g * n:(g + 1) * n], reverse=True)[:K // cfg.group_topk])
                               for g in range(cfg.num_groups)]
                kept = ranked(group_score)[:cfg.group_topk]
                allowed = [e for e in range(E) if e // n in kept]
            chosen = sorted(allowed, key=lambda e: -sel[e])[:K]
            if cfg.score_function == "softmax" and not cfg.pre_softmax:
                p = softmax_row(torch.stack([l[e] for e in chosen]))
            else:
                p = torch.stack([s[e] for e in chosen])
                if cfg.norm_topk_prob and K > 1:
                    p = p / p.sum()
            if cfg.scaling_factor is not None:
                p = p * cfg.scaling_factor
        probs.append(p)
        ids.append(chosen)
    counts = [sum(row.count(e) for row in ids) for e in range(E)]

    losses = {}
    if training and not sinkhorn and T > 0:
        if cfg.score_function == "softmax":
            rows = [softmax_row(logits[t]) for t in range(T)]
        else:
            rows = [sigmoid_row(logits[t]) / sigmoid_row(logits[t]).sum() for t in range(T)]
        names = [n for n in cfg.load_balancing if n.endswith("aux_loss")]
        if "aux_loss" in names:
            losses["aux_loss"] = ref_switch_loss(rows, K, E)[0]
        if "seq_aux_loss" in names:
            per_seq = [ref_switch_loss(rows[b:b + seq_len], K, E)[0] for b in range(0, T, seq_len)]
            losses["seq_aux_loss"] = sum(per_seq) / len(per_seq)
        if "global_aux_loss" in names:
            _, batch_counts = ref_switch_loss(rows, K, E)
            count_history.append(batch_counts)
            mean_counts = [sum(c[e] for c in count_history) / len(count_history) for e in range(E)]
            P = sum(rows)
            losses["global_aux_loss"] = E / (K * T * T) * sum(P[e] * mean_counts[e] for e in range(E))
    if training and cfg.z_loss_coeff is not None and T > 0:
        z = []
        for t in range(T):
            m = logits[t].max().detach()
            z.append((m + torch.log(torch.exp(logits[t] - m).sum())) ** 2)
        losses["z_loss"] = sum(z) / T
    probs_t = torch.stack(probs) if T else torch.zeros(0, K, dtype=F64)
    return probs_t, torch.tensor(ids, dtype=torch.int64).view(T, K), torch.tensor(counts), losses


def coeffs_of(cfg: RouterConfig) -> dict:
    c = cfg.aux_loss_coeff
    out = {n: (c[i] if isinstance(c, tuple) else c) for i, n in enumerate(cfg.load_balancing)
           if n.endswith("aux_loss")}
    if cfg.z_loss_coeff is not None:
        out["z_loss"] = cfg.z_loss_coeff
    return out


# ---------------------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------------------


def make_router(cfg, seed, w_scale=2.0):
    torch.manual_seed(seed)
    router = TopKRouter(cfg)
    with torch.no_grad():
        # logits of std ~w_scale: well separated, so top-k is stable between fp32 and fp64
        router.weight.copy_(torch.randn(cfg.num_experts, cfg.hidden_size) * (w_scale / math.sqrt(cfg.hidden_size)))
    return router


def assert_grads_close(got, ref, rel=1e-4):
    scale = ref.abs().max().item() + 1e-12
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * scale, f"max grad error {err:.3e} > {rel:.0e} x max |ref| {scale:.3e}"


def compare(cfg, T, seed, *, seq_len=None, training=True, bias=None, w_scale=2.0, tol=1e-5, calls=1,
            router=None, x=None):
    """Run the router and the reference on the same random data (calls times, fresh x each time) and check
    everything. Returns the last (router output, reference losses)."""
    router = router or make_router(cfg, seed, w_scale)
    if bias is not None:
        with torch.no_grad():
            router.expert_bias.copy_(bias)
    router.train(training)
    history = []
    for call in range(calls):
        torch.manual_seed(seed * 1000 + call)
        xi = (x if x is not None else torch.randn(T, cfg.hidden_size)).clone().requires_grad_(True)
        router.weight.grad = None
        out = router(xi, seq_len=seq_len)
        g = torch.randn(T, cfg.top_k, dtype=F64)
        (out.probs * g.float()).sum().backward()

        x64 = xi.detach().to(F64).requires_grad_(True)
        w64 = router.weight.detach().to(F64).requires_grad_(True)
        probs, ids, counts, losses = ref_forward(x64, w64, cfg, bias=bias, training=training, seq_len=seq_len,
                                                 count_history=history)
        total = (probs * g).sum()
        for name, c in coeffs_of(cfg).items():
            if name in losses:
                total = total + c * losses[name]
        total.backward()

        assert isinstance(out, RouterOutput)
        assert out.probs.dtype == torch.float32 and out.expert_ids.dtype == torch.int64
        assert out.tokens_per_expert.dtype == torch.int64 and out.tokens_per_expert.shape == (cfg.num_experts,)
        assert torch.equal(out.expert_ids, ids)
        assert torch.equal(out.tokens_per_expert, counts)
        torch.testing.assert_close(out.probs.double(), probs.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(out.logits.double(), (x64 @ w64.t()).detach(), rtol=tol, atol=tol)
        assert set(out.losses) == set(losses), (set(out.losses), set(losses))
        for name, val in losses.items():
            assert not out.losses[name].requires_grad
            torch.testing.assert_close(out.losses[name].double(), val.detach(), rtol=tol, atol=tol, msg=name)
        if T:
            assert_grads_close(xi.grad, x64.grad, rel=10 * tol)
            assert_grads_close(router.weight.grad, w64.grad, rel=10 * tol)
    return out, losses


def cfg(**kw):
    base = dict(hidden_size=16, num_experts=8, top_k=2, load_balancing=("none",))
    base.update(kw)
    return RouterConfig(**base)


# ---------------------------------------------------------------------------------------------------------
# selection and probs
# ---------------------------------------------------------------------------------------------------------

SELECTION_CASES = {
    "softmax over the k selected logits (Mixtral)": dict(),
    "softmax over all experts before top-k (DeepSeek-V2)": dict(pre_softmax=True),
    "pre-softmax then renormalised (Qwen3 norm_topk_prob)": dict(pre_softmax=True, norm_topk_prob=True),
    "sigmoid, normalised by default (DeepSeek-V3)": dict(score_function="sigmoid"),
    "sigmoid, unnormalised": dict(score_function="sigmoid", norm_topk_prob=False),
    "sigmoid top-1 is never normalised (Megatron)": dict(score_function="sigmoid", top_k=1),
    "scaling factor on softmax": dict(scaling_factor=2.5),
    "scaling factor on sigmoid": dict(score_function="sigmoid", scaling_factor=2.5),
    "group-limited on logits": dict(num_experts=12, top_k=4, num_groups=4, group_topk=2),
    "group-limited on pre-softmax scores": dict(num_experts=12, top_k=4, num_groups=4, group_topk=2,
                                                pre_softmax=True),
    "group-limited sigmoid, odd top_k // group_topk": dict(score_function="sigmoid", num_experts=16, top_k=5,
                                                           num_groups=4, group_topk=2),
    "group-limited, one group kept": dict(num_experts=12, top_k=3, num_groups=3, group_topk=1),
    "fp64 router dtype": dict(router_dtype="fp64"),
}


@pytest.mark.parametrize("kw", list(SELECTION_CASES.values()), ids=list(SELECTION_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_selection_matches_reference(kw, training):
    compare(cfg(**kw), T=16, seed=1, training=training)


def test_fp64_router_dtype_is_tight():
    # in fp64 only the final cast of the probs to fp32 separates the router from the reference
    c = cfg(router_dtype="fp64", load_balancing=("aux_loss",), z_loss_coeff=1e-2)
    out, _ = compare(c, T=16, seed=2, tol=1e-7)
    assert out.logits.dtype == F64


def test_norm_topk_prob_defaults():
    assert cfg(score_function="sigmoid").norm_topk_prob is True
    assert cfg(pre_softmax=True).norm_topk_prob is False
    assert cfg().norm_topk_prob is True


@pytest.mark.parametrize("kw", [dict(), dict(load_balancing="sinkhorn"), dict(score_function="sigmoid"),
                                dict(load_balancing=("aux_loss", "seq_aux_loss"), aux_loss_coeff=[0.1, 0.2])])
def test_validated_config_validates_again(kw):
    # dataclasses.replace re-runs __post_init__ on already-normalised fields
    c = cfg(**kw)
    assert dataclasses.replace(c) == c


# ---------------------------------------------------------------------------------------------------------
# load-balancing losses and their injected gradients
# ---------------------------------------------------------------------------------------------------------

LOSS_CASES = {
    "aux_loss, softmax": dict(load_balancing=("aux_loss",), aux_loss_coeff=0.1),
    "aux_loss, sigmoid scores normalised over E": dict(score_function="sigmoid", load_balancing=("aux_loss",),
                                                        aux_loss_coeff=0.1),
    "aux_loss with group-limited routing (loss ignores the groups)": dict(
        num_experts=12, top_k=4, num_groups=4, group_topk=2, load_balancing="aux_loss", aux_loss_coeff=0.1),
    "seq_aux_loss": dict(load_balancing=("seq_aux_loss",), aux_loss_coeff=0.1),
    "global_aux_loss": dict(load_balancing=("global_aux_loss",), aux_loss_coeff=0.1),
    "all three, one coeff each": dict(load_balancing=("aux_loss", "seq_aux_loss", "global_aux_loss"),
                                      aux_loss_coeff=(0.1, 0.05, 0.2)),
    "aux + seq, shared coeff, with z-loss": dict(load_balancing=("seq_aux_loss", "aux_loss"), aux_loss_coeff=0.3,
                                                 z_loss_coeff=0.01),
    "z-loss alone": dict(z_loss_coeff=0.05),
    "coeff 0 reports the loss without its gradient": dict(load_balancing=("aux_loss",), aux_loss_coeff=0.0),
    "none": dict(),
}


@pytest.mark.parametrize("kw", list(LOSS_CASES.values()), ids=list(LOSS_CASES))
def test_losses_and_injected_gradients(kw):
    compare(cfg(**kw), T=12, seed=3, seq_len=4)


def test_global_aux_loss_accumulates_until_reset():
    c = cfg(load_balancing=("global_aux_loss",), aux_loss_coeff=0.1)
    router = make_router(c, seed=4)
    compare(c, T=12, seed=4, calls=3, router=router)  # the reference keeps its own count history
    assert router.global_aux_steps.item() == 3
    assert router.global_tokens_per_expert.sum().item() == 3 * 12 * c.top_k
    router.reset_global_aux_counts()
    assert router.global_tokens_per_expert.abs().sum().item() == 0 and router.global_aux_steps.item() == 0
    compare(c, T=12, seed=5, router=router)  # after a reset the history starts over
    assert "global_tokens_per_expert" not in router.state_dict()


def test_aux_loss_is_one_when_balanced_and_counts_local():
    # K = E: every expert receives every token, and the softmax aux loss is exactly 1
    c = cfg(num_experts=4, top_k=4, load_balancing="aux_loss")
    out, _ = compare(c, T=6, seed=6)
    assert out.losses["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)


def test_loss_scale_multiplies_the_injected_gradient():
    c = cfg(load_balancing=("aux_loss",), aux_loss_coeff=0.5, z_loss_coeff=0.1)
    torch.manual_seed(7)
    x = torch.randn(10, 16)
    grads = []
    for scale in (0.0, 1.0, 3.0):
        AuxLossAutoScaler.set_loss_scale(scale)
        try:
            router = make_router(c, seed=7)
            out = router(x)
            out.probs.sum().backward()
            grads.append(router.weight.grad.clone())
        finally:
            AuxLossAutoScaler.loss_scale = 1.0
    main, with1, with3 = grads
    torch.testing.assert_close(with3 - main, 3 * (with1 - main), rtol=1e-4, atol=1e-7)
    assert (with1 - main).abs().max() > 1e-4


def test_no_losses_in_eval_or_without_grad():
    c = cfg(load_balancing=("aux_loss", "global_aux_loss"), aux_loss_coeff=(0.1, 0.1), z_loss_coeff=0.1,
            score_function="sigmoid", expert_bias=True)
    router = make_router(c, seed=8)
    x = torch.randn(8, 16)
    router.eval()
    assert router(x).losses == {}
    router.train()
    with torch.no_grad():
        assert router(x).losses == {}
    assert router.global_aux_steps.item() == 0
    assert router.local_tokens_per_expert.abs().sum().item() == 0


def test_mixtral_load_balancing_loss_matches():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    c = cfg(num_experts=8, top_k=2, load_balancing="aux_loss")
    router = make_router(c, seed=9)
    out = router(torch.randn(24, 16))
    hf = mixtral.load_balancing_loss_func((out.logits.detach(),), c.num_experts, c.top_k)
    # Hugging Face's fraction of tokens is count / T, Megatron's count / (T K): they differ by exactly K
    torch.testing.assert_close(out.losses["aux_loss"] * c.top_k, hf.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# sinkhorn
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2], ids=["k1 sigmoid weights", "k2 softmax weights"])
@pytest.mark.parametrize("router_dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("training", [True, False], ids=["train: sinkhorn selects", "eval: plain top-k"])
def test_sinkhorn(top_k, router_dtype, training):
    c = cfg(top_k=top_k, load_balancing="sinkhorn", router_dtype=router_dtype, z_loss_coeff=0.01)
    out, _ = compare(c, T=16, seed=10, training=training, w_scale=1.0)
    assert set(out.losses) == ({"z_loss"} if training else set())


def test_sinkhorn_selection_differs_from_top_k():
    # on skewed logits the balanced assignment must move some tokens off their favourite expert
    c = cfg(top_k=1, load_balancing="sinkhorn")
    router = make_router(c, seed=11, w_scale=1.0)
    torch.manual_seed(11)
    x = torch.randn(32, 16)
    with torch.no_grad():
        router.weight[0] += 0.5 * x.mean(0) / x.mean(0).norm() ** 2 * 3  # expert 0 favoured by most tokens
        train_ids = router.train()(x).expert_ids
        eval_ids = router.eval()(x).expert_ids
    assert not torch.equal(train_ids, eval_ids)
    assert torch.bincount(train_ids.view(-1), minlength=8).max() < torch.bincount(eval_ids.view(-1), minlength=8).max()


# ---------------------------------------------------------------------------------------------------------
# expert bias (aux-loss-free balancing)
# ---------------------------------------------------------------------------------------------------------


def test_expert_bias_selects_but_never_weights():
    c = cfg(score_function="sigmoid", expert_bias=True, load_balancing="aux_loss", aux_loss_coeff=0.1)
    torch.manual_seed(12)
    bias = torch.randn(8) * 0.3  # comparable to sigmoid score gaps, so it changes many selections
    out, _ = compare(c, T=16, seed=12, bias=bias)
    # the same router without bias picks differently: the bias took part in the selection
    plain, _ = compare(cfg(score_function="sigmoid", load_balancing="aux_loss", aux_loss_coeff=0.1), T=16, seed=12)
    assert not torch.equal(out.expert_ids, plain.expert_ids)


def test_expert_bias_with_group_limited_routing():
    c = cfg(score_function="sigmoid", expert_bias=True, num_experts=12, top_k=4, num_groups=4, group_topk=2)
    torch.manual_seed(13)
    compare(c, T=16, seed=13, bias=torch.randn(12) * 0.3)


def test_update_expert_bias_and_state_dict_round_trip():
    c = cfg(score_function="sigmoid", expert_bias=True, bias_update_rate=0.01)
    router = make_router(c, seed=14)
    torch.manual_seed(14)
    counts = torch.zeros(8)
    for _ in range(3):
        out = router(torch.randn(10, 16))
        for e in out.expert_ids.view(-1).tolist():
            counts[e] += 1
    assert torch.equal(router.local_tokens_per_expert, counts)
    mean = counts.sum().item() / 8
    expected = torch.tensor([0.01 * ((mean > n) - (mean < n)) for n in counts.tolist()])
    router.update_expert_bias()
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.local_tokens_per_expert.abs().sum().item() == 0

    sd = router.state_dict()
    assert set(sd) == {"weight", "expert_bias"}  # counts are per-step state, not checkpointed
    other = TopKRouter(c)
    other.load_state_dict(sd)
    assert torch.equal(other.expert_bias, router.expert_bias)
    x = torch.randn(9, 16)
    router.eval(), other.eval()
    a, b = router(x), other(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.probs, b.probs)


def test_fp32_buffers_survive_half_precision_cast():
    c = cfg(score_function="sigmoid", expert_bias=True, load_balancing="global_aux_loss")
    router = make_router(c, seed=15)
    with torch.no_grad():
        router.expert_bias.fill_(1.0 + 1e-3)  # not representable in bf16
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias[0].item() == pytest.approx(1.001)
    assert router.global_tokens_per_expert.dtype == torch.float32
    # bf16 activations and weight, fp32 gate maths and bf16 gradients
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    out = router(x)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, x.detach().float() @ router.weight.detach().float().t())
    out.probs.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and router.weight.grad.dtype == torch.bfloat16


def test_update_expert_bias_without_bias_raises():
    with pytest.raises(RuntimeError, match="expert_bias"):
        TopKRouter(cfg()).update_expert_bias()


# ---------------------------------------------------------------------------------------------------------
# jitter, debug mode
# ---------------------------------------------------------------------------------------------------------


def test_input_jitter_only_in_training():
    c = cfg(hidden_size=1, input_jitter=0.1)
    router = make_router(c, seed=16)
    x = torch.randn(64, 1)
    plain = x @ router.weight.detach().t()
    with torch.no_grad():
        router.eval()
        assert torch.equal(router(x).logits, plain)
        router.train()
        jittered = router(x).logits
    # with H = 1 the logit ratio is the noise factor itself: one factor per token, inside [1 - eps, 1 + eps]
    ratio = jittered / plain
    assert (ratio.max(1).values - ratio.min(1).values).abs().max() < 1e-5
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert (ratio - 1).abs().max() > 1e-3


def test_debug_nan_check(monkeypatch):
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    monkeypatch.delenv("MOETRON_DEBUG", raising=False)
    TopKRouter(cfg())(x)  # off by default: no sync, no check
    with pytest.raises(ValueError, match="NaN or inf"):
        TopKRouter(cfg(debug_nan_check=True))(x)
    monkeypatch.setenv("MOETRON_DEBUG", "1")
    with pytest.raises(ValueError, match="NaN or inf"):
        TopKRouter(cfg())(x)


# ---------------------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------------------

ALL_LOSSES = dict(load_balancing=("aux_loss", "seq_aux_loss", "global_aux_loss"), aux_loss_coeff=(0.1, 0.1, 0.1),
                  z_loss_coeff=0.01)


def test_single_token():
    # T = 1: aux losses over one token, one sequence of length 1
    compare(cfg(**ALL_LOSSES), T=1, seed=17, seq_len=1)


def test_k_equals_e():
    # K = E: every expert selected, the top-k order is the full ranking
    compare(cfg(num_experts=5, top_k=5, **ALL_LOSSES), T=8, seed=18, seq_len=2)
    compare(cfg(num_experts=5, top_k=5, score_function="sigmoid"), T=8, seed=18)


def test_prime_number_of_experts():
    # E = 7: no power-of-two assumption anywhere
    compare(cfg(num_experts=7, top_k=3, **ALL_LOSSES), T=14, seed=19, seq_len=7)
    compare(cfg(num_experts=7, top_k=3, pre_softmax=True, load_balancing="aux_loss"), T=14, seed=19)


def one_expert_setup(c):
    """A router and 12 tokens that all route to expert 3 (top-1), for the most unbalanced case."""
    router = make_router(c, seed=20, w_scale=0.1)
    torch.manual_seed(20)
    x = torch.randn(12, 16) * 0.1
    x[:, 0] += 5.0
    with torch.no_grad():
        router.weight[3, 0] = 3.0
    return router, x


def test_every_token_to_one_expert():
    # the most unbalanced routing: aux loss far above 1, counts all on expert 3
    c = cfg(top_k=1, **ALL_LOSSES)
    router, x = one_expert_setup(c)
    out, _ = compare(c, T=12, seed=20, seq_len=4, router=router, x=x)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 12, 0, 0, 0, 0]
    assert out.losses["aux_loss"].item() > 7.5


def test_zero_tokens():
    c = cfg(**ALL_LOSSES)
    out = TopKRouter(c)(torch.randn(0, 16), seq_len=4)
    assert out.probs.shape == (0, 2) and out.expert_ids.shape == (0, 2)
    assert out.tokens_per_expert.tolist() == [0] * 8 and out.losses == {}


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "top_k > num_experts": (dict(top_k=9), "top_k"),
    "top_k = 0": (dict(top_k=0), "top_k"),
    "hidden_size not an int": (dict(hidden_size=16.0), "hidden_size"),
    "unknown score function": (dict(score_function="relu"), "score_function"),
    "unknown balancing name": (dict(load_balancing=("aux_los",)), "load_balancing"),
    "sinkhorn combined": (dict(load_balancing=("sinkhorn", "aux_loss")), "load_balancing"),
    "none combined": (dict(load_balancing=("none", "aux_loss")), "load_balancing"),
    "repeated name": (dict(load_balancing=("aux_loss", "aux_loss")), "load_balancing"),
    "coeff tuple of wrong length": (dict(load_balancing=("aux_loss",), aux_loss_coeff=(0.1, 0.2)), "aux_loss_coeff"),
    "negative coeff": (dict(load_balancing=("aux_loss",), aux_loss_coeff=-0.1), "aux_loss_coeff"),
    "negative z-loss coeff": (dict(z_loss_coeff=-1.0), "z_loss_coeff"),
    "num_groups not dividing E": (dict(num_groups=3, group_topk=1), "num_groups"),
    "group_topk > num_groups": (dict(num_groups=2, group_topk=3, top_k=4), "group_topk"),
    "group_topk > top_k": (dict(num_groups=4, group_topk=2, top_k=1), "group_topk"),
    "kept groups too small for top_k": (dict(num_groups=4, group_topk=1, top_k=3), "group_topk"),
    "num_groups without group_topk": (dict(num_groups=2), "group_topk"),
    "expert bias with softmax": (dict(expert_bias=True), "expert_bias"),
    "pre_softmax with sigmoid": (dict(score_function="sigmoid", pre_softmax=True), "pre_softmax"),
    "unnormalised softmax over selected logits": (dict(norm_topk_prob=False), "norm_topk_prob"),
    "sinkhorn with sigmoid": (dict(load_balancing="sinkhorn", score_function="sigmoid"), "score_function"),
    "sinkhorn with groups": (dict(load_balancing="sinkhorn", num_groups=2, group_topk=1), "num_groups"),
    "unknown router dtype": (dict(router_dtype="bf16"), "router_dtype"),
    "jitter out of range": (dict(input_jitter=1.5), "input_jitter"),
    "zero scaling factor": (dict(scaling_factor=0.0), "scaling_factor"),
    "negative bias rate": (dict(bias_update_rate=-1e-3), "bias_update_rate"),
}


@pytest.mark.parametrize("kw,field", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=f"RouterConfig.{field} must be"):
        cfg(**kw)


def test_error_message_names_expected_and_received():
    with pytest.raises(ValueError) as e:
        cfg(top_k=9)
    assert "top_k" in str(e.value) and "<= num_experts (8)" in str(e.value) and "got 9" in str(e.value)


def test_bad_inputs_raise():
    router = TopKRouter(cfg(load_balancing="seq_aux_loss"))
    with pytest.raises(ValueError, match=r"x must have shape \[T, 16\] \(hidden_size\), got \(4, 15\)"):
        router(torch.randn(4, 15))
    with pytest.raises(ValueError, match="x must be 2-D"):
        router(torch.randn(2, 4, 16))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        router(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        router([[0.0] * 16])
    with pytest.raises(ValueError, match="seq_len must divide"):
        router(torch.randn(6, 16), seq_len=4)
    with pytest.raises(ValueError, match="seq_len must be given"):
        router(torch.randn(6, 16))
    router.eval()
    router(torch.randn(6, 16))  # no seq aux loss in eval: seq_len not needed
    with pytest.raises(TypeError, match="config must be a RouterConfig"):
        TopKRouter(dict(hidden_size=16))


# ---------------------------------------------------------------------------------------------------------
# The fp32 gate GEMM on bf16 tensor cores (exact three-part bf16 split); CUDA runs it, here the sums are
# emulated in fp32, which is what the tensor cores accumulate in
# ---------------------------------------------------------------------------------------------------------


def test_split_bf16_parts_sum_to_the_fp32_value():
    from moetron.router import _split_bf16

    t = torch.randn(64, 33) * torch.logspace(-20, 20, 33)  # spans fp32's exponent range
    parts = _split_bf16(t)
    assert [p.dtype for p in parts] == [torch.bfloat16] * 3
    total = sum(p.double() for p in parts)
    rel = ((total - t.double()).abs() / t.double().abs()).max().item()
    assert rel <= 2.0**-23, rel


@pytest.mark.parametrize("T,H,E", [(37, 96, 10), (1, 40, 3), (130, 257, 128)])
def test_split_router_gemm_matches_fp64(T, H, E):
    from moetron.router import _router_gemm_split, _router_gemm_split_backward
    from tests._tolerance import assert_close_to_ref

    gen = torch.Generator().manual_seed(T * 1000 + E)
    x = torch.randn(T, H, generator=gen).bfloat16()
    w = torch.randn(E, H, generator=gen) * 0.05
    g = torch.randn(T, E, generator=gen)
    logits, w3 = _router_gemm_split(x, w)
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    ref = x.double() @ w.double().t()
    assert_close_to_ref("logits", logits, ref, x.float() @ w.t())
    gx, gw = _router_gemm_split_backward(g, x, w3, True, True)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    ref_gx, ref_gw = g.double() @ w.double(), g.double().t() @ x.double()
    assert_close_to_ref("dx", gx, ref_gx, (g @ w).bfloat16())
    assert_close_to_ref("dw", gw, ref_gw, g.t() @ x.float())
    only_w = _router_gemm_split_backward(g, x, w3, False, True)
    assert only_w[0] is None and torch.equal(only_w[1], gw)
