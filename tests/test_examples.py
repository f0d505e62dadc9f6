"""Every example in smoke mode, run as a user runs it (a child process from the repository root).

Each smoke run checks its own outputs and prints "smoke checks passed"; these tests also read what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"the examples train on real datasets from {DATA}, "
                                                          f"which this machine does not have")


def run_example(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, script, "--smoke", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "smoke checks passed" in result.stdout, result.stdout[-3000:]
    return result.stdout


@needs_data
def test_beginner_smoke(tmp_path):
    out = run_example("examples/beginner/sst2_lora.py", "--data", str(DATA / "sst2"), "--output-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert "trainable params: 74,498 || all params: 22,788,484" in out
    assert results["reloaded_same_predictions"] and results["adapter_bytes"] < 400 * 1024
    assert results["full_trainable_params"] > 300 * results["trainable_params"]

    # The saved adapter is PEFT's format: PEFT loads it and computes the same logits as lorakit.
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit import LoraModel
    from lorakit.models.embedded_models import minilm_dir

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()

    batch = AutoTokenizer.from_pretrained(minilm_dir())(["a gripping, funny film", "dull and far too long"],
                                                        padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()(**batch).logits
        ours = LoraModel.from_pretrained(base(), tmp_path).eval()(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@needs_data
def test_intermediate_smoke(tmp_path):
    run_example("examples/intermediate/experiments.py", "--data", str(DATA), "--output-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["r"] for row in results["ranks"]] == [4, 8, 16, 32]
    assert [row["targets"] for row in results["targets"]] == ["query,value", "query,key,value,attention.output.dense",
                                                              "all-linear"]
    assert set(results["switching"]) == {"sst2", "rt", "squad"}
    assert all(set(row) == {"sst2", "rt", "squad"} for row in results["switching"].values())
    assert "| r | trainable params |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_expert_smoke(tmp_path):
    run_example("examples/expert/pipeline.py", "--output-dir", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("orders", "alpaca"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert "quantize: nf4" in (tmp_path / name / "train_config.yaml").read_text()
    assert (tmp_path / "orders-merged" / "config.json").is_file()
    assert results["serve"]["answers"] == results["serve"]["expected"]
