"""Checkpoint conversion between Hugging Face per-expert safetensors and moetron's model (``moetron convert``).

Legend: E routed experts, F expert ffn, H hidden, L layers, i a layer index, e an expert id.

Hugging Face checkpoints on disk keep one matrix per expert (transformers v5 merges them at load time and splits
them again in ``save_pretrained``); moetron's model (moetron/models/transformer.py, the ``moetron train`` model)
keeps each MoE layer's experts stacked in the transformers v5 layout, and otherwise uses Hugging Face Qwen3-MoE
names. So only the MoE tensors of each MoE layer change:

    Hugging Face (per expert)                                       moetron (stacked, key = global expert id)
    {moe}.gate.weight                                [E, H]         model.layers.i.mlp.router.weight
    {moe}.gate.e_score_correction_bias (DeepSeek)    [E]            model.layers.i.mlp.router.expert_bias
    {moe}.experts.{e}.{gate}.weight                  [F, H]  ┐
    {moe}.experts.{e}.{up}.weight                    [F, H]  ┴─►    model.layers.i.mlp.experts.gate_up_proj [E,2F,H]
    {moe}.experts.{e}.{down}.weight                  [H, F]  ──►    model.layers.i.mlp.experts.down_proj    [E,H,F]
    {moe}.shared_experts.{gate,up,down}_proj.weight (DeepSeek)      model.layers.i.mlp.shared_experts.(same names)

    {moe} = model.layers.i.block_sparse_moe, {gate, up, down} = w1, w3, w2   (Mixtral)
    {moe} = model.layers.i.mlp,              {gate, up, down} = gate_proj, up_proj, down_proj  (Qwen3-MoE, OLMoE,
                                                                                                DeepSeek-V3)

Every other tensor keeps its name, dtype and bytes (embeddings, attention, norms, dense MLPs of non-MoE layers,
``lm_head``). Tensors are never cast: stacking and splitting copy bytes, so HF -> moetron -> HF gives back every
tensor bit for bit.

What moetron's model can run (``hf_to_moetron`` returns a ModelConfig for it):

- Qwen3-MoE (per-head q/k norm, dense layers from ``mlp_only_layers`` / ``decoder_sparse_step``), Mixtral and
  OLMoE (q/k norm over all heads at once, ``ModelConfig.qk_norm_per_head=False``): the whole model.
- DeepSeek-V3: the MoE side maps fully (routed experts, sigmoid router with ``e_score_correction_bias``, group-
  limited routing, ``routed_scaling_factor``, shared experts, ``first_k_dense_replace`` dense layers). Its multi-head
  latent attention (``self_attn.q_a_proj``, ``kv_a_proj_with_mqa``, ...) and any multi-token-prediction layers past
  ``num_hidden_layers`` have no counterpart in moetron's model: they are carried verbatim under their Hugging Face
  names (listed as ``carried`` in moetron_config.json) and come back unchanged; ``MoETransformer`` cannot load
  them (the returned ModelConfig's attention fields are nominal for this architecture).

On-disk formats (``convert(src, dst, ...)`` and ``moetron convert --from F --to T SRC DST``):

- ``hf``: a Hugging Face folder: ``config.json`` and ``model.safetensors`` or sharded ``model-0000k-of-0000n.
  safetensors`` with ``model.safetensors.index.json``. Other files (tokenizer, generation config) are copied.
- ``moetron``: ``model.safetensors`` (sharded the same way when large) and ``moetron_config.json`` holding the
  ModelConfig, the Hugging Face config it came from, and the carried keys. A ``moetron train`` checkpoint folder
  (runs/NAME/checkpoints/step_N, config in runs/NAME/config.json) is read too.
- ``dcp``: a torch.distributed.checkpoint folder of moetron's state dict, expert tensors global ``[E, ...]``, so it
  loads at any expert-parallel size (``moetron.parallel.load_checkpoint`` reads each rank's experts) and an
  expert-parallel model saves back into it (``moetron.parallel.save_checkpoint``), which converts back to HF.

Everything is read into host memory at once (about the checkpoint's size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import warnings

import torch

__all__ = ["ARCHITECTURES", "FORMATS", "model_config_from_hf", "hf_config_from_moetron", "hf_to_moetron",
           "moetron_to_hf", "carried_keys", "load_hf", "save_hf", "load_moetron", "save_moetron", "load_dcp",
           "save_dcp", "convert", "main", "build_parser"]

ARCHITECTURES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")
FORMATS = ("hf", "moetron", "dcp")
MOETRON_CONFIG = "moetron_config.json"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"

# per architecture: the MoE block's prefix in each layer and the per-expert matrix names (gate, up, down)
_LAYOUT = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


def _config_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    to_dict = getattr(hf_config, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"hf_config must be a dict (config.json) or a transformers PretrainedConfig, got "
                        f"{type(hf_config).__name__}")
    return to_dict()


def _arch(hf: dict) -> str:
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"hf_config['model_type'] must be one of {ARCHITECTURES}, got {arch!r}")
    return arch


def _need(hf: dict, key: str, arch: str):
    """hf[key], or the first present of its aliases (transformers v5 writes num_local_experts for num_experts)."""
    names = _ALIASES.get(key, (key,))
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ValueError(f"hf_config must have {' or '.join(map(repr, names))} for model_type {arch!r}, got none")


_ALIASES = {
    "num_experts": ("num_experts", "num_local_experts"),
    "num_local_experts": ("num_local_experts", "num_experts"),
    "n_routed_experts": ("n_routed_experts", "num_local_experts", "num_experts"),
}


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta or hf.get("rope_theta") or 10000.0)


def _layer_pattern(hf: dict, num_layers: int) -> tuple[int, int]:
    """(first_k_dense, moe_layer_freq) reproducing Qwen3-MoE's mlp_only_layers / decoder_sparse_step."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    moe = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    if not moe:
        return num_layers, 1
    first = moe[0]
    freq = moe[1] - moe[0] if len(moe) > 1 else 1
    pattern = [i for i in range(num_layers) if i >= first and (i - first) % freq == 0]
    if pattern != moe:
        raise ValueError(f"hf_config's MoE layers {moe} (from mlp_only_layers={sorted(dense)}, "
                         f"decoder_sparse_step={step}) must be a regular pattern (first_k_dense dense layers, then "
                         "every moe_layer_freq-th layer) for moetron's model")
    return first, freq


