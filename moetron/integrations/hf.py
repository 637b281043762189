"""Hugging Face transformers backend: moetron's permute + grouped GEMM behind transformers' experts modules.

Legend: T tokens, H hidden, F expert ffn, E experts on this rank, K top-k, R routed rows (T·K).

transformers v5 keeps each MoE block's experts as 3-D tensors and dispatches their forward through a registry
(``ExpertsInterface``), chosen with ``from_pretrained(..., experts_implementation=...)`` or
``model.set_experts_implementation(...)``. Importing this module registers ``"moetron"`` there (when transformers
has the registry; nothing happens otherwise), with the signature transformers calls::

    experts_forward(experts, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]

        ids_TK   = top_k_index, with every id outside [0, E) replaced by E       (EP sentinels: "no expert")
        p        = permute(x, ids_TK, E + 1)          expert-major rows; sentinel slots land in group E, the tail
        h        = gmm(p.x, w1, offsets[:E])          rows of group E (past offsets[E-1]) come out zero
                                                      (inference: one GEMM gathering x's rows, no permuted copy)
        h        = gate(h)                            SwiGLU / the model's own _apply_gate / act_fn
        y_R      = gmm(h, down_proj, offsets[:E])     (+ post_expert_norm)
        out      = unpermute(y_R, row_map, weights)   fp32 sum over k; sentinel slots read zero rows

Layout flags set by ``@use_experts_implementation`` are honoured: ``is_transposed`` (weights ``[E, H, 2F]`` /
``[E, F, H]``, read with ``trans_w=False``; otherwise ``[E, 2F, H]`` / ``[E, H, F]`` read with ``trans_w=True``, so
no weight is copied or transposed), ``has_bias``, ``has_gate`` (``up_proj`` and ``act_fn`` when False),
``is_concatenated`` and custom gates (``_apply_gate``, e.g. GPT-OSS's clamped SwiGLU on interleaved columns:
called as the model defines it), ``has_post_expert_norm``. The default concatenated gate with SiLU or tanh-GELU
runs as moetron's fused gated activation (moetron/ops/gated_act.py: one kernel each way on CUDA).

Expert-parallel sentinels: transformers marks a slot routed to an expert held by another rank with index E (the
local expert count) and weight 0. Here any index outside [0, E) is such a slot: its weight is replaced by 0, its
row falls past the last GEMM group, which gmm writes as zeros in both directions, so it reaches neither the
output nor the gradient of any weight, of hidden_states or of top_k_weights.

Nothing reads routing data on the host (no ``.item()``/``.tolist()``); on CUDA the whole forward and backward
are Triton kernels plus a few elementwise ops. Under ``torch.compile`` the no-gradient forward is one custom op
(``moetron::hf_experts_inference``), so a model compiles with ``fullgraph=True`` and replays from CUDA graphs.
The weights compute in their own dtype (under ``torch.autocast``, in the autocast dtype); hidden_states are cast
to it, and the result comes back in hidden_states' dtype.

``patch(model)`` swaps each experts module (3-D expert parameters) for a ``MoetronExperts`` that holds the very same
Parameter objects under the same names, so nothing is copied and ``state_dict``/``save_pretrained`` are unchanged;
with ``router=True`` it also swaps routers whose rule moetron's ``TopKRouter`` reproduces. ``unpatch(model)``
puts the original modules back. Use it where the registry is missing (a model class without
``@use_experts_implementation``, remote code); with the registry, prefer ``experts_implementation="moetron"``.

Around the experts, for training: ``fuse_lm_loss(model)`` computes the causal-LM loss from the last hidden state with
``moetron.ops.linear_cross_entropy`` (no fp32 copies of the [tokens, vocab] logits), ``fuse_norms(model)`` runs each
RMSNorm as one kernel each way, ``fuse_rotary(model)`` the rotary embedding of q and k, and ``fuse(model)`` all
three. None touches a parameter; each has its ``unfuse``.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOAT_DTYPES
from ..experts import gmm_takes_fp32_weights
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.gated_gmm import gated_gmm
from ..ops._launch import per_launch_scratch
from ..ops.gmm import gmm
from ..ops.permute import _route, permute, unpermute
from ..ops.rmsnorm import rms_norm
from ..ops.rotary import MAX_HEAD_DIM, apply_rotary, apply_rotary_ref
from ..ops.routed_experts import folds, gathered_gemm
from .._compile import compiling, eager_function, records_grad

__all__ = ["IMPLEMENTATION_NAME", "experts_forward", "register", "is_registered", "patch", "unpatch", "fuse_lm_loss",
           "unfuse_lm_loss", "fuse_norms", "unfuse_norms", "fuse_rotary", "unfuse_rotary", "fuse", "unfuse",
           "MoetronExperts", "MoetronRouter"]

IMPLEMENTATION_NAME = "moetron"



# ---------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------


try:  # the fused Triton gate of moetron's own experts: one read of h [R, 2F], one write, each way
    from ..ops.gated_act import gated_act as _fused_gated_act
except ImportError:  # pragma: no cover - older tree without moetron/ops/gated_act.py
    _fused_gated_act = None


@eager_function
class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up over the two halves of h [R, 2F], the fallback without the fused kernel. Saves only h
    (autograd through chunk/silu/mul would also keep silu(gate), another R·F activation)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d_up = dy * (gate * sig)
        d_gate = dy * up * (sig * (1 + gate * (1 - sig)))  # d silu(g) / dg
        return torch.cat([d_gate, d_up], dim=-1)


def _fused_gate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if _fused_gated_act is not None:
        return _fused_gated_act(h.contiguous(), activation)
    if activation == "swiglu":
        return _SwiGLU.eager_apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _default_gate_fn():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def _fused_kind(act) -> str | None:
    """"swiglu" / "geglu" when ``act`` is SiLU / tanh-approximated GELU (what the fused gate computes)."""
    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name in ("SiLUActivation", "SiLU") or act is F.silu:
        return "swiglu"
    if name in ("GELUTanh", "PytorchGELUTanh") or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "geglu"
    return None


def _default_gate_kind(experts) -> str | None:
    """"swiglu" / "geglu" when the experts apply transformers' default gate (concatenated gate then up, SiLU or
    tanh-GELU): what moetron's fused gated activation computes. None for anything else."""
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        return None
    if getattr(experts, "_apply_gate", None) is not None:
        # the model's own gate (GPT-OSS) unless it is transformers' default, looked up on the class (torch.compile
        # does not see a bound method's __func__ as the function itself)
        default = _default_gate_fn()
        if (default is None or "_apply_gate" in experts.__dict__
                or getattr(type(experts), "_apply_gate", None) is not default):
            return None
    return _fused_kind(getattr(experts, "act_fn", None))


