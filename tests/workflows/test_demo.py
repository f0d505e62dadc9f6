"""The README's main job, shortened: `lorakit demo` teaches the real SmolLM2 one fact and checks the core."""

from __future__ import annotations

from lorakit.workflows.demo import run_demo


def test_demo_learns_the_fact_and_keeps_the_core_promises(tmp_path):
    result = run_demo(steps=16, output_dir=tmp_path / "adapter")
    assert "Pebble" not in result["answer_before"]
    assert result["learned"], result["answer_after"]
    assert result["loss_last"] < 0.1 * result["loss_first"]
    assert result["disabled_equals_base"]
    assert result["reload_max_abs"] == 0.0
    assert result["merged_vs_unmerged_max_abs"] < 1e-3
    assert result["trainable_params"] == 2_442_240
    assert 4 * 2_442_240 <= result["adapter_bytes"] <= 4 * 2_442_240 * 1.01
