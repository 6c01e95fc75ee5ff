"""``sparse-parallel eval``: held-out loss and perplexity of a run's model on a text file, by position."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


def run(args) -> int:
    import torch

    from ..training import evaluate
    from ..training.data import TokenStream, build_token_cache
    from ..training.inference import load_run

    trained = load_run(args.run_dir, args.checkpoint)
    n = args.context or trained.context_length
    data_cfg = dataclasses.replace(trained.cfg.data, path=args.data, format=args.format,
                                   text_field=args.text_field or trained.cfg.data.text_field, eval_sequences=0,
                                   sources=[], exclude=[])
    data_cfg.validate()
    # A model trained within documents is scored within them too (documents end at each EOS).
    eos = trained.tokenizer.eos_id if data_cfg.document_mask else None
    stream = TokenStream(build_token_cache(data_cfg, trained.tokenizer), n, 0, 0, eos)
    count = stream.n_train if not args.max_sequences else min(args.max_sequences, stream.n_train)
    if args.device != "cpu":
        trained.model.to(args.device)
    with torch.no_grad():
        total, table = evaluate.evaluate_model(trained.model, stream, list(range(count)), args.buckets,
                                               args.batch_size)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    extra = {"data": str(args.data), "checkpoint": str(trained.checkpoint), "context_length": n,
             "sequences": count, "tokens": total["tokens"], "loss": total["loss"], "loss_stderr": total["stderr"],
             "perplexity": total["perplexity"]}
    step = int(trained.checkpoint.name.removeprefix("step") or 0) if trained.checkpoint.name.startswith("step") else 0
    evaluate.write_eval(out, table, step, name="eval", extra=extra,
                        title=f"{Path(args.data).name}: loss by position ({total['tokens']} tokens)")
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extra.items()}))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.png'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and perplexity of a run's model on a file, by position",
                       description="Tokenise --data with the run's tokenizer (any format data.path takes), cut "
                                   "it into sequences of the run's context length and write eval.json, eval.csv "
                                   "and eval.png (loss per position bucket, standard errors, token counts).")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--data", required=True, help="text/jsonl/parquet file or folder")
    p.add_argument("--format", default="auto", help="as data.format")
    p.add_argument("--text-field", default="", help="as data.text_field (default: the run's)")
    p.add_argument("--context", type=int, default=0, help="sequence length (default: the run's context)")
    p.add_argument("--buckets", type=int, default=8, help="position buckets")
    p.add_argument("--max-sequences", type=int, default=0, help="score at most this many sequences (0: all)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--checkpoint", default="auto", help="'auto' (the latest) or a checkpoint path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval)")
    p.set_defaults(func=run)
