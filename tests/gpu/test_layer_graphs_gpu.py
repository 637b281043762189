"""A standalone MoELayer captured with torch.cuda.make_graphed_callables (forward and backward as two CUDA graphs):
the dropless layer never syncs with the host and keeps fixed-size buffers, so replays with new tokens (new routing,
new group sizes) must give bitwise the outputs and gradients of eager runs on the same weights. This is how a user
removes the host time that dominates small batches (benchmarks/NOTES.md, session 14)."""

import copy

import pytest
import torch

from moetron import MoEConfig, MoELayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _steps(shape, count):
    """(step, x, dy) of ``count`` training steps that each route differently: step 2 sends every token to a few
    experts."""
    for step in range(count):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        if step == 2:
            x = x.abs() * 4
        yield step, x, torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _output_and_grads(layer, run, x, dy):
    """One step of ``run`` (``layer`` or a captured / compiled form of it): (output, [dx] + parameter grads)."""
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = run(xi)
    y.backward(dy)
    result = y.detach().clone(), [xi.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    torch.cuda.synchronize()
    return result


@pytest.mark.parametrize("config", [
    dict(),  # softmax top-k with the aux loss: the default
    dict(score_function="sigmoid", num_groups=4, group_topk=2, expert_bias=True, load_balancing=("seq_aux_loss",),
         scaling_factor=2.5, shared_expert_ffn_hidden_size=48, shared_expert_gate=True),
], ids=["default", "dsv3_style"])
def test_captured_layer_replays_match_eager(config):
    torch.manual_seed(0)
    shape, H = (2, 12, 64), 64  # [B, S, H]: the sequence aux loss takes S from the shape
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=8, top_k=2, z_loss_coeff=1e-3, **config)
    eager = MoELayer(cfg, device="cuda", dtype=torch.bfloat16).train()
    graphed_layer = copy.deepcopy(eager)
    sample = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(graphed_layer, (sample,))
    for step, x, dy in _steps(shape, 3):
        outs, grads = zip(*(_output_and_grads(layer, run, x, dy)
                            for layer, run in ((eager, eager), (graphed_layer, graphed))))
        assert torch.equal(outs[0], outs[1]), f"step {step}: outputs differ"
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        for name, g_eager, g_graph in zip(names, *grads):
            assert torch.equal(g_eager, g_graph), f"step {step}: gradient of {name} differs"
        counts = graphed_layer.last_stats["tokens_per_expert"]
        assert torch.equal(counts, eager.last_stats["tokens_per_expert"]), "the replay's statistics are stale"


def test_compiled_inference_replays_from_cuda_graphs():
    """torch.compile(mode="reduce-overhead", fullgraph=True) of a layer in eval mode under no_grad: the layer is one
    custom op in the graph, replayed from a CUDA graph; every call with new tokens must give the eager output and
    statistics bitwise."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=8, top_k=2, shared_expert_ffn_hidden_size=48)
    layer = MoELayer(cfg, device="cuda", dtype=torch.bfloat16).eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=False)
    with torch.no_grad():
        for step in range(5):  # warm-up, recording, then replays
            x = torch.randn(3, 11, 64, device="cuda", dtype=torch.bfloat16) * (1 + step)
            want = layer(x)
            want_counts = layer.last_stats["tokens_per_expert"].clone()
            got = compiled(x).clone()
            assert torch.equal(got, want), f"step {step}: outputs differ"
            assert torch.equal(layer.last_stats["tokens_per_expert"], want_counts), f"step {step}: stale statistics"
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("config", [
    dict(),
    dict(score_function="sigmoid", num_groups=4, group_topk=2, expert_bias=True, load_balancing=("seq_aux_loss",),
         scaling_factor=2.5, shared_expert_ffn_hidden_size=48, shared_expert_gate=True),
], ids=["default", "dsv3_style"])
def test_compiled_training_matches_eager(config, mode):
    """torch.compile(fullgraph=True) with Inductor of a training layer: moetron's ops are custom ops with autograd
    formulas in the graph; "reduce-overhead" replays forward and backward from CUDA graphs. Every step routes new
    tokens; outputs and gradients must match eager to bf16 rounding, not bitwise: Inductor compiles the torch glue
    around moetron's ops (the sigmoid router's scores, the shared expert's activation) and keeps its intermediates
    in fp32 where eager rounds each op to bf16. So the check is a norm-wise relative error, which a wrong gradient
    (an O(1) error) cannot pass."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    shape, H = (2, 12, 64), 64
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=32, num_experts=8, top_k=2, z_loss_coeff=1e-3, **config)
    eager = MoELayer(cfg, device="cuda", dtype=torch.bfloat16).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, mode=mode, fullgraph=True, dynamic=False)
    for step, x, dy in _steps(shape, 4):
        outs, grads = zip(*(_output_and_grads(layer, run, x, dy)
                            for layer, run in ((eager, eager), (compiled_layer, compiled))))
        names = ["output", "x"] + [n for n, _ in eager.named_parameters()]
        for name, want, got in zip(names, [outs[0]] + grads[0], [outs[1]] + grads[1]):
            error = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
            assert error < 1e-2, f"step {step}: {name} is {error:.2e} (norm-wise) from eager"
        if cfg.expert_bias:  # the biases move with the counts the compiled steps accumulated
            for layer in (eager, compiled_layer):
                layer.update_expert_bias()
            assert torch.equal(compiled_layer.router.expert_bias, eager.router.expert_bias)
