"""The playground at `/` (web/playground/) in a real browser.

Debian's chromium, headless, driven by Playwright, against the mesh that
`make up` starts (the launcher: adapters, router, Envoy) over two TGI
doubles, which echo the last user message one word per token. The page
must list both models, stream answers that grow token by token with their
figures, stop a long stream so that the backend stops generating, put
errors in plain words, work from the keyboard and in a narrow window.

One more test runs the page over the CPU profile that `make up` starts
without TGI (llama.cpp with SmolLM2 behind both models): real text through
the whole mesh. With LLMMESH_UPDATE_SCREENSHOT=1 it writes
docs/playground.png, the screenshot docs/playground.md shows.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.harness.fixtures import API_KEY
from tests.harness.mesh import (
    Mesh,
    free_run,
    running_mesh,
    stop_launcher,
    wait_launcher,
)
from tests.harness.parts import http_json, sse_events
from tests.harness.procs import ROOT, free_port, python_module, start
from tests.harness.wait import eventually

pytestmark = [pytest.mark.integration, pytest.mark.needs("chromium")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
# Seconds the doubles wait before each token: slow enough for a browser to
# see an answer arrive in several steps, fast enough for a short test.
TOKEN_DELAY = "0.03"
KEY = API_KEY
WIDE = {"width": 1100, "height": 720}
NARROW = {"width": 360, "height": 740}
SCREENSHOT = ROOT / "docs" / "playground.png"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("playground"), token_delay=TOKEN_DELAY) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(message.text)

    def unexpected(self, *statuses: int) -> list[str]:
        """Errors other than the browser's own note of an HTTP error of `statuses`."""
        expected = tuple(f"status of {s} " for s in statuses)
        return [e for e in self.errors
                if not (e.startswith("Failed to load resource") and any(s in e for s in expected))]


@pytest.fixture
def open_page(browser: Browser, mesh: Mesh) -> Iterator[Callable[..., tuple[Page, Console]]]:
    contexts = []

    def opener(viewport: dict[str, int] = WIDE, url: str | None = None) -> tuple[Page, Console]:
        context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        console = Console(page)
        page.goto(url or f"{mesh.http}/")
        return page, console

    yield opener
    for context in contexts:
        context.close()


def models(mesh: Mesh) -> list[dict[str, Any]]:
    status, _, body = http_json("GET", f"{mesh.http}/v1/mesh/models")
    assert status == 200, body
    return list(json.loads(body)["models"])


def until(page: Page, expression: str, timeout: float = 20.0) -> None:
    """Poll a JavaScript expression from here until it is true.

    (Playwright's wait_for_function polls with eval inside the page, which
    the page's Content-Security-Policy rightly forbids.)
    """
    eventually(lambda: page.evaluate(expression), timeout=timeout)


def wait_models(page: Page) -> None:
    until(page, "document.querySelectorAll('#model option').length >= 2")


def send(page: Page, text: str) -> None:
    """Type into the message box and press Enter, as a person would."""
    page.focus("#prompt")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def answers(page: Page, pane: int = 0) -> Any:
    return page.locator(".pane").nth(pane).locator(".msg.assistant")


def wait_answer(page: Page, index: int, pane: int = 0) -> Any:
    """The `index`-th answer of a pane once it has stopped streaming."""
    answer = answers(page, pane).nth(index)
    answer.wait_for()
    eventually(lambda: answer.get_attribute("data-state") != "streaming", timeout=20)
    return answer


def stat(answer: Any, key: str) -> str:
    return str(answer.locator(f"[data-stat={key}] dd").inner_text())


def record_growth(page: Page) -> None:
    """Note the length of the streaming answer every time the page changes it."""
    page.evaluate("""() => {
        window.growth = [];
        new MutationObserver(() => {
            const text = document.querySelector('.msg.assistant[data-state=streaming] .text');
            if (text) window.growth.push(text.textContent.length);
        }).observe(document.getElementById('panes'),
                   {childList: true, characterData: true, subtree: true});
    }""")


