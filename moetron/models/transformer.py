"""A decoder-only MoE transformer in the Qwen3-MoE / Mixtral style: the model behind ``moetron train``.

Legend: B sequences, S sequence length, H hidden, N query heads, NK key/value heads, D head dim, V vocab.

    MoETransformer(ModelConfig)(input_ids [B, S], labels=None) -> logits [B, S, V]  (or the mean loss with labels)

Each layer is ``x + attn(rms(x))`` then ``x + ffn(rms(x))``. Attention is causal, rotary (rotate-half, as Llama and
Qwen), with optional RMSNorm on q and k (per head as Qwen3's ``q_norm``/``k_norm``, or over all heads at once as
OLMoE's) and grouped key/value heads; it
runs through ``torch.nn.functional.scaled_dot_product_attention``. The FFN is a ``moetron.layer.MoELayer`` in MoE
layers and a SwiGLU MLP in dense ones (``first_k_dense``, ``moe_layer_freq``).

Parameter names follow Hugging Face Qwen3-MoE so checkpoints map one to one:
``model.embed_tokens``, ``model.layers.{i}.input_layernorm``, ``.self_attn.{q,k,v,o}_proj``, ``.self_attn.{q,k}_norm``,
``.post_attention_layernorm``, ``.mlp.router.weight`` (HF ``.mlp.gate.weight``), ``.mlp.experts.gate_up_proj``,
``.mlp.experts.down_proj``, ``.mlp.{gate,up,down}_proj`` in dense layers, ``model.norm``, ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoEConfig, MoELayer
from ..router import exclude_router_counters_from_ddp
from ..ops.rmsnorm import add_rms_norm, rms_norm
from ..ops.rotary import apply_rotary
from .._checks import config_error, config_from_dict, is_int
from .._compile import eager_function

__all__ = ["ModelConfig", "MoETransformer", "PRESETS", "preset"]


def _bad(field: str, expected: str, got) -> ValueError:
    return config_error("ModelConfig", field, expected, got)


@dataclass
class ModelConfig:
    # Vocabulary size V; 256 for the byte-level tokens of moetron.train.data.
    vocab_size: int = 256
    # Model width H (residual stream).
    hidden_size: int = 128
    # Number of transformer layers.
    num_layers: int = 4
    # Query heads N.
    num_heads: int = 4
    # Key/value heads NK (grouped-query attention); must divide num_heads. None: same as num_heads.
    num_kv_heads: int | None = None
    # Per-head width D. None: hidden_size // num_heads.
    head_dim: int | None = None
    # Longest sequence the rotary tables cover; training and generation windows must fit.
    max_seq_len: int = 128
    # Rotary base (Qwen3 uses 1e6 for long contexts; 1e4 is plenty for short byte windows).
    rope_theta: float = 10000.0
    # Epsilon of every RMSNorm.
    rms_norm_eps: float = 1e-6
    # Per-head RMSNorm on q and k before the rotation (Qwen3); keeps attention logits bounded at high LR.
    qk_norm: bool = True
    # With qk_norm: False normalises each token's whole q (N·D) and k (NK·D) vectors at once instead of each head
    # (OLMoE's q_norm/k_norm).
    qk_norm_per_head: bool = True
    # Routed experts E per MoE layer.
    num_experts: int = 8
    # Experts K per token.
    top_k: int = 2
    # Hidden width F of each routed expert's SwiGLU.
    moe_ffn_hidden_size: int = 128
    # Hidden width of the SwiGLU MLP in dense layers. None: top_k * moe_ffn_hidden_size (same active FLOPs).
    dense_ffn_hidden_size: int | None = None
    # The first first_k_dense layers are dense (DeepSeek's first_k_dense_replace).
    first_k_dense: int = 0
    # After those, every moe_layer_freq-th layer is MoE, starting with the first (1: all of them).
    moe_layer_freq: int = 1
    # Width of an always-on shared expert in MoE layers (Qwen2-MoE / DeepSeek); None for none.
    shared_expert_ffn_hidden_size: int | None = None
    # Sigmoid gate on the shared expert's output (Qwen2-MoE).
    shared_expert_gate: bool = False
    # Router: "softmax" or "sigmoid".
    score_function: str = "softmax"
    # Router: softmax over all experts before the top-k (Qwen3) instead of over the k selected (Mixtral).
    pre_softmax: bool = False
    # Router: renormalise the selected probs to sum to 1 (None: the MoEConfig default).
    norm_topk_prob: bool | None = None
    # Load-balancing methods, as MoEConfig.load_balancing ("aux_loss", "seq_aux_loss", "global_aux_loss", ...).
    load_balancing: tuple[str, ...] = ("aux_loss",)
    # Coefficient of the aux losses.
    aux_loss_coeff: float = 1e-2
    # Router z-loss coefficient (None: off).
    z_loss_coeff: float | None = None
    # Aux-loss-free balancing with a per-expert selection bias (needs score_function="sigmoid").
    expert_bias: bool = False
    # Step of each expert-bias update.
    bias_update_rate: float = 1e-3
    # Expert capacity factor (None: dropless).
    capacity_factor: float | None = None
    # Dispatcher of every MoE layer ("local" on one device). Does not change the weights.
    dispatcher: str = "local"
    # Share the embedding matrix with the LM head.
    tie_word_embeddings: bool = False
    # Std of the normal init of embeddings and linear weights; output projections use it / sqrt(2 * num_layers).
    init_std: float = 0.02
    # Extra MoEConfig fields passed through verbatim (for options not mirrored above).
    moe_extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_experts", "top_k",
                     "moe_ffn_hidden_size", "moe_layer_freq"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _bad(name, "a positive int", v)
        if not is_int(self.first_k_dense) or not 0 <= self.first_k_dense <= self.num_layers:
            raise _bad("first_k_dense", f"an int in [0, num_layers={self.num_layers}]", self.first_k_dense)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if not is_int(self.num_kv_heads) or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise _bad("num_kv_heads", f"a positive divisor of num_heads ({self.num_heads})", self.num_kv_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise _bad("num_heads", f"a divisor of hidden_size ({self.hidden_size}) when head_dim is None",
                           self.num_heads)
            self.head_dim = self.hidden_size // self.num_heads
        if not is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise _bad("head_dim", "an even int >= 2 (rotary pairs)", self.head_dim)
        if self.top_k > self.num_experts:
            raise _bad("top_k", f"<= num_experts ({self.num_experts})", self.top_k)
        if self.dense_ffn_hidden_size is None:
            self.dense_ffn_hidden_size = self.top_k * self.moe_ffn_hidden_size
        if not is_int(self.dense_ffn_hidden_size) or self.dense_ffn_hidden_size < 1:
            raise _bad("dense_ffn_hidden_size", "a positive int", self.dense_ffn_hidden_size)
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise _bad(name, "a finite float > 0", v)
        for name in ("qk_norm", "qk_norm_per_head", "tie_word_embeddings", "shared_expert_gate", "pre_softmax",
                     "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "a bool", getattr(self, name))
        if isinstance(self.load_balancing, str):
            self.load_balancing = (self.load_balancing,)
        self.load_balancing = tuple(self.load_balancing)
        if not isinstance(self.moe_extra, dict):
            raise _bad("moe_extra", "a dict of MoEConfig fields", self.moe_extra)
        # Build one MoEConfig now so a bad router/expert option fails here, naming its field, not mid-construction.
        if self.num_moe_layers:
            self.moe_config()

    # -- structure ---------------------------------------------------------------------------------------------

    def is_moe_layer(self, i: int) -> bool:
        """Layer i is MoE when it comes after the first_k_dense dense layers and falls on the moe_layer_freq grid."""
        return i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def moe_config(self) -> MoEConfig:
        kwargs = dict(hidden_size=self.hidden_size, ffn_hidden_size=self.moe_ffn_hidden_size,
                      num_experts=self.num_experts, top_k=self.top_k, score_function=self.score_function,
                      pre_softmax=self.pre_softmax, norm_topk_prob=self.norm_topk_prob,
                      load_balancing=self.load_balancing, aux_loss_coeff=self.aux_loss_coeff,
                      z_loss_coeff=self.z_loss_coeff, expert_bias=self.expert_bias,
                      bias_update_rate=self.bias_update_rate, capacity_factor=self.capacity_factor,
                      shared_expert_ffn_hidden_size=self.shared_expert_ffn_hidden_size,
                      shared_expert_gate=self.shared_expert_gate, dispatcher=self.dispatcher)
        kwargs.update(self.moe_extra)
        return MoEConfig(**kwargs)

    # -- sizes and FLOPs ---------------------------------------------------------------------------------------

    def _attn_params(self) -> int:
        H, D, N, NK = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        return H * N * D + 2 * H * NK * D + N * D * H

    def _dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.dense_ffn_hidden_size

    def _shared_params(self) -> int:
        if not self.shared_expert_ffn_hidden_size:
            return 0
        return 3 * self.hidden_size * self.shared_expert_ffn_hidden_size + (self.hidden_size if self.shared_expert_gate
                                                                            else 0)

    def num_params(self) -> dict[str, int]:
        """Matmul parameter counts: ``total`` (stored) and ``active`` (touched per token); norms and the embedding
        lookup are counted in ``total`` only (they are not matmuls)."""
        H, E, K, Fm = self.hidden_size, self.num_experts, self.top_k, self.moe_ffn_hidden_size
        n_moe = self.num_moe_layers
        n_dense = self.num_layers - n_moe
        attn = self.num_layers * self._attn_params()
        expert = 3 * H * Fm
        moe_total = n_moe * (E * H + E * expert + self._shared_params())
        moe_active = n_moe * (E * H + K * expert + self._shared_params())
        dense = n_dense * self._dense_ffn_params()
        head = self.vocab_size * H
        embed = 0 if self.tie_word_embeddings else self.vocab_size * H
        qk_width = 2 * self.head_dim if self.qk_norm_per_head else (self.num_heads + self.num_kv_heads) * self.head_dim
        norms = H * (2 * self.num_layers + 1) + (self.num_layers * qk_width if self.qk_norm else 0)
        return {"total": attn + moe_total + dense + head + embed + norms,
                "active": attn + moe_active + dense + head}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), for MFU.

            6 * N_active + 12 * num_layers * num_heads * head_dim * seq_len

        ``N_active`` counts the matmul weights one token passes through: attention q/k/v/o, the router, top_k routed
        experts (3 * H * F each: gate, up, down), the shared expert, dense MLPs and the LM head; 6 = 2 (multiply-add)
        x 3 (forward, input grad, weight grad). The second term is the attention score and value matmuls (QK^T and
        PV: 2 x 2 * N * D * S forward, x 3 for training), counted without causal masking as in PaLM's and
        Megatron's MFU, so it overstates causal attention's real work by up to 2x.
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        return 6.0 * self.num_params()["active"] + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["load_balancing"] = list(self.load_balancing)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return config_from_dict(cls, d)


# Named model presets. The training settings that go with each (steps, batch, LR) are in
# moetron.train.config.PRESET_TRAIN.
PRESETS: dict[str, dict] = {
    # CPU default: 4 layers, d=128, 8 experts top-2, F=128 (the anchor model of shared/anchors "Training on the
    # CPU"); 1.91M parameters, 0.69M active.
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=128, num_experts=8, top_k=2,
                 moe_ffn_hidden_size=128),
    # One GPU: 0.83B parameters, 0.17B active, 1.17 GFLOP per training token at S=1024 (Mixtral-style experts:
    # 16 experts, top-2, F=1536, d=2048, GQA 16/4 heads of 128, 6 layers, the first one dense). Chosen for MFU at
    # this size: the same trainer reaches 24% on fine-grained experts (64 x F=256 at d=1024, the preset before
    # session 8) and 42% here, because the expert GEMMs are 6x larger (benchmarks/NOTES.md, session 8).
    "small": dict(hidden_size=2048, num_layers=6, num_heads=16, num_kv_heads=4, max_seq_len=1024, num_experts=16,
                  top_k=2, moe_ffn_hidden_size=1536, first_k_dense=1, dense_ffn_hidden_size=2048, rope_theta=1e6),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        if _fused(x):
            # moetron's fused kernel; under autocast it writes the autocast dtype straight away (the next op is a
            # GEMM that would cast the fp32 norm output anyway, once per consumer)
            return rms_norm(x, self.weight, self.eps, _autocast_dtype())
        # CPU: torch's fused rms_norm, with the weight in x's dtype (a mismatch sends it to the unfused path)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def add_forward(self, x, branch):
        """(norm(x + branch), x + branch): the residual add before this norm, fused with it on CUDA (one pass over
        the fp32 stream instead of three, and no cast of the branch's gradient in backward)."""
        if _fused(x) and _fused(branch):
            return add_rms_norm(x, branch, self.weight, self.eps, _autocast_dtype())
        x = x + branch
        return self(x), x


def _fused(x: torch.Tensor) -> bool:
    """Whether moetron's fused kernels serve x (CUDA; fp64 stays on torch's ops, the reference path)."""
    return x.is_cuda and x.dtype != torch.float64


def _autocast_dtype():
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


@eager_function
class _SharedInputLinears(torch.autograd.Function):
    """``(x @ w_1^T, ..., x @ w_n^T)``, bias-free, for projections that read one input (q/k/v, gate/up). Autograd
    would compute each input gradient on its own and add them with n - 1 extra passes over [T, H]; here they
    accumulate inside the GEMMs (``addmm_``). Under autocast the forward's matmuls cast as ``F.linear`` does, and
    the backward runs under the forward's autocast state."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, dws = None, []
        for i, (g, w) in enumerate(zip(grads, weights)):
            if g is None:
                dws.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:
                if dx is None:
                    dx = g2 @ w.to(g2.dtype)
                else:
                    dx.addmm_(g2, w.to(g2.dtype))
            dws.append(g2.t() @ x2.to(g2.dtype) if ctx.needs_input_grad[1 + i] else None)
        return (None if dx is None else dx.view(x.shape)), *dws


def _shared_input_linears(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """``tuple(lin(x) for lin in linears)`` (bias-free); on CUDA with one backward node (``_SharedInputLinears``).
    The CPU keeps the plain ops: the same function, and the CPU main job's numbers unchanged."""
    if _fused(x) and torch.is_grad_enabled():
        return _SharedInputLinears.eager_apply(x, *(lin.weight for lin in linears))
    return tuple(lin(x) for lin in linears)


def _rotary_tables(cfg: ModelConfig, device=None):
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float64, device=device) / half))
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # [S, D], rotate-half layout
    return angles.cos().float(), angles.sin().float()


