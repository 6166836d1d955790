"""The concept editor under streamlit.testing: opening, intervening, editing, saving, bad uploads."""

import csv
import io
import json
import os
import re
from datetime import datetime

import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.session import EditorSession, TrailEntry
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


def concept_sliders(app: AppTest) -> list:
    return [slider for slider in app.slider if slider.key.startswith("c|")]


def concept_slider(app: AppTest):
    return concept_sliders(app)[0]


def concept_of(slider) -> str:
    """The concept a slider sets (its key is ``c|sample|concept|version``; its label is escaped markdown)."""
    return slider.key.split("|")[2]


def plain(text: str) -> str:
    """Markdown source as the reader sees it (backslash escapes removed)."""
    return re.sub(r"\\(.)", r"\1", text)


def texts(app: AppTest) -> list[str]:
    """Every markdown, caption, subheader and message on the page, as the reader sees it."""
    elements = [*app.markdown, *app.caption, *app.subheader, *app.success, *app.info, *app.warning, *app.error]
    return [plain(element.value) for element in elements]


def chart_frames(app: AppTest) -> list:
    """The data of every chart on the page, as the browser receives it (long form: name, series, value)."""
    import pyarrow

    def walk(node):
        for child in (node.children.values() if isinstance(getattr(node, "children", None), dict) else []):
            yield child
            yield from walk(child)

    return [pyarrow.ipc.open_stream(element.proto.data.data).read_all().to_pandas() for element in walk(app._tree)
            if getattr(element, "type", None) == "vega_lite_chart"]


def open_tab(app: AppTest, tab: str) -> AppTest:
    """Click a tab: only the open tab's content is drawn (the page reruns on a switch)."""
    app.session_state["tab"] = tab
    return app.run()


def shown_sample(app: AppTest) -> tuple[EditorSession, int, str, torch.Tensor]:
    session: EditorSession = app.session_state["session"]
    index = app.selectbox(key="sample").value
    return session, index, session.sample_ids[index], session.embeddings.features[index:index + 1]


def test_the_model_opens_and_shows_a_prediction_the_true_class_and_the_counts(app, setup):
    session, index, _, features = shown_sample(app)
    model = load(setup["model"])
    assert app.title[0].value == "Concept editor"
    predicted = model.class_names[int(model.predict(features)[0])]
    truth = model.class_names[int(session.labels[index])]
    shown = texts(app)
    assert any(t.startswith(f"Prediction: {predicted} (") for t in shown)
    assert f"True class: {truth} **{'✓ correct' if truth == predicted else '✗ wrong'}**" in shown
    assert f"{len(session.sample_ids)} of {len(session.sample_ids)} samples match these filters." in shown
    counterfactual = [t for t in shown if t.startswith("**Smallest change that flips it:**")]
    assert counterfactual and "=>" in counterfactual[0]
    other = next(name for name in model.class_names if name != truth)
    app.selectbox(key="class_filter").set_value(other).run()
    matching = (session.labels == model.class_index(other)).nonzero().flatten().tolist()
    sidebar = [plain(c.value) for c in app.sidebar.caption]
    assert f"{len(matching)} of {len(session.sample_ids)} samples match these filters." in sidebar
    # browsing keeps the open sample (and any correction on it) until another one is picked
    assert app.selectbox(key="sample").value == index and f"sample: {session.sample_ids[index]}" in shown
    assert f"The open sample, {session.sample_ids[index]}, does not match these filters." in sidebar
    assert app.selectbox(key="sample").options == [session.sample_ids[i] for i in [index, *matching]]
    app.selectbox(key="sample").set_value(matching[0]).run()
    assert app.selectbox(key="sample").value == matching[0]
    assert f"sample: {session.sample_ids[matching[0]]}" in texts(app)


