"""Integrations with other libraries. Nothing here is imported by ``import moetron``.

- ``moetron.integrations.hf``: the "moetron" experts implementation for Hugging Face transformers v5 (registered
  on import when transformers is installed), and ``patch``/``unpatch`` for models without that registry.
- ``moetron.integrations.convert``: Hugging Face per-expert safetensors <-> moetron's model (``moetron convert``).
"""
