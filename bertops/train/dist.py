"""The process group a run trains in: one plain process or a rank under the ``deepspeed`` launcher.

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain ``bertops
pretrain`` sets them itself (world size 1, a free loopback port), so the same code path runs in both.
Ranks watch their launcher: if it goes away (SIGTERM or SIGKILL of ``deepspeed``, whose local-launch
path does not forward signals), the rank terminates itself instead of training on as an orphan.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda"
    launched: bool  # started by a launcher (the env told us our rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """Rank facts before the process group exists (validation runs on these, identically on every rank)."""
    import torch

    launched = all(k in os.environ for k in LAUNCHER_ENV)
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if launched else 1
    local = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return World(rank, world, local, device, launched)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(world: World) -> None:
    """Join (or, for a plain process, create) the process group: NCCL on GPUs, gloo/shared memory on CPUs."""
    import warnings

    import deepspeed
    import torch

    # torch warns on every rank that DeepSpeed calls its older collective names; nothing for a user to do
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not world.launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if world.device == "cuda":
        torch.cuda.set_device(world.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Every rank on a node would otherwise start one OpenMP thread per core: N ranks x N threads on N
        # cores makes the threads wait on each other at every parallel region (10x slower steps were seen).
        local = int(os.environ.get("LOCAL_SIZE", 1)) if world.launched else 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if world.launched:
        watch_launcher()
    deepspeed.init_distributed(dist_backend="nccl" if world.device == "cuda" else "gloo", verbose=False)
    if world.device == "cpu":
        unlink_shm_buffer(world.rank)


SHM_DIR = Path("/dev/shm")


def shm_buffer_name(rank: int) -> str:
    """DeepSpeed's CPU allreduce workspace of ``rank`` (ops/csrc/cpu/comm/shm.cpp: uid, master addr, port, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_buffer(rank: int) -> None:
    """Unlink this rank's /dev/shm workspace (~69 MB) once every rank has mapped every other's.

    DeepSpeed's shared-memory allreduce creates one file per rank and never removes it, so each run
    (and every killed one) would leave them behind. Its initialisation maps all peers' files before
    returning; after the barrier no rank opens one again, and an unlinked file lives on, mapped, until
    the last process exits, so nothing is left in /dev/shm however the run ends.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    (SHM_DIR / shm_buffer_name(rank)).unlink(missing_ok=True)


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; [] when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent_of(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")  # a killed, unreaped runner is a zombie


GRACE_S = 30  # what DeepSpeed's launch.py itself gives its ranks between SIGTERM and SIGKILL


def watch_launcher(interval: float = 1.0) -> None:
    """Terminate this rank when its launcher (parent) or the ``deepspeed`` runner above it is gone.

    SIGTERM first, which lets a training loop save its current step (bertops.train.stop); the rank
    exits at the latest GRACE_S seconds later (a peer gone mid-collective would block it forever)."""
    parent = os.getppid()
    grand = _parent_of(parent)
    try:
        cmdline = Path(f"/proc/{grand}/cmdline").read_bytes().decode(errors="replace")
        watched_grand = grand > 1 and "deepspeed" in cmdline
    except OSError:
        watched_grand = False

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or (watched_grand and not _alive(grand)):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(GRACE_S)
                os._exit(143)

    threading.Thread(target=watch, name="bertops-launcher-watch", daemon=True).start()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, so counts stay exact)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
