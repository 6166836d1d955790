"""The concept editor in a real browser (headless Debian Chromium through Playwright), used as a person would:
move sliders, reset, search, open a thumbnail, prune, open a second tab, reload, and check the numbers on
screen against the model's own. Skipped with a reason where Chromium or Playwright is missing."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.editor_browser import (SIDEBAR, browser_missing, chromium, editor_page, image_captions, line_with,
                                       main_slider, main_text, move_slider, new_tab, open_editor, runs_finished,
                                       select_sidebar_option, serve_editor, slider_labels, wait_for_rerun, wait_idle,
                                       wait_thumbnails_of)
from cbm.backbones import load_backbone
from cbm.data.folders import ImageFolder
from cbm.embed import embed
from cbm.models import load
from test_app import setup  # noqa: F401  (the shared tiny model + image folder fixture)

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


@pytest.fixture(scope="module")
def served(setup):  # noqa: F811
    with serve_editor(setup["model"], setup["data"], cache_dir=setup["cache"]) as editor:
        yield editor


@pytest.fixture(scope="module")
def browser():
    with chromium() as own:
        yield own


@pytest.fixture
def page(served, browser):
    with editor_page(served.url, browser=browser) as fresh:
        ready(fresh)
        yield fresh


def ready(page) -> None:
    """Wait until the first run has drawn the whole page: the prediction shows before the sliders, and the browser
    may still be adding sliders when the script run is over, so wait until their count holds for 0.3 s."""
    sliders = page.locator('[data-testid="stMain"]').get_by_role("slider")
    sliders.first.wait_for()
    wait_idle(page)
    count, steady = sliders.count(), 0
    for _ in range(100):  # at most ~10 s
        page.wait_for_timeout(100)
        now = sliders.count()
        steady, count = (steady + 1 if now == count else 0), now
        if steady == 3:
            break


def act(page, action) -> None:
    """Do ``action`` and wait for the rerun it causes to finish."""
    before = runs_finished(page)
    action()
    wait_for_rerun(page, before)
    wait_idle(page)


def value(page, concept: str) -> float:
    return float(main_slider(page, concept).input_value())


def click(page, name: str, scope: str = '[data-testid="stMain"]') -> None:
    act(page, lambda: page.locator(scope).get_by_role("button", name=name, exact=True).first.click())


def shown_sample(page) -> str:
    """The id of the sample on show."""
    return line_with(page, "sample: ").split("sample: ", 1)[1].strip()


def metric(page) -> str:
    return page.locator(SIDEBAR).locator('[data-testid="stMetricValue"]').first.inner_text().strip()


def test_a_slider_shows_the_models_intervened_prediction(page, setup):
    model = load(setup["model"])
    sample = shown_sample(page)
    data = load_embeddings(setup)
    features = data.features[data.ids.index(sample):][:1]
    concept = slider_labels(page)[0]
    act(page, lambda: move_slider(page, concept, to="end"))
    expected = torch.softmax(model.intervene(features, {concept: value(page, concept)}), dim=1)[0]
    shown = line_with(page, "New prediction")
    assert shown.startswith(f"New prediction: {model.class_names[int(expected.argmax())]} ({float(expected.max()):.0%})")
    assert "Deploy" not in page.inner_text("body")  # the editor is a local tool: no deploy button


def test_reset_all_resets_the_sliders_and_the_next_move_does_not_bring_them_back(page):
    first, second, third = slider_labels(page)[:3]
    start = {concept: value(page, concept) for concept in (first, second, third)}
    act(page, lambda: move_slider(page, first, to="end"))
    act(page, lambda: move_slider(page, second, to="start"))
    assert line_with(page, "New prediction") is not None
    click(page, "Reset all concepts")
    assert line_with(page, "New prediction") is None
    assert {c: value(page, c) for c in (first, second)} == {c: start[c] for c in (first, second)}
    act(page, lambda: move_slider(page, third, 3))
    assert line_with(page, "New prediction") is not None
    assert {c: value(page, c) for c in (first, second)} == {c: start[c] for c in (first, second)}


def test_searching_concepts_keeps_the_intervention(page):
    concept, other = slider_labels(page)[:2]
    act(page, lambda: move_slider(page, concept, to="end"))
    moved, shown = value(page, concept), line_with(page, "New prediction")
    search = page.get_by_label("Search concepts")
    act(page, lambda: (search.fill(other), search.press("Enter")))
    assert slider_labels(page) == [other] and line_with(page, "New prediction") == shown
    act(page, lambda: (search.fill(""), search.press("Enter")))
    assert value(page, concept) == moved and line_with(page, "New prediction") == shown


def test_a_thumbnail_opens_its_sample_and_browsing_keeps_the_open_one(page):
    opened = shown_sample(page)
    thumbnails = page.locator(SIDEBAR).get_by_role("button", name=re.compile(r"^[0-9]+[.]png$"))  # file names
    button = next(b for b in thumbnails.all() if not opened.endswith("/" + b.inner_text()))
    name = button.inner_text()
    act(page, button.click)
    opened = shown_sample(page)
    assert opened.endswith("/" + name) and f"True class: {opened.split('/')[0]}" in main_text(page)
    other = "red" if opened.startswith("green") else "green"
    select_sidebar_option(page, "True class", other)  # reruns the browser only, too quickly for act's run counter
    wait_thumbnails_of(page, other)
    wait_idle(page)
    assert shown_sample(page) == opened and "does not match these filters" in page.locator(SIDEBAR).inner_text()
    assert image_captions(page) and all(other in caption for caption in image_captions(page))


def test_sessions_are_separate_and_an_edit_updates_every_number_at_once(page, setup, served):
    model, data = load(setup["model"]), load_embeddings(setup)
    on_file = f"{model.score(data):.3f}"
    pruned = f"{model.edit('prune', 'reddish')[0].score(data):.3f}"
    assert metric(page) == on_file
    assert page.get_by_role("button", name="Prune", exact=True).count() == 0  # only the open tab is drawn
    act(page, lambda: page.get_by_role("tab", name="Edit the model").click())  # a switch reruns the page
    assert not page.locator('[data-testid="stMain"]').get_by_role("slider").count()
    click(page, "Prune")
    assert metric(page) == pruned  # in the same run as the edit, not one action later
    assert "Edits in this session: 1" in page.locator(SIDEBAR).inner_text()
    assert "Edits in this model's history: 1" in main_text(page)
    for same_context in (True, False):  # another tab, with the same cookies or as another browser
        other = new_tab(page, same_context=same_context)
        ready(other)
        try:
            assert metric(other) == on_file and "Edits in this session: 0" in other.locator(SIDEBAR).inner_text()
        finally:
            other.close()
    open_editor(page, served.url)  # a reload starts from the file on disk
    ready(page)
    assert metric(page) == on_file
    assert not [line for line in served.deprecations()], served.deprecations()


def load_embeddings(setup):
    """The embeddings the editor shows (from the same cache)."""
    model = load(setup["model"])
    return embed(load_backbone(model.backbone_spec_, device="cpu"), ImageFolder(setup["data"].split(":", 1)[1]),
                 cache_dir=setup["cache"], progress=False, num_workers=0)