def _apply_gate(experts, h: torch.Tensor, kind: str | None) -> torch.Tensor:
    """The experts' nonlinearity on the first projection's output, as transformers' implementations apply it.
    ``kind``: ``_default_gate_kind(experts)``, which the caller has already worked out."""
    if not getattr(experts, "has_gate", True):
        return experts.act_fn(h)
    if kind is not None:
        return _fused_gate(h, kind)
    fn = getattr(experts, "_apply_gate", None)
    if fn is None:
        gate, up = h.chunk(2, dim=-1)
        return experts.act_fn(gate) * up
    return fn(h)


# ---------------------------------------------------------------------------------------------------------
# The experts forward
# ---------------------------------------------------------------------------------------------------------


def _weights(experts):
    """(w1, b1, w2, b2, trans_w) of an experts module in transformers v5's layout."""
    has_gate = getattr(experts, "has_gate", True)
    has_bias = getattr(experts, "has_bias", False)
    w1 = experts.gate_up_proj if has_gate else experts.up_proj
    w2 = experts.down_proj
    b1 = b2 = None
    if has_bias:
        b1 = experts.gate_up_proj_bias if has_gate else experts.up_proj_bias
        b2 = experts.down_proj_bias
    # transposed: w1 [E, H, 2F], w2 [E, F, H] are [G, K, N] for gmm; otherwise [E, 2F, H], [E, H, F] are [G, N, K]
    trans_w = not getattr(experts, "is_transposed", False)
    return w1, b1, w2, b2, trans_w


