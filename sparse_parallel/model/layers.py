"""Building blocks of the decoder: RMSNorm, rotary embedding, GQA sparse attention, SwiGLU.

Nothing here knows about processes.  ``Attention.sequence_parallel`` is ``None``
unless a trainer sets it from outside (``apply_sequence_parallel``); then the
tensors a layer sees are this rank's contiguous shard of the sequence and the
positions passed in are global.

Modules built with ``fused=True`` run their element-wise work through :mod:`.fused`
(compiled on CUDA, eager elsewhere); the arithmetic is the same either way.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..api import replays_saved, sparse_attention
from ..patterns import Pattern
from .fused import rms_norm, rotate, silu_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm if self.fused else rms_norm.eager)(x, self.weight, self.eps)


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int = 1 << 16,
                 fused: bool = False) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of ``x [B, N, H, D]`` by the angles of its positions.

    Float32 arithmetic.  Eagerly ``chunk`` positions at a time: the float32 temporaries of a
    million-token tensor would otherwise be several times its bf16 size.  With ``fused`` on a
    device where the rotation compiles, all at once: the temporaries stay in registers.
    """
    if fused and rotate.compiles(x):
        return rotate(x, cos, sin)
    if x.shape[1] <= chunk:
        return rotate.eager(x, cos, sin)
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk):
        out[:, s:s + chunk] = rotate.eager(x[:, s:s + chunk], cos[s:s + chunk], sin[s:s + chunk])
    return out