def _apply_rotary(x_BSND, cos_SD, sin_SD):
    """Rotate-half rotary embedding of x [B, S, N, D] -> [B, N, S, D] (the layout SDPA takes), fp32 maths."""
    if _fused(x_BSND):  # one fused kernel each way, not ~6 elementwise ones
        return apply_rotary(x_BSND, cos_SD, sin_SD).transpose(1, 2)
    x_BNSD = x_BSND.transpose(1, 2)
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BNSD * cos_SD + rotated * sin_SD).to(x_BNSD.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        H, N, NK, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(H, N * D, **kw)
        self.k_proj = nn.Linear(H, NK * D, **kw)
        self.v_proj = nn.Linear(H, NK * D, **kw)
        self.o_proj = nn.Linear(N * D, H, **kw)
        if cfg.qk_norm:
            q_width, k_width = (D, D) if cfg.qk_norm_per_head else (N * D, NK * D)
            self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps, device, dtype)
            self.k_norm = RMSNorm(k_width, cfg.rms_norm_eps, device, dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BSH, cos_SD, sin_SD):
        B, S, _ = x_BSH.shape
        N, NK, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q, k, v = _shared_input_linears(x_BSH, self.q_proj, self.k_proj, self.v_proj)
        if self.q_norm is not None and not self.cfg.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, N, D), k.view(B, S, NK, D), v.view(B, S, NK, D)
        if self.q_norm is not None and self.cfg.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _apply_rotary(q, cos_SD, sin_SD)
        k = _apply_rotary(k, cos_SD, sin_SD)
        v = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NK != N)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, N * D))


