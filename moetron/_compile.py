"""How moetron's autograd Functions meet ``torch.compile``.

When it can, Dynamo traces a custom ``autograd.Function``'s forward and backward into its own graph. In PyTorch
2.11 that gives silently wrong gradients for a Function whose forward writes into a tensor it returns
(pytorch/pytorch#180642), which moetron's torch path does (``out.copy_``): on an H100 with torch 2.11 a compiled
block around ``MoELayer`` got zero expert gradients (torch 2.13, which CI runs, traces it correctly). The Triton
path was safe only by accident: its launches sit behind ``torch.compiler.disable`` (ops/_launch.py), so Dynamo
broke the graph inside the forward and ran the whole Function eagerly.

``eager_function`` makes that the rule for every moetron Function: moetron calls it through ``eager_apply``, a
``torch.compiler.disable``d twin of ``apply``, so a compiled region reaches it behind a graph break and the Function
runs and records autograd exactly as it does eagerly. (Disabling ``apply`` itself does nothing: Dynamo recognises
``SomeFunction.apply`` by its name and traces it regardless.) moetron's ops are opaque kernels either way, so the
compiled graph loses nothing it could fuse.
"""

import torch


def eager_function(cls: type) -> type:
    """Class decorator for a ``torch.autograd.Function``: adds ``cls.eager_apply``, which callers use instead of
    ``apply``; Dynamo runs it as an opaque eager call (a graph break) instead of tracing into forward and backward.
    Costs under a microsecond per call."""
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise TypeError(f"eager_function decorates torch.autograd.Function subclasses, got {cls!r}")
    cls.eager_apply = staticmethod(torch.compiler.disable(cls.apply))
    return cls
