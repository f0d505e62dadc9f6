"""The CLI parses and calls one library function per command: --help text for every option, lorakit targets on a
config file and on the embedded model, and one clear line for each error."""

from __future__ import annotations

import json

import pytest
import transformers

from lorakit.cli import build_parser, main


def test_every_option_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"lorakit {name} {action.dest} has no --help text"


def test_targets_on_a_config_file_without_weights(tmp_path, capsys):
    config = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      intermediate_size=11008, vocab_size=32000, architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    assert main(["targets", str(tmp_path / "config.json"), "--target", "q_proj,v_proj", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lora_params"] == 4_194_304 and len(out["modules"]) == 64
    assert out["modules"][0] == {"name": "model.layers.0.self_attn.q_proj", "type": "Linear", "shape": [4096, 4096],
                                 "r": 8, "params": 65536}


def test_targets_table_on_the_embedded_model(capsys):
    assert main(["targets", "--target", "all-linear"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.29.mlp.down_proj" in out and "lm_head" not in out
    assert "210 modules, 2,442,240 LoRA parameters" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["targets", str(tmp_path / "missing")]) == 2
    assert "is neither 'default', 'minilm', a model folder nor a config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["targets", str(tmp_path / "config.json")]) == 2
    assert "does not hold a Hugging Face model config" in capsys.readouterr().err
    assert main(["targets", "--target", "q_prj"]) == 2
    assert "target module 'q_prj' matches no module in the model (did you mean 'q_proj'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["targets", "--r", "x"])
    assert main(["targets", "--r", "0"]) == 2
    assert "r must be a positive integer (r >= 1), got 0" in capsys.readouterr().err


def test_targets_previews_what_train_wraps(capsys):
    assert main(["targets", "--json"]) == 0  # no --target: what `lorakit train` wraps on the default model
    modules = json.loads(capsys.readouterr().out)["modules"]
    assert len(modules) == 210 and {m["name"].rsplit(".", 1)[1] for m in modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_memory_says_which_adapter_its_lora_columns_assume(capsys):
    assert main(["memory", "--model", "llama-2-7b"]) == 0
    assert "lora and qlora: an adapter of r=8 on all-linear (224 modules)" in capsys.readouterr().out
    assert main(["memory", "--model", "llama-2-7b", "--target", "q_proj,v_proj", "--r", "16"]) == 0
    assert "r=16 on q_proj,v_proj (64 modules)" in capsys.readouterr().out


@pytest.mark.parametrize(("command", "usage"), [("train", "usage: lorakit train [--config FILE.yaml] [options]"),
                                                ("eval", "usage: lorakit eval ADAPTER [--config FILE.yaml] [--json]")])
def test_help_starts_with_a_short_usage_line(command, usage, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(usage) and out.index("options:") < 1000  # the text comes before 29 lines of usage would


def test_train_output_dir_naming_a_file_is_said_in_words(tmp_path, capsys, tiny_llama_dir):
    from lorakit.cli import main as cli_main

    taken = tmp_path / "a-file"
    taken.write_text("mine")
    args = ["train", "--model", tiny_llama_dir, "--steps", "1", "--no-progress", "--precision", "fp32"]
    assert cli_main([*args, "--output-dir", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # before it: the run's header and the memory check
    assert "is a file, not a folder" in last and str(taken) in last
    assert "Traceback" not in err and "Errno" not in err and taken.read_text() == "mine"
    assert cli_main([*args, "--output-dir", str(taken / "run")]) == 2
    assert f"{str(taken)!r} is a file, not a folder" in capsys.readouterr().err
