"""One training micro-step (forward under autocast, then the backward into the gradients) captured in a CUDA graph.

Why: on the earlier small preset the Python that issues a micro-step (16 layers of router, permutation, grouped
GEMMs, norms and their autograd nodes) took longer on the host than the GPU took to run it (125 ms of host time for
87 ms of kernels on an H100, benchmarks/NOTES.md). A replay issues the whole micro-step in one call.

It works because nothing in the model syncs with the host and no shape depends on the routing: the dropless MoE
layer keeps all T·K routed rows in fixed-size buffers and passes the group sizes to the kernels on the device.

Semantics match the eager micro-step: the captured backward adds into gradients that exist before the capture, so
micro-batches accumulate, and ``zero_grad(set_to_none=False)`` clears them in place. The warm-up iterations that
precede the capture are undone (gradients zeroed, the model's buffers, such as the routers' token counters,
restored, and the RNG states put back: the warm-up and the capture consume no random numbers, so a run resumed
from a checkpoint, which captures again, continues bitwise as the uninterrupted run; tests/test_train.py's
resume test with input jitter checks it on a GPU). The router's input jitter, if on, draws different random numbers
than an eager run would (a captured RNG op takes its offsets from the graph).
"""

from __future__ import annotations

import torch

__all__ = ["GraphedMicroStep"]


class GraphedMicroStep:
    """``step(x, y) -> loss``: copies the token batch ``x``, ``y`` (``[B, S]`` int, same shape every call) into the
    graph's inputs, replays forward + ``(loss / loss_div).backward()``, and returns the micro-batch's mean loss (a
    0-d tensor the next replay overwrites: read or accumulate it before calling again).

    ``model`` must be a CUDA model in train mode that never syncs with the host (under torchrun: MoE layers with
    the allgather or fused dispatcher; their NCCL collectives are captured too) whose parameters' ``.grad`` are
    None or tensors that are cleared in place from now on. ``grad_params``: the parameters that get a ``.grad``
    (default: all); ``after_backward()`` runs (and is captured) after each backward. Whatever ``after_backward``
    accumulates elsewhere during the warm-up and capture is the caller's to clear. ``moe_layers``:
    ``model.moe_layers()``; after each replay every layer's ``last_stats`` again points at the graph's statistics
    (an eager forward, such as an evaluation, replaces it).
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_div: float,
                 autocast_dtype: torch.dtype | None, moe_layers, warmup: int = 2, grad_params=None,
                 after_backward=None):
        if not x.is_cuda:
            raise ValueError(f"x must be on a CUDA device to capture a CUDA graph, got {x.device}")
        self.model = model
        self.loss_div = float(loss_div)
        self.autocast_dtype = autocast_dtype
        self.moe_layers = [layer for _, layer in moe_layers]
        self.after_backward = after_backward  # captured too (moetron.train.master: fold .grad into fp32)
        self.x, self.y = x.clone(), y.clone()
        # the parameters autograd writes a .grad for (default: all that require grad)
        params = list(grad_params) if grad_params is not None else [p for p in model.parameters() if p.requires_grad]
        # the captured backward must add into existing gradients (see the module docstring); gradients that exist
        # already are saved (a copy), the ones made here only need zeroing afterwards
        saved_grads = [None if p.grad is None else p.grad.clone() for p in params]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved_buffers = {name: b.clone() for name, b in model.named_buffers()}
        saved_rng = torch.get_rng_state(), torch.cuda.get_rng_state(x.device)
        try:
            side = torch.cuda.Stream(x.device)  # warm-up off the default stream, as torch.cuda.graph asks
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._micro_step()
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._micro_step()
            self.stats = [layer.last_stats for layer in self.moe_layers]
        finally:
            with torch.no_grad():  # undo the warm-up (also when the capture failed): only the replays count
                for p, g in zip(params, saved_grads):
                    if g is None:
                        p.grad.zero_()
                    else:
                        p.grad.copy_(g)
                for name, b in model.named_buffers():
                    b.copy_(saved_buffers[name])
            torch.set_rng_state(saved_rng[0])
            torch.cuda.set_rng_state(saved_rng[1], x.device)

    def _micro_step(self) -> torch.Tensor:
        if self.autocast_dtype is not None:
            # autocast's weight-cast cache would keep tensors from the capture alive across replays: off
            with torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False):
                loss = self.model(self.x, self.y)
        else:
            loss = self.model(self.x, self.y)
        (loss / self.loss_div).backward()
        if self.after_backward is not None:
            self.after_backward()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"x and y must keep the captured shapes {tuple(self.x.shape)} and {tuple(self.y.shape)}"
                             f", got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        for layer, stats in zip(self.moe_layers, self.stats):
            layer.last_stats = stats
        return self.loss
