"""Every kind of file lorakit reads, damaged on purpose: cut short, emptied, of the wrong JSON type, in the wrong
encoding, with wrong values. Each must give a clear error that names the file (and the line or tensor where there is
one) and must leave what was loaded before exactly as it was.

The server's requests get the same treatment in tests/serve/test_robustness.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.models.prompt_tuning import PromptTuningModel
from lorakit.training import TrainConfig, train
from lorakit.training.data import DataError, load_causal_lm, read_table

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _cut(path: Path) -> None:
    _write(path, path.read_bytes()[: path.stat().st_size // 2])


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _first(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def _set_first(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[_first(tensors)].view(-1)[0] = value

    return edit


def _config_edit(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        _write(folder / CONFIG, json.dumps(config))

    return damage


def _link_out(folder: Path, name: str) -> None:
    """``folder/name`` becomes a symbolic link to the same file moved beside the folder (outside it)."""
    outside = folder.parent / f"elsewhere-{name}"
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)


# (case, damage to the adapter folder, what the error must say)
ADAPTER_DAMAGE = [
    ("config cut short", lambda f: _cut(f / CONFIG), CONFIG),
    ("config empty", lambda f: _write(f / CONFIG, ""), CONFIG),
    ("config a JSON list", lambda f: _write(f / CONFIG, "[1, 2]"), "holds a JSON list"),
    ("config a JSON string", lambda f: _write(f / CONFIG, '"r=8"'), "holds a JSON str"),
    ("config not UTF-8", lambda f: _write(f / CONFIG, b'{"r": 8, "x": "\xff"}'), "not UTF-8"),
    ("config nested too deep", lambda f: _write(f / CONFIG, "[" * 100_000 + "]" * 100_000), "nests too deeply"),
    ("config r a string", _config_edit(r="eight"), "r must be"),
    ("config r a list", _config_edit(r=[8]), "r must be"),
    ("config r zero", _config_edit(r=0), "r must be"),
    ("config another PEFT type", _config_edit(peft_type="IA3"), "peft_type 'IA3'"),
    ("config an option lorakit lacks", _config_edit(use_qalora=True), "use_qalora"),
    ("config missing", lambda f: (f / CONFIG).unlink(), CONFIG),
    ("config lora_alpha NaN", _config_edit(lora_alpha=float("nan")), "lora_alpha is nan"),
    ("config lora_alpha Infinity", _config_edit(lora_alpha=float("inf")), "lora_alpha is inf"),
    ("config r -Infinity", _config_edit(r=float("-inf")), "r is -inf"),
    ("config alpha_pattern NaN", _config_edit(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern.q_proj is nan"),
    ("config rank_pattern Infinity", _config_edit(rank_pattern={"v_proj": float("inf")}), "rank_pattern.v_proj"),
    ("weights missing", lambda f: (f / WEIGHTS).unlink(), WEIGHTS),
    ("weights cut short", lambda f: _cut(f / WEIGHTS), "truncated or corrupt"),
    ("weights empty", lambda f: _write(f / WEIGHTS, b""), "truncated or corrupt"),
    ("weights garbage", lambda f: _write(f / WEIGHTS, b"\x00\x01garbage" * 100), "truncated or corrupt"),
    ("weights a NaN", lambda f: _edit_tensors(f / WEIGHTS, _set_first(float("nan"))), "NaN or infinite"),
    ("weights an inf", lambda f: _edit_tensors(f / WEIGHTS, _set_first(float("inf"))), "NaN or infinite"),
    ("weights a -inf", lambda f: _edit_tensors(f / WEIGHTS, _set_first(float("-inf"))), "NaN or infinite"),
    ("weights of an integer dtype", lambda f: _edit_tensors(
        f / WEIGHTS, lambda t: t.update({_first(t): t[_first(t)].to(torch.int32)})), "has dtype int32"),
    ("weights of dtype bool", lambda f: _edit_tensors(
        f / WEIGHTS, lambda t: t.update({_first(t): t[_first(t)] > 0})), "has dtype bool"),
    ("weights a link out of the folder", lambda f: _link_out(f, WEIGHTS), "symbolic link"),
    ("config a link out of the folder", lambda f: _link_out(f, CONFIG), "symbolic link"),
    ("weights a tensor missing", lambda f: _edit_tensors(f / WEIGHTS, lambda t: t.pop(_first(t))), "lacks"),
    ("weights a tensor too wide", lambda f: _edit_tensors(
        f / WEIGHTS, lambda t: t.update({_first(t): torch.zeros(3, 999)})), "shape mismatch"),
    ("weights an extra tensor", lambda f: _edit_tensors(
        f / WEIGHTS, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)})),
     "has no place"),
]


@pytest.fixture
def saved_adapter(tmp_path) -> Path:
    torch.manual_seed(0)
    source = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    source.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _snapshot(model: LoraModel) -> tuple[list[str], dict[str, torch.Tensor]]:
    return sorted(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("case", "damage", "message"), ADAPTER_DAMAGE, ids=[c[0] for c in ADAPTER_DAMAGE])
def test_a_damaged_adapter_is_refused_by_name_and_changes_nothing(case, damage, message, saved_adapter):
    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    names, state = _snapshot(model)
    damage(saved_adapter)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as raised:
        model.load_adapter(saved_adapter, "loaded")
    assert str(saved_adapter) in str(raised.value) or "tensor" in str(raised.value) or "mismatch" in str(raised.value)
    after_names, after_state = _snapshot(model)
    assert after_names == names and after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], state[k]) for k in state)
    # and the same through from_pretrained on a plain model, which must stay plain
    plain = tiny_llama()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LoraModel.from_pretrained(plain, saved_adapter)
    assert not any("lora" in n for n, _ in plain.named_modules())


def test_links_inside_the_folder_are_followed_and_links_out_only_when_allowed(saved_adapter, tmp_path):
    expected = LoraModel.from_pretrained(tiny_llama(), saved_adapter).state_dict()
    (saved_adapter / WEIGHTS).rename(saved_adapter / "real.safetensors")
    (saved_adapter / WEIGHTS).symlink_to("real.safetensors")  # stays inside: followed
    inside = LoraModel.from_pretrained(tiny_llama(), saved_adapter).state_dict()
    assert all(torch.equal(inside[k], expected[k]) for k in expected)
    (saved_adapter / WEIGHTS).unlink()
    _link_out(saved_adapter, "real.safetensors")
    (saved_adapter / WEIGHTS).symlink_to(tmp_path / "elsewhere-real.safetensors")
    with pytest.raises(ValueError, match="outside the adapter folder"):
        LoraModel.from_pretrained(tiny_llama(), saved_adapter)
    allowed = LoraModel.from_pretrained(tiny_llama(), saved_adapter, allow_symlinks=True).state_dict()
    assert all(torch.equal(allowed[k], expected[k]) for k in expected)


def test_a_lora_config_refuses_non_finite_numbers():
    for field, value in [("lora_alpha", float("nan")), ("lora_alpha", float("inf")),
                         ("alpha_pattern", {"q_proj": float("nan")})]:
        with pytest.raises(ValueError, match="finite"):
            LoraConfig(**{field: value})


PROMPT_DAMAGE = [
    ("weights cut short", lambda f: _cut(f / WEIGHTS), "truncated or corrupt"),
    ("weights a NaN", lambda f: _edit_tensors(f / WEIGHTS, _set_first(float("nan"))), "NaN or infinite"),
    ("config a JSON number", lambda f: _write(f / CONFIG, "3"), "holds a JSON int"),
    ("weights missing", lambda f: (f / WEIGHTS).unlink(), "missing, truncated or corrupt"),
]


@pytest.mark.parametrize(("case", "damage", "message"), PROMPT_DAMAGE, ids=[c[0] for c in PROMPT_DAMAGE])
def test_a_damaged_prompt_is_refused_by_name(case, damage, message, tmp_path):
    PromptTuningModel(tiny_llama(), num_virtual_tokens=4).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        PromptTuningModel.from_pretrained(tiny_llama(), tmp_path)


# (case, file name, its bytes, what the error must say: the file and line)
DATA_DAMAGE = [
    ("jsonl cut mid-object", "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp',
     r"d.jsonl:2: malformed JSON"),
    ("json array cut short", "d.json", '[{"instruction": "a", "output": "b"}, {"instr', r"d.json:1: malformed JSON"),
    ("empty file", "d.jsonl", "", "the file is empty"),
    ("only blank lines", "d.jsonl", "\n\n\n", "no records"),
    ("a pretty-printed object, not an array", "d.json", '{\n  "instruction": "a",\n  "output": "b"\n}\n',
     r"d.json:1: malformed JSON"),
    ("an array of numbers", "d.json", "[1, 2, 3]", "item 0 is not a JSON object"),
    ("a line that is a list", "d.jsonl", '{"text": "a"}\n["b"]\n', r"d.jsonl:2: expected a JSON object"),
    ("not UTF-8", "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"d.jsonl:2: byte 0xe9"),
    ("text null", "d.jsonl", '{"text": null}\n', r"d.jsonl:1: 'text' is null"),
    ("output a number", "d.jsonl", '{"instruction": "a", "output": 7}\n', r"d.jsonl:1: 'output' is a number"),
    ("instruction a list", "d.jsonl", '{"instruction": ["a"], "output": "b"}\n', r"'instruction' is a list"),
    ("content an object", "d.jsonl",
     '{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}\n',
     r"messages\[0\]\['content'\] is an object"),
    ("an unknown role", "d.jsonl", '{"messages": [{"role": "bot", "content": "b"}]}\n', "role 'bot'"),
    ("txt not UTF-8", "d.txt", b"hello\n\nw\xf6rld\n", r"d.txt:3: byte 0xf6"),
]


@pytest.mark.parametrize(("case", "name", "data", "message"), DATA_DAMAGE, ids=[c[0] for c in DATA_DAMAGE])
def test_damaged_causal_lm_data_names_file_and_line(case, name, data, message, tmp_path, smollm2_tokenizer):
    _write(tmp_path / name, data)
    with pytest.raises(DataError, match=message):
        load_causal_lm(tmp_path / name, smollm2_tokenizer, 64)


TABLE_DAMAGE = [
    ("csv without the column", "t.csv", "text,label\nhi,1\n", r"t.csv:1: no column 'sentence'"),
    ("csv not UTF-8", "t.csv", b"sentence,label\nok,1\nna\xefve,0\n", r"t.csv:3: byte 0xef"),
    ("csv header only", "t.csv", "sentence,label\n", "no rows after the header"),
    ("tsv a row too short", "t.tsv", "sentence\tlabel\nfine\t1\nshort\n", r"t.tsv:3: 1 columns"),
    ("jsonl label a list", "t.jsonl", '{"sentence": "a", "label": [1]}\n', r"t.jsonl:1: 'label' is a list"),
    ("jsonl text null", "t.jsonl", '{"sentence": null, "label": 1}\n', r"t.jsonl:1: 'sentence' is null"),
]


@pytest.mark.parametrize(("case", "name", "data", "message"), TABLE_DAMAGE, ids=[c[0] for c in TABLE_DAMAGE])
def test_damaged_classification_data_names_file_and_line(case, name, data, message, tmp_path):
    _write(tmp_path / name, data)
    with pytest.raises(DataError, match=message):
        read_table(tmp_path / name)


YAML_DAMAGE = [
    ("cut short", "model: default\nr: [8, ", r"run.yaml:\d+: not valid YAML"),
    ("a list", "- model\n- r\n", "expected a mapping"),
    ("not UTF-8", b"model: caf\xe9\n", "not UTF-8"),
    ("an unknown option", "rank: 8\n", "unknown option"),
    ("a wrong type", "r: [8]\n", r"run.yaml: r=\[8\] is not a valid int"),
    ("a tab where YAML wants spaces", "model: default\n\tr: 8\n", "not valid YAML"),
]


@pytest.mark.parametrize(("case", "data", "message"), YAML_DAMAGE, ids=[c[0] for c in YAML_DAMAGE])
def test_a_damaged_options_file_names_itself(case, data, message, tmp_path):
    _write(tmp_path / "run.yaml", data)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_yaml(tmp_path / "run.yaml")


FAST = {"max_eval": 2, "max_new_tokens": 2, "progress": False, "warmup_steps": 1, "lr": 1e-2, "batch_size": 2}


@pytest.fixture(scope="module")
def interrupted_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 2 and 4, to resume from."""
    out = tmp_path_factory.mktemp("interrupted")
    train(model=tiny_llama_dir, steps=6, save_every=2, keep_checkpoints=2, output_dir=str(out), **FAST)
    return out


