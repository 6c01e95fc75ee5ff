"""The tolerance rule of every numeric test of the kernels and of sequence parallelism.

A fast path's error against the float64 reference may be at most twice the error of the eager
reference run in the same (lower) dtype, against the same float64 result: any other summation order in
that dtype is expected to be off by about as much, and a real bug is off by far more.  ``floor`` adds a
few units in the last place for tiny problems where the same-dtype reference can be exact by luck.
"""
from __future__ import annotations

import torch


def reference_tolerance(ref64: torch.Tensor, ref_lo: torch.Tensor, floor: float = 0.0) -> float:
    """2 x the same-dtype reference's max error against float64, plus ``floor``."""
    return 2 * (ref_lo.double() - ref64.double()).abs().max().item() + floor


def assert_within_reference_error(name: str, got, ref64, ref_lo, floor: float = 0.0) -> None:
    err = (got.double() - ref64.double()).abs().max().item()
    tol = reference_tolerance(ref64, ref_lo, floor)
    assert err <= tol, f"{name}: error {err:.2e} > {tol:.2e} (2x the same-dtype reference's error + {floor:.0e})"
