"""moetron under torch.compile: a compiled model that contains MoELayer gives the eager results, forward and
backward, with ``fullgraph=True`` (no graph break). Dynamo does not trace into moetron's kernel launches
(ops/_launch.py) or its autograd Functions (moetron/_compile.py): compiled, the layer's ops are custom ops with
registered autograd formulas, and in inference the whole layer is one custom op.
Backends "eager" (Dynamo alone) and "aot_eager" (plus AOTAutograd, which traces the backward formulas); on the
torch path and on the Triton path (the interpreter on CPU)."""

import pytest
import torch

from moetron.layer import MoEConfig, MoELayer
from moetron.router import AuxLossAutoScaler


class _Block(torch.nn.Module):
    """A norm and a residual around the layer, so the compiled graph has work on both sides of moetron's ops."""

    def __init__(self, config):
        super().__init__()
        self.norm = torch.nn.LayerNorm(config.hidden_size)
        self.moe = MoELayer(config)

    def forward(self, x):
        return x + self.moe(self.norm(x))


_TRAINING_CONFIGS = {
    "default": dict(aux_loss_coeff=1e-2, z_loss_coeff=1e-3),  # the fused softmax routing on the Triton path
    "dsv3_style": dict(score_function="sigmoid", num_groups=2, group_topk=1, expert_bias=True, scaling_factor=2.0,
                       shared_expert_ffn_hidden_size=8, shared_expert_gate=True, load_balancing=("seq_aux_loss",),
                       aux_loss_coeff=1e-2),
    "capacity": dict(capacity_factor=0.8, drop_policy="probs"),
    "padded_pre_softmax": dict(pad_to=4, pre_softmax=True, norm_topk_prob=True, aux_loss_coeff=1e-2),
}


def _training_step(model, block, x):
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [xg.grad]
    block.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
@pytest.mark.parametrize("config", list(_TRAINING_CONFIGS))
def test_compiled_training_matches_eager_without_graph_breaks(monkeypatch, backend, moe_backend, config):
    """Training a compiled block with fullgraph=True: outputs and every gradient (router, experts, shared expert,
    norm, input) bitwise equal to eager, aux losses included, for each router family and token dropping."""
    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, **_TRAINING_CONFIGS[config])
    block = _Block(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(2, 9, 32, device=block.norm.weight.device)
    y_eager, g_eager = _training_step(block, block, x)
    y_comp, g_comp = _training_step(torch.compile(block, backend=backend, fullgraph=True), block, x)
    assert torch.equal(y_comp, y_eager)
    for got, want in zip(g_comp, g_eager):
        assert torch.equal(got, want)


@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
def test_compiled_training_follows_new_token_counts(monkeypatch, moe_backend):
    """A new number of tokens does not recompile the layer each time: the second one compiles a dynamic-shape
    graph (the ops take their row counts as SymInt), which serves the rest, bitwise equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, aux_loss_coeff=1e-2, pad_to=4)
    block = _Block(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    for tokens in (9, 15, 21, 30):
        x = torch.randn(2, tokens, 32, device=block.norm.weight.device)
        y_eager, g_eager = _training_step(block, block, x)
        y_comp, g_comp = _training_step(compiled, block, x)
        assert torch.equal(y_comp, y_eager)
        for got, want in zip(g_comp, g_eager):
            assert torch.equal(got, want)
    assert counter.frame_count == 2


@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
def test_compiled_training_under_autocast(monkeypatch, moe_backend):
    """bf16 autocast around a compiled training step (the usual mixed-precision setup): bitwise the eager step."""
    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, aux_loss_coeff=1e-2,
                    shared_expert_ffn_hidden_size=8)
    block = _Block(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(2, 9, 32, device=block.norm.weight.device)
    results = []
    for model in (block, torch.compile(block, backend="aot_eager", fullgraph=True)):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            results.append(_training_step(model, block, x))
    (y_eager, g_eager), (y_comp, g_comp) = results
    assert torch.equal(y_comp, y_eager)
    for got, want in zip(g_comp, g_eager):
        assert torch.equal(got, want)


@pytest.mark.parametrize("moe_backend", ["torch", "triton"])
def test_compiled_training_uses_the_aux_loss_scale(monkeypatch, moe_backend):
    """AuxLossAutoScaler.loss_scale reaches the compiled backward (read when the forward runs): with a scale of 4
    the router weight's gradient is the eager one with the same scale, not the one with scale 1."""
    monkeypatch.setenv("MOETRON_BACKEND", moe_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, aux_loss_coeff=0.5)
    block = _Block(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(2, 9, 32, device=block.norm.weight.device)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    try:
        for scale in (1.0, 4.0):
            AuxLossAutoScaler.set_loss_scale(scale)
            _, g_eager = _training_step(block, block, x)
            _, g_comp = _training_step(compiled, block, x)
            assert torch.equal(g_comp[1], g_eager[1])  # the router weight
            if scale == 1.0:
                unscaled = g_eager[1]
        assert not torch.equal(g_eager[1], unscaled)
    finally:
        AuxLossAutoScaler.set_loss_scale(1.0)


def test_compiled_gmm_checks_cpu_sizes_when_it_runs():
    """Compiled, gmm's custom op still checks host-readable group sizes: a sum past M is an error, not a wrong
    result."""
    import moetron.ops

    torch._dynamo.reset()
    f = torch.compile(lambda x, w, sizes: moetron.gmm(x, w, sizes), backend="aot_eager", fullgraph=True)
    x, w = torch.randn(8, 4), torch.randn(2, 4, 3)
    torch.testing.assert_close(f(x, w, torch.tensor([3, 5])), moetron.ops.gmm_ref(x, w, [3, 5]))
    with pytest.raises(ValueError, match="group_sizes must cover at most the 8 rows"):
        f(x, w, torch.tensor([3, 6]))


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
    """A tiny transformers Qwen3-MoE with the "moetron" experts, compiled whole with fullgraph=True, as fine-tuning
    scripts do: the experts' training ops are custom ops in the graph."""
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
    for model in (eager, torch.compile(compiled_model, backend="aot_eager", fullgraph=True)):
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
