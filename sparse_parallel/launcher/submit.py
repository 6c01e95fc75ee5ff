"""``sparse-parallel submit``: render ``slurm/train.sbatch`` for a config and hand it to ``sbatch``.

The job directory ``<run.dir>/jobs/<time stamp>/`` receives the resolved config (overrides applied) and
the rendered script; the job trains from that copy, so editing the original config later does not change a
queued job.  Everything is checked first (config, run directory, partition, GPUs and CPUs per node);
``--dry-run`` prints the script and writes and submits nothing.  Arguments this command does not know go
to ``sbatch`` unchanged.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .preflight import check_writable_dir, describe, resolve_config

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
SIGNAL_SLACK_S = 60
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What the job asks Slurm for."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0         # 0 -> one per GPU (one in all on a CPU-only job)
    cpus_per_task: int = 0          # 0 -> Slurm's default
    partition: str = ""
    account: str = ""
    time: str = ""
    qos: str = ""
    constraint: str = ""
    job_name: str = ""
    signal_seconds: int = 120

    def __post_init__(self):
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 0), ("cpus_per_task", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ValueError(f"--tasks-per-node must equal --gpus-per-node ({self.gpus_per_node}): one rank "
                             f"per GPU; got {self.tasks_per_node}")
        if not 1 <= self.signal_seconds <= 65535:
            raise ValueError(f"--signal-seconds must be in [1, 65535], got {self.signal_seconds}")
        limit = slurm_time_seconds(self.time) if self.time else None
        # Slurm may send the warning up to 60 s early (its event resolution); a warning that can come
        # before the job has trained anything would requeue it forever.
        if limit is not None and self.signal_seconds + SIGNAL_SLACK_S >= limit:
            raise ValueError(f"--signal-seconds {self.signal_seconds} + {SIGNAL_SLACK_S} s (how early Slurm may "
                             f"send it) must be shorter than --time {self.time} ({limit} s)")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def directives(self) -> list[str]:
        out = []
        if self.gpus_per_node:
            out.append(f"--gpus-per-node={self.gpus_per_node}")
        for name in ("cpus_per_task", "partition", "account", "time", "qos", "constraint"):
            value = getattr(self, name)
            if value:
                out.append(f"--{name.replace('_', '-')}={value}")
        return [f"#SBATCH {d}" for d in out]


def slurm_time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``);
    None for ``INFINITE``/``UNLIMITED``."""
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"--time must be M, M:S, H:M:S, D-H, D-H:M or D-H:M:S, got {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:     # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # M or M:S


# --------------------------------------------------------------------------------------------- cluster checks

@dataclasses.dataclass(frozen=True)
class PartitionNodes:
    """One line of ``sinfo``: a group of alike nodes of a partition."""

    partition: str
    default: bool
    nodes: int
    cpus: int
    gpus: int


def parse_gres_gpus(gres: str) -> int:
    """GPUs in a Gres string: ``gpu:8``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:2,gpu:v100:2``, ``(null)``."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres):
        item = item.split("(")[0].strip()
        fields = item.split(":")
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def parse_sinfo(text: str) -> list[PartitionNodes]:
    """Lines of ``sinfo -h -o '%P|%D|%c|%G'``."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, gres = line.split("|")
        out.append(PartitionNodes(name.rstrip("*"), name.endswith("*"), int(nodes), int(cpus.rstrip("+")),
                                  parse_gres_gpus(gres)))
    return out


def query_sinfo() -> list[PartitionNodes] | None:
    """The cluster's partitions, or None where Slurm's clients are not installed."""
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G"], capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise ValueError(f"sinfo failed (is the cluster up?): {proc.stderr.strip()}")
    return parse_sinfo(proc.stdout)


def check_against_cluster(spec: JobSpec, partitions: list[PartitionNodes]) -> str:
    """Raise ValueError when the job cannot fit the partition; return the partition's name."""
    names = sorted({p.partition for p in partitions})
    if spec.partition:
        if spec.partition not in names:
            raise ValueError(f"--partition {spec.partition!r} does not exist on this cluster; "
                             f"partitions: {', '.join(names) or 'none'}")
        name = spec.partition
    else:
        defaults = {p.partition for p in partitions if p.default}
        if not defaults:
            raise ValueError(f"the cluster has no default partition; give --partition (one of {', '.join(names)})")
        name = defaults.pop()
    groups = [p for p in partitions if p.partition == name]
    max_gpus = max(g.gpus for g in groups)
    if spec.gpus_per_node > max_gpus:
        raise ValueError(f"--gpus-per-node {spec.gpus_per_node} is more than a node of partition {name!r} has "
                         f"({max_gpus} GPUs)")
    cpus_needed = spec.ranks_per_node * max(spec.cpus_per_task, 1)
    max_cpus = max(g.cpus for g in groups)
    if cpus_needed > max_cpus:
        raise ValueError(f"{spec.ranks_per_node} tasks per node x {max(spec.cpus_per_task, 1)} CPUs each is more "
                         f"than a node of partition {name!r} has ({max_cpus} CPUs)")
    fitting = sum(g.nodes for g in groups if g.gpus >= spec.gpus_per_node and g.cpus >= cpus_needed)
    if spec.nodes > fitting:
        raise ValueError(f"--nodes {spec.nodes} is more than partition {name!r} has with "
                         f"{spec.gpus_per_node} GPUs and {cpus_needed} CPUs per node ({fitting})")
    return name