def test_envoy_serves_the_page_with_a_strict_policy(mesh: Mesh) -> None:
    sys.path.insert(0, str(ROOT / "envoy"))
    import render  # envoy/render.py

    page, policy = render.playground_page()
    with urllib.request.urlopen(f"{mesh.http}/", timeout=10) as resp:
        assert resp.headers["content-type"] == "text/html; charset=utf-8"
        assert resp.headers["content-security-policy"] == policy
        assert resp.headers["x-content-type-options"] == "nosniff"
        body = resp.read().decode()
    assert body == page
    status, ctype, raw = http_json("GET", f"{mesh.http}/?from=readme")
    assert (status, ctype, raw.decode()) == (200, "text/html; charset=utf-8", page)
    # Everything ships inline: no other request, and nothing from elsewhere.
    assert "unsafe-inline" not in policy and "connect-src 'self'" in policy
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", body)
    # `make up` points at it.
    banner = (mesh.run_dir.parent / "launcher.log").read_text()
    assert f"playground          {mesh.http}/ " in banner
    # The transcoder still owns every other path.
    status, ctype, raw = http_json("GET", f"{mesh.http}/playground.js")
    assert status == 404 and ctype == "application/json" and json.loads(raw)["code"] == 5


def test_lists_the_models_and_streams_a_chat(clean: Mesh, open_page: Any) -> None:
    page, console = open_page()
    wait_models(page)
    assert page.locator("#model option").all_inner_texts() == ["qwen2", "llama3"]
    info = page.locator("#model-info").inner_text()
    assert "Qwen2-7B-Instruct-GPTQ-Int4" in info and "ready" in info
    assert "backend double/qwen2" in info

    record_growth(page)
    question = "Which two models does this mesh serve and how fast are they today"
    send(page, question)
    answer = wait_answer(page, 0)
    assert answer.get_attribute("data-state") == "done"
    assert answer.locator(".text").inner_text() == question  # the double's echo
    growth = page.evaluate("window.growth")
    assert len(set(growth)) >= 3 and growth == sorted(growth), growth

    # The page's figures are the mesh's: the same request over the API.
    events = list(sse_events(f"{clean.http}/v1/generate_stream", {
        "model_id": "qwen2", "scenario": "chat",
        "messages": [{"role": "user", "content": question}],
        "parameters": {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9}}))
    final = events[-1]
    assert stat(answer, "input") == str(final["input_tokens"])
    assert stat(answer, "output") == str(final["tokens"])
    assert stat(answer, "finish") == "end of answer"
    assert re.fullmatch(r"\d+ ms", stat(answer, "ttft"))
    assert float(stat(answer, "rate")) > 0

    # A second turn carries the first: the prompt the backend got has both.
    send(page, "Say that again please")
    second = wait_answer(page, 1)
    assert second.locator(".text").inner_text() == "Say that again please"
    prompt = clean.doubles["qwen2"].stats()["last_request"]["body"]["inputs"]
    assert question in prompt and "Say that again please" in prompt
    assert prompt.count(question) == 2  # the user's turn and the answer's echo of it
    assert console.unexpected() == []


def test_two_models_side_by_side(clean: Mesh, open_page: Any) -> None:
    page, console = open_page()
    wait_models(page)
    page.select_option("#compare", "llama3")
    assert page.locator(".pane h2").all_inner_texts() == [
        "qwen2 · Qwen2-7B-Instruct-GPTQ-Int4", "llama3 · Llama-3.1-8B-Instruct-GPTQ-INT4"]
    question = "Explain in one sentence what a service mesh does for its clients."
    send(page, question)
    for pane in (0, 1):
        answer = wait_answer(page, 0, pane)
        assert answer.locator(".text").inner_text() == question
        assert stat(answer, "finish") == "end of answer"
    for double in clean.doubles.values():
        assert double.stats()["generations_started"] == 1
    assert console.unexpected() == []


