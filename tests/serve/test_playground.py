"""The playground page (``GET /``) in headless Chromium, driven by Playwright: it lists the base and the adapters,
streams a chat answer, and compares two models side by side on one prompt. Each streamed answer must equal the
server's own greedy answer to the same messages, and arrive in more than one piece. A screenshot of the comparison is
kept in ``$LORAKIT_TEST_ARTIFACTS`` (default: ``test-artifacts/`` in the repository).

Chromium is Debian's package (``apt-get install chromium``; ``.ci/run`` installs it); the test is skipped, saying so,
only where it is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lorakit.serve import build_engine

from .conftest import running

playwright = pytest.importorskip("playwright.sync_api", reason="the playground test needs playwright "
                                                             "(pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
QUESTION = "Tell me about the sea."


@pytest.fixture(scope="module")
def server(tiny_llama_dir, root):
    engine = build_engine(tiny_llama_dir, {"a": root / "a", "b": root / "b"}, served_model_name="base",
                          max_adapters=2, max_tokens=64)
    with running(engine) as client:
        yield client


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with playwright.sync_playwright() as p:
        # Nothing but this server: no first-run, update, sync or other traffic of the browser's own.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        outside = []
        page.on("request", lambda r: None if r.url.startswith(str(server.base_url)) else outside.append(r.url))
        page.goto(f"{server.base_url}/")
        yield page
        assert not outside, f"the page fetched from elsewhere: {outside}"
        browser.close()


def greedy_chat(server, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 32, "temperature": 0}
    return server.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def ask(page, question: str) -> None:
    page.fill("#max-tokens", "32")
    page.fill("#temperature", "0")
    page.fill("#prompt", question)
    page.click("#send")


def answer_in(page, pane: int):
    """The pane's last answer once it has ended (streamed to the end, or failed)."""
    answer = page.locator(f"#pane-{pane} .message.assistant, #pane-{pane} .message.error").last
    page.wait_for_function("(e) => e.dataset.state !== 'streaming'", arg=answer.element_handle(), timeout=60_000)
    assert answer.get_attribute("data-state") == "done", answer.text_content()
    return answer


def test_the_page_lists_the_base_and_adapters(page, server):
    assert server.get("/").headers["content-security-policy"].startswith("default-src 'none'")
    page.wait_for_function("document.querySelectorAll('#pane-0 option').length >= 3")
    assert page.eval_on_selector_all("#pane-0 option", "os => os.map(o => o.value)") == ["base", "a", "b"]


def test_chat_streams_the_models_answer(page, server):
    page.select_option("#pane-0 .model", "a")
    ask(page, QUESTION)
    answer = answer_in(page, 0)
    assert answer.text_content() == greedy_chat(server, "a", QUESTION) != ""
    assert int(answer.get_attribute("data-chunks")) > 1  # streamed, not one reply at the end
    assert "tokens in" in page.text_content("#pane-0 .meta")


def test_compare_two_models_side_by_side(page, server):
    page.click("#clear")
    page.check("#compare")
    page.select_option("#pane-0 .model", "base")
    page.select_option("#pane-1 .model", "b")
    ask(page, QUESTION)
    left, right = answer_in(page, 0), answer_in(page, 1)
    assert left.text_content() == greedy_chat(server, "base", QUESTION)
    assert right.text_content() == greedy_chat(server, "b", QUESTION)
    assert left.text_content() != right.text_content()
    assert int(left.get_attribute("data-chunks")) > 1 and int(right.get_attribute("data-chunks")) > 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_one_message_at_a_time(page, server):
    """A second submit while the answers stream (Enter pressed again) is ignored, not sent beside the first."""
    page.click("#clear")
    page.uncheck("#compare")
    page.fill("#max-tokens", "32")
    page.evaluate("""() => {
        for (const text of ["first", "second"]) {
            document.getElementById("prompt").value = text;
            document.getElementById("ask").requestSubmit();
        }
    }""")
    answer_in(page, 0)
    assert page.eval_on_selector_all("#pane-0 .message.user", "ms => ms.map(m => m.textContent)") == ["first"]


def test_an_error_is_shown_not_lost(page, server):
    page.click("#clear")
    page.uncheck("#compare")
    page.fill("#max-tokens", "100000")  # over the server's --max-tokens: a 400 the page shows
    page.fill("#prompt", "Hi")
    page.click("#send")
    error = page.locator("#pane-0 .message.error")
    error.wait_for(timeout=30_000)
    assert "max_tokens" in error.text_content()
