"""torch.compile over transformers models that use the "moetron" experts.

Without gradients the experts forward is one custom op (``moetron::hf_experts_inference``), so the whole model
compiles with ``fullgraph=True`` (no graph break, hence CUDA-graph capture with ``mode="reduce-overhead"``) and
gives the eager model's logits bit for bit, on the torch path and on the Triton kernels. With gradients, or with a
gate of the model's own, the experts run eagerly behind graph breaks and still give the eager results.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
moe_integration = pytest.importorskip("transformers.integrations.moe")
if not hasattr(moe_integration, "ExpertsInterface"):
    pytest.skip("transformers has no experts registry", allow_module_level=True)

from moetron.integrations import hf  # noqa: E402,F401  (registers "moetron")
from tests.integrations._hf_models import ARCHS, VOCAB, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "torch")
    monkeypatch.delenv("MOETRON_DEBUG", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(seed=0, T=7):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _breaks(model, ids) -> tuple[int, list[str]]:
    explained = torch._dynamo.explain(model)(input_ids=ids)
    return explained.graph_break_count, [str(b.reason).splitlines()[0][:200] for b in explained.break_reasons]


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_compiles_whole_and_matches_eager(arch):
    """No graph break beyond those of the same model with transformers' "grouped_mm" experts (none with the
    transformers CI installs; some releases' own modeling code does not trace: with transformers 5.17 on the H100
    machine DeepSeek-V3's attention failed with either experts implementation), and the compiled logits are the
    eager ones."""
    model = tiny_model(arch, impl="moetron").eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        try:
            baseline, _ = _breaks(tiny_model(arch, impl="grouped_mm").eval(), ids)
        except Exception as e:  # transformers' own model, whatever the experts
            pytest.skip(f"the {arch} model does not trace with transformers' own experts here: {type(e).__name__}")
        count, reasons = _breaks(model, ids)
        assert count <= baseline, reasons
        if baseline:
            pytest.skip(f"the {arch} model breaks the graph {baseline} times with transformers' own experts")
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_inference_compiles_whole_on_triton_kernels(monkeypatch):
    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # the model is on the CPU
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors)")
    model = tiny_model("qwen3_moe", impl="moetron").eval()
    ids = _ids(1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_training_under_compile_matches_eager():
    """With gradients the experts run eagerly behind graph breaks: loss and every gradient as in eager."""
    model = tiny_model("qwen3_moe", impl="moetron")
    compiled_model = copy.deepcopy(model)
    ids = _ids(2)
    labels = _ids(3)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    compiled_loss = compiled(input_ids=ids, labels=labels).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    grads = dict(compiled_model.named_parameters())
    for name, p in model.named_parameters():
        assert grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_gate_of_the_model_own_runs_eagerly_under_compile():
    """An instance-level ``_apply_gate`` is not transformers' default gate: it is called as the model defines it,
    compiled or not (the custom op only takes the default gate)."""
    model = tiny_model("qwen3_moe", impl="moetron").eval()
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            module._apply_gate = lambda h: torch.relu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1]
            assert hf._default_gate_kind(module) is None
    ids = _ids(4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
        default = tiny_model("qwen3_moe", impl="moetron").eval()(input_ids=ids).logits
    assert torch.equal(out, ref)
    assert not torch.allclose(ref, default)  # the custom gate did change the model


def test_generate_with_a_static_cache_and_a_fullgraph_forward():
    """The decode loop users compile: greedy generate() with a static KV cache, the forward compiled with
    fullgraph=True, under inference_mode: the same tokens as the eager model."""
    ids = _ids(5, T=5)
    eager = tiny_model("qwen3_moe", impl="moetron").eval()
    expected = eager.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = tiny_model("qwen3_moe", impl="moetron").eval()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.inference_mode():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                cache_implementation="static")
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("T", [6, 0])
def test_compiled_experts_with_sentinel_ids(T):
    """Expert-parallel sentinels (ids outside [0, E), here with non-zero weights) and an empty batch through the
    custom op: what the eager experts forward gives."""
    model = tiny_model("qwen3_moe", impl="moetron").eval()
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    E, H = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, 2), generator=g)
    ids[::2, 1] = E  # every other token has one slot on another rank
    weights = torch.rand(T, 2, generator=g)
    with torch.no_grad():
        expected = hf.experts_forward(experts, x, ids, torch.where(ids == E, 0.0, weights))
        compiled = torch.compile(lambda *a: hf.experts_forward(experts, *a), fullgraph=True, backend="aot_eager")
        out = compiled(x, ids, weights)
    assert out.shape == (T, H)
    assert torch.equal(out, expected)
