"""The run's meter: useful FLOPs (forward-only reference passes included), tokens, time in steps, MFU, first/last
loss."""

from __future__ import annotations

import time

import pytest
from conftest import tiny_llama

from lorakit import LoraConfig, get_lora_model
from lorakit.models.calc import flop_counter
from lorakit.training.devices import Processes
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import MicroBatch, Task
from lorakit.training.utilization import Meter, meter_for


def _micro(lengths: list[int], head_rows: int | None = None) -> MicroBatch:
    return MicroBatch(tensors={}, targets=sum(lengths), tokens=sum(lengths), lengths=lengths, head_rows=head_rows)


@pytest.fixture(scope="module")
def counter():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    return flop_counter(model)


def test_a_task_has_no_reference_pass_unless_it_says_so():
    assert Task.reference_passes == 0


def test_the_flops_of_a_step_include_a_forward_pass_per_reference_pass(counter):
    micro = [_micro([5, 3], head_rows=4), _micro([7])]
    passes = [counter.step([5, 3], 4), counter.step([7])]
    plain = Meter(counter, 1e9, Processes())
    assert plain.step_flops(micro) == sum(p.total for p in passes)
    dpo = Meter(counter, 1e9, Processes(), reference_passes=1)  # DPO: the frozen reference runs forward only
    assert dpo.step_flops(micro) == sum(p.total + p.forward for p in passes)
    assert Meter(counter, 1e9, Processes(), reference_passes=2).step_flops(micro) == sum(
        p.total + 2 * p.forward for p in passes)


def test_mfu_is_the_flops_over_seconds_times_the_peak_of_every_process():
    meter = Meter(None, 2e9, Processes())
    assert meter.mfu(6e9, 3.0) == pytest.approx(6e9 / (3.0 * 2e9))
    assert Meter(None, 2e9, Processes(0, 2)).mfu(6e9, 3.0) == pytest.approx(6e9 / (3.0 * 2e9 * 2))
    assert meter.mfu(None, 3.0) is None and meter.mfu(6e9, 0.0) is None
    assert Meter(None, None, Processes()).mfu(6e9, 3.0) is None  # no peak measured: no MFU


def test_the_meter_sums_steps_and_summarizes_the_run(counter):
    meter = Meter(counter, 1e9, Processes(), reference_passes=1)
    meter.start()
    measures = []
    for loss, lengths in ((2.5, [4, 4]), (2.0, [6]), (1.5, [3, 2])):
        measures.append(meter.step([_micro(lengths)], loss, time.perf_counter() - 0.01))
    flops = [meter.step_flops([_micro(lengths)]) for lengths in ([4, 4], [6], [3, 2])]
    assert [m.tokens for m in measures] == [8, 6, 5]
    assert all(m.seconds >= 0.01 for m in measures)
    for m, f in zip(measures, flops):
        assert m.mfu == pytest.approx(f / (m.seconds * 1e9))
    summary = meter.summary()
    assert summary["first_loss"] == 2.5 and summary["last_loss"] == 1.5 and summary["tokens"] == 19
    assert summary["model_flops"] == sum(flops)
    assert summary["step_seconds"] == pytest.approx(sum(m.seconds for m in measures))
    assert summary["train_seconds"] >= summary["step_seconds"] - 0.03  # the steps were said to start before
    assert summary["tokens_per_s"] == pytest.approx(19 / summary["train_seconds"])
    assert summary["mfu"] == pytest.approx(sum(flops) / (summary["step_seconds"] * 1e9))
    assert summary["model_flops_per_s"] == pytest.approx(sum(flops) / summary["step_seconds"])
    assert summary["matmul_peak_flops_per_s"] == 1e9


def test_a_step_that_is_not_counted_leaves_the_run_without_flops(counter):
    meter = Meter(counter, 1e9, Processes())
    assert meter.step([_micro([4])], 1.0, time.perf_counter()).mfu is not None
    uncounted = MicroBatch(tensors={}, targets=4, tokens=4)  # no lengths: an encoder-decoder's two stacks
    assert meter.step([uncounted], 1.0, time.perf_counter()).mfu is None
    meter.step([_micro([4])], 1.0, time.perf_counter())
    summary = meter.summary()
    assert summary["model_flops"] is None and summary["mfu"] is None and summary["model_flops_per_s"] is None
    assert summary["tokens"] == 12


def test_prompt_tuning_and_an_unmeasured_peak_count_no_flops():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    assert meter_for(TrainConfig(), model, 1e9, Processes()).counter is not None
    assert meter_for(TrainConfig(), model, None, Processes()).counter is None
    assert meter_for(TrainConfig(method="prompt"), model, 1e9, Processes()).counter is None
    assert meter_for(TrainConfig(), model, 1e9, Processes(), reference_passes=1).reference_passes == 1
