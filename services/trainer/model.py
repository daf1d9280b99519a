"""The base model: the built-in tiny Llama (tokenizer trained on the run's own data, since
no hub is reachable here) or any HF hub id / local path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with the chat template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneloop.chat import END, JINJA, PAD, SPECIAL_TOKENS  # noqa: F401

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=END)
    fast.chat_template = JINJA
    return fast


def architecture_config(tiny, tokenizer):
    """transformers' config of ``tiny.architecture`` at ``tiny``'s sizes (random weights follow).
    Gemma and GPT-2 tie their embeddings, as the released models do; GPT-2 has Conv1D layers, Phi-3
    fused qkv and gate_up projections: what a user's model brings, exercised at small size."""
    import transformers as tf

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=None)
    if tiny.architecture == "gpt2":
        return tf.GPT2Config(n_embd=tiny.hidden_size, n_inner=tiny.intermediate_size, n_layer=tiny.num_hidden_layers,
                             n_head=tiny.num_attention_heads, n_positions=tiny.max_position_embeddings, **ids)
    common = dict(hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                  num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
                  num_key_value_heads=tiny.num_attention_heads, max_position_embeddings=tiny.max_position_embeddings,
                  **ids)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig,
           "phi3": tf.Phi3Config}[tiny.architecture]
    extra = {"head_dim": tiny.hidden_size // tiny.num_attention_heads} if tiny.architecture == "gemma" else {}
    tie = {} if tiny.architecture == "gemma" else {"tie_word_embeddings": False}
    return cls(**common, **extra, **tie)


def build_tiny(train_file: Path, out_dir: Path, tiny, seed: int) -> Path:
    """Train the tokenizer on the train split, initialise a small model of ``tiny.architecture``
    (a Llama by default), save both to ``out_dir``.

    Idempotent: an existing complete base (a restarted trainer) is reused as it is, so a
    resumed run continues on exactly the same weights and vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if (out_dir / "complete").exists():
        return out_dir
    texts = []
    with train_file.open() as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["prompt"] + row["completion"] if isinstance(row["prompt"], str) else json.dumps(row))
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(architecture_config(tiny, tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "complete").write_text("ok\n")
    log.info("built tiny " + tiny.architecture + ": %.2fM parameters, vocab %d -> %s", model.num_parameters() / 1e6, len(tokenizer), out_dir)
    return out_dir


def check_target_modules(model, target_modules) -> None:
    """Named LoRA target modules must exist in the model: the error lists the names it has
    (Llama's q_proj is GPT-2's c_attn and Phi-3's qkv_proj)."""
    if isinstance(target_modules, str):  # "all-linear" or a regular expression: peft judges it
        return
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if name and not list(module.children()) and hasattr(module, "weight")}
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        raise ValueError(f"train.lora.target_modules {missing} not in this {type(model).__name__}; its layers with "
                         f"weights: {', '.join(sorted(leaves))}")


def link_local(src: Path, out_dir: Path) -> Path:
    """Put a local model folder into the run as ``base`` (hard links where the file system
    allows, else copies): events name models by run-relative paths only, and a later change
    to ``src`` cannot change what a resumed run trains on."""
    import os
    import shutil

    if (out_dir / "complete").exists():
        return out_dir
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path {src} is a folder without config.json: not a model")

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(src, out_dir, copy_function=link)
    (out_dir / "complete").write_text(f"linked from {src}\n")
    log.info("base model %s -> %s", src, out_dir)
    return out_dir


def load(name_or_path: str | Path, *, template: str = "tuneloop", dtype=None, quantization=None, **placement):
    """Model and tokenizer from a hub id or a local directory; ``template``: the data set's
    (``DatasetReady.chat_template``), which checkpoints and exports carry on; ``quantization``: a
    BitsAndBytesConfig (QLoRA), the model then prepared for k-bit training; ``placement``:
    ``tp_plan`` or ``device_map`` (train.parallel tensor / pipeline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.models import with_chat_template

    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(str(name_or_path)), template)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype or "auto",
                                                 quantization_config=quantization, **placement)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer
