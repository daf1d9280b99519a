"""Which model a run starts from, and loading a checkpoint of it: what the trainer, the
evaluator, the checkpoint service's export and ``tuneloop export`` all need."""

from __future__ import annotations

from pathlib import Path

from .config import Config

TINY = "tiny"  # the built-in tiny Llama, built inside the run (no hub here)


def local_base(cfg: Config) -> Path | None:
    """The configured model as a local folder (relative to the config file), if it is one."""
    if cfg.model.name_or_path == TINY:
        return None
    path = cfg.resolve(cfg.model.name_or_path)
    return path if path.is_dir() else None


def base_ref(cfg: Config) -> str:
    """The base model as events name it: ``base`` (inside the run directory) for the tiny
    model and for a local folder (linked in), else the hub id."""
    return "base" if cfg.model.name_or_path == TINY or local_base(cfg) else cfg.model.name_or_path


def imports() -> None:
    """What ``load_model`` imports (seconds of CPU, once per process): see ``service.warm_up``."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def load_model(base: str | Path, checkpoint: str | Path, adapter: bool):
    """The model of a checkpoint in float32: for an adapter checkpoint, ``base`` with the LoRA
    weights merged in; else the checkpoint's own full weights."""
    import torch
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)


def tokenizer_source(base: str | Path, checkpoint: str | Path) -> str:
    """Where the checkpoint's tokenizer is: in it when saved there, else the base's."""
    return str(checkpoint if (Path(checkpoint) / "tokenizer_config.json").exists() else base)
