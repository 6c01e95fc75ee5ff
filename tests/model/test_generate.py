"""Decoding with the pattern-pruned cache equals recomputation; the generate and eval commands."""
from __future__ import annotations

import json

import pytest
import torch

from sparse_parallel.launcher.cli import main
from sparse_parallel.model import Transformer
from sparse_parallel.model.generate import generate, new_cache
from sparse_parallel.training.config import ModelConfig

PATTERNS = {
    "window+strided+global": {"components": [{"type": "window", "left": 6}, {"type": "strided", "stride": 5, "span": 30},
                                             {"type": "global", "first": 2, "queries": False}]},
    "dilated": {"components": [{"type": "dilated", "window": 4, "levels": 2}]},
    "global queries": {"components": [{"type": "window", "left": 3}, {"type": "global", "positions": [40]}]},
    "random blocks": {"components": [{"type": "window", "left": 3},
                                     {"type": "random_blocks", "block": 16, "per_query_block": 1}]},
}


def _model(pattern, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_backend="reference",
                      pattern=pattern)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_greedy_decoding_equals_recomputation(name):
    model = _model(PATTERNS[name])
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    fast, fast_logits, cache = generate(model, prompt, 64, return_logits=True)
    slow, slow_logits, _ = generate(model, prompt, 64, use_cache=False, return_logits=True)
    assert torch.equal(fast, slow)
    assert (fast_logits - slow_logits).abs().max().item() < 1e-5
    total = prompt.shape[1] + 64
    kept = [len(c.pos) for c in cache]
    if name == "random blocks":  # block lists may pick any earlier block: everything stays, and it says so
        assert kept == [total - 1] * 2 and "RandomBlocks" in cache[0].keeps_all
    elif name == "window+strided+global":
        # window 6 (+ the current key), stride-5 keys within span 30, 2 global keys
        last = total - 2
        expected = {j for j in range(total - 1) if last + 1 - j <= 6 or (j % 5 == 0 and last + 1 - j < 30) or j < 2}
        assert sorted(cache[0].pos.tolist()) == sorted(expected)


def test_sampling_is_seeded_and_top_p_restricts():
    model = _model(PATTERNS["dilated"])
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=5)
    assert torch.equal(a, generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=5))
    assert not torch.equal(a, generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=6))
    # a vanishing nucleus is greedy decoding
    assert torch.equal(generate(model, prompt, 20, temperature=1.0, top_p=1e-9, seed=7), generate(model, prompt, 20))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)


def test_non_causal_pattern_is_refused():
    model = _model({"components": [{"type": "window", "left": 3, "right": 3}], "causal": False})
    with pytest.raises(ValueError, match="causal"):
        new_cache(model, 10)


def test_generate_command(straight_run, capsys):
    assert main(["generate", str(straight_run), "--prompt", "def ", "--max-new-tokens", "12", "--no-stop"]) == 0
    text = capsys.readouterr().out
    from sparse_parallel.training.inference import load_run

    trained = load_run(straight_run)
    prompt = torch.tensor([trained.tokenizer.encode(["def "])[0]])
    ids = generate(trained.model, prompt, 12)[0, prompt.shape[1]:].tolist()
    assert text.endswith("def " + trained.tokenizer.decode(ids) + "\n")


def test_eval_command_writes_json_and_png(straight_run, tmp_path, capsys):
    data = tmp_path / "held_out.txt"
    import inspect

    data.write_text(inspect.getsource(json) * 3)
    out = tmp_path / "eval"
    assert main(["eval", str(straight_run), "--data", str(data), "--buckets", "4", "--max-sequences", "5",
                 "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
    rows = result["buckets"]
    assert result["sequences"] == 5 and [r["tokens"] for r in rows] == [5 * 16] * 4
    assert sum(r["tokens"] for r in rows) == result["tokens"]
    # the overall loss is the token-weighted mean of the buckets'
    assert abs(sum(r["loss"] * r["tokens"] for r in rows) / result["tokens"] - result["loss"]) < 1e-9
    assert abs(result["perplexity"] - 2.718281828459045 ** result["loss"]) < 1e-6
    assert all(r["stderr"] > 0 for r in rows)