def model_config_from_hf(hf_config):
    """The moetron ModelConfig of a Hugging Face config (dict or PretrainedConfig) of ``ARCHITECTURES``."""
    from ..models.transformer import ModelConfig

    hf = _config_dict(hf_config)
    arch = _arch(hf)
    L = _need(hf, "num_hidden_layers", arch)
    H, N = _need(hf, "hidden_size", arch), _need(hf, "num_attention_heads", arch)
    common = dict(vocab_size=_need(hf, "vocab_size", arch), hidden_size=H, num_layers=L, num_heads=N,
                  num_kv_heads=hf.get("num_key_value_heads") or N,
                  max_seq_len=hf.get("max_position_embeddings") or 4096, rope_theta=_rope_theta(hf),
                  rms_norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  top_k=_need(hf, "num_experts_per_tok", arch), load_balancing=("none",))
    if hf.get("head_dim"):
        common["head_dim"] = hf["head_dim"]
    if arch == "qwen3_moe":
        first, freq = _layer_pattern(hf, L)
        return ModelConfig(**common, qk_norm=True, num_experts=_need(hf, "num_experts", arch),
                           moe_ffn_hidden_size=_need(hf, "moe_intermediate_size", arch),
                           dense_ffn_hidden_size=hf.get("intermediate_size"), first_k_dense=first, moe_layer_freq=freq,
                           pre_softmax=True, norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if arch == "mixtral":
        return ModelConfig(**common, qk_norm=False, num_experts=_need(hf, "num_local_experts", arch),
                           moe_ffn_hidden_size=_need(hf, "intermediate_size", arch), pre_softmax=False)
    if arch == "olmoe":
        if hf.get("clip_qkv") is not None:
            warnings.warn(f"OLMoE clip_qkv={hf['clip_qkv']} has no counterpart in moetron's model: the weights convert "
                          "exactly, but MoETransformer computes attention without the clipping", stacklevel=3)
        return ModelConfig(**common, qk_norm=True, qk_norm_per_head=False, num_experts=_need(hf, "num_experts", arch),
                           moe_ffn_hidden_size=_need(hf, "intermediate_size", arch), pre_softmax=True,
                           norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    # deepseek_v3: the attention fields are nominal (MLA is carried verbatim)
    F = _need(hf, "moe_intermediate_size", arch)
    common["head_dim"] = (hf.get("qk_nope_head_dim") or 0) + (hf.get("qk_rope_head_dim") or 0) or H // N
    groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
    extra = {"scaling_factor": float(hf.get("routed_scaling_factor") or 1.0)}
    if groups > 1:
        extra.update(num_groups=groups, group_topk=group_topk)
        K = _need(hf, "num_experts_per_tok", arch)
        if K // group_topk != 2:
            warnings.warn(f"DeepSeek-V3 scores an expert group by its top 2 experts, moetron by its top top_k // "
                          f"topk_group = {K // group_topk}: the weights convert exactly, but moetron's router can pick "
                          "other groups", stacklevel=3)
    shared = hf.get("n_shared_experts") or 0
    return ModelConfig(**common, qk_norm=False, num_experts=_need(hf, "n_routed_experts", arch),
                       moe_ffn_hidden_size=F, dense_ffn_hidden_size=hf.get("intermediate_size"),
                       first_k_dense=hf.get("first_k_dense_replace") or 0, moe_layer_freq=hf.get("moe_layer_freq") or 1,
                       shared_expert_ffn_hidden_size=F * shared if shared else None, score_function="sigmoid",
                       expert_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob", True)), moe_extra=extra)


def hf_config_from_moetron(config, model_type: str = "qwen3_moe") -> dict:
    """A Hugging Face config.json (as a dict) for a moetron ModelConfig, for checkpoints that did not come from
    Hugging Face (``moetron train`` runs). Only ``"qwen3_moe"`` (moetron's model is Qwen3-MoE shaped)."""
    from ..models.transformer import ModelConfig

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a moetron ModelConfig, got {type(config).__name__}")
    if model_type != "qwen3_moe":
        raise ValueError(f"model_type must be 'qwen3_moe' (moetron's model is Qwen3-MoE shaped), got {model_type!r}")
    c = config
    problems = []
    if not (c.qk_norm and c.qk_norm_per_head):
        problems.append("qk_norm=True with qk_norm_per_head=True")
    if c.score_function != "softmax" or c.expert_bias:
        problems.append("score_function='softmax' without expert_bias")
    if c.shared_expert_ffn_hidden_size is not None:
        problems.append("no shared expert")
    if c.pre_softmax and c.norm_topk_prob and c.top_k > 1:
        norm = True
    elif c.pre_softmax:
        norm = False
    else:
        norm = True  # softmax over the k selected logits == softmax over all E, top-k, renormalised
    if problems:
        raise ValueError(f"config must have {', '.join(problems)} to be written as Qwen3-MoE, got {c}")
    dense = [i for i in range(c.num_layers) if not c.is_moe_layer(i)]
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}, "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings, "num_experts": c.num_experts,
        "num_experts_per_tok": c.top_k, "moe_intermediate_size": c.moe_ffn_hidden_size,
        "intermediate_size": c.dense_ffn_hidden_size, "decoder_sparse_step": 1, "mlp_only_layers": dense,
        "norm_topk_prob": norm, "hidden_act": "silu", "attention_bias": False, "router_aux_loss_coef": c.aux_loss_coeff,
    }


# ---------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------


def _check_shape(key: str, t: torch.Tensor, expected: tuple, what: str):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"state_dict[{key!r}] must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def _pop(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"state_dict is missing {key!r} ({what})")
    return sd.pop(key)


def hf_to_moetron(state_dict: dict, hf_config):
    """Hugging Face per-expert state dict -> (ModelConfig, moetron state dict). Tensors are not cast; the input is
    not modified. Raises ValueError naming the key for missing, unexpected or mis-shaped expert tensors."""
    hf = _config_dict(hf_config)
    arch = _arch(hf)
    cfg = model_config_from_hf(hf)
    moe_name, (g_name, u_name, d_name) = _LAYOUT[arch]
    sd = dict(state_dict)
    out = {}
    E, F, H = cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    for i in range(cfg.num_layers):
        src = f"model.layers.{i}.{moe_name}."
        dst = f"model.layers.{i}.mlp."
        if not cfg.is_moe_layer(i):
            stray = [k for k in sd if k.startswith(src + "experts.") or k == src + "gate.weight"]
            if stray:
                raise ValueError(f"state_dict has MoE tensors in layer {i}, which hf_config makes dense: {stray[:3]}")
            continue
        what = f"router of MoE layer {i} of {arch}"
        router = _pop(sd, src + "gate.weight", what)
        _check_shape(src + "gate.weight", router, (E, H), f"[E, H], {what}")
        out[dst + "router.weight"] = router
        if arch == "deepseek_v3":
            bias = _pop(sd, src + "gate.e_score_correction_bias", f"expert bias of MoE layer {i}")
            _check_shape(src + "gate.e_score_correction_bias", bias, (E,), "[E]")
            out[dst + "router.expert_bias"] = bias
        gate_up = down = None
        for e in range(E):
            what = f"expert {e} of {E} in MoE layer {i} of {arch}"
            g = _pop(sd, f"{src}experts.{e}.{g_name}.weight", what)
            u = _pop(sd, f"{src}experts.{e}.{u_name}.weight", what)
            d = _pop(sd, f"{src}experts.{e}.{d_name}.weight", what)
            _check_shape(f"{src}experts.{e}.{g_name}.weight", g, (F, H), f"[F, H], {what}")
            _check_shape(f"{src}experts.{e}.{u_name}.weight", u, (F, H), f"[F, H], {what}")
            _check_shape(f"{src}experts.{e}.{d_name}.weight", d, (H, F), f"[H, F], {what}")
            if gate_up is None:
                if len({g.dtype, u.dtype, d.dtype}) != 1:
                    raise ValueError(f"state_dict: the matrices of {what} must share one dtype, got {g.dtype}, "
                                     f"{u.dtype}, {d.dtype}")
                gate_up = torch.empty(E, 2 * F, H, dtype=g.dtype)
                down = torch.empty(E, H, F, dtype=d.dtype)
            for name, t in ((g_name, g), (u_name, u), (d_name, d)):
                if t.dtype != gate_up.dtype:
                    raise ValueError(f"state_dict[{src}experts.{e}.{name}.weight] must have the dtype of expert 0 "
                                     f"({gate_up.dtype}), got {t.dtype}")
            gate_up[e, :F].copy_(g)
            gate_up[e, F:].copy_(u)
            down[e].copy_(d)
        out[dst + "experts.gate_up_proj"] = gate_up
        out[dst + "experts.down_proj"] = down
        if cfg.shared_expert_ffn_hidden_size is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                key = f"{src}shared_experts.{name}.weight"
                out[f"{dst}shared_experts.{name}.weight"] = _pop(sd, key, f"shared expert of MoE layer {i}")
        stray = [k for k in sd if k.startswith(src + "experts.") or k.startswith(src + "gate.")]
        if stray:
            raise ValueError(f"state_dict has unexpected MoE tensors in layer {i} (hf_config says E={E} experts): "
                             f"{sorted(stray)[:3]}")
    out.update(sd)  # everything else keeps its name, dtype and bytes
    return cfg, out


def moetron_to_hf(state_dict: dict, config, hf_config) -> dict:
    """moetron state dict -> Hugging Face per-expert state dict (the inverse of ``hf_to_moetron``). ``config`` is
    the moetron ModelConfig; ``hf_config`` the Hugging Face config to write for (its model_type decides the names).
    Tensors are not cast; each per-expert matrix is a copy of its slice."""
    from ..models.transformer import ModelConfig

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a moetron ModelConfig, got {type(config).__name__}")
    hf = _config_dict(hf_config)
    arch = _arch(hf)
    moe_name, (g_name, u_name, d_name) = _LAYOUT[arch]
    sd = dict(state_dict)
    out = {}
    E, F, H = config.num_experts, config.moe_ffn_hidden_size, config.hidden_size
    for i in range(config.num_layers):
        if not config.is_moe_layer(i):
            continue
        src = f"model.layers.{i}.mlp."
        dst = f"model.layers.{i}.{moe_name}."
        router = _pop(sd, src + "router.weight", f"router of MoE layer {i}")
        _check_shape(src + "router.weight", router, (E, H), "[E, H]")
        out[dst + "gate.weight"] = router
        bias = sd.pop(src + "router.expert_bias", None)
        if arch == "deepseek_v3":
            if bias is None:
                raise ValueError(f"state_dict is missing {src + 'router.expert_bias'!r} (DeepSeek-V3's "
                                 "e_score_correction_bias)")
            out[dst + "gate.e_score_correction_bias"] = bias
        elif bias is not None:
            raise ValueError(f"state_dict has {src + 'router.expert_bias'!r}, which {arch} has no place for")
        gate_up = _pop(sd, src + "experts.gate_up_proj", f"experts of MoE layer {i}")
        down = _pop(sd, src + "experts.down_proj", f"experts of MoE layer {i}")
        _check_shape(src + "experts.gate_up_proj", gate_up, (E, 2 * F, H), "[E, 2F, H]")
        _check_shape(src + "experts.down_proj", down, (E, H, F), "[E, H, F]")
        for e in range(E):
            out[f"{dst}experts.{e}.{g_name}.weight"] = gate_up[e, :F].clone()
            out[f"{dst}experts.{e}.{u_name}.weight"] = gate_up[e, F:].clone()
            out[f"{dst}experts.{e}.{d_name}.weight"] = down[e].clone()
        for name in ("gate_proj", "up_proj", "down_proj", "gate"):
            key = f"{src}shared_experts.{name}.weight"
            if key in sd:
                if arch != "deepseek_v3" or name == "gate":
                    raise ValueError(f"state_dict has {key!r}, which {arch} has no place for")
                out[f"{dst}shared_experts.{name}.weight"] = sd.pop(key)
        stray = [k for k in sd if k.startswith(src + "experts.") or k.startswith(src + "router.")]
        if stray:
            raise ValueError(f"state_dict has unexpected MoE tensors in layer {i}: {sorted(stray)[:3]}")
    if hf.get("tie_word_embeddings") and "lm_head.weight" in sd and "model.embed_tokens.weight" in sd:
        if torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
            del sd["lm_head.weight"]  # Hugging Face stores tied embeddings once
    out.update(sd)
    return out


def carried_keys(state_dict: dict, config) -> list[str]:
    """Keys of a moetron state dict that ``MoETransformer(config)`` has no tensor of that shape for (DeepSeek-V3's
    attention, multi-token-prediction layers): carried verbatim by the conversion."""
    from ..models.transformer import MoETransformer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoETransformer(config).state_dict().items()}
    return sorted(k for k, v in state_dict.items() if expected.get(k) != tuple(v.shape))


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _parse_size(text) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be a byte count such as 5GB or 500MB, got {text!r}")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _read_safetensors(folder: str, what: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(folder, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, _SINGLE)):
        files = [_SINGLE]
    else:
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{what} must be a folder with {_SINGLE} or {_INDEX}, got {folder!r} without safetensors")
    sd = {}
    for name in files:
        part = load_file(os.path.join(folder, name))
        dup = set(part) & set(sd)
        if dup:
            raise ValueError(f"{what}: tensor {sorted(dup)[0]!r} appears in more than one shard of {folder!r}")
        sd.update(part)
    return sd


