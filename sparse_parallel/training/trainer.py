"""One rank's training process: the run's components in order, then a short loop over them.

``run`` starts the process group and ``_train`` puts the components together: the layout
(:mod:`.layout`), the run directory and the resume point (:mod:`.resume`), the token stream, the
model and its DeepSpeed engine, the run's outputs (:mod:`.outputs`) and its checkpoint saves and
preemption (:mod:`.preemption`).  The loop trains a step, logs it, saves and evaluates when due.
With ``data.document_mask`` each micro batch carries its sequences' documents (the same offsets on
every rank of a sequence), and the model attends only within them in every layer.

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
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..launcher.discovery import free_port
from . import checkpoint as ckpt
from . import evaluate, rundir
from .config import TrainConfig, load_config
from .layout import Layout, build_layout
from .outputs import RunOutputs
from .preemption import Preemption, Saver
from .resume import Progress, Resume, own_run_dir, run_fingerprint

#: Exit code after a preemption checkpoint: the job should be requeued and resumed.
REQUEUE_EXIT_CODE = 85

#: Set once this process has started a process group (see :func:`end_process`).
_STARTED_PROCESS_GROUP = False


class CollectiveTimeout(RuntimeError):
    """A collective did not complete: a rank hung or stopped (``train.collective_timeout_s``) or died."""


#: Dense bf16 peak per device (TFLOP/s) for the MFU estimate, by device-name substring.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


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
    held = []  # the run directory's lock, once rank 0 holds it
    try:
        rank, world, local_rank, device = init_distributed(cfg.train.collective_timeout_s)
        return _train(cfg, rank, world, local_rank, device, str(resume), preempt, overwrite, list(allow_change),
                      held)
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
        for lock in held:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text or "watchdog" in text


def _is_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return "connection closed by peer" in text or "connection reset by peer" in text


def _train(cfg: TrainConfig, rank: int, world: int, local_rank: int, device, resume: str,
           preempt: Preemption, overwrite: bool = False, allow_change: list[str] = (), held: list = None) -> int:
    """The components in order: layout, run directory and resume point, data, engine, outputs, the loop."""
    from .tokenizer import Tokenizer

    layout = build_layout(cfg, world, rank)
    run_dir = Path(cfg.run.dir)
    root = run_dir / "checkpoints"
    tokenizer = Tokenizer(cfg.data.tokenizer)
    tokenizer.check_vocab(cfg.model.vocab_size)
    fingerprint = run_fingerprint(cfg, layout, tokenizer)  # also checks data.path before anything is created
    own_run_dir(run_dir, resume, overwrite, layout, held)
    start = Resume.find(root, resume, cfg, fingerprint, list(allow_change), layout)
    if start.step >= cfg.train.steps:
        if rank == 0:
            print(f"checkpoint {start.found.path} is at step {start.step}, train.steps={cfg.train.steps}: "
                  f"nothing to train; {run_dir} is left as it is", flush=True)
        return 0
    stream = _open_data(cfg, tokenizer, layout, local_rank)
    layout = layout.with_groups(cfg.train.collective_timeout_s)
    model = _build_model(cfg, layout, resumed=start.found is not None)
    # Counted before DeepSpeed partitions anything (ZeRO-3 leaves empty local tensors).
    flops_tok, n_params = model.flops_per_token(layout.context_length), model.num_params()
    matmul_flops = flops_tok - model.attention_flops_per_token(layout.context_length)
    stage = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
    engine = _engine(cfg, model, world, universal=start.convert(root, stage))
    progress = start.load(engine)
    saver = Saver(cfg, layout, root, stage, fingerprint, start.changes,
                  last_step=progress.step if start.saved_under(root) else -1)
    with RunOutputs(cfg, layout, progress.step, flops_tok, peak_flops(cfg, device)) as outputs:
        t_start, tokens_before = time.time(), progress.tokens
        progress, preempted = _loop(cfg, layout, engine, stream, progress, saver, outputs, preempt, device,
                                    matmul_flops)
        if preempted:
            if rank == 0:
                print(f"preempted: checkpoint at step {progress.step}, exiting with {REQUEUE_EXIT_CODE}", flush=True)
            return REQUEUE_EXIT_CODE
        # Replicated parameters must be bitwise equal on every rank; record their digests.
        digests = [None] * world
        dist.all_gather_object(digests, param_digest(engine.module) if stage < 3 else None)
        outputs.finish(progress.step, {
            "derived": layout.sizes(), "parameters": n_params, "flops_per_token": flops_tok,
            "wall_s_this_process": time.time() - t_start, "tokens_this_process": progress.tokens - tokens_before,
            "checkpoint": str(root / ckpt.tag_for(progress.step)), "param_digests": digests})
        return 0


def _loop(cfg: TrainConfig, layout: Layout, engine, stream, progress: Progress, saver: Saver,
          outputs: RunOutputs, preempt: Preemption, device, matmul_flops: float) -> tuple[Progress, bool]:
    """Train from ``progress`` to ``train.steps``: the progress reached, and whether a preemption ended it
    (after its checkpoint).  ``matmul_flops``: per token, counted before any partitioning."""
    while progress.step < cfg.train.steps:
        if saver.at_boundary(engine, progress, preempt, device):
            return progress, True
        t0 = time.time()
        loss, documents = _train_step(engine, stream, layout, progress.consumed, device)
        step_time = time.time() - t0
        progress = progress.advance(layout)
        # Within documents the useful attention work depends on each step's sequences: counted from them.
        flops = None
        if documents and outputs.active and outputs.peak_flops:
            attn = sum(engine.module.attention_flops_per_token(layout.context_length, d) for d in documents)
            flops = matmul_flops + attn / len(documents)
        outputs.log_step(progress.step, progress.tokens, loss, engine.get_lr()[0], step_time, flops)
        if saver.due(progress.step):
            saver.save(engine, progress)
        if _eval_due(cfg, progress.step):
            tables = evaluate.loss_by_position(engine, stream, layout, cfg.eval.buckets, device)
            outputs.log_eval(tables, progress.step)
    return progress, False


def _open_data(cfg: TrainConfig, tokenizer, layout: Layout, local_rank: int):
    """Collective: the token stream, tokenised once per machine (by local rank 0) while the others wait."""
    from .data import open_stream, prepare_data

    if local_rank == 0:
        prepare_data(cfg.data, tokenizer)
    dist.barrier()
    return open_stream(cfg.data, tokenizer, layout.context_length)  # the caches are present now


def _build_model(cfg: TrainConfig, layout: Layout, resumed: bool) -> torch.nn.Module:
    """The model from ``train.seed`` (or ``model.init_from``'s weights; a resumed run has its own),
    with this rank's sequence-parallel context applied from outside."""
    from ..model import Transformer, apply_sequence_parallel

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    if cfg.model.init_from and not resumed:
        from ..hf.convert import load_init_weights

        load_init_weights(model, cfg.model)
    if layout.sp is not None:
        apply_sequence_parallel(model, layout.sp)
    return model


def _engine(cfg: TrainConfig, model: torch.nn.Module, world: int, universal: bool):
    """The DeepSpeed engine over ``model``; ``universal``: it is to load a checkpoint's universal form."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, world, universal))
    return engine


def _train_step(engine, stream, layout: Layout, consumed: int, device) -> tuple[float, list]:
    """One optimizer step over ``grad_accum`` micro batches (see the module docstring for the loss
    scaling) -> (the mean loss over every token of the step's sequences, this rank's micro batches'
    documents: empty without ``data.document_mask``)."""
    loss_sum = torch.zeros(2, dtype=torch.float64)
    documents = []
    for micro in range(layout.grad_accum):
        batch = stream.train_batch(consumed, micro, layout.dp_rank, layout.data_parallel, layout.micro_batch,
                                   layout.start, layout.end)
        local_sum, count = engine(batch.tokens.to(device), batch.labels.to(device), batch.positions.to(device),
                                  documents=batch.documents)
        if batch.documents is not None:
            documents.append(batch.documents)
        # Tokens of the whole sequence(s): every SP rank's count, summed.
        total = float(count) if layout.sp is None else _sp_sum(count, layout.sp, device)
        engine.backward(local_sum * (layout.sequence_parallel / total))
        engine.step()
        loss_sum += torch.tensor([float(local_sum.detach()), float(count)], dtype=torch.float64)
    both = loss_sum.to(device)
    dist.all_reduce(both)
    return float(both[0] / both[1]), documents


def _eval_due(cfg: TrainConfig, step: int) -> bool:
    every = cfg.train.eval_every
    return bool(cfg.data.eval_sequences) and (step == cfg.train.steps or bool(every and step % every == 0))


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
