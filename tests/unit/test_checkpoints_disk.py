"""A full disk, recognised however the writer reports it, and what is left of the checkpoint it
interrupted (the test with a real full volume is tests/reliability/test_full_disk.py)."""

from __future__ import annotations

import errno

from tuneloop.checkpoints import STATE_FILE, DiskFull, drop_half_written, folder, out_of_space


def test_enospc_is_recognised_under_the_writers_own_errors(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert out_of_space(wrapped, tmp_path)
    assert out_of_space(RuntimeError("[Errno 28] No space left on device"), tmp_path)
    assert not out_of_space(ValueError("a bad row"), tmp_path)  # this disk has room


def test_the_half_written_checkpoints_after_the_last_complete_one_go_and_the_error_says_where_to_resume(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False), (40, False)):
        folder(ckpts, step).mkdir(parents=True)
        if complete:
            (folder(ckpts, step) / STATE_FILE).write_text("{}")
    (ckpts / "checkpoint-5.corrupt").mkdir()  # moved aside earlier: not the trainer's to remove
    e = DiskFull(tmp_path, 30, ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-5.corrupt"]
    assert e.errno == errno.ENOSPC and e.step == 30
    assert "half-written checkpoint-30, checkpoint-40 removed" in e.strerror
    assert "the last complete checkpoint is checkpoint-20" in e.strerror
    assert drop_half_written(ckpts) == []
