"""Drive the concept editor in a real browser: serve ``cbm app`` on a free localhost port and open it in headless
Debian Chromium through Playwright. Shared by the browser tests and ``benchmarks/bench_editor.py --browser``.

The selectors rely only on what every version of the editor shows: the texts "Prediction:" and "New prediction",
concept sliders in the main area labelled by the concept's name, sidebar selectboxes by label, and Streamlit's own
running indicator (``[data-testid="stStatusWidget"]``) and script state (``data-test-script-state`` on the app).

    with serve_editor("model.cbm", "toy:images@val") as served, editor_page(served.url) as page:
        move_slider(page, "red", 5)
        wait_idle(page, "New prediction")
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
#: Flags that let Chromium run as root in a container without reaching out to any network service.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 1600}
REPO_ROOT = Path(__file__).resolve().parents[1]
#: How long to wait for a render or a rerun by default (the first render embeds the data on a loaded machine).
TIMEOUT_MS = 300_000

MAIN = '[data-testid="stMain"]'
SIDEBAR = '[data-testid="stSidebar"]'
STATUS_WIDGET = '[data-testid="stStatusWidget"]'
APP = '[data-testid="stApp"]'
SELECTBOX = '[data-testid="stSelectbox"]'
SLIDER = '[data-testid="stSlider"]'
WIDGET_LABEL = '[data-testid="stWidgetLabel"]'
OPTION = '[role="option"]'

# Counts the script runs the page has finished (``data-test-script-state`` leaving "running"), so that an action
# can wait for the rerun it caused even when the run is too quick for the running indicator to show.
_RUN_COUNTER = """() => {
  if (window.__cbmRuns !== undefined) return;
  window.__cbmRuns = 0;
  let running = false;
  const check = () => {
    const app = document.querySelector('[data-testid="stApp"]');
    const state = app ? app.getAttribute('data-test-script-state') : null;
    if (state === 'running') running = true;
    else if (running) { running = false; window.__cbmRuns += 1; }
  };
  new MutationObserver(check).observe(document.body, {attributes: true, subtree: true,
                                                      attributeFilter: ['data-test-script-state']});
  check();
  // the page's own clock: the last user input (a key or a click) and the last change of the page after it
  window.__cbmInput = window.__cbmChanged = performance.now();
  const input = () => { window.__cbmInput = window.__cbmChanged = performance.now(); };
  document.addEventListener('keydown', input, true);
  document.addEventListener('click', input, true);
  new MutationObserver(() => { window.__cbmChanged = performance.now(); }).observe(document.body,
      {attributes: true, childList: true, characterData: true, subtree: true});
}"""


def browser_missing() -> str | None:
    """Why the browser driver cannot run here (Debian's Chromium or Python playwright absent), else None."""
    if not os.path.exists(CHROMIUM):
        return f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright is not installed (pip install playwright; its own browsers are not needed)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServedEditor:
    """A running editor: its URL, the editor script of the checkout it serves and, once it stopped, its whole log."""

    url: str
    process: subprocess.Popen
    log_path: Path
    script: str
    log: str = ""
    startup: float = 0.0  # seconds from the command's start until the server answered

    def read_log(self) -> str:
        """The server's output so far (stdout and stderr together)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else self.log

    def deprecations(self) -> list[str]:
        """The lines of the server log that mention a deprecation (Streamlit warns of deprecated calls there)."""
        return [line for line in self.read_log().splitlines() if "deprecat" in line.lower()]


@contextmanager
def serve_editor(model: str | Path, data: str | None = None, *, cache_dir: str | Path | None = None,
                 source_root: str | Path | None = None, startup_timeout: float = 180.0) -> Iterator[ServedEditor]:
    """Serve ``python -m cbm.cli app MODEL --data DATA --port FREE`` on 127.0.0.1 and yield it once
    ``/_stcore/health`` answers; terminate it on exit and keep its log in ``.log``.

    ``cache_dir`` becomes ``CBM_CACHE_DIR``; HOME is a fresh temporary folder. ``source_root`` serves the toolkit
    from another checkout (e.g. a ``git worktree`` of an older commit): it is the working directory and the head
    of PYTHONPATH, so its ``cbm`` and ``app`` are imported instead of this one's.
    """
    root = Path(source_root or REPO_ROOT).resolve()
    with tempfile.TemporaryDirectory(prefix="cbm-editor-") as home:
        port = free_port()
        env = {**os.environ, "HOME": home, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if cache_dir is not None:
            env["CBM_CACHE_DIR"] = str(cache_dir)
        command = [sys.executable, "-m", "cbm.cli", "app", str(model), "--port", str(port)]
        if data:
            command += ["--data", data]
        log_path = Path(home) / "server.log"
        with open(log_path, "wb") as log:
            launched = time.perf_counter()
            process = subprocess.Popen(command, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        served = ServedEditor(f"http://127.0.0.1:{port}", process, log_path, str(root / "app" / "editor.py"))
        try:
            _wait_healthy(served, startup_timeout)
            served.startup = time.perf_counter() - launched
            logger.info("editor %s serving %s", served.url, served.script)
            yield served
        finally:
            _stop(process)
            served.log = served.read_log()


def _wait_healthy(served: ServedEditor, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"the editor exited with {served.process.returncode}:\n{served.read_log()}")
        try:
            if urllib.request.urlopen(f"{served.url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the editor did not answer within {timeout:.0f} s:\n{served.read_log()}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian Chromium driven by Playwright (never Playwright's downloaded browsers)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def editor_page(url: str, *, browser: Any = None, wait_text: str | None = "Prediction:",
                timeout_ms: float = TIMEOUT_MS) -> Iterator[Any]:
    """A Playwright page of the editor at ``url`` in a fresh browser context (a new Streamlit session), after its
    first render (``wait_text`` visible and the app idle). Launches its own Chromium unless ``browser`` is given."""
    if browser is None:
        with chromium() as own:
            with editor_page(url, browser=own, wait_text=wait_text, timeout_ms=timeout_ms) as page:
                yield page
        return
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        open_editor(page, url, wait_text, timeout_ms)
        yield page
    finally:
        context.close()


def open_editor(page: Any, url: str, wait_text: str | None = "Prediction:", timeout_ms: float = TIMEOUT_MS) -> None:
    """Load the editor in ``page`` and wait for its first render."""
    page.goto(url)
    page.evaluate(_RUN_COUNTER)
    wait_idle(page, wait_text, timeout_ms)


def new_tab(page: Any, url: str | None = None, *, same_context: bool = True,
            wait_text: str | None = "Prediction:", timeout_ms: float = TIMEOUT_MS) -> Any:
    """A second tab on the editor: in ``page``'s browser context (same cookies) or in a new one (a new browser
    session); it opens ``url`` (default: ``page``'s) and waits for the first render. The caller closes it."""
    context = page.context if same_context else page.context.browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    open_editor(tab, url or page.url, wait_text, timeout_ms)
    return tab


def runs_finished(page: Any) -> int:
    """How many script runs the page has finished since it was opened."""
    return int(page.evaluate("() => window.__cbmRuns ?? 0"))


def wait_for_rerun(page: Any, finished_before: int, timeout_ms: float = TIMEOUT_MS) -> None:
    """Wait until a script run started after ``runs_finished(page)`` returned ``finished_before`` has finished."""
    page.wait_for_function(f"() => (window.__cbmRuns ?? 0) > {finished_before}", timeout=timeout_ms, polling=20)


def input_to_settled(page: Any, quiet_ms: float = 250, timeout_ms: float = TIMEOUT_MS) -> float:
    """Seconds from the last user input to the last change of the page after it, in the page's own clock, once the
    script is idle and the page has not changed for ``quiet_ms``: how long the person waits for the update,
    without the polling of the driver."""
    wait_idle(page, timeout_ms=timeout_ms)
    page.wait_for_function(f"() => performance.now() - window.__cbmChanged > {quiet_ms}", timeout=timeout_ms,
                           polling=20)
    return float(page.evaluate("() => (window.__cbmChanged - window.__cbmInput) / 1000"))


def wait_idle(page: Any, text: str | None = None, timeout_ms: float = TIMEOUT_MS) -> None:
    """Wait until the app is idle (the running indicator gone and the script not running) and, if given, until
    ``text`` is visible."""
    page.locator(STATUS_WIDGET).wait_for(state="detached", timeout=timeout_ms)
    page.wait_for_function(f"() => document.querySelector('{APP}')?.getAttribute('data-test-script-state') "
                           "!== 'running'", timeout=timeout_ms, polling=20)
    if text:
        wait_text(page, text, timeout_ms)


def wait_text(page: Any, text: str, timeout_ms: float = TIMEOUT_MS) -> None:
    """Wait until ``text`` is visible somewhere on the page."""
    page.get_by_text(text).first.wait_for(state="visible", timeout=timeout_ms)


def main_slider(page: Any, concept: str) -> Any:
    """The thumb (the element with the slider role, an ``input type=range``) of the main area's slider whose
    label shows ``concept`` (not the sidebar's filters). Matched on the label as rendered, so an editor that
    escapes markdown in labels and one that does not are driven alike."""
    label = page.locator(WIDGET_LABEL).get_by_text(concept, exact=True)
    return page.locator(MAIN).locator(SLIDER).filter(has=label).get_by_role("slider").first


def slider_labels(page: Any, timeout_ms: float = 30_000) -> list[str]:
    """The labels of the main area's sliders as shown (the concept names), top to bottom; waits up to
    ``timeout_ms`` for the first one."""
    sliders = page.locator(MAIN).locator(SLIDER)
    sliders.first.wait_for(timeout=timeout_ms)
    labels = sliders.locator(WIDGET_LABEL)
    deadline = time.monotonic() + timeout_ms / 1000
    while labels.count() < sliders.count() and time.monotonic() < deadline:  # a label can render after its slider
        page.wait_for_timeout(50)
    return [text.strip() for text in labels.all_inner_texts()]


def move_slider(page: Any, concept: str, steps: int = 0, *, to: str | None = None) -> None:
    """Move the main-area slider ``concept`` with the keyboard: ``steps`` ArrowRight presses (ArrowLeft when
    negative), or ``to="start"``/``"end"`` (Home/End). Does not wait for the rerun (see ``wait_for_rerun``)."""
    main_slider(page, concept).focus()
    if to is not None:
        page.keyboard.press({"start": "Home", "end": "End"}[to])
    for _ in range(abs(steps)):
        page.keyboard.press("ArrowRight" if steps > 0 else "ArrowLeft")


def main_text(page: Any) -> str:
    """All visible text of the main area."""
    return page.locator(MAIN).inner_text()


def line_with(page: Any, text: str) -> str | None:
    """The first line of the main area's text that contains ``text`` (e.g. the "New prediction" line)."""
    return next((line for line in main_text(page).splitlines() if text in line), None)


def select_sidebar_option(page: Any, label: str, option: str, timeout_ms: float = 30_000) -> None:
    """Pick ``option`` in the sidebar selectbox labelled ``label``. Does not wait for the rerun."""
    box = page.locator(SIDEBAR).locator(SELECTBOX).filter(has=page.get_by_text(label, exact=True)).first
    box.get_by_role("combobox").click()
    page.locator(OPTION).filter(has_text=option).get_by_text(option, exact=True).first.click(timeout=timeout_ms)


def sidebar_options(page: Any, label: str) -> list[str]:
    """The options of the sidebar selectbox labelled ``label`` (opens and closes its list)."""
    box = page.locator(SIDEBAR).locator(SELECTBOX).filter(has=page.get_by_text(label, exact=True)).first
    box.get_by_role("combobox").click()
    page.locator(OPTION).first.wait_for()
    options = [text.strip() for text in page.locator(OPTION).all_inner_texts()]
    page.keyboard.press("Escape")
    return options


def wait_thumbnails_of(page: Any, class_name: str, timeout_ms: float = TIMEOUT_MS) -> None:
    """Wait until the sample browser shows thumbnails and every caption names ``class_name`` (as the prediction or
    as the true class): the grid of a "True class" filter. A quick fragment run may never show the "running"
    state that ``runs_finished`` counts, so this waits for what is drawn instead."""
    page.wait_for_function("""(name) => {
      const captions = [...document.querySelectorAll('[data-testid="stSidebar"] [data-testid="stImageCaption"]')];
      return captions.length > 0 && captions.every(c => c.innerText.includes(name));
    }""", arg=class_name, timeout=timeout_ms, polling=20)


def image_captions(page: Any) -> list[str]:
    """The captions of the sample browser's thumbnails (in the sidebar), in page order."""
    return [text.strip() for text in page.locator(SIDEBAR).locator('[data-testid="stImageCaption"]').all_inner_texts()]
