"""Float comparisons that hold on any x86-64 CPU.

Different CPUs (and their BLAS kernels) sum in different orders, so two computations of the same thing agree
only up to rounding, and training amplifies rounding a little every step. An absolute bound such as
``max |a - b| < 1e-3`` then passes on one CPU and fails on another. These helpers measure the difference
against the size of what is compared, so a bound keeps its meaning: rounding gives ratios of 1e-7..1e-3,
a real mismatch (a dropped key, another seed, half strength, another layer) gives ratios near 1.
"""
from __future__ import annotations

import torch


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().double()))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| over all elements."""
    scale = norm(expected)
    assert scale > 0, "the expected value is all zeros: compare it with something that has a scale"
    return norm(got.double() - expected.double()) / scale


def effect_error(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """How far ``got`` is from ``expected``, as a fraction of the effect ``expected - base``
    (e.g. what an adapter changes in the conditioning): 0 = the same effect, 1 = no effect at all."""
    effect = norm(expected.double() - base.double())
    assert effect > 0, "expected equals base: there is no effect to compare"
    return norm(got.double() - expected.double()) / effect


def relative_effect(changed: torch.Tensor, base: torch.Tensor) -> float:
    """||changed - base|| / ||base||: how much something changed, relative to its size."""
    return relative_error(changed, base)
