"""Sharing a machine's cores between the trainer and the services beside it (tuneloop.cores):
the policy, and the lease folder with real processes."""

import os
import subprocess
import sys

import pytest

from tuneloop.cores import CoreBudget, threads_left

HOLD = """
import sys, time
from pathlib import Path
from tuneloop.cores import CoreBudget
kind, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
budget = CoreBudget(Path(folder))
with getattr(budget, kind)(threads):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_trainer_keeps_the_cores_nobody_borrowed_and_always_one():
    assert threads_left({0, 1}, []) == 2
    assert threads_left({0, 1}, [({0, 1}, 1)]) == 1
    assert threads_left({0, 1}, [({0, 1}, 1), ({0, 1}, 1)]) == 1    # never below one
    assert threads_left({0, 1, 2, 3}, [({2, 3}, 2)]) == 2
    assert threads_left({0}, [({1}, 1)]) == 1                       # a helper pinned elsewhere takes nothing
    assert threads_left({0, 1, 2, 3}, [({0, 1, 2, 3}, 4)]) == 1
    assert threads_left({0, 1, 2, 3}, [], reserve=1) == 3           # work handed out, not yet taken
    assert threads_left({0, 1, 2, 3}, [({0, 1, 2, 3}, 2)], reserve=1) == 2  # a lease counts, not both


@pytest.fixture
def hold(tmp_path):
    procs = []

    def start(kind: str, threads: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(tmp_path / "cores"), str(threads)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_leases_of_live_processes_count_and_dead_ones_do_not(tmp_path, hold):
    budget = CoreBudget(tmp_path / "cores")
    cores = len(os.sched_getaffinity(0))
    assert budget.threads_for_me() == cores
    evaluator = hold("borrow", 1)
    assert budget.threads_for_me() == max(1, cores - 1)
    assert budget.leases() == [(set(os.sched_getaffinity(evaluator.pid)), 1)]
    evaluator.kill()                       # SIGKILL: its lease file stays behind ...
    evaluator.wait()
    assert (tmp_path / "cores" / f"{evaluator.pid}.lease").exists()
    assert budget.threads_for_me() == cores  # ... and counts for nothing


def test_cores_of_a_present_helper_are_reserved_only_while_work_is_handed_out(tmp_path, hold):
    budget = CoreBudget(tmp_path / "cores")
    cores = len(os.sched_getaffinity(0))
    hold("present", 1)
    assert budget.threads_for_me(expecting_work=False) == cores
    assert budget.threads_for_me(expecting_work=True) == max(1, cores - 1)


def test_a_lease_is_held_while_any_block_of_the_process_holds_it(tmp_path):
    budget = CoreBudget(tmp_path / "cores")
    lease = tmp_path / "cores" / f"{os.getpid()}.lease"
    with budget.borrow(1):
        with budget.borrow(1):
            assert lease.read_text() == "1"
        assert lease.exists()              # the outer block still works
    assert not lease.exists()
