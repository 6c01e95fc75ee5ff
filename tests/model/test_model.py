"""The decoder LM against plain float64 formulas: rotary, GQA sparse attention, chunked loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_parallel.model import IGNORE_INDEX, Transformer, apply_rotary, rotary_tables
from sparse_parallel.model.layers import Attention
from sparse_parallel.patterns import Global, Pattern, Strided, Window
from sparse_parallel.training.config import ModelConfig


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=37, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, loss_chunk=7,
                attention_backend="reference",
                pattern={"components": [{"type": "window", "left": 5}]},
                layer_patterns={1: {"components": [{"type": "window", "left": 3}, {"type": "strided", "stride": 4},
                                                   {"type": "global", "first": 2}]}})
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def test_rotary_at_global_positions_matches_float64_rotation():
    """Positions near a million: the angles are formed in float64, so float32 output is exact to ~1e-6."""
    torch.manual_seed(0)
    d, theta = 16, 10000.0
    pos = torch.tensor([0, 1, 999_999, 1_048_575])
    x = torch.randn(1, 4, 2, d, dtype=torch.float32)
    cos, sin = rotary_tables(pos, d, theta)
    got = apply_rotary(x, cos, sin)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv
    xd = x.double().unflatten(-1, (-1, 2))
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    want = torch.stack((xd[..., 0] * c - xd[..., 1] * s, xd[..., 0] * s + xd[..., 1] * c), -1).flatten(-2)
    # float32 rounding of x*cos: a few ulps of |x| ~ 4 -> 1e-6.
    assert (got.double() - want).abs().max() < 1e-5
    # A shard's rotation depends only on its global positions.
    cos2, sin2 = rotary_tables(pos[2:], d, theta)
    assert torch.equal(apply_rotary(x[:, 2:], cos2, sin2), got[:, 2:])


def dense_attention(x, attn: Attention, pattern: Pattern, positions):
    """Plain float64 GQA attention with a dense mask from the pattern."""
    b, n, _ = x.shape
    hd = attn.head_dim
    q = attn.wq(x).view(b, n, attn.n_heads, hd)
    k = attn.wk(x).view(b, n, attn.n_kv_heads, hd)
    v = attn.wv(x).view(b, n, attn.n_kv_heads, hd)
    cos, sin = rotary_tables(positions, hd, 10000.0)
    q, k = apply_rotary(q, cos.double(), sin.double()), apply_rotary(k, cos.double(), sin.double())
    g = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    mask = pattern.mask(n)[0]
    s = s.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    return attn.wo(out.reshape(b, n, -1))


@pytest.mark.parametrize("n", [1, 13, 40])
def test_gqa_sparse_attention_layer_matches_dense_float64(n):
    torch.manual_seed(n)
    pattern = Window(3) | Strided(4) | Global(first=2)
    attn = Attention(24, 6, 2, pattern, backend="reference").double()
    x = torch.randn(2, n, 24, dtype=torch.float64)
    pos = torch.arange(n)
    cos, sin = rotary_tables(pos, attn.head_dim, 10000.0)
    got = attn(x, cos.double(), sin.double())
    want = dense_attention(x, attn, pattern, pos)
    # Both float64: only summation order differs (~1e-15 relative).
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def full_loss(model: Transformer, tokens, labels):
    h = model.hidden(tokens)
    logits = h @ model.output_weight.t()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_and_gradients_equal_full_logits(tie, chunk):
    torch.manual_seed(1)
    model = Transformer(small_cfg(tie_embeddings=tie, loss_chunk=chunk)).double()
    tokens = torch.randint(0, 37, (2, 19))
    labels = torch.randint(0, 37, (2, 19))
    labels[0, :3] = IGNORE_INDEX
    total, count = model(tokens, labels)
    assert int(count) == 2 * 19 - 3
    total.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    full_loss(model, tokens, labels).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)
    per_token, _ = model(tokens, labels, per_token=True)
    assert per_token.shape == (2, 19) and (per_token[0, :3] == 0).all()
    torch.testing.assert_close(per_token.double().sum(), total.detach().double(), rtol=1e-6, atol=0)


def test_tied_and_untied_output():
    tied, untied = Transformer(small_cfg(tie_embeddings=True)), Transformer(small_cfg(tie_embeddings=False))
    assert tied.output_weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 37 * 24


@pytest.mark.parametrize("options", [{"activation_checkpointing": True, "mlp_chunk": 0},
                                     {"activation_checkpointing": True, "mlp_chunk": 5},
                                     {"activation_checkpointing": True, "mlp_chunk": 8}])
def test_checkpointing_and_mlp_chunks_change_nothing(options):
    """Recomputation and chunking reorder no sums that matter: float64 agrees to ~1e-15."""
    torch.manual_seed(2)
    tokens, labels = torch.randint(0, 37, (1, 23)), torch.randint(0, 37, (1, 23))
    grads = []
    for opts in ({}, options):
        torch.manual_seed(3)
        model = Transformer(small_cfg(**opts)).double()
        total, _ = model(tokens, labels)
        total.backward()
        grads.append((total.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-13, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_per_layer_patterns_and_flops():
    model = Transformer(small_cfg())
    assert model.layers[0].attn.pattern == Pattern(Window(5))
    assert Strided(4) in model.layers[1].attn.pattern.components
    n = 64
    attn = sum(layer.attn.pattern.describe(n, heads=6, dim=4)["useful_flops_fwd_bwd"] for layer in model.layers)
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # tied: embedding is the output head
    assert model.flops_per_token(n) == pytest.approx(6 * matmul + attn / n)


def test_flops_within_documents_count_only_the_pairs_inside_them():
    """Useful attention FLOPs per token within documents: the pairs of each sequence's documents, from a
    dense mask (pattern mask & same document), averaged over the batch's tokens."""
    from sparse_parallel.patterns import Documents

    model = Transformer(small_cfg())
    n, lengths = 64, [[1, 30, 33], [64]]
    docs = Documents.from_lengths(lengths)
    start, _ = docs.bounds(n, "cpu")
    same = start[:, :, None] == start[:, None, :]
    pairs = sum(int((layer.attn.pattern.mask(n)[None] & same).sum()) for layer in model.layers)
    attn = 3.5 * 4 * 6 * 4 * pairs  # fwd+bwd = 3.5 x the forward's 4 FLOPs per pair, head dim and head
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert model.flops_per_token(n, docs) == pytest.approx(6 * matmul + attn / (2 * n))
    assert model.flops_per_token(n, docs) < model.flops_per_token(n)
    # the trainer adds a step's attention work to the matmul part it counted once before partitioning
    matmul_part = model.flops_per_token(n) - model.attention_flops_per_token(n)
    assert matmul_part == pytest.approx(6 * matmul)
    assert matmul_part + model.attention_flops_per_token(n, docs) == pytest.approx(model.flops_per_token(n, docs))
