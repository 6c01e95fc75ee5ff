"""Loss by token position on held-out sequences, and the plots and tables of a run."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


@torch.no_grad()
def loss_by_position(engine, stream, geometry, buckets: int, device) -> list[dict]:
    """Mean loss in ``buckets`` equal ranges of global position over the held-out sequences.

    Collective over the world: data-parallel rank d takes held-out sequences d, d + dp, ...;
    a sequence-parallel rank scores only its slice, bucketed by global position.
    """
    n = geometry.context_length
    buckets = min(buckets, n)
    sums = torch.zeros(buckets, dtype=torch.float64)
    counts = torch.zeros(buckets, dtype=torch.float64)
    indices = stream.eval_indices()
    # Every data-parallel rank runs the same number of forwards (the SP exchange is collective).
    rounds = -(-len(indices) // geometry.data_parallel)
    was_training = engine.module.training
    engine.module.eval()
    for r in range(rounds):
        i = r * geometry.data_parallel + geometry.dp_rank
        batch = stream.read([indices[min(i, len(indices) - 1)]], geometry.start, geometry.end)
        losses = engine(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                        per_token=True)[0][0].double().cpu()
        if i < len(indices):
            b = batch.positions * buckets // n
            sums.index_add_(0, b, losses)
            counts.index_add_(0, b, torch.ones_like(losses))
    engine.module.train(was_training)
    both = torch.cat([sums, counts]).to(device)
    dist.all_reduce(both)
    sums, counts = both[:buckets].cpu(), both[buckets:].cpu()
    edges = [n * b // buckets for b in range(buckets + 1)]
    return [{"start": edges[b], "end": edges[b + 1], "tokens": int(counts[b]),
             "loss": float(sums[b] / counts[b]) if counts[b] else float("nan")} for b in range(buckets)]


def write_eval(run_dir: Path, table: list[dict], step: int) -> None:
    out = {"step": step, "buckets": table}
    (run_dir / "eval_by_position.json").write_text(json.dumps(out, indent=1))
    lines = ["start,end,tokens,loss"] + [f"{r['start']},{r['end']},{r['tokens']},{r['loss']:.6f}" for r in table]
    (run_dir / "eval_by_position.csv").write_text("\n".join(lines) + "\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    mids = [(r["start"] + r["end"]) / 2 for r in table]
    ax.plot(mids, [r["loss"] for r in table], marker="o")
    ax.set_xlabel("token position in the context")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"loss by position, step {step}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "eval_by_position.png", dpi=120)
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
