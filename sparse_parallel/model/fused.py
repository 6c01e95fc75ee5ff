"""The element-wise work between a layer's matrix products, one kernel each on CUDA.

Eagerly, RMSNorm, the rotary rotation and SwiGLU's ``silu(gate) * up`` each run as several passes
over the activations (float32 upcasts, products, casts back), and their backwards as several more.
Each function below is written once, eagerly; called on a tensor whose device type is in
``COMPILE_ON`` it runs through ``torch.compile`` (compiled on first use, ``dynamic=True`` so
that one compilation serves every sequence length), which fuses the forward into one kernel and
the backward into another; the rotary rotation runs a Triton kernel of the same arithmetic instead
(``rotary_kernel``), which is faster there.  Elsewhere (CPU: tests, the demo) it runs the eager
definition, which is also the reference the compiled form is tested against (``fn.eager``).

The arithmetic is the eager one: statistics and rotations in float32, rotary angles coming in as
float32 cos/sin tables formed from float64 angles (``layers.rotary_tables``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: Device types whose calls run compiled.  Tests add "cpu" to exercise the compiled form.
COMPILE_ON = frozenset({"cuda"})


class Elementwise:
    """``fn`` compiled on first use on a ``COMPILE_ON`` device, eager elsewhere.

    ``kernel`` (a function of the same arguments) replaces the compiled form where torch.compile's
    code is measured slower than a hand-written kernel of the same arithmetic (benchmarks/elementwise.py).
    """

    def __init__(self, fn, kernel=None):
        functools.update_wrapper(self, fn)
        self.eager = fn
        self.kernel = kernel
        self._compiled = None

    def compiles(self, x: torch.Tensor) -> bool:
        return x.device.type in COMPILE_ON

    def __call__(self, x: torch.Tensor, *args):
        if not self.compiles(x):
            return self.eager(x, *args)
        if self._compiled is None:
            self._compiled = self.kernel or torch.compile(self.eager, dynamic=True)
        return self._compiled(x, *args)


@Elementwise
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., dim]`` over its root mean square, times ``weight [dim]``."""
    # Normalise in float32 so that bf16 activations keep their scale exactly.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) of ``x [B, N, H, D]`` rotated by angles ``cos, sin [N, D / 2]``, in float32.

    Its torch.compile'd form moved 0.5-0.7 TB/s on an H200, the Triton kernel of the same arithmetic
    (``rotary_kernel.rotate``) ~4 TB/s (benchmarks/elementwise.py)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _rotate_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from .rotary_kernel import rotate as run  # Triton is imported (and TRITON_INTERPRET read) on first use

    return run(x, cos, sin)


rotate = Elementwise(_rotate, kernel=_rotate_kernel)


@Elementwise
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: ``silu(gate) * up``."""
    return F.silu(gate) * up