def test_a_thumbnail_button_opens_its_sample(app):
    session: EditorSession = app.session_state["session"]
    last = len(session.sample_ids) - 1  # 24 samples: two pages of thumbnails
    assert not [b for b in app.button if b.key == f"open|{last}"]
    app.number_input(key="page").set_value(2).run()
    app.button(key=f"open|{last}").click().run()
    assert not app.exception
    assert app.selectbox(key="sample").value == last and f"sample: {session.sample_ids[last]}" in texts(app)


def test_a_slider_changes_the_prediction_exactly_as_intervene_does(app, setup):
    session, _, name, features = shown_sample(app)
    slider = concept_slider(app)
    concept, target = concept_of(slider), slider.max
    slider.set_value(target).run()
    assert not app.exception
    model = load(setup["model"])
    expected = torch.softmax(model.intervene(features, {concept: target}), dim=1)[0]
    new_class = model.class_names[int(expected.argmax())]
    shown = [t for t in texts(app) if t.startswith("**New prediction")]
    assert shown and f"New prediction: {new_class} ({float(expected.max()):.0%})" in shown[0]
    outcome = session.outcome(name, features)
    assert torch.allclose(outcome.after, expected, atol=1e-6)
    # the contribution chart after the change decomposes the new logits
    logits = model.intervene(features, {concept: target})[0]
    rest = model.bias_ + model.residual(features)[0]
    assert float(outcome.contributions_after.sum() + rest[outcome.shown]) == pytest.approx(
        float(logits[outcome.shown]), abs=1e-4)


def test_the_charts_beside_the_sliders_show_the_models_own_numbers(app, setup):
    """Before a move: the probabilities and the why-chart; after it: probabilities and contributions before and
    after, every bar the model's own value (what the browser receives, not what the session holds)."""
    session, _, name, features = shown_sample(app)
    model = load(setup["model"])
    probabilities = torch.softmax(model.intervene(features, {}), dim=1)[0]
    for row in chart_frames(app)[0].itertuples():
        assert row.value == pytest.approx(float(probabilities[model.class_names.index(row[1])]), abs=1e-6)
    slider = concept_slider(app)
    concept, target = concept_of(slider), slider.max
    slider.set_value(target).run()
    after = torch.softmax(model.intervene(features, {concept: target}), dim=1)[0]
    classes, contributions = chart_frames(app)[:2]
    assert set(classes["series"]) == {"before", "after"}
    for row in classes.itertuples():
        expected = (probabilities if row.series == "before" else after)[model.class_names.index(row[1])]
        assert row.value == pytest.approx(float(expected), abs=1e-6)
    shown = int(after.argmax())
    concepts_after = model.concepts(features).clone()
    concepts_after[0, model.concept_index(concept)] = target
    for row in contributions.itertuples():
        at = model.concepts(features) if row.series == "before" else concepts_after
        expected = model.contributions(features, at)[0, shown, model.concept_index(row[1])]
        assert row.value == pytest.approx(float(expected), abs=1e-5), row


def test_the_drivers_add_up_to_the_margin_that_moved_the_decision(app, setup):
    """For a linear head each corrected concept's effect on logit(new) - logit(old) is exact and they add up."""
    session, _, name, features = shown_sample(app)
    model = load(setup["model"])
    base = model.decision_function(features)[0]
    for slider in concept_sliders(app)[:2]:
        slider.set_value(slider.min if float(base.argmax()) == 0 else slider.max)
    app.run()
    changed = session.intervention(name)
    assert len(changed) == 2
    outcome = session.outcome(name, features)
    after = model.intervene(features, changed)[0]
    new, rival = outcome.predicted_after, outcome.rival
    assert outcome.margin == pytest.approx(float((after[new] - after[rival]) - (base[new] - base[rival])), abs=1e-4)
    assert sum(outcome.drivers.values()) == pytest.approx(outcome.margin, abs=1e-4)
    for concept, effect in outcome.drivers.items():
        k = model.concept_index(concept)
        delta = changed[concept] - float(model.concepts(features)[0, k])
        assert effect == pytest.approx(float(model.weight_[new, k] - model.weight_[rival, k]) * delta, abs=1e-4)
    caption = next(t for t in texts(app) if t.startswith("What moved the decision"))
    assert f"{model.class_names[new]} over {model.class_names[rival]}" in caption
    assert all(f"{concept} {effect:+.2f}" in caption for concept, effect in outcome.drivers.items())


def test_reset_all_resets_the_sliders_and_the_next_move_does_not_bring_them_back(app):
    session, _, name, _ = shown_sample(app)
    first, second = concept_sliders(app)[:2]
    start = {concept_of(s): s.value for s in concept_sliders(app)}
    first.set_value(first.max)
    second.set_value(second.min)
    app.run()
    assert len(session.intervention(name)) == 2
    app.button(key="reset").click().run()
    assert not app.exception and not session.intervention(name)
    assert {concept_of(s): s.value for s in concept_sliders(app)} == pytest.approx(start)
    assert not [t for t in texts(app) if t.startswith("**New prediction")]
    third = concept_sliders(app)[2]
    third.set_value(third.max).run()
    assert list(session.intervention(name)) == [concept_of(third)]
    values = {concept_of(s): s.value for s in concept_sliders(app)}
    assert values[concept_of(first)] == pytest.approx(start[concept_of(first)])
    assert values[concept_of(second)] == pytest.approx(start[concept_of(second)])


def test_searching_concepts_keeps_the_intervention(app):
    session, _, name, _ = shown_sample(app)
    slider = concept_slider(app)
    concept = concept_of(slider)
    slider.set_value(slider.max).run()
    before = [t for t in texts(app) if t.startswith("**New prediction")]
    other = next(c for c in session.model.concept_names if c != concept)
    app.text_input(key="concept_search").input(other).run()
    assert session.intervention(name) == {concept: pytest.approx(slider.max)}
    assert [t for t in texts(app) if t.startswith("**New prediction")] == before
    app.text_input(key="concept_search").input("").run()
    values = {concept_of(s): s.value for s in concept_sliders(app)}
    assert values[concept] == pytest.approx(slider.max)


def test_absent_present_and_per_concept_reset_use_the_models_references(app, setup):
    session, _, name, features = shown_sample(app)
    model = load(setup["model"])
    concept = concept_of(concept_slider(app))
    high = model.concept_reference(concept, "high")
    app.button(key=f"present|{name}|{concept}").click().run()
    assert session.intervention(name) == {concept: pytest.approx(high)}
    slider = next(s for s in concept_sliders(app) if concept_of(s) == concept)
    assert slider.value == pytest.approx(high, abs=(slider.max - slider.min) / 100)
    assert "typical when present" in slider.help
    app.button(key=f"undo|{name}|{concept}").click().run()
    assert not session.intervention(name)