class Attention(nn.Module):
    """Grouped-query attention over a sparse ``pattern`` (q: Hq heads, k/v: Hkv heads).

    ``forward`` is ``wo(attend(*qkv(x)))``; the pieces are public so that selective
    checkpointing (``Block.selective``) can recompute the projections without the attention.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, pattern: Pattern, backend: str = "auto",
                 fused: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.pattern = pattern
        self.backend = backend
        self.fused = fused
        self.sequence_parallel = None
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[B, N, dim]`` -> rotated q ``[B, N, Hq, D]``, rotated k and v ``[B, N, Hkv, D]``."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin, fused=self.fused), apply_rotary(k, cos, sin, fused=self.fused), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None, kept=None) -> torch.Tensor:
        """The sparse attention op (across the ranks of ``sequence_parallel`` when set) -> ``[B, N, Hq, D]``.

        ``documents`` (a ``patterns.Documents`` over the whole sequence): attend only within them.
        ``kept`` (an ``offload.KeptAttention`` of a checkpointed layer): the first forward leaves its
        (out, lse) there, where the backend can replay them (``api.replays_saved``), and the recompute
        takes them back instead of running the forward again.
        """
        pattern = self.pattern if documents is None else self.pattern.within(documents)
        run = dict(backend=self.backend, sequence_parallel=self.sequence_parallel)
        if kept is None or not replays_saved(q.device, **run):
            return sparse_attention(q, k, v, pattern, **run)
        saved, kept.saved = kept.saved, None
        out, lse = sparse_attention(q, k, v, pattern, return_lse=True, saved=saved, **run)
        if saved is None:
            kept.saved = (out, lse)
        return out

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                positions: torch.Tensor | None = None, documents=None, kept=None) -> torch.Tensor:
        """``cache`` (decoding): a ``generate.LayerCache`` holding earlier keys; ``positions`` those of x.
        ``kept``: see :meth:`attend`."""
        q, k, v = self.qkv(x, cos, sin)
        out = cache.attend(q, k, v, positions) if cache is not None else self.attend(q, k, v, documents, kept)
        return self.wo(out.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down((silu_mul if self.fused else silu_mul.eager)(self.w_gate(x), self.w_up(x)))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    With ``mlp_chunk`` > 0 (set under activation checkpointing) the MLP runs ``mlp_chunk``
    tokens at a time wherever nothing is kept for a backward (the forward of a whole-layer
    checkpoint, evaluation), in ``backward_from`` and in ``selective``: its hidden activations
    (8/3 x dim per token, three of them) are then held for one chunk only, which is what lets
    a million-token shard of a billion-parameter model fit on one GPU.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, pattern: Pattern,
                 backend: str, eps: float, mlp_chunk: int = 0, fused: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps, fused)
        self.attn = Attention(dim, n_heads, n_kv_heads, pattern, backend, fused)
        self.mlp_norm = RMSNorm(dim, eps, fused)
        self.mlp = SwiGLU(dim, hidden, fused)
        self.mlp_chunk = mlp_chunk

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                positions: torch.Tensor | None = None, documents=None, kept=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, positions, documents, kept)
        n, step = x.shape[1], self.mlp_chunk
        if not step or n <= step or torch.is_grad_enabled():
            return x + self._mlp(x)
        out = torch.empty_like(x)  # nothing kept for a backward: one chunk's hidden activations at a time
        for s in range(0, n, step):
            out[:, s:s + step] = x[:, s:s + step] + self._mlp(x[:, s:s + step])
        return out

    def backward_from(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, grad: torch.Tensor,
                      documents=None, kept=None) -> torch.Tensor:
        """The backward of ``forward`` at input ``x`` for output gradient ``grad``, recomputing from ``x``
        (a whole-layer checkpoint): returns the gradient of ``x``; parameter gradients accumulate.

        The attention half is recomputed with gradients (the attention op replayed from ``kept`` where
        it can be).  The MLP then runs one ``mlp_chunk`` at a time, each chunk's forward and backward
        together, so its hidden activations are held for one chunk and computed twice per step (the
        first forward, this one) instead of three times (a checkpoint per chunk inside the recompute).
        The MLP's parameter gradients, summed over the chunks, reach autograd in the layer's one
        backward: every parameter gets one accumulation per layer, as with a plain checkpoint, so
        gradient hooks (ZeRO's) see what they always see.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            h = x + self.attn(self.attn_norm(x), cos, sin, documents=documents, kept=kept)
            params = [p for p in (*self.mlp_norm.parameters(), *self.mlp.parameters()) if p.requires_grad]
            dh = torch.empty_like(grad)
            sums = [None] * len(params)
            n = h.shape[1]
            step = self.mlp_chunk or n
            for s in range(0, n, step):
                hc = h[:, s:s + step].detach().requires_grad_(True)
                gc = grad[:, s:s + step]
                dhc, *dps = torch.autograd.grad(self._mlp(hc), [hc, *params], gc)
                dh[:, s:s + step] = dhc + gc
                sums = [d if a is None else a + d for a, d in zip(sums, dps)]
            torch.autograd.backward(_WithGradients.apply(h, sums, *params), dh)
        return x.grad

    def selective(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        """``forward`` for training with selective activation checkpointing.

        The attention op runs outside any checkpoint, so what it saves for its backward
        (q, k, v, its output and log-sum-exp) is kept and its forward runs once per step.
        Everything else is recomputed in backward from the layer input ``x``: the norm,
        projections and rotary in one checkpoint; the output projection, residual and MLP,
        which act on each token alone, in one checkpoint per ``mlp_chunk`` tokens, so that
        the MLP is recomputed once and its hidden activations are held one chunk at a time.
        """
        q, k, v = checkpoint(self._project, x, cos, sin, use_reentrant=False)
        out = self.attn.attend(q, k, v, documents)
        n = x.shape[1]
        step = self.mlp_chunk or n
        parts = [checkpoint(self._finish, x[:, s:s + step], out[:, s:s + step], use_reentrant=False)
                 for s in range(0, n, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.attn.qkv(self.attn_norm(x), cos, sin)

    def _finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = x + self.attn.wo(out.flatten(2))
        return h + self._mlp(h)


class _WithGradients(torch.autograd.Function):
    """The identity on ``h`` whose backward also gives ``params`` the precomputed ``grads``."""

    @staticmethod
    def forward(ctx, h, grads, *params):
        ctx.grads = grads
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None, *ctx.grads)
