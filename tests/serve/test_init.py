"""Building and running a server (lorakit/serve/__init__.py): ``build_engine``'s merged mode, its refusals (an
adapter holding NaN, a base that ships code of its own) and the ``lorakit serve`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.cli import build_parser, main
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


def test_serve_refuses_an_adapter_holding_nan_in_one_line(tiny_llama_dir, root, capsys):
    code = main(["serve", "--base", tiny_llama_dir, "--adapter", f"poisoned={root / 'nan'}", "--port",
                 str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("lorakit serve: error: "), err
    assert "NaN or infinite" in err and err.count("poisoned") == 1, err


@pytest.fixture(params=["config.json", "tokenizer_config.json"])
def remote_code_dir(request, tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama folder with an ``auto_map`` in one of its config files, naming code that leaves a mark."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / request.param).read_text())
    auto_map = {"AutoModelForCausalLM": "evil.Model", "AutoTokenizer": ["evil.Tokenizer", None]}
    (folder / request.param).write_text(json.dumps({**config, "auto_map": auto_map}))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    return folder


def test_serve_runs_no_code_of_the_model_folder_without_trust_remote_code(remote_code_dir, capsys):
    with pytest.raises(ValueError, match="--trust-remote-code"):
        build_engine(str(remote_code_dir))
    assert main(["serve", "--base", str(remote_code_dir), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "auto_map" in err and "--trust-remote-code" in err, err
    assert not (remote_code_dir.parent / "ran").exists()


def test_serve_options():
    args = build_parser().parse_args(["serve"])
    assert args.trust_remote_code is False and args.max_request_bytes == 2**20
    args = build_parser().parse_args(["serve", "--trust-remote-code", "--max-request-bytes", "4096"])
    assert args.trust_remote_code is True and args.max_request_bytes == 4096
