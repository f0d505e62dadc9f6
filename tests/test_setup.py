"""The set-up promises: the README's commands are what CI runs, and `import lorakit` needs only torch and
safetensors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    run, test = _readme_commands()[:2]
    assert run.endswith("lorakit train") and test.endswith("python -m pytest")
    assert 'torch==2.13.0' in run and 'torch==2.13.0' in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_core_imports_only_torch_and_safetensors():
    code = ("import sys, lorakit; bad = [m for m in ('transformers', 'peft', 'gguf', 'accelerate', 'bitsandbytes') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
