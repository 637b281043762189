"""Process-wide switches read from the environment at call time (never cached, so tests can flip them).

- ``MOETRON_DEBUG=1``: run the checks that need a host sync (for example, that group sizes held on the GPU
  are non-negative and add up to at most M). Off by default because a sync on the hot path costs latency and
  breaks CUDA-graph capture. With it off, invalid sizes on the GPU are clamped, so kernels never touch
  memory out of bounds, but the result for such input is unspecified.
- ``MOETRON_FOLD_PERMUTE=0``: at inference the single-process MoE layer permutes its token rows into a buffer
  before the expert GEMMs instead of letting the first GEMM gather them (moetron/ops/routed_experts.py). For A/B
  measurements; the default folds.
- ``MOETRON_FUSE_GRAD_ACCUMULATION=0``: a grouped GEMM's backward leaves a weight gradient to autograd's own
  accumulation even where ``w.grad`` already holds one (see ``moetron/ops/gmm.py``, ``_grad_to_add_into``). For
  A/B measurements and as an escape hatch; the default adds the gradient into ``w.grad`` in the weight-gradient
  kernel.
- ``MOETRON_BACKEND``: ``auto`` (default), ``triton`` or ``torch``. ``auto`` runs Triton kernels on CUDA
  tensors and plain PyTorch on CPU tensors. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before
  Triton is imported; the test suite uses it to check kernel logic without a GPU.
"""

import os

_BACKENDS = ("auto", "triton", "torch")


def debug_checks_enabled() -> bool:
    return os.environ.get("MOETRON_DEBUG", "0") not in ("", "0", "false", "False")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend() -> str:
    value = os.environ.get("MOETRON_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"MOETRON_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


def use_triton(t) -> bool:
    """Whether an op on tensor ``t`` runs its Triton kernels (see MOETRON_BACKEND above)."""
    choice = backend()
    if choice == "torch":
        return False
    if t.is_cuda:
        return True
    if choice == "triton":
        if not triton_interpreter_enabled():
            raise RuntimeError("MOETRON_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "triton is imported")
        return True
    return False


def fold_permute_enabled() -> bool:
    return os.environ.get("MOETRON_FOLD_PERMUTE", "1") not in ("", "0", "false", "False")


def fuse_grad_accumulation_enabled() -> bool:
    return os.environ.get("MOETRON_FUSE_GRAD_ACCUMULATION", "1") not in ("", "0", "false", "False")
