"""Paths and models named by events: confined to the run, the base named relatively."""

import pytest

from tuneloop.storage import UnsafePath, confine, resolve_model


def test_paths_from_events_stay_inside_the_run(tmp_path):
    (tmp_path / "ck").mkdir()
    assert confine(tmp_path, "ck") == (tmp_path / "ck").resolve()
    for bad in ("../x", "/etc/passwd", "ck/../../x", ""):
        with pytest.raises(UnsafePath):
            confine(tmp_path, bad)
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(UnsafePath):
        confine(tmp_path, "out/passwd")
    assert resolve_model(tmp_path, "ck") == (tmp_path / "ck").resolve()
    assert resolve_model(tmp_path, "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(UnsafePath):
        resolve_model(tmp_path, "/etc")


def test_a_local_model_folder_becomes_the_runs_base_and_events_name_it_relatively(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer import model as models
    from tuneloop.models import base_ref, local_base

    src = tmp_path / "previous" / "export" / "merged"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    cfg = tiny_config(tmp_path)
    assert base_ref(cfg) == "base" and local_base(cfg) is None  # the tiny model is built in the run
    cfg.model.name_or_path = str(src)
    assert base_ref(cfg) == "base" and local_base(cfg) == src
    rdir = tmp_path / "run"
    base = models.link_local(src, rdir / "base")
    assert (base / "model.safetensors").read_bytes() == b"weights"
    assert resolve_model(rdir, base_ref(cfg)) == base.resolve()  # events carry "base", never an absolute path
    cfg.model.name_or_path = "org/some-model"
    assert base_ref(cfg) == "org/some-model" and local_base(cfg) is None
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.link_local(tmp_path / "not-a-model", tmp_path / "run2" / "base")
