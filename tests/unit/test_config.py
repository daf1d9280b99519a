import pytest

from tuneloop.config import ConfigError, load_config

REPO_EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "protocol.yaml"


def test_example_config_loads_and_resolves_paths_next_to_it():
    cfg = load_config(REPO_EXAMPLE)
    assert cfg.resolve(cfg.data.sources[0].path).is_file()
    assert cfg.train.lora.enabled


def test_unknown_key_is_named_with_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {learning_rat: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.learning_rat" in str(e.value)


def test_bad_values_and_missing_or_broken_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {learning_rate: -1}\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("model: {tiny: {hidden_size: 30, num_attention_heads: 4}}\ndata: {sources: [{path: x}]}\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(p)
