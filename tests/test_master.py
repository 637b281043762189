"""moetron.train.master.MasterWeights on the CPU: the fp32 gradients it accumulates (the experts' straight from
the grouped GEMM into main_grad, the rest from .grad) and the update it publishes equal plain fp32 training; in
bf16 the model holds rounded masters and the checkpoint tensors are the fp32 masters."""

import copy

import torch

from moetron.models import MoETransformer, preset
from moetron.train.loop import _param_groups
from moetron.train.master import MasterWeights


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=2, num_experts=4, top_k=2,
                 moe_ffn_hidden_size=16, max_seq_len=16)
    return MoETransformer(cfg)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g))
            for _ in range(n)]


def _opt(params):
    return torch.optim.AdamW(_param_groups(params, 0.1), lr=1e-2)


def test_fp32_masters_reproduce_plain_training_exactly():
    ref = _model()
    low = copy.deepcopy(ref)
    master = MasterWeights(low, dtype=torch.float32)  # same storage dtype: only the bookkeeping differs
    fused = [p for p in low.parameters() if hasattr(p, "main_grad")]
    assert fused and all(p.grad is None for p in fused)
    unfused = {id(p) for p in low.parameters()} - {id(p) for p in fused}
    assert sorted(map(id, master.autograd_params)) == sorted(unfused)
    opt_ref, opt_m = _opt(list(ref.parameters())), _opt(master.params)
    for step in range(2):
        for x, y in _batches(2, seed=step):
            (ref(x, y) / 2).backward()
            (low(x, y) / 2).backward()
            master.accumulate()
        assert all(p.grad is None for p in fused), "the experts' GEMM weights must not get a .grad"
        for (name, p), m in zip(ref.named_parameters(), master.params):
            assert torch.allclose(m.grad, p.grad, rtol=1e-6, atol=1e-7), name
        opt_ref.step()
        opt_m.step()
        master.publish()
        opt_ref.zero_grad()
        master.zero_grad()
        for (name, p), q in zip(ref.named_parameters(), low.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), name


def test_bf16_model_holds_rounded_masters_and_checkpoint_tensors_are_fp32():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    master = MasterWeights(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert all(dtypes[n] == torch.float32 for n in dtypes if "router" in n or "norm" in n)
    assert dtypes["lm_head.weight"] == torch.bfloat16
    assert any(dtypes[n] == torch.bfloat16 for n in dtypes if "experts" in n)
    for (n, p), m in zip(model.named_parameters(), master.params):
        assert m.dtype == torch.float32 and torch.equal(m.detach(), before[n]), n
        assert torch.equal(p.detach(), before[n].to(p.dtype)), n
    sd = master.state_dict_tensors()
    assert set(sd) == set(model.state_dict())
    assert all(t.dtype == torch.float32 for n, t in sd.items() if n in before)
    assert all(torch.equal(sd[n], before[n]) for n in before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(*_batches(1)[0])
    loss.backward()
    master.accumulate(keep_grads=True)
    for p, m in zip(model.parameters(), master.params):
        assert m.grad is not None and torch.isfinite(m.grad).all()
        if p.dtype == torch.bfloat16 and not hasattr(p, "main_grad"):
            assert p.grad is not None and not p.grad.any()  # folded into the master, kept allocated, zeroed
    assert any(m.grad.abs().sum() > 0 for m in master.params)
    master.zero_grad()
    assert all(not m.grad.any() for m in master.params if m.grad is not None)


def test_tied_embeddings_stay_one_tensor_in_the_checkpoint():
    torch.manual_seed(0)
    cfg = preset("tiny", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, num_experts=4, top_k=2,
                 moe_ffn_hidden_size=16, max_seq_len=16, tie_word_embeddings=True)
    model = MoETransformer(cfg)
    master = MasterWeights(model)
    sd = master.state_dict_tensors()
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_bad_arguments_raise():
    import pytest

    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        MasterWeights({})
    with pytest.raises(ValueError, match="dtype must be .* got torch.int8"):
        MasterWeights(_model(), dtype=torch.int8)
