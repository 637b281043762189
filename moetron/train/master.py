"""bf16 model weights with fp32 master copies: mixed-precision training without a weight cast per micro-step.

Under plain autocast every fp32 weight is cast to bf16 in every micro-step, and every bf16 weight gradient cast
back to fp32; on the earlier small preset (16 layers of 64 experts) those casts took ~9 ms of a ~80 ms micro-step
on the H100 (benchmarks/NOTES.md).
Here, as in Megatron-Core's mixed-precision optimizer:

- the model's matrices (embeddings, attention, dense MLPs, experts) are stored in bf16 and used as they are;
- each has an fp32 master copy, which the optimizer updates; ``publish()`` then rounds it back into the model;
- gradients accumulate in fp32 in the master's ``.grad``: the grouped GEMMs of the experts add their weight
  gradient straight into it (``gmm``'s ``main_grad`` fusion, no bf16 gradient at all); every other bf16 gradient
  is added by ``accumulate()`` after each micro-step's backward;
- vectors (norm weights, biases), the router weights and the token embeddings stay fp32 parameters: they are
  their own masters (the embedding keeps the residual stream in fp32, as under plain autocast).

The optimizer, gradient clipping and checkpoints see only the fp32 masters (``params``, ``state_dict_tensors``),
so a checkpoint holds fp32 weights whichever way it was trained, and resumes either way. Under expert parallelism
each master carries its parameter's gradient group (``moetron_grad_group``), so the trainer reduces the masters'
gradients over the same groups as the parameters' (moetron/train/distributed.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import GroupedExperts
from ..parallel import GRAD_GROUP_ATTR
from ..router import TopKRouter

__all__ = ["MasterWeights"]


class MasterWeights:
    """Converts ``model`` (fp32) in place (see the module docstring). ``params``: the tensors to optimize, one per
    trainable model parameter, in ``model.parameters()`` order: the fp32 master of each converted matrix, the
    parameter itself otherwise (parameters not stored in fp32 are left as they are)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
        self.model = model
        # the router computes in fp32 by design; an fp32 embedding keeps the residual stream fp32 (as it is
        # under plain autocast), and a lookup needs no cast anyway
        keep_fp32 = {id(p) for m in model.modules() if isinstance(m, (TopKRouter, nn.Embedding))
                     for p in m.parameters()}
        fused = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in (m.w1, m.down_proj)}
        self.params: list[torch.Tensor] = []
        self._low: list[nn.Parameter] = []  # bf16 model parameters
        self._high: list[nn.Parameter] = []  # their fp32 masters
        self._unfused_low: list[nn.Parameter] = []  # bf16 parameters whose gradient arrives in .grad
        self._unfused_high: list[nn.Parameter] = []
        self._own: list[nn.Parameter] = []  # parameters left as they are: their own masters
        self._master_of: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.dim() < 2 or id(p) in keep_fp32 or p.dtype != torch.float32:
                self.params.append(p)
                self._own.append(p)
                self._master_of[id(p)] = p
                continue
            master = nn.Parameter(p.detach().clone())
            master.grad = torch.zeros_like(master)
            if hasattr(p, GRAD_GROUP_ATTR):  # expert shards: reduced over the expert-DP group, not DP
                setattr(master, GRAD_GROUP_ATTR, getattr(p, GRAD_GROUP_ATTR))
            with torch.no_grad():
                p.data = p.data.to(dtype)
            if id(p) in fused:
                p.main_grad = master.grad  # gmm adds the weight gradient here and leaves p.grad None
            else:
                self._unfused_low.append(p)
                self._unfused_high.append(master)
            self._low.append(p)
            self._high.append(master)
            self.params.append(master)
            self._master_of[id(p)] = master

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer updates for model parameter ``p``: its fp32 master, or ``p`` itself."""
        return self._master_of.get(id(p), p)

    @property
    def autograd_params(self) -> list[nn.Parameter]:
        """Model parameters whose gradient autograd writes into ``.grad`` (all but the experts' GEMM weights)."""
        return self._own + self._unfused_low

    @torch.no_grad()
    def accumulate(self, keep_grads: bool = False) -> None:
        """After a micro-step's backward: add the bf16 ``.grad`` of every unfused matrix into its master's fp32
        gradient. ``keep_grads``: zero those ``.grad`` in place (a CUDA graph replays into the same tensors)
        instead of dropping them."""
        pairs = [(h.grad, p.grad) for p, h in zip(self._unfused_low, self._unfused_high) if p.grad is not None]
        if pairs:
            torch._foreach_add_([h for h, _ in pairs], [g for _, g in pairs])
        for p in self._unfused_low:
            if p.grad is not None:
                if keep_grads:
                    p.grad.zero_()
                else:
                    p.grad = None

    @torch.no_grad()
    def publish(self) -> None:
        """After the optimizer step: the updated masters, rounded, become the model's weights."""
        if self._low:
            torch._foreach_copy_([p.data for p in self._low], [h.detach() for h in self._high])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients: the masters' in place (the experts' GEMMs and a CUDA graph hold on to them); the
        fp32 parameters that are their own masters as ``Optimizer.zero_grad(set_to_none)`` would."""
        grads = [h.grad for h in self._high]
        if grads:
            torch._foreach_zero_(grads)
        for p in self._own:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict_tensors(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 masters in place of the bf16 weights (tied names share one)."""
        out = dict(self.model.state_dict())
        detached: dict[int, torch.Tensor] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) not in detached:
                detached[id(p)] = self._master_of.get(id(p), p).detach()
            out[name] = detached[id(p)]  # one object per parameter: checkpoint.save stores tied names once
        return out
