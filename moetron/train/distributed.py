"""Multi-process training: the process group from torchrun's environment, and the pieces of the loop that change
when the model is spread over ranks (gradient reduction, the global gradient norm, global statistics, gathered
checkpoints).

Legend: W world size (processes), EP expert-parallel size, DP = W data-parallel replicas of the dense weights,
EDP = W / EP replicas of each expert shard, E experts, E_l = E / EP experts per rank.

Layout: ``ParallelGroups.build(ep=EP)`` with attention TP = CP = PP = 1, so every rank holds its own sequences
(DP = W) and EP rank r holds experts [r·E_l, (r+1)·E_l). Equivalence with one process on the same global batch:

- data: micro-batch m of step s is the same ``ByteDataset.train_batch(s, m, B_micro)`` as in one process; rank r
  takes its rows [r·B_micro/W, (r+1)·B_micro/W).
- init: every rank builds the one-process model from the seed, then loads its state dict into the expert-parallel
  model (experts sliced by global expert id), so the weights are those of the one-process run.
- loss: each rank differentiates (its mean loss) / W, and ``reduce_gradients`` sums (expert shards over EDP, the
  rest over all W ranks), which gives the gradient of the global mean. The router's aux losses are global already
  (each rank attaches its share, see moetron/router.py), so their scale stays 1 / grad_accum.
- clipping: the global norm counts replicated gradients once and sums the squares of expert shards over EP.
- expert-bias updates and aux-loss counts are reduced over all ranks by the layer itself.

Checkpoints are gathered to rank 0 and written in the one-process format (``moetron.train.checkpoint``): expert
weights and their AdamW moments concatenated in global expert order. A checkpoint therefore resumes at any EP size,
or in one process, and ``moetron generate`` reads it as is.

Host-side agreement (stop signals, run folder, errors found on rank 0) goes through a gloo group, so it never
waits on the GPU stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..parallel import GRAD_GROUP_ATTR, ParallelGroups, reduce_gradients

__all__ = ["DistContext", "env_world_size", "env_local_rank", "init_distributed"]

# Group of the parameters that are neither expert shards nor marked otherwise (moetron.parallel's default).
_REPLICATED = "tp_cp_dp"


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {v!r}") from None


def env_world_size() -> int:
    """Processes of this job: the initialised default group's size, else torchrun's WORLD_SIZE (1 when unset)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


@dataclass
class DistContext:
    """This rank's view of a multi-process run. ``world == 1`` means one process (every method is then a no-op)."""

    rank: int
    world: int
    groups: ParallelGroups
    # gloo group for host-side values (None: the default group is gloo already, or one process)
    ctrl: object = None
    # whether init_distributed created the default process group (then ``close`` destroys it)
    owns: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- host-side agreement ----------------------------------------------------------------------------------

    def broadcast_object(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def run_on_main(self, fn):
        """``fn()`` on rank 0 only; its result, or the exception it raised, reaches every rank (so a ValueError
        found on rank 0 raises everywhere instead of leaving the others waiting in a collective)."""
        if not self.distributed:
            return fn()
        out = None
        if self.is_main:
            try:
                out = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                out = ("error", e)
        out = self.broadcast_object(out)
        if out[0] == "error":
            raise out[1]
        return out[1]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (one tiny gloo all_reduce)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.ctrl)

    # -- device-side reductions -------------------------------------------------------------------------------

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (each rank's value weighs the same: equal token counts)."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.owns:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns = False


def init_distributed(ep: int, device: torch.device) -> DistContext:
    """The process group from torchrun's environment (NCCL on CUDA, gloo on the CPU) and the folded groups with
    ``ep``; reuses a default group initialised by the caller. One process (WORLD_SIZE unset or 1): no group."""
    import torch.distributed as dist

    world = env_world_size()
    if world == 1:
        return DistContext(0, 1, ParallelGroups.single())
    owns = False
    if not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun "
                                 f"(torchrun --nproc-per-node={world} -m moetron train ...)")
        kw = {}
        if device.type == "cuda":
            kw["device_id"] = device  # binds NCCL to this rank's GPU (and lets it create communicators eagerly)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10), **kw)
        owns = True
    try:
        ctrl = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        groups = ParallelGroups.build(ep=ep)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise
    return DistContext(dist.get_rank(), dist.get_world_size(), groups, ctrl, owns)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def reduce_grads(model: torch.nn.Module, ctx: DistContext, master=None) -> None:
    """Sum the gradients over the ranks holding a copy of each parameter (moetron.parallel.reduce_gradients); with
    ``master`` (moetron.train.master.MasterWeights) the fp32 masters' gradients, where they accumulate. The loop
    divides each rank's loss by W first, so the sum is the gradient of the global mean loss."""
    if ctx.distributed:
        reduce_gradients(model, ctx.groups, params=None if master is None else master.params)