def _step4(out: Path) -> Path:
    return out / "checkpoints" / "step-000004"


CHECKPOINT_DAMAGE = [
    ("weights cut short", lambda o: _cut(_step4(o) / "trainable.safetensors"), "trainable.safetensors is damaged"),
    ("optimizer garbage", lambda o: _write(_step4(o) / "optimizer.pt", b"not a torch file"), "optimizer.pt is damaged"),
    ("optimizer cut short", lambda o: _cut(_step4(o) / "optimizer.pt"), "optimizer.pt is damaged"),
    ("state cut short", lambda o: _cut(_step4(o) / "state.json"), "state.json is damaged"),
    ("state a list", lambda o: _write(_step4(o) / "state.json", "[4]"), "state.json is damaged"),
    ("options cut short", lambda o: _write(_step4(o) / "train_config.yaml", "model: [\n"),
     "train_config.yaml is damaged"),
]


@pytest.mark.parametrize(("case", "damage", "message"), CHECKPOINT_DAMAGE, ids=[c[0] for c in CHECKPOINT_DAMAGE])
def test_a_damaged_checkpoint_is_refused_by_name_and_the_run_is_untouched(case, damage, message, interrupted_run,
                                                                          tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    damage(out)
    adapter = (out / WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match=message):
        train(model=tiny_llama_dir, steps=6, save_every=2, keep_checkpoints=2, output_dir=str(out), resume=True,
              **FAST)
    assert (out / WEIGHTS).read_bytes() == adapter
    assert (out / "checkpoints" / "step-000002").is_dir()  # the checkpoint to fall back on is still there


def test_a_metrics_log_cut_short_by_a_crash_is_repaired_on_resume(interrupted_run, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # the line a kill -9 cut short
    train(model=tiny_llama_dir, steps=6, save_every=2, keep_checkpoints=2, output_dir=str(out), resume=True, **FAST)
    assert "dropped 1 damaged line(s)" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and all(isinstance(s, int) for s in steps)
