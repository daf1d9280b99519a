"""Export a checkpoint as a PEFT LoRA adapter and/or a merged model plain transformers loads.

Both are written to a temporary folder and renamed into place, so an export directory is
either complete or absent. Weights are safetensors only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _replace(tmp: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _copy_tokenizer(src_dirs: list[Path], dest: Path) -> None:
    for name in TOKENIZER_FILES:
        for src in src_dirs:
            if (src / name).exists():
                shutil.copy2(src / name, dest / name)
                break


def export_adapter(checkpoint: Path, base: Path | str, dest: Path) -> Path:
    """Adapter weights + config (pointing at ``base``) + tokenizer."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, tmp / name)
    if not (tmp / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{checkpoint}: no adapter_model.safetensors")
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    bases = [Path(base)] if Path(str(base)).is_dir() else []
    _copy_tokenizer([checkpoint, *bases], tmp)
    return _replace(tmp, dest)


def export_merged(checkpoint: Path, base: Path | str, adapter: bool, dest: Path) -> Path:
    """Base with the adapter merged in (or the full fine-tuned weights), as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    tok_src = checkpoint if (checkpoint / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)
    return _replace(tmp, dest)