def test_prune_preview_apply_undo_save_and_reload(app, setup, tmp_path):
    session: EditorSession = app.session_state["session"]
    before = session.model.weight_.clone()
    assert not [w for w in app.selectbox if w.key == "edit_concept"]  # only the open tab is drawn
    open_tab(app, "Edit the model")
    assert not concept_sliders(app)
    app.selectbox(key="edit_concept").set_value("reddish").run()
    app.button(key="preview").click().run()
    assert not app.exception
    preview = session.preview_edit("reddish", None)
    assert any(t.startswith(f"Accuracy on this data: {preview.before.accuracy:.3f} -> **{preview.after.accuracy:.3f}")
               for t in texts(app))
    assert any(t.startswith(f"{len(preview.flipped)} samples change their prediction") for t in texts(app))
    assert torch.equal(session.model.weight_, before)  # a preview changes nothing
    app.button(key="prune").click().run()
    assert session.model.weight_[:, 0].abs().sum() == 0 and len(session.model.edits_) == 1
    accuracy = load(setup["model"]).edit("prune", "reddish")[0].score(session.embeddings)
    assert any(t.startswith("Pruned reddish for all classes") and f"-> {accuracy:.3f}" in t for t in texts(app))
    # no number lags behind the edit: the sidebar and the counts are those of the pruned model in the same run
    assert app.sidebar.metric[0].value == f"{accuracy:.3f}"
    assert "Edits in this session: 1; in the model's history: 1" in [plain(c.value) for c in app.sidebar.caption]
    assert "Edits in this model's history: 1" in texts(app)
    # pruning it again says so and adds nothing
    per_class = next(d.value for d in app.dataframe if "accuracy after" in d.value.columns).set_index("class")
    pruned_model = load(setup["model"]).edit("prune", "reddish")[0]
    for name, row in per_class.iterrows():
        rows = session.labels == session.model.class_index(name)
        assert row["accuracy after"] == pytest.approx(pruned_model.score(session.embeddings.features[rows],
                                                                         session.labels[rows]))
    assert any("reddish is already pruned for all classes" in t for t in texts(app))
    assert app.button(key="prune").disabled
    with pytest.raises(ValueError, match="already pruned"):
        session.apply_edit("reddish", None)
    app.button(key="undo").click().run()
    assert torch.equal(session.model.weight_, before)
    assert app.sidebar.metric[0].value == f"{session.model.score(session.embeddings):.3f}"
    app.button(key="prune").click().run()
    target = tmp_path / "edited.cbm"
    app.text_input(key="save_path").input(str(target))
    app.button(key="save").click().run()
    reloaded = load(target)
    assert reloaded.edits_[0].concept == "reddish" and torch.equal(reloaded.weight_, session.model.weight_)
    app.button(key="save").click().run()  # again: never overwrites silently
    assert any("exists" in e.value for e in app.error)
    kinds = [entry.kind for entry in session.trail]
    assert kinds == ["edit", "undo", "edit", "save"]


def test_the_audit_trail_is_readable_and_its_exports_hold_the_same_fields(app):
    session, _, name, features = shown_sample(app)
    slider = concept_slider(app)
    slider.set_value(slider.max).run()
    app.button(key="record").click().run()
    open_tab(app, "Edit the model")
    app.selectbox(key="edit_concept").set_value("bright").run()
    app.text_input(key="edit_reason").input("=HYPERLINK(\"http://x\")").run()
    app.button(key="prune").click().run()
    rows = session.trail_rows()
    assert [row["kind"] for row in rows] == ["intervention", "edit"]
    for row in rows:
        assert datetime.fromisoformat(row["time"]).tzinfo is not None
    assert rows[0]["sample"] == name and rows[0]["details"] == f"set {concept_of(slider)} = {slider.max:.3g}"
    edit = rows[1]
    classes = ", ".join(map(repr, session.model.class_names))
    assert edit["details"] == f"prune 'bright' for {classes}; reason: =HYPERLINK(\"http://x\")"
    assert edit["accuracy_after"] == pytest.approx(session.model.score(session.embeddings))
    assert json.loads(session.trail_json()) == rows
    exported = list(csv.DictReader(io.StringIO(session.trail_csv())))
    assert list(exported[0]) == list(rows[0]) and len(exported) == 2
    session.trail.append(TrailEntry("intervention", "=1+2", sample="@SUM(A1)", prediction_before="-x"))
    hostile = list(csv.DictReader(io.StringIO(session.trail_csv())))[-1]
    assert (hostile["details"], hostile["sample"], hostile["prediction_before"]) == ("'=1+2", "'@SUM(A1)", "'-x")
    table = open_tab(app, "Audit trail").dataframe[-1].value
    assert list(table.columns) == list(rows[0]) and len(table) == len(session.trail)


