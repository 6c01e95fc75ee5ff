"""Packed documents (``data.document_mask``): offsets from the tokens, attention within them, held-out
loss within them, and runs that resume with the same boundaries at the same and another GPU count."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import CORPUS_BYTES, assert_same_losses, losses, run_ranks, tiny_config, write_config

from sparse_parallel.model import Transformer
from sparse_parallel.patterns import Documents
from sparse_parallel.training import REQUEUE_EXIT_CODE, evaluate, load_config
from sparse_parallel.training.config import ModelConfig, config_from_dict
from sparse_parallel.training.data import MixtureStream, TokenStream, document_offsets, open_stream, stdlib_files
from sparse_parallel.training.tokenizer import Tokenizer

EOS = 2
T = 9  # a token that is not EOS


# -- offsets from a sequence's tokens --------------------------------------------------------------
@pytest.mark.parametrize("tokens, offsets", [
    ([T, T, T, T], (0, 4)),                        # no EOS: the sequence is one document
    ([T, T, EOS, T, T], (0, 3, 5)),                # an EOS ends its document; the next starts after it
    ([EOS, T, T], (0, 1, 3)),                      # EOS first: the end of a document begun earlier
    ([T, T, EOS], (0, 3)),                         # EOS last: the next document begins in the next sequence
    ([T, EOS, EOS, EOS, T], (0, 2, 3, 4, 5)),      # consecutive EOS: 1-token documents
    ([T, EOS, T], (0, 2, 3)),                      # a 1-token document at the end
    ([EOS], (0, 1)),
    ([EOS, EOS], (0, 1, 2)),
])
def test_document_offsets(tokens, offsets):
    got = document_offsets(np.asarray(tokens, dtype=np.uint16), EOS)
    assert got == offsets
    Documents.from_offsets([got]).validate(len(tokens), 1)


def _stream(tmp_path, tokens, name="s") -> Path:
    path = tmp_path / f"{name}.bin"
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 100}))
    return path


def test_every_shard_of_a_sequence_reads_the_whole_sequence_documents(tmp_path):
    """A sequence-parallel rank reads only its slice of the tokens but the offsets of the whole sequence,
    so that its queries find their documents in earlier shards; they are the same for every shard rule."""
    rng = np.random.default_rng(0)
    tokens = np.where(rng.random(2000) < 0.08, EOS, 10 + rng.integers(0, 50, 2000))
    s = TokenStream(_stream(tmp_path, tokens), seq_len=97, eval_sequences=1, seed=0, eos_id=EOS)
    full = s.read([3, 11], 0, 97)
    for b, seq in enumerate((3, 11)):
        row = tokens[seq * 97: seq * 97 + 97]
        want = [0] + [i + 1 for i in range(96) if row[i] == EOS] + [97]
        assert list(full.documents.offsets[b]) == want
    assert full.documents.batch == 2 and max(len(r) for r in full.documents.offsets) > 3
    for start, end in ((0, 1), (1, 49), (49, 97), (96, 97)):
        part = s.read([3, 11], start, end)
        assert part.documents == full.documents
        assert part.tokens.tolist() == full.tokens[:, start:end].tolist()
    assert TokenStream(_stream(tmp_path, tokens), 97, 1, 0).read([3], 0, 97).documents is None
    # A mixture's batch holds each sequence's own offsets, from the source it came from.
    other = _stream(tmp_path, np.where(np.arange(2000) % 7 == 0, EOS, 11), "t")
    m = MixtureStream([s, TokenStream(other, 97, 1, 0, eos_id=EOS)], [1.0, 1.0], seed=0)
    g = [3, m.offsets[1] + 5]
    got = m.read(g, 20, 40).documents
    assert got.offsets[0] == full.documents.offsets[0]
    assert got.offsets[1] == m.streams[1].read([5], 0, 97).documents.offsets[0]


def test_position_within_the_document():
    docs = Documents.from_offsets([[0, 3, 4, 10], [0, 10]])
    got = evaluate.document_positions(docs, torch.arange(2, 8))
    assert got.tolist() == [[2, 0, 0, 1, 2, 3], [2, 3, 4, 5, 6, 7]]


# -- attention stays inside each document ----------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_packed_loss_is_the_sum_of_each_document_alone(checkpointing):
    """Loss and gradients of two packed sequences (float64, reference backend) equal the sums over
    their documents, each run as a sequence of its own at the same positions: no layer attends across
    a boundary.  The second layer attends to every earlier token, so any leak would show.  Checkpointed
    layers recompute in backward; they must see the documents too."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, loss_chunk=13,
                      attention_backend="reference", activation_checkpointing=checkpointing, mlp_chunk=16,
                      pattern={"components": [{"type": "window", "left": 5}]},
                      layer_patterns={1: {"components": [{"type": "window", "left": 1000}]}})
    cfg.validate()
    model = Transformer(cfg).double()
    n = 61
    tokens = torch.randint(3, 40, (2, n))
    for b, eos_at in enumerate(([0, 17, 18, 19, 45, 59], [30, 60])):
        tokens[b, eos_at] = EOS
    labels = torch.randint(3, 40, (2, n))
    documents = Documents.from_offsets([document_offsets(row.numpy(), EOS) for row in tokens])
    assert documents.offsets == ((0, 1, 18, 19, 20, 46, 60, 61), (0, 31, 61))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    packed, count = model(tokens, labels, torch.arange(n), documents=documents)
    assert int(count) == 2 * n
    packed_grads = grads(packed)
    alone = 0
    for b, row in enumerate(documents.offsets):
        for lo, hi in zip(row[:-1], row[1:]):
            alone = alone + model(tokens[b:b + 1, lo:hi], labels[b:b + 1, lo:hi], torch.arange(lo, hi))[0]
    alone_grads = grads(alone)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=0)
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # Without the documents the same sequences give another loss: the comparison can see a leak.
    with torch.no_grad():
        across = model(tokens, labels, torch.arange(n))[0]
    assert abs(float(across) - float(packed.detach())) > 1e-3


