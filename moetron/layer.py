"""The MoE layer on one device: router -> permute -> grouped experts -> unpermute (+ shared experts).

Legend: T tokens, H hidden, F expert ffn, E experts, K top-k, C capacity (rows per expert when dropping),
R_out rows of the permuted buffer.

    MoELayer(MoEConfig(...))(x [..., H], seq_len=None) -> y [..., H]

        x_TH            = x.reshape(-1, H)
        probs, ids      = router(x_TH)                       [T, K] fp32, [T, K] int64 (aux losses ride on probs)
        x_perm, offsets = permute(x_TH, ids, E, ...)         [R_out, H] expert-major, [E] cumulative row ends
        h               = experts(x_perm, offsets)           two grouped GEMMs, [R_out, H]
        y_TH            = unpermute(h, row_map, probs)       y[t] = sum_k probs[t, k] * h[row of (t, k)]
                          + shared_experts(x_TH)

Token dropping (``capacity_factor``) follows Megatron-Core: ``C = ceil(T·K / E · capacity_factor)`` (rounded up to a
multiple of ``pad_to``). An expert routed more than C slots keeps C of them, the ones with the highest probs
(``drop_policy="probs"``) or the first in token order (``"position"``); a dropped slot adds nothing to its token's
output (the remaining probs are not renormalised). With ``pad_to_capacity`` every expert gets exactly C rows, a
static [E·C, H] buffer; without it the kept rows are packed (each expert's count rounded up to ``pad_to``) into a
buffer of T·K rows, and the GEMMs only compute the kept rows.

Nothing in ``forward`` reads device data on the host: the buffer sizes come from shapes alone. The routing
statistics stay on the device in ``last_stats`` until ``stats()`` gathers them (one sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .experts import ACTIVATIONS, GroupedExperts, SharedExperts
from .ops.permute import _permute, permute, permuted_rows, unpermute
from .router import RouterConfig, RouterOutput, TopKRouter

__all__ = ["MoEConfig", "MoELayer"]

DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("local", "allgather", "alltoall", "fused")
# what each not-yet-built dispatcher waits for, named in the NotImplementedError
_LATER_DISPATCHERS = {
    "allgather": "the all-gather token dispatcher arrives with expert parallelism (moetron.dispatch)",
    "alltoall": "the all-to-all token dispatcher arrives with expert parallelism (moetron.dispatch)",
    "fused": "the fused dispatch/combine kernels (MoeDistributeDispatch/Combine semantics) arrive after the "
             "all-to-all dispatcher",
}

# MoEConfig fields passed through to RouterConfig under the same name.
_ROUTER_FIELDS = ("hidden_size", "num_experts", "top_k", "score_function", "pre_softmax", "norm_topk_prob",
                  "scaling_factor", "num_groups", "group_topk", "load_balancing", "aux_loss_coeff", "z_loss_coeff",
                  "expert_bias", "bias_update_rate", "input_jitter", "router_dtype", "debug_nan_check")


def _bad(field: str, expected: str, got) -> ValueError:
    return ValueError(f"MoEConfig.{field} must be {expected}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    # "local" (all experts on this device). "allgather", "alltoall", "fused" are planned (NotImplementedError).
    dispatcher: str = "local"

    def __post_init__(self):
        if not _is_int(self.ffn_hidden_size) or self.ffn_hidden_size < 1:
            raise _bad("ffn_hidden_size", "a positive int", self.ffn_hidden_size)
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", f"one of {ACTIVATIONS}", self.activation)
        for name in ("expert_linear_bias", "pad_to_capacity", "shared_expert_gate"):
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
        if not _is_int(self.pad_to) or self.pad_to < 1:
            raise _bad("pad_to", "a positive int", self.pad_to)
        s = self.shared_expert_ffn_hidden_size
        if s is not None and (not _is_int(s) or s < 1):
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


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer on one device.

    Submodules: ``router`` (TopKRouter, ``weight [E, H]``), ``experts`` (GroupedExperts, Hugging Face v5 weight
    layout), ``shared_experts`` (SharedExperts or None).

    ``forward(x [..., H], seq_len=None) -> y [..., H]``, same shape and dtype as x (under ``torch.autocast``, the
    autocast dtype). ``seq_len`` is the length S of each sequence for ``"seq_aux_loss"``: the flattened tokens
    are B = T / S sequences stored batch-major, as ``x [B, S, H]`` flattens; when None and x is 3-D, S is taken
    as ``x.shape[1]``. The router's aux losses reach the gradient through the probs (``AuxLossAutoScaler``), so
    the caller only differentiates its own loss.

    After each forward, ``last_stats`` holds device tensors (nothing is synced):
    ``tokens_per_expert [E]`` rows kept per expert, ``routed_tokens_per_expert [E]`` slots routed to each expert
    before dropping, ``num_dropped`` (0-d) slots dropped over capacity, and ``losses`` (the router's
    ``{name: loss / coeff}``, empty in eval). ``stats()`` converts them for logging.
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.router = TopKRouter(c.router_config(), device=device, dtype=dtype)
        self.experts = GroupedExperts(c.num_experts, c.hidden_size, c.ffn_hidden_size, c.activation,
                                      c.expert_linear_bias, device=device, dtype=dtype)
        if c.shared_expert_ffn_hidden_size is not None:
            self.shared_experts = SharedExperts(c.hidden_size, c.shared_expert_ffn_hidden_size,
                                                gate=c.shared_expert_gate, activation=c.activation,
                                                device=device, dtype=dtype)
        else:
            self.shared_experts = None
        self.last_stats: dict | None = None

    def extra_repr(self) -> str:
        c = self.config
        drop = "dropless" if c.capacity_factor is None else f"capacity_factor={c.capacity_factor}"
        return f"top_k={c.top_k}, {drop}, pad_to={c.pad_to}, dispatcher={c.dispatcher!r}"

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()

    # -- maintenance ------------------------------------------------------------------------------------------

    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step; see ``TopKRouter.update_expert_bias``. Call once per optimizer step."""
        self.router.update_expert_bias(group)

    def stats(self) -> dict:
        """The last forward's routing statistics as Python numbers, for logging. Syncs with the device (one
        transfer). Keys: ``tokens_per_expert``, ``routed_tokens_per_expert`` (lists of E ints),
        ``num_dropped`` (int), ``losses`` ({name: float}), and ``load_imbalance`` = max / mean of
        ``tokens_per_expert`` (1.0 is perfectly balanced, E is everything on one expert; NaN with no tokens).
        Empty before the first forward."""
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
        T, E, K = x_TH.shape[0], c.num_experts, c.top_k

        route: RouterOutput = self.router(x_TH, seq_len)
        probs_TK, ids_TK = route.probs, route.expert_ids
        capacity = c.capacity(T)
        rank_probs = probs_TK.detach() if capacity is not None and c.drop_policy == "probs" else None

        if capacity is None or c.pad_to_capacity:
            perm = permute(x_TH, ids_TK, E, probs=rank_probs, pad_to=c.pad_to, capacity=capacity,
                           drop_policy=c.drop_policy)
            x_perm, offsets, row_map = perm.x_permuted, perm.offsets, perm.row_map
            kept, num_dropped = perm.tokens_per_expert, perm.num_dropped
        else:
            # Packed drops: decide the kept slots with permute's capacity competition run on one column of x
            # (index work plus a one-element copy per row; a zero-width tensor may hand the kernels a null
            # pointer), then lay out only the kept slots. Slot ids outside [0, E) count as dropped in permute's
            # index kernels; the public permute refuses them on the CPU, hence the internal entry point.
            with torch.no_grad():
                decide = permute(x_TH.detach()[:, :1], ids_TK, E, probs=rank_probs, capacity=capacity,
                                 drop_policy=c.drop_policy)
            kept_ids = torch.where(decide.row_map >= 0, ids_TK, E)
            rows = permuted_rows(T, K, E, pad_to=c.pad_to)
            perm = _permute(x_TH, kept_ids, E, None, c.pad_to, None, c.drop_policy, rows, None)
            x_perm, offsets, row_map = perm.x_permuted, perm.offsets, perm.row_map
            kept, num_dropped = perm.tokens_per_expert, decide.num_dropped

        h = self.experts(x_perm, offsets)
        y_TH = unpermute(h, row_map, probs_TK)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)

        self.last_stats = {
            "tokens_per_expert": kept.detach(),
            "routed_tokens_per_expert": route.tokens_per_expert.detach(),
            "num_dropped": num_dropped.detach(),
            "losses": route.losses,
        }
        return y_TH.reshape(shape)
