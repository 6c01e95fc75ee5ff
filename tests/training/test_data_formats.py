"""Data formats beyond plain files: compression, Arrow, save_to_disk, globs/excludes, errors, workers, tokenizer.json."""
from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from training_helpers import VOCAB, losses, run_ranks, run_together, tiny_config, write_config

from sparse_parallel.training.config import DataConfig
from sparse_parallel.training.data import (DataFileError, build_token_cache, iter_documents, resolve_files,
                                           stdlib_files)
from sparse_parallel.training.tokenizer import Tokenizer, file_sha256

DOCS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('héllo')\n" * 5, "import os\n"]


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".bz2":
        data = bz2.compress(data)
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _cfg(tmp_path, tokenizer, **kw) -> DataConfig:
    cfg = DataConfig(tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"), **kw)
    cfg.validate()
    return cfg


def _tokens(cfg, tok) -> list[int]:
    path = build_token_cache(cfg, tok)
    return np.fromfile(path, dtype=json.loads(path.with_suffix(".json").read_text())["dtype"]).tolist()


def _expected(docs, tok) -> list[int]:
    return [t for ids in tok.encode(docs) for t in ids + [tok.eos_id]]


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst", "a.jsonl.bz2", "a.txt.gz", "a.txt.zst",
                                  "a.arrow", "saved", "saved_dict"])
def test_formats_read_their_documents(tmp_path, tokenizer_path, name):
    tok = Tokenizer(tokenizer_path)
    pytest.importorskip("zstandard") if name.endswith(".zst") else None
    import datasets

    docs = DOCS
    if name.startswith("a.jsonl"):
        path = _write(tmp_path / name, _jsonl(DOCS))
    elif name.startswith("a.txt"):
        docs = ["\n".join(DOCS)]  # one text file is one document
        path = _write(tmp_path / name, docs[0].encode())
    else:
        ds = datasets.Dataset.from_dict({"body": DOCS})
        if name == "a.arrow":
            path = tmp_path / "arrow"
            ds.save_to_disk(str(path))
            path = next(path.glob("*.arrow"))
        elif name == "saved":
            path = tmp_path / "saved"
            ds.save_to_disk(str(path))
        else:
            path = tmp_path / "saved_dict"
            datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    cfg = _cfg(tmp_path, tokenizer_path, path=str(path), text_field="body")
    files, fmt = resolve_files(cfg.path, cfg.format, cfg.max_bytes)
    assert list(iter_documents(files, fmt, cfg.text_field, tmp_path / "hf")) == docs
    assert _tokens(cfg, tok) == _expected(docs, tok)


def test_globs_and_excludes(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    _write(corpus / "a.jsonl", _jsonl(DOCS[:2]))
    _write(corpus / "sub" / "b.jsonl.gz", _jsonl(DOCS[2:]))
    (corpus / "README.md").write_text("# about this corpus\n")
    with pytest.raises(ValueError, match=r"mixes formats .*data.exclude"):
        resolve_files(str(corpus), "auto", 1)
    files, fmt = resolve_files(str(corpus), "auto", 1, exclude=["README*"])
    assert fmt == "jsonl" and [f.name for f in files] == ["a.jsonl", "b.jsonl.gz"]
    files, _ = resolve_files(str(corpus / "**" / "*.jsonl*"), "auto", 1)
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz"]
    files, _ = resolve_files(str(corpus / "**" / "*.jsonl*"), "auto", 1, exclude=["sub/*"])
    assert [f.name for f in files] == ["a.jsonl"]
    with pytest.raises(FileNotFoundError, match="no files match the glob"):
        resolve_files(str(corpus / "*.parquet"), "auto", 1)
    with pytest.raises(ValueError, match=r"data.exclude must be a list of glob patterns"):
        DataConfig(tokenizer="t.model", exclude="README*").validate()


def test_bad_lines_name_the_file_and_line(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    bad = _write(tmp_path / "bad.jsonl.gz", _jsonl(DOCS[:2]) + b'{"body": "x", \n')
    with pytest.raises(DataFileError, match=r"bad.jsonl.gz:3: malformed JSON line"):
        build_token_cache(_cfg(tmp_path, tokenizer_path, path=str(bad), text_field="body"), tok)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"latin.txt:2: not UTF-8"):
        build_token_cache(_cfg(tmp_path, tokenizer_path, path=str(latin)), tok)


def test_parallel_tokenisation_gives_the_same_tokens(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    docs = [p.read_text() for p in stdlib_files(60_000)]
    path = _write(tmp_path / "c.jsonl", _jsonl(docs))
    one = _tokens(_cfg(tmp_path / "1", tokenizer_path, path=str(path), text_field="body"), tok)
    two = _tokens(_cfg(tmp_path / "2", tokenizer_path, path=str(path), text_field="body", num_proc=2), tok)
    assert one == two == _expected(docs, tok)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    from tokenizers import models, pre_tokenizers, decoders, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator((p.read_text() for p in stdlib_files(200_000)), trainer)
    out = tmp_path_factory.mktemp("hf-tok") / "tokenizer.json"
    tk.save(str(out))
    return out


def test_tokenizer_json_loads_and_round_trips(hf_tokenizer, tmp_path):
    tok = Tokenizer(hf_tokenizer)
    assert tok.vocab_size == VOCAB and tok.eos_id == 1 and tok.sha256 == file_sha256(hf_tokenizer)
    ids = tok.encode(DOCS)
    assert [tok.decode(i) for i in ids] == DOCS
    (tmp_path / "no_eos.json").write_text(hf_tokenizer.read_text().replace("</s>", "<x>"))
    with pytest.raises(ValueError, match="none of the end-of-document tokens"):
        Tokenizer(tmp_path / "no_eos.json")


def test_jsonl_gz_with_tokenizer_json_trains_and_resumes(tmp_path, hf_tokenizer, token_cache):
    """A compressed jsonl corpus, read on its text field, with a tokenizer.json: 4 straight steps equal
    2 steps, a stop and 2 resumed steps."""
    docs = [p.read_text() for p in stdlib_files(150_000)]
    data = _write(tmp_path / "corpus.jsonl.gz", _jsonl(docs))
    base = tiny_config(hf_tokenizer, tmp_path / "run", token_cache)
    base["data"].update(path=str(data), text_field="body", num_proc=1)
    base["train"]["steps"] = 4
    cfg = write_config(tmp_path / "c.yaml", base)
    base["run"]["dir"] = str(tmp_path / "resumed")
    cfg2 = write_config(tmp_path / "c2.yaml", base)
    # The straight run and the first half of the stopped one side by side (both tokenise the corpus:
    # the cache is written atomically, whoever finishes last replaces it with the same tokens).
    for codes, out in run_together(dict(config=cfg), dict(config=cfg2, overrides=["train.steps=2"])):
        assert codes == [0], out[-3000:]
    straight = losses(tmp_path / "run")
    assert sorted(losses(tmp_path / "resumed")) == [1, 2]
    codes, out = run_ranks(cfg2)
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "resumed") == straight


def _synthetic(tmp_path, name, first, n=1000) -> Path:
    path = tmp_path / f"{name}.bin"
    np.arange(first, first + n, dtype=np.uint16).tofile(path)
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 60000}))
    return path