def test_browser_sessions_do_not_share_state_and_discard_reloads_the_file(setup, monkeypatch):
    first = open_editor(setup, monkeypatch)
    session: EditorSession = first.session_state["session"]
    slider = concept_slider(first)
    slider.set_value(slider.max).run()
    open_tab(first, "Edit the model")
    first.selectbox(key="edit_concept").set_value("reddish").run()
    first.button(key="prune").click().run()
    second = open_editor(setup, monkeypatch)
    other: EditorSession = second.session_state["session"]
    assert other is not session and other.data is session.data  # the data is shared, the state is not
    assert not other.model.edits_ and not other.trail and not any(other.interventions.values())
    file_accuracy = load(setup["model"]).score(session.embeddings)
    assert second.sidebar.metric[0].value == f"{file_accuracy:.3f}"
    first.button(key="discard").click().run()
    assert not session.model.edits_ and not session.history
    assert first.sidebar.metric[0].value == f"{file_accuracy:.3f}"
    assert [entry.kind for entry in session.trail] == ["edit", "discard"]


def test_an_energy_model_shows_how_the_other_concepts_respond(setup, monkeypatch):
    app = open_editor(setup, monkeypatch, "energy_model")
    session, _, name, features = shown_sample(app)
    slider = concept_slider(app)
    concept = concept_of(slider)
    target = slider.min if slider.value - slider.min > slider.max - slider.value else slider.max
    slider.set_value(target).run()
    assert not app.exception, app.exception
    assert "**How the other concepts respond**" in texts(app)
    moved = load(setup["energy_model"]).propagate(features, {concept: target})
    shift = moved.concept_shift[0].clone()
    shift[moved.concept_names.index(concept)] = 0  # the corrected concept is the slider, not a response
    k = int(shift.abs().argmax())
    expected = f"{moved.concept_names[k]} {float(moved.concepts_before[0, k]):.2f} -> {float(moved.concepts_after[0, k]):.2f}"
    captions = [t for t in texts(app) if t.startswith("Probability before -> after")]
    assert captions and expected in captions[0], (expected, captions)
    assert f" {concept} " not in captions[0]
    outcome = session.outcome(name, features)
    # the slider, the shift chart and the contribution chart agree: one set of concepts after the correction
    assert float(outcome.concepts_after[session.model.concept_index(concept)]) == pytest.approx(target, abs=1e-5)
    assert torch.allclose(outcome.concepts_after, moved.concepts_after[0], atol=1e-5)
    model = session.model
    assert torch.allclose(outcome.contributions_after, model.contributions(features, moved.concepts_after)[0, outcome.shown],
                          atol=1e-5)


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
    assert any(message in plain(e.value) for e in app.error)
    assert app.selectbox(key="sample").value is not None  # still browsing the dataset


def test_a_real_upload_is_predicted(app):
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50), COLOURS[2]).save(buffer, format="PNG")
    app.file_uploader(key="upload").set_value(("blue.png", buffer.getvalue(), "image/png")).run()
    assert not app.exception
    session: EditorSession = app.session_state["session"]
    expected = session.model.class_names[int(session.model.predict(session.backbone.embed_pil(
        [Image.new("RGB", (50, 50), COLOURS[2])]))[0])]
    assert any(t.startswith(f"Prediction: {expected}") for t in texts(app))
    assert [s.key for s in app.slider if s.key.startswith("c|upload:blue.png|")]


def test_an_energy_model_recomputes_only_what_changed(setup, monkeypatch):
    """A slider move or a filter change re-infers one sample at most (the model's outputs on the data are kept
    per model version), so an energy model stays usable on a real dataset."""
    app = open_editor(setup, monkeypatch, "energy_model")
    session, _, name, _ = shown_sample(app)
    inferred = []
    original = EnergyCBM.infer
    monkeypatch.setattr(EnergyCBM, "infer", lambda self, x, *args, **kwargs: inferred.append(len(x)) or original(
        self, x, *args, **kwargs))
    slider = concept_slider(app)
    slider.set_value(slider.max).run()
    assert not app.exception and session.intervention(name)
    # one batch for the sample (before, with the correction), never the whole data
    assert inferred and max(inferred) <= 2 < len(session.sample_ids), inferred
    inferred.clear()
    app.radio(key="correctness").set_value("correct").run()
    app.selectbox(key="class_filter").set_value("green").run()
    assert not app.exception
    assert max(inferred, default=0) <= 2, inferred


