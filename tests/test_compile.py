"""moetron under torch.compile: a compiled model that contains MoELayer gives the eager results, forward and
backward. Dynamo does not trace into moetron's kernel launches (ops/_launch.py); in training the ops run behind
graph breaks, in inference MoELayer is one custom op (no break).
Backends "eager" (Dynamo alone) and "aot_eager" (plus AOTAutograd, where custom autograd Functions are traced
for the backward); on the torch path and on the Triton path (the interpreter on CPU)."""

import pytest
import torch

from moetron.layer import MoEConfig, MoELayer


class _Block(torch.nn.Module):
    """A norm and a residual around the layer, so the compiled graph has work on both sides of moetron's ops."""

    def __init__(self, config):
        super().__init__()
        self.norm = torch.nn.LayerNorm(config.hidden_size)
        self.moe = MoELayer(config)

    def forward(self, x):
        return x + self.moe(self.norm(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
def test_compiled_block_matches_eager(monkeypatch, backend, moe_backend):
    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, aux_loss_coeff=1e-2,
                       z_loss_coeff=1e-3)
    block = _Block(config).to("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(2, 9, 32, device=block.norm.weight.device)

    def step(model):
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
        grads = [p.grad.clone() for p in block.parameters()] + [xg.grad]
        block.zero_grad(set_to_none=True)
        return y.detach(), grads

    y_eager, g_eager = step(block)
    y_comp, g_comp = step(torch.compile(block, backend=backend))
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(g_comp, g_eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


_INFERENCE_CONFIGS = {
    "default": dict(),
    "dsv3_style": dict(score_function="sigmoid", num_groups=2, group_topk=1, expert_bias=True, scaling_factor=2.0,
                       shared_expert_ffn_hidden_size=8, shared_expert_gate=True),
    "capacity": dict(capacity_factor=0.8, drop_policy="position"),
}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
@pytest.mark.parametrize("config", list(_INFERENCE_CONFIGS))
def test_compiled_inference_has_no_graph_break(monkeypatch, backend, moe_backend, config):
    """Inference (eval, no_grad) of a compiled block runs MoELayer as one custom op: fullgraph=True holds, each call
    routes its new tokens (a new input, a skewed one), and the layer's statistics follow the compiled calls."""
    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, **_INFERENCE_CONFIGS[config])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = _Block(cfg).to(device).eval()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    for x in (torch.randn(2, 9, 32, device=device), torch.randn(2, 9, 32, device=device).abs() * 3):
        with torch.no_grad():
            want = block(x)
            want_stats = block.moe.last_stats
            block.moe.last_stats = None
            got = compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got_stats = block.moe.last_stats
        for name in ("tokens_per_expert", "routed_tokens_per_expert", "num_dropped"):
            assert torch.equal(got_stats[name], want_stats[name]), name
        assert got_stats["losses"] == {}


def test_a_copied_layer_is_its_own_op():
    """The inference op finds its layer by name: a deep copy gets a name of its own, so a compiled copy runs the
    copy's weights, and a layer that is gone is not kept alive by the registry."""
    import copy
    import gc
    import weakref

    from moetron import layer as layer_module

    torch._dynamo.reset()
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)).eval()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.experts.down_proj.mul_(-1)
        x = torch.randn(5, 16)
        got = torch.compile(twin, backend="eager", fullgraph=True)(x)
        torch.testing.assert_close(got, twin(x))
        assert not torch.allclose(got, layer(x))
    assert layer._compile_name != twin._compile_name
    ref = weakref.ref(twin)
    name = twin._compile_name
    del twin, got
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None and name not in layer_module._COMPILED_LAYERS


def test_inference_op_names_an_unknown_layer():
    import moetron.layer  # noqa: F401  (registers the op)

    with pytest.raises(RuntimeError, match="no live MoELayer is named 'moe_layer_missing'"):
        torch.ops.moetron.moe_layer_inference(torch.randn(3, 16), "moe_layer_missing")


def test_compiled_transformers_model_with_moetron_experts(monkeypatch):
    """A tiny transformers Qwen3-MoE with the "moetron" experts, compiled whole, as fine-tuning scripts do."""
    pytest.importorskip("transformers")
    import moetron.integrations.hf  # noqa: F401  (registers "moetron")
    from tests.integrations._hf_models import tiny_model

    monkeypatch.setenv("MOETRON_BACKEND", "triton")
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = tiny_model("qwen3_moe", impl="moetron").to(device)
    compiled_model = tiny_model("qwen3_moe", impl="moetron").to(device)  # the same seed: the same weights
    ids = torch.randint(0, eager.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    results = []
    for model in (eager, torch.compile(compiled_model, backend="aot_eager")):
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.numel(), device=device).view_as(logits)).sum().backward()
        results.append((logits.detach(), [p.grad for p in (eager if model is eager else compiled_model).parameters()]))
    # AOTAutograd decomposes transformers' own ops (attention, norms) and reorders a few fp32 sums: ~1e-6 apart
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _moetron_autograd_functions():
    import importlib
    import pkgutil

    import moetron

    found = {}
    for info in pkgutil.walk_packages(moetron.__path__, "moetron."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, torch.autograd.Function)
                    and value.__module__.startswith("moetron.")):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_autograd_function_is_opaque_to_dynamo():
    """Dynamo must not trace into moetron's autograd Functions (moetron/_compile.py): torch 2.11 traces a Function
    that writes into its returned tensor with wrong gradients (pytorch/pytorch#180642; seen as zero expert
    gradients on an H100). CI's torch traces it correctly, so the rule itself is what this checks: every Function
    has a disabled ``eager_apply``, and moetron never calls ``.apply`` (which Dynamo traces whatever it holds)."""
    import pathlib
    import re

    import moetron

    functions = _moetron_autograd_functions()
    assert len(functions) >= 20, sorted(functions)  # the walk found the ops, the router, dispatch and comm
    traced = [name for name, cls in functions.items()
              if not getattr(getattr(cls, "eager_apply", None), "_torchdynamo_disable", False)]
    assert not traced, f"autograd Functions without @eager_function: {traced}"
    names = {cls.__name__ for cls in functions.values()}
    calls = [f"{path.name}: {m.group(0)}" for path in pathlib.Path(moetron.__file__).parent.rglob("*.py")
             for m in re.finditer(r"\b(\w+)\.apply\(", path.read_text()) if m.group(1) in names]
    assert not calls, f"call eager_apply, not apply: {calls}"


def test_eager_function_rejects_non_functions():
    from moetron._compile import eager_function

    with pytest.raises(TypeError, match="autograd.Function"):
        eager_function(torch.nn.Linear)
