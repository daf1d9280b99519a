"""The command line: clear errors for bad input, init for deployments, proto check."""

from typer.testing import CliRunner

from helpers import REPO
from tuneloop.cli import app

runner = CliRunner()


def test_run_with_a_broken_config_names_the_field_and_starts_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {max_step: 5}\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "train.max_step" in result.output and "Extra inputs" in result.output
    assert not (tmp_path / "runs").exists()


def test_init_writes_the_run_directory_services_read(tmp_path):
    result = runner.invoke(app, ["init", str(REPO / "examples" / "protocol.yaml"), "--run-id", "demo",
                                 "--storage", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from tuneloop.storage import load_run_config

    cfg = load_run_config(tmp_path, "demo")
    assert cfg.resolve(cfg.data.sources[0].path).is_file()
    bad = runner.invoke(app, ["init", str(REPO / "examples" / "protocol.yaml"), "--run-id", "no/slash",
                              "--storage", str(tmp_path)])
    assert bad.exit_code == 2 and "invalid run id" in bad.output


def test_ctl_on_an_unknown_run_says_where_it_looked(tmp_path):
    result = runner.invoke(app, ["ctl", "ghost", "stop", "--storage", str(tmp_path)])
    assert result.exit_code == 2 and "no run 'ghost'" in result.output


def test_proto_check_passes_on_the_repo():
    result = runner.invoke(app, ["proto", "--check", "--out", str(REPO / "proto")])
    assert result.exit_code == 0, result.output
