"""The run directory around the checkpoints: who owns it, starting a new run in it, what a run is.

* **Preflight.**  ``check_writable_dir`` is the one check that ``run.dir`` can be written; the
  launcher's ``launch``/``submit`` and every training rank call it before creating anything.
* **Ownership.**  Rank 0 of a run holds ``<run.dir>/run.lock`` (host, pid, Slurm job id, start time)
  until it exits.  A second run on the same directory refuses with :class:`RunDirLocked`.  A lock is
  stale, and taken over with a warning, when its pid is dead on this host, or when it was left on another
  host by an earlier start of this same Slurm job (a requeue: Slurm runs one instance of a job at a time).
* **Starting fresh.**  ``--resume none`` in a directory holding an earlier run refuses with
  :class:`RunDirNotEmpty`; with ``--overwrite`` the earlier run is moved aside to
  ``<run.dir>.old-<time>`` (``jobs/``, the submitted job scripts, stays), never deleted.
* **Fingerprint.**  Each checkpoint records what defines the run beyond the model's shape: context
  length, global batch, the corpus (path, format, file count and bytes, token-cache key, and whether
  attention is masked to its documents) and the tokenizer's SHA-256.  Resuming with another one is
  :class:`FingerprintChanged`, naming every change, unless each changed part is allowed
  (``--allow-change context`` ...); allowed changes are recorded.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

LOCK = "run.lock"
#: Entries of a run directory that are not a run's state (submitted job scripts, the lock).
NOT_RUN_STATE = (LOCK, "jobs")
#: Parts of the fingerprint that ``--allow-change`` may name.
CHANGES = ("context", "batch", "data", "tokenizer")


class RunDirLocked(ValueError):
    """Another run owns the run directory."""


class RunDirNotEmpty(ValueError):
    """A new run was asked for in a directory that holds an earlier one."""


class FingerprintChanged(ValueError):
    """The run resumed is not the run the config describes."""


def check_writable_dir(path: str | os.PathLike, what: str = "run.dir") -> Path:
    """Raise ValueError unless ``path`` is, or can be created as, a writable directory.  Creates nothing."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {p} cannot be created: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p} is not writable (no write permission on {probe})")
    # Root passes os.access everywhere; a read-only file system is only seen by statvfs.
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise ValueError(f"{what} {p} is not writable ({probe} is on a read-only file system)")
    return p


# -- ownership -----------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _describe(owner: dict) -> str:
    job = f", Slurm job {owner['job']}" if owner.get("job") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, started {started}"


def _stale(owner: dict | None, me: dict) -> str | None:
    """Why ``owner``'s lock is stale, or None while its run may still be going."""
    if owner is None:
        return "its lock file is unreadable"
    if owner.get("host") == me["host"]:
        if not _pid_alive(int(owner.get("pid", -1))):
            return f"pid {owner.get('pid')} is not running on {me['host']}"
        return None
    # On another host only the job id tells: a requeued job may start on other nodes.
    if owner.get("job") and owner.get("job") == me["job"]:
        return f"it was an earlier start of this Slurm job {me['job']} (on {owner.get('host')})"
    return None


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


@dataclass
class RunLock:
    """``<run.dir>/run.lock``, held by rank 0 of the run that owns the directory."""

    path: Path
    owner: dict

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
              "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(path)
                why = _stale(owner, me)
                if why is None:
                    raise RunDirLocked(f"run.dir {run_dir} is in use by another run ({_describe(owner)}); wait "
                                       f"for it to end, or use another run.dir.  If that run is gone, remove "
                                       f"{path}") from None
                warnings.warn(f"taking over the stale lock {path} ({why})", stacklevel=2)
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return cls(path, me)
        raise RunDirLocked(f"run.dir {run_dir}: could not take {path}; another run keeps taking it")

    def release(self) -> None:
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def move_aside(run_dir: Path) -> Path:
    """Move every entry of ``run_dir`` that is run state into a new sibling ``<name>.old-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    aside.mkdir()
    for p in sorted(run_dir.iterdir()):
        if p.name not in NOT_RUN_STATE:
            os.replace(p, aside / p.name)
    return aside


def earlier_run(run_dir: Path) -> list[str]:
    """Names of the entries of ``run_dir`` that belong to an earlier run ([] for a new directory)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in NOT_RUN_STATE)


