"""One rank's training process: process groups, DeepSpeed engine, the loop, checkpoints, outputs.

The ranks' layout (SP x DP sizes, shards, batch sizes, process groups) comes from :mod:`.layout`.

Gradients.  DeepSpeed is given no model-parallel unit, so it sees the whole
world (SP x DP ranks) as its data-parallel group and averages gradients over
it.  Each rank back-propagates ``SP x (its shard's loss sum) / (tokens of the
whole sequence)``: summed over the SP ranks of a sequence this is SP x the
sequence's mean loss, so the world average is exactly the mean over the DP
sequences of their mean loss -- the SP=1 gradient.  (The attention exchange
carries the key/value gradients back to the ranks that own them.)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import logging
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import rundir
from .config import TrainConfig, load_config
from .layout import Layout, build_layout

#: Exit code after a preemption checkpoint: the job should be requeued and resumed.
REQUEUE_EXIT_CODE = 85

#: Set once this process has started a process group (see :func:`end_process`).
_STARTED_PROCESS_GROUP = False


class CollectiveTimeout(RuntimeError):
    """A collective did not complete: a rank hung or stopped (``train.collective_timeout_s``) or died."""


class MetricsCorrupt(UserWarning):
    """metrics.jsonl ended in a torn line (a kill while it was written); the line is dropped."""

#: Dense bf16 peak per device (TFLOP/s) for the MFU estimate, by device-name substring.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> tuple[int, int, int, torch.device]:
    """Initialise the default process group from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.

    ``timeout_s`` bounds every collective of the group (and of the groups made from it).
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; start ranks with "
                             "torchrun or `sparse-parallel launch`")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    # DeepSpeed reads LOCAL_RANK and the accelerator choice from the environment.
    os.environ["LOCAL_RANK"] = str(local_rank)
    cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed makes its own groups (its data-parallel group among them) with torch's default timeout,
    # which torch reads from these module globals when a group is created: set them to ours first.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        global _STARTED_PROCESS_GROUP
        dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world, timeout=timeout)
        _STARTED_PROCESS_GROUP = True
    return rank, world, local_rank, device


def end_process(code: int) -> None:
    """End a rank's process with ``code``; the command-line entry points call this last.

    DeepSpeed keeps its process groups in module globals, so ``destroy_process_group`` does not stop
    their communication threads, and such a thread may still be releasing a finished collective's
    tensors while the interpreter shuts down: it then needs the interpreter lock of a dying interpreter
    and the process aborts (SIGABRT, exit 134) after a run that did everything right.  A process that
    started a process group therefore flushes its outputs, finalizes MPI when mpi4py initialized it
    (or, for a failing rank whose peers may be hung, aborts the MPI job so that mpirun ends them), and
    leaves with ``os._exit``, without interpreter shutdown.  Any other process exits normally.
    """
    if not _STARTED_PROCESS_GROUP:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        if code not in (0, REQUEUE_EXIT_CODE):
            # A failing rank: its peers may be hung (MPI_Finalize would wait for them), so end the job.
            mpi.COMM_WORLD.Abort(code)
        mpi.Finalize()
    os._exit(code)


def deepspeed_config(cfg: TrainConfig, world: int, universal: bool) -> dict:
    ds = json.loads(json.dumps(cfg.deepspeed))
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    if cfg.scheduler() is not None:  # its length resolved from train.steps
        ds["scheduler"] = cfg.scheduler()
    ds["train_batch_size"] = cfg.train.micro_batch * cfg.train.grad_accum * world
    ds.setdefault("steps_per_print", 1 << 30)
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


