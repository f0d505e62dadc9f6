"""lorakit serve over real HTTP: a uvicorn server on 127.0.0.1 and a free port, a tiny Llama base, two adapters.

Every answer is checked against ``generate`` on the same model with the same (greedy or seeded) settings.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers

from lorakit import LoraConfig, get_lora_model
from lorakit.model import LoraModel
from lorakit.serve import build_engine, create_app

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server tests need uvicorn (pip install -e '.[dev]')")

PROMPTS = ["Hello there, how are", "The capital of France is", "1 2 3 4", "Once upon a time in a land far"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(engine):
    """Serve ``engine`` on a free loopback port in a thread; yield an httpx client for it."""
    port = _free_port()
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


def _save_adapter(base_dir: str, folder: Path, seed: int) -> None:
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
    """The adapter root: adapters a and b, c (a copy of a under another name) and a corrupt one."""
    root = tmp_path_factory.mktemp("adapters")
    _save_adapter(tiny_llama_dir, root / "a", seed=1)
    _save_adapter(tiny_llama_dir, root / "b", seed=2)
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
    return root


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, root):
    """The same base and adapters in a LoraModel, for generate()."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = LoraModel.from_pretrained(model, root / "a", "a")
    lora.load_adapter(root / "b", "b")
    return lora


@pytest.fixture(scope="module")
def client(tiny_llama_dir, root):
    engine = build_engine(tiny_llama_dir, {"a": root / "a", "b": root / "b"}, served_model_name="base",
                          adapter_root=root, max_adapters=2, max_tokens=64)
    with running(engine) as client:
        client.engine = engine
        yield client


def greedy(reference, tokenizer, prompt: str, adapter: str | None, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(client, model: str, prompt: str, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# -- answers -----------------------------------------------------------------------------------------------

def test_completions_equal_generate_for_base_and_adapters(client, reference, smollm2_tokenizer):
    texts = {}
    for model, adapter in [("base", None), ("a", "a"), ("b", "b")]:
        body = complete(client, model, PROMPTS[1], max_tokens=12)
        choice = body["choices"][0]
        assert choice["text"] == greedy(reference, smollm2_tokenizer, PROMPTS[1], adapter, 12)
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
        assert body["model"] == model and body["object"] == "text_completion"
        texts[model] = choice["text"]
    assert len(set(texts.values())) == 3, "the adapters must change the answer, or this test proves nothing"


def test_concurrent_requests_over_adapters_are_batched_and_equal_generate(client, reference, smollm2_tokenizer):
    jobs = [(prompt, model, 6 + i) for i, (prompt, model) in
            enumerate((p, m) for p in PROMPTS for m in ("base", "a", "b"))]
    mixed = client.engine.stats.mixed_forwards
    with ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(lambda job: complete(client, job[1], job[0], max_tokens=job[2]), jobs))
    assert client.engine.stats.mixed_forwards > mixed, "rows of different adapters must share forward passes"
    assert client.engine.stats.largest_batch > 3
    for (prompt, model, n), body in zip(jobs, bodies):
        expected = greedy(reference, smollm2_tokenizer, prompt, None if model == "base" else model, n)
        assert body["choices"][0]["text"] == expected, (prompt, model)


def test_chat_equals_lorakit_generate(client, root, tiny_llama_dir):
    from lorakit.inference import generate

    for model, adapter in [("base", None), ("a", root / "a"), ("b", root / "b")]:
        response = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10,
            "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        expected = generate("Say hi", adapter=adapter, model=tiny_llama_dir, max_new_tokens=10)
        assert body["choices"][0]["message"]["content"].strip() == expected


def test_chat_streams_server_sent_events(client):
    request = {"model": "a", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Say hi"}],
               "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) >= 4, "the text must arrive in pieces"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    # OpenAI's last chunk: an empty delta with the finish reason; none before it has one
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_stream_with_usage(client):
    request = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    whole = complete(client, **request)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions",
                       json={**request, "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])


def test_seeded_sampling_repeats_alone_and_in_a_batch(client):
    request = {"model": "a", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    alone = complete(client, **request)["choices"][0]["text"]
    with ThreadPoolExecutor(6) as pool:
        crowd = list(pool.map(lambda m: complete(client, m, PROMPTS[2], max_tokens=12, temperature=1.0, seed=1),
                              ["base", "a", "b", "a", "b"]))
        again = pool.submit(complete, client, **request)
        assert again.result()["choices"][0]["text"] == alone
    assert len(crowd) == 5
    other = complete(client, **{**request, "seed": 8})["choices"][0]["text"]
    greedy_text = complete(client, **{**request, "temperature": 0})["choices"][0]["text"]
    assert len({alone, other, greedy_text}) > 1, "sampling must depend on the seed"


def test_stop_string_cuts_the_text(client):
    full = complete(client, "b", PROMPTS[1], max_tokens=12)["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    body = complete(client, "b", PROMPTS[1], max_tokens=12, stop=[stop])
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_models_lists_the_base_and_adapters(client, root):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "base" and {"a", "b"} <= set(ids)
    assert {m["id"]: m["parent"] for m in data}["a"] == "base"


# -- adapters at runtime -----------------------------------------------------------------------------------

def test_load_use_unload_then_404(client, reference, smollm2_tokenizer):
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert response.status_code == 200, response.text
    assert "c" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    # c holds a's weights, so it answers as a does
    assert complete(client, "c", PROMPTS[0], max_tokens=8)["choices"][0]["text"] == \
        greedy(reference, smollm2_tokenizer, PROMPTS[0], "a", 8)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    gone = client.post("/v1/completions", json={"model": "c", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404 and "c" in gone.json()["error"]["message"]
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404
    assert "c" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


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


# -- client mistakes: 4xx, never 500, and the server goes on -----------------------------------------------

@pytest.mark.parametrize(("path", "payload", "status"), [
    ("/v1/completions", b'{"model": "a", "prompt": ', 400),  # malformed JSON
    ("/v1/completions", {"prompt": "hi"}, 400),  # no model
    ("/v1/completions", {"model": "a", "prompt": 5}, 400),  # a number for a prompt
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 65}, 400),  # above --max-tokens 64
    ("/v1/completions", {"model": "a", "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "a", "prompt": "word " * 1100, "max_tokens": 4}, 400),  # past the 1024 context
    ("/v1/completions", {"model": "a", "prompt": "", "max_tokens": 4}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "n": 2}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": "a", "prompt": "hi", "seed": 2**70, "max_tokens": 2}, 200),  # any int seeds
    ("/v1/completions", {"model": "a", "prompt": "hi", "temperature": 1e-40, "max_tokens": 2}, 200),  # greedy
    ("/v1/chat/completions", {"model": "a", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 403),  # outside the root
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a/../../x"}, 403),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "corrupt"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "bad\u0000path"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "listconfig"}, 400),  # adapter_config.json: []
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "dora"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "b"}, 400),  # the name is taken
    ("/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "b"}, 400),
    ("/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "b"}, 400),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404),
])
def test_client_mistakes_get_4xx_and_the_server_keeps_serving(client, path, payload, status):
    if isinstance(payload, bytes):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]["message"], "the error must say what is wrong"
    assert complete(client, "a", PROMPTS[0], max_tokens=2)["choices"][0]["finish_reason"] == "length"
    assert "x" not in client.engine.adapters, "a failed load must register nothing"


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


def test_unload_while_running_then_reload_waits_for_the_old_one(client, root):
    engine = client.engine
    with ThreadPoolExecutor(2) as pool:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "b"}).status_code == 200
        running = pool.submit(complete, client, "d", PROMPTS[3], max_tokens=64, ignore_eos=True)
        deadline = time.time() + 30
        while not any(row.request.adapter == "d" for row in list(engine._rows)):
            assert time.time() < deadline and not running.done()
            time.sleep(0.001)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "d"}).status_code == 200
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "a"})
        assert again.status_code in (200, 409), again.text  # 409 while the old d still runs
        assert running.result()["usage"]["completion_tokens"] == 64, "a running request finishes after unload"
    if again.status_code == 409:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "a"}).status_code == 200
    assert "d" in engine.adapters
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "d"}).status_code == 200


