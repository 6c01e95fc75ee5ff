"""Autoregressive decoding with a key/value cache that keeps only what the pattern can still reach.

After position t has been processed, a cached key j is needed again only if some later query
i > t may attend to it, which every component says through its own geometry (causal patterns):

* a term ``lo_rel*i + lo_c <= j <= hi_rel*i + hi_c, j = r (mod m)`` keeps j if some i in
  ``(t, max_len)`` satisfies it -- a window keeps its last W keys, a strided level its own keys
  within its span;
* listed keys (``explicit_keys``: global keys) are kept always; a global *query* row still to come
  sees every key, so until the last one has been decoded everything is kept;
* block-list components (random blocks, layouts, top-k): their choices are per key block of a
  query block not yet seen, so everything is kept (``LayerCache.keeps_all`` says why).

A key is kept if any component keeps it; attention of the new query is then over the kept keys
with the pattern's own mask, so decoding equals recomputing the whole prefix.
"""
from __future__ import annotations

import torch

from ..api import sparse_attention
from ..patterns import Pattern


class LayerCache:
    """The kept keys/values ``[B, M, Hkv, D]`` of one layer and their positions ``[M]``."""

    def __init__(self, pattern: Pattern, heads: int, max_len: int, backend: str = "auto"):
        if not pattern.causal:
            raise ValueError("generation needs a causal pattern (a later token cannot change earlier ones)")
        if pattern.data_dependent:
            raise ValueError("generation does not support data-dependent block selection (topk_blocks)")
        self.pattern, self.heads, self.max_len, self.backend = pattern, heads, max_len, backend
        self.bound = pattern.bind(max_len, heads)
        self.k = self.v = None
        self.pos = torch.empty(0, dtype=torch.long)
        blocks = [type(c).__name__ for c in pattern.block_components]
        self.keeps_all = f"block-list component(s) {blocks} may choose any earlier key block" if blocks else ""

    def _needed(self, j: torch.Tensor, t: int) -> torch.Tensor:
        """Keys among positions ``j`` that a query after position ``t`` may still attend to."""
        if self.keeps_all:
            return torch.ones_like(j, dtype=torch.bool)
        nxt, last = t + 1, self.max_len - 1
        keep = torch.zeros_like(j, dtype=torch.bool)
        if bool((self.bound.global_rows >= nxt).any()):  # a global query row still to come sees every key
            return torch.ones_like(j, dtype=torch.bool)
        for c, listed in zip(self.pattern.components, self.bound.explicit_keys):
            if listed is not None:
                keep |= torch.isin(j, listed.to(j.device))
            for term in c.terms():
                # the queries i in [nxt, last] whose range holds j: i <= j - lo_c (lo_rel 1) and
                # i >= j - hi_c (hi_rel 1); a constant bound holds for every query or none
                i_lo = torch.clamp(j - term.hi_c, min=nxt) if term.hi_rel else torch.full_like(j, nxt)
                i_hi = torch.clamp(j - term.lo_c, max=last) if term.lo_rel else torch.full_like(j, last)
                seen = i_lo <= i_hi
                if not term.lo_rel:
                    seen &= j >= term.lo_c
                if not term.hi_rel:
                    seen &= j <= term.hi_c
                if term.m != 1:
                    seen &= torch.remainder(j - term.r, term.m) == 0
                keep |= seen
        return keep

    def attend(self, q, k, v, positions: torch.Tensor, scale=None) -> torch.Tensor:
        """Attention of new tokens (q ``[B, n, Hq, D]``, k/v ``[B, n, Hkv, D]`` at ``positions [n]``)."""
        positions = positions.to(torch.long).cpu()
        if self.k is None:  # the prompt: the whole prefix at once, through the sparse kernels
            if positions[0] != 0:
                raise ValueError("the first tokens given to a cache must start at position 0")
            out = sparse_attention(q, k, v, self.pattern, backend=self.backend, scale=scale)
            self.k, self.v, self.pos = k, v, positions
        else:
            self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
            self.pos = torch.cat([self.pos, positions])
            out = self._masked(q, positions, scale)
        keep = self._needed(self.pos, int(positions[-1]))
        if not bool(keep.all()):
            idx = keep.nonzero().flatten().to(self.k.device)
            self.k, self.v, self.pos = self.k[:, idx], self.v[:, idx], self.pos[keep]
        return out

    def _masked(self, q, positions, scale) -> torch.Tensor:
        hq, hkv = q.shape[2], self.k.shape[2]
        allowed = self.bound.allows(positions, self.pos)[0].to(q.device)  # [Ht, n, M]
        kk = self.k.repeat_interleave(hq // hkv, dim=2).float()
        vv = self.v.repeat_interleave(hq // hkv, dim=2).float()
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * scale
        p = torch.softmax(s.masked_fill(~allowed[None], float("-inf")), dim=-1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)


def new_cache(model, max_len: int) -> list[LayerCache]:
    """One LayerCache per layer of ``model`` (our Transformer) for sequences up to ``max_len``."""
    return [LayerCache(layer.attn.pattern, layer.attn.n_heads, max_len, layer.attn.backend) for layer in model.layers]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token ``[B]`` from last-position logits ``[B, V]``: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).flatten()


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, use_cache: bool = True, eos_id: int | None = None, return_logits: bool = False):
    """Continue ``prompt [B, n]`` by ``max_new_tokens`` tokens -> ``[B, n + new]`` (and the logits of each step).

    Without ``use_cache`` every step recomputes the whole prefix (the reference the cache must equal).
    Decoding stops early once every sequence has produced ``eos_id``.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, n] token ids with n >= 1, got shape {tuple(prompt.shape)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = model.output_weight
    tokens = prompt
    total = prompt.shape[1] + max_new_tokens
    cache = new_cache(model, total) if use_cache else None
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    step_logits = []
    fresh = tokens
    for _ in range(max_new_tokens):
        if cache is None:
            h = model.hidden(tokens)[:, -1]
        else:
            start = tokens.shape[1] - fresh.shape[1]
            positions = torch.arange(start, tokens.shape[1], device=tokens.device)
            h = model.hidden(fresh, positions, cache=cache)[:, -1]
        logits = (h @ weight.t()).float()
        step_logits.append(logits)
        nxt = _pick(logits.cpu(), float(temperature), float(top_p), gen).to(tokens.device)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        fresh = nxt[:, None]
        if eos_id is not None:
            done |= nxt.cpu() == eos_id
            if bool(done.all()):
                break
    if return_logits:
        return tokens, torch.stack(step_logits, 1) if step_logits else None, cache
    return tokens
