"""The data pipeline: local corpus -> cached token stream -> packed, sharded sequences.

* Sources: ``stdlib`` (this Python's standard library sources, a deterministic
  subset; needs no download) or local files through HF ``datasets``: text, jsonl
  with a text field (both optionally .gz/.bz2/.zst), parquet, Arrow files, a folder
  or glob of them (minus ``data.exclude``), or a ``save_to_disk`` folder.  A line
  that is not UTF-8 or not JSON is an error naming the file and line.
* Tokenisation runs once (in ``data.num_proc`` processes) and is cached on disk
  under a key of the file list (paths, sizes, mtimes), the format and the
  tokenizer file's hash.  Documents are joined with EOS into one stream of token ids.
* Sequence ``s`` of length L is ``stream[s*L : s*L + L + 1]`` (inputs and the
  labels shifted by one).  The last ``eval_sequences`` sequences are held out.
* Order: global sample ``c`` is ``perm(epoch)[c % n_train]`` with a permutation
  drawn from (seed, epoch); the only state is ``consumed`` (samples taken), which
  checkpoints save.  A data-parallel rank takes its own sequences of each step;
  a sequence-parallel rank reads only its slice of each (its layout's ``start``/``end``).
* Documents (``data.document_mask``): a document starts at a sequence's first token and
  after every EOS of its inputs (:func:`document_offsets`).  The offsets are a function of
  the sequence's tokens alone, so a resumed run, at any GPU count, sees the same ones; a
  sequence-parallel rank scans the sequence's whole input row for them (its queries see
  keys of earlier shards), so every rank of a sequence holds the same offsets without a
  collective.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..patterns import Documents
from .tokenizer import Tokenizer

FORMATS_BY_SUFFIX = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".jsonl": "jsonl",
                     ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
#: compressed text/jsonl: the suffix after the format's (``a.jsonl.gz``); datasets decompresses them
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
#: ``format`` of a ``datasets`` ``save_to_disk`` folder
SAVED = "saved"
_BUILDER = {"text": "text", "jsonl": "json", "parquet": "parquet", "arrow": "arrow"}
FORMATS = ("auto", "text", "jsonl", "parquet", "arrow", SAVED)


class DataFileError(ValueError):
    """A line of a data file that cannot be read: names the file and the line."""


# -- sources ----------------------------------------------------------------
def stdlib_files(max_bytes: int) -> list[Path]:
    """A deterministic subset (about ``max_bytes``) of this Python's standard library ``.py`` files.

    Files are ordered by a hash of their path relative to the library root, so the
    choice does not depend on directory listing order; site-packages is excluded.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for top, dirs, names in os.walk(root):
        # Not walked at all: site-packages can hold far more files than the library itself, and every
        # rank of every run lists the library (a walk of all of it costs each process about a second).
        dirs[:] = [d for d in dirs if "site-packages" not in d and "dist-packages" not in d]
        for name in names:
            p = Path(top, name)
            rel = p.relative_to(root).as_posix()
            if not name.endswith(".py") or not p.is_file():
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


def file_format(f: Path) -> str | None:
    """The format a file's suffixes name (``a.jsonl.gz`` -> jsonl), or None."""
    suffixes = f.suffixes
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
        if suffixes and FORMATS_BY_SUFFIX.get(suffixes[-1]) in ("parquet", "arrow"):
            return None  # columnar files compress inside; a compressed one is not readable as such
    return FORMATS_BY_SUFFIX.get(suffixes[-1]) if suffixes else None


def is_saved_dataset(p: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return p.is_dir() and any((p / n).is_file() for n in ("state.json", "dataset_dict.json"))


def resolve_files(path: str, fmt: str, max_bytes: int, exclude=()) -> tuple[list[Path], str]:
    """Files and their format for ``data.path`` / ``data.format`` / ``data.exclude``.

    ``path``: ``stdlib``, a file, a folder (searched recursively), a ``save_to_disk`` folder, or a
    glob (``corpus/**/*.jsonl.gz``).  ``exclude``: globs matched against each file's path relative to
    the folder (or the glob's fixed prefix) and against its name.
    """
    if path == "stdlib":
        return stdlib_files(max_bytes), "stdlib"
    p = Path(path)
    if any(c in path for c in "*?["):
        root = Path(*[part for part in Path(path).parts[:next(i for i, part in enumerate(Path(path).parts)
                                                               if any(c in part for c in "*?["))]] or ["."])
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"data.path: no files match the glob {path}")
    elif not p.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    elif is_saved_dataset(p):
        if fmt not in ("auto", SAVED):
            _mismatch(path, fmt, SAVED)
        return [p], SAVED
    elif p.is_dir():
        root = p
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        root, files = p.parent, [p]
    files = [f for f in files if not _excluded(f, root, exclude)]
    if not files:
        raise ValueError(f"data.path: {path} holds no files with a suffix in {sorted(FORMATS_BY_SUFFIX)} "
                         f"(optionally compressed: {list(COMPRESSION_SUFFIXES)}) once data.exclude={list(exclude)} "
                         "is applied")
    if fmt == "auto":
        kinds = {file_format(f) or "text" for f in files}
        if len(kinds) > 1:
            by_kind = {k: [f.name for f in files if (file_format(f) or "text") == k][:3] for k in sorted(kinds)}
            raise ValueError(f"data.path: {path} mixes formats {by_kind}; set data.format, or leave files out "
                             "with data.exclude (e.g. ['README*'])")
        fmt = kinds.pop()
    elif fmt == SAVED:
        _mismatch(path, fmt, "files")
    return files, fmt


