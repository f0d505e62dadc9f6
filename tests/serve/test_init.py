"""Building and running a server (lorakit/serve/__init__.py): ``build_engine``'s merged mode and the
``lorakit serve`` command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from lorakit.serve import build_engine

from .conftest import PROMPTS, complete, free_port, greedy, httpx, running


def test_merged_single_adapter_mode(tiny_llama_dir, root, reference, smollm2_tokenizer):
    engine = build_engine(tiny_llama_dir, {"a": root / "a"}, merge=True)
    with running(engine) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a"]
        assert complete(client, "a", PROMPTS[1], max_tokens=10)["choices"][0]["text"] == \
            greedy(reference, smollm2_tokenizer, PROMPTS[1], "a", 10)
        assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 404
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "b")})
        assert response.status_code == 403


def test_lorakit_serve_command(tiny_llama_dir, root):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--base", tiny_llama_dir, "--adapter",
                                f"a={root / 'a'}", "--port", str(port), "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "lorakit serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [Path(tiny_llama_dir).name, "a"]
    finally:
        process.terminate()
        process.wait(timeout=30)
