"""Tiny random Hugging Face MoE models (no network) shared by the integration tests."""

from __future__ import annotations

import torch

ARCHS = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")
VOCAB = 48


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch``; initializer_range is large so the experts move the logits visibly."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=24, moe_intermediate_size=12, num_experts=5,
                                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=12, num_local_experts=5, num_experts_per_tok=2)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=12, num_experts=5, num_experts_per_tok=2,
                             norm_topk_prob=False)
    elif arch == "deepseek_v3":
        common["num_hidden_layers"] = 3
        cfg = tf.DeepseekV3Config(**common, intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8,
                                  num_experts_per_tok=4, n_group=2, topk_group=2, n_shared_experts=1,
                                  first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                                  kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                  v_head_dim=8)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, impl: str = "eager", **overrides):
    """A random tiny CausalLM of ``arch`` (train mode, no dropout), expert weights and routers drawn too."""
    import transformers as tf

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=impl)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            # routers and a few HF inits start at zero or one: draw everything so no tie decides routing
            if name.endswith("gate.weight") or "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.train()