# -- training and resuming with documents ----------------------------------------------------------
PREEMPT_SCRIPT = """
import os, signal, sys
from sparse_parallel.training import data, __main__ as entry
orig = data.TokenStream.train_batch
def train_batch(self, consumed, *a, **k):
    if consumed == 4:
        os.kill(os.getpid(), signal.SIGUSR1)
    return orig(self, consumed, *a, **k)
data.TokenStream.train_batch = train_batch
entry.end_process(entry.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> Path:
    """A jsonl corpus of standard-library snippets, most of 5 to 60 characters, some of 100 to 300:
    several documents in most 64-token sequences, none in some."""
    rng = np.random.default_rng(0)
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(CORPUS_BYTES))[:150_000]
    docs, at = [], 0
    while at < len(text):
        size = int(rng.integers(5, 60)) if rng.random() < 0.85 else int(rng.integers(100, 300))
        docs.append(text[at:at + size])
        at += size
    path = tmp_path_factory.mktemp("short-documents") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _config(tmp_path, name, tokenizer_path, token_cache, corpus) -> Path:
    cfg = tiny_config(tokenizer_path, tmp_path / name, token_cache)
    cfg["data"].update(path=str(corpus), document_mask=True)
    return write_config(tmp_path / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tokenizer_path, token_cache, short_documents) -> Path:
    """8 uninterrupted SP=1 steps with document_mask on, a checkpoint every 2 steps."""
    base = tmp_path_factory.mktemp("packed")
    codes, out = run_ranks(_config(base, "run", tokenizer_path, token_cache, short_documents))
    assert codes == [0], out[-3000:]
    return base / "run"


def test_the_trainer_attends_within_the_documents_and_evaluates_by_them(packed_run):
    """Step 1's loss is the initial model's loss on the step's sequences within their documents, not
    across them; the held-out loss is reported by position within the document too."""
    cfg = load_config(packed_run / "config.yaml")
    stream = open_stream(cfg.data, Tokenizer(cfg.data.tokenizer), 64)
    batch = stream.train_batch(0, 0, 0, 1, 2, 0, 64)
    assert sum(len(row) - 2 for row in batch.documents.offsets) >= 2, batch.documents
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    with torch.no_grad():
        within = float(model(batch.tokens, batch.labels, batch.positions, documents=batch.documents)[0]) / 128
        across = float(model(batch.tokens, batch.labels, batch.positions)[0]) / 128
    first = losses(packed_run)[1]
    assert abs(first - within) <= 1e-6 * within and abs(first - across) > 1e-4, (first, within, across)
    by_position = json.loads((packed_run / "eval_by_position.json").read_text())["buckets"]
    by_document = json.loads((packed_run / "eval_by_document_position.json").read_text())["buckets"]
    assert [r["start"] for r in by_document] == [r["start"] for r in by_position] == [0, 16, 32, 48]
    assert sum(r["tokens"] for r in by_document) == sum(r["tokens"] for r in by_position) == 2 * 64
    # Documents restart the count: more tokens lie early in their document than early in the context.
    assert by_document[0]["tokens"] > by_position[0]["tokens"]
    assert (packed_run / "eval_by_document_position.png").is_file()


def test_a_packed_run_resumes_bitwise(tmp_path, packed_run, tokenizer_path, token_cache, short_documents):
    """Preempted in step 3 and resumed by the same one rank: the losses are the straight run's, bit for bit
    (the offsets come from the tokens of the sequences, which the consumed count names)."""
    cfg = _config(tmp_path, "run", tokenizer_path, token_cache, short_documents)
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT_SCRIPT)
    codes, out = run_ranks(cfg, script=script)
    assert codes == [REQUEUE_EXIT_CODE], out[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    codes, out = run_ranks(cfg, log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "run") == losses(packed_run)


def test_a_packed_run_resumes_at_another_gpu_count(tmp_path, packed_run, tokenizer_path, token_cache,
                                                   short_documents):
    """The one-rank step-4 checkpoint resumed by two sequence-parallel ranks (gloo): each holds half of
    every sequence, shards cut through documents, and steps 5..8 match the straight run up to float32
    summation order (1e-5 relative, as the parity tests of tests/training/test_training.py)."""
    cfg = _config(tmp_path, "sp2", tokenizer_path, token_cache, short_documents)
    codes, out = run_ranks(cfg, ["parallel.sequence_parallel=2", "train.tokens_per_gpu=32"], nprocs=2,
                           resume=str(packed_run / "checkpoints" / "step00000004"))
    assert codes == [0, 0], out[-3000:]
    assert_same_losses(tmp_path / "sp2", losses(packed_run), range(5, 9))
    for name in (evaluate.BY_POSITION, evaluate.BY_DOCUMENT_POSITION):
        want, have = (json.loads((run / f"{name}.json").read_text())["buckets"]
                      for run in (packed_run, tmp_path / "sp2"))
        assert [r["tokens"] for r in have] == [r["tokens"] for r in want], name
        for a, b in zip(have, want):
            assert not a["tokens"] or abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (name, a, b)


@pytest.mark.parametrize("value", ["always", 1, None])
def test_a_bad_document_mask_is_named(value):
    with pytest.raises(ValueError, match=r"data\.document_mask must be true or false, got "):
        config_from_dict({"data": {"tokenizer": "t.model", "document_mask": value}})
    assert config_from_dict({"data": {"tokenizer": "t.model"}}).data.document_mask is False


def test_the_eval_command_scores_a_packed_run_within_its_documents(packed_run, short_documents, tmp_path):
    """``sparse-parallel eval`` of a run trained within documents cuts the file's stream at the same EOS
    tokens: its loss is the model's loss within the documents, not across them."""
    from sparse_parallel.launcher.cli import main
    from sparse_parallel.training.data import build_token_cache
    from sparse_parallel.training.inference import load_run

    out = tmp_path / "eval"
    assert main(["eval", str(packed_run), "--data", str(short_documents), "--max-sequences", "3",
                 "--buckets", "4", "--out", str(out)]) == 0
    got = json.loads((out / "eval.json").read_text())["loss"]
    trained = load_run(packed_run, "auto")
    data = dataclasses.replace(trained.cfg.data, path=str(short_documents), eval_sequences=0, sources=[], exclude=[])
    cache = build_token_cache(data, trained.tokenizer)
    within, across = (evaluate.evaluate_model(trained.model, TokenStream(cache, 64, 0, 0, eos), [0, 1, 2], 4)[0]["loss"]
                      for eos in (trained.tokenizer.eos_id, None))
    assert abs(got - within) <= 1e-9 * within and abs(got - across) > 1e-4, (got, within, across)


def test_mfu_within_documents_counts_each_steps_documents(tmp_path, tokenizer_path, token_cache, short_documents):
    """With a peak given (``train.peak_tflops``) a step's MFU counts the attention work of that step's
    sequences within their documents: less than the whole-sequence pattern's."""
    cfg_path = _config(tmp_path, "mfu", tokenizer_path, token_cache, short_documents)
    codes, out = run_ranks(cfg_path, ["train.peak_tflops=1", "train.steps=2"])
    assert codes == [0], out[-3000:]
    cfg = load_config(tmp_path / "mfu" / "config.yaml")
    row = [json.loads(line) for line in (tmp_path / "mfu" / "metrics.jsonl").read_text().splitlines()][0]
    assert row["step"] == 1
    flops = row["mfu"] * 1e12 / row["tokens_per_s"]
    batch = open_stream(cfg.data, Tokenizer(cfg.data.tokenizer), 64).train_batch(0, 0, 0, 1, 2, 0, 64)
    model = Transformer(cfg.model)
    assert flops == pytest.approx(model.flops_per_token(64, batch.documents), rel=1e-9)
    assert flops < model.flops_per_token(64)