def _check_args(hidden_states, top_k_index, top_k_weights, w1, w2, trans_w):
    for name, t in (("hidden_states", hidden_states), ("top_k_index", top_k_index),
                    ("top_k_weights", top_k_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, H] (2-D), got shape {tuple(hidden_states.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"top_k_index must be [T, K] with T = {hidden_states.shape[0]}, got shape "
                         f"{tuple(top_k_index.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_weights must have the shape of top_k_index {tuple(top_k_index.shape)}, got "
                         f"{tuple(top_k_weights.shape)}")
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
        raise ValueError(f"expert weights must be 3-D [E, ., .] with the same E, got {tuple(w1.shape)} and "
                         f"{tuple(w2.shape)}")
    H = hidden_states.shape[1]
    w1_in = w1.shape[2] if trans_w else w1.shape[1]
    if w1_in != H:
        layout = "[E, 2F, H] (is_transposed=False)" if trans_w else "[E, H, 2F] (is_transposed=True)"
        raise ValueError(f"the first expert projection must be {layout} with H = hidden_states.shape[1] = {H}, "
                         f"got shape {tuple(w1.shape)}")


def _bias_in(b, dtype):
    if b is None or b.dtype in (dtype, torch.float32):
        return b
    return b.to(dtype)


def experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "moetron" experts implementation: ``[T, H], [T, K], [T, K] -> [T, H]`` (see the module docstring).

    ``experts`` is a transformers v5 experts module (``gate_up_proj``/``up_proj``, ``down_proj``, optional biases,
    the layout flags of ``@use_experts_implementation``). No host sync. Under ``torch.compile``, a forward that
    records no gradient, with transformers' default gate, no post-expert norm and no autocast, is one custom op
    (``moetron::hf_experts_inference``), so the compiled graph has no break there and can be captured in a CUDA
    graph (``mode="reduce-overhead"``). Anything else (training, for one) runs moetron's ops one by one; under
    ``torch.compile`` they are custom ops with autograd formulas, which a compiled graph keeps too."""
    w1, b1, w2, b2, trans_w = _weights(experts)
    _check_args(hidden_states, top_k_index, top_k_weights, w1, w2, trans_w)
    gate = _default_gate_kind(experts)
    post_norm = experts.post_expert_norm if getattr(experts, "has_post_expert_norm", False) else None
    if (compiling() and gate is not None and post_norm is None
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and not records_grad(hidden_states, top_k_weights, w1, w2, b1, b2)):
        return torch.ops.moetron.hf_experts_inference(hidden_states, top_k_index, top_k_weights, w1, w2, b1, b2,
                                                      trans_w, gate)
    return _experts(hidden_states, top_k_index, top_k_weights, w1, b1, w2, b2, trans_w, gate,
                    lambda h: _apply_gate(experts, h, gate), post_norm)


def _experts(hidden_states, top_k_index, top_k_weights, w1, b1, w2, b2, trans_w: bool, gate: str | None,
             apply_gate, post_norm):
    """The experts forward on checked arguments. ``gate``: the default gate's fused kind ("swiglu"/"geglu") or
    None; ``apply_gate(h)`` the experts' nonlinearity; ``post_norm`` the post-expert norm module or None."""
    T, H = hidden_states.shape
    E = w1.shape[0]
    device = hidden_states.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = w1.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"the experts' compute dtype must be one of fp16, bf16, fp32 (moetron.gmm), got {dtype}; "
                        "use another experts_implementation for float64")
    if T == 0 or top_k_index.shape[1] == 0:
        return hidden_states.new_zeros(T, H)
    # autocast: cast like F.linear would; the copies are differentiable. Otherwise these are no-ops. In training,
    # fp32 weights go to gmm as they are (it makes their gradient in fp32: moetron.experts.gmm_takes_fp32_weights)
    if not (records_grad(hidden_states, w1, w2) and gmm_takes_fp32_weights(w2, dtype)):
        w1 = w1.to(dtype) if w1.dtype != dtype else w1
        w2 = w2.to(dtype) if w2.dtype != dtype else w2
    if not w1.is_contiguous():
        w1 = w1.contiguous()
    if not w2.is_contiguous():
        w2 = w2.contiguous()
    x = hidden_states.to(dtype).contiguous()

    probs = top_k_weights if top_k_weights.dtype in FLOAT_DTYPES else top_k_weights.float()
    # the default gate: the activation in the first GEMM's epilogue (in inference no [R, 2F] h goes to memory; in
    # training the same kernel stores h for the backward); under torch.compile training keeps the two ops
    gated = gate if trans_w and b1 is None and not (compiling() and records_grad(x, w1, w2, b2, probs)) else None
    if folds(x, w1, probs, w2, b1, b2, rows=top_k_index.numel()):
        # inference: the first GEMM reads each row's token of x itself, same layout as permute's, no copy. The
        # routing drops ids outside [0, E) (EP sentinels) itself: such a slot gets no row and adds nothing, so
        # the id and weight rewrites below (four small kernels per call) are not needed here
        K = top_k_index.shape[1]
        layout = _route(top_k_index, E, None, 1, None, "probs", T * K)
        offsets, row_map = layout.offsets, layout.row_map_R.view(T, K)
        if gated is not None:
            h = gated_gmm(x, w1, offsets, gated, gather=layout.src_slot, gather_div=K)
        else:
            h = apply_gate(gathered_gemm(x, w1, layout.src_slot, K, offsets, trans_w, _bias_in(b1, dtype)))
    else:
        # EP sentinels (and any other id outside [0, E)): group E, zero weight, so no gradient reaches them
        valid = (top_k_index >= 0) & (top_k_index < E)
        ids = torch.where(valid, top_k_index, E)
        probs = torch.where(valid, probs, 0)
        p = permute(x, ids, E + 1)
        offsets, row_map = p.offsets[:E], p.row_map  # group E (the sentinels) lies past the last group
        if gated is not None:
            h = gated_gmm(p.x_permuted, w1, offsets, gated)
        else:
            h = gmm(p.x_permuted, w1, offsets=offsets, trans_w=trans_w, bias=_bias_in(b1, dtype))
            h = apply_gate(h)
    if h.dtype != dtype:
        h = h.to(dtype)
    y = gmm(h.contiguous(), w2, offsets=offsets, trans_w=trans_w, bias=_bias_in(b2, dtype))
    if post_norm is not None:
        y = post_norm(y).to(dtype).contiguous()
    out = unpermute(y, row_map, probs)
    return out.to(hidden_states.dtype)


# The no-gradient experts forward as one operator that torch.compile keeps in its graph (not traced into: its
# kernels read group sizes on the device and launch Triton code). Only what experts_forward sends here reaches it:
# the default gate, no post-expert norm, no autocast, no gradient to record.
@torch.library.custom_op("moetron::hf_experts_inference", mutates_args=(),
                         schema="(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, Tensor w1, "
                                "Tensor w2, Tensor? b1, Tensor? b2, bool trans_w, str gate) -> Tensor")
def _experts_inference_op(hidden_states, top_k_index, top_k_weights, w1, w2, b1, b2, trans_w, gate):
    with torch.no_grad(), per_launch_scratch():
        return _experts(hidden_states, top_k_index, top_k_weights, w1, b1, w2, b2, trans_w, gate,
                        lambda h: _fused_gate(h, gate), None)


@_experts_inference_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, w1, w2, b1, b2, trans_w, gate):
    return hidden_states.new_empty(hidden_states.shape)


