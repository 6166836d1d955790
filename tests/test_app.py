"""The concept editor under streamlit.testing: opening, intervening, editing, saving, bad uploads."""

import io
import os

import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.session import EditorSession
from cbm.backbones import load_backbone
from cbm.embed import embed
from cbm.data.folders import ImageFolder
from cbm.models import EnergyCBM, PosthocCBM, load
from concepts import ConceptBank
from tiny_models import COLOURS, write_tiny_clip_dir

EDITOR = os.path.join(os.path.dirname(__file__), "..", "app", "editor.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("editor")
    for name, colour in zip(["red", "green", "blue"], COLOURS):
        folder = root / "data" / name
        folder.mkdir(parents=True)
        for i in range(8):
            shade = tuple(min(255, c + 9 * i) for c in colour)
            Image.new("RGB", (40, 40), shade).save(folder / f"{i}.png")
    clip_dir = write_tiny_clip_dir(root / "clip")
    backbone = load_backbone(f"openclip:local-dir:{clip_dir}", device="cpu")
    data = embed(backbone, ImageFolder(root / "data"), cache_dir=root / "cache", progress=False, num_workers=0)
    bank = ConceptBank.from_text(["reddish", "greenish", "bluish", "bright", "square"], backbone)
    model = PosthocCBM(bank, lam=1e-4).fit(data, validation=data)
    path = model.save(root / "model.cbm")
    # the global energy at full weight, so that a corrected concept visibly moves the others
    energy = EnergyCBM(bank=bank, hidden=16, max_epochs=4, inference_steps=60, inference_weights=(1.0, 1.0, 1.0)).fit(
        data, validation=data)
    return {"root": root, "model": path, "energy_model": energy.save(root / "energy.cbm"),
            "data": f"folder:{root / 'data'}", "cache": root / "cache"}


def open_editor(setup, monkeypatch, model: str = "model") -> AppTest:
    monkeypatch.setenv("CBM_APP_MODEL", str(setup[model]))
    monkeypatch.setenv("CBM_APP_DATA", setup["data"])
    monkeypatch.setenv("CBM_CACHE_DIR", str(setup["cache"]))
    test = AppTest.from_file(EDITOR, default_timeout=60)
    test.run()
    assert not test.exception, test.exception
    return test


@pytest.fixture
def app(setup, monkeypatch):
    return open_editor(setup, monkeypatch)


def concept_slider(app: AppTest):
    return next(slider for slider in app.slider if slider.key.startswith("c|"))


def test_the_model_opens_and_shows_a_prediction(app):
    assert app.title[0].value == "Concept editor"
    assert any("Prediction:" in header.value for header in app.subheader)
    assert app.selectbox(key="sample").value is not None
    counterfactual = [m.value for m in app.markdown if m.value.startswith("**Smallest change that flips it:**")]
    assert counterfactual and "=>" in counterfactual[0]


def test_a_slider_changes_the_prediction_exactly_as_intervene_does(app, setup):
    session: EditorSession = app.session_state["session"]
    sample = app.selectbox(key="sample").value
    features = session.embeddings.features[sample:sample + 1]
    slider = concept_slider(app)
    concept = slider.label
    target = slider.max
    slider.set_value(target).run()
    assert not app.exception
    expected = torch.softmax(load(setup["model"]).intervene(features, {concept: target}), dim=1)[0]
    new_class = session.model.class_names[int(expected.argmax())]
    shown = [m.value for m in app.markdown if m.value.startswith("**New prediction")]
    assert shown and f"New prediction: {new_class} ({float(expected.max()):.0%})" in shown[0]


def test_prune_undo_save_and_reload(app, setup, tmp_path):
    session: EditorSession = app.session_state["session"]
    before = session.model.weight_.clone()
    app.selectbox(key="edit_concept").set_value("reddish")
    app.button(key="prune").click().run()
    assert not app.exception
    assert session.model.weight_[:, 0].abs().sum() == 0 and len(session.model.edits_) == 1
    assert any("Pruned 'reddish' for all classes" in s.value for s in app.success)
    app.button(key="undo").click().run()
    assert torch.equal(session.model.weight_, before)
    app.button(key="prune").click().run()
    target = tmp_path / "edited.cbm"
    app.text_input(key="save_path").input(str(target))
    app.button(key="save").click().run()
    reloaded = load(target)
    assert reloaded.edits_[0].concept == "reddish" and torch.equal(reloaded.weight_, session.model.weight_)
    app.button(key="save").click().run()  # again: never overwrites silently
    assert any("exists" in e.value for e in app.error)
    kinds = [entry.kind for entry in session.trail]
    assert kinds[:4] == ["edit", "undo", "edit", "save"]
    assert '"kind": "edit"' in session.trail_json() and session.trail_csv().count("\n") == len(kinds) + 1


def test_an_energy_model_shows_how_the_other_concepts_shift(setup, monkeypatch):
    app = open_editor(setup, monkeypatch, "energy_model")
    session: EditorSession = app.session_state["session"]
    sample = app.selectbox(key="sample").value
    slider = concept_slider(app)
    target = slider.min if slider.value - slider.min > slider.max - slider.value else slider.max
    slider.set_value(target).run()
    assert not app.exception, app.exception
    assert any(header.value == "How the other concepts shift" for header in app.subheader)
    moved = load(setup["energy_model"]).propagate(session.embeddings.features[sample:sample + 1], {slider.label: target})
    k = int(moved.concept_shift[0].abs().argmax())
    name = moved.concept_names[k]
    expected = f"{name} {float(moved.concepts_before[0, k]):.2f} -> {float(moved.concepts_after[0, k]):.2f}"
    captions = [c.value for c in app.caption if c.value.startswith("Probability before -> after")]
    assert captions and expected in captions[0], (expected, captions)


@pytest.mark.parametrize("payload, message", [
    (b"%PDF-1.4 not an image", "not an image"),
    ("bomb", "pixels"),
])
def test_bad_uploads_show_an_error_and_the_app_keeps_working(app, payload, message):
    if payload == "bomb":
        buffer = io.BytesIO()
        Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # tiny file, 64 M pixels
        payload = buffer.getvalue()
    app.file_uploader(key="upload").set_value(("evil.png", payload, "image/png")).run()
    assert not app.exception
    assert any(message in e.value for e in app.error)
    assert app.selectbox(key="sample").value is not None  # still browsing the dataset


def test_a_real_upload_is_predicted(app):
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50), COLOURS[2]).save(buffer, format="PNG")
    app.file_uploader(key="upload").set_value(("blue.png", buffer.getvalue(), "image/png")).run()
    assert not app.exception
    assert any("Prediction:" in header.value for header in app.subheader)
    session: EditorSession = app.session_state["session"]
    expected = session.model.class_names[int(session.model.predict(session.backbone.embed_pil(
        [Image.new("RGB", (50, 50), COLOURS[2])]))[0])]
    assert any(header.value.startswith(f"Prediction: {expected}") for header in app.subheader)
    assert [s.key for s in app.slider if s.key.startswith("c|upload:blue.png|")]
