"""The data pipeline: local corpus -> cached token stream -> packed, sharded sequences.

* Sources: ``stdlib`` (this Python's standard library sources, a deterministic
  subset; needs no download) or local files through HF ``datasets`` (text,
  jsonl with a text field, parquet, or a folder of them).
* Tokenisation runs once and is cached on disk under a key of the file list
  (paths, sizes, mtimes), the format and the tokenizer's bytes.  Documents are
  joined with EOS into one stream of token ids.
* Sequence ``s`` of length L is ``stream[s*L : s*L + L + 1]`` (inputs and the
  labels shifted by one).  The last ``eval_sequences`` sequences are held out.
* Order: global sample ``c`` is ``perm(epoch)[c % n_train]`` with a permutation
  drawn from (seed, epoch); the only state is ``consumed`` (samples taken), which
  checkpoints save.  A data-parallel rank takes its own sequences of each step;
  a sequence-parallel rank reads only its slice of each (``SequenceParallel.shard_range``).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import Tokenizer

FORMATS_BY_SUFFIX = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".jsonl": "jsonl",
                     ".json": "jsonl", ".parquet": "parquet"}
_BUILDER = {"text": "text", "jsonl": "json", "parquet": "parquet"}


# -- sources ----------------------------------------------------------------
def stdlib_files(max_bytes: int) -> list[Path]:
    """A deterministic subset (about ``max_bytes``) of this Python's standard library ``.py`` files.

    Files are ordered by a hash of their path relative to the library root, so the
    choice does not depend on directory listing order; site-packages is excluded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not p.is_file():
            continue
        files.append((hashlib.sha1(rel.encode()).hexdigest(), p))
    files.sort()
    out, total = [], 0
    for _, p in files:
        size = p.stat().st_size
        if size == 0:
            continue
        out.append(p)
        total += size
        if total >= max_bytes:
            break
    if not out:
        raise FileNotFoundError(f"data.path=stdlib: no .py files under {root}")
    return out


def resolve_files(path: str, fmt: str, max_bytes: int) -> tuple[list[Path], str]:
    """Files and their format for ``data.path`` / ``data.format``."""
    if path == "stdlib":
        return stdlib_files(max_bytes), "stdlib"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FORMATS_BY_SUFFIX
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ValueError(f"data.path: folder {path} holds no files with a suffix in "
                             f"{sorted(FORMATS_BY_SUFFIX)}")
    else:
        files = [p]
    if fmt == "auto":
        kinds = {FORMATS_BY_SUFFIX.get(f.suffix, "text") for f in files}
        if len(kinds) > 1:
            raise ValueError(f"data.path: {path} mixes formats {sorted(kinds)}; set data.format or split it")
        fmt = kinds.pop()
    return files, fmt


def iter_documents(files: list[Path], fmt: str, text_field: str, hf_cache: Path):
    """Yield the text of every document."""
    if fmt == "stdlib":
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; never reach a hub
    import datasets

    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(_BUILDER[fmt], data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(hf_cache), **kwargs)
    except Exception as e:  # datasets raises many types for malformed files
        raise ValueError(f"data.path: could not read {len(files)} {fmt} file(s) ({type(e).__name__}: {e})") from None
    column = "text" if fmt == "text" else text_field
    if column not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a field of the records; fields: {ds.column_names}")
    for record in ds:
        text = record[column]
        if text:
            yield str(text)


# -- tokenised cache ---------------------------------------------------------
def cache_key(files: list[Path], fmt: str, text_field: str, tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([fmt, text_field]).encode())
    h.update(hashlib.sha256(tokenizer.path.read_bytes()).digest())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def build_token_cache(cfg, tokenizer: Tokenizer) -> Path:
    """Tokenise the corpus of ``cfg`` (a DataConfig) once; return the ``.bin`` path (reused if present)."""
    files, fmt = resolve_files(cfg.path, cfg.format, cfg.max_bytes)
    cache = Path(cfg.cache_dir)
    key = cache_key(files, fmt, cfg.text_field, tokenizer)
    out = cache / f"{key}.bin"
    if out.is_file() and (cache / f"{key}.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp = cache / f".{key}.{socket.gethostname()}.{os.getpid()}.tmp"
    n_tokens, n_docs, batch = 0, 0, []

    def flush(f):
        nonlocal n_tokens
        for ids in tokenizer.encode(batch):
            arr = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
            f.write(arr.tobytes())
            n_tokens += len(arr)
        batch.clear()

    with tmp.open("wb") as f:
        for doc in iter_documents(files, fmt, cfg.text_field, cache / "hf"):
            batch.append(doc)
            n_docs += 1
            if len(batch) >= 256:
                flush(f)
        flush(f)
    if n_tokens == 0:
        tmp.unlink()
        raise ValueError(f"data.path: {cfg.path} holds no text")
    meta = {"tokens": n_tokens, "documents": n_docs, "dtype": np.dtype(dtype).name, "format": fmt,
            "files": len(files), "tokenizer": str(tokenizer.path), "vocab_size": tokenizer.vocab_size}
    meta_tmp = tmp.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    os.replace(meta_tmp, cache / f"{key}.json")
    return out


# -- packed, sharded sequences ----------------------------------------------
@dataclass
class Batch:
    tokens: torch.Tensor      # [B, n_local] int64
    labels: torch.Tensor      # [B, n_local] int64
    positions: torch.Tensor   # [n_local] global positions of this slice
    indices: list[int]        # sequence indices in the stream


class TokenStream:
    """Packed sequences of ``seq_len`` over a cached token file."""

    def __init__(self, bin_path: str | os.PathLike, seq_len: int, eval_sequences: int, seed: int):
        bin_path = Path(bin_path)
        meta = json.loads(bin_path.with_suffix(".json").read_text())
        self.tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.vocab_size = meta["vocab_size"]
        self.seq_len, self.seed = seq_len, seed
        n = (len(self.tokens) - 1) // seq_len
        self.n_eval = eval_sequences
        self.n_train = n - eval_sequences
        if self.n_train < 1:
            raise ValueError(f"the corpus has {len(self.tokens)} tokens: {n} sequences of {seq_len}, not enough "
                             f"for data.eval_sequences={eval_sequences} plus training; use more data "
                             "(data.max_bytes, data.path) or a shorter context (train.tokens_per_gpu)")
        self._perm_epoch, self._perm = -1, None

    def train_index(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n_train)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def eval_indices(self) -> list[int]:
        return list(range(self.n_train, self.n_train + self.n_eval))

    def read(self, indices: list[int], start: int, end: int) -> Batch:
        """Slice ``[start, end)`` of the given sequences: only those tokens are read."""
        rows = [np.asarray(self.tokens[s * self.seq_len + start: s * self.seq_len + end + 1], dtype=np.int64)
                for s in indices]
        arr = torch.from_numpy(np.stack(rows))
        return Batch(arr[:, :-1].contiguous(), arr[:, 1:].contiguous(), torch.arange(start, end), list(indices))

    def train_batch(self, consumed: int, micro_step: int, dp_rank: int, dp_size: int, micro_batch: int,
                    start: int, end: int) -> Batch:
        """This rank's micro batch ``micro_step`` of the step that begins at sample ``consumed``."""
        first = consumed + (micro_step * dp_size + dp_rank) * micro_batch
        return self.read([self.train_index(first + b) for b in range(micro_batch)], start, end)