# ---------------------------------------------------------------------------------------------------------
# Registration in transformers' ExpertsInterface
# ---------------------------------------------------------------------------------------------------------


def _interface():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # transformers absent, or older than the experts registry
        return None
    return ExpertsInterface


def register(name: str = IMPLEMENTATION_NAME) -> bool:
    """Register ``experts_forward`` under ``name`` in transformers' ``ExpertsInterface``. Returns False (and does
    nothing) when transformers is not installed or has no experts registry (use ``patch`` there)."""
    interface = _interface()
    if interface is None:
        return False
    interface.register(name, experts_forward)
    return True


def is_registered(name: str = IMPLEMENTATION_NAME) -> bool:
    interface = _interface()
    if interface is None:
        return False
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS.get(name) is experts_forward


register()


# ---------------------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------------------

_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def _is_experts_module(m: nn.Module) -> bool:
    params = m._parameters
    down = params.get("down_proj")
    first = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and first is not None and down.dim() == 3 and first.dim() == 3


def _infer_transposed(w1: torch.Tensor, w2: torch.Tensor, gated: bool) -> bool:
    """Layout from shapes when the module carries no flag: [E, 2F, H]/[E, H, F] or [E, H, 2F]/[E, F, H]."""
    mult = 2 if gated else 1
    plain = w1.shape[2] == w2.shape[1] and w1.shape[1] == mult * w2.shape[2]
    transposed = w1.shape[1] == w2.shape[2] and w1.shape[2] == mult * w2.shape[1]
    if plain or not transposed:
        return False
    return True


