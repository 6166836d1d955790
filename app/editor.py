"""The concept editor (Streamlit): look at why a model predicted what it did, correct concepts,
and fix the model globally. Launch it with ``cbm app [MODEL] [--data DATASET]``. For a video model
(``TemporalCBM``) a sample is a whole video, shown as a frame strip and a per-window concept timeline.

The script only lays out widgets and calls the public API (``cbm``, ``explain``) through
``app.session.EditorSession``; it holds no model logic of its own.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import streamlit as st
import torch

from app.session import UPLOAD_TYPES, EditorSession, intervention_outcome, read_upload
from cbm.data.base import ImageReadError
from cbm.models import ConceptBottleneckModel, VideoSequences
from explain import EvalData, explain_samples
from explain.plots import contribution_figure, timeline_figure

SLIDERS_SHOWN = 12
TIMELINE_CONCEPTS = 10
PAGE_SIZE = 24

st.set_page_config(page_title="Concept editor", layout="wide")


@st.cache_resource(show_spinner="Opening the model and embedding its data (cached after the first time)...")
def open_session(model: str | None, data: str | None) -> EditorSession:
    return EditorSession.open(model, data)


def session() -> EditorSession:
    if "session" not in st.session_state:
        st.session_state.session = open_session(os.environ.get("CBM_APP_MODEL") or None,
                                                os.environ.get("CBM_APP_DATA") or None)
    return st.session_state.session


def probability_frame(s: EditorSession, probabilities: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"class": s.model.class_names, "probability": probabilities}).set_index("class")


def sidebar(s: EditorSession) -> tuple[str | None, str, tuple[float, float]]:
    model = s.model
    st.sidebar.header("Model")
    st.sidebar.markdown(f"**{type(model).__name__}** on `{model.backbone_spec_}`  \n"
                        f"{len(model.class_names)} classes, {len(model.concept_names)} concepts  \n"
                        f"{len(s.sample_ids)} {'videos' if s.is_video else 'samples'}  \n"
                        f"file: `{s.model_path.name}`  \ndata: `{s.data_spec}`")
    st.sidebar.metric("Accuracy on this data", f"{s.validation_accuracy():.3f}")
    st.sidebar.header("Browse")
    class_filter = st.sidebar.selectbox("True class", ["all", *model.class_names], key="class_filter")
    correctness = st.sidebar.radio("Prediction", ["all", "correct", "wrong"], horizontal=True, key="correctness")
    confidence = st.sidebar.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.05, key="confidence")
    return None if class_filter == "all" else class_filter, correctness, confidence


def filtered_samples(s: EditorSession, class_filter: str | None, correctness: str,
                     confidence: tuple[float, float]) -> list[int]:
    probabilities = s.probabilities()
    predicted = probabilities.argmax(1)
    labels = s.labels
    keep = (probabilities.max(1).values >= confidence[0]) & (probabilities.max(1).values <= confidence[1])
    if class_filter is not None:
        keep &= labels == s.model.class_index(class_filter)
    if correctness != "all":
        keep &= (predicted == labels) if correctness == "correct" else (predicted != labels)
    return torch.nonzero(keep).flatten().tolist()


def upload_box(s: EditorSession) -> tuple[str, torch.Tensor, object] | None:
    """An image upload box (a note instead for video models); returns (name, features [1,D], image) of a
    usable upload, else None."""
    if s.is_video:
        st.caption("Uploading a video is not supported: browse the videos of the data the editor was opened with.")
        return None
    upload = st.file_uploader("Or upload an image", type=list(UPLOAD_TYPES), key="upload")
    if upload is None:
        return None
    try:
        image = read_upload(upload.name, upload.getvalue())
    except ImageReadError as error:
        st.error(f"Cannot use this upload: {error}")
        return None
    return f"upload:{upload.name}", s.backbone.embed_pil([image]), image


def browse(s: EditorSession, indices: list[int]) -> int | None:
    """Thumbnails of the filtered samples (videos: their middle window's frame) and a picker; returns the index."""
    if not indices:
        st.info(f"No {'video' if s.is_video else 'sample'} matches these filters.")
        return None
    page = st.number_input("Page", 1, max(1, -(-len(indices) // PAGE_SIZE)), 1, key="page") - 1
    shown = indices[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    columns = st.columns(8)
    predicted = s.probabilities()[shown].argmax(1)
    for column, index, guess in zip(columns * 3, shown, predicted.tolist()):
        label = s.model.class_names[guess]
        column.image(s.thumbnail(index), caption=f"{s.sample_ids[index]}\n-> {label}", width=72)
    return st.selectbox("Video" if s.is_video else "Sample", shown, format_func=lambda i: s.sample_ids[i],
                        key="sample")


def concept_sliders(s: EditorSession, name: str, features: torch.Tensor | VideoSequences) -> dict[str, float]:
    """Sliders for the most influential concepts (or those matching the search); returns changed values."""
    model = s.model
    current = s.concept_values(features)[0]
    predicted = int(model.decision_function(features).argmax(1))
    influence = model.contributions(features)[0, predicted].abs()
    query = st.text_input("Search concepts", key="concept_search").strip().lower()
    order = influence.argsort(descending=True).tolist()
    shown = [k for k in order if query in model.concept_names[k].lower()] if query else order[:SLIDERS_SHOWN]
    if st.button("Reset all concepts", key="reset"):
        for key in [key for key in st.session_state if str(key).startswith(f"c|{name}|")]:
            del st.session_state[key]
    all_scores = s.concept_values()
    low, high = all_scores.min(0).values, all_scores.max(0).values
    changed = {}
    for k in shown:
        concept = model.concept_names[k]
        lo, hi = float(min(low[k], current[k])), float(max(high[k], current[k]))
        value = st.slider(concept, lo, hi, float(current[k]), (hi - lo) / 100 or 0.01, key=f"c|{name}|{concept}")
        if abs(value - float(current[k])) > 1e-9:
            changed[concept] = value
    return changed


def show_prediction(s: EditorSession, probabilities: np.ndarray) -> None:
    predicted = int(probabilities.argmax())
    st.subheader(f"Prediction: {s.model.class_names[predicted]} ({probabilities[predicted]:.0%})")
    st.bar_chart(probability_frame(s, probabilities))


def explain_image(s: EditorSession, name: str, features: torch.Tensor, image: object, before: np.ndarray) -> None:
    """An image, its prediction, its concept contributions and the smallest change that flips it."""
    model = s.model
    left, right = st.columns([1, 2])
    with left:
        st.image(image, caption=name, width=192)
        show_prediction(s, before)
    with right:
        explanation = explain_samples(model, EvalData(features, None, ids=[name]), rows=[0], k=12)[0]
        st.subheader(f"Why {model.class_names[int(before.argmax())]}: concept contributions")
        st.pyplot(contribution_figure(explanation), use_container_width=False)
        st.markdown(f"**Smallest change that flips it:** {explanation.counterfactual.describe()}")


def explain_video(s: EditorSession, index: int, video: VideoSequences, before: np.ndarray) -> None:
    """A video: its frame strip, its prediction and its per-window concept timeline."""
    model = s.model
    spans = s.window_spans(index)
    predicted = model.class_names[int(before.argmax())]
    st.image(s.video_frames(index), caption=[f"{start}–{stop}" for start, stop in spans], width=64)
    st.caption(f"{s.sample_ids[index]}: one frame per window (frames start–stop).")
    left, right = st.columns([1, 2])
    with left:
        show_prediction(s, before)
    with right:
        st.subheader(f"Why {predicted}: concepts over time")
        explanation = model.explain(video, return_attention=False)
        st.pyplot(timeline_figure(explanation, model.concept_names, row=0, k=TIMELINE_CONCEPTS, windows=spans,
                                  decisive_window=int(model.decisive_windows(video)[0]),
                                  value_label=f"contribution to {predicted}"), use_container_width=False)
        st.caption("Each window's concepts times their weight for the predicted class; above, the weight the "
                   "model's pooling gives each window (the most important one outlined); dashed: the decisive "
                   "window, where the evidence for the predicted class rises most as the video unfolds.")


def explore(s: EditorSession, filters: tuple) -> None:
    index = None
    picked = upload_box(s)
    if picked is None:
        index = browse(s, filtered_samples(s, *filters))
        if index is None:
            return
        picked = s.sample_ids[index], s.sample(index), None if s.is_video else s.dataset.load(index)
    name, features, image = picked
    model = s.model
    before = model.predict_proba(features)[0]
    predicted = int(before.argmax())
    if s.is_video:
        explain_video(s, index, features, before)
    else:
        explain_image(s, name, features, image, before)
    st.subheader("Intervene on concepts")
    if s.is_video:
        st.caption("A slider sets its concept in every window of the video; it starts at the video-level value "
                   "(the model's pooling of the windows' values).")
    changed = concept_sliders(s, name, features)
    if changed:
        outcome = intervention_outcome(model, features, changed)
        after, new = outcome.after.numpy(), outcome.predicted_after
        st.markdown(f"**New prediction: {model.class_names[new]} ({after[new]:.0%})** "
                    f"(was {model.class_names[predicted]} {before[predicted]:.0%})")
        delta = pd.DataFrame({"class": model.class_names, "before": before, "after": after,
                              "change": after - before}).sort_values("change", key=abs, ascending=False)
        st.dataframe(delta.head(8), hide_index=True)
        drivers = sorted(outcome.drivers.items(), key=lambda kv: -abs(kv[1]))
        st.caption("Change of the new class's logit from each corrected concept alone: "
                   + ", ".join(f"{concept} {effect:+.2f}" for concept, effect in drivers))
        if hasattr(model, "propagate"):
            concept_shifts(model, features, changed)
        if st.button("Record this intervention in the audit trail", key="record"):
            s.record_intervention(name, changed, model.class_names[predicted], model.class_names[new])
            st.success("Recorded.")


def concept_shifts(model: ConceptBottleneckModel, features: torch.Tensor, changed: dict[str, float], top: int = 10) -> None:
    """Energy models re-infer the concepts you did not touch: show which ones moved, and how far."""
    moved = model.propagate(features, changed)
    shift = moved.concept_shift[0]
    order = [k for k in shift.abs().argsort(descending=True)[:top].tolist() if abs(float(shift[k])) >= 0.01]
    st.subheader("How the other concepts shift")
    if not order:
        st.caption("No other concept moved by 1 point or more.")
        return
    names = [model.concept_names[k] for k in order]
    st.bar_chart(pd.DataFrame({"concept": names, "change of probability": shift[order].numpy()}).set_index("concept"),
                 horizontal=True)
    st.caption("Probability before -> after fixing the concepts above: " + ", ".join(
        f"{name} {float(moved.concepts_before[0, k]):.2f} -> {float(moved.concepts_after[0, k]):.2f}"
        for name, k in zip(names, order)))


def edit_globally(s: EditorSession) -> None:
    model = s.model
    st.subheader("Prune a concept")
    concept = st.selectbox("Concept", model.concept_names, key="edit_concept")
    target = st.selectbox("For class", ["all classes", *model.class_names], key="edit_class")
    reason = st.text_input("Why (kept in the model's edit history)", key="edit_reason")
    if st.button("Prune", key="prune"):
        record = s.apply_edit(concept, None if target == "all classes" else [target], reason)
        st.success(f"Pruned {concept!r} for {target}: accuracy {record.before['val_accuracy']:.3f} -> "
                   f"{record.after['val_accuracy']:.3f} on {s.data_spec}.")
    if st.button("Undo the last edit", key="undo", disabled=not s.history):
        s.undo()
        st.info(f"Undone; accuracy is back to {s.validation_accuracy():.3f}.")
    st.write(f"Edits in this model's history: {len(model.edits_)}")
    for edit in s.model.edits_:
        st.caption(f"{edit.action} {edit.concept!r} for {', '.join(edit.classes[:4])}"
                   f"{' ...' if len(edit.classes) > 4 else ''} - {edit.reason or 'no reason given'}")
    st.subheader("Save")
    path = st.text_input("Save the edited model as", value=str(s.model_path.with_name(s.model_path.stem + "-edited.cbm")),
                         key="save_path")
    overwrite = st.checkbox("Replace the file if it exists", key="overwrite")
    if st.button("Save", key="save"):
        try:
            saved = s.save(path, overwrite=overwrite)
        except (FileExistsError, OSError, ValueError) as error:
            st.error(str(error))
        else:
            st.success(f"Saved to {saved}.")


def audit_trail(s: EditorSession) -> None:
    if not s.trail:
        st.info("Nothing recorded yet: interventions you record and every edit appear here.")
        return
    st.dataframe(pd.DataFrame([{"kind": e.kind, "sample": e.sample, "before": e.prediction_before,
                                "after": e.prediction_after, "details": str(e.details)} for e in s.trail]),
                 hide_index=True)
    st.download_button("Download JSON", s.trail_json(), "audit_trail.json", "application/json", key="dl_json")
    st.download_button("Download CSV", s.trail_csv(), "audit_trail.csv", "text/csv", key="dl_csv")


def main() -> None:
    st.title("Concept editor")
    try:
        s = session()
    except (OSError, ValueError, RuntimeError) as error:
        st.error(f"Cannot open the model: {error}")
        st.stop()
    filters = sidebar(s)
    explore_tab, edit_tab, trail_tab = st.tabs(["Explore and intervene", "Edit the model", "Audit trail"])
    with explore_tab:
        explore(s, filters)
    with edit_tab:
        edit_globally(s)
    with trail_tab:
        audit_trail(s)


main()
