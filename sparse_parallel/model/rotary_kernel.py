"""The rotary rotation as one Triton kernel, forward and backward.

Pairs ``(x[2i], x[2i+1])`` of the last dimension are rotated by the angle of their position
(``fused.rotate`` is the eager definition).  A program takes ``ROWS`` rows of ``x`` seen as
``[B * N * H, D]``: each row is read once as one contiguous vector, split into its even and odd
elements in registers, rotated in float32 with the row's cos/sin (one table row per position,
shared by its ``H`` heads) and written back as one vector; a head dimension whose pair count is not
a power of two is padded in registers and masked.  The backward is the rotation by the
opposite angle: the same kernel with the sine negated.  Imported when it first runs, so that
``TRITON_INTERPRET=1`` set before that moment takes effect (tests run it on CPU tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32


@triton.jit
def _rotate_kernel(X, OUT, COS, SIN, rows, heads, n, half: tl.constexpr, HALF: tl.constexpr,
                   SIGN: tl.constexpr, ROWS: tl.constexpr):
    """``half`` pairs per row, padded to ``HALF`` (a power of two) in registers."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < rows
    pos = (r // heads) % n
    cols = tl.arange(0, 2 * HALF)
    base = tl.cast(r, tl.int64)[:, None] * (2 * half) + cols[None, :]
    inside = ok[:, None] & (cols < 2 * half)[None, :]
    x = tl.load(X + base, mask=inside, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (ROWS, HALF, 2)))
    i = tl.arange(0, HALF)
    t = tl.cast(pos, tl.int64)[:, None] * half + i[None, :]
    pair = ok[:, None] & (i < half)[None, :]
    c = tl.load(COS + t, mask=pair, other=0.0)
    s = tl.load(SIN + t, mask=pair, other=0.0) * SIGN
    out = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (ROWS, 2 * HALF))
    tl.store(OUT + base, out.to(OUT.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x = x.contiguous()
    b, n, h, d = x.shape
    out = torch.empty_like(x)
    rows = b * n * h
    if rows:
        _rotate_kernel[(triton.cdiv(rows, ROWS),)](x, out, cos.contiguous(), sin.contiguous(), rows, h, n,
                                                   half=d // 2, HALF=triton.next_power_of_2(d // 2), SIGN=sign,
                                                   ROWS=ROWS)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, -1.0), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``fused.rotate`` in one kernel each way: ``x [B, N, H, D]`` (D even), ``cos, sin [N, D / 2]``
    float32 on the same device."""
    d = x.shape[-1]
    if d < 2 or d % 2:
        raise ValueError(f"rotary pairs need an even head dimension, got {d}")
    if cos.shape != (x.shape[1], d // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{x.shape[1]}, {d // 2}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return _Rotate.apply(x, cos.float(), sin.float())