def _mismatch(path, fmt, actual) -> None:
    raise ValueError(f"data.format={fmt!r} but data.path {path} is {'a save_to_disk folder' if actual == SAVED else 'not a save_to_disk folder'}; "
                     f"use data.format='auto'")


def _excluded(f: Path, root: Path, patterns) -> bool:
    try:
        rel = f.relative_to(root).as_posix()
    except ValueError:
        rel = f.as_posix()
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(f.name, pat) for pat in patterns)


def load_records(files: list[Path], fmt: str, text_field: str, hf_cache: Path):
    """A ``datasets.Dataset`` of the files' records and the column holding the text."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only; never reach a hub
    import datasets

    if fmt == SAVED:
        ds = datasets.load_from_disk(str(files[0]))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"data.path: {files[0]} is a DatasetDict without a 'train' split; splits: "
                                 f"{list(ds)}; point data.path at one split's folder")
            ds = ds["train"]
    else:
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        try:
            ds = datasets.load_dataset(_BUILDER[fmt], data_files=[str(f) for f in files], split="train",
                                       cache_dir=str(hf_cache), **kwargs)
        except Exception as e:  # datasets raises many types for malformed files: find the line ourselves
            if fmt in ("text", "jsonl"):
                first_bad_line(files, fmt)
            raise ValueError(f"data.path: could not read {len(files)} {fmt} file(s) ({type(e).__name__}: {e})") from None
    column = "text" if fmt == "text" else text_field
    if column not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a field of the records; fields: {ds.column_names}")
    return ds, column


def _open(f: Path):
    if f.suffix == ".gz":
        import gzip

        return gzip.open(f, "rb")
    if f.suffix == ".bz2":
        import bz2

        return bz2.open(f, "rb")
    if f.suffix == ".zst":
        import zstandard

        return zstandard.open(f, "rb")
    return f.open("rb")


def first_bad_line(files: list[Path], fmt: str) -> None:
    """Raise DataFileError at the first line that is not UTF-8 (or, for jsonl, not a JSON object)."""
    for f in files:
        with _open(f) as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFileError(f"{f}:{number}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                                        "re-encode the file as UTF-8") from None
                if fmt == "jsonl" and line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataFileError(f"{f}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None
                    if not isinstance(record, dict):
                        raise DataFileError(f"{f}:{number}: a jsonl line must be a JSON object, got "
                                            f"{type(record).__name__}")


def iter_documents(files: list[Path], fmt: str, text_field: str, hf_cache: Path):
    """Yield the text of every document."""
    if fmt == "stdlib":
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    ds, column = load_records(files, fmt, text_field, hf_cache)
    for record in ds:
        text = record[column]
        if text:
            yield str(text)


# -- tokenised cache ---------------------------------------------------------
def cache_key(files: list[Path], fmt: str, text_field: str, tokenizer: Tokenizer) -> str:
    """Key of the token cache: format, text field, tokenizer file hash, and every input file's path,
    size and mtime (the files inside a ``save_to_disk`` folder).  Worker counts do not change the tokens."""
    h = hashlib.sha256()
    h.update(json.dumps([fmt, text_field]).encode())
    h.update(tokenizer.sha256.encode())
    for f in files:
        for g in (sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]):
            st = g.stat()
            h.update(f"{g.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _encode_batch(batch: dict, tokenizer: Tokenizer, column: str) -> dict:
    texts = [str(t) if t else "" for t in batch[column]]
    ids = tokenizer.encode([t for t in texts if t])
    it = iter(ids)
    return {"ids": [next(it) if t else [] for t in texts]}


def _token_batches(cfg, files: list[Path], fmt: str, tokenizer: Tokenizer, hf_cache: Path):
    """Token id lists of the non-empty documents, in corpus order (``data.num_proc`` processes)."""
    if fmt == "stdlib" or cfg.num_proc <= 1:
        batch = []
        for doc in iter_documents(files, fmt, cfg.text_field, hf_cache):
            batch.append(doc)
            if len(batch) >= 256:
                yield tokenizer.encode(batch)
                batch = []
        if batch:
            yield tokenizer.encode(batch)
        return
    ds, column = load_records(files, fmt, cfg.text_field, hf_cache)
    # datasets keeps the order of the records across its worker processes
    ids = ds.map(_encode_batch, batched=True, batch_size=256, num_proc=cfg.num_proc, remove_columns=ds.column_names,
                 fn_kwargs={"tokenizer": tokenizer, "column": column}, desc="tokenising",
                 cache_file_name=str(hf_cache / f"tokens-{os.getpid()}.arrow"), load_from_cache_file=False)
    for start in range(0, len(ids), 4096):
        yield [x for x in ids[start:start + 4096]["ids"] if x]


def build_token_cache(cfg, tokenizer: Tokenizer) -> Path:
    """Tokenise the corpus of ``cfg`` (a DataConfig) once; return the ``.bin`` path (reused if present)."""
    files, fmt = resolve_files(cfg.path, cfg.format, cfg.max_bytes, cfg.exclude)
    cache = Path(cfg.cache_dir)
    key = cache_key(files, fmt, cfg.text_field, tokenizer)
    out = cache / f"{key}.bin"
    if out.is_file() and (cache / f"{key}.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "hf").mkdir(exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp = cache / f".{key}.{socket.gethostname()}.{os.getpid()}.tmp"
    n_tokens, n_docs = 0, 0
    with tmp.open("wb") as f:
        for ids_batch in _token_batches(cfg, files, fmt, tokenizer, cache / "hf"):
            for ids in ids_batch:
                arr = np.asarray(list(ids) + [tokenizer.eos_id], dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += len(arr)
                n_docs += 1
    for leftover in (cache / "hf").glob(f"tokens-{os.getpid()}*.arrow"):
        leftover.unlink()
    if n_tokens == 0:
        tmp.unlink()
        raise ValueError(f"data.path: {cfg.path} holds no text")
    meta = {"tokens": n_tokens, "documents": n_docs, "dtype": np.dtype(dtype).name, "format": fmt,
            "files": len(files), "tokenizer": str(tokenizer.path), "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size}
    meta_tmp = tmp.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    os.replace(meta_tmp, cache / f"{key}.json")
    return out


# -- packed, sharded sequences ----------------------------------------------
def document_offsets(tokens: np.ndarray, eos_id: int) -> tuple[int, ...]:
    """Offsets ``(0, o_1, ..., n)`` of the documents in one sequence's input row ``tokens [n]``.

    A document starts at position 0 and after every EOS; an EOS ends the document it closes, so
    an EOS at the last position starts none, and one at position 0 (its document began in the
    previous sequence) or right after another EOS is a 1-token document.
    """
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens[:n - 1]) == eos_id) + 1
    return (0, *starts.tolist(), n)


@dataclass
class Batch:
    tokens: torch.Tensor      # [B, n_local] int64
    labels: torch.Tensor      # [B, n_local] int64
    positions: torch.Tensor   # [n_local] global positions of this slice
    indices: list[int]        # sequence indices in the stream
    #: the documents of each whole sequence (global offsets, one row per sequence); None without
    #: ``data.document_mask``
    documents: Documents | None = None


class TokenStream:
    """Packed sequences of ``seq_len`` over a cached token file.

    ``eos_id``: with it, every batch carries its sequences' documents (:func:`document_offsets`).
    """

    def __init__(self, bin_path: str | os.PathLike, seq_len: int, eval_sequences: int, seed: int,
                 eos_id: int | None = None):
        bin_path = Path(bin_path)
        meta = json.loads(bin_path.with_suffix(".json").read_text())
        self.tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.vocab_size = meta["vocab_size"]
        self.seq_len, self.seed, self.eos_id = seq_len, seed, eos_id
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
        return Batch(arr[:, :-1].contiguous(), arr[:, 1:].contiguous(), torch.arange(start, end), list(indices),
                     self.documents(indices))

    def documents(self, indices: list[int]) -> Documents | None:
        """The documents of the given whole sequences (None without ``eos_id``)."""
        if self.eos_id is None:
            return None
        n = self.seq_len
        return Documents.from_offsets([document_offsets(self.tokens[s * n: s * n + n], self.eos_id)
                                       for s in indices])

    def train_batch(self, consumed: int, micro_step: int, dp_rank: int, dp_size: int, micro_batch: int,
                    start: int, end: int) -> Batch:
        """This rank's micro batch ``micro_step`` of the step that begins at sample ``consumed``."""
        first = consumed + (micro_step * dp_size + dp_rank) * micro_batch
        return self.read([self.train_index(first + b) for b in range(micro_batch)], start, end)


