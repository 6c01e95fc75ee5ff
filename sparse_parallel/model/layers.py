"""Building blocks of the decoder: RMSNorm, rotary embedding, GQA sparse attention, SwiGLU.

Nothing here knows about processes.  ``Attention.sequence_parallel`` is ``None``
unless a trainer sets it from outside (``apply_sequence_parallel``); then the
tensors a layer sees are this rank's contiguous shard of the sequence and the
positions passed in are global.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..api import sparse_attention
from ..patterns import Pattern


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so that bf16 activations keep their scale exactly.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[N, head_dim / 2]`` (float32) for global ``positions [N]``.

    Computed from the positions themselves, never from a table indexed by the
    local offset, so a shard starting at token 700 000 rotates exactly like the
    same tokens at SP=1.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
                                / head_dim))
    # float64 angles: at a million positions float32 products lose ~0.06 rad.
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of ``x [B, N, H, D]`` by the angles of its positions.

    Float32 arithmetic, ``chunk`` positions at a time: the float32 temporaries of a
    million-token tensor would otherwise be several times its bf16 size.
    """
    if x.shape[1] <= chunk:
        return _rotate(x, cos, sin)
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk):
        out[:, s:s + chunk] = _rotate(x[:, s:s + chunk], cos[s:s + chunk], sin[s:s + chunk])
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over a sparse ``pattern`` (q: Hq heads, k/v: Hkv heads)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, pattern: Pattern, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.pattern = pattern
        self.backend = backend
        self.sequence_parallel = None
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """``cache`` (decoding): a ``generate.LayerCache`` holding earlier keys; ``positions`` those of x."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            out = cache.attend(q, k, v, positions)
        else:
            out = sparse_attention(q, k, v, self.pattern, backend=self.backend,
                                   sequence_parallel=self.sequence_parallel)
        return self.wo(out.reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    With ``mlp_chunk`` > 0 and gradients on, the MLP runs ``mlp_chunk`` tokens at a
    time, each chunk checkpointed: its hidden activations (8/3 x dim per token, three
    of them) are then held for one chunk only, which is what lets a million-token
    shard of a billion-parameter model fit on one GPU.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, pattern: Pattern,
                 backend: str, eps: float, mlp_chunk: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, pattern, backend)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_chunk = mlp_chunk

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, positions)
        n, step = x.shape[1], self.mlp_chunk
        if not step or n <= step or not torch.is_grad_enabled():
            return x + self._mlp(x)
        parts = [checkpoint(self._mlp, x[:, s:s + step], use_reentrant=False) for s in range(0, n, step)]
        return x + torch.cat(parts, dim=1)
