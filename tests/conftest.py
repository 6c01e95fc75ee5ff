"""Session fixtures shared by the whole suite, and ``tests/`` on the import path of every test module
(for ``dist_utils``, ``tolerance`` and ``training_helpers``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training_helpers import CORPUS_BYTES, VOCAB, run_ranks, tiny_config, write_config


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from sparse_parallel.training.data import iter_documents, stdlib_files
    from sparse_parallel.training.tokenizer import train_tokenizer

    out = tmp_path_factory.getbasetemp() / "tokenizer" / f"stdlib{VOCAB}.model"
    if not out.is_file():
        train_tokenizer(iter_documents(stdlib_files(CORPUS_BYTES), "stdlib", "text", None), out, VOCAB)
    return out


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "token-cache"


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tokenizer_path, token_cache) -> Path:
    """8 uninterrupted SP=1 steps, a checkpoint every 2 steps: the run others compare against.

    Made once per session.
    """
    base = tmp_path_factory.getbasetemp() / "straight"
    if not (base / "run" / "summary.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        cfg = write_config(base / "tiny.yaml", tiny_config(tokenizer_path, base / "run", token_cache))
        codes, out = run_ranks(cfg)
        assert codes == [0], out[-3000:]
    return base / "run"

