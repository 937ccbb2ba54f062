"""The chat page at / of `qwenkit serve`, driven in headless Chromium (Playwright on the system's
chromium) against a real `qwenkit serve` subprocess on a tiny random checkpoint: key prompt,
typing, a streamed answer equal to the API's, stop (the server aborts the request and frees its
KV blocks), reload keeps the history, no request leaves the server's origin. Thinking and tool
calls come from the scripted model of test_server, served in-process."""

from __future__ import annotations

import json
import shutil
from urllib.parse import urlsplit

import pytest

from test_server import THINK_ASK, TOOL_ASK, VOCAB, WEATHER, write_tokenizer
from test_server_cli import free_port, served_process
from tiny import make_checkpoint

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")
pytest.importorskip("uvicorn")

KEY = "s3cret"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`qwenkit serve --api-key` on a tiny checkpoint whose special tokens never win a greedy
    step (their lm_head rows are zero), so a greedy answer runs to max_tokens (~500 tokens/s)."""
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen", vocab_size=VOCAB, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, eos_token_id=258,
                           max_position_embeddings=32768)
    weights = load_file(ckpt / "model.safetensors")
    weights["lm_head.weight"][256:] = 0
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(ckpt)
    port = free_port()
    with served_process(ckpt, port, "--api-key", KEY, "--kv-cache-memory", "16MiB") as banner:
        yield f"http://127.0.0.1:{port}", banner


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page test needs playwright (the dev extra)")
    if CHROMIUM is None:
        pytest.skip("the chat page test needs a chromium binary on PATH (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def metrics(url: str) -> dict[str, float]:
    from qwenkit.server import metrics as m

    return m.parse(httpx.get(url + "/metrics").text)


def wait_idle(url: str, timeout: float = 20) -> dict[str, float]:
    import time

    deadline = time.time() + timeout
    while (m := metrics(url))["qwenkit_kv_blocks_used"] or m["qwenkit_requests_running"]:
        assert time.time() < deadline, f"the server did not go idle: {m}"
        time.sleep(0.05)
    return m


def open_page(browser, url: str, key: str | None = KEY):
    """A new page at url with its requests recorded; the key typed into the page's prompt."""
    # Playwright's waits evaluate strings, which the page's own CSP forbids; the recorded
    # requests still prove the page asks nothing of other hosts.
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(url + "/")
    if key:
        page.locator("#key").fill(key)
        page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#model').value !== ''")
    return page


def settings(page, **values) -> None:
    page.locator("#settings summary").click()
    for name, value in values.items():
        page.locator(f"#{name}").fill(str(value))
    page.locator("#settings summary").click()


def ask(page, text: str) -> None:
    """Types text and presses Enter; returns once the page shows the reply's box (a short reply
    may already be done)."""
    replies = page.locator(".msg.assistant").count()
    page.locator("#prompt").fill(text)
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {replies}")


def stored_chat(page) -> dict:
    return page.evaluate("JSON.parse(localStorage['qwenkit.chats'])[localStorage['qwenkit.current']]")


