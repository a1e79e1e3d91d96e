"""axiom serve's chat page (GET /) in a real headless Chromium, driven by selenium: a message typed in, the reply
streamed in steps from /v1/chat/completions, Stop pressed mid-stream, and the server healthy afterwards; for a
model that is not chat-tuned, the page continues the typed text through /v1/completions.

Needs Debian's chromium and chromium-driver (`make browser` installs them where apt-get runs as root) and the
selenium package (the dev extra); skipped, saying which is missing, without them. The driver is
/usr/bin/chromedriver: selenium never downloads one."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import MICRO, Server

from axiom.config import get_config
from axiom.model.transformer import Axiom

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
DRIVER = "/usr/bin/chromedriver"
if not Path(DRIVER).is_file() or shutil.which("chromium") is None:
    pytest.skip("chromium and chromium-driver are not installed (make browser)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """axiom serve on a random micro model saved twice, as a base model and as a chat-tuned one; the two servers
    start at once (each takes seconds to import torch and load)."""
    import torch
    from conftest import save_model

    cfg = get_config("tiny", [*MICRO, "tie_embeddings=false"])
    torch.manual_seed(0)
    model = Axiom(cfg.model)
    base, chat = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("chat")
    for path in (base, chat):
        save_model(model, cfg, path, step=0)
    meta = json.loads((chat / "config.json").read_text())
    (chat / "config.json").write_text(json.dumps({**meta, "chat_template": "chatml"}))
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda p: Server(p, tmp_path_factory.mktemp("log") / "stderr.txt"), (base, chat)))
    yield dict(zip(("base", "chat"), started, strict=True))
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    flags = "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-background-networking"
    flags += " --disable-component-update --disable-sync --no-first-run --window-size=1000,800"
    for flag in flags.split():
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_page(browser, server: Server) -> WebDriverWait:
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait = WebDriverWait(browser, 20, poll_frequency=0.02)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    return wait


def send(browser, text: str, max_tokens: int, temperature: float) -> None:
    for field, value in (("max-tokens", max_tokens), ("temperature", temperature)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "input").send_keys(text)
    browser.find_element(By.ID, "send").click()


def reply_text(browser) -> str:
    """The text of the newest reply, without its note."""
    return browser.execute_script(
        "const r = [...document.querySelectorAll('.msg.assistant')].pop();"
        "return r ? [...r.childNodes].filter(n => !n.classList || !n.classList.contains('note'))"
        ".map(n => n.textContent).join('') : null;"
    )


def test_a_reply_streams_in_steps_and_stop_ends_it(browser, servers):
    server = servers["chat"]
    wait = open_page(browser, server)
    assert browser.find_element(By.ID, "model").text == server.name
    assert browser.find_element(By.ID, "mode").text == "chat"
    send(browser, "Hello!", max_tokens=4000, temperature=1)
    seen = set()
    deadline = time.monotonic() + 20
    while len(seen) < 3:  # three different lengths: tokens arrive in steps, not in one piece at the end
        assert time.monotonic() < deadline, seen
        if text := reply_text(browser):
            seen.add(len(text))
        time.sleep(0.02)
    assert server.http("GET", "/health")[1]["running"] == 1
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text == "stopped")
    stopped_at = reply_text(browser)
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .note").text
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    # the server cancelled the request and frees its slot; the page shows no more text
    deadline = time.monotonic() + 10
    while server.http("GET", "/health")[1]["accepted"]:
        assert time.monotonic() < deadline, "the stopped request still holds its slot"
        time.sleep(0.05)
    time.sleep(0.3)
    assert reply_text(browser) == stopped_at
    assert "cancelled after" in server.log.read_text()
    # a second message in the same conversation streams to its end
    send(browser, "And then?", max_tokens=5, temperature=0)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.error") == []


def test_a_model_that_is_not_chat_tuned_continues_the_typed_text(browser, servers):
    server = servers["base"]
    wait = open_page(browser, server)
    assert "not chat-tuned" in browser.find_element(By.ID, "mode").text
    send(browser, "Hello world", max_tokens=12, temperature=0)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    expected = (
        server.client.completions.create(model=server.name, prompt="Hello world", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    assert reply_text(browser) == "Hello world" + expected
    # an error from the server is shown, not swallowed
    browser.execute_script("document.getElementById('input').value = arguments[0]", "word " * 5000)
    send(browser, "", max_tokens=5, temperature=0)  # a prompt longer than the context
    wait.until(lambda b: b.find_element(By.ID, "status").text == "error")
    assert "context" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
    # a value the box does not accept is said, and nothing is sent
    replies = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    send(browser, "Hello", max_tokens=5, temperature=-1)
    wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("temperature: not a number it accepts"))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == replies
    assert browser.find_element(By.ID, "input").get_property("value") == "Hello"  # kept, to send once corrected
    browser.find_element(By.ID, "input").clear()
    # a temperature between the box's arrow steps is a temperature
    send(browser, "Hello", max_tokens=3, temperature=0.05)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    browser.find_element(By.ID, "input").clear()
    # an emptied box leaves its field out: the server's default (OpenAI's 16 tokens), not one token
    send(browser, "Hello", max_tokens="", temperature=0)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    default = server.client.completions.create(model=server.name, prompt="Hello", temperature=0).choices[0].text
    assert reply_text(browser) == "Hello" + default


def test_a_failed_model_list_and_a_stream_cut_short_are_said(browser, servers):
    """The page says what went wrong where the server fails its /v1/models, and where a stream ends without its
    [DONE] (a proxy or the server cut it): the text so far stays, marked as an error, not as a whole reply."""
    server = servers["base"]
    failing = """const real = window.fetch;
window.fetch = (path, ...rest) => String(path).endsWith("v1/models")
  ? Promise.resolve(new Response('{"error": {"message": "no model (simulated)"}}', {status: 500}))
  : real(path, ...rest);"""
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": failing})
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(browser, 20, poll_frequency=0.02)
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("cannot reach"))
        assert browser.find_element(By.ID, "status").text == "cannot reach the server: Error: no model (simulated)"
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
    wait = open_page(browser, server)
    browser.execute_script(  # one event of the stream, then its end: no [DONE]
        """window.fetch = () => Promise.resolve(new Response(new ReadableStream({start(c) {
  c.enqueue(new TextEncoder().encode('data: {"choices": [{"text": " cut", "finish_reason": null}]}\\n\\n'));
  c.close();
}})));"""
    )
    send(browser, "Hello", max_tokens=5, temperature=0)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "error")
    assert reply_text(browser) == "Hello cut"
    note = browser.find_elements(By.CSS_SELECTOR, ".msg.error .note")[-1].text
    assert note == "error: the stream ended before the server finished it"
