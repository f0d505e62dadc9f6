"""The scheduler (lorakit/serve/scheduler.py): requests for different adapters batched together, adapters
unloaded under running requests, rows freed when their clients go away."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .conftest import PROMPTS, complete, greedy


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


def test_unload_while_running_then_reload_waits_for_the_old_one(client, root):
    engine = client.engine
    with ThreadPoolExecutor(2) as pool:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "b"}).status_code == 200
        running = pool.submit(complete, client, "d", PROMPTS[3], max_tokens=64, ignore_eos=True)
        deadline = time.time() + 30
        while not any(row.request.adapter == "d" for row in list(engine.batch.rows)):
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
