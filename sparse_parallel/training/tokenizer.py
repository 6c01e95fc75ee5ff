"""Tokenizers: sentencepiece ``.model`` files and Hugging Face ``tokenizer.json`` files alike.

Train a sentencepiece one on a corpus here; load either kind and check it fits the model.  The run
identifies its tokenizer by the SHA-256 of the file (:func:`file_sha256`), which is what the token cache
is keyed by and what a resumed run can compare.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

#: Special ids every tokenizer made here has (sentencepiece's defaults, written out).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
#: End-of-document tokens looked up, in this order, in a Hugging Face tokenizer.json.
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


def file_sha256(path: str | os.PathLike, sync: bool = False) -> str:
    """SHA-256 (hex) of a file (a tokenizer's identity; a checkpoint file's checksum); ``sync``: also
    fsync it (it was just written)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


class Tokenizer:
    """A loaded tokenizer: ``encode``/``decode``, the end-of-document id, ``vocab_size`` and ``sha256``.

    ``path`` ending in ``.json`` is a Hugging Face ``tokenizers`` file; anything else a sentencepiece model.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data.tokenizer: {path} does not exist; make one with "
                                    "`sparse-parallel tokenizer train --input ... --vocab-size ...` or give a "
                                    "Hugging Face tokenizer.json")
        self.path = p
        self.sha256 = file_sha256(p)
        self.sp = self.hf = None
        if p.suffix == ".json":
            self._load_hf(p)
        else:
            self._load_sp(p)

    def _load_sp(self, p: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(p))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"data.tokenizer: {p} is not a sentencepiece model ({e}); a Hugging Face "
                             "tokenizer must be a .json file") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer: {p} has no end-of-sequence piece; documents are joined with it")

    def _load_hf(self, p: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError("data.tokenizer: a tokenizer.json needs the tokenizers package "
                              "(pip install tokenizers)") from None
        try:
            self.hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises its own exception type for unreadable files
            raise ValueError(f"data.tokenizer: {p} is not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        ids = [self.hf.token_to_id(t) for t in HF_EOS_TOKENS]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"data.tokenizer: {p} has none of the end-of-document tokens {list(HF_EOS_TOKENS)}; "
                             "documents are joined with one")
        self.eos_id = found[0]
        self.bos_id = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.hf is not None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return self.sp.Encode(texts)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.sp.Decode(ids)

    def __getstate__(self):  # tokenisation in worker processes receives the path and loads it there
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size != self.vocab_size:
            raise ValueError(f"model.vocab_size={vocab_size} but the tokenizer {self.path} has "
                             f"{self.vocab_size} pieces; set model.vocab_size={self.vocab_size}")


def train_tokenizer(documents, out: str | os.PathLike, vocab_size: int, model_type: str = "bpe",
                    max_sentences: int = 2_000_000, overwrite: bool = False) -> Path:
    """Train a sentencepiece model on ``documents`` (an iterable of strings); write ``out`` (.model).

    Byte fallback is on, so any text (code, other scripts) encodes without <unk>.
    The model is written to a temporary name and renamed, so ``out`` is never half-written.
    An existing ``out`` is an error unless ``overwrite``: runs that tokenised with it would no
    longer resume with the tokenizer they were trained with.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be one of ['bpe', 'unigram'], got {model_type!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        # 256 byte pieces + 3 specials + at least a few merges (rare characters fall back to bytes).
        raise ValueError(f"vocab_size must be an integer >= 300 (byte fallback needs 259 pieces), got {vocab_size!r}")
    out = Path(out)
    if out.suffix != ".model":
        raise ValueError(f"output must end in .model, got {out}")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; runs trained with it depend on it.  Choose another path, or "
                         "pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        text = Path(tmp) / "corpus.txt"
        n = 0
        with text.open("w", encoding="utf-8") as f:
            for doc in documents:
                for line in doc.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n += 1
        if n == 0:
            raise ValueError("the tokenizer corpus is empty")
        prefix = Path(tmp) / "tok"
        try:
            spm.SentencePieceTrainer.Train(
                input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
                character_coverage=0.9995, input_sentence_size=max_sentences, shuffle_input_sentence=False,
                max_sentence_length=16384, split_digits=True, allow_whitespace_only_pieces=True,
                remove_extra_whitespaces=False, normalization_rule_name="identity",
                num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:  # e.g. a vocabulary smaller than the corpus' characters + 259 byte/special pieces
            raise ValueError(f"vocab_size={vocab_size}: sentencepiece refused it ({str(e).split('] ')[-1]})") from None
        os.replace(f"{prefix}.model", out)
    return out