def check_fresh(run_dir: Path, overwrite: bool) -> list[str]:
    """Raise :class:`RunDirNotEmpty` if a new run may not start in ``run_dir``; the earlier run's entries."""
    names = earlier_run(run_dir)
    if names and not overwrite:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise RunDirNotEmpty(f"run.dir {run_dir} holds an earlier run ({shown}); --resume none starts a new "
                             f"run there only with --overwrite, which moves the earlier run aside to "
                             f"{run_dir.name}.old-<time>; --resume auto continues it")
    return names


def start_fresh(run_dir: Path, overwrite: bool) -> Path | None:
    """A new run in ``run_dir``: refuse if it holds an earlier run, or move that aside (``overwrite``).

    Returns where the earlier run went (None if there was none).
    """
    return move_aside(run_dir) if check_fresh(run_dir, overwrite) else None


# -- fingerprint ---------------------------------------------------------------------------------
def fingerprint(context_length: int, global_batch: int, data: dict, tokenizer_sha256: str) -> dict:
    """What a run is beyond its model's shape; ``data`` from :func:`data_identity`."""
    return {"context": context_length, "batch": global_batch, "data": data, "tokenizer": tokenizer_sha256}


#: Data-identity fields recorded only where they differ from these values, so that the checkpoints of
#: runs from before a field existed stay the same run; a missing field reads as its default.
DATA_DEFAULTS = {"document_mask": False}


def data_identity(path: str, fmt: str, text_field: str, files: list[Path], cache_key: str,
                  document_mask: bool = False) -> dict:
    out = {"path": path if path == "stdlib" else str(Path(path).resolve()), "format": fmt,
           "text_field": text_field, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
           "cache_key": cache_key}
    if document_mask != DATA_DEFAULTS["document_mask"]:
        out["document_mask"] = document_mask
    return out


def changes(saved: dict, now: dict) -> dict[str, str]:
    """{part: what changed} between two fingerprints; a part the saved one lacks is not compared."""
    out = {}
    for part in CHANGES:
        if part not in saved or saved[part] == now[part]:
            continue
        if part == "data":
            fields = [k for k in sorted(set(saved[part]) | set(now[part]))
                      if saved[part].get(k) != now[part].get(k)]
            # The token-cache key includes the tokenizer's bytes: a new tokenizer is reported as such.
            if "tokenizer" in saved and saved["tokenizer"] != now["tokenizer"] and fields == ["cache_key"]:
                continue
            detail = ", ".join(f"data.{k}: checkpoint {saved[part].get(k, DATA_DEFAULTS.get(k))!r} vs now "
                               f"{now[part].get(k, DATA_DEFAULTS.get(k))!r}" for k in fields)
        elif part == "tokenizer":
            detail = f"tokenizer SHA-256: checkpoint {saved[part][:12]} vs now {now[part][:12]}"
        else:
            name = {"context": "context length", "batch": "global batch (sequences per step)"}[part]
            detail = f"{name}: checkpoint {saved[part]} vs now {now[part]}"
        out[part] = detail
    return out


def check_allowed(found_path: Path, changed: dict[str, str], allowed: list[str]) -> None:
    """Raise :class:`FingerprintChanged` unless every changed part is in ``allowed``."""
    refused = {k: v for k, v in changed.items() if k not in allowed}
    if refused:
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise FingerprintChanged(f"checkpoint {found_path} is of another run: " + "; ".join(refused.values())
                                 + f".  If this change is intended, resume with {flags}")


def check_allow_values(allowed: list[str]) -> None:
    for a in allowed:
        if a not in CHANGES:
            raise ValueError(f"--allow-change must be one of {list(CHANGES)}, got {a!r}")
