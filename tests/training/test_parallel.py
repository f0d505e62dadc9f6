"""The parallel interface of the loop: one process, DDP and FSDP2 (2 gloo processes on CPU under torchrun) take the
same step from the same global batch: the same initial adapter, gradient norm, clipped update and evaluation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from lorakit import LoraConfig, get_lora_model
from lorakit.training.devices import Processes
from lorakit.training.options import TrainConfig
from lorakit.training.parallel import DataParallel, FullySharded, Objective, OneProcess, parallel_for

# One step of each kind of run, as the loop takes it: a global batch of 4 rows, 2 micro-batches per process.
STEP = textwrap.dedent("""
    import sys
    from types import SimpleNamespace

    import torch
    import transformers
    from lorakit import LoraConfig, get_lora_model
    from lorakit.training.data import IGNORE
    from lorakit.training.devices import start_processes
    from lorakit.training.loss import causal_lm_loss
    from lorakit.training.options import TrainConfig
    from lorakit.training.parallel import parallel_for

    mode, out = sys.argv[1], sys.argv[2]
    procs = start_processes(torch.device("cpu"))
    par = parallel_for(TrainConfig(fsdp=mode == "fsdp"), procs, "fp32")
    with par.initializing(7):  # DDP and FSDP must both end with rank 0's initial adapter everywhere
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64)
        model = get_lora_model(transformers.LlamaForCausalLM(config),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 13), generator=gen)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].clone()}
    batch["targets"][:, :6] = IGNORE

    def evaluate(model, label):
        with torch.no_grad():
            total, count = causal_lm_loss(model, batch)
        return {"loss": (total / count).item(), "label": label}

    task = SimpleNamespace(model=model, loss=lambda m, b: causal_lm_loss(m, b)[0], config=TrainConfig(),
                           evaluate=evaluate)
    objective = par.objective(task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.9)  # a smooth update: Adam's first is a sign
    rows = 4 // procs.world  # this process's rows of the global batch
    mine = batch["targets"][procs.rank * rows:(procs.rank + 1) * rows]
    targets = procs.all_sum(float((mine != IGNORE).sum()))  # of the whole step, as the loop counts them
    for i in range(2):
        first = procs.rank * rows + i * rows // 2
        micro = {k: v[first:first + rows // 2] for k, v in batch.items()}
        with par.micro_batch(objective, last=i == 1):
            (objective(micro) * (procs.world / targets)).backward()
    norm = par.clip(params, 0.05)
    optimizer.step()
    metrics = par.evaluate(objective, task, "after")
    with par.gathered(objective, trainable_only=True):
        state = par.optimizer_state(optimizer)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state_shapes = None if state is None else sorted(tuple(v["momentum_buffer"].shape)
                                                     for v in state["state"].values())
    torch.save({"norm": norm.item(), "metrics": metrics, "weights": weights if procs.main else None,
                "state_shapes": state_shapes, "progress": task.config.progress}, f"{out}/rank{procs.rank}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_step(tmp_path: Path, mode: str) -> list[dict]:
    script = tmp_path / "step.py"
    script.write_text(STEP)
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [] if mode == "one" else ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                         "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    done = subprocess.run([sys.executable, *launcher, str(script), mode, str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


def test_ddp_and_fsdp_take_the_one_process_step_of_the_global_batch(tmp_path):
    (one,) = _run_step(tmp_path, "one")
    assert one["state_shapes"] is None  # one process: the optimizer's own state dict is the one to save
    for mode in ("ddp", "fsdp"):
        main, other = _run_step(tmp_path, mode)
        assert main["norm"] == pytest.approx(one["norm"], rel=1e-5) and other["norm"] == main["norm"]
        assert main["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
        assert main["metrics"]["label"] == "after" and other["metrics"] == {}  # rank 0 reports the evaluation
        assert main["weights"].keys() == one["weights"].keys()
        for name, weight in one["weights"].items():
            torch.testing.assert_close(main["weights"][name], weight, atol=1e-6, rtol=1e-5)
        if mode == "fsdp":  # the optimizer state to save is gathered whole: shaped as the whole parameters
            assert main["state_shapes"] == sorted(tuple(w.shape) for w in one["weights"].values())
            assert main["progress"] and not other["progress"]  # every process evaluates; one progress bar
        else:
            assert main["state_shapes"] is None and other["progress"]


def test_parallel_for_picks_fsdp_ddp_or_one_process():
    assert type(parallel_for(TrainConfig(fsdp=True), Processes(0, 2), "fp32")) is FullySharded
    assert type(parallel_for(TrainConfig(), Processes(1, 2), "fp32")) is DataParallel
    assert type(parallel_for(TrainConfig(), Processes(), "fp32")) is OneProcess


def _draw(par: OneProcess, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    with par.initializing(seed):
        during = torch.rand(3)
    return during, torch.rand(3)


def _stream(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed)


def test_fsdp_initializes_every_process_alike_and_ddp_from_its_own_seed():
    second = Processes(1, 2)
    during, after = _draw(FullySharded(second, "fp32"), 5)
    torch.testing.assert_close(during, torch.rand(3, generator=_stream(5)))  # rank 0's initial weights: its own
    torch.testing.assert_close(after, torch.rand(3, generator=_stream(6)))  # then its own stream (dropout)
    during, after = _draw(DataParallel(second), 5)  # DDP broadcasts rank 0's weights; each draws on its own
    gen = _stream(6)
    torch.testing.assert_close(during, torch.rand(3, generator=gen))
    torch.testing.assert_close(after, torch.rand(3, generator=gen))
    during, _ = _draw(OneProcess(Processes()), 5)
    torch.testing.assert_close(during, torch.rand(3, generator=_stream(5)))


def test_one_process_clips_as_clip_grad_norm_and_measures_without_clipping():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    par = OneProcess(Processes())
    torch.testing.assert_close(par.clip(params, 0.0), expected)  # 0: the norm only, for the log
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    torch.testing.assert_close(par.clip(params, 1e-3), expected)  # the norm before clipping, as PyTorch's
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_one_process_runs_the_objective_as_it_is_and_evaluates_on_rank_0_only():
    model = torch.nn.Linear(2, 1)
    task = SimpleNamespace(model=model, loss=lambda m, b: m(b["x"]).sum(),
                           evaluate=lambda m, label: {"label": label, "same": m is model})
    par = OneProcess(Processes())
    objective = par.objective(task)
    assert isinstance(objective, Objective) and objective.model is model
    x = torch.ones(3, 2)
    torch.testing.assert_close(objective({"x": x}), model(x).sum())
    assert objective(within=lambda m: m is model)
    assert par.evaluate(objective, task, "before") == {"label": "before", "same": True}
    assert OneProcess(Processes(1, 2)).evaluate(objective, task, "before") == {}
    with par.gathered(objective, trainable_only=True) as inside:  # nothing is sharded: nothing to gather
        assert inside is objective
    assert par.optimizer_state(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    with par.micro_batch(objective, last=False):
        objective({"x": x}).backward()
    assert model.weight.grad is not None