def _write_safetensors(sd: dict, folder: str, max_shard_size) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index when over max_shard_size (in key order)."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for key in sorted(sd):
        t = sd[key].contiguous()
        n = t.numel() * t.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, _SINGLE), metadata={"format": "pt"})
        return [_SINGLE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(folder, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names


def _is_weight_file(name: str) -> bool:
    return (name.endswith(".safetensors") or name in (_INDEX, "config.json", MOETRON_CONFIG, ".metadata")
            or name.endswith(".distcp") or name in ("manifest.json", "train_state.pt"))


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, generation config and other non-weight files travel along."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not _is_weight_file(name):
            shutil.copy2(path, os.path.join(dst, name))


def load_hf(path: str):
    """(state_dict, hf_config dict) of a Hugging Face folder."""
    if not os.path.isdir(path):
        raise ValueError(f"src must be a Hugging Face model folder, got {path!r} (not a folder)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"src must be a Hugging Face model folder with config.json, got {path!r} without one")
    with open(cfg_path) as f:
        hf = json.load(f)
    return _read_safetensors(path, "src"), hf


def save_hf(state_dict: dict, hf_config, path: str, *, max_shard_size="5GB") -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config_dict(hf_config), f, indent=2, sort_keys=True)
    _write_safetensors(state_dict, path, max_shard_size)


def _meta(config, hf_config, carried) -> dict:
    return {"format": "moetron", "model": config.to_dict(), "hf_config": hf_config, "carried": carried}


def _read_meta(path: str, what: str, config_path: str | None = None):
    """(ModelConfig, hf_config or None) from ``config_path`` when given (a moetron_config.json or a ``moetron train``
    run's config.json), else from the folder's moetron_config.json, else from the run folder around a ``moetron
    train`` checkpoint."""
    from ..models.transformer import ModelConfig

    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ValueError(f"config must be a moetron_config.json or a run's config.json, got {config_path!r} "
                             "(no such file)")
        with open(config_path) as f:
            meta = json.load(f)
        if "model" not in meta:
            raise ValueError(f"config must hold a 'model' entry (a moetron_config.json or a run's config.json), got "
                             f"{config_path!r} with keys {sorted(meta)}")
        return ModelConfig.from_dict(meta["model"]), meta.get("hf_config")
    meta_path = os.path.join(path, MOETRON_CONFIG)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return ModelConfig.from_dict(meta["model"]), meta.get("hf_config")
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
    if os.path.isfile(run_config):  # runs/NAME/checkpoints/step_N
        with open(run_config) as f:
            saved = json.load(f)
        if "model" in saved:
            return ModelConfig.from_dict(saved["model"]), None
    raise ValueError(f"{what} must be a moetron folder with {MOETRON_CONFIG} (or a `moetron train` checkpoint "
                     f"folder), or config must name one, got {path!r} without one")


def load_moetron(path: str, config_path: str | None = None):
    """(state_dict, ModelConfig, hf_config or None) of a moetron safetensors folder or a ``moetron train``
    checkpoint folder (``config_path``: see ``convert``)."""
    if not os.path.isdir(path):
        raise ValueError(f"src must be a moetron checkpoint folder, got {path!r} (not a folder)")
    config, hf = _read_meta(path, "src", config_path)
    return _read_safetensors(path, "src"), config, hf


def save_moetron(state_dict: dict, config, path: str, *, hf_config=None, max_shard_size="5GB") -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MOETRON_CONFIG), "w") as f:
        json.dump(_meta(config, hf_config, carried_keys(state_dict, config)), f, indent=2)
    _write_safetensors(state_dict, path, max_shard_size)