class DenseMLP(nn.Module):
    """SwiGLU MLP of the dense layers (HF ``gate_proj``/``up_proj``/``down_proj``)."""

    def __init__(self, hidden: int, ffn: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, ffn, **kw)
        self.up_proj = nn.Linear(hidden, ffn, **kw)
        self.down_proj = nn.Linear(ffn, hidden, **kw)

    def forward(self, x):
        gate, up = _shared_input_linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, device=None, dtype=None, parallel=None):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        if self.is_moe:
            self.mlp = MoELayer(cfg.moe_config(), parallel=parallel, device=device, dtype=dtype)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_ffn_hidden_size, device, dtype)

    def forward(self, x_BSH, cos_SD, sin_SD, pending=None):
        """-> (residual stream after attention, this layer's MLP output). The MLP output is not added here: the
        next layer's input norm (or the final norm) adds it fused with itself; ``pending`` is the previous
        layer's, None for the first layer."""
        if pending is None:
            h = self.input_layernorm(x_BSH)
        else:
            h, x_BSH = self.input_layernorm.add_forward(x_BSH, pending)
        h, x_BSH = self.post_attention_layernorm.add_forward(x_BSH, self.self_attn(h, cos_SD, sin_SD))
        if self.is_moe:
            return x_BSH, self.mlp(h, seq_len=x_BSH.shape[1])
        return x_BSH, self.mlp(h)


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None, parallel=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype, parallel) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        cos, sin = _rotary_tables(cfg, device)
        # Derived from the config, so not saved (HF keeps rotary tables out of checkpoints too).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


