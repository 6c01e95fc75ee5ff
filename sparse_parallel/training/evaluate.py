"""Loss by token position on held-out sequences, and the plots and tables of a run.

One accumulation serves the trainer (collective, over the DeepSpeed engine) and ``sparse-parallel
eval`` (one process, a trained model, any text file): per position bucket the sum of token losses,
of their squares and the token count, from which the mean, perplexity and a standard error follow.

With ``data.document_mask`` the trainer also buckets each token by its position within its document
(counted from where the document starts in the sequence: what the model can see of it), which is
how a packed model's loss falls with the context it actually has.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

#: Names (and files) of the held-out tables: by position in the context, and within the document.
BY_POSITION, BY_DOCUMENT_POSITION = "eval_by_position", "eval_by_document_position"
#: What each table's position is, for plots and TensorBoard tags.
AXES = {BY_POSITION: ("token position in the context", "pos"),
        BY_DOCUMENT_POSITION: ("token position within its document", "docpos")}


def _accumulate(acc: torch.Tensor, losses: torch.Tensor, positions: torch.Tensor, n: int) -> None:
    """Add per-token ``losses [n_local]`` at global ``positions`` into ``acc [3, buckets]``."""
    b = positions.cpu() * acc.shape[1] // n
    acc[0].index_add_(0, b, losses)
    acc[1].index_add_(0, b, losses * losses)
    acc[2].index_add_(0, b, torch.ones_like(losses))


def document_positions(documents, positions: torch.Tensor) -> torch.Tensor:
    """``[B, n_local]``: how far each of the global ``positions [n_local]`` lies from the start of its
    document, in each sequence of ``documents`` (a ``patterns.Documents``)."""
    out = []
    for row in documents.offsets:
        offsets = torch.tensor(row, dtype=positions.dtype)
        first = offsets[torch.searchsorted(offsets, positions.cpu(), right=True) - 1]
        out.append(positions.cpu() - first)
    return torch.stack(out)


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
def loss_by_position(engine, stream, layout, buckets: int, device) -> dict[str, list[dict]]:
    """Mean loss in ``buckets`` equal ranges of global position over the held-out sequences:
    ``{BY_POSITION: rows}``, and ``BY_DOCUMENT_POSITION`` (the same over position within the document)
    when the stream's sequences carry their documents.

    Collective over the world (``layout``: this rank's :class:`~.layout.Layout`): data-parallel rank d
    takes held-out sequences d, d + dp, ...; a sequence-parallel rank scores only its slice, bucketed by
    global position (every rank holds the whole sequence's documents).
    """
    n = layout.context_length
    acc = torch.zeros(2, 3, min(buckets, n), dtype=torch.float64)  # by position, by document position
    indices = stream.eval_indices()
    by_document = False
    # Every data-parallel rank runs the same number of forwards (the SP exchange is collective).
    rounds = -(-len(indices) // layout.data_parallel)
    was_training = engine.module.training
    engine.module.eval()
    for r in range(rounds):
        i = r * layout.data_parallel + layout.dp_rank
        batch = stream.read([indices[min(i, len(indices) - 1)]], layout.start, layout.end)
        losses = engine(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                        documents=batch.documents, per_token=True)[0][0].double().cpu()
        by_document = batch.documents is not None
        if i < len(indices):
            _accumulate(acc[0], losses, batch.positions, n)
            if by_document:
                _accumulate(acc[1], losses, document_positions(batch.documents, batch.positions)[0], n)
    engine.module.train(was_training)
    both = acc.flatten().to(device)
    dist.all_reduce(both)
    acc = both.cpu().view(acc.shape)
    tables = {BY_POSITION: _table(acc[0], n)}
    if by_document:
        tables[BY_DOCUMENT_POSITION] = _table(acc[1], n)
    return tables


@torch.no_grad()
def evaluate_model(model, stream, indices: list[int], buckets: int, batch_size: int = 1) -> tuple[dict, list[dict]]:
    """One process: (overall row, rows by position) of ``model`` (our Transformer) on sequences ``indices``
    (within their documents when the stream's sequences carry them)."""
    n = stream.seq_len
    acc = torch.zeros(3, min(buckets, n), dtype=torch.float64)
    device = next(model.parameters()).device
    for s in range(0, len(indices), batch_size):
        batch = stream.read(indices[s:s + batch_size], 0, n)
        losses = model(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                       documents=batch.documents, per_token=True)[0].double().cpu()
        for row in losses:
            _accumulate(acc, row, batch.positions, n)
    return overall(acc), _table(acc, n)


def write_eval(run_dir: Path, table: list[dict], step: int, name: str = BY_POSITION,
               title: str | None = None, extra: dict | None = None, xlabel: str = AXES[BY_POSITION][0]) -> None:
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
    ax.set_xlabel(f"{xlabel} (labels: tokens per bucket)")
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
