"""Which model a run starts from, and loading a checkpoint of it: what the trainer, the
evaluator, the checkpoint service's export and ``tuneloop export`` all need."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from . import gguf
from .config import Config

log = logging.getLogger(__name__)
TINY = "tiny"  # the built-in tiny Llama, built inside the run (no hub here)


def gguf_base(cfg: Config) -> bool:
    """Whether the configured model is a GGUF file (see ``gguf``)."""
    return gguf.is_gguf(cfg.model.name_or_path, cfg.model.gguf_file)


def local_base(cfg: Config) -> Path | None:
    """The configured model as a local folder (relative to the config file), if it is one."""
    if cfg.model.name_or_path == TINY or gguf_base(cfg):
        return None
    path = cfg.resolve(cfg.model.name_or_path)
    return path if path.is_dir() else None


def base_ref(cfg: Config) -> str:
    """The base model as events name it: ``base`` (inside the run directory) for the tiny
    model, a local folder or a GGUF (linked in, dequantized), else the hub id."""
    if cfg.model.name_or_path == TINY or gguf_base(cfg) or local_base(cfg):
        return "base"
    return cfg.model.name_or_path


def portable_name(cfg: Config, base: Path | str) -> str:
    """How an export names its base for another machine: the hub id, or ``package:DIST`` for the
    GGUF a package ships; a local folder, a GGUF file and the tiny model have no name but their
    path here (``base``)."""
    ref = cfg.model.name_or_path
    if ref.startswith(gguf.PACKAGE) or base_ref(cfg) != "base":
        return ref
    return str(Path(base).resolve()) if Path(str(base)).is_dir() else str(base)


def resolve_base(name: str, fallback: str | None = None) -> str:
    """A base named by ``portable_name`` as something transformers loads here: a ``package:``
    GGUF dequantized (cached), a folder or a hub id as it is; ``fallback`` (the path it was
    trained from) when the name does not resolve on this machine."""
    if gguf.is_gguf(name):
        try:
            return str(gguf.dequantized(gguf.locate(name, None, Path)))
        except gguf.GGUFError:
            pass
    elif Path(name).is_dir() or (not Path(name).is_absolute() and re.fullmatch(r"[\w.-]+/[\w.-]+", name)):
        return name
    if fallback and Path(fallback).is_dir():
        return fallback
    raise FileNotFoundError(f"base model {name!r} is not on this machine"
                            + (f" (nor {fallback}, where it was trained from)" if fallback else "")
                            + ": install its package, or copy the base there")


def gguf_folder(cfg: Config) -> Path:
    """The dequantized folder of the configured GGUF (made on first use, cached per machine)."""
    return gguf.dequantized(gguf.locate(cfg.model.name_or_path, cfg.model.gguf_file, cfg.resolve))


def with_chat_template(tokenizer, template: str = "model"):
    """``tokenizer`` ready to prompt: a pad token (its eos where it has none) and the chat
    template prompts are written in: tuneloop's for 'tuneloop', and for a base without one;
    else the base's own, which a pretrained instruct model was trained on. tuneloop's closes
    each answer with the tokenizer's eos, which the trainer appends to each completion."""
    from tuneloop.chat import jinja

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template == "tuneloop" or not tokenizer.chat_template:
        tokenizer.chat_template = jinja(tokenizer.eos_token)
    return tokenizer


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


def _identity(folder: str | Path) -> tuple:
    """The same base whatever its path: runs that linked one model folder in (hard links:
    a sweep's trials, a GGUF's cache) share the weights file's inode."""
    for name in ("model.safetensors", "model.safetensors.index.json", "config.json"):
        p = Path(folder) / name
        if p.is_file():
            st = p.stat()
            return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    return (str(folder),)


class Resident:
    """One base model kept in memory, with the LoRA adapter of one checkpoint at a time on it.

    Loading 134M parameters takes seconds; an adapter takes milliseconds. The evaluator scores
    every checkpoint of a run (and the baseline) on the same base, so it loads the base once and
    swaps adapters (``peft``'s ``load_adapter``/``delete_adapter``: the base weights are never
    touched). The baseline runs with the adapter disabled. Full checkpoints are loaded whole."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.key: tuple | None = None
        self.base = None          # the plain model, or a PeftModel around it once an adapter came
        self.adapter: str | None = None  # the checkpoint whose adapter is active
        self.full: tuple | None = None   # (checkpoint, model) of the last full checkpoint
        self.loads = {"base": 0, "adapter": 0, "full": 0}  # what was read from disk, for logs and tests

    def _base(self, base: str | Path):
        key = _identity(base)
        if key != self.key:
            import torch
            from transformers import AutoModelForCausalLM

            self.base, self.adapter, self.key = None, None, None
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            self.base, self.key = (model.to(self.device) if self.device else model).eval(), key
            self.loads["base"] += 1
            log.info("base %s loaded (%.1fM parameters); checkpoints' adapters swap on it (loads so far: %s)",
                     base, model.num_parameters() / 1e6, self.loads)
        return self.base

    def model(self, base: str | Path, checkpoint: str | Path | None, adapter: bool):
        """(model, adapters on): the model to generate with for ``checkpoint`` (None: the base
        itself); when ``adapters on`` is False, generate under ``disable_adapter()``."""
        if checkpoint is not None and not adapter:
            if self.full is None or self.full[0] != str(checkpoint):
                import torch
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
                self.full = (str(checkpoint), (model.to(self.device) if self.device else model).eval())
                self.loads["full"] += 1
            return self.full[1], True
        from peft import PeftModel

        model = self._base(base)
        if checkpoint is None:
            return model, not isinstance(model, PeftModel)

        name = f"ckpt{self.loads['adapter']}"
        if isinstance(model, PeftModel):
            if self.adapter != str(checkpoint):
                old = model.active_adapter
                model.load_adapter(str(checkpoint), adapter_name=name, is_trainable=False)
                model.set_adapter(name)
                model.delete_adapter(old)
                self.loads["adapter"] += 1
        else:
            model = self.base = PeftModel.from_pretrained(model, str(checkpoint), adapter_name=name, is_trainable=False)
            model.eval()
            self.loads["adapter"] += 1
        self.adapter = str(checkpoint)
        return model, True

    def save_merged(self, base: str | Path, checkpoint: str | Path, dest: Path) -> None:
        """Save base + the checkpoint's adapter merged, as ``merge_and_unload`` would, without
        merging into the resident weights: each LoRA layer's delta is added to a copy."""
        from peft.tuners.lora import LoraLayer

        model, _ = self.model(base, checkpoint, adapter=True)
        name, inner = model.active_adapter, model.get_base_model()
        deltas = {path: m.get_delta_weight(name) for path, m in inner.named_modules()
                  if isinstance(m, LoraLayer) and name in m.lora_A}
        state = {}
        for key, value in inner.state_dict().items():
            if ".lora_" in key:
                continue
            clean = key.replace(".base_layer.", ".")
            layer = clean.rsplit(".", 1)[0]
            if key.endswith(".base_layer.weight") and layer in deltas:
                value = value + deltas[layer].to(value.dtype)
            state[clean] = value
        inner.save_pretrained(dest, state_dict=state, safe_serialization=True)
