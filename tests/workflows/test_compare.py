"""The comparison and sweep machinery on a tiny model with a few steps."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.training.options import TrainConfig
from lorakit.workflows.compare import compare, expand_targets, sweep


def test_compare_measures_every_column_for_all_four_methods(llama64_dir, tmp_path):
    config = TrainConfig(model=llama64_dir, steps=2, max_eval=2, max_new_tokens=2, warmup_steps=0)
    result = compare(config, output_dir=tmp_path)
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["full", "lora", "qlora", "prompt"]
    for row in rows.values():
        for key in ("trainable_params", "trainable_percent", "peak_rss_mib", "tokens_per_s", "after",
                    "artifact_bytes", "forward_ms"):
            assert row[key] is not None and row[key] > 0 or key == "after", (row["method"], key)
    assert rows["full"]["trainable_percent"] == pytest.approx(100.0)
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["prompt"]["trainable_params"] == 20 * 64 and rows["prompt"]["forward_ms_merged"] is None
    assert rows["lora"]["forward_ms_merged"] > 0 and rows["lora"]["artifact_bytes"] < rows["full"]["artifact_bytes"]
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in rows) and "cannot merge" in table
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "qlora" / "train_config.yaml").read_text().count("quantize: nf4") == 1


def test_sweep_trains_every_pair_and_plots(llama64_dir, tmp_path, capsys):
    args = ["sweep", "--model", llama64_dir, "--budget", "2", "--max-eval", "2", "--ranks", "2,4",
            "--targets", "q,v:all-linear", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["r"], r["targets"]) for r in result["rows"]] == [(2, "q,v"), (4, "q,v"), (2, "all-linear"),
                                                                (4, "all-linear")]
    params = {(r["r"], r["targets"]): r["trainable_params"] for r in result["rows"]}
    assert params[(4, "q,v")] == 2 * params[(2, "q,v")] < params[(2, "all-linear")]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 4 | all-linear |" in capsys.readouterr().out


def test_targets_shorthand_and_bad_input(tmp_path, capsys):
    assert expand_targets("q,k,v,o") == "q_proj,k_proj,v_proj,o_proj"
    assert expand_targets("query,value") == "query,value" and expand_targets("all-linear") == "all-linear"
    with pytest.raises(ValueError, match="unknown method"):
        compare(TrainConfig(), methods=("lora", "adapterhub"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="ranks must be positive integers"):
        sweep(TrainConfig(), ranks=(0, 4), output_dir=tmp_path)
    assert main(["sweep", "--ranks", "4,x"]) == 2
    assert "--ranks must be comma-separated integers, got '4,x'" in capsys.readouterr().err
