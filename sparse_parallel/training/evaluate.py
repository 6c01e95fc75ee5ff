"""Loss by token position on held-out sequences, and the plots and tables of a run.

One accumulation serves the trainer (collective, over the DeepSpeed engine) and ``sparse-parallel
eval`` (one process, a trained model, any text file): per position bucket the sum of token losses,
of their squares and the token count, from which the mean, perplexity and a standard error follow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


def _accumulate(acc: torch.Tensor, losses: torch.Tensor, positions: torch.Tensor, n: int) -> None:
    """Add per-token ``losses [n_local]`` at global ``positions`` into ``acc [3, buckets]``."""
    b = positions.cpu() * acc.shape[1] // n
    acc[0].index_add_(0, b, losses)
    acc[1].index_add_(0, b, losses * losses)
    acc[2].index_add_(0, b, torch.ones_like(losses))


def _table(acc: torch.Tensor, n: int) -> list[dict]:
    """Rows per bucket: range, tokens, mean loss, its standard error, perplexity.

    The standard error treats tokens as independent (tokens of one sequence are not, so it is a lower
    bound on the spread between corpora); it shows where buckets hold too few tokens to compare.
    """
    buckets = acc.shape[1]
    edges = [n * b // buckets for b in range(buckets + 1)]
    rows = []
    for b in range(buckets):
        s, sq, c = (float(x) for x in acc[:, b])
        mean = s / c if c else float("nan")
        var = max(sq / c - mean * mean, 0.0) * c / (c - 1) if c > 1 else float("nan")
        rows.append({"start": edges[b], "end": edges[b + 1], "tokens": int(c), "loss": mean,
                     "stderr": math.sqrt(var / c) if c > 1 else float("nan"),
                     "perplexity": math.exp(mean) if c else float("nan")})
    return rows


def overall(acc: torch.Tensor) -> dict:
    return _table(acc.sum(1, keepdim=True), 1)[0] | {"start": None, "end": None}


@torch.no_grad()
def loss_by_position(engine, stream, layout, buckets: int, device) -> list[dict]:
    """Mean loss in ``buckets`` equal ranges of global position over the held-out sequences.

    Collective over the world (``layout``: this rank's :class:`~.layout.Layout`): data-parallel rank d
    takes held-out sequences d, d + dp, ...; a sequence-parallel rank scores only its slice, bucketed by
    global position.
    """
    n = layout.context_length
    acc = torch.zeros(3, min(buckets, n), dtype=torch.float64)
    indices = stream.eval_indices()
    # Every data-parallel rank runs the same number of forwards (the SP exchange is collective).
    rounds = -(-len(indices) // layout.data_parallel)
    was_training = engine.module.training
    engine.module.eval()
    for r in range(rounds):
        i = r * layout.data_parallel + layout.dp_rank
        batch = stream.read([indices[min(i, len(indices) - 1)]], layout.start, layout.end)
        losses = engine(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                        per_token=True)[0][0].double().cpu()
        if i < len(indices):
            _accumulate(acc, losses, batch.positions, n)
    engine.module.train(was_training)
    both = acc.flatten().to(device)
    dist.all_reduce(both)
    return _table(both.cpu().view(3, -1), n)


@torch.no_grad()
def evaluate_model(model, stream, indices: list[int], buckets: int, batch_size: int = 1) -> tuple[dict, list[dict]]:
    """One process: (overall row, rows by position) of ``model`` (our Transformer) on sequences ``indices``."""
    n = stream.seq_len
    acc = torch.zeros(3, min(buckets, n), dtype=torch.float64)
    device = next(model.parameters()).device
    for s in range(0, len(indices), batch_size):
        batch = stream.read(indices[s:s + batch_size], 0, n)
        losses = model(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                       per_token=True)[0].double().cpu()
        for row in losses:
            _accumulate(acc, row, batch.positions, n)
    return overall(acc), _table(acc, n)


def write_eval(run_dir: Path, table: list[dict], step: int, name: str = "eval_by_position",
               title: str | None = None, extra: dict | None = None) -> None:
    """``<name>.json``, ``.csv`` and ``.png`` (mean loss per bucket with standard-error bars and token counts)."""
    run_dir = Path(run_dir)
    out = {"step": step, **(extra or {}), "buckets": table}
    (run_dir / f"{name}.json").write_text(json.dumps(out, indent=1))
    lines = ["start,end,tokens,loss,stderr"] + [
        f"{r['start']},{r['end']},{r['tokens']},{r['loss']:.6f},{r.get('stderr', float('nan')):.6f}" for r in table]
    (run_dir / f"{name}.csv").write_text("\n".join(lines) + "\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    mids = [(r["start"] + r["end"]) / 2 for r in table]
    errs = [0.0 if math.isnan(r.get("stderr", float("nan"))) else r["stderr"] for r in table]
    ax.errorbar(mids, [r["loss"] for r in table], yerr=errs, marker="o", capsize=3)
    for x, r in zip(mids, table):
        ax.annotate(f"{r['tokens']}", (x, r["loss"]), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=7)
    ax.set_xlabel("token position in the context (labels: tokens per bucket)")
    ax.set_ylabel("held-out loss (nats/token), ± 1 s.e.")
    ax.set_title(title or f"loss by position, step {step}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / f"{name}.png", dpi=120)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "loss_curve.png", dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