# ------------------------------------------------------------------------------------------------- rendering

def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value, or a value without a placeholder, raises."""
    used = set(_PLACEHOLDER.findall(template))
    missing = used - values.keys()
    if missing:
        raise ValueError(f"template placeholders without a value: {sorted(missing)}")
    unused = values.keys() - used
    if unused:
        raise ValueError(f"values the template does not use: {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def requeue_exit_code() -> int:
    from ..training import REQUEUE_EXIT_CODE

    return int(REQUEUE_EXIT_CODE)


def job_script(spec: JobSpec, derived, config_path: Path, job_dir: Path, workdir: Path,
               template: str, python: str = sys.executable) -> str:
    """The rendered batch script of a job training ``config_path`` (a resolved config) in ``job_dir``."""
    train = [python, "-m", "sparse_parallel.launcher.cli", "train", str(config_path),
             "--launcher", "slurm", "--resume", "auto"]
    summary = (f"{spec.nodes} node(s) x {spec.ranks_per_node} rank(s)"
               + (f" ({spec.gpus_per_node} GPUs per node)" if spec.gpus_per_node else " (CPU)")
               + f": {describe(derived)}")
    values = {
        "summary": summary,
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "tasks_per_node": spec.ranks_per_node,
        "directives": "\n".join(spec.directives()),
        "workdir": workdir,
        "job_dir": job_dir,
        "signal_seconds": spec.signal_seconds,
        "requeue_exit_code": requeue_exit_code(),
        "train_command": shlex.join(train),
    }
    for name in ("workdir", "job_dir"):
        if any(c.isspace() for c in str(values[name])):
            raise ValueError(f"{name} {values[name]} contains white space, which #SBATCH lines cannot hold")
    if not values["directives"]:  # no optional directive: no blank line among the #SBATCH lines either
        template = template.replace("{{directives}}\n", "{{directives}}")
    return render(template, values)


def new_job_dir(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir, n = run_dir / "jobs" / stamp, 1
    while job_dir.exists():
        n += 1
        job_dir = run_dir / "jobs" / f"{stamp}-{n}"
    return job_dir


def run(args) -> int:
    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition or "", account=args.account or "",
                   time=args.time or "", qos=args.qos or "", constraint=args.constraint or "",
                   job_name=args.job_name or "", signal_seconds=args.signal_seconds)
    cfg, derived = resolve_config(args.config, args.overrides, spec.world_size)
    run_dir = check_writable_dir(cfg.run.dir)
    if not spec.job_name:
        spec = dataclasses.replace(spec, job_name=f"sp-{run_dir.name}")
    template_path = Path(args.template)
    if not template_path.is_file():
        raise FileNotFoundError(f"--template {template_path} does not exist")

    try:
        partitions = query_sinfo()
        if partitions is None:
            raise ValueError("sbatch/sinfo are not on PATH: this machine is not a Slurm submit host")
    except ValueError as e:
        if not args.dry_run:
            raise ValueError(f"{e} (--dry-run prints the script without a cluster)") from None
        print(f"sparse-parallel submit: {e}; partition, GPUs and CPUs per node not checked", file=sys.stderr)
    else:
        check_against_cluster(spec, partitions)

    job_dir = new_job_dir(run_dir)
    config_path = job_dir / "config.yaml"
    script = job_script(spec, derived, config_path, job_dir, Path.cwd(), template_path.read_text())
    cmd = ["sbatch", "--parsable", *args.extra, str(job_dir / "train.sbatch")]
    if args.dry_run:
        print(script, end="")
        print(f"sparse-parallel submit: dry run; would write {config_path} and run: {shlex.join(cmd)}",
              file=sys.stderr)
        return 0

    job_dir.mkdir(parents=True)
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    script_path = job_dir / "train.sbatch"
    script_path.write_text(script)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise ValueError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {script_path}\n  {describe(derived)}\n  log: {job_dir}/slurm-{job_id}.out")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit a training job to Slurm",
                       description="Render slurm/train.sbatch for CONFIG into <run.dir>/jobs/<stamp>/ and "
                                   "submit it with sbatch.  More ranks give more sequence-parallel x "
                                   "data-parallel ranks by the config's rule; the script states the "
                                   "context length.  Unknown arguments are passed to sbatch.")
    p.add_argument("config", help="YAML training config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= ranks) per node; 0: a CPU job")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="ranks per node; default one per GPU, or 1 on a CPU job")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="warn the job this many seconds before its time limit (USR1: checkpoint, requeue)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--template", default=str(TEMPLATE), help="batch script template")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    p.set_defaults(func=run, accepts_extra=True)
