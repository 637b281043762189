"""The DESIGN.md tolerance rule, shared by the tests.

A kernel's max error against a high-precision reference may be at most twice the max error of the plain
PyTorch implementation run in the same dtype, plus a tiny absolute slack. NaN never passes.
"""

import torch


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
                        slack: float = 1e-5, factor: float = 2.0):
    """out: the kernel's result; ref: float64/float32 reference; baseline: plain torch in out's dtype. ``factor``
    stays 2 (the rule) except where a test says why not."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element was never written?)"
    err = max_err(out, ref)
    base = max_err(baseline, ref)
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    bound = factor * base + slack * max(1.0, scale)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (torch same-dtype error {base:.3g})"
