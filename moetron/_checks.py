"""Argument checks shared by the ops. Each raises TypeError or ValueError whose message names the argument,
what was expected and what was received, so kernels only ever see validated shapes."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

# The floating-point dtypes the kernels take (inputs and outputs).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_int(v) -> bool:
    """A real Python int (bools excluded), for config validation."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite int or float (bools excluded), for config validation."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_error(config: str, field: str, expected: str, got) -> ValueError:
    """The error a config dataclass raises for a bad field: names the field, what was expected and what came."""
    return ValueError(f"{config}.{field} must be {expected}, got {got!r}")


def config_from_dict(cls, d: dict):
    """``cls(**d)`` for a config dataclass, with an error naming the keys it does not know (a config.json written by
    another version, say) instead of a TypeError from the constructor."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; known fields: {sorted(names)}")
    return cls(**d)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def is_mixed_precision_weight(w_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """An fp32 GEMM weight for fp16/bf16 x: the GEMM runs on a copy of the weight in x's dtype, and the weight's
    gradient comes out in fp32 (moetron.gmm)."""
    return w_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)


def check_weight_dtype(name: str, w: torch.Tensor, x: torch.Tensor):
    """A GEMM weight in x's dtype, or fp32 with fp16/bf16 x (``is_mixed_precision_weight``)."""
    if w.dtype != x.dtype and not is_mixed_precision_weight(w.dtype, x.dtype):
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), or be fp32 when x is fp16/bf16, got {w.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str = ""):
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_row_major(name: str, t: torch.Tensor):
    """The kernels read rows with unit stride: the last dim must be contiguous."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides "
                         f"{tuple(t.stride())}; call .contiguous() first")


def check_out(out: torch.Tensor, *, needs_grad: bool, grad_inputs: str, dtype: torch.dtype, shape: tuple,
              what: str, like_name: str, like: torch.Tensor):
    """An op's ``out=`` argument: refused while autograd records (``grad_inputs`` says which inputs may require
    grad), then it must have ``dtype`` and ``shape`` (described by ``what``), sit on ``like``'s device, and have a
    unit last stride (the kernels store rows with unit stride)."""
    if needs_grad:
        raise ValueError(f"out= is not supported while autograd records ({grad_inputs} requires grad); call "
                         "under torch.no_grad() or drop out=")
    check_tensor("out", out, ndim=len(shape), dtypes=(dtype,))
    check_shape("out", out, shape, what)
    check_same_device("out", out, like_name, like)
    check_row_major("out", out)


def check_consumable(name: str, t: torch.Tensor, consume) -> None:
    """Validate a ``consume_<name>`` flag: a bool, and not set for a leaf that requires grad, whose data the
    gradient written over it would replace (and which autograd would then also hand back as its own .grad)."""
    if not isinstance(consume, bool):
        raise TypeError(f"consume_{name} must be a bool, got {type(consume).__name__}")
    if consume and t.is_leaf and t.requires_grad:
        raise ValueError(f"consume_{name}=True needs {name} to be an intermediate result, got a leaf tensor that "
                         f"requires grad (its gradient would overwrite its data); pass consume_{name}=False")


def check_single_backward(ctx, op: str, why: str) -> None:
    """For an autograd Function whose backward reuses a saved input's memory (``ctx.ran`` set False in forward):
    raise a clear error on a second backward through the same graph (``retain_graph=True``), which would
    otherwise read the overwritten buffer."""
    if ctx.ran:
        raise RuntimeError(f"{op}: its backward {why}, so it can run once; a second backward through the same "
                           "graph (retain_graph=True) is not supported")
    ctx.ran = True
