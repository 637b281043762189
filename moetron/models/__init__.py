"""Models built on moetron's MoE layer: a decoder-only MoE transformer for ``moetron train``."""

from .transformer import PRESETS, ModelConfig, MoETransformer, preset

__all__ = ["ModelConfig", "MoETransformer", "PRESETS", "preset"]