def _is_expert_shard(p: torch.nn.Parameter) -> bool:
    return getattr(p, GRAD_GROUP_ATTR, _REPLICATED) != _REPLICATED


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, ctx: DistContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model spread across ranks: replicated gradients (equal on
    every rank after the reduction) count once, expert shards (with ETP = 1 split over EP only) add their squares
    over the "ep" group. Returns the global norm (the same on every rank); ``max_norm`` inf: no clipping."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    rep = [p.grad for p in params if p.grad is not None and not _is_expert_shard(p)]
    shard = [p.grad for p in params if p.grad is not None and _is_expert_shard(p)]
    dev = grads[0].device

    def sq(gs):
        if not gs:
            return torch.zeros((), device=dev, dtype=torch.float32)
        return torch.stack(torch._foreach_norm(gs)).float().square().sum()

    sq_shard = sq(shard)
    group = ctx.groups.get("ep")
    if group is not None:
        dist.all_reduce(sq_shard, group=group)
    total = (sq(rep) + sq_shard).sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def global_layer_stats(moe_layers, ctx: DistContext) -> list[dict]:
    """``MoELayer.stats()`` of every layer with the counts summed over all ranks (one all_reduce, one sync): the
    statistics of the last micro-batch of the global batch, as one process reports them."""
    if not ctx.distributed:
        return [layer.stats() for _, layer in moe_layers]
    parts, names = [], []
    for _, layer in moe_layers:
        s = layer.last_stats
        if s is None:
            parts.append(None)
            names.append([])
            continue
        n = list(s["losses"])
        names.append(n)
        parts.append(torch.cat([s["tokens_per_expert"].double(), s["routed_tokens_per_expert"].double(),
                                s["num_dropped"].double().reshape(1)]))
    present = [p for p in parts if p is not None]
    if not present:
        return [{} for _ in moe_layers]
    summed = ctx.sum_(torch.cat(present))
    losses = torch.cat([layer.last_stats["losses"][k].detach().double().reshape(1).to(summed.device)
                        for (_, layer), n in zip(moe_layers, names) for k in n] or [summed.new_zeros(0)])
    flat = torch.cat([summed, losses]).tolist()  # the one sync
    out, at, lat = [], 0, len(summed)
    for (_, layer), part, n in zip(moe_layers, parts, names):
        if part is None:
            out.append({})
            continue
        E = layer.config.num_experts
        kept = [int(v) for v in flat[at:at + E]]
        routed = [int(v) for v in flat[at + E:at + 2 * E]]
        dropped = int(flat[at + 2 * E])
        at += 2 * E + 1
        vals = flat[lat:lat + len(n)]
        lat += len(n)
        mean = sum(kept) / E
        out.append({"tokens_per_expert": kept, "routed_tokens_per_expert": routed, "num_dropped": dropped,
                    "losses": dict(zip(n, vals)), "load_imbalance": max(kept) / mean if mean > 0 else float("nan")})
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: expert shards gathered into global tensors, and sliced back on load
# ---------------------------------------------------------------------------------------------------------


