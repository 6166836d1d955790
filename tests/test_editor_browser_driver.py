"""The browser driver of benchmarks/editor_browser.py on the current editor: it serves it, reads the prediction,
moves a concept slider, filters by class and stops the server with its log kept."""

from pathlib import Path

import pytest

from benchmarks.editor_browser import (
    REPO_ROOT,
    browser_missing,
    chromium,
    editor_page,
    image_captions,
    input_to_settled,
    line_with,
    main_text,
    move_slider,
    new_tab,
    runs_finished,
    select_sidebar_option,
    serve_editor,
    sidebar_options,
    slider_labels,
    wait_for_rerun,
    wait_idle,
    wait_thumbnails_of,
)
from test_app import setup  # noqa: F401  (the shared tiny model + image folder fixture)

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


@pytest.fixture(scope="module")
def served(setup):  # noqa: F811
    with serve_editor(setup["model"], setup["data"], cache_dir=setup["cache"]) as editor:
        yield editor
    assert editor.process.returncode is not None  # stopped, its log kept
    assert f"concept editor on {editor.url}" in editor.log
    assert isinstance(editor.deprecations(), list)


def test_the_served_editor_is_this_checkouts(served):
    assert served.url.startswith("http://127.0.0.1:")
    assert served.script == str(REPO_ROOT / "app" / "editor.py")
    assert Path(f"/proc/{served.process.pid}/cwd").resolve() == REPO_ROOT  # the server imports this checkout


def test_the_driver_reads_the_prediction_and_moves_a_slider(served):
    with chromium() as browser, editor_page(served.url, browser=browser) as page:
        assert "Prediction:" in main_text(page)
        assert line_with(page, "New prediction") is None
        concepts = slider_labels(page)
        assert concepts and set(concepts) <= {"reddish", "greenish", "bluish", "bright", "square"}
        before = runs_finished(page)
        move_slider(page, concepts[0], to="end")
        wait_for_rerun(page, before)
        wait_idle(page, "New prediction")
        assert line_with(page, "New prediction").startswith("New prediction:")

        other = new_tab(page, same_context=False)  # a new browser session starts from the sample's own values
        try:
            assert line_with(other, "New prediction") is None
        finally:
            other.close()


def test_the_driver_filters_by_class(served):
    with editor_page(served.url) as page:
        assert set(sidebar_options(page, "True class")) == {"all", "red", "green", "blue"}
        select_sidebar_option(page, "True class", "green")
        wait_thumbnails_of(page, "green", timeout_ms=30_000)  # a fragment run may be too quick for the run counter
        wait_idle(page, "Prediction:")
        captions = image_captions(page)
        assert captions and all("green" in caption for caption in captions), captions
        assert len(captions) == 8  # the tiny data's green images: one page of thumbnails
        assert input_to_settled(page) < 60  # the page clock reads the last input and the page's last change
