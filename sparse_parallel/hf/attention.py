"""Our sparse attention as a ``transformers`` attention implementation.

``register()`` adds ``"sparse_parallel"`` to transformers' ``AttentionInterface``; a Llama-style model
loaded with ``attn_implementation="sparse_parallel"`` then runs :func:`sparse_parallel.sparse_attention`
in every layer, with the layer's pattern read from its config (``sparse_pattern``, per-layer
``sparse_layer_patterns``, ``sparse_backend``: what :mod:`.convert` writes).  A layer module with a
``sequence_parallel`` attribute (set from outside, see :func:`apply_sequence_parallel`) attends across
the ranks of that context, as our own model does.

Padding masks are not supported: the pattern is the mask (sequences are packed, as in training).
"""
from __future__ import annotations

import functools
import json

import torch

from ..api import sparse_attention
from ..patterns import Pattern

NAME = "sparse_parallel"


@functools.lru_cache(maxsize=256)
def _pattern(spec: str) -> Pattern:
    return Pattern.from_dict(json.loads(spec))


def layer_pattern(config, layer_idx: int) -> Pattern:
    """The pattern of layer ``layer_idx`` stated in a transformers config."""
    spec = getattr(config, "sparse_pattern", None)
    per_layer = getattr(config, "sparse_layer_patterns", None) or {}
    spec = per_layer.get(str(layer_idx), per_layer.get(layer_idx, spec))
    if spec is None:
        raise ValueError(f"attn_implementation={NAME!r} needs config.sparse_pattern (a pattern dict, e.g. "
                         "{'components': [{'type': 'window', 'left': 1024}]})")
    try:
        return _pattern(json.dumps(spec, sort_keys=True))
    except ValueError as e:
        raise ValueError(f"config.sparse_pattern (layer {layer_idx}): {e}") from None


def sparse_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]`` ->
    (out ``[B, Nq, Hq, D]``, None).  With a cache (Nq < Nk) the queries are the last Nq positions."""
    if dropout:
        raise ValueError(f"attn_implementation={NAME!r} has no attention dropout (config.attention_dropout "
                         f"must be 0, got {dropout})")
    pattern = layer_pattern(module.config, module.layer_idx)
    backend = getattr(module.config, "sparse_backend", "auto")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    nq, nk = q.shape[1], k.shape[1]
    if nq == nk:
        out = sparse_attention(q, k, v, pattern, backend=backend, scale=scaling,
                               sequence_parallel=getattr(module, "sequence_parallel", None))
        return out, None
    # Decoding over transformers' own cache: the few new queries against every cached key.
    return _last_queries(q, k, v, pattern, scaling), None


def _last_queries(q, k, v, pattern: Pattern, scale) -> torch.Tensor:
    nq, nk, hq, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    i = torch.arange(nk - nq, nk, device=q.device)
    j = torch.arange(nk, device=q.device)
    allowed = pattern.bind(nk, hq).allows(i, j)[0]  # [Ht, Nq, Nk]
    kk = k.repeat_interleave(hq // hkv, dim=2).float()
    vv = v.repeat_interleave(hq // hkv, dim=2).float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)


def register() -> str:
    """Register the implementation with transformers (idempotent); returns its name."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        raise ImportError("the Hugging Face plug-in needs transformers: pip install 'sparse-parallel[hf]'") from None
    AttentionInterface.register(NAME, sparse_attention_forward)
    return NAME


def apply_sequence_parallel(hf_model, ctx):
    """Make every attention layer of a transformers model attend across the ranks of ``ctx``."""
    for module in hf_model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            module.sequence_parallel = ctx
    return hf_model
