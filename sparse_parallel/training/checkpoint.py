"""Sharded checkpoints that are complete or absent, and finding the one to resume from.

Layout under ``<run.dir>/checkpoints``::

    step00000040/            a complete checkpoint (DeepSpeed's shards + ours)
        meta.json            written last, before the rename: step, data position, model config,
                             world/sequence/data-parallel sizes, ZeRO stage, the run's fingerprint,
                             and the size and SHA-256 of every other file of the checkpoint
        rng_rank00000.pt     per-rank RNG states
    latest                   name of the newest complete checkpoint (replaced atomically)

A save writes into ``.tmp-stepXXXXXXXX``; after every rank has written (a
barrier) the ranks hash and fsync the files (each rank a share of them), rank 0
writes ``meta.json`` with the checksums, fsyncs the folder, renames it and then
replaces ``latest``.  A process killed at any point before the rename leaves only a
``.tmp-`` folder, which is never loaded and is removed by the next save, as is a
``.trash-`` folder that a kill left in the middle of a rotation.  A save that
fails (a full disk, a permission) is a :class:`CheckpointSaveError` on every rank
and leaves the previous checkpoint as it was.

Resuming verifies the checksums: a checkpoint that is missing, incomplete or
corrupt is reported (:class:`CheckpointUnusable` as a warning) and the newest
complete checkpoint that verifies is taken instead.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ModelConfig
from .tokenizer import file_sha256

META = "meta.json"
LATEST = "latest"
#: Folders a save or a rotation works in; what an interrupted one leaves is removed by the next save.
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".trash-")
_TAG = re.compile(r"step(\d+)")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; nothing of it is left and the previous one stays loadable."""


class CheckpointUnusable(UserWarning):
    """A checkpoint is missing, incomplete or fails its checksums (resume falls back to an older one)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (``step00000040`` -> 40); None for any other name."""
    m = _TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_digest(path: Path, sync: bool = False) -> dict:
    """Size and SHA-256 of ``path``; ``sync``: also fsync it (it was just written)."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path, sync)}


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but meta.json, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != META)


def _share(names: list[str], rank: int, world: int) -> list[str]:
    return names[rank::world]


def _gather(value, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Found:
    """A complete checkpoint chosen for resuming."""

    path: Path
    meta: dict

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is incomplete (no {META}); it cannot be resumed from") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path}: {META} is corrupt ({e})") from None


def verify(path: Path, meta: dict, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of checkpoint ``path`` against the checksums in its ``meta`` ([] = it verifies).

    Collective when ``world`` > 1: each rank hashes its share of the files, every rank gets the
    whole list (so all of them take the same decision).  A checkpoint written before checksums were
    recorded has nothing to verify.
    """
    recorded = meta.get("files")
    problems = []
    if recorded is not None:
        names = sorted(recorded)
        mine = []
        for name in _share(names, rank, world):
            f = path / name
            if not f.is_file():
                mine.append(f"{name} is missing")
                continue
            want = recorded[name]
            if f.stat().st_size != want["size"]:
                mine.append(f"{name} has {f.stat().st_size} bytes, {want['size']} were written")
            elif file_digest(f)["sha256"] != want["sha256"]:
                mine.append(f"{name} fails its SHA-256 checksum")
        problems = [p for part in _gather(mine, world) for p in part]
    return problems


def _candidates(root: Path) -> list[Path]:
    """Where to look under a checkpoints folder: the one ``latest`` names, then every other by step."""
    out = []
    latest = root / LATEST
    if latest.is_file():
        out.append(root / latest.read_text().strip())
    if root.is_dir():
        steps = sorted(((step_of(p.name), p) for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None),
                       reverse=True)
        out += [p for _, p in steps if p not in out]
    return out


def _usable(path: Path, rank: int, world: int) -> tuple[Found | None, str]:
    if not path.is_dir():
        return None, "it does not exist"
    try:
        meta = read_meta(path)
    except ValueError as e:
        return None, str(e)
    problems = verify(path, meta, rank, world)
    if problems:
        return None, "; ".join(problems)
    return Found(path, meta), ""


def find_checkpoint(root: Path, resume: str, rank: int = 0, world: int = 1) -> Found | None:
    """``resume``: "none", "auto" (the newest complete checkpoint under ``root`` that verifies, if
    any) or a path (a checkpoint, a checkpoints folder or a run directory).

    With "auto" a checkpoint that is missing, incomplete or fails its checksums is passed over with a
    :class:`CheckpointUnusable` warning; if checkpoints exist and none verifies, that is an error.  A
    path names one checkpoint, which must verify.  Collective when ``world`` > 1 (see :func:`verify`).
    """
    if resume == "none":
        return None
    if resume == "auto":
        candidates = _candidates(root)
        rejected = []
        for path in candidates:
            found, why = _usable(path, rank, world)
            if found is not None:
                for bad, reason in rejected if rank == 0 else ():
                    warnings.warn(CheckpointUnusable(f"checkpoint {bad} is unusable ({reason}); resuming from "
                                                     f"{found.path} instead"), stacklevel=2)
                return found
            rejected.append((path, why))
        if rejected:
            detail = "; ".join(f"{p.name}: {why}" for p, why in rejected)
            raise ValueError(f"no checkpoint under {root} can be resumed from ({detail}); resume from "
                             "another with --resume PATH, or start a new run with --resume none --overwrite")
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume: {resume} does not exist")
    if (path / LATEST).is_file():  # a checkpoints folder: take its latest
        path = path / (path / LATEST).read_text().strip()
    elif (path / "checkpoints" / LATEST).is_file():  # a run directory
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
    found = Found(path, read_meta(path))
    problems = verify(path, found.meta, rank, world)
    if problems:
        raise ValueError(f"checkpoint {path} is corrupt: {'; '.join(problems)}")
    return found


