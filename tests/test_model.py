"""The MoE transformer of `moetron train`: structure, names, sizes, FLOPs, causality, config validation."""

from __future__ import annotations

import pytest
import torch

from moetron.layer import MoELayer
from moetron.models import PRESETS, ModelConfig, MoETransformer, preset

SMALL = dict(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=16, num_experts=4, top_k=2,
             moe_ffn_hidden_size=24)


def test_layer_pattern():
    # after the first_k_dense dense layers, every moe_layer_freq-th layer is MoE, starting with the first
    cfg = ModelConfig(**{**SMALL, "num_layers": 6}, first_k_dense=1, moe_layer_freq=2)
    model = MoETransformer(cfg)
    assert [i for i, _ in model.moe_layers()] == [1, 3, 5]
    assert [l.is_moe for l in model.model.layers] == [False, True, False, True, False, True]
    assert all(isinstance(l, MoELayer) for _, l in model.moe_layers())


def test_hf_style_names_and_tied_head():
    names = set(MoETransformer(ModelConfig(**SMALL, first_k_dense=1)).state_dict())
    assert {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_norm.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.router.weight",
            "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
            "model.norm.weight", "lm_head.weight"} <= names
    tied = MoETransformer(ModelConfig(**SMALL, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("extra", [
    {},                                                       # all MoE, untied
    {"first_k_dense": 1, "tie_word_embeddings": True},        # a dense layer, tied head
    {"shared_expert_ffn_hidden_size": 16, "shared_expert_gate": True, "qk_norm": False},  # shared expert, no qk norm
])
def test_param_count_matches_the_module(extra):
    cfg = ModelConfig(**SMALL, **extra)
    model = MoETransformer(cfg)
    assert cfg.num_params()["total"] == sum(p.numel() for p in model.parameters())


def test_flops_per_token_formula():
    cfg = ModelConfig(**SMALL)
    H, F, E, K, L, S = 32, 24, 4, 2, 4, 16
    D, N, NK = 8, 4, 2
    attn = H * N * D + 2 * H * NK * D + N * D * H
    active = L * (attn + E * H + K * 3 * H * F) + 256 * H  # router, K experts, LM head
    assert cfg.num_params()["active"] == active
    assert cfg.flops_per_token(S) == 6 * active + 12 * L * N * D * S
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_seq_len)


def test_presets_have_the_advertised_sizes():
    tiny, small = preset("tiny").num_params(), preset("small").num_params()
    assert 1e6 < tiny["total"] < 3e6
    assert 0.5e9 <= small["total"] <= 1.0e9 and small["active"] < 0.25 * small["total"]
    # the README's count by hand for small at seq_len 1024
    assert small["active"] == 170_557_440
    assert preset("small").flops_per_token(1024) == 6 * 170_557_440 + 12 * 6 * 16 * 128 * 1024 == 1_174_339_584
    assert set(PRESETS) >= {"tiny", "small"}


def test_causal_and_loss():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**SMALL)).eval()
    ids = torch.randint(0, 256, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-5)  # the future does not leak back
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    labels = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        loss = model(ids, labels)
    ref = torch.nn.functional.cross_entropy(a.reshape(-1, 256).double(), labels.reshape(-1))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    # an untrained model predicts bytes about uniformly: ln 256 = 5.55 nats
    assert 5.0 < loss.item() < 6.2


def test_generate_shapes_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**SMALL))
    prompt = torch.tensor([[100, 101, 102]])
    out = model.generate(prompt, 20, temperature=0)  # longer than max_seq_len: the window slides
    assert out.shape == (1, 23) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))
    assert model.training  # generate restores the mode


@pytest.mark.parametrize("kw, match", [
    ({"hidden_size": 0}, "hidden_size must be a positive int"),
    ({"num_kv_heads": 3}, "num_kv_heads must be a positive divisor of num_heads"),
    ({"num_heads": 5, "num_kv_heads": 5}, "num_heads must be a divisor of hidden_size"),
    ({"top_k": 5}, r"top_k must be <= num_experts \(4\)"),
    ({"first_k_dense": 9}, r"first_k_dense must be an int in \[0, num_layers=4\]"),
    ({"head_dim": 7}, "head_dim must be an even int"),
    ({"score_function": "tanh"}, "score_function"),  # reported by the MoE config
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **kw})


def test_sequence_too_long():
    model = MoETransformer(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="sequence length 17 > max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_shared_input_linears_match_separate_linears():
    """The q/k/v (and gate/up) projections' one-node backward (CUDA path) against separate nn.Linear: gradcheck in
    float64, and an output left unused (no gradient) or a frozen weight."""
    from moetron.models.transformer import _SharedInputLinears

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ws = [torch.randn(n, 6, dtype=torch.float64, generator=g, requires_grad=True) for n in (4, 2, 2)]
    assert torch.autograd.gradcheck(lambda x, *ws: _SharedInputLinears.apply(x, *ws), (x, *ws))
    q, k, v = _SharedInputLinears.apply(x, *ws)
    for out, w in zip((q, k, v), ws):
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=0, atol=0)
    ws[1].requires_grad_(False)
    (q.square().sum() + 2 * v.sum()).backward()  # k unused, its weight frozen
    x_ref, w0, w2 = x.detach().requires_grad_(), ws[0].detach().requires_grad_(), ws[2].detach().requires_grad_()
    (torch.nn.functional.linear(x_ref, w0).square().sum() + 2 * torch.nn.functional.linear(x_ref, w2).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ws[0].grad, w0.grad)
    torch.testing.assert_close(ws[2].grad, w2.grad)
    assert ws[1].grad is None