def test_a_stream_closed_early_frees_its_row(client):
    engine = client.engine
    cancelled = engine.stats.cancelled
    request = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0, "ignore_eos": True,
               "stream": True}
    with client.stream("POST", "/v1/completions", json=request) as response:
        next(line for line in response.iter_lines() if line.startswith("data: ") and '"text": "' in line)
    deadline = time.time() + 30
    while engine.stats.cancelled == cancelled:
        assert time.time() < deadline, "the row of a closed stream must leave the batch"
        time.sleep(0.01)


def test_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    complete(client, "a", PROMPTS[0], max_tokens=3)
    text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["lorakit_requests_total"] >= 1 and values["lorakit_generation_tokens_total"] >= 3
    for gauge in ("queue_depth", "running", "generation_tokens_per_second", "adapters_resident"):
        assert f"lorakit_{gauge}" in values


# -- other modes -------------------------------------------------------------------------------------------

def test_merged_single_adapter_mode(tiny_llama_dir, root, reference, smollm2_tokenizer):
    engine = build_engine(tiny_llama_dir, {"a": root / "a"}, merge=True)
    with running(engine) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a"]
        assert complete(client, "a", PROMPTS[1], max_tokens=10)["choices"][0]["text"] == \
            greedy(reference, smollm2_tokenizer, PROMPTS[1], "a", 10)
        assert client.post("/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 404
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "b")})
        assert response.status_code == 403


def test_runtime_loading_is_off_without_adapter_root(tiny_llama_dir, root):
    with running(build_engine(tiny_llama_dir, {}, served_model_name="base")) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "b")})
        assert response.status_code == 403 and "--adapter-root" in response.json()["error"]["message"]
        assert complete(client, "base", PROMPTS[0], max_tokens=2)["usage"]["completion_tokens"] == 2


def test_lorakit_serve_command(tiny_llama_dir, root):
    port = _free_port()
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


def test_text_stream_holds_back_partial_stop_strings(smollm2_tokenizer):
    from lorakit.serve.sampling import TextStream

    ids = smollm2_tokenizer("Hello world, END of story")["input_ids"]
    stream = TextStream(smollm2_tokenizer, ["END"])
    pieces = [stream.add(t) for t in ids]
    assert stream.stopped and "".join(pieces) == "Hello world, "
    plain = TextStream(smollm2_tokenizer, [])
    assert "".join(plain.add(t) for t in ids) + plain.flush() == "Hello world, END of story"
    # a stop string split across tokens, and characters split across tokens (byte-level BPE)
    text = "Grüße aus Köln 😀 and ### more"
    ids = smollm2_tokenizer(text)["input_ids"]
    split = TextStream(smollm2_tokenizer, ["###"])
    pieces = [split.add(t) for t in ids]
    assert "".join(pieces) == "Grüße aus Köln 😀 and " and "\ufffd" not in "".join(pieces)
    whole = TextStream(smollm2_tokenizer, [])
    assert "".join(whole.add(t) for t in ids) + whole.flush() == smollm2_tokenizer.decode(ids)
