"""Several training processes, one voice on the bus.

``python -m tuneloop.trainer --processes N`` re-executes itself under torchrun. Every rank
trains (DDP, or FSDP when configured); only rank 0 talks to NATS. At each step boundary rank
0 broadcasts what arrived (controls, feedback, a stop request) and every rank applies the
same events in the same order, so all ranks take the same decisions at the same step.

The broadcasts use their own gloo group, whatever the training backend (gloo on CPU, NCCL
on GPUs), with a long timeout: a paused run exchanges an empty list every few seconds and
must never time out.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(days=7)
_group = None  # the gloo group for control-plane broadcasts


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True inside a torchrun worker (torchrun sets these for every rank)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when torchrun dies: a killed service leaves no rank behind.

    (A SIGTERM to torchrun is different: it is forwarded, and rank 0 stops at a step boundary.)
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def torchrun_argv(processes: int, argv: list[str]) -> list[str]:
    """The command that runs this service as ``processes`` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={processes}",
            f"--master-port={_free_port()}", "-m", "tuneloop.trainer", *argv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(cuda: bool) -> None:
    """Join the process group (before the Trainer does, so accelerate reuses it)."""
    global _group
    if world_size() == 1 or _group is not None:
        return
    import torch
    import torch.distributed as dist

    if cuda and world_size() > torch.cuda.device_count():
        raise RuntimeError(f"{world_size()} processes but {torch.cuda.device_count()} visible GPU(s): NCCL needs one "
                           "GPU per process; lower train.processes (or set train.device: cpu for gloo)")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    log.info("rank %d of %d joined (%s)", rank(), world_size(), dist.get_backend())


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (pickled); a no-op in a single process."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_group)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_group)
    return out


def scatter(items: list | None):
    """Rank 0 hands ``items[r]`` to rank r; returns this rank's item."""
    if world_size() == 1:
        return items[0]
    import torch.distributed as dist

    out = [None]
    dist.scatter_object_list(out, items if rank() == 0 else None, src=0, group=_group)
    return out[0]


def check_agreement(record: dict) -> None:
    """Raise when the ranks disagree on ``record`` (step, lr, controls applied, weights).

    Called at every checkpoint: ranks that drifted apart would otherwise train on silently.
    """
    records = gather(record)
    bad = None
    if rank() == 0 and any(r != records[0] for r in records[1:]):
        bad = f"ranks disagree at a checkpoint: {records}"
    bad = broadcast(bad)
    if bad:
        raise RuntimeError(bad)
    if rank() == 0 and world_size() > 1:
        log.info("%d ranks agree at step %s: %s", world_size(), record.get("step"), record)