def expert_shards(model: torch.nn.Module, master=None) -> dict[int, tuple[int, int, int]]:
    """{id(param): (first global expert, experts here, all experts)} for every expert-parallel expert parameter
    (dim 0 is the expert dimension), and for its fp32 master with ``master`` (MasterWeights)."""
    out = {}
    for mod in model.modules():
        par = getattr(mod, "parallel", None)
        experts = getattr(mod, "experts", None)
        if par is None or experts is None or not isinstance(par, ParallelGroups) or par.ep_size == 1:
            continue
        if par.etp_size != 1:
            raise NotImplementedError("moetron train gathers checkpoints for etp=1 only")
        for p in experts.parameters():
            out[id(p)] = (mod.first_expert, experts.num_experts, mod.config.num_experts)
            if master is not None:
                out[id(master.master_of(p))] = out[id(p)]
    return out


def _gather_ep(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's [E_l, ...] shard concatenated over the EP group in rank order: [E, ...] in global expert order."""
    from ..dispatch._comm import all_gather_flat

    group = ctx.groups.get("ep")
    t = t.detach().contiguous()
    out = t.new_empty((ctx.groups.ep_size * t.shape[0],) + tuple(t.shape[1:]))
    all_gather_flat(out, t, group)
    return out


def gather_model_state(model: torch.nn.Module, ctx: DistContext, master=None) -> dict | None:
    """The one-process state dict (weights and persistent buffers, on the CPU) on rank 0, None elsewhere; tied
    weights appear under every name, as in ``module.state_dict()``; with ``master`` (MasterWeights) the fp32
    masters in place of the bf16 weights. A collective: every rank calls it."""
    shards = expert_shards(model)
    out, seen = {}, {}
    for name, t in _named_state(model):
        if id(t) in seen:  # a tied weight: the same tensor object again (the writer stores it once)
            if ctx.is_main:
                out[name] = out[seen[id(t)]]
            continue
        seen[id(t)] = name
        is_shard = id(t) in shards
        if master is not None:
            t = master.master_of(t)
        if is_shard:
            t = _gather_ep(t, ctx)
        if ctx.is_main:
            out[name] = t.detach().to("cpu", copy=True)
    return out if ctx.is_main else None


def _named_state(model: torch.nn.Module):
    """(name, tensor) of the persistent state in ``state_dict`` order, read from the modules directly (the
    expert-parallel ``state_dict`` hook would wrap expert shards in DTensors)."""
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for n, p in mod._parameters.items():
            if p is not None:
                yield prefix + n, p
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield prefix + n, b


def _optimizer_params(opt: torch.optim.Optimizer) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def gather_optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module, ctx: DistContext,
                           master=None) -> dict | None:
    """``opt.state_dict()`` as one process would have it, on rank 0 (None elsewhere): the per-parameter state of
    expert shards (AdamW's moments, same shape as the shard) concatenated over EP in global expert order.
    ``master``: the MasterWeights whose masters the optimizer updates."""
    shards = expert_shards(model, master)
    sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    params = _optimizer_params(opt)
    state = {}
    for idx in sorted(sd["state"]):
        p = params[idx]
        st = {}
        for k in sorted(sd["state"][idx]):
            v = sd["state"][idx][k]
            if id(p) in shards and isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                v = _gather_ep(v, ctx)
            st[k] = v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        state[idx] = st
    return {"state": state, "param_groups": sd["param_groups"]} if ctx.is_main else None


def slice_optimizer_state(sd: dict, opt: torch.optim.Optimizer, model: torch.nn.Module, master=None) -> dict:
    """The inverse of ``gather_optimizer_state`` for this rank: each expert shard's state sliced from the global
    tensors (a one-process or any-EP checkpoint)."""
    shards = expert_shards(model, master)
    params = _optimizer_params(opt)
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        if id(p) not in shards:
            continue
        e0, n, E = shards[id(p)]
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == (E,) + tuple(p.shape[1:]):
                st[k] = v[e0:e0 + n].clone()
    return sd