class Preemption:
    """SIGUSR1/SIGTERM/SIGINT set a flag; ranks agree on it at each step boundary.

    A second SIGINT (Ctrl-C twice) ends the process at once, without a checkpoint.
    """

    def __init__(self):
        self.flag = False
        self._interrupted = False
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self._interrupted:
                os.write(2, b"interrupted again: exiting now, without a checkpoint\n")
                os._exit(128 + signal.SIGINT)
            self._interrupted = True
            os.write(2, b"interrupted: checkpointing at the next step boundary (Ctrl-C again to exit now)\n")
        self.flag = True

    def agreed(self, device, save_due: bool = False) -> tuple[bool, bool]:
        """(stop, save): whether any rank was signalled, and whether any rank's checkpoint clock ran out."""
        t = torch.tensor([1.0 if self.flag else 0.0, 1.0 if save_due else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), bool(t[1].item())

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


def preflight(cfg: TrainConfig) -> None:
    """What each rank checks before it creates anything: the run directory and the device."""
    rundir.check_writable_dir(cfg.run.dir)
    if cfg.model.attention_backend == "triton":
        import importlib.util

        cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
        if cpu or importlib.util.find_spec("triton") is None:
            raise ValueError("model.attention_backend=triton needs a CUDA device and Triton; this rank has "
                             + ("no CUDA device" if cpu else "no triton package")
                             + " (allowed here: 'auto' or 'reference')")


def run(config_path, overrides=(), resume: str = "auto", overwrite: bool = False,
        allow_change: list[str] | tuple[str, ...] = ()) -> int:
    """Train one rank (see the module docstring); returns 0, or REQUEUE_EXIT_CODE after preemption.

    ``overwrite``: with ``resume="none"``, move an earlier run in ``run.dir`` aside instead of refusing.
    ``allow_change``: parts of the run's fingerprint (:data:`rundir.CHANGES`) a resume may change.
    """
    cfg = load_config(config_path, list(overrides))
    if resume not in ("auto", "none") and not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"resume must be 'auto', 'none' or a checkpoint path, got {resume!r}")
    rundir.check_allow_values(list(allow_change))
    preflight(cfg)
    # Handlers first: a preemption notice during start-up is honoured at the first step boundary.
    preempt = Preemption()
    lock = []
    try:
        rank, world, local_rank, device = init_distributed(cfg.train.collective_timeout_s)
        return _train(cfg, rank, world, local_rank, device, str(resume), preempt, overwrite, list(allow_change),
                      lock)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if _is_timeout(e):
            raise CollectiveTimeout(f"a collective did not complete within train.collective_timeout_s="
                                    f"{cfg.train.collective_timeout_s} s: another rank is hung, stopped or "
                                    f"dead ({first})") from None
        if _is_lost_peer(e):
            raise CollectiveTimeout(f"a collective did not complete: another rank closed its connection, it "
                                    f"died ({first})") from None
        raise
    finally:
        preempt.restore()
        for held in lock:
            held.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _say(caught: list) -> None:
    """Print recorded warnings as one line each, naming their kind (no source line, no traceback)."""
    for w in caught:
        print(f"warning: {w.category.__name__}: {w.message}", file=sys.stderr, flush=True)


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or "watchdog" in text


def _is_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return "connection closed by peer" in text or "connection reset by peer" in text


def _on_rank0(fn, rank: int, world: int):
    """Collective: rank 0 runs ``fn``; its result, or its error, is every rank's."""
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except (ValueError, OSError) as e:
            box[1] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def _run_fingerprint(cfg: TrainConfig, layout: Layout, tokenizer) -> dict:
    from .data import cache_key, resolve_files

    files, fmt = resolve_files(cfg.data.path, cfg.data.format, cfg.data.max_bytes)
    key = cache_key(files, fmt, cfg.data.text_field, tokenizer)
    data = rundir.data_identity(cfg.data.path, fmt, cfg.data.text_field, files, key)
    return rundir.fingerprint(layout.context_length, layout.global_batch, data, tokenizer.sha256)