def test_opening_again_reads_the_files_outputs_and_loads_no_backbone_weights(setup, monkeypatch):
    """The first render of a model whose data is cached runs neither the backbone nor the model on the data: the
    embeddings need only the backbone's recorded fingerprint, and the file's outputs on that data are kept on disk
    (an energy model takes about a minute to score 1,000 samples). Kept outputs that were altered are not
    trusted, and the backbone still loads, fingerprint-checked, when an upload needs it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from app.session import OpenedData

    def opened() -> OpenedData:
        return OpenedData.open(setup["energy_model"], setup["data"], cache_dir=setup["cache"])

    first = opened()
    expected = first.outputs.probabilities.clone(), first.outputs.concepts.clone()
    store = first.outputs.store
    assert store.exists()
    with monkeypatch.context() as patched:
        patched.setattr(EnergyCBM, "intervention", lambda *a, **k: pytest.fail("the model ran on the data again"))
        patched.setattr(EnergyCBM, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
        again = opened()
        assert torch.equal(again.outputs.probabilities, expected[0])
        assert torch.equal(again.outputs.concepts, expected[1])
        assert again.outputs.accuracy == load(setup["energy_model"]).score(again.embeddings)
    with safe_open(str(store), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    save_file({**tensors, "probabilities": tensors["probabilities"].flip(1)}, str(store), metadata=metadata)
    third = opened()
    assert torch.allclose(third.outputs.probabilities, expected[0])  # recomputed: the model's own numbers
    image = Image.new("RGB", (40, 40), COLOURS[0])
    assert third.backbone.embed_pil([image]).shape == (1, third.embeddings.features.shape[1])


def test_the_servers_warm_up_opens_the_data_the_first_page_uses(setup, monkeypatch):
    """``cbm app`` runs ``app.server``, which opens the model file and its data while Streamlit starts: the first
    page then finds them opened (and their outputs computed) instead of opening them again."""
    from app import server
    from app.session import OpenedData, shared_data

    monkeypatch.setenv("CBM_APP_MODEL", str(setup["model"]))
    monkeypatch.setenv("CBM_APP_DATA", setup["data"])
    monkeypatch.setenv("CBM_CACHE_DIR", str(setup["cache"]))
    server.warm_up()
    warmed = shared_data(str(setup["model"]), setup["data"])
    assert warmed.outputs.ready
    monkeypatch.setattr(OpenedData, "open", lambda *args, **kwargs: pytest.fail("the first page opened the data again"))
    page = AppTest.from_file(EDITOR, default_timeout=60)
    page.run()
    assert not page.exception and page.session_state["session"].data is warmed


def test_the_shared_data_follows_the_file_and_keeps_one_version(setup, monkeypatch, tmp_path):
    """Every session shares one opening of the file; a file changed on disk is opened afresh and replaces the old
    opening, which only the sessions already on it keep."""
    import os
    import shutil

    from app import session as app_session

    monkeypatch.setenv("CBM_CACHE_DIR", str(setup["cache"]))
    path = tmp_path / "copy.cbm"
    shutil.copy(setup["model"], path)
    first = app_session.shared_data(str(path), setup["data"])
    assert app_session.shared_data(str(path), setup["data"]) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = app_session.shared_data(str(path), setup["data"])
    assert second is not first and app_session.shared_data(str(path), setup["data"]) is second
    assert [opened for key, (_, opened) in app_session._SHARED.items() if key[0] == str(path)] == [second]
