"""The local stack's state lock tells the next start about a stack that never stopped (killed,
crashed, the machine went down): its work after the last snapshot is lost, and the start says so
instead of rolling back in silence."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from spool.devstack.state import STOPPED, StateUnusable, Unclean, lock_state_dir

pytestmark = pytest.mark.unit


def killed(directory: Path) -> Unclean:
    """A stack that took the lock and died without releasing it (the kernel drops the lock)."""
    lock = lock_state_dir(directory)
    lock._handle.close()
    again = lock_state_dir(directory)
    previous = again.previous
    again.release(loaded=False)  # it stopped before reading the snapshot: the word is passed on
    assert previous is not None
    return previous


def test_a_stack_that_stopped_leaves_nothing_to_warn_of(tmp_path: Path) -> None:
    lock = lock_state_dir(tmp_path)
    assert lock.previous is None
    lock.release()
    assert (tmp_path / ".lock").read_text() == STOPPED
    assert lock_state_dir(tmp_path).previous is None


def test_a_stack_that_never_stopped_is_named_with_what_was_lost(tmp_path: Path) -> None:
    before = time.time()
    previous = killed(tmp_path)
    assert previous.holder == f"pid {os.getpid()}" and previous.started >= before - 1
    assert "no snapshot was ever saved here" in (previous.lost_since(None) or "")
    older = previous.lost_since(previous.started - 3 * 3600)
    assert older is not None and "restored the snapshot saved 3 h 0 min ago" in older
    assert "did not stop" in older and "what it did is lost" in older
    assert previous.lost_since(previous.started + 5) is None  # saved after it started: nothing lost
    # a start that stopped before reading the snapshot passed the word on, unchanged
    assert lock_state_dir(tmp_path).previous == previous


def test_a_stack_that_could_not_save_is_named_at_the_next_start(tmp_path: Path) -> None:
    lock_state_dir(tmp_path).release(stopped=False)
    assert lock_state_dir(tmp_path).previous is not None


def test_an_older_lock_file_dates_its_stack_by_the_file(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("pid 123")
    written = (tmp_path / ".lock").stat().st_mtime
    assert lock_state_dir(tmp_path).previous == Unclean("pid 123", written)


def test_a_running_stack_is_named_by_its_pid_alone(tmp_path: Path) -> None:
    held = lock_state_dir(tmp_path)
    with pytest.raises(StateUnusable) as refused:
        lock_state_dir(tmp_path)
    assert f"another local stack (pid {os.getpid()})" in str(refused.value)
    held.release()
