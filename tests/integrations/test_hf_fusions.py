"""moetron.integrations.hf's non-expert fusions on tiny random transformers models (CPU, no network).

fuse_lm_loss: the fused head and cross-entropy give the unfused model's loss and every parameter's gradient (fp32),
with ignored labels, the router aux loss, num_items_in_batch and shift_labels; eval mode and unlabelled forwards are
untouched; unfuse restores; models it cannot reproduce are refused with a clear error.
fuse_norms: every RMSNorm of the four architectures runs moetron's kernel, with the same logits and gradients; a
norm with another formula is left alone with a warning.
fuse_rotary: the modeling file's rotary function is swapped (and restored once no fused model uses it), with the same
logits and gradients, also with position ids that differ between batch rows; other formulas are left alone."""

import pytest
import torch

pytest.importorskip("transformers")

from moetron.integrations.hf import (fuse, fuse_lm_loss, fuse_norms, fuse_rotary, unfuse, unfuse_lm_loss,  # noqa: E402
                                     unfuse_norms, unfuse_rotary)
from tests.integrations._hf_models import ARCHS, VOCAB, tiny_model  # noqa: E402


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[1, 7] = -100
    return ids, labels


def _device():
    """CUDA where there is one (the kernels themselves); else the CPU with the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_loss_matches_transformers(arch):
    aux = arch != "deepseek_v3"  # DeepSeek-V3's CausalLM has no router aux loss
    overrides = dict(output_router_logits=True, router_aux_loss_coef=0.05) if aux else {}
    plain = tiny_model(arch, **overrides)
    fused = tiny_model(arch, **overrides)
    fuse_lm_loss(fused)
    ids, labels = _batch()
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
    got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    assert got.logits.shape == (2, 0, VOCAB)  # the fused forward computes no logits
    if aux:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=0)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_num_items_in_batch_and_shift_labels():
    plain, fused = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    fuse_lm_loss(fused)
    ids, labels = _batch(1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    for kwargs in (dict(num_items_in_batch=torch.tensor(37)), dict(shift_labels=shifted.flip(0))):
        want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels, **kwargs)
        got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=labels, **kwargs)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6)


def test_eval_and_unlabelled_forwards_are_untouched():
    plain, fused = tiny_model("mixtral"), tiny_model("mixtral")
    fuse_lm_loss(fused)
    fuse_lm_loss(fused)  # twice: harmless
    ids, labels = _batch(2)
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    plain.eval()
    fused.eval()
    want, got = plain(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_an_instance_forward_is_kept_and_restored():
    """accelerate's device hooks replace forward on the instance: the fused loss calls it, unfuse puts it back, and
    fuse_norms leaves such norms alone."""
    model = tiny_model("qwen3_moe")
    calls = []
    class_forward = model.forward

    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return class_forward(*args, **kwargs)

    model.forward = hooked_forward
    norm = model.model.norm
    norm.forward = norm.forward  # an instance-level forward, as a hook would leave
    fuse_lm_loss(model)
    ids, labels = _batch(8)
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 0, VOCAB) and calls == [1]
    unfuse_lm_loss(model)
    assert model.__dict__["forward"] is hooked_forward
    with pytest.warns(UserWarning, match=r"left these norms alone.*model\.norm"):
        names = fuse_norms(model)
    assert "model.norm" not in names and names


def test_unfuse_restores_the_class_forward():
    model = tiny_model("olmoe")
    assert unfuse_lm_loss(model) is False
    fuse_lm_loss(model)
    assert "forward" in model.__dict__
    assert unfuse_lm_loss(model) is True
    assert "forward" not in model.__dict__ and "_moetron_original_forward" not in model.__dict__
    ids, labels = _batch(3)
    assert model(input_ids=ids, labels=labels).logits.shape == (2, 11, VOCAB)


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_lm_loss("model")
    with pytest.raises(ValueError, match="needs a causal LM with an `lm_head`"):
        fuse_lm_loss(torch.nn.Linear(4, 4))
    model = tiny_model("qwen3_moe")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="custom loss_function"):
        fuse_lm_loss(model)
    model = tiny_model("qwen3_moe")
    fuse_lm_loss(model)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum() * 0 + 7.0  # set after fusing: used
    ids, labels = _batch(7)
    assert model(input_ids=ids, labels=labels).loss.item() == 7.0
    model = tiny_model("qwen3_moe")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        fuse_lm_loss(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_norms_match_transformers(arch, monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "auto" if torch.cuda.is_available() else "triton")  # the kernels
    plain, fused = tiny_model(arch).to(_device()), tiny_model(arch).to(_device())
    names = fuse_norms(fused)
    want_count = sum(type(m).__name__.endswith("RMSNorm") for m in plain.modules())
    assert len(names) == want_count >= 5  # per layer at least two, plus the final norm
    ids, labels = (t.to(_device()) for t in _batch(4))
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
    got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert fuse_norms(fused) == names  # twice: harmless
    assert unfuse_norms(fused) == names
    assert all("forward" not in m.__dict__ for m in fused.modules())


def test_norm_with_another_formula_is_left_alone():
    class OffsetRMSNorm(torch.nn.Module):  # Gemma's rule: x_hat * (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    model = torch.nn.Sequential(OffsetRMSNorm())
    with pytest.warns(UserWarning, match=r"left these norms alone.*OffsetRMSNorm"):
        assert fuse_norms(model) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_rotary_matches_transformers(arch, monkeypatch):
    import sys

    monkeypatch.setenv("MOETRON_BACKEND", "auto" if torch.cuda.is_available() else "triton")
    plain, fused = tiny_model(arch).to(_device()), tiny_model(arch).to(_device())
    files = fuse_rotary(fused)
    modeling = sys.modules[type(plain).__module__]
    assert files == [type(plain).__module__] and modeling.apply_rotary_pos_emb.__wrapped__ is not None
    ids, labels = (t.to(_device()) for t in _batch(6))
    positions = torch.stack([torch.arange(11), torch.arange(11) + 5]).to(_device())  # rows at other positions
    try:
        for kwargs in (dict(input_ids=ids, labels=labels), dict(input_ids=ids, labels=labels, position_ids=positions)):
            unfuse_rotary(fused)  # the plain model runs transformers' own function
            want, want_grads = _loss_and_grads(plain, **kwargs)
            fuse_rotary(fused)
            got, got_grads = _loss_and_grads(fused, **kwargs)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            for name, g in want_grads.items():
                torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    finally:
        unfuse_rotary(fused)
    assert not hasattr(modeling.apply_rotary_pos_emb, "__wrapped__")  # the original is back


def test_rotary_swap_is_shared_and_restored_last():
    import sys

    a, b = tiny_model("mixtral"), tiny_model("mixtral")
    modeling = sys.modules[type(a).__module__]
    original = modeling.apply_rotary_pos_emb
    fuse_rotary(a)
    fuse_rotary(a)  # twice: harmless, counted once
    fuse_rotary(b)
    unfuse_rotary(a)
    assert modeling.apply_rotary_pos_emb is not original  # b still uses it
    unfuse_rotary(b)
    assert modeling.apply_rotary_pos_emb is original


def test_rotary_with_another_formula_is_left_alone(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("fake_modeling_interleaved")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # interleaved pairs, not rotate-half
        def rot(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    fake.apply_rotary_pos_emb = apply_rotary_pos_emb

    class Attention(torch.nn.Module):
        pass

    Attention.__module__ = fake.__name__
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    with pytest.warns(UserWarning, match="left apply_rotary_pos_emb alone in fake_modeling_interleaved"):
        assert fuse_rotary(torch.nn.Sequential(Attention())) == []
    assert fake.apply_rotary_pos_emb is apply_rotary_pos_emb


def test_fuse_does_everything_in_one_call_and_unfuse_undoes():
    import sys

    plain, model = tiny_model("qwen3_moe", impl="grouped_mm"), tiny_model("qwen3_moe", impl="grouped_mm")
    done = fuse(model)
    assert done[:2] == ["experts", "loss"] and len(done) > 6 and done[-1] == type(model).__module__
    assert model.config._experts_implementation == "moetron"
    ids, labels = _batch(5)
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
    got, got_grads = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert got.logits.shape == (2, 0, VOCAB)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    unfuse(model)
    assert model.config._experts_implementation == "grouped_mm"
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not hasattr(sys.modules[type(model).__module__].apply_rotary_pos_emb, "__wrapped__")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse(None)


def test_finetuning_fused_matches_plain():
    """The convergence check of test_hf_backend (30 AdamW steps of the tiny Qwen3-MoE in bf16, same seed and data)
    with everything ``fuse`` swaps in: experts, LM loss, norms and rotary. Same bounds: the first 10 steps within 5%,
    5-step means within 3%, and no further from the fp32 trajectory than twice the plain bf16 run (plus 0.02)."""
    import copy

    from tests.integrations.test_hf_backend import _finetune

    plain = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    fused = copy.deepcopy(plain)
    fuse(fused)
    try:
        a, b = _finetune(plain), _finetune(fused)
    finally:
        unfuse(fused)  # the rotary swap is global to the modeling file
    fp32 = _finetune(tiny_model("qwen3_moe"))
    assert b[-4:].mean() < 0.9 * b[:4].mean(), f"fused training did not learn: {b.tolist()}"
    torch.testing.assert_close(b[:10], a[:10], rtol=5e-2, atol=1e-2)
    torch.testing.assert_close(b.view(-1, 5).mean(1), a.view(-1, 5).mean(1), rtol=3e-2, atol=1e-2)
    err_fused, err_plain = (b - fp32).abs().max().item(), (a - fp32).abs().max().item()
    assert err_fused <= 2 * err_plain + 0.02, (err_fused, err_plain)


def test_fuse_on_a_dense_model(monkeypatch):
    """A model without experts (a tiny Llama): fuse does the loss, norms and rotary, and matches the plain model."""
    import copy

    import transformers as tf

    monkeypatch.setenv("MOETRON_BACKEND", "auto" if torch.cuda.is_available() else "triton")
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = tf.LlamaForCausalLM(cfg).to(_device()).train()
    fused = copy.deepcopy(plain)
    try:
        done = fuse(fused)
        assert done[0] == "loss" and "experts" not in done and done[-1] == type(plain).__module__
        ids, labels = (t.to(_device()) for t in _batch(9))
        want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
        got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=labels)
    finally:
        unfuse(fused)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("entry", [fuse, unfuse, fuse_lm_loss, unfuse_lm_loss, fuse_norms, unfuse_norms, fuse_rotary,
                                   unfuse_rotary], ids=lambda f: f.__name__)
def test_every_entry_point_names_a_bad_model(entry):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        entry("model")
