"""``sparse-parallel generate``: continue a prompt with a trained run's model (one process, CPU or one GPU)."""
from __future__ import annotations

import sys


def run(args) -> int:
    import torch

    from ..model.generate import generate
    from ..training.inference import load_run

    trained = load_run(args.run_dir, args.checkpoint)
    if args.device != "cpu":
        trained.model.to(args.device)
    tok = trained.tokenizer
    ids = tok.encode([args.prompt])[0] if args.prompt else []
    if not ids:  # an empty prompt starts a new document, as after an end-of-document token in training
        ids = [tok.eos_id]
    prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
    out, _, cache = generate(trained.model, prompt, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                             eos_id=None if args.no_stop else tok.eos_id, return_logits=True)
    new = out[0, prompt.shape[1]:].tolist()
    if tok.eos_id in new and not args.no_stop:
        new = new[:new.index(tok.eos_id)]
    print(args.prompt + tok.decode(new), flush=True)
    for i, c in enumerate(cache or ()):
        if c.keeps_all or args.verbose:  # a cache that cannot shrink is always said
            why = f"keeps every key: {c.keeps_all}" if c.keeps_all else "keeps only keys the pattern can still reach"
            print(f"layer {i}: {len(c.pos)} of {out.shape[1]} keys cached ({why})", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a run's model",
                       description="Decode from a run's latest checkpoint: greedy at --temperature 0, else "
                                   "sampling with nucleus (--top-p) filtering, reproducible with --seed.  The "
                                   "key/value cache keeps only the keys the layer's pattern can still attend to "
                                   "(a window its last W keys, strided levels their own keys, global keys); "
                                   "layers with block-list components keep every key.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="auto", help="'auto' (the latest) or a checkpoint path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--verbose", action="store_true", help="report how many keys each layer's cache kept")
    p.set_defaults(func=run)
