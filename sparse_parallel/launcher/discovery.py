"""Rank discovery: who am I in this job, and where is rank 0?

One process of a training job learns its place from whoever started it:

- torchrun (or DeepSpeed's launcher) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list, from which
  ``scontrol show hostnames`` gives the first host as the master address;
- mpirun (Open MPI, MPICH, Intel MPI) is asked through mpi4py: rank and size from COMM_WORLD, the local
  rank from a shared-memory split, rank 0's host name and a free port broadcast to everyone.

Each source is one function taking its inputs explicitly (an environment mapping, a hostnames callable, an
MPI communicator) and returning a :class:`RankInfo`; :func:`discover` picks the source, and
:func:`export_env` writes the standard variables that ``torch.distributed`` reads.  Nothing else in the
project reads these variables.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from typing import Callable, Mapping

SOURCES = ("auto", "torchrun", "slurm", "mpi", "single")

# Set by mpirun/mpiexec of Open MPI, MPICH/Hydra and Intel MPI, and by PMIx launchers.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # which launcher it came from: one of SOURCES minus "auto"

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank must be in [0, {self.local_world_size}), got {self.local_rank}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}")

    def env(self) -> dict[str, str]:
        """The variables ``torch.distributed``'s env:// rendezvous and the trainer read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ValueError(f"{name} is not set")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def from_torchrun(env: Mapping[str, str]) -> RankInfo:
    """torchrun / torch.distributed.run / DeepSpeed's launcher: everything is already in the environment."""
    world = _int(env, "WORLD_SIZE")
    return RankInfo(
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
        local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        source="torchrun",
    )


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (``node[01-04,07]``) with ``scontrol show hostnames``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout
    except FileNotFoundError:
        raise ValueError("SLURM_JOB_NODELIST is set but scontrol is not on PATH; set MASTER_ADDR") from None
    except subprocess.CalledProcessError as e:
        raise ValueError(f"scontrol show hostnames {nodelist!r} failed: {e.stderr.strip()}") from None
    hosts = out.split()
    if not hosts:
        raise ValueError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts


def slurm_port(job_id: int) -> int:
    """Every task of a job computes the same port from the job id; jobs sharing a node differ."""
    return 20000 + job_id % 20000


def from_slurm(env: Mapping[str, str],
               hostnames: Callable[[str], list[str]] = scontrol_hostnames) -> RankInfo:
    """A task started by srun.  MASTER_ADDR/MASTER_PORT win when the batch script exported them."""
    world_var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") if v in env),
                     "SLURM_NTASKS")
    world = _int(env, world_var)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_JOB_NODELIST is not set; cannot find the master node")
        addr = hostnames(nodelist)[0]
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:
        port = slurm_port(_int(env, "SLURM_JOB_ID"))
    local_world = _slurm_tasks_on_this_node(env, world)
    return RankInfo(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        source="slurm",
    )


def _slurm_tasks_on_this_node(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node from SLURM_STEP_TASKS_PER_NODE/SLURM_TASKS_PER_NODE (``2(x3),1``) and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return world
    counts: list[int] = []
    for part in spec.split(","):
        count, _, rep = part.partition("(x")
        counts.extend([int(count)] * (int(rep.rstrip(")")) if rep else 1))
    node = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM_NODEID {node} is outside the task layout {spec!r}")
    return counts[node]


def from_mpi(comm=None, port: int | None = None) -> RankInfo:
    """A process started by mpirun: ask MPI.  Rank 0 chooses the port; everyone learns rank 0's host."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    from mpi4py import MPI

    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        local_rank, local_world = local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    master = (socket.gethostname(), port if port is not None else free_port()) if rank == 0 else None
    addr, master_port = comm.bcast(master, root=0)
    return RankInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                    master_addr=addr, master_port=master_port, source="mpi")


def single(env: Mapping[str, str]) -> RankInfo:
    """A plain process: a world of one."""
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def detect_source(env: Mapping[str, str]) -> str:
    """Which launcher started this process, judged from the environment.

    torchrun's variables come first (it may run inside a Slurm allocation); then MPI, because mpirun inside
    an allocation also leaves the batch step's SLURM_PROCID=0 in every rank; then an srun task.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if any(v in env for v in _MPI_RANK_VARS) and any(v in env for v in _MPI_SIZE_VARS):
        return "mpi"
    # The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N but no step id: it is not a task.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return "slurm"
    return "single"


def discover(source: str = "auto", env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's :class:`RankInfo` from ``source`` (``auto``: :func:`detect_source`)."""
    env = os.environ if env is None else env
    if source not in SOURCES:
        raise ValueError(f"launcher must be one of {', '.join(SOURCES)}; got {source!r}")
    if source == "auto":
        source = detect_source(env)
    if source == "torchrun":
        return from_torchrun(env)
    if source == "slurm":
        return from_slurm(env)
    if source == "mpi":
        return from_mpi()
    return single(env)


def export_env(info: RankInfo, env: dict | None = None) -> dict:
    """Write ``info.env()`` into ``env`` (default ``os.environ``) and return it."""
    env = os.environ if env is None else env
    env.update(info.env())
    return env
