"""The concept editor in a real browser: `cbm app` on a free localhost port, driven by headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from test_app import setup  # noqa: F401  (the shared tiny model + image folder fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed "
                                "(.ci/run installs it: apt-get install -y chromium)")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_app(setup, tmp_path):  # noqa: F811
    port = free_port()
    env = {**os.environ, "CBM_CACHE_DIR": str(setup["cache"]), "HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "cbm.cli", "app", str(setup["model"]), "--data", setup["data"],
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the editor did not start: " + process.stdout.read1().decode(errors="replace"))
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_editor_renders_and_a_slider_changes_the_prediction(served_app, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(served_app)
            page.get_by_text("Prediction:").first.wait_for(timeout=90_000)  # rendered, not the loading skeleton
            assert page.get_by_text("New prediction").count() == 0
            slider = page.locator("[data-testid='stMain']").get_by_role("slider").first  # not the sidebar's filters
            slider.focus()
            for _ in range(60):
                page.keyboard.press("ArrowRight")
            page.get_by_text("New prediction").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "editor.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "editor.png").stat().st_size > 10_000
    assert all(url.startswith(served_app) or url.startswith("data:") for url in requests), requests
