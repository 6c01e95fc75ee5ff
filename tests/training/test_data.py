"""Data pipeline: sources, the tokenised cache, packing, and which rank reads what."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from sparse_parallel.parallel import SequenceParallel
from sparse_parallel.training.config import DataConfig
from sparse_parallel.training.data import (TokenStream, build_token_cache, iter_documents, resolve_files,
                                           stdlib_files)
from sparse_parallel.training.tokenizer import Tokenizer

DOCS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('hello')\n" * 5]


def data_cfg(tmp_path, tokenizer, **kw) -> DataConfig:
    cfg = DataConfig(tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"), **kw)
    cfg.validate()
    return cfg


def test_stdlib_subset_is_deterministic_and_bounded():
    a, b = stdlib_files(200_000), stdlib_files(200_000)
    assert a == b and len(a) > 1
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.suffix == ".py" and root in p.parents and "site-packages" not in str(p) for p in a)
    sizes = [p.stat().st_size for p in a]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)
    assert stdlib_files(400_000)[:len(a)] == a  # a larger subset extends the smaller one


def stream_of(docs, tok: Tokenizer) -> list[int]:
    out = []
    for ids in tok.encode(docs):
        out += ids + [tok.eos_id]
    return out


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_local_files_through_datasets_are_joined_with_eos(tmp_path, tokenizer_path, fmt):
    tok = Tokenizer(tokenizer_path)
    folder = tmp_path / "corpus"
    folder.mkdir()
    if fmt == "text":
        for i, d in enumerate(DOCS):
            (folder / f"doc{i}.txt").write_text(d)
    elif fmt == "jsonl":
        (folder / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": DOCS}), folder / "a.parquet")
    cfg = data_cfg(tmp_path, tokenizer_path, path=str(folder), text_field="body")
    files, got_fmt = resolve_files(cfg.path, cfg.format, cfg.max_bytes)
    assert got_fmt == fmt
    docs = list(iter_documents(files, got_fmt, cfg.text_field, tmp_path / "hf"))
    assert sorted(docs) == sorted(DOCS)
    path = build_token_cache(cfg, tok)
    meta = json.loads(path.with_suffix(".json").read_text())
    tokens = np.fromfile(path, dtype=meta["dtype"]).tolist()
    assert tokens == stream_of(docs, tok)
    assert meta["documents"] == 3 and tokens.count(tok.eos_id) == 3


def test_cache_is_reused_and_keyed_by_inputs(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    (tmp_path / "a.txt").write_text(DOCS[0])
    cfg = data_cfg(tmp_path, tokenizer_path, path=str(tmp_path / "a.txt"))
    first = build_token_cache(cfg, tok)
    stamp = first.stat().st_mtime_ns
    assert build_token_cache(cfg, tok) == first and first.stat().st_mtime_ns == stamp
    (tmp_path / "a.txt").write_text(DOCS[1])  # changed file -> another key
    assert build_token_cache(cfg, tok) != first


def test_bad_sources(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    with pytest.raises(FileNotFoundError, match="data.path: .*missing does not exist"):
        build_token_cache(data_cfg(tmp_path, tokenizer_path, path=str(tmp_path / "missing")), tok)
    (tmp_path / "r.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a field of the records; fields: \['content'\]"):
        build_token_cache(data_cfg(tmp_path, tokenizer_path, path=str(tmp_path / "r.jsonl")), tok)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="mixes formats"):
        resolve_files(str(mixed), "auto", 1)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        build_token_cache(data_cfg(tmp_path, tokenizer_path, path=str(tmp_path / "e.txt")), tok)


@pytest.fixture
def small_stream(tmp_path):
    """A synthetic cached stream 0, 1, 2, ... so every read can be checked by value."""
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "s.bin"
    tokens.tofile(path)
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1000}))
    return path


def test_packing_and_sequence_parallel_slices(small_stream):
    s = TokenStream(small_stream, seq_len=33, eval_sequences=2, seed=0)
    assert (s.n_train, s.n_eval) == ((1000 - 1) // 33 - 2, 2)
    full = s.read([4, 7], 0, 33)
    assert full.tokens[0].tolist() == list(range(4 * 33, 5 * 33))
    assert full.labels[0].tolist() == list(range(4 * 33 + 1, 5 * 33 + 1))
    for p in (1, 2, 3, 33):
        ctx = SequenceParallel()
        ctx.world_size = p  # only the shard rule is used here
        parts = [s.read([4, 7], *ctx.shard_range(33, r)) for r in range(p)]
        assert np.concatenate([b.tokens for b in parts], axis=1).tolist() == full.tokens.tolist()
        assert np.concatenate([b.labels for b in parts], axis=1).tolist() == full.labels.tolist()
        assert np.concatenate([b.positions for b in parts]).tolist() == list(range(33))


def test_order_is_seeded_disjoint_across_data_parallel_ranks_and_excludes_eval(small_stream):
    s = TokenStream(small_stream, seq_len=10, eval_sequences=3, seed=5)
    n = s.n_train
    epoch = [s.train_index(i) for i in range(n)]
    assert sorted(epoch) == list(range(n)) and epoch != list(range(n))
    assert not set(epoch) & set(s.eval_indices())
    assert [s.train_index(i) for i in range(n, 2 * n)] != epoch  # a new permutation each epoch
    other = TokenStream(small_stream, seq_len=10, eval_sequences=3, seed=6)
    assert [other.train_index(i) for i in range(n)] != epoch
    # One step at DP=2, micro batch 2, accumulation 2 takes samples consumed .. consumed+7, each once.
    seen = [i for micro in range(2) for rank in range(2)
            for i in s.train_batch(40, micro, rank, 2, 2, 0, 10).indices]
    assert seen == [s.train_index(40 + k) for k in range(8)]
    # ... which is exactly what DP=1 with micro batch 8 takes: the order does not depend on the layout.
    assert s.train_batch(40, 0, 0, 1, 8, 0, 10).indices == seen


def test_too_little_data_is_a_clear_error(small_stream):
    with pytest.raises(ValueError, match="not enough for data.eval_sequences=4"):
        TokenStream(small_stream, seq_len=300, eval_sequences=4, seed=0)


def test_tokenizer_command_trains_a_model(tmp_path, capsys):
    from sparse_parallel.launcher.cli import main

    (tmp_path / "c.txt").write_text("".join(DOCS) * 20)
    out = tmp_path / "t.model"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--vocab-size", "300",
                 "--out", str(out)]) == 0
    assert "300 pieces" in capsys.readouterr().out
    tok = Tokenizer(out)
    assert tok.vocab_size == 300 and tok.decode(tok.encode([DOCS[0]])[0]) == DOCS[0]
    with pytest.raises(ValueError, match="model.vocab_size=512 but the tokenizer .* has 300 pieces"):
        tok.check_vocab(512)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--vocab-size", "12",
                 "--out", str(tmp_path / "u.model")]) == 2
    assert "vocab_size must be an integer >= 300" in capsys.readouterr().err
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