def _train(cfg: TrainConfig, rank: int, world: int, local_rank: int, device, resume: str,
           preempt: Preemption, overwrite: bool = False, allow_change: list[str] = (), lock: list = None) -> int:
    import deepspeed

    from ..model import Transformer, apply_sequence_parallel
    from . import evaluate
    from .data import open_stream, prepare_data
    from .tokenizer import Tokenizer

    layout = build_layout(cfg, world, rank)
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    tokenizer = Tokenizer(cfg.data.tokenizer)
    tokenizer.check_vocab(cfg.model.vocab_size)
    fp = _run_fingerprint(cfg, layout, tokenizer)  # also checks data.path before anything is created

    def own_run_dir() -> None:  # rank 0 holds the lock; the other ranks learn only the outcome
        held = rundir.RunLock.acquire(run_dir)
        try:
            if resume == "none":
                aside = rundir.start_fresh(run_dir, overwrite)
                if aside is not None:
                    print(f"--overwrite: the earlier run in {run_dir} was moved to {aside}", flush=True)
        except BaseException:
            held.release()
            raise
        if lock is not None:
            lock.append(held)

    _on_rank0(own_run_dir, rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpt.find_checkpoint(ckpt_root, resume, rank, world)
    _say(caught)
    changes = []
    if found is not None:
        ckpt.check_compatible(found, asdict(cfg.model))
        changed = rundir.changes(found.meta.get("fingerprint", {}), fp)
        rundir.check_allowed(found.path, changed, allow_change)
        changes = list(found.meta.get("changes", []))
        if changed:
            changes.append({"step": found.meta["step"], "time": time.time(), "changed": changed})
            if rank == 0:
                print("resuming with allowed changes: " + "; ".join(changed.values()), flush=True)
        if found.meta["step"] >= cfg.train.steps:
            if rank == 0:
                print(f"checkpoint {found.path} is at step {found.meta['step']}, train.steps={cfg.train.steps}: "
                      f"nothing to train; {run_dir} is left as it is", flush=True)
            return 0
    if local_rank == 0:
        prepare_data(cfg.data, tokenizer)
    dist.barrier()
    stream = open_stream(cfg.data, tokenizer, layout.context_length)  # the caches are present now
    layout = layout.with_groups(cfg.train.collective_timeout_s)

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    if cfg.model.init_from and found is None:  # a resumed run has its own weights
        from ..hf.convert import load_init_weights

        load_init_weights(model, cfg.model)
    if layout.sp is not None:
        apply_sequence_parallel(model, layout.sp)
    # Counted before DeepSpeed partitions anything (ZeRO-3 leaves empty local tensors).
    flops_tok, n_params = model.flops_per_token(layout.context_length), model.num_params()
    same_world = found is not None and found.meta["world_size"] == world
    stage = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    # ZeRO partitions optimizer state by world size: another world size loads DeepSpeed's
    # universal form, converted here on the fly (stage 0 keeps it whole and loads as is).
    universal = ckpt.to_universal(found, ckpt_root, rank) if found is not None and not same_world \
        and stage > 0 else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, world, universal is not None))
    step = 0
    consumed = 0
    tokens_before = 0  # tokens trained on before this process (the checkpoint's count)
    if found is not None:
        ckpt.load(engine, found, universal, rank, same_world)
        dist.barrier()
        if universal is not None and rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
        step, consumed = found.meta["step"], found.meta["consumed"]
        # Checkpoints written before the count was recorded trained at this run's layout, if any.
        tokens_before = found.meta.get("tokens", step * layout.tokens_per_step)
    if rank == 0:
        for warning in cfg.schedule_warnings():
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _truncate_metrics(run_dir, step)
        _say(caught)

    def meta(at_step: int, at_consumed: int) -> dict:
        return {"step": at_step, "consumed": at_consumed, "world_size": world,
                "sequence_parallel": layout.sequence_parallel, "data_parallel": layout.data_parallel,
                "zero_stage": stage, "model": asdict(cfg.model), "context_length": layout.context_length,
                "tokens": tokens_before + tokens_seen, "fingerprint": fp, "changes": changes, "time": time.time()}

    def save(at_step: int) -> None:
        nonlocal last_saved, last_save_time
        ckpt.save(engine, ckpt_root, at_step, meta(at_step, consumed), cfg.checkpoint.keep, rank, world)
        last_saved, last_save_time = at_step, time.time()

    peak = peak_flops(cfg, device)
    writer = bar = None
    if rank == 0 and cfg.run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # Events after the checkpoint's step are redone by this run; the checkpoint's own step stays.
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)
    if rank == 0 and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True)
    # A checkpoint of this run needs no second save if preempted before the first step.
    last_saved = step if found is not None and found.root.resolve() == ckpt_root.resolve() else -1
    t_start = last_save_time = time.time()
    every_s = cfg.checkpoint.every_minutes * 60
    tokens_seen = 0
    try:
        while step < cfg.train.steps:
            stop, save_due = preempt.agreed(device, every_s > 0 and time.time() - last_save_time >= every_s)
            if save_due and not stop and last_saved != step and step > 0:
                save(step)
            if stop:
                if last_saved != step:
                    save(step)
                if rank == 0:
                    print(f"preempted: checkpoint at step {step}, exiting with {REQUEUE_EXIT_CODE}", flush=True)
                return REQUEUE_EXIT_CODE
            t0 = time.time()
            loss_sum = torch.zeros(2, dtype=torch.float64)
            for micro in range(layout.grad_accum):
                batch = stream.train_batch(consumed, micro, layout.dp_rank, layout.data_parallel, layout.micro_batch,
                                           layout.start, layout.end)
                local_sum, count = engine(batch.tokens.to(device), batch.labels.to(device),
                                          batch.positions.to(device))
                # Tokens of the whole sequence(s): every SP rank's count, summed.
                total = float(count) if layout.sp is None else _sp_sum(count, layout.sp, device)
                engine.backward(local_sum * (layout.sequence_parallel / total))
                engine.step()
                loss_sum += torch.tensor([float(local_sum.detach()), float(count)], dtype=torch.float64)
            both = loss_sum.to(device)
            dist.all_reduce(both)
            loss = float(both[0] / both[1])
            step += 1
            consumed += layout.global_batch
            dt = time.time() - t0
            tokens_seen += layout.tokens_per_step
            if rank == 0:
                tps = layout.tokens_per_step / dt
                mfu = flops_tok * tps / (world * peak) if peak else None
                lr = engine.get_lr()[0]
                row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_before + tokens_seen,
                       "tokens_per_s": tps, "mfu": mfu, "step_time_s": dt}
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    with (run_dir / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
                if writer is not None:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/tokens_per_s", tps, step)
                    if lr is not None:
                        writer.add_scalar("train/lr", lr, step)
                    if mfu is not None:
                        writer.add_scalar("train/mfu", mfu, step)
                if bar is not None:
                    post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    bar.set_postfix(post)
                    bar.update(1)
            at_end = step == cfg.train.steps
            if at_end or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                save(step)
            if cfg.data.eval_sequences and (at_end or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
                table = evaluate.loss_by_position(engine, stream, layout, cfg.eval.buckets, device)
                if rank == 0:
                    evaluate.write_eval(run_dir, table, step)
                    if writer is not None:
                        for r in table:
                            writer.add_scalar(f"eval/loss_pos_{r['start']}", r["loss"], step)
        # Replicated parameters must be bitwise equal on every rank; record their digests.
        digests = [None] * world
        dist.all_gather_object(digests, param_digest(engine.module) if stage < 3 else None)
        if rank == 0:
            evaluate.plot_loss(run_dir)
            rows = evaluate.read_metrics(run_dir)
            summary = {"steps": step, "final_loss": rows[-1]["loss"] if rows else None,
                       "derived": layout.sizes(), "parameters": n_params,
                       "flops_per_token": flops_tok, "wall_s_this_process": time.time() - t_start,
                       "tokens_this_process": tokens_seen, "checkpoint": str(ckpt_root / ckpt.tag_for(step)),
                       "param_digests": digests}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return 0
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()


def param_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sp_sum(count: torch.Tensor, ctx, device) -> float:
    t = count.detach().to(device=device, dtype=torch.float64).reshape(1)
    dist.all_reduce(t, group=ctx.group)
    return float(t.item())


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metric rows up to ``step``: a resumed run rewrites what came after its checkpoint.

    A torn last line (the process was killed while appending it) is dropped with a
    :class:`MetricsCorrupt` warning; a bad line before the end is an error naming the file and line.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                warnings.warn(MetricsCorrupt(f"{path}: the last line is torn ({line[:60]!r}); dropped"),
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({line[:60]!r}); fix or remove it") \
                from None
        if row_step <= step:
            rows.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)
