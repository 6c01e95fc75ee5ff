"""Random faults over one 2-rank run: kill -9 during a save, a stopped rank, a full disk, flipped and
truncated checkpoint files.  Afterwards the run finishes with the losses of a straight run and every
checkpoint it lists verifies.

Cheap by construction: the corruptions are applied to the files between attempts (no run needed), and
each attempt ends at its one fatal fault a step or two after its resume point, bounded by a 5 s
collective timeout.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from training_helpers import losses, tiny_config, write_config

from sparse_parallel.training import checkpoint as ckpt
from sparse_parallel.training import local

FAULT_SCRIPT = """
import errno, io, json, os, signal, sys, torch
from sparse_parallel.training import data, __main__ as entry
fault = json.loads(os.environ["FAULT"])
mine = int(os.environ["RANK"]) == fault["rank"]
tag = ".tmp-step%08d" % fault["step"]
orig_save = torch.save
def save(obj, f, *a, **k):
    if mine and tag in str(f):
        if fault["kind"] == "disk_full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        if fault["kind"] == "kill":  # half the file on disk, then SIGKILL
            buf = io.BytesIO()
            orig_save(obj, buf, *a, **k)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return orig_save(obj, f, *a, **k)
torch.save = save
orig_batch = data.TokenStream.train_batch
def train_batch(self, consumed, *a, **k):
    if mine and fault["kind"] == "stop" and consumed == (fault["step"] - 1) * 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    return orig_batch(self, consumed, *a, **k)
data.TokenStream.train_batch = train_batch
entry.end_process(entry.main(sys.argv[1:]))
"""

STEPS = 8
OVERRIDES = ["train.micro_batch=1", "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.every_minutes=0",
             "train.collective_timeout_s=5"]


def complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if ckpt.step_of(p.name) is not None and (p / "meta.json").is_file()),
                  key=lambda p: ckpt.step_of(p.name))


def corrupt(rng: random.Random, root: Path) -> str | None:
    """Flip a byte of, or truncate, a file of one of the newest checkpoints (the oldest stays intact:
    a fault that destroys every checkpoint leaves nothing to resume, which is the run's right answer)."""
    targets = complete(root)[1:]
    if not targets:
        return None
    target = rng.choice(targets)
    f = target / rng.choice(sorted(json.loads((target / "meta.json").read_text())["files"]))
    data = bytearray(f.read_bytes())
    if rng.random() < 0.5:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        return f"bit-flip {f.relative_to(root)}"
    f.write_bytes(bytes(data[:rng.randrange(len(data))]))
    return f"truncate {f.relative_to(root)}"


def attempt(cfg: Path, log_dir: Path, fault: dict | None) -> tuple[list, str]:
    """One start of the 2 ranks; the faulty rank, if still there (stopped) once the other ended, is killed."""
    script = cfg.parent / "fault.py"
    script.write_text(FAULT_SCRIPT)
    env = {"FAULT": json.dumps(fault or {"kind": "none", "step": -1, "rank": -1})}
    ranks = local.start(str(cfg), OVERRIDES, 2, log_dir=log_dir, env=env, script=str(script))
    deadline = time.time() + 180
    others = [p for r, p in enumerate(ranks.procs) if fault is None or r != fault["rank"]]
    while time.time() < deadline and any(p.poll() is None for p in others):
        time.sleep(0.2)
    for p in ranks.procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return [p.returncode for p in ranks.procs], "\n".join(ranks.output(r) for r in range(2))


def test_random_faults_then_the_run_finishes_like_a_straight_one(tmp_path, straight_run, tokenizer_path,
                                                                 token_cache):
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    events, n = [], 0
    while len(events) < 20:
        n += 1
        for _ in range(rng.randrange(2, 7)):
            what = corrupt(rng, root)
            if what and len(events) < 19:
                events.append(what)
        resumable = [p for p in complete(root) if not ckpt.verify(p, ckpt.read_meta(p))]
        at = ckpt.step_of(resumable[-1].name) if resumable else 0
        fault = {"kind": rng.choice(["kill", "stop", "disk_full"]), "rank": rng.randrange(2),
                 "step": min(STEPS, at + rng.choice([1, 2]))}
        events.append(f"{fault['kind']} rank {fault['rank']} at step {fault['step']}")
        codes, out = attempt(cfg, tmp_path / f"logs{n}", fault)
        # Every fault ends the attempt, named, on the ranks that saw it (a killed or stopped rank says nothing).
        assert 0 not in codes, (events, codes, out[-3000:])
        if fault["kind"] == "disk_full":
            assert codes == [2, 2] and "No space left on device" in out, (events, out[-3000:])
        else:
            assert codes[1 - fault["rank"]] == 2, (events, codes, out[-3000:])
            assert "error: a collective did not complete" in out, (events, out[-3000:])
        assert "Traceback" not in out, (events, out[-3000:])
    codes, out = attempt(cfg, tmp_path / "logs-final", None)
    assert codes == [0, 0], (events, out[-3000:])
    # DP=2 sums in another order than the 1-rank straight run: 1e-5 relative, as in the parity test.
    ref, got = losses(straight_run), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), (events, got)
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (events, step, loss, ref[step])
    listed = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(listed) == ["step00000006", "step00000007", "step00000008"], events
    assert (root / "latest").read_text().strip() == "step00000008"
    for p in complete(root):
        assert ckpt.verify(p, ckpt.read_meta(p)) == [], (events, p)
