"""MoELayer inside torch's DistributedDataParallel and FSDP2 (gloo, 2 ranks), the way a data-parallel script wraps
a model: gradients equal one process's over the global batch, and under DDP the router's counters (summed over the
ranks) and the expert bias updated from them equal what one process gets from all the tokens.

DDP copies rank 0's buffers into every rank at each forward by default; the counters are buffers, so without
``exclude_router_counters_from_ddp`` (which MoELayer applies to itself) rank 1's counts of its first micro-batch
were replaced by rank 0's (checked by hand: counts [11, 4, 9, 8, 7, 9] where its own tokens gave
[7, 7, 9, 7, 8, 10])."""

import copy

import pytest
import torch
import torch.distributed as dist

from moetron import exclude_router_counters_from_ddp
from moetron.layer import MoEConfig, MoELayer
from tests.test_parallel import run_world

CFG = dict(hidden_size=16, ffn_hidden_size=8, num_experts=6, top_k=2, score_function="sigmoid", expert_bias=True,
           bias_update_rate=0.01, load_balancing=("none",))


class _Model(torch.nn.Module):
    """A user's model around the layer: DDP wraps this, not the layer."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.moe = MoELayer(MoEConfig(**CFG))

    def forward(self, x):
        return self.moe(self.proj(x))


def _inputs():
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(12, 16, generator=g) for _ in range(3)] for _ in range(2)]  # [rank][micro-batch]


def _steps(model, batches):
    for x in batches:
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()


def _build(wrapped: str):
    torch.manual_seed(0)
    if wrapped == "layer":
        return MoELayer(MoEConfig(**CFG))
    model = _Model()
    exclude_router_counters_from_ddp(model)
    return model


def _router(model):
    return model.router if isinstance(model, MoELayer) else model.moe.router


def _ddp_rank(rank, world, wrapped):
    model = _build(wrapped)
    _steps(torch.nn.parallel.DistributedDataParallel(model), _inputs()[rank])
    counts = _router(model).local_tokens_per_expert.clone()
    dist.all_reduce(counts)
    _router(model).update_expert_bias(group=dist.group.WORLD)
    return counts, _router(model).expert_bias.clone(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("wrapped", ["layer", "model"])
def test_ddp_counts_bias_and_gradients_match_one_process(wrapped):
    results = run_world(2, _ddp_rank, wrapped)
    single = copy.deepcopy(_build(wrapped))
    inputs = _inputs()
    _steps(single, inputs[0] + inputs[1])
    counts = _router(single).local_tokens_per_expert.clone()
    _router(single).update_expert_bias()
    for got_counts, bias, grads in results:
        assert torch.equal(got_counts, counts)
        assert torch.equal(bias, _router(single).expert_bias)
        # DDP averages over the 2 ranks; one process summed both ranks' micro-batches
        for got, want in zip(grads, (p.grad for p in single.parameters())):
            torch.testing.assert_close(got * 2, want, rtol=1e-5, atol=1e-6)


def _fsdp_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _build("layer")
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))  # expert weights sharded along the expert dim
    _steps(model, _inputs()[rank])
    return [p.grad.full_tensor() for p in model.parameters()]


def test_fsdp2_gradients_match_one_process():
    """FSDP2 (fully_shard): each rank holds a shard of every weight; the gathered gradients equal one process's."""
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp.fully_shard")
    results = run_world(2, _fsdp_rank)
    single = _build("layer")
    inputs = _inputs()
    _steps(single, inputs[0] + inputs[1])
    for grads in results:
        for got, want in zip(grads, (p.grad for p in single.parameters())):
            torch.testing.assert_close(got * 2, want, rtol=1e-5, atol=1e-6)


def test_exclude_router_counters_from_ddp_names_and_bad_input():
    model = _Model()
    names = exclude_router_counters_from_ddp(model)
    assert names == ["moe.router.local_tokens_per_expert"]  # no global aux loss here: one counter
    assert exclude_router_counters_from_ddp(model) == names  # a second call adds nothing
    assert model._ddp_params_and_buffers_to_ignore == names
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        exclude_router_counters_from_ddp(model.state_dict())