# -- mixtures of sources -------------------------------------------------------
SOURCE_KEYS = ("path", "weight", "format", "text_field", "exclude")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def source_configs(cfg) -> list:
    """One DataConfig per source of ``cfg.sources`` (fields not given come from ``cfg``), or ``[cfg]``."""
    import dataclasses

    if not cfg.sources:
        return [cfg]
    return [dataclasses.replace(cfg, sources=[], **{k: v for k, v in s.items() if k != "weight"})
            for s in cfg.sources]


class MixtureStream:
    """Sequences drawn from several token streams with weights; the same interface as TokenStream.

    Global sample ``c`` comes from the source that a counter-based hash of (seed, c) selects with the
    sources' weights, and within it is that source's sample ``c`` (its own seeded epoch permutation),
    so the order is a function of ``consumed`` alone: deterministic and resumable with no extra state.
    Sequence ids are global: source s's sequences follow those of the sources before it.  Each source
    holds out ``eval_sequences`` x its weight (at least one when eval_sequences > 0).
    """

    def __init__(self, streams: list[TokenStream], weights: list[float], seed: int):
        self.streams, self.seed = streams, seed
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.cumulative = np.cumsum(self.weights)
        self.offsets = np.cumsum([0] + [s.n_train + s.n_eval for s in streams])
        self.seq_len = streams[0].seq_len
        self.n_train = sum(s.n_train for s in streams)

    def source_of(self, sample: int) -> int:
        u = _splitmix64((self.seed << 40) ^ sample) / 2.0 ** 64
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.streams) - 1)

    def train_index(self, sample: int) -> int:
        s = self.source_of(sample)
        return int(self.offsets[s]) + self.streams[s].train_index(sample)

    def eval_indices(self) -> list[int]:
        return [int(self.offsets[s]) + i for s, st in enumerate(self.streams) for i in st.eval_indices()]

    def read(self, indices: list[int], start: int, end: int) -> Batch:
        parts = []
        for g in indices:
            s = int(np.searchsorted(self.offsets, g, side="right")) - 1
            parts.append(self.streams[s].read([g - int(self.offsets[s])], start, end))
        documents = None
        if parts[0].documents is not None:
            documents = Documents.from_offsets([row for p in parts for row in p.documents.offsets])
        return Batch(torch.cat([p.tokens for p in parts]), torch.cat([p.labels for p in parts]), parts[0].positions,
                     list(indices), documents)

    def train_batch(self, consumed: int, micro_step: int, dp_rank: int, dp_size: int, micro_batch: int,
                    start: int, end: int) -> Batch:
        first = consumed + (micro_step * dp_size + dp_rank) * micro_batch
        return self.read([self.train_index(first + b) for b in range(micro_batch)], start, end)


