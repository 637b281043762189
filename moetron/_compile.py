"""How moetron's autograd Functions meet ``torch.compile``.

When it can, Dynamo traces a custom ``autograd.Function``'s forward and backward into its own graph. In PyTorch
2.11 that gives silently wrong gradients for a Function whose forward writes into a tensor it returns
(pytorch/pytorch#180642), which moetron's torch path does (``out.copy_``): on an H100 with torch 2.11 a compiled
block around ``MoELayer`` got zero expert gradients (torch 2.13, which CI runs, traces it correctly). The Triton
path was safe only by accident: its launches sit behind ``torch.compiler.disable`` (ops/_launch.py), so Dynamo
broke the graph inside the forward and ran the whole Function eagerly.

``eager_function`` makes that the rule for every moetron Function: moetron calls it through ``eager_apply``, a
``torch.compiler.disable``d twin of ``apply``, so a compiled region that reaches it breaks the graph there and the
Function runs and records autograd exactly as it does eagerly. (Disabling ``apply`` itself does nothing: Dynamo
recognises ``SomeFunction.apply`` by its name and traces it regardless.)

The ops an MoE layer runs (router GEMM and routing, the permutation's index kernels, permute / unpermute, gmm,
the gated activation, the aux-loss injection) avoid that break: while Dynamo traces (``compiling()``) they call
custom ops (``torch.library.custom_op``) whose backward is a second custom op, registered as the first one's autograd
formula. The graph then keeps them as opaque nodes, ``fullgraph=True`` holds for a training step, and CUDA graphs
(``mode="reduce-overhead"``) can capture forward and backward. Eagerly they keep their Functions, which cost less
host time per call than a custom op's dispatch. Both forms share one implementation of each forward and backward.
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


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or an empty tensor like ``like`` for None: a custom op returns tensors, so its backward op marks an
    input gradient it did not compute this way (the autograd formula returns None for it)."""
    return like.new_empty(0) if t is None else t


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (None allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compiling() -> bool:
    """Whether Dynamo is tracing the caller: moetron's public ops then call their custom-op form (an opaque node
    with a registered autograd formula, kept in the graph) instead of their Function (a graph break)."""
    return torch.compiler.is_compiling()
