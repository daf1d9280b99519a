"""Paths from events and files on disk stay confined: no hub id that is really a folder of the
service's working directory, no symbolic link followed out of a checkpoint, no checkpoint
accepted without a manifest that matches what the checkpoint service recorded."""

from __future__ import annotations

import json
import os

import pytest

from tuneloop.export import export_adapter
from tuneloop.checkpoints import MANIFEST, STATE_FILE, digest_dir, latest_intact, verify
from tuneloop.storage import UnsafePath, resolve_model


def catalogue(ckpt) -> str:
    """What the checkpoint service does to a saved checkpoint: hash it, write the manifest."""
    sha, size, files = digest_dir(ckpt)
    (ckpt / MANIFEST).write_text(json.dumps({"sha256": sha, "bytes": size, "files": files}))
    return sha


def checkpoint(root, step: int):
    c = root / "checkpoints" / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (c / "adapter_config.json").write_text("{}")
    (c / STATE_FILE).write_text("{}")
    return c


def test_a_hub_id_naming_a_folder_of_the_working_directory_is_refused(tmp_path, monkeypatch):
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    run.mkdir()
    (cwd / "secrets" / "model").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    with pytest.raises(UnsafePath, match="working directory"):
        resolve_model(run, "secrets/model")
    with pytest.raises(UnsafePath, match="working directory"):
        resolve_model(run, "secrets")
    assert resolve_model(run, "org/model") == "org/model"  # a real hub id still is one


def test_a_symlink_out_of_a_checkpoint_is_neither_hashed_nor_exported(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    ckpt = checkpoint(tmp_path / "run", 10)
    (ckpt / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UnsafePath, match="symbolic link"):
        digest_dir(ckpt)
    with pytest.raises(UnsafePath, match="symbolic link"):
        export_adapter(ckpt, "org/base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_wants_a_manifest_and_the_recorded_digest(tmp_path):
    ckpt = checkpoint(tmp_path / "run", 10)
    assert "no manifest" in verify(ckpt)  # never catalogued: nothing to check it against
    assert verify(ckpt, uncatalogued_ok=True) is None  # ... what a trainer resuming right after a save accepts
    sha = catalogue(ckpt)
    assert verify(ckpt, sha) is None
    (ckpt / MANIFEST).unlink()
    assert "manifest" in verify(ckpt, sha, uncatalogued_ok=True)  # recorded, then its manifest removed

    # Weights swapped and the manifest written anew to match: the recorded digest still tells.
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(64))
    catalogue(ckpt)
    assert verify(ckpt) is None  # the manifest alone is fooled
    assert "recorded as" in verify(ckpt, sha)
    # A file planted beside the recorded ones.
    (ckpt / MANIFEST).unlink()
    sha = catalogue(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"pickle")
    assert "optimizer.pt" in verify(ckpt, sha)


def test_resume_moves_aside_a_checkpoint_that_differs_from_its_record(tmp_path):
    run = tmp_path / "run"
    older, newer = checkpoint(run, 10), checkpoint(run, 20)
    recorded = {f"checkpoints/{c.name}": catalogue(c) for c in (older, newer)}
    (newer / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (newer / MANIFEST).unlink()
    catalogue(newer)  # tampered, with a fresh manifest
    assert latest_intact(run / "checkpoints", recorded) == older
    assert (run / "checkpoints" / "checkpoint-20.corrupt").is_dir()  # kept as found
    fresh = checkpoint(run, 30)  # saved just before a stop: not recorded yet, no manifest
    assert latest_intact(run / "checkpoints", recorded) == fresh


def test_the_run_folder_layout_has_one_home(tmp_path):
    """Snapshots are named and read back by RunDir alone; a folder that is not one is left out."""
    from tuneloop.storage import RunDir, relative

    rd = RunDir(tmp_path / "r")
    for step in (5, 10):
        rd.snapshot(step).mkdir(parents=True)
    (rd.snapshots / "step-10.tmp").mkdir()
    (rd.snapshots / "notes").mkdir()
    assert rd.snapshot_folders() == {5: rd.snapshot(5), 10: rd.snapshot(10)}
    assert relative(rd.path, rd.snapshot(5)) == "snapshots/step-5"
    assert rd.log("trainer") == tmp_path / "r" / "logs" / "trainer.log"
    assert (rd.checkpoints.name, rd.applied.name, rd.config.name) == ("checkpoints", "controls-applied.json", "config.yaml")
