"""Process layout from a cluster launcher: ``torchrun`` and SLURM's ``srun``.

Both trainers (``tools/pretrain_net.py``, ``tools/train_net.py``) start their processes in one
of two ways:

- **Launched from outside.** ``torchrun --nproc-per-node N ...`` (or any launcher that sets
  torch's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``) or
  ``srun`` with several tasks (``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NTASKS``) has
  already started one process per device: each joins the process group from its environment
  and spawns nothing. ``--num-gpus`` / ``--num-machines`` / ``--machine-rank`` / ``--dist-url``
  are then ignored (a warning says so when they ask for another layout).
- **Otherwise** detectron2's ``launch`` spawns ``--num-gpus`` processes per machine, as before.

``launcher_env`` reads the environment (a pure function of the mapping it is given; tests pass a
fake one) and ``launch`` acts on it. The process group is set up the way detectron2's ``launch``
does it (NCCL with GPUs, gloo without; ``comm.create_local_process_group`` for the per-machine
group that ``comm.get_local_rank`` reads; a barrier), so detectron2's utilities work unchanged.
A process uses GPU ``LOCAL_RANK``, or GPU 0 when it sees only one (``srun --gpus-per-task 1``).

SLURM: the rendezvous address is ``MASTER_ADDR`` when set, else the first host of the step's
node list (``SLURM_STEP_NODELIST``, ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``); the port is
``MASTER_PORT`` when set, else ``SLURM_DEFAULT_PORT_BASE + SLURM_JOB_ID % 10000`` (distinct
for jobs that share a node) or ``SLURM_DEFAULT_PORT_BASE`` without a job id. A single-task
allocation (``SLURM_NTASKS`` 1, e.g. a batch script running python directly) is not a launch:
the flags decide, as without SLURM.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "LaunchEnv",
    "SLURM_DEFAULT_PORT_BASE",
    "first_slurm_host",
    "launch",
    "launcher_env",
    "slurm_tasks_per_node",
]

logger = logging.getLogger("nfdet.distributed")

# The SLURM rendezvous port when MASTER_PORT is not set: this plus SLURM_JOB_ID % 10000.
SLURM_DEFAULT_PORT_BASE = 20000
DEFAULT_TIMEOUT = timedelta(minutes=30)  # detectron2's launch uses the same


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in a job started by an outside launcher.

    Attributes:
        launcher (str): "torchrun" or "slurm".
        rank (int): global rank.
        local_rank (int): rank on this machine (the GPU index).
        world_size (int): processes in the job.
        local_world_size (int): processes per machine.
        master_addr (str): rendezvous host.
        master_port (int): rendezvous port.
    """

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        """torch.distributed's init URL: ``env://`` under torchrun (its agent's store may be
        used), ``tcp://host:port`` under SLURM."""
        if self.launcher == "torchrun":
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``"node[03-05,9],gpu1"`` -> ``"node03"``.

    Every bracket takes its first value (zero padding kept): ``"r[1-2]-n[07-08]"`` ->
    ``"r1-n07"``.

    Raises:
        ValueError: an empty or malformed list.
    """
    nodelist = nodelist.strip()
    # The first top-level entry: commas inside brackets separate values, not hosts.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    if not entry or depth < 0 or entry.count("[") != entry.count("]"):
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")

    def first(match: re.Match) -> str:
        return re.split(r"[,-]", match.group(1))[0]

    host = re.sub(r"\[([^\]]*)\]", first, entry)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    return host


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Task counts of SLURM's ``*_TASKS_PER_NODE`` syntax: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot read SLURM tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _torchrun_env(environ: Mapping[str, str]) -> LaunchEnv:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK") if k not in environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but not {', '.join(missing)} (set by "
                         "torchrun; another launcher must set them too)")
    if _int(environ, "MASTER_PORT") == 0:
        # torchrun --master-port 0 hands the 0 on and the processes wait for each other forever.
        raise ValueError("MASTER_PORT=0: give torchrun a port (--master-port) or --standalone")
    world = _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    return LaunchEnv("torchrun", _int(environ, "RANK"), _int(environ, "LOCAL_RANK"), world,
                     local_world, environ["MASTER_ADDR"], _int(environ, "MASTER_PORT"))


def _slurm_env(environ: Mapping[str, str], world: int) -> LaunchEnv:
    spec = (environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
            or environ.get("SLURM_NTASKS_PER_NODE"))
    if spec:
        counts = sorted(set(slurm_tasks_per_node(spec)))
        if len(counts) != 1:
            raise ValueError(f"SLURM tasks per node {spec!r}: the trainers need the same number "
                             "of tasks on every node (e.g. srun --ntasks-per-node)")
        local_world = counts[0]
    else:
        local_world = world
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                    or environ.get("SLURM_NODELIST"))
        if not nodelist:
            raise ValueError("SLURM launch without a node list (SLURM_STEP_NODELIST / "
                             "SLURM_NODELIST) or MASTER_ADDR")
        addr = first_slurm_host(nodelist)
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = SLURM_DEFAULT_PORT_BASE + _int(environ, "SLURM_JOB_ID") % 10000
    else:
        port = SLURM_DEFAULT_PORT_BASE
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    return LaunchEnv("slurm", _int(environ, "SLURM_PROCID"), local_rank, world, local_world,
                     addr, port)


def launcher_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The process layout an outside launcher set up, or None when the flags decide.

    torchrun's variables (``RANK`` and ``WORLD_SIZE``) take precedence over SLURM's (torchrun
    may run inside a SLURM allocation); SLURM counts only with more than one task in the step.

    Args:
        environ (Mapping[str, str] | None): the environment; ``os.environ`` by default.

    Raises:
        ValueError: a variable that cannot be read, naming it.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _torchrun_env(environ)
    elif "SLURM_PROCID" in environ:
        key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        if key not in environ or _int(environ, key) <= 1:
            return None
        env = _slurm_env(environ, _int(environ, key))
    else:
        return None
    if not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(f"{env.launcher}: rank {env.rank} / local rank {env.local_rank} out of "
                         f"range for {env.world_size} processes, {env.local_world_size} per "
                         "machine")
    if env.world_size % env.local_world_size:
        raise ValueError(f"{env.launcher}: {env.world_size} processes do not split into "
                         f"machines of {env.local_world_size}")
    return env


def _init_process_group(env: LaunchEnv, timeout: timedelta) -> None:
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        count = torch.cuda.device_count()
        if env.local_rank < count:
            torch.cuda.set_device(env.local_rank)
        elif count == 1:  # each process sees its own GPU (e.g. srun --gpus-per-task 1)
            torch.cuda.set_device(0)
        else:
            raise ValueError(f"{env.launcher}: local rank {env.local_rank} but only {count} "
                             "GPUs visible")
    # env:// reads MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE itself (and torchrun's store).
    dist.init_process_group(
        backend="nccl" if has_gpu else "gloo", init_method=env.init_method,
        world_size=env.world_size, rank=env.rank, timeout=timeout,
    )
    try:
        from detectron2.utils import comm
    except ImportError:  # the pretraining trainer runs without detectron2
        comm = None
    if comm is not None:
        # detectron2's launch does this (comm.get_local_rank / get_local_size read it).
        comm.create_local_process_group(env.local_world_size)
    dist.barrier()


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1,
           machine_rank: int = 0, dist_url: str | None = "auto", args: tuple = (),
           spawn: Callable | None = None, timeout: timedelta = DEFAULT_TIMEOUT,
           environ: Mapping[str, str] | None = None):
    """Run ``main_func(*args)`` in this process when an outside launcher started it (see the
    module docstring), else hand over to ``spawn`` (detectron2's ``launch`` by default) with the
    flags.

    Args:
        main_func (callable): the per-process entry point.
        num_gpus_per_machine (int): ``--num-gpus``.
        num_machines (int): ``--num-machines``.
        machine_rank (int): ``--machine-rank``.
        dist_url (str | None): ``--dist-url``.
        args (tuple): ``main_func``'s arguments.
        spawn (callable | None): the launcher for the flags; detectron2's ``launch`` if None.
        timeout (timedelta): the process group's timeout.
        environ (Mapping | None): the environment (``os.environ`` by default).

    Returns:
        What ``main_func`` returns in this process (None when spawned processes ran it).
    """
    env = launcher_env(environ)
    if env is None:
        if spawn is None:
            from detectron2.engine import launch as spawn
        return spawn(main_func, num_gpus_per_machine, num_machines=num_machines,
                     machine_rank=machine_rank, dist_url=dist_url, args=args)
    flags = (num_gpus_per_machine, num_machines)
    if flags != (1, 1) and flags != (env.local_world_size,
                                     env.world_size // env.local_world_size):
        logger.warning("Started by %s with %d process(es), %d per machine: --num-gpus %d / "
                       "--num-machines %d ignored", env.launcher, env.world_size,
                       env.local_world_size, num_gpus_per_machine, num_machines)
    if env.world_size == 1:
        return main_func(*args)
    _init_process_group(env, timeout)
    try:
        return main_func(*args)
    finally:
        dist.destroy_process_group()
