"""The concept editor on a video model (TemporalCBM) under streamlit.testing: it browses toy videos, shows a frame
strip and the per-window concept timeline, a slider changes the prediction exactly as ``model.intervene`` does,
prune / undo / save work and the audit trail records them; the default data and the command line."""


import pytest
import torch
from streamlit.testing.v1 import AppTest
from test_app import EDITOR, concept_of, open_tab, plain
from test_models_temporal import CONCEPTS, _directions, make_videos
from tiny_models import capture_app_launch

import explain.plots
from app.session import DEFAULT_VIDEO_DATA, EditorSession, default_data
from cbm.backbones import load_backbone
from cbm.data.toy import ToyVideos
from cbm.embed import embed
from cbm.models import TemporalCBM, load, sequences_from_windows
from cbm.toy import toy_text_bank
from concepts import ConceptBank


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    """A small MoTIF model on 60 toy training videos (toy:clip), saved as a bundle."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("video-editor")
    clip = load_backbone("toy:clip", device="cpu")
    train = embed(clip, ToyVideos("train", 60), cache_dir=root / "cache", progress=False, num_workers=0)
    model = TemporalCBM(toy_text_bank(clip), epochs=4, seed=0).fit(train)
    return {"model": model.save(root / "video.cbm"), "cache": root / "cache", "root": root}


def open_video_editor(video_setup, monkeypatch, data: str = "toy:videos@val") -> AppTest:
    monkeypatch.setenv("CBM_APP_MODEL", str(video_setup["model"]))
    monkeypatch.setenv("CBM_APP_DATA", data)
    monkeypatch.setenv("CBM_CACHE_DIR", str(video_setup["cache"]))
    test = AppTest.from_file(EDITOR, default_timeout=60)
    test.run()
    assert not test.exception, test.exception
    return test


def shown_video(app: AppTest) -> tuple[EditorSession, int, str]:
    session: EditorSession = app.session_state["session"]
    index = app.selectbox(key="sample").value
    return session, index, session.sample_ids[index]


def video_input(session: EditorSession, video_id: str):
    """The video as a fresh regrouping of the session's window embeddings gives it (not the session's own)."""
    sequences = sequences_from_windows(session.embeddings)
    return sequences.subset([sequences.video_ids.index(video_id)])


def test_a_video_model_browses_videos_with_a_frame_strip_and_a_timeline(video_setup, monkeypatch):
    drawn = []
    original = explain.plots.timeline_figure
    monkeypatch.setattr(explain.plots, "timeline_figure",
                        lambda explanation, *args, **kwargs: drawn.append((explanation, kwargs)) or original(
                            explanation, *args, **kwargs))
    app = open_video_editor(video_setup, monkeypatch)
    session, _, video_id = shown_video(app)
    assert session.is_video and session.sample_ids == list(session.dataset.video_ids)
    assert app.selectbox(key="sample").label == "Video" and not app.get("file_uploader")
    assert any("Uploading a video is not supported" in c.value for c in app.caption)

    video = video_input(session, video_id)
    model = load(video_setup["model"])
    probabilities = model.predict_proba(video)[0]
    predicted = model.class_names[int(probabilities.argmax())]
    assert any(plain(h.value) == f"Prediction: {predicted} ({probabilities.max():.0%})" for h in app.subheader)
    assert any(plain(h.value) == f"Why {predicted}: concepts over time" for h in app.subheader)
    explanation, options = drawn[-1]
    assert torch.allclose(explanation.window_contributions, model.explain(video).window_contributions)
    windows = int(video.valid.sum())
    assert options["windows"] == video.window_spans[0, :windows].tolist()
    strip = [element for element in app.get("image") if len(element.proto.imgs) == windows]
    assert strip and [image.caption for image in strip[0].proto.imgs] == [f"{a}–{b}" for a, b in options["windows"]]

    app.radio(key="correctness").set_value("wrong").run()  # the browsing filters work on videos
    wrong = (torch.as_tensor(model.predict(session.sequences)) != session.sequences.labels).nonzero().flatten()
    assert 0 < len(wrong) and app.selectbox(key="sample").options == [session.sample_ids[i] for i in wrong]


def test_a_slider_sets_the_concept_in_every_window_exactly_as_intervene_does(video_setup, monkeypatch):
    app = open_video_editor(video_setup, monkeypatch)
    session, _, video_id = shown_video(app)
    model, video = load(video_setup["model"]), video_input(session, video_id)
    before = torch.softmax(model.intervene(video), dim=1)[0]
    candidates = [(slider, value) for slider in app.slider if slider.key.startswith("c|")
                  for value in (slider.min, slider.max)]
    after = {(slider.key, value): torch.softmax(model.intervene(video, {concept_of(slider): value}), dim=1)[0]
             for slider, value in candidates}
    flips = [c for c in candidates if after[c[0].key, c[1]].argmax() != before.argmax()]
    assert flips, "no slider extreme changes this video's prediction"
    slider, value = flips[0]
    expected = after[slider.key, value]
    slider.set_value(value).run()
    assert not app.exception, app.exception
    new_class = model.class_names[int(expected.argmax())]
    shown = [plain(m.value) for m in app.markdown if m.value.startswith("**New prediction")]
    assert shown and f"New prediction: {new_class} ({float(expected.max()):.0%})" in shown[0]
    outcome = session.outcome(video_id, session.sample(session.sample_ids.index(video_id)))
    assert torch.allclose(outcome.after, expected, atol=1e-6) and torch.allclose(outcome.before, before, atol=1e-6)
    assert sum(outcome.drivers.values()) + outcome.interaction == pytest.approx(outcome.margin)

    app.button(key="record").click().run()
    entry = session.trail[-1]
    assert (entry.kind, entry.sample, entry.details) == ("intervention", video_id, f"set {concept_of(slider)} = {value:.3g}")
    assert entry.prediction_after == new_class


def test_prune_undo_and_save_a_video_model(video_setup, monkeypatch):
    app = open_video_editor(video_setup, monkeypatch)
    session: EditorSession = app.session_state["session"]
    start = len(session.trail)
    weight = session.model.weight_.clone()
    concept = session.model.concept_names[int(weight.sum(0).argmax())]
    open_tab(app, "Edit the model")
    app.selectbox(key="edit_concept").set_value(concept)
    app.button(key="prune").click().run()
    assert not app.exception, app.exception
    column = session.model.concept_index(concept)
    assert session.model.weight_[:, column].abs().sum() == 0 and len(session.model.edits_) == 1
    pruned = session.model
    accuracy = pruned.score(sequences_from_windows(session.embeddings))
    assert any(f"Pruned {concept} for all classes" in plain(s.value) and f"-> {accuracy:.3f}" in s.value
               for s in app.success)
    app.button(key="undo").click().run()
    assert torch.equal(session.model.weight_, weight) and not session.model.edits_
    app.button(key="prune").click().run()
    target = video_setup["root"] / "video-edited.cbm"
    app.text_input(key="save_path").input(str(target))
    app.button(key="save").click().run()
    reloaded = load(target)
    assert isinstance(reloaded, TemporalCBM) and reloaded.edits_[0].concept == concept
    assert torch.equal(reloaded.decision_function(session.sequences), pruned.decision_function(session.sequences))
    assert [entry.kind for entry in session.trail[start:]] == ["edit", "undo", "edit", "save"]


def test_the_default_data_of_a_toy_video_model_and_the_command_line(video_setup, monkeypatch, tmp_path):
    app = open_video_editor(video_setup, monkeypatch, data="")
    session: EditorSession = app.session_state["session"]
    assert session.data_spec == DEFAULT_VIDEO_DATA == default_data(load(video_setup["model"]))
    assert session.is_video and any(plain(h.value).startswith("Prediction:") for h in app.subheader)

    def data_of(argv: list[str]) -> str:
        return capture_app_launch(monkeypatch, argv)[1]["CBM_APP_DATA"]

    assert data_of([str(video_setup["model"])]) == ""
    assert data_of([str(video_setup["model"]), "--data", "toy:videos@val"]) == "toy:videos@val"
    bank = ConceptBank(CONCEPTS, torch.tensor(_directions()[:6], dtype=torch.float32), kind="text")
    other = TemporalCBM(bank, epochs=1).fit(make_videos(20, 0)[0]).save(tmp_path / "other.cbm")
    with pytest.raises(ValueError, match="not trained on the toy videos.*--data"):
        capture_app_launch(monkeypatch, [str(other)])  # said at the command line, before the editor starts
    assert data_of([str(other), "--data", "frames:/videos"]) == "frames:/videos"
