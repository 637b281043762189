"""Routed experts (grouped GEMM, and a per-expert loop for reference) and the dense shared experts.

Legend: R routed rows (the permuted buffer, expert-major), H hidden, F expert ffn, E experts, T tokens.

    GroupedExperts(E, H, F)(x [R, H], offsets [E]) -> y [R, H]
        rows [offsets[e-1], offsets[e]) belong to expert e; rows past offsets[-1] come out zero
        y = down_e(act(gate_up_e(x)))      two m-grouped GEMMs (moetron.gmm), no loop over experts
    SequentialExperts: same parameters and result, a Python loop of plain matmuls (the readable reference)
    SharedExperts(H, F_shared)(x [..., H]) -> [..., H]
        a dense MLP every token passes through, optionally scaled by sigmoid(x @ gate)

Weights use the Hugging Face transformers v5 layout, so a checkpoint's expert tensors load as they are:

    gate_up_proj [E, 2F, H]   rows [0, F) of dim 1 are the gate projection, rows [F, 2F) the up projection
                              (gated activations "swiglu", "geglu")
    up_proj      [E, F, H]    instead of gate_up_proj for the non-gated activations "gelu", "relu2"
    down_proj    [E, H, F]
    gate_up_proj_bias [E, 2F] / up_proj_bias [E, F], down_proj_bias [E, H]   (optional)

Each expert computes ``x @ W.T`` per matrix, as ``nn.functional.linear`` does; that is ``gmm(..., trans_w=True)``.

Activations (``act``): "swiglu" silu(gate) * up (Llama/Mixtral/Qwen/DeepSeek); "geglu" gelu_tanh(gate) * up (Gemma);
"gelu" exact erf GELU (Megatron's default non-gated activation); "relu2" relu(x)² (squared ReLU, Primer/Nemotron).
They run in the activation dtype, as Megatron and Hugging Face do.

Initialisation: every weight is drawn from normal(0, 0.02) (Megatron-Core's ``init_method_std`` default) and biases
start at zero. Megatron scales the second projection's std by 1/sqrt(2·num_layers); a model that wants that
re-initialises ``down_proj`` itself, since a layer does not know the depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_tensor, is_mixed_precision_weight
from ._compile import compiling, records_grad
from .ops.gated_act import gated_act
from .ops.gated_gmm import gated_gmm
from .ops.gmm import gmm
from .ops.routed_experts import folds, routed_gated_experts

__all__ = ["ACTIVATIONS", "GATED_ACTIVATIONS", "GroupedExperts", "SequentialExperts", "SharedExperts",
           "apply_activation"]

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu2")
GATED_ACTIVATIONS = ("swiglu", "geglu")

# Megatron-Core's default init_method_std.
_INIT_STD = 0.02


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The expert nonlinearity on the first projection's output.

    Gated activations take ``h [N, 2F]`` (gate in the first F columns, up in the last F) and return ``[N, F]``;
    the others map ``[N, F]`` to ``[N, F]``. Rows of zeros stay zeros for every activation (what keeps the zero
    tail of a grouped GEMM zero through the second GEMM)."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return _gated(gate, up, activation)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu2":
        return torch.square(F.relu(h))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


class _ExpertWeights(nn.Module):
    """Parameters shared by GroupedExperts and SequentialExperts (see the module docstring for the layout)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 bias: bool = False, *, device=None, dtype=None):
        super().__init__()
        _check_positive_int("num_experts", num_experts)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("ffn_hidden_size", ffn_hidden_size)
        _check_activation(activation)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got {bias!r}")
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        E, H, Fh = num_experts, hidden_size, ffn_hidden_size
        kw = dict(device=device, dtype=dtype)
        first = 2 * Fh if self.gated else Fh
        # registered under the Hugging Face name of the layout: gate_up_proj [E, 2F, H] or up_proj [E, F, H]
        self._w1_name = "gate_up_proj" if self.gated else "up_proj"
        self.register_parameter(self._w1_name, nn.Parameter(torch.empty(E, first, H, **kw)))
        self.down_proj = nn.Parameter(torch.empty(E, H, Fh, **kw))
        if bias:
            self.register_parameter(self._w1_name + "_bias", nn.Parameter(torch.empty(E, first, **kw)))
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, **kw))
        else:
            self.register_parameter(self._w1_name + "_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    @property
    def w1(self) -> torch.Tensor:
        """The first projection, ``gate_up_proj [E, 2F, H]`` or ``up_proj [E, F, H]``."""
        return getattr(self, self._w1_name)

    @property
    def w1_bias(self) -> torch.Tensor | None:
        return getattr(self, self._w1_name + "_bias")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=_INIT_STD)
        nn.init.normal_(self.down_proj, std=_INIT_STD)
        if self.w1_bias is not None:
            nn.init.zeros_(self.w1_bias)
            nn.init.zeros_(self.down_proj_bias)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation!r}, "
                f"bias={self.down_proj_bias is not None}")

    def _check_inputs(self, x: torch.Tensor, offsets: torch.Tensor, row_scale: torch.Tensor | None = None) -> None:
        check_tensor("x", x, ndim=2)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.hidden_size:
            raise ValueError(f"x must have shape [R, {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int32, torch.int64))
        if offsets.numel() != self.num_experts:
            raise ValueError(f"offsets must have one entry per expert ({self.num_experts}), got "
                             f"{offsets.numel()} entries")
        if row_scale is not None:
            check_tensor("row_scale", row_scale, ndim=1)
            if row_scale.shape[0] != x.shape[0]:
                raise ValueError(f"row_scale must have one entry per row of x ({x.shape[0]}), got "
                                 f"{row_scale.shape[0]}")

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the expert GEMMs: autocast's dtype inside an autocast region (as nn.Linear would), else
        x's dtype, which must then equal the weights' dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if x.dtype != self.down_proj.dtype:
            raise TypeError(f"x must have the experts' dtype ({self.down_proj.dtype}), got {x.dtype}; cast the "
                            "input or the module, or run under torch.autocast")
        return x.dtype


class GroupedExperts(_ExpertWeights):
    """E expert MLPs applied to an expert-major buffer of routed rows with two grouped GEMMs.

    Args:
        num_experts: E.
        hidden_size: H, the width of the rows in and out.
        ffn_hidden_size: F, the width of each expert's intermediate activation.
        activation: "swiglu" (default), "geglu", "gelu" or "relu2" (see the module docstring).
        bias: add per-expert biases ``gate_up_proj_bias``/``up_proj_bias`` and ``down_proj_bias``.
        device, dtype: of the parameters.

    ``reuse_activation_memory``: the backward writes gradients over the intermediate activations it has finished
    with (the first GEMM's output, the activation), so the backward holds one buffer of each size instead of two;
    a second backward through the same graph (``retain_graph=True``) then raises. Off by default here; MoELayer
    turns it on (``MoEConfig.reuse_activation_memory``).

    ``forward(x [R, H], offsets [E], row_scale=None, zero_tail=True, *, consume_input=False) -> [R, H]``: expert
    e transforms rows
    [offsets[e-1], offsets[e]) (offsets are cumulative row ends, int32/int64, as ``permute`` returns them); rows
    past ``offsets[-1]`` come out zero, or with ``zero_tail=False`` are left unwritten (on the Triton path; for a
    worst-case-sized dispatcher buffer whose tail nothing reads). ``row_scale [R]`` (optional) multiplies each
    row's activation before the second GEMM: ``y = (row_scale · act(x W1ᵀ + b1)) W2ᵀ + b2``; with no down bias
    that is the row's routing weight applied to its output. ``consume_input=True`` declares x an intermediate
    the caller does not read again (a dispatcher's permuted rows): the backward then writes x's gradient over x
    (``gmm``'s ``consume_x``). On CUDA nothing is read on the host. Under ``torch.autocast`` the GEMMs run in the
    autocast dtype.
    """

    def __init__(self, *args, reuse_activation_memory: bool = False, **kw):
        super().__init__(*args, **kw)
        if not isinstance(reuse_activation_memory, bool):
            raise ValueError(f"reuse_activation_memory must be a bool, got {reuse_activation_memory!r}")
        self.reuse_activation_memory = reuse_activation_memory

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, row_scale: torch.Tensor | None = None,
                zero_tail: bool = True, *, consume_input: bool = False) -> torch.Tensor:
        self._check_inputs(x, offsets, row_scale)
        for name, flag in (("zero_tail", zero_tail), ("consume_input", consume_input)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        dtype = self._compute_dtype(x)
        w1, b1, w2, b2 = self.w1, self.w1_bias, self.down_proj, self._down_bias()
        # zero_tail=False: rows past offsets[-1] are neither computed nor written, here and in the backward
        limit = None if zero_tail else offsets[-1:]
        if dtype != w2.dtype and not gmm_takes_fp32_weights(w2, dtype):
            w1, w2 = w1.to(dtype), w2.to(dtype)  # autocast: cast like F.linear would (the copies are differentiable)
        x = x.to(dtype).contiguous()
        # the activations made here are read by nothing but the next op (and, for h, its backward)
        reuse = self.reuse_activation_memory
        first = dict(offsets=offsets, trans_w=True, bias=_bias_for(b1, dtype), zero_tail=zero_tail,
                     consume_x=consume_input)
        if self.activation in GATED_ACTIVATIONS and b1 is None and not (compiling() and records_grad(x, w1, row_scale)):
            # the activation in the first GEMM's epilogue on Hopper (moetron/ops/gated_gmm.py); when training, that
            # kernel also stores h for the backward
            h = gated_gmm(x, w1, offsets, self.activation, None if row_scale is None else row_scale.contiguous(),
                          zero_tail=zero_tail, consume_x=consume_input, consume_h=reuse)
        elif self.activation in GATED_ACTIVATIONS:  # one fused kernel each way (moetron/ops/gated_act.py)
            h = gated_act(gmm(x, w1, **first), self.activation, row_scale=row_scale, num_rows=limit, consume_h=reuse)
        else:
            h = _scale_rows(apply_activation(gmm(x, w1, **first), self.activation), row_scale)
        return gmm(h.contiguous(), w2, offsets=offsets, trans_w=True, bias=_bias_for(b2, dtype), zero_tail=zero_tail,
                   consume_x=reuse)

    def _down_bias(self) -> torch.Tensor | None:
        return self.down_proj_bias

    def can_gather_rows(self, x: torch.Tensor, probs: torch.Tensor) -> bool:
        """Whether ``forward_routed`` runs for x: gated activation, no biases, and ``ops.routed_experts.folds``
        (no gradient to record, a small per-expert weight or a decode-sized batch, Triton kernels for x,
        ``MOETRON_FOLD_PERMUTE`` on)."""
        return (self.gated and self.w1_bias is None and self.down_proj_bias is None
                and folds(x, self.w1, probs, self.down_proj, rows=probs.numel()))

    def forward_routed(self, x: torch.Tensor, probs: torch.Tensor, src_slot: torch.Tensor, row_map: torch.Tensor,
                       offsets: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` tokens -> ``[T, H]`` combined expert outputs, for the layout of ``permute`` (``src_slot``,
        ``row_map``, ``offsets``; see ``LocalDispatcher.layout``) and the routing weights ``probs [T, K]``: what
        ``unpermute(self(permute(x).x_permuted, offsets, row_scale=permuted probs), row_map)`` computes, with
        the first GEMM gathering its rows instead of reading a permuted copy (moetron/ops/routed_experts.py).
        Inference only: where ``can_gather_rows(x, probs)``."""
        check_tensor("x", x, ndim=2)
        if x.shape[1] != self.hidden_size:
            raise ValueError(f"x must have shape [T, {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        dtype = self._compute_dtype(x)
        w1, w2 = self.w1, self.down_proj
        if dtype != w2.dtype:  # autocast: cast like F.linear would (the copies are differentiable)
            w1, w2 = w1.to(dtype), w2.to(dtype)
        return routed_gated_experts(x.to(dtype), probs, w1, w2, src_slot, row_map, offsets, self.activation)


def gmm_takes_fp32_weights(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the expert GEMMs in ``dtype`` (autocast's) take the fp32 weight w as it is rather than a cast copy:
    ``gmm`` then runs on its own copy and makes w's gradient in fp32 (added into an existing ``w.grad`` in place),
    where a cast copy's bf16 gradient would be rounded, then cast back by another pass over it."""
    return is_mixed_precision_weight(w.dtype, dtype)


def _scale_rows(h: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    return h if row_scale is None else h * row_scale.to(h.dtype)[:, None]


def _bias_for(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # gmm takes the bias in x's dtype or fp32; anything else (an fp16 bias under bf16 autocast) is cast
    if bias is None or bias.dtype in (dtype, torch.float32):
        return bias
    return bias.to(dtype)


class SequentialExperts(_ExpertWeights):
    """The same experts as ``GroupedExperts`` (same parameters, same result) computed by a Python loop over
    experts with plain matmuls: the readable reference, and a baseline for benchmarks.

    ``forward(x [R, H], offsets [E], row_scale=None) -> [R, H]``. It reads ``offsets`` on the host to slice the
    rows, which syncs with the GPU once per call.
    """

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, offsets, row_scale)
        dtype = self._compute_dtype(x)
        ends = offsets.tolist()  # host sync
        R = x.shape[0]
        pieces, start = [], 0
        for e, end in enumerate(ends):
            end = min(max(int(end), start), R)
            if end > start:
                rows = x[start:end].to(dtype)
                h = F.linear(rows, self.w1[e].to(dtype), None if self.w1_bias is None else self.w1_bias[e].to(dtype))
                scale = None if row_scale is None else row_scale[start:end]
                h = _scale_rows(apply_activation(h, self.activation), scale)
                b2 = None if self.down_proj_bias is None else self.down_proj_bias[e].to(dtype)
                pieces.append(F.linear(h, self.down_proj[e].to(dtype), b2))
            start = end
        pieces.append(x.new_zeros(R - start, self.hidden_size, dtype=dtype))  # rows no expert owns
        return torch.cat(pieces, dim=0)


class SharedExperts(nn.Module):
    """A dense MLP applied to every token beside the routed experts (DeepSeek's shared experts, Qwen2-MoE's
    ``shared_expert``), optionally scaled per token by ``sigmoid(x @ gate.weight.T)`` (Qwen2-MoE's
    ``shared_expert_gate``).

    Args:
        hidden_size: H.
        ffn_hidden_size: F_shared, the intermediate width (DeepSeek: moe_intermediate_size · n_shared_experts).
        gate: add the scalar sigmoid gate ``gate = nn.Linear(H, 1, bias=False)``.
        activation: as for the routed experts. Gated activations use ``gate_proj``, ``up_proj`` and ``down_proj``
            (``nn.Linear`` without bias, the Hugging Face names); "gelu"/"relu2" have no ``gate_proj``.
        device, dtype: of the parameters.

    ``forward(x [..., H]) -> [..., H]``. Weights are initialised from normal(0, 0.02).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, gate: bool = False, activation: str = "swiglu", *,
                 device=None, dtype=None):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("ffn_hidden_size", ffn_hidden_size)
        _check_activation(activation)
        if not isinstance(gate, bool):
            raise ValueError(f"gate must be a bool, got {gate!r}")
        self.hidden_size, self.ffn_hidden_size, self.activation = hidden_size, ffn_hidden_size, activation
        kw = dict(bias=False, device=device, dtype=dtype)
        gated = activation in GATED_ACTIVATIONS
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw) if gated else None
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, **kw)
        self.gate = nn.Linear(hidden_size, 1, **kw) if gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj, self.gate):
            if lin is not None:
                nn.init.normal_(lin.weight, std=_INIT_STD)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        if self.gate_proj is not None:
            h = _gated(self.gate_proj(x), self.up_proj(x), self.activation)
        else:
            h = apply_activation(self.up_proj(x), self.activation)
        y = self.down_proj(h)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y