def prepare_data(cfg, tokenizer: Tokenizer) -> list[Path]:
    """Build (or find) the token cache of every source of ``cfg`` (a DataConfig)."""
    return [build_token_cache(c, tokenizer) for c in source_configs(cfg)]


def open_stream(cfg, tokenizer: Tokenizer, seq_len: int):
    """The training stream of ``cfg``: a TokenStream, or a MixtureStream over ``cfg.sources``; with
    ``cfg.document_mask`` its batches carry their documents."""
    bins = prepare_data(cfg, tokenizer)
    eos = tokenizer.eos_id if cfg.document_mask else None
    if not cfg.sources:
        return TokenStream(bins[0], seq_len, cfg.eval_sequences, cfg.seed, eos)
    weights = [float(s.get("weight", 1.0)) for s in cfg.sources]
    total = sum(weights)
    streams = []
    for i, (b, w) in enumerate(zip(bins, weights)):
        held = max(1, round(cfg.eval_sequences * w / total)) if cfg.eval_sequences else 0
        try:
            streams.append(TokenStream(b, seq_len, held, cfg.seed + i, eos))
        except ValueError as e:
            raise ValueError(f"data.sources[{i}] ({cfg.sources[i]['path']}): {e}") from None
    return MixtureStream(streams, weights, cfg.seed)
