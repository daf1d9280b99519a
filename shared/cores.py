"""The cores of one machine, shared between the trainer and the services beside it.

On a machine where evaluators run next to the trainer (``tuneloop run``), both want every
core: torch's OpenMP team of the trainer stalls whenever one of its threads is preempted, so
an evaluator generating beside a trainer that uses every core slows training several times
over. Starving the evaluator (a low priority alone) delays every verdict to the end of
training; splitting the cores while both work costs the trainer far less than evaluating
inline would (bench/feedback_loop.py measures both).

So a service that does model work beside the trainer *borrows* cores for it: it leaves a
lease file ``<pid>.lease`` (its thread count) in a folder on this machine
(``TUNELOOP_CORE_DIR``) while it works. The trainer looks at the leases at each step boundary
and trains on the cores nobody borrowed (at least one). Leases of dead processes (or of a pid
now used by something else) are ignored,
and a lease only counts on the cores the borrower may run on (its CPU affinity), so an
evaluator pinned to other cores takes nothing from the trainer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .procfs import running

ENV_DIR = "TUNELOOP_CORE_DIR"
ENV_NICE = "TUNELOOP_NICE"


def my_cores() -> set[int]:
    return set(os.sched_getaffinity(0))


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live tuneloop process (a killed borrower's pid may be reused by another)."""
    return running(pid)


def threads_left(total: set[int], leases: list[tuple[set[int], int]], reserve: int = 0) -> int:
    """Threads the trainer should use on ``total`` cores while ``leases`` (cores each borrower
    may use, threads it borrowed) are out, keeping ``reserve`` threads free for work it knows
    is coming. Pure: the policy, apart from the files."""
    borrowed = sum(min(threads, len(cores & total)) for cores, threads in leases)
    return max(1, len(total) - max(borrowed, reserve))


class CoreBudget:
    """The lease folder of one machine; ``None`` from ``from_env`` when cores are not shared.

    ``<pid>.present``: a helper (an evaluator) that works on this machine, with its threads;
    ``<pid>.lease``: it is working now. The trainer reserves the present helpers' cores from
    the moment it hands them work (a snapshot to evaluate) until a lease shows they took it,
    so a helper never waits for a core to even pick its work up.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._borrowing = 0  # blocks of this process holding the lease (shards taken at once)

    @classmethod
    def from_env(cls) -> "CoreBudget | None":
        folder = os.environ.get(ENV_DIR)
        return cls(Path(folder)) if folder else None

    def _write(self, name: str, threads: int) -> Path:
        path = self.folder / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(str(threads))
        tmp.replace(path)
        return path

    @contextlib.contextmanager
    def present(self, threads: int) -> Iterator[None]:
        """Announce a helper with ``threads`` threads for the duration of the block."""
        path = self._write(f"{os.getpid()}.present", threads)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def borrow(self, threads: int) -> Iterator[None]:
        """Hold a lease on ``threads`` cores for the duration of the block (blocks may overlap)."""
        path = self.folder / f"{os.getpid()}.lease"
        if not self._borrowing:
            self._write(path.name, threads)
        self._borrowing += 1
        try:
            yield
        finally:
            self._borrowing -= 1
            if not self._borrowing:
                path.unlink(missing_ok=True)

    def _read(self, suffix: str) -> list[tuple[set[int], int]]:
        """(cores, threads) of every live process but this one with a ``suffix`` file."""
        out = []
        me = os.getpid()
        with os.scandir(self.folder) as it:
            for entry in it:
                if not entry.name.endswith(suffix):
                    continue
                try:
                    pid = int(entry.name[:-len(suffix)])
                    if pid == me or not alive(pid):
                        continue
                    threads = int(Path(entry.path).read_text() or 1)
                    cores = set(os.sched_getaffinity(pid))
                except (ValueError, OSError):  # vanished meanwhile, or not a file of ours
                    continue
                out.append((cores, threads))
        return out

    def leases(self) -> list[tuple[set[int], int]]:
        return self._read(".lease")

    def helpers(self) -> list[tuple[set[int], int]]:
        return self._read(".present")

    def threads_for_me(self, expecting_work: bool = False) -> int:
        """Threads for the trainer now; ``expecting_work``: it handed helpers work they have
        not taken yet (no lease out), so their cores are kept free for them."""
        mine, leases = my_cores(), self.leases()
        reserve = 0
        if expecting_work and not leases:
            reserve = sum(min(t, len(c & mine)) for c, t in self.helpers())
        return threads_left(mine, leases, reserve)


def machine_folder() -> Path:
    """The lease folder every tuneloop process of this user on this machine agrees on."""
    return Path(tempfile.gettempdir()) / f"tuneloop-cores-{os.getuid()}"


def lower_priority(nice: int) -> None:
    """Let the trainer go first: ``nice`` this process and, where the kernel groups processes
    by session (autogroup: each service started in its own session is its own group, whose
    weight ignores its members' nice values), its group too."""
    if nice <= 0:
        return
    os.nice(nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def priority_from_env() -> None:
    """Apply ``TUNELOOP_NICE`` (set by ``tuneloop run`` for the services beside the trainer)."""
    raw = os.environ.get(ENV_NICE, "0")
    try:
        nice = int(raw)
    except ValueError:
        raise SystemExit(f"{ENV_NICE} must be a whole number, got {raw!r}") from None
    lower_priority(nice)
