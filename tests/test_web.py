"""The chat page of `razor-gguf serve`, in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by `make setup` when missing) driven by Selenium against a real server on
SmolLM2 with its head map. Screenshots go to pytest's temporary folder (printed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="chromium-driver is not installed")

PAYLOAD = ('look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
           '[x](javascript:window.__pwned=3) **bold** `<b>code</b>`')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(smollm2_razor):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "razor_gguf", "serve", str(smollm2_razor[0]), "--port", str(port),
                             "--ctx", "2048", "--model-alias", "smollm2-razor"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if _get(url + "/v1/models")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read()[-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(a)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        opts.binary_location = chromium
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


def _wait(cond, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _open(browser, url):
    browser.get(url + "/")
    _wait(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), 60, "the page")


def _messages(browser):
    return browser.execute_script(
        "return [...document.querySelectorAll('#messages .message')].map(m => "
        "[m.classList[1], m.querySelector('.content').textContent, m.classList.contains('streaming')])")


def _send(browser, text):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _idle(browser):
    return browser.execute_script("return document.getElementById('stop').hidden")


def test_completions_name_the_alias_not_the_path(server):
    status, out = _get(server + "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200 and out["model"] == "smollm2-razor"
    req = urllib.request.Request(server + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                  "stream": True, "model": "gpt-4"}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        chunks = [json.loads(line[5:]) for line in r.read().decode().splitlines()
                  if line.startswith("data:") and "[DONE]" not in line]
    assert chunks and {c["model"] for c in chunks} == {"smollm2-razor"}


def test_page_is_self_contained_and_locked_down(server):
    with urllib.request.urlopen(server + "/", timeout=30) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "http" not in html.replace('http-equiv', '')  # no CDN, nothing loaded from elsewhere
    for name in ("chat.js", "markdown.js", "chat.css"):
        with urllib.request.urlopen(f"{server}/ui/{name}", timeout=30) as r:
            assert r.status == 200


def test_chat_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # the settings panel starts folded
    assert "razor" in browser.find_element(By.ID, "gauge-text").text
    assert browser.find_element(By.ID, "razor-toggle").is_selected()

    # a streamed reply: seen while it streams, then finished, with its speed in the gauge
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("48")
    _send(browser, "Write one sentence about the sea.")
    _wait(lambda: any(m[2] and m[1] for m in _messages(browser)), what="a partial streamed reply")
    _wait(lambda: _idle(browser), what="the end of the reply")
    msgs = _messages(browser)
    assert [m[0] for m in msgs] == ["user", "assistant"] and len(msgs[1][1]) > 10
    assert "tok/s" in browser.find_element(By.ID, "tps-text").text
    assert "context: " in browser.find_element(By.ID, "ctx-text").text
    browser.save_screenshot(str(tmp_path / "chat.png"))

    # stop mid-stream: the reply ends early and the server answers the next message
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("400")
    _send(browser, "Tell me a long story about a lighthouse keeper.")
    _wait(lambda: any(m[2] and len(m[1]) > 20 for m in _messages(browser)), what="streaming")
    browser.find_element(By.ID, "stop").click()
    _wait(lambda: _idle(browser), 30, "the stop")
    stopped = _messages(browser)[-1][1]
    assert "stopped" in browser.find_element(By.ID, "status").text
    time.sleep(1.0)
    assert _messages(browser)[-1][1] == stopped, "nothing more arrives after Stop"
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("8")
    _send(browser, "Say hi.")
    _wait(lambda: _idle(browser) and len(_messages(browser)) == 6, what="the reply after a stop")
    assert _messages(browser)[-1][1]

    # regenerate replaces the last reply
    n = len(_messages(browser))
    browser.find_element(By.ID, "regenerate").click()
    _wait(lambda: not _idle(browser), 10, "regenerating")
    _wait(lambda: _idle(browser), what="the regenerated reply")
    assert len(_messages(browser)) == n

    # razor off and on again: the model reloads, the conversation stays
    before = _messages(browser)
    browser.find_element(By.ID, "razor-toggle").click()
    _wait(lambda: "full cache" in browser.find_element(By.ID, "gauge-text").text, 120, "razor off")
    assert _messages(browser) == before
    status, stats = _get(server + "/v1/razor/stats")
    assert status == 200 and stats["razor"] is False
    browser.find_element(By.ID, "razor-toggle").click()
    _wait(lambda: "razor" in browser.find_element(By.ID, "gauge-text").text.split("vs")[0]
          and _get(server + "/v1/razor/stats")[1]["razor"], 120, "razor on")

    # the conversation survives a reload of the page (localStorage), and exports as a terminal transcript
    browser.refresh()
    _wait(lambda: browser.execute_script("return document.body.dataset.ready === '1'"), 60, "the page")
    assert _messages(browser) == before
    data = browser.execute_script("return window.razorChat.exportTranscript()")
    from razor_gguf.chat import TRANSCRIPT_FORMAT, parse_transcript

    assert data["format"] == TRANSCRIPT_FORMAT
    system, messages = parse_transcript(data)
    assert [m["content"] for m in messages] == [m[1] for m in before]
    print(f"\nscreenshots in {tmp_path}")


def test_model_output_cannot_inject_html(server, browser, tmp_path):
    """A reply (here imported as a transcript, as /save writes them) and a user message carrying <script>,
    <img onerror> and a javascript: link render as text: no element, no handler, no script run."""
    _open(browser, server)
    transcript = {"format": "razor-gguf-chat/1", "model": "x", "system": None,
                  "messages": [{"role": "user", "content": PAYLOAD},
                               {"role": "assistant", "content": PAYLOAD + "\n```html\n<script>window.__pwned=4</script>\n```"}]}
    assert browser.execute_script("return window.razorChat.importTranscript(arguments[0])", transcript)
    time.sleep(0.5)
    found = browser.execute_script("""
        const m = document.getElementById('messages');
        return {pwned: window.__pwned === undefined ? null : window.__pwned,
                imgs: m.querySelectorAll('img').length, scripts: m.querySelectorAll('script').length,
                links: [...m.querySelectorAll('a')].map(a => a.getAttribute('href')),
                handlers: [...m.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
                strong: m.querySelectorAll('strong').length, pre: m.querySelectorAll('pre').length,
                text: m.textContent};""")
    assert found["pwned"] is None and found["imgs"] == 0 and found["scripts"] == 0 and found["handlers"] == 0
    assert found["links"] == []
    assert '<img src=x onerror="window.__pwned=1">' in found["text"] and "<script>window.__pwned=4</script>" in found["text"]
    assert found["strong"] == 2 and found["pre"] == 1  # the Markdown around it still renders
    # a bad transcript is refused with a message, not imported
    assert not browser.execute_script("return window.razorChat.importTranscript({format: 'nope', messages: 3})")
    browser.save_screenshot(str(tmp_path / "injection.png"))


def test_switch_validates_its_body(server):
    assert _get(server + "/v1/razor/switch", {"razor": "yes"})[0] == 400


def test_chat_web_opens_the_page(smollm2_razor, tmp_path):
    """`razor-gguf chat MODEL --web` serves the page on a free loopback port and hands its URL to the default
    browser (here a $BROWSER script that records it)."""
    seen = tmp_path / "url.txt"
    opener = tmp_path / "open.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" > {seen}\n')
    opener.chmod(0o755)
    env = {**os.environ, "BROWSER": str(opener)}
    env.pop("RAZOR_PORT", None)
    proc = subprocess.Popen([sys.executable, "-m", "razor_gguf", "chat", str(smollm2_razor[0]), "--web", "--ctx", "1024"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: seen.exists() and seen.read_text().strip() or proc.poll() is not None, 120, "the browser call")
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        url = seen.read_text().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert "razor-gguf chat" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
