"""Adapter slots (lorakit/serve/slots.py): least recently used eviction and reloading, and the adapter root that
runtime loads must stay under."""

from __future__ import annotations

import shutil

from lorakit.serve import build_engine

from .conftest import PROMPTS, complete, greedy, running


def test_least_recently_used_adapter_is_evicted_and_reloaded(client, reference, smollm2_tokenizer):
    engine = client.engine  # max_adapters=2
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "c2", "lora_path": "c"}).status_code == 200
    try:
        loads = engine.slots.loads
        for name, adapter in [("a", "a"), ("b", "b"), ("c2", "a"), ("a", "a")]:
            text = complete(client, name, PROMPTS[2], max_tokens=6)["choices"][0]["text"]
            assert text == greedy(reference, smollm2_tokenizer, PROMPTS[2], adapter, 6)
            assert len(engine.resident) <= 2 and engine.resident[-1] == name
        assert engine.slots.loads > loads, "three adapters in two slots must reload"
    finally:
        client.post("/v1/unload_lora_adapter", json={"lora_name": "c2"})


def test_symlink_out_of_the_root_is_refused(client, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "a", outside)
    (root / "link").symlink_to(outside)
    try:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "link"})
        assert response.status_code == 403, response.text
    finally:
        (root / "link").unlink()


def test_symlinked_file_out_of_the_root_is_refused(client, root, tmp_path):
    secret = tmp_path / "adapter_model.safetensors"
    shutil.copy(root / "a" / "adapter_model.safetensors", secret)
    (root / "sneaky").mkdir()
    shutil.copy(root / "a" / "adapter_config.json", root / "sneaky")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(secret)
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "sneaky"})
    assert response.status_code == 403, response.text


def test_runtime_loading_is_off_without_adapter_root(tiny_llama_dir, root):
    with running(build_engine(tiny_llama_dir, {}, served_model_name="base")) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "b")})
        assert response.status_code == 403 and "--adapter-root" in response.json()["error"]["message"]
        assert complete(client, "base", PROMPTS[0], max_tokens=2)["usage"]["completion_tokens"] == 2