def test_stop_ends_the_generation_in_the_backend(clean: Mesh, open_page: Any) -> None:
    double = clean.doubles["qwen2"]
    double.control(reply=" ".join(f"word{i}" for i in range(500)), token_delay=0.1)
    before = double.stats()
    page, console = open_page()
    wait_models(page)
    page.fill("#max_new_tokens", "1000")
    send(page, "Tell me a long story")
    until(page, "document.querySelector('.msg.assistant .text').textContent.split(' ').length >= 5")
    assert double.stats()["generations_active"] == 1
    page.click("#stop")
    answer = wait_answer(page, 0)
    assert answer.get_attribute("data-state") == "stopped"
    assert stat(answer, "finish") == "stopped"
    words = len(answer.locator(".text").inner_text().split())
    assert 5 <= words < 500

    def stopped() -> bool:
        stats = double.stats()
        return bool(stats["generations_active"] == 0
                    and stats["generations_cancelled"] == before["generations_cancelled"] + 1)

    eventually(stopped, timeout=10)
    assert double.stats()["generations_completed"] == before["generations_completed"]
    time.sleep(0.5)
    assert len(answer.locator(".text").inner_text().split()) == words  # nothing more arrived
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    assert console.unexpected() == []


def test_errors_in_plain_words(clean: Mesh, open_page: Any) -> None:
    page, console = open_page()
    wait_models(page)

    # 400: a bad parameter names the field, by its label.
    page.fill("#top_p", "1")
    send(page, "hello")
    problem = wait_answer(page, 0).locator(".problem").inner_text()
    assert "Top p must be greater than 0 and less than 1" in problem
    assert page.get_attribute("#top_p", "aria-invalid") == "true"
    page.fill("#top_p", "0.9")

    # 404: a model the page listed that the mesh does not serve (any more).
    page.evaluate("""() => {
        const menu = document.querySelector('#model');
        menu.options[0].value = 'retired-model';
        menu.dispatchEvent(new Event('change'));
    }""")
    send(page, "hello")
    problem = wait_answer(page, 1).locator(".problem").inner_text()
    assert "That model is not served here" in problem
    assert "retired-model" in problem and "qwen2" in problem  # the mesh's own message
    until(page, "document.querySelector('#model').value === 'qwen2'")

    # An error inside a stream that has started: under the words that came.
    clean.doubles["qwen2"].control(mode="die_midstream", after_tokens=2)
    send(page, "one two three four five")
    cut = wait_answer(page, 2)
    assert cut.get_attribute("data-state") == "error"
    assert cut.locator(".text").inner_text() == "one two"
    assert "The answer was cut off" in cut.locator(".problem").inner_text()
    assert stat(cut, "finish") == "error"

    # 429: the backend is full; the page says when to retry.
    clean.doubles["qwen2"].control(mode="overloaded")
    send(page, "hello")
    problem = wait_answer(page, 3).locator(".problem").inner_text()
    assert "The model is busy. Retry in 1 s." in problem

    # 503: the model is down, and the menu says so after the error.
    clean.doubles["qwen2"].control(mode="unhealthy")
    eventually(lambda: not next(m for m in models(clean) if m["id"] == "qwen2")["ready"])
    send(page, "hello")
    problem = wait_answer(page, 4).locator(".problem").inner_text()
    assert "This model is down" in problem
    until(page, "document.querySelector('#model-info').textContent.includes('down')")
    assert page.locator("#model option").first.inner_text() == "qwen2 (down)"

    # 413: a text over Envoy's 1 MiB body limit.
    page.fill("#prompt", "word " * 220_000)
    page.press("#prompt", "Enter")
    problem = wait_answer(page, 5).locator(".problem").inner_text()
    assert "The text is too long for the mesh" in problem
    assert console.unexpected(400, 404, 413, 429, 503) == []