def test_mixture_follows_weights_and_is_a_function_of_the_sample_index(tmp_path):
    from sparse_parallel.training.data import MixtureStream, TokenStream

    def mixture():
        streams = [TokenStream(_synthetic(tmp_path, "a", 0), 10, 2, 0),
                   TokenStream(_synthetic(tmp_path, "b", 20000), 10, 2, 1)]
        return MixtureStream(streams, [3.0, 1.0], seed=7)

    m = mixture()
    firsts = [int(m.train_batch(c, 0, 0, 1, 1, 0, 10).tokens[0, 0]) for c in range(4000)]
    from_b = sum(t >= 20000 for t in firsts) / len(firsts)
    assert abs(from_b - 0.25) < 0.03, from_b
    # another process starting at sample 2500 (a resume) reads exactly what this one read there
    again = mixture()
    assert [int(again.train_batch(c, 0, 0, 1, 1, 0, 10).tokens[0, 0]) for c in range(2500, 2600)] == firsts[2500:2600]
    # within a source no sequence repeats before that source's epoch ends, and held-out ones never appear
    a_seqs = [t // 10 for t in firsts[:m.streams[0].n_train] if t < 20000]
    assert len(a_seqs) == len(set(a_seqs))
    held = {int(m.read([g], 0, 10).tokens[0, 0]) for g in m.eval_indices()}
    assert len(held) == 4 and not held & set(firsts)
    other = MixtureStream(mixture().streams, [3.0, 1.0], seed=8)
    assert [int(other.train_batch(c, 0, 0, 1, 1, 0, 10).tokens[0, 0]) for c in range(100)] != firsts[:100]


def test_mixture_of_sources_trains_and_resumes_bitwise(tmp_path, tokenizer_path, token_cache):
    docs = [p.read_text() for p in stdlib_files(150_000)]
    gz = _write(tmp_path / "a.jsonl.gz", _jsonl(docs[: len(docs) // 2]))
    txt = tmp_path / "b"
    txt.mkdir()
    for i, d in enumerate(docs[len(docs) // 2:]):
        (txt / f"{i}.txt").write_text(d)
    base = tiny_config(tokenizer_path, tmp_path / "run", token_cache)
    base["data"].update(path="stdlib", sources=[{"path": str(gz), "weight": 3, "text_field": "body"},
                                                {"path": str(txt), "weight": 1}])
    base["train"]["steps"] = 4
    cfg = write_config(tmp_path / "m.yaml", base)
    base["run"]["dir"] = str(tmp_path / "resumed")
    cfg2 = write_config(tmp_path / "m2.yaml", base)
    for codes, out in run_together(dict(config=cfg), dict(config=cfg2, overrides=["train.steps=2"])):
        assert codes == [0], out[-3000:]
    assert sorted(losses(tmp_path / "resumed")) == [1, 2]
    codes, out = run_ranks(cfg2)
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "run")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wieght'\] in data.sources\[0\]"):
        DataConfig(tokenizer="t.model", sources=[{"path": "x", "wieght": 1}]).validate()
    with pytest.raises(ValueError, match=r"data.sources\[0\].weight must be a number > 0"):
        DataConfig(tokenizer="t.model", sources=[{"path": "x", "weight": 0}]).validate()