def check_compatible(found: Found, model_cfg: dict) -> None:
    """A checkpoint of another model shape is an error naming the differing fields."""
    saved = found.meta.get("model", {})
    model_cfg = json.loads(json.dumps(model_cfg))  # as saved: JSON has only string keys
    runtime = ModelConfig.runtime_fields()
    diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k) and k not in runtime)
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint {found.path} is of another model: {detail}")


def remove_leftovers(root: Path) -> None:
    """Remove what interrupted saves and rotations left (``.tmp-``, ``.old-``, ``.trash-`` folders)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(LEFTOVER_PREFIXES) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    """Remove a checkpoint folder: renamed first, so a kill half-way leaves a leftover, not a torn checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(root: Path, keep: int, written: Path) -> None:
    """Keep the ``keep`` complete checkpoints of highest step, and always ``written`` (just saved)."""
    complete = sorted((step_of(p.name), p) for p in root.iterdir()
                      if p.is_dir() and step_of(p.name) is not None and (p / META).is_file())
    kept = {p for _, p in complete[-keep:]} | {written}
    for _, p in complete:
        if p not in kept:
            _discard(p)


def _agree_on_error(error: BaseException | None, world: int) -> list[str]:
    """Collective: every rank's error message (None where it had none)."""
    return _gather(None if error is None else f"{type(error).__name__}: {error}", world)


def _save_engine(engine, root: Path, tag: str) -> BaseException | None:
    """DeepSpeed's part of a save; the first write error, or None.

    DeepSpeed's save has collectives between its writes: a rank whose write raised would leave the
    others waiting in them.  Its file writes therefore go through a wrapper that records the first
    error and skips the remaining writes, so every rank runs the same collectives to the end.
    """
    failed = []
    writer = engine.checkpoint_engine
    original = writer.save

    def guarded(*args, **kwargs):
        if failed:
            return None
        try:
            return original(*args, **kwargs)
        except (OSError, RuntimeError) as e:
            failed.append(e)
            return None

    writer.save = guarded
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    finally:
        writer.save = original
    return failed[0] if failed else None


def save(engine, root: Path, step: int, meta: dict, keep: int, rank: int, world: int | None = None) -> Path:
    """Collective: every rank calls it.  Returns the complete checkpoint's path.

    An OSError or a failed write (DeepSpeed and torch.save report a full disk as RuntimeError) on any
    rank is a :class:`CheckpointSaveError` on every rank, after the partial folder is removed.
    """
    world = dist.get_world_size() if world is None else world
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    final = root / tag
    error = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root)
    except OSError as e:
        error = e
    errors = _agree_on_error(error, world)
    if not any(errors):
        try:
            error = _save_engine(engine, root, tmp_tag)
            if error is None:
                torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        except (OSError, RuntimeError) as e:
            error = e
        errors = _agree_on_error(error, world)
    if not any(errors):
        try:  # every rank hashes and fsyncs its share of the files (all are in place after the agreement)
            digests = {name: file_digest(tmp / name, sync=True) for name in _share(_files(tmp), rank, world)}
        except OSError as e:
            error, digests = e, {}
        parts = _gather(digests, world)
        errors = _agree_on_error(error, world)
    if not any(errors) and rank == 0:
        try:
            meta = dict(meta, files={k: v for part in parts for k, v in sorted(part.items())})
            _atomic_write(tmp / META, json.dumps(meta, indent=1))
            for d in sorted({tmp / n for n in meta["files"]} | {tmp / META}):
                if d.parent != tmp:
                    fsync_dir(d.parent)
            if final.exists():  # the same step saved by an earlier attempt: replace it whole
                old = root / f".old-{tag}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(root)
            _atomic_write(root / LATEST, tag + "\n")
        except OSError as e:
            error = e
    errors = _agree_on_error(error, world)
    if any(errors):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
        previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        raise CheckpointSaveError(f"saving checkpoint {tag} under {root} failed ({where}); "
                                  + (f"{previous} is still the latest checkpoint" if previous
                                     else "there is no earlier checkpoint"))
    if rank == 0:
        try:
            rotate(root, keep, final)
        except OSError as e:  # the new checkpoint is complete; an old one left behind is only space
            warnings.warn(f"checkpoint rotation under {root} failed ({e}); older checkpoints may remain",
                          stacklevel=2)
    dist.barrier()
    return final


def to_universal(found: Found, work_root: Path, rank: int) -> Path:
    """Collective: DeepSpeed's universal form of ``found``, made by rank 0 under ``work_root``.

    Written beside this run's checkpoints (never into the source checkpoint); the
    caller removes it once loaded.
    """
    out = work_root / f".universal-{found.tag}"
    if rank == 0:
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        args = argparse.Namespace(input_folder=str(found.path), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        try:
            ds_to_universal.main(args)
        except Exception as e:
            raise ValueError(f"checkpoint {found.path} could not be converted for another world size "
                             f"({type(e).__name__}: {e})") from None
    dist.barrier()
    return out


def load(engine, found: Found, universal: Path | None, rank: int, same_world: bool) -> None:
    """Load model, optimizer and scheduler state (and this rank's RNG when the world size is unchanged).

    ``universal``: the converted copy from ``to_universal`` to load instead of ``found``.
    """
    load_dir, tag = (universal.parent, universal.name) if universal else (found.root, found.tag)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"checkpoint {found.path} could not be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if path is None:
        raise ValueError(f"checkpoint {found.path} could not be loaded (model states missing)")
    rng = found.path / f"rng_rank{rank:05d}.pt"
    if same_world and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
