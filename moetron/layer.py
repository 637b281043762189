"""The MoE layer: router -> dispatcher.dispatch -> grouped experts -> dispatcher.combine (+ shared experts).

Legend: T tokens (on this rank), H hidden, F expert ffn, E experts, E_l experts on this rank, K top-k,
C capacity (rows per expert when dropping), R_out rows of the permuted buffer.

    MoELayer(MoEConfig(...), parallel=None)(x [..., H], seq_len=None) -> y [..., H]

        x_TH            = x.reshape(-1, H)
        probs, ids      = router(x_TH)                       [T, K] fp32, [T, K] int64 (aux losses ride on probs)
        d               = dispatcher.dispatch(x_TH, probs, ids)   rows for this rank's E_l experts, expert-major
        h               = experts(d.x, d.offsets)            two grouped GEMMs, [R_out, H]
        y_TH            = dispatcher.combine(h, d.handle)    y[t] = sum_k probs[t, k] * h[row of (t, k)]
                          + shared_experts(x_TH)

With ``dispatcher="local"`` (one process) dispatch is ``permute`` and combine ``unpermute``. With
``parallel=ParallelGroups`` (moetron.parallel) and ``dispatcher="allgather"`` or ``"alltoall"`` (moetron.dispatch),
EP rank r holds experts [r·E/EP, (r+1)·E/EP), each sliced to F/ETP columns under expert tensor parallelism; the
router and shared experts are replicated, and every rank passes its own tokens (sequence-parallel [T/TP, H]
included).

Token dropping (``capacity_factor``) follows Megatron-Core: ``C = ceil(T·K / E · capacity_factor)`` (rounded up to a
multiple of ``pad_to``). An expert routed more than C slots keeps C of them, the ones with the highest probs
(``drop_policy="probs"``) or the first in token order (``"position"``); a dropped slot adds nothing to its token's
output (the remaining probs are not renormalised). With ``pad_to_capacity`` every expert gets exactly C rows, a
static [E·C, H] buffer; without it the kept rows are packed (each expert's count rounded up to ``pad_to``) into a
buffer of T·K rows, and the GEMMs only compute the kept rows.

Token dropping across ranks is decided on each source rank among its own tokens (C from its own T), as in
Megatron-Core, so each rank's output equals the single-process layer's output on that rank's tokens.

Nothing in ``forward`` reads device data on the host (buffer sizes come from shapes alone), except the one split
size sync of ``dispatcher="alltoall"`` without ``pad_to_capacity``. The routing statistics stay on the device in
``last_stats`` until ``stats()`` gathers them (one sync).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import LocalDispatcher, make_dispatcher
from .dispatch._comm import all_gather_flat
from .experts import ACTIVATIONS, GroupedExperts, SharedExperts
from .ops._launch import per_launch_scratch
from .parallel import GRAD_GROUP_ATTR, ParallelGroups, check_same_on_all_ranks
from .router import RouterConfig, RouterOutput, TopKRouter, exclude_router_counters_from_ddp
from ._checks import config_error, is_int
from ._compile import compiling

__all__ = ["MoEConfig", "MoELayer"]

DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("local", "allgather", "alltoall", "fused")
# what each not-yet-built dispatcher waits for, named in the NotImplementedError
_LATER_DISPATCHERS: dict = {}

# MoEConfig fields passed through to RouterConfig under the same name.
_ROUTER_FIELDS = ("hidden_size", "num_experts", "top_k", "score_function", "pre_softmax", "norm_topk_prob",
                  "scaling_factor", "num_groups", "group_topk", "load_balancing", "aux_loss_coeff", "z_loss_coeff",
                  "expert_bias", "bias_update_rate", "input_jitter", "router_dtype", "debug_nan_check")


def _bad(field: str, expected: str, got) -> ValueError:
    return config_error("MoEConfig", field, expected, got)


# Every MoELayer under a name of its own, for the inference custom op below, which receives the name (a custom op
# takes tensors and plain values, not modules). Weak: the registry never keeps a layer alive.
_LAYER_NAMES = itertools.count()
_COMPILED_LAYERS: "weakref.WeakValueDictionary[str, MoELayer]" = weakref.WeakValueDictionary()


@dataclass
class MoEConfig:
    # -- sizes
    # Width H of the layer's input and output.
    hidden_size: int
    # Intermediate width F of each routed expert (Hugging Face moe_intermediate_size).
    ffn_hidden_size: int
    # Number E of routed experts.
    num_experts: int
    # Experts K each token is routed to (1 <= K <= E).
    top_k: int

    # -- router (passed to RouterConfig; see moetron/router.py for the exact formulas)
    # "softmax" or "sigmoid": how router logits become scores.
    score_function: str = "softmax"
    # softmax only: softmax over all E then top-k (True), or top-k on the logits then softmax over the k (False).
    pre_softmax: bool = False
    # Renormalise the K selected probs to sum to 1 (K > 1 only). None: the router's default for the score function.
    norm_topk_prob: bool | None = None
    # Multiplies the final probs (DeepSeek-V3 routed_scaling_factor); None for 1.
    scaling_factor: float | None = None
    # Group-limited routing: number of equal expert groups, or None. Set together with group_topk.
    num_groups: int | None = None
    # Group-limited routing: groups each token may pick experts from.
    group_topk: int | None = None
    # Balancing: any of "aux_loss", "seq_aux_loss", "global_aux_loss", or "sinkhorn" / "none" alone.
    load_balancing: tuple[str, ...] = ("aux_loss",)
    # Coefficient of the aux losses: one float, or one per load_balancing entry.
    aux_loss_coeff: float | tuple[float, ...] = 1e-2
    # Coefficient of the router z-loss, None for off.
    z_loss_coeff: float | None = None
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias, updated by update_expert_bias(). Sigmoid only.
    expert_bias: bool = False
    # Step of each update_expert_bias() call.
    bias_update_rate: float = 1e-3
    # Multiplicative uniform jitter on the router input in training, U(1 - eps, 1 + eps); None for off.
    input_jitter: float | None = None
    # Dtype of the router GEMM and routing maths: "fp32" or "fp64".
    router_dtype: str = "fp32"
    # Raise on NaN/inf router logits (syncs with the host; MOETRON_DEBUG=1 turns it on too).
    debug_nan_check: bool = False

    # -- experts
    # Expert nonlinearity: "swiglu", "geglu" (gated, gate_up_proj [E, 2F, H]) or "gelu", "relu2" (up_proj [E, F, H]).
    activation: str = "swiglu"
    # Per-expert biases on both expert projections (gpt-oss style).
    expert_linear_bias: bool = False
    # The experts' backward writes gradients over activations it has finished with (the permuted tokens and the
    # first projection's output), which lowers its peak memory by up to T·K·(H + 2F) elements. A second backward
    # through the same graph (retain_graph=True) then raises; set False to allow one.
    reuse_activation_memory: bool = True

    # -- token dropping and padding
    # None: dropless. A float > 0: each expert keeps at most C = ceil(T·K / E · capacity_factor) routed slots.
    capacity_factor: float | None = None
    # Which slots an expert over capacity keeps: "probs" (highest probs) or "position" (first in token order).
    drop_policy: str = "probs"
    # With capacity_factor: give every expert exactly C rows (static [E·C, H] buffer, compute on all of them).
    # False packs the kept rows instead, so the GEMMs only compute those.
    pad_to_capacity: bool = False
    # Round each expert's row count up to a multiple of this (8/16/128 for fp8 or tile-aligned GEMMs); with
    # capacity_factor, C is rounded up to it instead.
    pad_to: int = 1

    # -- shared experts
    # Intermediate width of the shared-expert MLP every token also passes through; None for none.
    shared_expert_ffn_hidden_size: int | None = None
    # Scale the shared-expert output by sigmoid(x @ w) per token (Qwen2-MoE shared_expert_gate).
    shared_expert_gate: bool = False

    # -- token dispatch
    # "local" (all experts on this device), "allgather", "alltoall" or "fused" (expert parallelism, see
    # moetron.dispatch; they need MoELayer(parallel=...) to spread experts). "fused" is dropless (no capacity_factor,
    # pad_to=1).
    dispatcher: str = "local"

    def __post_init__(self):
        if not is_int(self.ffn_hidden_size) or self.ffn_hidden_size < 1:
            raise _bad("ffn_hidden_size", "a positive int", self.ffn_hidden_size)
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", f"one of {ACTIVATIONS}", self.activation)
        for name in ("expert_linear_bias", "reuse_activation_memory", "pad_to_capacity", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "a bool", getattr(self, name))
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf)
                               or cf <= 0):
            raise _bad("capacity_factor", "None (dropless) or a finite float > 0", cf)
        if self.drop_policy not in DROP_POLICIES:
            raise _bad("drop_policy", f"one of {DROP_POLICIES}", self.drop_policy)
        if self.pad_to_capacity and cf is None:
            raise _bad("pad_to_capacity", "False when capacity_factor is None (there is no capacity to pad to)", True)
        if not is_int(self.pad_to) or self.pad_to < 1:
            raise _bad("pad_to", "a positive int", self.pad_to)
        s = self.shared_expert_ffn_hidden_size
        if s is not None and (not is_int(s) or s < 1):
            raise _bad("shared_expert_ffn_hidden_size", "None or a positive int", s)
        if self.shared_expert_gate and s is None:
            raise _bad("shared_expert_gate", "False when shared_expert_ffn_hidden_size is None (no shared expert "
                       "to gate)", True)
        if self.dispatcher not in DISPATCHERS:
            raise _bad("dispatcher", f"one of {DISPATCHERS}", self.dispatcher)
        if self.dispatcher in _LATER_DISPATCHERS:
            raise NotImplementedError(f"MoEConfig.dispatcher={self.dispatcher!r} is not implemented yet: "
                                      f"{_LATER_DISPATCHERS[self.dispatcher]}. Use dispatcher='local'.")
        # the router's own validation, reported under this config's name; keep its normalised balancing fields
        rc = self.router_config()
        self.load_balancing, self.aux_loss_coeff = rc.load_balancing, rc.aux_loss_coeff

    def router_config(self) -> RouterConfig:
        """The RouterConfig of this layer's router (same field names and values)."""
        try:
            return RouterConfig(**{name: getattr(self, name) for name in _ROUTER_FIELDS})
        except ValueError as err:
            raise ValueError(str(err).replace("RouterConfig.", "MoEConfig.")) from None

    def capacity(self, num_tokens: int) -> int | None:
        """C, the rows each expert keeps for a batch of ``num_tokens`` tokens, or None when dropless.

        Megatron-Core's ``get_capacity(T·K, E, capacity_factor)``, rounded up to a multiple of ``pad_to``."""
        if self.capacity_factor is None:
            return None
        c = math.ceil((num_tokens * self.top_k / self.num_experts) * self.capacity_factor)
        return -(-c // self.pad_to) * self.pad_to



# ---------------------------------------------------------------------------------------------------------
# Expert shards (expert parallelism) and their global-id checkpoint layout
# ---------------------------------------------------------------------------------------------------------

# how expert tensor parallelism slices each expert parameter: (dim, gated halves); None: replicated over ETP
_ETP_SPLIT = {"gate_up_proj": (1, True), "gate_up_proj_bias": (1, True), "up_proj": (1, False),
              "up_proj_bias": (1, False), "down_proj": (2, False), "down_proj_bias": None}


def _etp_slice(full: torch.Tensor, name: str, j: int, parts: int) -> torch.Tensor:
    """ETP rank j's slice of a full (all-F) expert tensor. Gated first projections hold [gate; up] along dim 1;
    each rank keeps the matching F/ETP rows of both, so the activation stays local."""
    dim, halves = _ETP_SPLIT[name]
    if not halves:
        n = full.shape[dim] // parts
        return full.narrow(dim, j * n, n)
    gate, up = full.chunk(2, dim=dim)
    n = gate.shape[dim] // parts
    return torch.cat([gate.narrow(dim, j * n, n), up.narrow(dim, j * n, n)], dim=dim)


def _etp_join(shards: list[torch.Tensor], name: str) -> torch.Tensor:
    """Inverse of _etp_slice over all ETP ranks' slices, in rank order."""
    dim, halves = _ETP_SPLIT[name]
    if not halves:
        return torch.cat(shards, dim=dim)
    pairs = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([g for g, _ in pairs] + [u for _, u in pairs], dim=dim)


class _ExpertShard(GroupedExperts):
    """GroupedExperts holding E_l experts (a contiguous range of global ids) at F/ETP columns. Under expert tensor
    parallelism each ETP rank produces a partial sum over its F slice, which the dispatcher's combine adds up;
    ``down_proj_bias`` (replicated over ETP) is therefore added on ETP rank 0 only."""

    def __init__(self, *args, add_down_bias: bool = True, **kw):
        super().__init__(*args, **kw)
        self.add_down_bias = add_down_bias

    def _down_bias(self) -> torch.Tensor | None:
        return self.down_proj_bias if self.add_down_bias else None


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer, on one device or expert-parallel.

    Submodules: ``router`` (TopKRouter, ``weight [E, H]``), ``experts`` (GroupedExperts, Hugging Face v5 weight
    layout, holding this rank's E_l = E / EP experts at F / ETP columns), ``shared_experts`` (SharedExperts or
    None); ``dispatcher`` (moetron.dispatch) moves tokens to the experts and back.

    ``parallel``: None (one process) or a ``moetron.parallel.ParallelGroups``. With it, EP rank r holds experts
    ``[r·E/EP, (r+1)·E/EP)`` (``first_expert``), the router and shared experts are replicated over the stage
    (broadcast from its first rank at construction, as are the expert shards over their replicas:
    ``sync_replicas``), and the config, dtype and layout are compared across the stage's ranks with one
    ``all_gather_object``: a mismatch raises the same ValueError on every rank instead of hanging in a later
    collective. Gradients: call
    ``moetron.parallel.reduce_gradients(model, parallel)`` after backward (each parameter is marked with the group
    its gradient is summed over). ``state_dict()`` gives expert weights as DTensors of their global shape
    ``[E, ...]`` (keyed by global expert id; ETP slices are gathered, a collective), so
    ``moetron.parallel.save_checkpoint``/``load_checkpoint`` (torch.distributed.checkpoint) move a checkpoint
    between EP/ETP sizes and one process; ``load_state_dict`` also takes a plain global state dict.

    ``forward(x [..., H], seq_len=None) -> y [..., H]``, same shape and dtype as x (under ``torch.autocast``, the
    autocast dtype). ``x`` holds this rank's tokens (with attention TP, its sequence-parallel shard). ``seq_len``
    is the length S of each sequence for ``"seq_aux_loss"``: the flattened tokens are B = T / S sequences stored
    batch-major, as ``x [B, S, H]`` flattens; when None and x is 3-D, S is taken as ``x.shape[1]`` (with TP/CP
    sharding sequences, each rank's chunk of the same B sequences). The router's aux losses reach the gradient
    through the probs (``AuxLossAutoScaler``), so the caller only differentiates its own loss; across ranks every
    count is summed so the losses are those of the global batch.

    After each forward, ``last_stats`` holds device tensors (nothing is synced) about this rank's tokens:
    ``tokens_per_expert [E]`` slots kept per expert, ``routed_tokens_per_expert [E]`` slots routed to each expert
    before dropping, ``num_dropped`` (0-d) slots dropped over capacity, and ``losses`` (the router's
    ``{name: loss / coeff}``, global values, empty in eval). ``stats()`` converts them for logging.
    """

    def __init__(self, config: MoEConfig, *, parallel: ParallelGroups | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        if parallel is None:
            parallel = ParallelGroups.single()
        elif not isinstance(parallel, ParallelGroups):
            raise TypeError(f"parallel must be None or a moetron.parallel.ParallelGroups, got "
                            f"{type(parallel).__name__}")
        c = config
        # Same settings on every rank of the stage. Checked first: a check that failed on some ranks only would
        # leave the others waiting in this collective, and any later collective would hang on a mismatch.
        L = parallel.layout
        check_same_on_all_ranks("MoELayer settings", {
            **{f.name: getattr(c, f.name) for f in dataclasses.fields(c)},
            "dtype": str(dtype or torch.get_default_dtype()),
            "layout": (L.tp, L.cp, L.dp, L.pp, L.etp, L.ep, L.edp)}, parallel.get("tp_cp_dp"))
        ep, etp = parallel.ep_size, parallel.etp_size
        if c.num_experts % ep:
            raise ValueError(f"MoEConfig.num_experts={c.num_experts} must be divisible by the expert-parallel size "
                             f"ep={ep} (each EP rank holds num_experts / ep experts)")
        if c.ffn_hidden_size % etp:
            raise ValueError(f"MoEConfig.ffn_hidden_size={c.ffn_hidden_size} must be divisible by the expert "
                             f"tensor-parallel size etp={etp} (each ETP rank holds ffn_hidden_size / etp columns)")
        if ep * etp > 1 and c.dispatcher == "local":
            raise ValueError(f"MoEConfig.dispatcher='local' keeps all experts on one rank, but parallel has ep={ep}, "
                             f"etp={etp}; use dispatcher='allgather', 'alltoall' or 'fused'")

        self.config = config
        self.parallel = parallel
        self.router = TopKRouter(c.router_config(), device=device, dtype=dtype)
        self.router.set_process_groups(tokens=parallel.get("tp_cp_dp"), sequences=parallel.get("tp_cp"))
        E_l = c.num_experts // ep
        self.first_expert = parallel.ep_rank * E_l
        experts_args = (E_l, c.hidden_size, c.ffn_hidden_size // etp, c.activation, c.expert_linear_bias)
        kw = dict(reuse_activation_memory=c.reuse_activation_memory, device=device, dtype=dtype)
        if etp > 1:
            self.experts = _ExpertShard(*experts_args, add_down_bias=parallel.etp_rank == 0, **kw)
        else:
            self.experts = GroupedExperts(*experts_args, **kw)
        if c.shared_expert_ffn_hidden_size is not None:
            self.shared_experts = SharedExperts(c.hidden_size, c.shared_expert_ffn_hidden_size,
                                                gate=c.shared_expert_gate, activation=c.activation,
                                                device=device, dtype=dtype)
        else:
            self.shared_experts = None
        self.dispatcher = make_dispatcher(c, parallel)
        if isinstance(self.dispatcher, LocalDispatcher) and self.experts.down_proj_bias is None:
            # the experts weight their rows (the routing weights scale the activation before the second GEMM), so
            # combine's sum is unweighted and its backward a plain gather: it no longer reads the expert outputs
            self.dispatcher.weights_in_experts = True
        for name, p in self.experts.named_parameters():
            setattr(p, GRAD_GROUP_ATTR, "etp_edp" if _ETP_SPLIT[name] is None else "edp")
        self.last_stats: dict | None = None
        self._register_for_compile()
        exclude_router_counters_from_ddp(self)  # for DistributedDataParallel(layer)
        if parallel.world_size > 1:
            self.sync_replicas()
        if ep * etp > 1:
            self.register_state_dict_post_hook(MoELayer._global_expert_state)
            self.register_load_state_dict_pre_hook(MoELayer._local_expert_state)

    def extra_repr(self) -> str:
        c = self.config
        drop = "dropless" if c.capacity_factor is None else f"capacity_factor={c.capacity_factor}"
        out = f"top_k={c.top_k}, {drop}, pad_to={c.pad_to}, dispatcher={c.dispatcher!r}"
        p = self.parallel
        if p.ep_size * p.etp_size > 1:
            out += (f", experts=[{self.first_expert}, {self.first_expert + self.experts.num_experts}) of "
                    f"{c.num_experts}, ep={p.ep_size}, etp={p.etp_size}")
        return out

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()
        if self.parallel.world_size > 1:
            self.sync_replicas()

    @torch.no_grad()
    def sync_replicas(self) -> None:
        """Make every copy of a weight equal: router and shared experts from the stage's first rank, expert
        shards from the first rank of their replica group. Runs at construction and in ``reset_parameters``;
        call it (on every rank) after re-initialising weights yourself with rank-dependent random numbers."""
        import torch.distributed as dist

        for name, p in self.named_parameters():
            if p.device.type == "meta":
                return
            group = self.parallel.get(getattr(p, GRAD_GROUP_ATTR, "tp_cp_dp"))
            if group is not None:
                dist.broadcast(p.data, group=group, group_src=0)

    # -- checkpoints: expert weights keyed by global expert id ---------------------------------------------

    def _global_expert_state(self, state_dict, prefix, local_metadata) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        g = self.parallel
        etp_group = g.get("etp")
        for name, p in self.experts.named_parameters():
            key = prefix + "experts." + name
            if key not in state_dict:
                continue
            local = state_dict[key].detach()
            if etp_group is not None and _ETP_SPLIT[name] is not None:
                gathered = local.new_empty((g.etp_size * local.shape[0],) + tuple(local.shape[1:]))
                all_gather_flat(gathered, local.contiguous(), etp_group)
                local = _etp_join(list(gathered.chunk(g.etp_size)), name)
            mesh = g.expert_mesh(local.device.type)
            state_dict[key] = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)

    def _local_expert_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        g = self.parallel
        E, E_l, e0 = self.config.num_experts, self.experts.num_experts, self.first_expert
        for name, p in self.experts.named_parameters():
            key = prefix + "experts." + name
            if key not in state_dict:
                continue
            v = state_dict[key]
            if isinstance(v, DTensor):
                same = (v.device_mesh == g.expert_mesh(p.device.type)
                        and tuple(v.placements) == (Replicate(), Shard(0)))
                if same:
                    full = v.to_local()
                else:
                    v = v.full_tensor()
            if not isinstance(v, DTensor):
                if v.dim() == 0 or v.shape[0] != E:
                    error_msgs.append(f"{key}: expected the global tensor of all {E} experts [{E}, ...], got shape "
                                      f"{tuple(v.shape)}")
                    continue
                full = v[e0:e0 + E_l]
            if g.etp_size > 1 and _ETP_SPLIT[name] is not None:
                full = _etp_slice(full, name, g.etp_rank, g.etp_size)
            state_dict[key] = full

    # -- maintenance ------------------------------------------------------------------------------------------

    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step; see ``TopKRouter.update_expert_bias``. Call once per optimizer step. The
        counts are summed over ``group``, by default the ranks sharing the router (the stage's "tp_cp_dp")."""
        self.router.update_expert_bias(group if group is not None else self.parallel.get("tp_cp_dp"))

    def stats(self) -> dict:
        """The last forward's routing statistics as Python numbers, for logging. Syncs with the device (one
        transfer). Keys: ``tokens_per_expert``, ``routed_tokens_per_expert`` (lists of E ints),
        ``num_dropped`` (int), ``losses`` ({name: float}), and ``load_imbalance`` = max / mean of
        ``tokens_per_expert`` (1.0 is perfectly balanced, E is everything on one expert; NaN with no tokens).
        Counts are this rank's tokens; losses are global. Empty before the first forward."""
        s = self.last_stats
        if s is None:
            return {}
        E = self.config.num_experts
        names = list(s["losses"])
        parts = [s["tokens_per_expert"], s["routed_tokens_per_expert"], s["num_dropped"].reshape(1)]
        parts += [s["losses"][n].reshape(1) for n in names]
        flat = torch.cat([p.detach().to(torch.float64) for p in parts]).tolist()  # the one sync
        kept = [int(v) for v in flat[:E]]
        mean = sum(kept) / E
        return {
            "tokens_per_expert": kept,
            "routed_tokens_per_expert": [int(v) for v in flat[E:2 * E]],
            "num_dropped": int(flat[2 * E]),
            "losses": dict(zip(names, flat[2 * E + 1:])),
            "load_imbalance": max(kept) / mean if mean > 0 else float("nan"),
        }

    # -- forward ----------------------------------------------------------------------------------------------

    def _gathers_rows(self, x_TH: torch.Tensor, probs: torch.Tensor) -> bool:
        # inference in one process, routing weights applied in the experts, experts that can gather their rows
        return (isinstance(self.dispatcher, LocalDispatcher) and self.dispatcher.weights_in_experts
                and isinstance(self.experts, GroupedExperts) and self.experts.can_gather_rows(x_TH, probs))

    def _register_for_compile(self) -> None:
        """Give this layer a name of its own under which the inference custom op finds it (see forward)."""
        self._compile_name = f"moe_layer_{next(_LAYER_NAMES)}"
        _COMPILED_LAYERS[self._compile_name] = self

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._register_for_compile()  # a copy (copy.deepcopy, pickle) is another layer: another name

    def _inference_op_applies(self, x: torch.Tensor) -> bool:
        """Under torch.compile, an inference forward runs as one custom op (``moetron::moe_layer_inference``), so
        the compiled graph needs no break here and can be replayed from a CUDA graph: no gradient to record, one
        process (the local dispatcher), no autocast (a compiled graph bakes autocast's casts in, so the op would
        not see it), no input jitter (random numbers drawn inside an opaque op)."""
        return (compiling() and not torch.is_grad_enabled()
                and isinstance(self.dispatcher, LocalDispatcher) and not torch.is_autocast_enabled(x.device.type)
                and not (self.training and self.config.input_jitter is not None))

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"x must have shape [..., {c.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        if seq_len is None and x.dim() == 3:
            seq_len = x.shape[1] or None
        shape = x.shape
        x_TH = x.reshape(-1, c.hidden_size).contiguous()
        if self._inference_op_applies(x):
            y_TH, tokens, routed, dropped = torch.ops.moetron.moe_layer_inference(x_TH, self._compile_name)
            self.last_stats = {"tokens_per_expert": tokens, "routed_tokens_per_expert": routed,
                               "num_dropped": dropped, "losses": {}}
            return y_TH.reshape(shape)
        return self._forward(x_TH, shape, seq_len)

    def _forward(self, x_TH: torch.Tensor, shape: torch.Size, seq_len: int | None) -> torch.Tensor:
        route: RouterOutput = self.router(x_TH, seq_len)
        # x_TH's values; its gradient joins the router's in one kernel (RouterOutput.tokens)
        x_send = route.tokens if route.tokens is not None else x_TH
        if torch.is_autocast_enabled(x_TH.device.type):
            # the experts compute in the autocast dtype anyway: cast the T rows once here, so the permutation
            # (or the all-to-all) moves half the bytes of fp32 and the experts do not cast T·K rows
            x_send = x_send.to(torch.get_autocast_dtype(x_TH.device.type))
        # queued before dispatch: the device works on it while an all-to-all dispatcher waits for split sizes
        y_shared = self.shared_experts(x_send) if self.shared_experts is not None else None
        if self._gathers_rows(x_send, route.probs):
            # inference: the first expert GEMM reads the token rows through the layout, no permuted copy of x
            d = self.dispatcher.layout(x_send, route.probs, route.expert_ids)
            y_TH = self.experts.forward_routed(x_send, route.probs, d.src_slot, d.row_map, d.offsets)
        else:
            d = self.dispatcher.dispatch(x_send, route.probs, route.expert_ids)
            kw = {}
            if self.dispatcher.reads_routed_rows_only and isinstance(self.experts, GroupedExperts):
                kw["zero_tail"] = False  # nothing reads the buffer's unused tail: do not compute or write it
            if self.dispatcher.fresh_rows and isinstance(self.experts, GroupedExperts):
                kw["consume_input"] = self.config.reuse_activation_memory
            h = self.experts(d.x, d.offsets, row_scale=d.row_probs, **kw)
            y_TH = self.dispatcher.combine(h, d.handle)
        if y_shared is not None:
            y_TH = y_TH + y_shared

        self.last_stats = {
            "tokens_per_expert": d.tokens_per_expert.detach(),
            "routed_tokens_per_expert": route.tokens_per_expert.detach(),
            "num_dropped": d.num_dropped.detach(),
            "losses": route.losses,
        }
        # a [T, H] input gets the combined tensor itself, not a view of it (FSDP2 warns about views: an in-place
        # op on one would skip its backward hook)
        return y_TH if y_TH.shape == shape else y_TH.reshape(shape)


# The inference forward of one MoELayer as one operator that torch.compile keeps in its graph instead of tracing
# into (its kernels read group sizes on the device and launch Triton code). Only what MoELayer.forward sends here
# reaches it: no gradient to record, one process, no autocast. It returns the layer's statistics as outputs; the
# layer's own ``last_stats`` is put back as it was, so no tensor made here outlives the call except its outputs
# (CUDA-graph trees reject live allocations in their pool that are not outputs).
@torch.library.custom_op("moetron::moe_layer_inference", mutates_args=(),
                         schema="(Tensor x, str layer) -> (Tensor, Tensor, Tensor, Tensor)")
def _moe_layer_inference(x, layer):
    module = _COMPILED_LAYERS.get(layer)
    if module is None:
        raise RuntimeError(f"moetron::moe_layer_inference: no live MoELayer is named {layer!r}")
    before = module.last_stats
    try:
        with torch.no_grad(), per_launch_scratch():
            y_TH = module._forward(x, x.shape, None)
        stats = module.last_stats
    finally:
        module.last_stats = before
    return (y_TH, stats["tokens_per_expert"].clone(), stats["routed_tokens_per_expert"].clone(),
            stats["num_dropped"].clone())


@_moe_layer_inference.register_fake
def _(x, layer):
    E = _COMPILED_LAYERS[layer].config.num_experts
    counts = x.new_empty(E, dtype=torch.int64)
    return x.new_empty(x.shape), counts, counts.new_empty(E), counts.new_empty(())