class MoETransformer(nn.Module):
    """Decoder-only language model; see the module docstring.

    ``parallel``: None (one process) or a ``moetron.parallel.ParallelGroups`` passed to every MoELayer (expert
    parallelism; ``config.dispatcher`` must then be "allgather" or "alltoall" when ep > 1). The init is random per
    layout; ``moetron.train`` builds the one-process model first and loads its state dict (keyed by global expert
    id) into this one, so every layout starts from the same weights."""

    def __init__(self, config: ModelConfig, *, device=None, dtype=None, parallel=None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.model = _Backbone(config, device, dtype, parallel)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        exclude_router_counters_from_ddp(self)  # for DistributedDataParallel(model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every weight, init_std / sqrt(2 * layers) for the projections that write into
        the residual stream (attention o_proj, every down_proj; GPT-2's and Megatron's output-layer scaling). The
        router keeps its own init."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.model.embed_tokens.weight, std=std)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.model.layers:
            attn = layer.self_attn
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(attn.o_proj.weight, std=out_std)
            if not layer.is_moe:
                nn.init.normal_(layer.mlp.gate_proj.weight, std=std)
                nn.init.normal_(layer.mlp.up_proj.weight, std=std)
                nn.init.normal_(layer.mlp.down_proj.weight, std=out_std)
                continue
            experts = layer.mlp.experts
            nn.init.normal_(experts.w1, std=std)
            nn.init.normal_(experts.down_proj, std=out_std)
            shared = layer.mlp.shared_experts
            if shared is not None:
                for lin in (shared.gate_proj, shared.up_proj, shared.gate):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(shared.down_proj.weight, std=out_std)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        """(layer index, MoELayer) for every MoE layer, in order."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if layer.is_moe]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] (in the autocast or parameter dtype), or with ``labels [B, S]`` the mean cross-entropy in
        fp32 (labels are the next tokens, already shifted; -100 is ignored)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor [B, S], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        S = input_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"input_ids has sequence length {S} > max_seq_len={self.config.max_seq_len}")
        m = self.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rope_cos[:S], m.rope_sin[:S]
        pending = None
        for layer in m.layers:
            x, pending = layer(x, cos, sin, pending)
        logits = self.lm_head(m.norm(x) if pending is None else m.norm.add_forward(x, pending)[0])
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt_ids [B, S0]``; returns [B, S0 + max_new_tokens]. Without a KV
        cache: each step re-runs the last max_seq_len tokens (fine for the small models trained here).
        temperature 0 picks the most likely token."""
        was_training = self.training
        self.eval()
        ids = prompt_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        self.train(was_training)
        return ids
