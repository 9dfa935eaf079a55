"""Per-row adapters over one base: each row of a mixed batch gets exactly what PEFT computes for
that adapter alone (or the bare base)."""

from __future__ import annotations

import pytest
import torch

from engine.train.runs import RunDirectory


def test_mixed_batch_rows_match_peft_and_base(tiny_model, trained_run, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.serve.multilora import MultiLora

    ckpt = RunDirectory(trained_run).latest_checkpoint()
    # a second adapter of another rank and fewer targets
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                      init_lora_weights=False))
    other.save_pretrained(str(tmp_path / "other"))

    ids = torch.randint(10, 600, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
        ref_base = base(ids).logits
        ref_tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                                              str(ckpt)).eval()(ids).logits
        ref_other = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                                              str(tmp_path / "other")).eval()(ids).logits
        ml = MultiLora(base)
        ml.load("tuned", ckpt)
        ml.load("other", tmp_path / "other")
        ml.set_rows(["tuned", None, "other"])
        mixed = base(ids).logits
    torch.testing.assert_close(mixed[0], ref_tuned[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1], ref_base[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], ref_other[2], atol=1e-4, rtol=1e-4)
    assert (ref_tuned[0] - ref_base[0]).abs().max() > 1e-2           # the adapters do change something
    ml.remove("other")
    ml.set_rows([None, None, None])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, ref_base, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_model_is_refused(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from engine.serve.multilora import MultiLora

    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=700, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(bigger, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "a"))
    ml = MultiLora(AutoModelForCausalLM.from_pretrained(str(tiny_model)))
    with pytest.raises(ValueError, match="shapes"):
        ml.load("x", tmp_path / "a")