def save_dcp(state_dict: dict, config, path: str, *, hf_config=None) -> None:
    """A torch.distributed.checkpoint folder of the (global) moetron state dict, from one process; it loads at any
    expert-parallel size with ``moetron.parallel.load_checkpoint``."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(path, exist_ok=True)
    with _quiet_single_process():
        dcp.save({k: v.contiguous() for k, v in state_dict.items()}, checkpoint_id=path, no_dist=True)
    with open(os.path.join(path, MOETRON_CONFIG), "w") as f:
        json.dump(_meta(config, hf_config, carried_keys(state_dict, config)), f, indent=2)


def load_dcp(path: str, config_path: str | None = None):
    """(state_dict of global tensors, ModelConfig, hf_config or None) of a torch.distributed.checkpoint folder
    written by ``save_dcp`` or by ``moetron.parallel.save_checkpoint`` at any expert-parallel size (expert tensors
    are stored by global expert id). One process. ``config_path``: see ``convert``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"src must be a torch.distributed.checkpoint folder (with .metadata), got {path!r}")
    config, hf = _read_meta(path, "src", config_path)
    meta = dcp.FileSystemReader(path).read_metadata()
    sd = {}
    for key, m in meta.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            sd[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    with _quiet_single_process():
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd, config, hf


class _quiet_single_process(warnings.catch_warnings):
    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        return out


# ---------------------------------------------------------------------------------------------------------
# Whole conversions and the command line
# ---------------------------------------------------------------------------------------------------------


def convert(src: str, dst: str, *, src_format: str = "hf", dst_format: str = "moetron", model_type: str | None = None,
            max_shard_size="5GB", overwrite: bool = False, config_path: str | None = None) -> dict:
    """Convert the checkpoint folder ``src`` (``src_format``) into a new folder ``dst`` (``dst_format``), formats
    from ``FORMATS``. Writing ``hf`` from a moetron checkpoint without a stored Hugging Face config needs
    ``model_type`` ("qwen3_moe"). ``config_path`` names the moetron config of a moetron/dcp ``src`` that holds none
    (a folder written by ``moetron.parallel.save_checkpoint``): a moetron_config.json or a run's config.json.
    Returns a summary: tensors written, carried keys, the ModelConfig as a dict."""
    for name, value in (("src_format", src_format), ("dst_format", dst_format)):
        if value not in FORMATS:
            raise ValueError(f"{name} must be one of {FORMATS}, got {value!r}")
    if src_format == dst_format:
        raise ValueError(f"dst_format must differ from src_format, got {dst_format!r} for both")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"dst must be another folder than src, got {dst!r} for both")
    if os.path.exists(dst) and os.listdir(dst):
        if not overwrite:
            raise ValueError(f"dst must be a new or empty folder, got {dst!r}, which holds files (pass overwrite)")
        shutil.rmtree(dst)

    if src_format == "hf":
        hf_sd, hf = load_hf(src)
        config, sd = hf_to_moetron(hf_sd, hf)
    elif src_format == "moetron":
        sd, config, hf = load_moetron(src, config_path)
    else:
        sd, config, hf = load_dcp(src, config_path)

    os.makedirs(dst, exist_ok=True)
    carried = carried_keys(sd, config)
    if dst_format == "hf":
        if hf is None:
            if model_type is None:
                raise ValueError(f"model_type must be given to write Hugging Face files from {src!r}, which holds no "
                                 "Hugging Face config (a `moetron train` checkpoint); use 'qwen3_moe'")
            hf = hf_config_from_moetron(config, model_type)
        out = moetron_to_hf(sd, config, hf)
        save_hf(out, hf, dst, max_shard_size=max_shard_size)
        written = len(out)
    elif dst_format == "moetron":
        save_moetron(sd, config, dst, hf_config=hf, max_shard_size=max_shard_size)
        written = len(sd)
    else:
        save_dcp(sd, config, dst, hf_config=hf)
        written = len(sd)
    _copy_side_files(src, dst)
    return {"tensors": written, "carried": carried, "model": config.to_dict()}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``moetron convert`` arguments (added to ``parser`` when given, e.g. a subcommand's parser)."""
    p = parser or argparse.ArgumentParser(prog="moetron convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint folder to read")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--from", dest="src_format", choices=FORMATS, default="hf",
                   help="format of SRC: hf (Hugging Face safetensors), moetron (safetensors + moetron_config.json, "
                        "or a moetron train checkpoint), dcp (torch.distributed.checkpoint, any EP size)")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, default="moetron", help="format of DST")
    p.add_argument("--model-type", default=None, choices=["qwen3_moe"],
                   help="Hugging Face architecture to write when SRC holds no Hugging Face config")
    p.add_argument("--config", dest="config_path", default=None,
                   help="moetron_config.json or a run's config.json, for a moetron/dcp SRC that holds none")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it holds files")
    return p


def run(args) -> int:
    summary = convert(args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format,
                      model_type=args.model_type, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      config_path=args.config_path)
    print(f"wrote {summary['tensors']} tensors to {args.dst} ({args.dst_format})")
    if summary["carried"]:
        shown = ", ".join(summary["carried"][:4]) + (" ..." if len(summary["carried"]) > 4 else "")
        print(f"carried verbatim (no place in moetron's model): {len(summary['carried'])} tensors: {shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError) as e:
        print(f"moetron convert: error: {e}", file=sys.stderr)
        return 2
