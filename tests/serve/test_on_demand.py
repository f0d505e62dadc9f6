"""Adapters resolved on demand: with ``--adapter-root``, a request whose ``model`` names an adapter folder directly
under the root is served after loading it on first use (once, however many ask at the same time), with the checks
and the LRU limit of an explicit load; names that would leave the root, links and folders without an adapter are
unknown models; a folder that does not load is a 400 that names it, and the server goes on as it was."""

from __future__ import annotations

import shutil
import threading

import pytest

from lorakit.serve import build_engine

from .conftest import PROMPTS, complete, running


def _listed(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def _loads(client) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines()
                if line.startswith("lorakit_adapter_loads_total "))
    return float(line.split()[1])


@pytest.fixture(scope="module")
def served(tiny_llama_dir, root):
    """A server with adapter a registered (one slot more than it needs) and on-demand loading under ``root``."""
    for copy in ("ondemand", "crowd"):
        shutil.copytree(root / "a", root / copy)
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "empty").mkdir()
    engine = build_engine(tiny_llama_dir, {"a": root / "a"}, served_model_name="base", adapter_root=root,
                          max_adapters=3, max_tokens=64)
    with running(engine) as client:
        yield client


def test_a_folder_under_the_root_is_listed_then_loaded_on_first_use(served):
    assert "ondemand" in _listed(served) and "linked" not in _listed(served) and "empty" not in _listed(served)
    loads = _loads(served)
    answer = complete(served, "ondemand", PROMPTS[0], max_tokens=8)["choices"][0]["text"]
    assert answer == complete(served, "a", PROMPTS[0], max_tokens=8)["choices"][0]["text"]  # the same weights
    assert _loads(served) == loads + 1
    complete(served, "ondemand", PROMPTS[1], max_tokens=4)
    assert _loads(served) == loads + 1  # loaded once
    chat = served.post("/v1/chat/completions", json={"model": "ondemand", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200


def test_concurrent_first_requests_load_the_adapter_once(served):
    loads = _loads(served)
    statuses: list[int] = []

    def ask() -> None:
        response = served.post("/v1/completions", json={"model": "crowd", "prompt": PROMPTS[2], "max_tokens": 4,
                                                        "temperature": 0})
        statuses.append(response.status_code)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [200] * 8
    assert _loads(served) == loads + 1


@pytest.mark.parametrize("name", ["../a", "a/../a", "/etc", "linked", "empty", "nothing-here", ".", "..", "a.b",
                                  "x" * 300, "base"])
def test_names_that_leave_the_root_or_name_no_adapter_folder_are_unknown(served, name):
    loads = _loads(served)
    response = served.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
    assert (response.status_code, _loads(served)) == ((200 if name == "base" else 404), loads), response.text


@pytest.mark.parametrize("name", ["corrupt", "nan", "listconfig", "dora"])
def test_a_folder_that_does_not_load_is_a_400_naming_it_and_nothing_changes(served, name):
    before = _listed(served)
    response = served.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 400 and name in response.json()["error"]["message"], response.text
    assert _listed(served) == before
    assert complete(served, "a", PROMPTS[0], max_tokens=4)["choices"][0]["finish_reason"] == "length"