class MoetronExperts(nn.Module):
    """An experts module running ``experts_forward``, holding the same Parameter objects (and buffers and
    submodules, such as ``act_fn`` and ``post_expert_norm``) as the module it replaces, under the same names.

    ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        if not _is_experts_module(original):
            raise ValueError(f"original must be an experts module with 3-D expert parameters (gate_up_proj or "
                             f"up_proj, and down_proj), got {type(original).__name__} with parameters "
                             f"{sorted(original._parameters)}")
        for name, p in original._parameters.items():
            self.register_parameter(name, p)
        for name, b in original._buffers.items():
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        for name, child in original._modules.items():
            self.add_module(name, child)
        gated = "gate_up_proj" in original._parameters
        self.has_gate = getattr(original, "has_gate", gated)
        self.has_bias = getattr(original, "has_bias", any(original._parameters.get(n) is not None
                                                          for n in ("gate_up_proj_bias", "up_proj_bias")))
        w1 = original._parameters["gate_up_proj" if self.has_gate else "up_proj"]
        self.is_transposed = getattr(original, "is_transposed",
                                     _infer_transposed(w1, original._parameters["down_proj"], self.has_gate))
        self.is_concatenated = getattr(original, "is_concatenated", True)
        self.has_post_expert_norm = getattr(original, "has_post_expert_norm", False)
        self.num_experts = w1.shape[0]
        if not hasattr(self, "act_fn"):
            self.act_fn = getattr(original, "act_fn", nn.SiLU())
        gate = getattr(type(original), "_apply_gate", None)
        if gate is not None and gate is not _default_gate_fn():
            # the model's own gate (GPT-OSS clamped SwiGLU, ...), reading its constants from the original module
            self._apply_gate = getattr(original, "_apply_gate")
        self.__dict__["_moetron_original"] = original  # not a submodule: its tensors are ours already

    def extra_repr(self) -> str:
        flags = ", ".join(f"{f}={getattr(self, f)}" for f in _FLAGS)
        return f"num_experts={self.num_experts}, {flags}, replaces={type(self._moetron_original).__name__}"

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


# -- routers ---------------------------------------------------------------------------------------------------


def _router_config(gate: nn.Module, hidden_size: int):
    """The RouterConfig reproducing a transformers router, or (None, why) when there is none."""
    from ..router import RouterConfig

    name = type(gate).__name__
    weight = gate._parameters.get("weight")
    if weight is None or weight.dim() != 2:
        return None, f"{name} has no 2-D weight"
    E, H = weight.shape
    K = getattr(gate, "top_k", None)
    if not isinstance(K, int) or H != hidden_size:
        return None, f"{name} has no int top_k or its weight is not [E, {hidden_size}]"
    base = dict(hidden_size=H, num_experts=E, top_k=K, load_balancing=("none",))
    if name in ("Qwen3MoeTopKRouter", "OlmoeTopKRouter", "Qwen2MoeTopKRouter"):
        # softmax over all E, top-k, optional renormalisation; scores in the logits' dtype
        norm = bool(getattr(gate, "norm_topk_prob", False))
        return RouterConfig(**base, score_function="softmax", pre_softmax=True, norm_topk_prob=norm), None
    if name == "MixtralTopKRouter":
        # softmax over all E then renormalised top-k == softmax over the k selected logits
        return RouterConfig(**base, score_function="softmax", pre_softmax=False), None
    if name == "DeepseekV3TopkRouter":
        groups, group_topk = getattr(gate, "num_group", 1), getattr(gate, "topk_group", 1)
        # transformers scores a group by its top-2 experts; moetron by its top K // group_topk
        if groups > 1 and K // group_topk != 2:
            return None, (f"{name}: group scores use the top 2 experts, moetron's the top top_k // topk_group = "
                          f"{K // group_topk}")
        grouped = dict(num_groups=groups, group_topk=group_topk) if groups > 1 else {}
        return RouterConfig(**base, score_function="sigmoid", expert_bias=True,
                            norm_topk_prob=bool(gate.norm_topk_prob),
                            scaling_factor=float(gate.routed_scaling_factor), **grouped), None
    return None, f"{name} is not a router moetron reproduces"


class MoetronRouter(nn.Module):
    """A transformers router run by moetron's ``TopKRouter``, sharing the router's ``weight`` (and DeepSeek-V3's
    ``e_score_correction_bias``) under the same names. ``forward(x [..., H]) -> (logits [T, E], scores [T, K],
    indices [T, K])`` as the transformers router returns them. Load balancing stays the model's own (moetron adds
    no aux loss: the model computes its loss from the returned logits)."""

    def __init__(self, original: nn.Module, config):
        super().__init__()
        from ..router import TopKRouter

        self.weight = original._parameters["weight"]
        for name, b in original._buffers.items():
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        self.top_k, self.num_experts = config.top_k, config.num_experts
        # scores in the logits' dtype (Qwen3, OLMoE), fp32 (Mixtral); logits in fp32 for DeepSeek-V3
        kind = type(original).__name__
        self._scores_in_x_dtype = kind in ("Qwen3MoeTopKRouter", "OlmoeTopKRouter", "Qwen2MoeTopKRouter")
        self._logits_fp32 = kind == "DeepseekV3TopkRouter"
        router = TopKRouter(config, device=self.weight.device, dtype=self.weight.dtype)
        self.__dict__["_router"] = router  # not a submodule: its tensors are ours, bound at each call
        self.__dict__["_moetron_original"] = original

    def forward(self, hidden_states):
        r = self._router
        r._parameters["weight"] = self.weight
        if r.config.expert_bias:
            r._buffers["expert_bias"] = self._buffers["e_score_correction_bias"]
        r.training = self.training
        x = hidden_states.reshape(-1, self.weight.shape[1])
        out = r(x)
        logits = out.logits if self._logits_fp32 else out.logits.to(x.dtype)
        scores = out.probs.to(x.dtype) if self._scores_in_x_dtype else out.probs
        return logits, scores, out.expert_ids


# -- the swap --------------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, *, router: bool = False) -> list[str]:
    """Swap every experts module of ``model`` (a module holding 3-D ``gate_up_proj``/``up_proj`` and ``down_proj``
    parameters, as transformers v5 MoE blocks do) for a ``MoetronExperts`` holding the same tensors; with
    ``router=True`` also swap each such block's ``gate`` for a ``MoetronRouter`` where moetron reproduces its rule
    (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V3 when its group rule matches; other routers are left alone with a
    warning). Nothing is copied: parameters keep their identity (optimizers, ``state_dict`` and ``save_pretrained``
    see no change). Returns the names of the swapped modules. Calling it twice is harmless.

    Raises ValueError when the model has no such experts module (transformers v4 blocks keep experts as an
    ``nn.ModuleList`` of per-expert MLPs, which moetron cannot run without copying weights each step; convert
    the checkpoint with ``moetron convert`` instead)."""
    _check_model(model)
    swapped, skipped = [], []
    found_any = False
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, MoetronExperts):
                found_any = True
                continue
            if _is_experts_module(child):
                found_any = True
                setattr(parent, child_name, MoetronExperts(child))
                swapped.append(full)
                if router:
                    gate = parent._modules.get("gate")
                    if gate is not None and not isinstance(gate, MoetronRouter):
                        cfg, why = _router_config(gate, _hidden_size(child))
                        if cfg is None:
                            skipped.append(f"{parent_name}.gate: {why}")
                        else:
                            setattr(parent, "gate", MoetronRouter(gate, cfg))
                            swapped.append(f"{parent_name}.gate" if parent_name else "gate")
    if not found_any:
        raise ValueError("model must contain transformers v5 experts modules (3-D gate_up_proj or up_proj and "
                         "down_proj parameters), found none; per-expert nn.ModuleList experts (transformers v4) are "
                         "not supported by patch: convert the checkpoint with `moetron convert` instead")
    if skipped:
        warnings.warn("moetron.integrations.hf.patch kept these routers: " + "; ".join(skipped), stacklevel=2)
    return swapped


def _hidden_size(experts: nn.Module) -> int:
    gated = "gate_up_proj" in experts._parameters
    w1 = experts._parameters["gate_up_proj" if gated else "up_proj"]
    transposed = getattr(experts, "is_transposed", _infer_transposed(w1, experts._parameters["down_proj"], gated))
    return w1.shape[1] if transposed else w1.shape[2]


def unpatch(model: nn.Module) -> list[str]:
    """Undo ``patch``: put every original experts module and router back (with the current tensors, in case the
    model was moved or cast since). Returns the names of the restored modules."""
    _check_model(model)
    restored = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, (MoetronExperts, MoetronRouter)):
                original = child._moetron_original
                for name, p in child._parameters.items():
                    if name in original._parameters:
                        original._parameters[name] = p
                for name, b in child._buffers.items():
                    if name in original._buffers:
                        original._buffers[name] = b
                original.train(child.training)
                setattr(parent, child_name, original)
                restored.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return restored


# ---------------------------------------------------------------------------------------------------------
# The language-model loss: the head's GEMM and cross-entropy without fp32 logits
# ---------------------------------------------------------------------------------------------------------

def fuse_lm_loss(model: nn.Module) -> None:
    """Compute a causal LM's training loss with ``moetron.ops.linear_cross_entropy`` instead of
    ``lm_head`` + transformers' ``ForCausalLMLoss`` (which upcasts the [B·S, V] logits to fp32: ~5 GB and
    several passes over them at 8192 tokens and a 152k vocabulary). Same loss and gradients within rounding,
    no change to any parameter.

    It applies to forwards in train mode with ``labels`` given (and ``logits_to_keep`` left at 0): the base model
    runs as usual, the head's GEMM and the loss run fused on its last hidden state (labels shifted as
    transformers shifts them; ``ignore_index``, ``num_items_in_batch`` and ``shift_labels`` honoured), and the
    router aux loss is added as transformers adds it. Those forwards return ``logits`` with no positions
    (shape [B, 0, V]): nothing is computed that the loss does not need. Eval mode, or no labels, runs the
    original forward. ``unfuse_lm_loss(model)`` undoes it; calling it twice is harmless.

    Raises ValueError for a model this cannot reproduce exactly: no ``lm_head`` linear without bias, no base
    model, final logit soft-capping (Gemma 2/3), or a custom loss function set on the model."""
    _check_model(model)
    if "_moetron_original_forward" in model.__dict__:
        return
    head = getattr(model, "lm_head", None)
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"fuse_lm_loss needs a causal LM with an `lm_head` nn.Linear without bias, got "
                         f"{type(head).__name__ if head is not None else 'no lm_head'} in {type(model).__name__}")
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"fuse_lm_loss needs a causal LM wrapping a base model (model.base_model), "
                         f"got {type(model).__name__}")
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("fuse_lm_loss does not apply final logit soft-capping (config.final_logit_softcapping="
                         f"{config.final_logit_softcapping}); leave this model's loss unfused")
    if "_loss_function" in model.__dict__:
        raise ValueError("fuse_lm_loss reproduces transformers' default causal-LM loss; this model has a custom "
                         "loss_function set, so it stays unfused")
    # a forward already set on the instance (accelerate's device hooks wrap it so) is what the fused forward calls,
    # and what unfuse puts back
    model._moetron_original_forward = model.forward
    model._moetron_instance_forward = model.__dict__.get("forward")
    model.forward = _fused_loss_forward.__get__(model)


def unfuse_lm_loss(model: nn.Module) -> bool:
    """Undo ``fuse_lm_loss``; returns whether it was fused."""
    _check_model(model)
    original = model.__dict__.pop("_moetron_original_forward", None)
    if original is None:
        return False
    instance_forward = model.__dict__.pop("_moetron_instance_forward", None)
    if instance_forward is None:
        del model.forward
    else:
        model.forward = instance_forward
    return True


def _fused_loss_forward(self, *args, **kwargs):
    original = self._moetron_original_forward
    labels = kwargs.get("labels")
    keep = kwargs.get("logits_to_keep", 0)
    if (labels is None or args or not self.training or not (isinstance(keep, int) and keep == 0)
            or kwargs.get("return_dict") is False or "_loss_function" in self.__dict__):
        # positional arguments: leave the signature to transformers; a loss function set since: use it
        return original(*args, **kwargs)
    captured = []
    hook = self.base_model.register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
    try:
        kwargs = dict(kwargs, labels=None, logits_to_keep=torch.zeros(0, dtype=torch.long, device=labels.device))
        out = original(**kwargs)
    finally:
        hook.remove()
    hidden = captured[-1]  # [B, S, H], after the final norm: what lm_head reads
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss shifts them
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight = self.lm_head.weight  # the head may sit on another device than the last layer (a device map)
    loss = linear_cross_entropy(hidden.to(weight.device), weight, shift_labels.to(weight.device),
                                ignore_index=ignore_index, num_items=kwargs.get("num_items_in_batch"))
    aux_loss = getattr(out, "aux_loss", None)
    if aux_loss is not None:
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    out.loss = loss
    return out


# ---------------------------------------------------------------------------------------------------------
# RMSNorm: one fused kernel each way instead of transformers' fp32 elementwise chain
# ---------------------------------------------------------------------------------------------------------


def fuse_norms(model: nn.Module) -> list[str]:
    """Run every RMSNorm module of ``model`` (a class named ``*RMSNorm`` with a 1-D ``weight`` and a
    ``variance_epsilon``, as Llama-family, Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 define it) with
    ``moetron.ops.rms_norm``: one Triton kernel forward and one backward instead of ~7 and ~10 elementwise kernels
    over fp32 copies. Same formula, fp32 maths; the output keeps transformers' dtype (the promotion of input and
    weight). transformers rounds the normalized input to its dtype before the weight multiply, moetron rounds
    once at the end, so bf16 outputs may differ in the last bit.

    Each module is checked first on a small fp32 probe against its own forward; a norm whose formula differs
    (Gemma's ``1 + weight``, a norm without weight), or whose forward is already replaced on the instance
    (accelerate's offload and device hooks do that), is left alone with a warning. Returns the names of the fused
    modules; ``unfuse_norms(model)`` undoes it; calling it twice is harmless."""
    _check_model(model)
    fused, skipped = [], []
    for name, module in model.named_modules():
        if "_moetron_original_norm_forward" in module.__dict__:
            fused.append(name)
            continue
        weight = getattr(module, "weight", None)
        if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.ndim == 1
                and isinstance(getattr(module, "variance_epsilon", None), float)):
            continue
        if "forward" in module.__dict__ or not _norm_formula_matches(module):
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        module._moetron_original_norm_forward = module.forward
        module.forward = _fused_norm_forward.__get__(module)
        fused.append(name)
    if skipped:
        warnings.warn("moetron.integrations.hf.fuse_norms left these norms alone (their forward is not "
                      "x * rsqrt(mean(x^2) + eps) * weight, or is already replaced on the module): "
                      + ", ".join(skipped), stacklevel=2)
    return fused


def unfuse_norms(model: nn.Module) -> list[str]:
    """Undo ``fuse_norms``; returns the names of the restored modules."""
    _check_model(model)
    restored = []
    for name, module in model.named_modules():
        if module.__dict__.pop("_moetron_original_norm_forward", None) is not None:
            del module.forward
            restored.append(name)
    return restored


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    out_dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def _norm_formula_matches(module: nn.Module) -> bool:
    """Whether the module's own forward equals the RMSNorm formula on a small fp32 probe."""
    weight = module.weight.detach()
    if weight.device.type == "meta":
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=g).to(weight.device) * 3
    with torch.no_grad():
        try:
            want = type(module).forward(module, x)
        except Exception:  # a norm that wants other arguments is not this formula
            return False
        got = rms_norm(x, weight.float(), module.variance_epsilon)
    return (isinstance(want, torch.Tensor) and want.shape == got.shape
            and torch.allclose(want.float(), got, rtol=1e-2, atol=1e-3))


# ---------------------------------------------------------------------------------------------------------
# Rotary embedding: one kernel each way for q and for k
# ---------------------------------------------------------------------------------------------------------

# transformers' attention modules call their modeling file's global ``apply_rotary_pos_emb``, so the swap is per
# modeling file, shared by every model of that file in the process (as Liger-Kernel's patches are): the original
# function of each swapped file, and how many fused models use the swap.
_ROTARY_ORIGINALS: dict[str, object] = {}
_ROTARY_USERS: dict[str, int] = {}


def fuse_rotary(model: nn.Module) -> list[str]:
    """Swap the rotate-half ``apply_rotary_pos_emb`` of each transformers modeling file that ``model`` uses for
    one running ``moetron.ops.apply_rotary`` (one Triton kernel each way for q and k, fp32 maths, instead of ~5
    elementwise kernels each on transposed views). The swap lives in the modeling file (module global): other
    models of the same file in this process use it too; its calls outside the kernel's layout (other dtypes of
    the tables, ``unsqueeze_dim`` != 1, grads into the tables) go to the original. A file whose function does
    not give the rotate-half result on a probe (interleaved or partial rotary) is left alone with a warning.
    Returns the modeling files swapped for this model; ``unfuse_rotary(model)`` undoes it (the original comes
    back when no fused model uses the file)."""
    _check_model(model)
    mine = model.__dict__.setdefault("_moetron_rotary_files", [])
    skipped = []
    for file_name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(file_name)
        function = getattr(module, "apply_rotary_pos_emb", None)
        if function is None or file_name in mine:
            continue
        if file_name not in _ROTARY_ORIGINALS:
            if not _rotary_formula_matches(function):
                skipped.append(file_name)
                continue
            _ROTARY_ORIGINALS[file_name] = function
            module.apply_rotary_pos_emb = _fused_rotary_for(function)
        _ROTARY_USERS[file_name] = _ROTARY_USERS.get(file_name, 0) + 1
        mine.append(file_name)
    if skipped:
        warnings.warn("moetron.integrations.hf.fuse_rotary left apply_rotary_pos_emb alone in " + ", ".join(skipped)
                      + " (not the rotate-half formula on a probe)", stacklevel=2)
    return list(mine)


def unfuse_rotary(model: nn.Module) -> list[str]:
    """Undo ``fuse_rotary`` for this model; returns the modeling files it had swapped."""
    _check_model(model)
    mine = model.__dict__.pop("_moetron_rotary_files", [])
    for file_name in mine:
        _ROTARY_USERS[file_name] -= 1
        if _ROTARY_USERS[file_name] == 0:
            del _ROTARY_USERS[file_name]
            sys.modules[file_name].apply_rotary_pos_emb = _ROTARY_ORIGINALS.pop(file_name)
    return mine


def _fused_rotary_for(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        """moetron's rotary kernel where the inputs fit it, else transformers' original function."""
        fits = (not args and not kwargs and unsqueeze_dim == 1 and q.ndim == k.ndim == 4 and cos.ndim == 3
                and cos.shape == sin.shape and q.dtype == k.dtype == cos.dtype == sin.dtype
                and q.is_floating_point() and q.shape[-1] == k.shape[-1] == cos.shape[-1]
                and q.shape[-1] % 2 == 0 and q.shape[-1] <= MAX_HEAD_DIM and q.shape[2] == k.shape[2] == cos.shape[1]
                and cos.shape[0] in (1, q.shape[0]) and q.shape[0] == k.shape[0]
                and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
                and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)))
        if not fits:
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        # transformers' q/k are [B, N, S, D] views of [B, S, N, D]; the kernel reads [B, S, N, D] through strides
        return (apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2),
                apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2))

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