def test_keyboard_and_narrow_window(clean: Mesh, open_page: Any) -> None:
    page, console = open_page(NARROW)
    wait_models(page)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((el) => !el.labels || el.labels.length === 0).map((el) => el.id)""")
    assert unlabelled == []
    assert all(b.strip() for b in page.locator("button").all_inner_texts())

    # Tab reaches the controls in reading order, from the top.
    order = []
    for _ in range(14):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    reached = [i for i in ("model", "compare", "scenario", "max_new_tokens", "prompt", "send")
               if i in order]
    assert reached == ["model", "compare", "scenario", "max_new_tokens", "prompt", "send"], order

    # Shift+Enter is a new line, Enter sends.
    page.focus("#prompt")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#prompt") == "first line\nsecond line"
    page.keyboard.press("Enter")
    answer = wait_answer(page, 0)
    assert answer.locator(".text").inner_text() == "first line\nsecond line"

    # Esc stops a stream, as the Stop button does.
    clean.doubles["qwen2"].control(reply=" ".join(["more"] * 300), token_delay=0.1)
    send(page, "a long one")
    until(page, "document.querySelector('.msg.assistant[data-state=streaming] .text')"
                "?.textContent.length > 10")
    page.keyboard.press("Escape")
    assert stat(wait_answer(page, 1), "finish") == "stopped"

    # Nothing wider than the window; the buttons within reach.
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    for button in ("#send", "#stop"):
        box = page.locator(button).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= NARROW["width"]
    assert console.unexpected() == []


def test_api_key_kept_for_the_tab_only(secured: Mesh, open_page: Any) -> None:
    page, console = open_page(url=f"{secured.http}/")
    until(page, "document.querySelector('#model-info').textContent.includes('API key')")
    assert page.locator("#key-panel").get_attribute("open") is not None
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    wait_models(page)
    send(page, "hello with a key")
    assert wait_answer(page, 0).locator(".text").inner_text() == "hello with a key"
    assert page.evaluate("sessionStorage.getItem('llmmesh.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    assert KEY not in page.evaluate("document.cookie")
    # A reload in the same tab keeps it; a new tab (context) does not have it.
    page.reload()
    wait_models(page)
    fresh, _ = open_page(url=f"{secured.http}/")
    assert fresh.evaluate("sessionStorage.getItem('llmmesh.apiKey')") is None
    assert console.unexpected(401) == []



@pytest.fixture(scope="module")
def cpu_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make up` as it comes (CPU backends: llama.cpp and SmolLM2), on free ports."""
    pytest.importorskip("llama_cpp", reason="make test installs llama-cpp-python")
    tmp = tmp_path_factory.mktemp("playground-cpu")
    envoy_port = free_port()
    launcher = start(python_module(
        "services.launcher", "--run-dir", str(tmp / "run"),
        "--envoy-port", str(envoy_port), "--admin-port", str(free_port()),
        "--router-port", str(free_port()), "--adapter-port", str(free_run(2)),
        "--backend-port", str(free_run(2)), "--metrics-port", str(free_run(3)),
        "--openai-port", str(free_port()), "--no-prometheus",
    ), log_path=tmp / "launcher.log")
    try:
        wait_launcher(tmp / "launcher.log", launcher, 300)
        yield f"http://127.0.0.1:{envoy_port}"
    finally:
        stop_launcher(launcher)


def test_a_real_model_side_by_side(cpu_mesh: str, open_page: Any) -> None:
    page, console = open_page(url=f"{cpu_mesh}/")
    wait_models(page)
    assert "backend SmolLM2-135M-Instruct" in page.locator("#model-info").inner_text()
    page.select_option("#compare", "llama3")
    page.fill("#max_new_tokens", "48")
    record_growth(page)
    send(page, "Name three colors and say one thing about each.")
    for pane in (0, 1):
        answer = wait_answer(page, 0, pane)
        assert answer.get_attribute("data-state") == "done"
        assert answer.locator(".text").inner_text().strip()
        assert 0 < int(stat(answer, "output")) <= 48
        assert int(stat(answer, "input")) > 0
        assert stat(answer, "finish") in ("length limit", "end of answer")
    growth = page.evaluate("window.growth")
    assert len(set(growth)) >= 3, growth
    assert console.unexpected() == []
    if os.environ.get("LLMMESH_UPDATE_SCREENSHOT") == "1":
        page.locator("#prompt").blur()
        bottom = page.evaluate("""() => Math.max(...['.settings', '.composer'].map(
            (s) => document.querySelector(s).getBoundingClientRect().bottom))""")
        SCREENSHOT.write_bytes(page.screenshot(
            clip={"x": 0, "y": 0, "width": WIDE["width"], "height": bottom + 16}))
