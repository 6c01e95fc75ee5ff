"""``Transformer``: the decoder LM, and its chunked cross-entropy.

``forward(tokens, labels, positions)`` returns the *sum* of token losses and
the number of counted tokens, so that a caller holding one shard of a sequence
can divide by the token count of the whole sequence-parallel group and get the
same loss as one process holding everything.  Logits are formed ``loss_chunk``
tokens at a time and recomputed in backward, so a million-token shard never
holds ``N x vocab`` logits.

``cfg.activation_checkpointing`` picks what a training forward keeps of each layer:
everything (false); only the layer input, the whole layer recomputed in backward (true;
``offload.LayerChain``, ``Block.backward_from``; with ``offload_activations`` the input
waits in host memory); the same plus the attention op's output and log-sum-exp, which the
recompute replays instead of running the attention forward again (``"keep_attention"``);
or the layer input and what the attention op saves, everything but the attention
recomputed (``"selective"``, ``Block.selective``).  ``cfg.checkpoint_layers`` limits it to
the first layers; the later ones keep everything.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..patterns import Pattern
from .layers import Block, RMSNorm, rotary_tables
from .offload import LayerChain

IGNORE_INDEX = -100
#: Host offload stores whole-layer checkpoint inputs; selective checkpointing keeps each layer's
#: attention tensors on the GPU instead, so the two do not combine.
OFFLOAD_NEEDS_FULL = ("model.offload_activations needs model.activation_checkpointing: true or "
                      "'keep_attention' (whole-layer checkpoints), not 'selective', which keeps every layer's "
                      "attention q, k, v and output on the GPU")


def mlp_hidden(dim: int, hidden: int) -> int:
    """SwiGLU width: ``hidden`` or 8/3 x dim rounded up to a multiple of 64."""
    return hidden or 64 * math.ceil(8 * dim / 3 / 64)


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduce: bool) -> torch.Tensor:
    logits = h @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax over the vocabulary in float32
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum" if reduce else "none")


class Transformer(nn.Module):
    def __init__(self, cfg):
        """``cfg``: a ``sparse_parallel.training.config.ModelConfig`` (or anything with its fields)."""
        super().__init__()
        self.cfg = cfg
        patterns: list[Pattern] = cfg.patterns()
        hidden = mlp_hidden(cfg.dim, cfg.mlp_hidden)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        fused = cfg.fused_elementwise
        self.layers = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hidden, p, cfg.attention_backend, cfg.norm_eps,
                  cfg.mlp_chunk if cfg.activation_checkpointing else 0, fused)
            for p in patterns)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, fused)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                # Residual-branch outputs shrink with depth so the residual stream keeps its scale.
                nn.init.normal_(p, std=std / math.sqrt(2 * len(self.layers)))
            else:
                nn.init.normal_(p, std=std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
               documents=None) -> torch.Tensor:
        """Final-norm hidden states ``[B, N, dim]`` of ``tokens [B, N]`` at global ``positions [N]``.

        ``cache``: one ``generate.LayerCache`` per layer (decoding: the keys of earlier tokens).
        ``documents``: a ``patterns.Documents`` over the whole sequence; every layer attends only
        within them (positions, and so RoPE, stay those of the sequence).
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rotary_tables(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        x = self.tok_embeddings(tokens)
        recompute = self.cfg.activation_checkpointing if torch.is_grad_enabled() and cache is None else False
        if recompute == "selective" and self.cfg.offload_activations:
            raise ValueError(OFFLOAD_NEEDS_FULL)
        # The kept inputs of this forward's whole-layer checkpoints (offloaded: the backward of each
        # layer prefetches the next).
        chain = None
        if recompute and recompute != "selective":
            chain = LayerChain(offload=self.cfg.offload_activations, keep_attention=recompute == "keep_attention")
        last = len(self.layers) if self.cfg.checkpoint_layers is None else self.cfg.checkpoint_layers
        for index, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, cache[index], positions)
            elif index >= last:  # past checkpoint_layers: everything kept
                x = layer(x, cos, sin, documents=documents)
            elif recompute == "selective":
                x = layer.selective(x, cos, sin, documents)
            elif chain is not None:
                x = chain.checkpoint(layer, x, cos, sin, documents)
            else:
                x = layer(x, cos, sin, documents=documents)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                documents=None, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, labels ``[B, N]`` -> (sum of token losses (float32, scalar), counted tokens (int64)).

        Labels equal to ``IGNORE_INDEX`` are not counted.  With ``per_token`` the first
        result is the loss of every token ``[B, N]`` instead of their sum.  ``documents``: see
        :meth:`hidden`.
        """
        b, n = tokens.shape
        h = self.hidden(tokens, positions, documents=documents).flatten(0, 1)
        labels = labels.flatten()
        weight = self.output_weight
        step = self.cfg.loss_chunk
        count = (labels != IGNORE_INDEX).sum()
        if per_token:
            parts = [_chunk_ce(h[s:s + step], weight, labels[s:s + step], False) for s in range(0, h.shape[0], step)]
            return torch.cat(parts).view(b, n), count
        total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
        for s in range(0, h.shape[0], step):
            hc, lc = h[s:s + step], labels[s:s + step]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_ce, hc, weight, lc, True, use_reentrant=False)
            else:
                total = total + _chunk_ce(hc, weight, lc, True)
        return total, count

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_embeddings.weight.numel()

    def flops_per_token(self, context_length: int, documents=None) -> float:
        """Training FLOPs per token: 6 x matmul params + useful attention FLOPs (fwd + bwd), for sequences
        of ``context_length`` tokens (within ``documents``, a ``patterns.Documents``, when given)."""
        matmul = self.num_params(embeddings=False) - sum(p.numel() for p in self.parameters() if p.dim() == 1)
        if self.output is None:
            matmul += self.tok_embeddings.weight.numel()
        return 6.0 * matmul + self.attention_flops_per_token(context_length, documents)

    def attention_flops_per_token(self, context_length: int, documents=None) -> float:
        """The useful attention FLOPs (fwd + bwd) per token of every layer: from the patterns alone, so
        also right once ZeRO-3 has partitioned the parameters."""
        head_dim = self.cfg.dim // self.cfg.n_heads
        per_pattern = {}  # describe() walks every query: once per distinct pattern
        sequences = 1 if documents is None else documents.batch  # describe sums over the sequences
        for layer in self.layers:
            p = layer.attn.pattern
            if p not in per_pattern:
                counted = p if documents is None else p.within(documents)
                per_pattern[p] = counted.describe(context_length, heads=self.cfg.n_heads,
                                                  dim=head_dim)["useful_flops_fwd_bwd"]
        attn = sum(per_pattern[layer.attn.pattern] for layer in self.layers)
        return attn / (context_length * sequences)


def apply_sequence_parallel(model: Transformer, ctx) -> Transformer:
    """Make every attention layer of ``model`` attend across the ranks of ``ctx`` (a SequenceParallel)."""
    for layer in model.layers:
        layer.attn.sequence_parallel = ctx
    return model