def test_page_is_served_without_the_key_but_no_data(served):
    url, banner = served
    assert f"chat page at {url}/" in banner
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert all(httpx.get(url + f"/ui/{f}").status_code == 200 for f in ("app.js", "app.css", "highlight.css"))
    assert httpx.post(url + "/ui/render", json={"texts": ["x"]}).status_code == 401
    r = httpx.post(url + "/ui/render", json={"texts": ["*a* <b>", "```python\nx = 1\n```"]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["html"][0] == "<p><em>a</em> &lt;b&gt;</p>\n" and '<span class="n">x</span>' in r.json()["html"][1]
    bad = httpx.post(url + "/ui/render", json={"texts": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "texts"


def test_type_stream_stop_and_reload_keep_the_history(served, browser):
    url, _ = served
    page = open_page(browser, url)
    settings(page, temperature=0, max_tokens=24, system="You are terse.")
    ask(page, "Hello there")
    page.wait_for_selector("body[data-state=idle]")
    first = stored_chat(page)["messages"][1]["content"]
    api = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="tiny-qwen", max_tokens=24, temperature=0, messages=[
            {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}])
    assert first == api.choices[0].message.content and api.choices[0].finish_reason == "length"

    before = wait_idle(url)
    settings(page, max_tokens=30000)  # a minute of tokens: stopped long before the end
    ask(page, "Tell me more")
    # text shows while the request still runs: it streams
    page.wait_for_function("document.querySelectorAll('.msg.assistant .md')[1].textContent.length > 0 "
                           "&& document.body.dataset.state === 'busy'")
    assert metrics(url)["qwenkit_requests_running"] == 1
    page.locator("#stop").click()
    page.wait_for_selector("body[data-state=idle]")
    after = wait_idle(url)
    assert after["qwenkit_requests_aborted_total"] == before["qwenkit_requests_aborted_total"] + 1
    assert after["qwenkit_kv_blocks_free"] == before["qwenkit_kv_blocks_free"]
    stopped = stored_chat(page)["messages"][3]
    assert stopped["note"] == "stopped" and 0 < len(stopped["content"])

    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg.assistant .md p').length === 2")
    texts = page.locator(".msg").all_inner_texts()
    assert texts[0] == "Hello there" and texts[2] == "Tell me more" and "stopped" in texts[3]
    assert stored_chat(page)["messages"][1]["content"] == first
    origins = {urlsplit(u)[:2] for u in page.requested if not u.startswith("data:")}
    assert origins == {urlsplit(url)[:2]}, page.requested
    page.close()


def test_a_wrong_key_is_asked_again(served, browser):
    url, _ = served
    page = browser.new_page(bypass_csp=True)
    page.goto(url + "/")
    page.locator("#key").fill("wrong")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#key-error').textContent.includes('refused')")
    assert page.locator("#key-dialog").is_visible()
    page.close()


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    import qwenkit
    from qwenkit.engine import EngineSettings
    from test_server import Server, scripted_model

    tokenizer = qwenkit.load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))
    s = Server(scripted_model(tokenizer), tokenizer, EngineSettings(block_size=8, num_blocks=600))
    yield s
    s.close()


def test_thinking_is_collapsed_and_tool_calls_shown(scripted_server, browser):
    page = open_page(browser, scripted_server.url, key=None)
    ask(page, THINK_ASK[0]["content"])
    page.wait_for_selector("body[data-state=idle]")
    reply = page.locator(".msg.assistant").last
    assert reply.locator("details.thinking").get_attribute("open") is None
    assert not reply.get_by_text("The sky is clear.").is_visible()
    reply.locator("details.thinking summary").click()
    assert reply.get_by_text("The sky is clear.").is_visible()
    assert reply.locator(".md").inner_text().strip() == "Yes, it is sunny."

    page.locator("#new-chat").click()
    settings(page, tools=json.dumps(WEATHER))
    ask(page, TOOL_ASK[0]["content"])
    page.wait_for_selector("body[data-state=idle]")
    assert page.locator(".tool").inner_text() == 'get_weather({"city": "Paris"})'
    settings(page, max_tokens=8, temperature=0)
    ask(page, "Thanks")  # the history now holds the assistant's tool call: the server takes it back
    page.wait_for_selector("body[data-state=idle]")
    assert stored_chat(page)["messages"][-1].get("note", "").startswith("stopped at the token limit")
    page.close()


def test_no_ui_leaves_the_page_out(tmp_path):
    import qwenkit
    from qwenkit.engine import EngineSettings
    from test_engine import tiny_model
    from test_server import Server

    tokenizer = qwenkit.load_tokenizer(write_tokenizer(tmp_path))
    s = Server(tiny_model(vocab_size=VOCAB), tokenizer, EngineSettings(block_size=8, num_blocks=16), ui=False)
    try:
        assert httpx.get(s.url + "/").status_code == 404 and httpx.get(s.url + "/ui/app.js").status_code == 404
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()
