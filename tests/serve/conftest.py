"""What the server tests share: a tiny Llama base with adapters on disk, the same adapters in a LoraModel for
``generate``, a uvicorn server on 127.0.0.1 and a free port with an httpx client for it, and for the tests of the
batch and its cache, the base alone and one forward pass over it.

Answers are checked against ``generate`` on the same model with the same (greedy or seeded) settings.
"""

from __future__ import annotations

import inspect
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, get_lora_model
from lorakit.models.model import LoraModel
from lorakit.serve import Engine, build_engine, create_app

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server tests need uvicorn (pip install -e '.[dev]')")

PROMPTS = ["Hello there, how are", "The capital of France is", "1 2 3 4", "Once upon a time in a land far"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(engine: Engine) -> Iterator[httpx.Client]:
    """Serve ``engine`` on a free loopback port in a thread; yield an httpx client for it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def save_adapter(base_dir: str, folder: Path, seed: int) -> None:
    """An adapter whose update is large enough that greedy text differs from the base's."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for adapter in layer.adapters.values():
                adapter.lora_A.normal_(0, 0.5)
                adapter.lora_B.normal_(0, 0.5)
    lora.save_pretrained(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama_dir) -> Path:
    """The adapter root: adapters a and b, c (a copy of a under another name), and damaged ones: a corrupt file,
    a config that is a list, a DoRA config, and NaN and inf in two tensors ("nan")."""
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(tiny_llama_dir, root / "a", seed=1)
    save_adapter(tiny_llama_dir, root / "b", seed=2)
    shutil.copytree(root / "a", root / "c")
    shutil.copytree(root / "a", root / "listconfig")
    (root / "listconfig" / "adapter_config.json").write_text("[]")
    shutil.copytree(root / "a", root / "dora")
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (root / "corrupt").mkdir()
    shutil.copy(root / "a" / "adapter_config.json", root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes((root / "a" / "adapter_model.safetensors")
                                                                 .read_bytes()[:200])
    shutil.copytree(root / "a", root / "nan")
    tensors = load_file(root / "nan" / "adapter_model.safetensors")
    first, second = sorted(tensors)[:2]
    tensors[first][0, 0] = float("nan")
    tensors[second][-1, -1] = float("-inf")
    save_file(tensors, root / "nan" / "adapter_model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, root) -> LoraModel:
    """The same base and adapters in a LoraModel, for generate()."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = LoraModel.from_pretrained(model, root / "a", "a")
    lora.load_adapter(root / "b", "b")
    return lora


@pytest.fixture(scope="module")
def client(tiny_llama_dir, root) -> Iterator[httpx.Client]:
    """A client of a server with the base (as "base") and adapters a and b, two slots, runtime loads under root."""
    engine = build_engine(tiny_llama_dir, {"a": root / "a", "b": root / "b"}, served_model_name="base",
                          adapter_root=root, max_adapters=2, max_tokens=64)
    with running(engine) as client:
        client.engine = engine
        yield client


def greedy(reference: LoraModel, tokenizer, prompt: str, adapter: str | None, max_new_tokens: int) -> str:
    """``generate``'s greedy answer to ``prompt`` with ``adapter`` (None: the base)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(client: httpx.Client, model: str, prompt: str, **fields) -> dict:
    """A greedy (unless ``fields`` say otherwise) /v1/completions answer, which must be a 200."""
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir) -> torch.nn.Module:
    """The tiny Llama base, without adapters."""
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def last_logits(model: torch.nn.Module, ids: torch.Tensor, cache, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits ``(rows, vocab)`` of one forward pass that extends ``cache`` (as the scheduler runs it)."""
    # transformers 5 renamed past_key_values to cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
    return out.logits[:, -1, :].float()
