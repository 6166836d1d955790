"""The concept editor (Streamlit): look at why a model predicted what it did, correct concepts,
and fix the model globally. Launch it with ``cbm app [MODEL] [--data DATASET]``.

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
from explain import EvalData, explain_samples
from explain.plots import contribution_figure
from cbm.data.base import ImageReadError
from cbm.models import ConceptBottleneckModel

SLIDERS_SHOWN = 12
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
    labels = s.embeddings.labels
    keep = (probabilities.max(1).values >= confidence[0]) & (probabilities.max(1).values <= confidence[1])
    if class_filter is not None:
        keep &= labels == s.model.class_index(class_filter)
    if correctness != "all":
        keep &= (predicted == labels) if correctness == "correct" else (predicted != labels)
    return torch.nonzero(keep).flatten().tolist()


def pick_sample(s: EditorSession, indices: list[int]) -> tuple[str, torch.Tensor, object] | None:
    """Thumbnails of the filtered samples and an upload box; returns (name, features [1,D], image)."""
    upload = st.file_uploader("Or upload an image", type=list(UPLOAD_TYPES), key="upload")
    if upload is not None:
        try:
            image = read_upload(upload.name, upload.getvalue())
        except ImageReadError as error:
            st.error(f"Cannot use this upload: {error}")
        else:
            return f"upload:{upload.name}", s.backbone.embed_pil([image]), image
    if not indices:
        st.info("No sample matches these filters.")
        return None
    page = st.number_input("Page", 1, max(1, -(-len(indices) // PAGE_SIZE)), 1, key="page") - 1
    shown = indices[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    columns = st.columns(8)
    predicted = s.probabilities()[shown].argmax(1)
    for column, index, guess in zip(columns * 3, shown, predicted.tolist()):
        label = s.model.class_names[guess]
        column.image(s.dataset.load(index), caption=f"{s.embeddings.ids[index]}\n-> {label}", width=72)
    choice = st.selectbox("Sample", shown, format_func=lambda i: s.embeddings.ids[i], key="sample")
    return s.embeddings.ids[choice], s.embeddings.features[choice:choice + 1], s.dataset.load(choice)


def concept_sliders(s: EditorSession, name: str, features: torch.Tensor) -> dict[str, float]:
    """Sliders for the most influential concepts (or those matching the search); returns changed values."""
    model = s.model
    current = model.concepts(features)[0]
    predicted = int(model.decision_function(features).argmax(1))
    influence = model.contributions(features)[0, predicted].abs()
    query = st.text_input("Search concepts", key="concept_search").strip().lower()
    order = influence.argsort(descending=True).tolist()
    shown = [k for k in order if query in model.concept_names[k].lower()] if query else order[:SLIDERS_SHOWN]
    if st.button("Reset all concepts", key="reset"):
        for key in [key for key in st.session_state if str(key).startswith(f"c|{name}|")]:
            del st.session_state[key]
    all_scores = model.concepts(s.embeddings)
    low, high = all_scores.min(0).values, all_scores.max(0).values
    changed = {}
    for k in shown:
        concept = model.concept_names[k]
        lo, hi = float(min(low[k], current[k])), float(max(high[k], current[k]))
        value = st.slider(concept, lo, hi, float(current[k]), (hi - lo) / 100 or 0.01, key=f"c|{name}|{concept}")
        if abs(value - float(current[k])) > 1e-9:
            changed[concept] = value
    return changed


def explore(s: EditorSession, filters: tuple) -> None:
    picked = pick_sample(s, filtered_samples(s, *filters))
    if picked is None:
        return
    name, features, image = picked
    model = s.model
    left, right = st.columns([1, 2])
    before = model.predict_proba(features)[0]
    predicted = int(before.argmax())
    with left:
        st.image(image, caption=name, width=192)
        st.subheader(f"Prediction: {model.class_names[predicted]} ({before[predicted]:.0%})")
        st.bar_chart(probability_frame(s, before))
    with right:
        explanation = explain_samples(model, EvalData(features, None, ids=[name]), rows=[0], k=12)[0]
        st.subheader(f"Why {model.class_names[predicted]}: concept contributions")
        st.pyplot(contribution_figure(explanation), use_container_width=False)
        st.markdown(f"**Smallest change that flips it:** {explanation.counterfactual.describe()}")
    st.subheader("Intervene on concepts")
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
