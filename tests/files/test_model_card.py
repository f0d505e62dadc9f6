"""The model card save_pretrained writes (README.md, as PEFT does): front matter the Hub reads, the base, task type
and LoRA settings, a trained run's metrics; a README.md the user wrote keeps its text (only its front matter is
updated, as PEFT's); written atomically; loading never reads it."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import tiny_llama, trained_lora

import lorakit.files.model_card as card_module
from lorakit import LoraConfig, LoraModel
from lorakit.files.model_card import MARK, write_model_card

HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2, "precision": "fp32"}


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n")])


def _lora(base_name: str = HUB, **kwargs) -> LoraModel:
    model = trained_lora(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                      "lora_dropout": 0.1, "task_type": "CAUSAL_LM", **kwargs})
    model.model.config._name_or_path = base_name
    return model


def test_the_card_names_the_base_the_task_type_and_the_lora_settings(tmp_path):
    _lora().save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert _front(text) == {"base_model": HUB, "library_name": "peft", "pipeline_tag": "text-generation",
                            "tags": [f"base_model:adapter:{HUB}", "lora", "lorakit", "transformers"]}
    assert MARK in text and f"A LoRA adapter for [`{HUB}`](https://huggingface.co/{HUB}), task type `CAUSAL_LM`" in text
    for row in ("| r | 4 |", "| lora_alpha | 8 |", "| scaling (lora_alpha / r) | 2 |",
                "| target_modules | q_proj, v_proj |", "| lora_dropout | 0.1 |"):
        assert row in text, row
    assert "## Training" not in text  # saved from Python: no run to report
    assert "AutoPeftModelForCausalLM.from_pretrained" in text


def test_a_local_base_is_named_in_the_text_but_not_as_the_hub_s_base_model(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    _lora(str(base)).save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    front = _front(text)
    assert "base_model" not in front and not any(t.startswith("base_model:") for t in front["tags"])
    assert f"A LoRA adapter for `{base}`" in text


def test_every_saved_adapter_gets_a_column_and_the_card_follows_each_save(tmp_path):
    model = _lora()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"], use_rslora=True))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| setting | `default` | `second` |" in text and "| r | 4 | 2 |" in text
    assert "| scaling (lora_alpha / √r) |  | 1.414 |" in text and "| use_rslora |  | true |" in text
    assert not (tmp_path / "second" / "README.md").exists()  # one card per save, in the folder saved to (PEFT's)
    model.delete_adapter("second")
    model.save_pretrained(tmp_path)  # lorakit's own card: written afresh, for the adapters of this save
    text = (tmp_path / "README.md").read_text()
    assert "| setting | `default` |\n" in text and "`second`" not in text and "| r | 4 |\n" in text


def test_a_readme_the_user_wrote_keeps_its_text_and_gains_the_front_matter(tmp_path):
    body = "# My adapter\n\nIt answers in JSON.  \n\n---\n\nMore text after a rule.\n"
    user = "---\nlicense: apache-2.0\ntags:\n- json\n---\n" + body
    (tmp_path / "README.md").write_text(user)
    _lora().save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.endswith("\n---\n" + body) and MARK not in text
    front = _front(text)
    assert front["license"] == "apache-2.0" and front["library_name"] == "peft" and front["base_model"] == HUB
    assert front["tags"] == ["json", f"base_model:adapter:{HUB}", "lora", "lorakit", "transformers"]
    _lora().save_pretrained(tmp_path)  # nothing new to add: the file is left byte for byte
    assert (tmp_path / "README.md").read_text() == text

    plain = tmp_path / "plain"  # no front matter at all: one is put on top, the text below it unchanged
    plain.mkdir()
    (plain / "README.md").write_text(body)
    _lora().save_pretrained(plain)
    text = (plain / "README.md").read_text()
    assert text.endswith("---\n\n" + body) and _front(text)["library_name"] == "peft"


def test_a_readme_that_cannot_be_parsed_is_left_alone(tmp_path):
    broken = "---\ntags: [unclosed\n---\n# Mine\n"
    (tmp_path / "README.md").write_text(broken)
    with pytest.warns(UserWarning, match="the YAML header is not valid YAML"):
        _lora().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == broken
    (tmp_path / "README.md").write_bytes(b"\xff\xfe not utf-8")
    with pytest.warns(UserWarning, match="cannot be read as UTF-8 text"):
        _lora().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == b"\xff\xfe not utf-8"


def test_the_card_is_written_atomically(tmp_path, monkeypatch):
    _lora().save_pretrained(tmp_path)
    before = (tmp_path / "README.md").read_text()
    write_text = card_module.Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.name.startswith(".README.md."):
            write_text(self, data[:10])
            raise OSError(28, "No space left on device")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(card_module.Path, "write_text", full_disk)
    with pytest.warns(UserWarning, match="model card README.md could not be written .*the existing README.md is "
                                         "unchanged"):
        _lora(r=8).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == before  # never half-written
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8  # the adapter itself is saved
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_loading_ignores_the_card(tmp_path, ids):
    model = _lora()
    model.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_bytes(b"\x00\xff garbage, not a card")
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path).eval()
    model.eval()  # no dropout
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_peft_loads_a_folder_with_the_card(tmp_path, ids, peft):
    model = _lora()
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    model.eval()  # no dropout
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_no_adapter_no_card(tmp_path):
    assert write_model_card(tmp_path) is None and not os.listdir(tmp_path)


def test_a_trained_run_s_card_has_its_metrics(tiny_llama_dir, tmp_path):
    from lorakit.training.loop import train

    train(model=tiny_llama_dir, steps=3, batch_size=4, output_dir=str(tmp_path), **FAST)
    summary = json.loads((tmp_path / "summary.json").read_text())
    text = (tmp_path / "README.md").read_text()
    assert MARK in text and "## Training" in text and "## Evaluation" in text
    assert "| task | builtin: the built-in order-to-JSON task |" in text
    assert "| steps | 3 |" in text and f"| tokens | {summary['tokens']:,d} |" in text
    assert f"| tokens/s | {summary['tokens_per_s']:.0f} |" in text
    assert f"| training loss | {summary['first_loss']:.4f} → {summary['last_loss']:.4f} |" in text
    for metric in ("exact_match", "loss"):
        row = f"| {metric} | {summary['before'][metric]:.4f} | {summary['after'][metric]:.4f} |"
        assert row in text, row
    # a perplexity of a random model is in the tens of thousands: one decimal
    assert f"| perplexity | {summary['before']['perplexity']:,.1f} | {summary['after']['perplexity']:,.1f} |" in text
    assert "| r | 8 |" in text and "| lora_alpha | 16 |" in text
