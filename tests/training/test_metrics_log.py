"""metrics.jsonl and the loss curve: one JSON object per record, records after a resumed checkpoint dropped, nothing
written by processes other than the main one, and a PNG of the loss with the held-out metric."""

from __future__ import annotations

import json

import pytest

from lorakit.training.metrics_log import MetricsLog, plot_loss


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_appended_one_json_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 99}\n')  # from an earlier run: a fresh start replaces it
    log = MetricsLog(path, enabled=True)
    log.start(None)
    for step in (1, 2):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 2, "eval": {"loss": 0.7}})
    assert _lines(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval": {"loss": 0.7}}]
    assert log.records == _lines(path)


def test_resuming_drops_what_was_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)) + "\n")
    log = MetricsLog(path, enabled=True)
    log.start(resume_step=4)
    assert [r["step"] for r in log.records] == [1, 2, 3, 4]
    assert _lines(path) == log.records  # steps 5-7 will be run and logged again
    log.write({"step": 5, "loss": 0.1})
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4, 5]


def test_other_processes_keep_records_but_write_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=False)
    log.start(None)
    log.write({"step": 1, "loss": 2.0})
    assert log.records == [{"step": 1, "loss": 2.0}] and not path.exists()


@pytest.mark.parametrize("metric", ["exact_match", "accuracy", "loss"])
def test_the_loss_curve_is_a_png(tmp_path, metric):
    pytest.importorskip("matplotlib", reason="the loss curve needs matplotlib")
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval": {metric: 0.5}}]
    path = plot_loss(records, tmp_path / "loss_curve.png", "tiny run")
    assert path == tmp_path / "loss_curve.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