def _rotary_formula_matches(function) -> bool:
    """Whether a modeling file's apply_rotary_pos_emb gives the rotate-half result on a small fp32 probe."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    angles = torch.rand(2, 5, 4, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    try:
        got_q, got_k = function(q, k, cos, sin)
    except Exception:  # another signature: not the function this swap replaces
        return False
    want_q = apply_rotary_ref(q.transpose(1, 2), cos, sin).transpose(1, 2)
    want_k = apply_rotary_ref(k.transpose(1, 2), cos, sin).transpose(1, 2)
    return (got_q.shape == want_q.shape and got_k.shape == want_k.shape
            and torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5))


def fuse(model: nn.Module, *, experts: bool = True) -> list[str]:
    """Everything moetron speeds up in a transformers causal LM, in one call, no parameter touched: the experts
    (``experts_implementation="moetron"`` where transformers has the registry, else ``patch``), ``fuse_lm_loss``
    (where the model has an LM head), ``fuse_norms`` and ``fuse_rotary``. ``experts=False`` leaves the experts as
    they are (a dense model has none anyway). Returns what was done: "experts" (or the patched modules' names),
    "loss", the norms' names and the modeling files whose rotary was swapped. ``unfuse(model)`` undoes it."""
    _check_model(model)
    done = []
    if experts and any(_is_experts_module(m) for m in model.modules()):
        if hasattr(model, "set_experts_implementation") and is_registered():
            previous = getattr(getattr(model, "config", None), "_experts_implementation", None)
            model.__dict__.setdefault("_moetron_previous_experts", previous)
            model.set_experts_implementation(IMPLEMENTATION_NAME)
            done.append("experts")
        else:
            done += patch(model)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        fuse_lm_loss(model)
        done.append("loss")
    return done + fuse_norms(model) + fuse_rotary(model)


def unfuse(model: nn.Module) -> None:
    """Undo ``fuse``: the fusions, the patched experts modules, and the experts implementation the model had
    (where it had one by name)."""
    unfuse_lm_loss(model)
    unfuse_norms(model)
    unfuse_rotary(model)
    unpatch(model)
    previous = model.__dict__.pop("_moetron_previous_experts", None)
    if isinstance(previous, str):
        model.set_experts_implementation(previous)
