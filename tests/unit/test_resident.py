"""The evaluator's resident base: adapters swapped on one loaded base give exactly what loading
each checkpoint afresh gives, and the base is read from disk once."""

import torch

from tuneloop.models import Resident, load_model


def save_model_and_adapters(tmp_path, n: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
    base.save_pretrained(tmp_path / "base")
    from tuneloop.trainer.model import train_tokenizer

    train_tokenizer(["a small vocabulary"] * 10, 300).save_pretrained(tmp_path / "base")  # exports copy it
    adapters = []
    for i in range(n):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(tmp_path / f"ckpt-{i}")
        adapters.append(tmp_path / f"ckpt-{i}")
    return tmp_path / "base", adapters


def logits(model, on: bool = True):
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        if on:
            return model(input_ids=ids).logits
        with model.disable_adapter():
            return model(input_ids=ids).logits


def test_swapped_adapters_score_as_a_fresh_load_and_the_base_is_read_once(tmp_path):
    base, adapters = save_model_and_adapters(tmp_path, 3)
    resident = Resident()
    plain, on = resident.model(base, None, adapter=False)  # a baseline first, as a run asks
    before = logits(plain, on)
    fresh_base = load_model(base, base, adapter=False).eval()
    assert torch.allclose(before, logits(fresh_base), atol=1e-6)
    for ckpt in adapters + [adapters[0]]:  # back to the first one too
        model, on = resident.model(base, ckpt, adapter=True)
        fresh = load_model(base, ckpt, adapter=True).eval()  # base + adapter merged, loaded afresh
        assert on and torch.allclose(logits(model), logits(fresh), atol=1e-5), ckpt
        assert not torch.allclose(logits(model), before, atol=1e-3)  # the adapter does something
    model, on = resident.model(base, None, adapter=False)  # the baseline again: adapters off, base untouched
    assert not on and torch.equal(logits(model, on), before)
    assert resident.loads == {"base": 1, "adapter": 4, "full": 0}
    assert len(model.peft_config) == 1  # old adapters are deleted, not piled up


def test_a_full_checkpoint_is_loaded_whole_and_another_base_replaces_the_resident_one(tmp_path):
    base, adapters = save_model_and_adapters(tmp_path / "a", 1)
    other, _ = save_model_and_adapters(tmp_path / "b", 0)
    resident = Resident()
    resident.model(base, adapters[0], adapter=True)
    full, on = resident.model(base, other, adapter=False)  # full weights: its own model
    assert on and torch.equal(logits(full), logits(load_model(base, other, adapter=False).eval()))
    resident.model(other, None, adapter=False)
    assert resident.loads == {"base": 2, "adapter": 1, "full": 1}


def test_a_merged_export_from_the_resident_base_equals_merge_and_unload_and_leaves_the_base_as_it_was(tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneloop.export import export_merged

    base, adapters = save_model_and_adapters(tmp_path, 2)
    resident = Resident()
    before = logits(resident.model(base, None, adapter=False)[0])
    for i, ckpt in enumerate(adapters):
        export_merged(ckpt, base, True, tmp_path / f"resident-{i}", resident=resident)
        export_merged(ckpt, base, True, tmp_path / f"fresh-{i}")  # merge_and_unload on a fresh load
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / f"resident-{i}")
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / f"fresh-{i}")
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.allclose(ours.state_dict()[k], theirs.state_dict()[k], atol=1e-6) for k in ours.state_dict())
    model, on = resident.model(base, None, adapter=False)
    assert torch.equal(logits(model, on), before) and resident.loads["base"] == 1
