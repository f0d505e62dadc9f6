"""A full disk, simulated: each write surface in a child process whose file-size limit (``RLIMIT_FSIZE``, with
SIGXFSZ ignored, so writes fail with EFBIG instead of killing it) is too small. Every one must fail with one
sentence that names the file and says the disk is full, leave nothing half-written under a final name, and keep
what was there before readable."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import train_cli

from lorakit.training.checkpoint import checkpoints

pytestmark = pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")

LIMIT = 4096  # bytes per file: a tiny adapter's weights, a checkpoint's, a merged model's all exceed it

CHILD = textwrap.dedent('''
    import json, resource, signal, sys
    from pathlib import Path

    import torch
    import transformers

    from lorakit import LoraConfig, get_lora_model
    from lorakit.core.errors import is_user_error
    from lorakit.training.checkpoint import checkpoints, load_checkpoint, rng_state, save_checkpoint
    from lorakit.training.metrics_log import MetricsLog
    from lorakit.workflows.inference import export_adapter

    folder, base, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def full_disk(write):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            write()
            return {"error": None}
        except Exception as err:
            return {"error": type(err).__name__, "user": is_user_error(err), "message": str(err)}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    torch.manual_seed(0)
    model = get_lora_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder / "adapter")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"rng": [rng_state()], "before": {}}
    save_checkpoint(folder / "checkpoints", 2, model, optimizer, schedule, state, "r: 4\\n", keep=3)
    log = MetricsLog(folder / "metrics.jsonl", enabled=True, report_to="none")
    log.start(None)
    with torch.no_grad():  # the adapter on disk and the one saved again now differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    results = {
        "adapter": full_disk(lambda: model.save_pretrained(folder / "adapter")),
        "checkpoint": full_disk(lambda: save_checkpoint(folder / "checkpoints", 4, model, optimizer, schedule, state,
                                                        "r: 4\\n", keep=3)),
        "metrics": full_disk(lambda: [log.write({"step": i, "loss": 1.0, "note": "x" * 100}) for i in range(1, 200)]),
        "export": full_disk(lambda: export_adapter(str(folder / "adapter"), str(folder / "merged"), format="hf",
                                                   model=base)),
        "gguf": full_disk(lambda: export_adapter(str(folder / "adapter"), str(folder / "merged.gguf"),
                                                 format="gguf", model=base)),
    }
    earlier = checkpoints(folder / "checkpoints")[-1]  # the checkpoint written before the disk filled still loads
    results["restored_step"] = load_checkpoint(earlier, model, optimizer, schedule)["step"]
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def full_disk(tiny_llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("full_disk")
    child = subprocess.run([sys.executable, "-c", CHILD, str(folder), tiny_llama_dir, str(LIMIT)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return folder, json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("surface, names", [
    ("adapter", "adapter_model.safetensors"), ("checkpoint", "step-4 checkpoint"), ("metrics", "metrics.jsonl"),
    ("export", "merged"), ("gguf", "merged.gguf")])
def test_a_full_disk_is_one_sentence_naming_the_file(full_disk, surface, names):
    result = full_disk[1][surface]
    assert result["error"] == "FileProblem" and result["user"], result
    assert names in result["message"] and "the disk is full" in result["message"], result["message"]
    assert "\n" not in result["message"]


def test_what_was_on_disk_before_stays_whole(full_disk):
    from safetensors.torch import load_file

    folder, results = full_disk
    assert "unchanged" in results["adapter"]["message"]
    load_file(folder / "adapter" / "adapter_model.safetensors")  # the earlier adapter still reads
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors"]
    assert [p.name for p in checkpoints(folder / "checkpoints")] == ["step-000002"]
    assert results["restored_step"] == 2
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-000002"]  # no temporary folder left
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert lines and [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))  # no half line
    assert not (folder / "merged").exists() and not (folder / "merged.gguf").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_lorakit_train_on_a_full_disk_stops_with_one_line_and_no_checkpoint_half_written(tiny_llama_dir, tmp_path):
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by the command: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "out"
    run = train_cli("--model", tiny_llama_dir, "--steps", "10", "--save-every", "5", "--max-eval", "2",
                    "--max-new-tokens", "2", "--no-progress", "--precision", "fp32", "--output-dir", str(out),
                    preexec_fn=limited, env={"LORAKIT_ALLOCATOR": "system"})
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("lorakit train: error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0] and "step-5 checkpoint" in errors[0], output[-2000:]
    assert "Traceback" not in output
    assert not os.path.exists(out / "checkpoints") or not list((out / "checkpoints").iterdir())
