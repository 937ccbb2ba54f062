"""Takes docs/img/chat-ui.png: starts `qwenkit serve` on the default model, asks the chat page one
coding question (greedy) in headless Chromium, and saves the page once the answer is done.

    python scripts/chat_ui_screenshot.py [--model M] [--out docs/img/chat-ui.png]

Needs the dev extra (playwright) and a chromium on PATH (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Write a Python function that returns the n-th Fibonacci number, with a short explanation."


def serve(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenkit.cli", "serve", "--model", model, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
        if "serving on" in line:
            return proc
    sys.exit("qwenkit serve exited before serving")


def screenshot(url: str, out: Path, max_tokens: int) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        # bypass_csp: the scroll below is evaluated as a string, which the page's CSP forbids
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
        for _ in range(100):  # uvicorn may take a moment after the banner
            try:
                page.goto(url)
                break
            except Exception:
                time.sleep(0.2)
        page.locator("#settings summary").click()
        page.locator("#temperature").fill("0")
        page.locator("#max_tokens").fill(str(max_tokens))
        page.locator("#system").fill("You are a helpful coding assistant.")
        page.locator("#prompt").fill(QUESTION)
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-state=busy]", state="attached")
        page.wait_for_selector("body[data-state=idle]", state="attached", timeout=600_000)
        page.wait_for_timeout(500)  # the final markdown render
        page.locator("#messages").evaluate("box => { box.scrollTop = 0; }")  # the question in view
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    args.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img" / "chat-ui.png")
    args.add_argument("--max-tokens", type=int, default=480)
    a = args.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = serve(a.model, port)
    try:
        screenshot(f"http://127.0.0.1:{port}/", a.out, a.max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
