"""``sparse-parallel export``: a run's checkpoint as a Hugging Face Llama-style folder."""
from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from ..hf.convert import write_hf_folder
    from ..training.inference import load_run

    trained = load_run(args.run_dir, args.checkpoint)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty; pass --force to write into it")
    write_hf_folder(trained.model, trained.cfg.model, out, trained.context_length, trained.tokenizer)
    print(f"wrote {out} from {trained.checkpoint}: load it with transformers' AutoModelForCausalLM.from_pretrained"
          f"({str(out)!r}, attn_implementation='sparse_parallel') after sparse_parallel.hf.register()")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as a Hugging Face folder (config.json + safetensors)",
                       description="Write config.json, model.safetensors and the tokenizer of a run's checkpoint "
                                   "into a folder that transformers loads as LlamaForCausalLM.  The attention "
                                   "patterns are stored in config.json; run them with the 'sparse_parallel' "
                                   "attention implementation (sparse_parallel.hf.register()).")
    p.add_argument("run_dir", help="run directory (run.dir of the training config)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--checkpoint", default="auto", help="'auto' (the latest) or a checkpoint path")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=run)
