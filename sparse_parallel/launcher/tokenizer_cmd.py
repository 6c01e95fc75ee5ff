"""``sparse-parallel tokenizer train``: a sentencepiece model for a corpus (or the embedded default)."""
from __future__ import annotations

import time


def run_train(args) -> int:
    from ..training.data import iter_documents, resolve_files
    from ..training.tokenizer import Tokenizer, train_tokenizer

    files, fmt = resolve_files(args.input, args.format, args.max_bytes)
    t0 = time.time()
    out = train_tokenizer(iter_documents(files, fmt, args.text_field, args.hf_cache), args.out,
                          args.vocab_size, model_type=args.model_type, overwrite=args.overwrite)
    tok = Tokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} pieces from {len(files)} {fmt} file(s) in {time.time() - t0:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train sentencepiece tokenizers")
    psub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = psub.add_parser("train", help="train a sentencepiece model on local text")
    t.add_argument("--input", required=True,
                   help="'stdlib' (this Python's standard library source) or a text/jsonl/parquet file or folder")
    t.add_argument("--vocab-size", type=int, required=True, help="pieces in the model (>= 300)")
    t.add_argument("--out", default="tokenizer.model", help="output .model file (not replaced unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    t.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet records")
    t.add_argument("--max-bytes", type=int, default=8_000_000, help="stdlib: size of the deterministic subset")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--hf-cache", default=".cache/tokens/hf", help="HF datasets cache for jsonl/parquet/text")
    t.set_defaults(func=run_train)
