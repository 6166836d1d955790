"""The concept editor (Streamlit): look at why a model predicted what it did, correct concepts and watch
the prediction change, and fix the model globally. Launch it with ``cbm app [MODEL] [--data DATASET]``.
For a video model (``TemporalCBM``) a sample is a whole video, shown as a frame strip and a per-window
concept timeline.

The script only lays out widgets and calls the public API (``cbm``, ``explain``) through
``app.session``; it holds no model logic of its own. Each browser session has its own
``EditorSession`` (edits, corrections, trail); the model file and the embedded data are shared,
read-only. Every change of state happens in a widget callback, before the page is drawn, so every
number on the page is that of the current state. Names (concepts, classes, samples) come from files
and LLMs: they are shown as plain text.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Concept editor", layout="wide")
st.title("Concept editor")
OPENING = st.empty()
OPENING.info("Opening the editor: loading the toolkit...")

import io  # noqa: E402  (the message above shows while these load)
import os  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from app.session import (UPLOAD_TYPES, EditorSession, EditPreview, InterventionOutcome,  # noqa: E402
                         describe_edit, pruned_classes, read_upload, shared_data)
from cbm.data.base import ImageReadError  # noqa: E402
from cbm.models import VideoSequences  # noqa: E402
from cbm.untrusted import for_markdown  # noqa: E402
from explain import EvalData, counterfactual, explain_samples, make_view  # noqa: E402

SLIDERS_SHOWN = 8  # the most influential concepts (and the corrected ones); search finds the rest
SEARCH_SHOWN = 40
TIMELINE_CONCEPTS = 10
PAGE_SIZE = 12
THUMBNAIL_COLUMNS = 3
CHART_ROWS = 8
md = for_markdown


def session() -> EditorSession:
    """This browser session's editor state (created on its first run, on the data every session shares)."""
    if "session" not in st.session_state:
        with st.spinner("Opening the model and its data (the embeddings are cached after the first time)..."):
            data = shared_data(os.environ.get("CBM_APP_MODEL") or None, os.environ.get("CBM_APP_DATA") or None)
        st.session_state.session = EditorSession.on(data)
    return st.session_state.session


def flash(kind: str, text: str) -> None:
    """A message to show on the next run (set in callbacks, which run before the page is drawn)."""
    st.session_state.flash = (kind, text)


def show_flash() -> None:
    """The message of the last action, in a container drawn on every run, so that the elements below keep their
    place (the tabs would otherwise be drawn anew and jump back to the first one)."""
    area = st.container()
    kind, text = st.session_state.pop("flash", (None, None))
    if kind:
        getattr(area, kind)(text)


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def percent(p: float) -> str:
    return f"{p:.0%}"


# ---------------------------------------------------------------------------------------------- sidebar
def sidebar(s: EditorSession) -> None:
    """The model, its accuracy and the session's edits; below them, the sample browser."""
    model = s.model
    st.sidebar.header("Model")
    st.sidebar.markdown(f"**{type(model).__name__}** on {md(model.backbone_spec_)}  \n"
                        f"{len(model.class_names)} classes, {len(model.concept_names)} concepts  \n"
                        f"{len(s.sample_ids)} {'videos' if s.is_video else 'samples'}  \n"
                        f"file: {md(s.model_path.name)}  \ndata: {md(s.data_spec)}")
    st.sidebar.metric("Accuracy on this data", f"{s.validation_accuracy():.3f}")
    st.sidebar.caption(f"Edits in this session: {len(s.history)}; in the model's history: {len(model.edits_)}")
    st.sidebar.button("Discard my edits and reload the file", key="discard", on_click=discard, args=(s,),
                      help="Throws away this session's edits and corrections and opens the file as it is on disk now.")
    with st.sidebar:
        sample_browser(s)


def discard(s: EditorSession) -> None:
    s.discard()
    st.session_state.pop("last_edit", None)
    flash("info", f"Discarded this session's edits: the model is the file on disk again (accuracy "
                  f"{s.validation_accuracy():.3f}).")


def filtered_samples(s: EditorSession, class_filter: str | None, correctness: str,
                     confidence: tuple[float, float]) -> list[int]:
    outputs = s.outputs()
    top = outputs.probabilities.max(1).values
    keep = (top >= confidence[0]) & (top <= confidence[1])
    if class_filter is not None:
        keep &= s.labels == s.model.class_index(class_filter)
    if correctness != "all":
        keep &= outputs.correct if correctness == "correct" else ~outputs.correct
    return torch.nonzero(keep).flatten().tolist()


def open_sample(index: int) -> None:
    st.session_state.sample = index
    sample_picked()


def sample_picked() -> None:
    st.session_state.sample_changed = True  # the browser reruns the whole page to show it


@st.fragment
def sample_browser(s: EditorSession) -> None:
    """The filters, the count of matching samples, clickable thumbnails marked right or wrong, and the sample
    picker. A filter or page change reruns only this panel: the open sample (and its correction) stays open until
    another one is picked, which reruns the page."""
    if st.session_state.pop("sample_changed", False):
        st.rerun()
    model, kind = s.model, "videos" if s.is_video else "samples"
    st.header("Browse")
    chosen = st.selectbox("True class", ["all", *model.class_names], key="class_filter")
    correctness = st.radio("Prediction", ["all", "correct", "wrong"], horizontal=True, key="correctness")
    confidence = st.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.05, key="confidence")
    indices = filtered_samples(s, None if chosen == "all" else chosen, correctness, confidence)
    st.caption(f"{len(indices)} of {len(s.sample_ids)} {kind} match these filters.")
    if not indices:
        st.info(f"No {kind[:-1]} matches these filters.")
    pages = max(1, -(-len(indices) // PAGE_SIZE))
    page = st.number_input("Page", 1, pages, 1, key="page") - 1 if pages > 1 else 0
    shown = indices[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    outputs, names = s.outputs(), model.class_names
    columns = st.columns(THUMBNAIL_COLUMNS)
    for slot, index in enumerate(shown):
        guess, truth = int(outputs.predicted[index]), int(s.labels[index])
        mark = f"✓ {names[guess]}" if guess == truth else f"✗ {names[guess]} (true: {names[truth]})"
        with columns[slot % THUMBNAIL_COLUMNS]:
            st.image(s.data.thumbnail_png(index), caption=mark, width=72)
            sample = s.sample_ids[index]
            short = sample.rsplit("/", 1)[-1]  # the file name: the folder is usually the class, already in the caption
            st.button(short if len(short) <= 10 else "…" + short[-9:], key=f"open|{index}", on_click=open_sample,
                      args=(index,), help=f"open {sample}")
    if st.session_state.get("sample") is None and shown:
        st.session_state.sample = shown[0]
    current = st.session_state.get("sample")
    if current is None:
        return
    if current not in indices:
        st.caption(md(f"The open {kind[:-1]}, {s.sample_ids[current]}, does not match these filters."))
    st.selectbox("Video" if s.is_video else "Sample", indices if current in indices else [current, *indices],
                 format_func=lambda i: s.sample_ids[i], key="sample", on_change=sample_picked)


# ---------------------------------------------------------------------------------------------- one sample
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
        st.error(f"Cannot use this upload: {md(error)}")
        return None
    name = f"upload:{upload.name}"
    if st.session_state.get("upload_seen") != upload.file_id:  # another file under a name seen before
        s.forget(name)
        st.session_state.upload_seen = upload.file_id
    return name, s.memo(("upload", name), lambda: s.backbone.embed_pil([image])), image


def show_prediction(s: EditorSession, probabilities: torch.Tensor, truth: int | None) -> None:
    names = s.model.class_names
    predicted = int(probabilities.argmax())
    st.subheader(md(f"Prediction: {names[predicted]} ({percent(float(probabilities[predicted]))})"))
    if truth is not None:
        verdict = "✓ correct" if truth == predicted else "✗ wrong"
        st.markdown(md(f"True class: {names[truth]}") + f" **{verdict}**")


def slider_key(name: str, concept: str) -> str:
    versions = st.session_state.setdefault("slider_versions", {})
    return f"c|{name}|{concept}|{versions.get((name, concept), 0)}"


def renew_sliders(name: str, concepts: list[str]) -> None:
    """New widget keys for these sliders, so they are drawn afresh at the session's values."""
    versions = st.session_state.setdefault("slider_versions", {})
    for concept in concepts:
        versions[(name, concept)] = versions.get((name, concept), 0) + 1


def slider_moved(s: EditorSession, name: str, concept: str, current: float) -> None:
    s.set_concept(name, concept, st.session_state[slider_key(name, concept)], current)


def set_to(s: EditorSession, name: str, concept: str, value: float, current: float) -> None:
    s.set_concept(name, concept, value, current)
    renew_sliders(name, [concept])


def reset_all(s: EditorSession, name: str) -> None:
    renew_sliders(name, list(s.intervention(name)))
    s.reset(name)


def influence(s: EditorSession, name: str, features: torch.Tensor | VideoSequences, current: torch.Tensor) -> torch.Tensor:
    """Each concept's largest contribution to any class [K] (for a video, its weight times its pooled value)."""
    def compute() -> torch.Tensor:
        if s.is_video:
            return s.model.contributions(features)[0].abs().amax(0)
        return s.model.contributions(features, current[None])[0].abs().amax(0)
    return s.memo(("influence", name), compute)


def concept_sliders(s: EditorSession, name: str, features: torch.Tensor | VideoSequences, current: torch.Tensor) -> None:
    """Sliders for the most influential concepts, the corrected ones, or those matching the search. Their
    values live in the session, so searching, paging or hiding a slider loses nothing."""
    model = s.model
    values = s.intervention(name)
    query = st.text_input("Search concepts", key="concept_search").strip().lower()
    order = influence(s, name, features, current).argsort(descending=True).tolist()
    if query:
        shown = [k for k in order if query in model.concept_names[k].lower()][:SEARCH_SHOWN]
    else:
        corrected = [model.concept_index(c) for c in values]
        shown = corrected + [k for k in order if k not in corrected][:max(0, SLIDERS_SHOWN - len(corrected))]
    st.button("Reset all concepts", key="reset", on_click=reset_all, args=(s, name), disabled=not values)
    if values:
        st.caption(f"{len(values)} concept(s) corrected: " + md(", ".join(values)))
    for k in shown:
        concept = model.concept_names[k]
        now = float(current[k])
        low, high = s.references(concept)
        lo, hi = s.concept_range(k)
        lo, hi = min(lo, now), max(hi, now)
        value = values.get(concept, now)
        marks = [f"model's value {now:.3g}"] + ([f"typical when absent {low:.3g}"] if low is not None else []) + (
            [f"typical when present {high:.3g}"] if high is not None else [])
        slider, absent, present, reset = st.columns([5, 2, 2, 2], vertical_alignment="bottom")
        slider.slider(md(concept), lo, hi, min(max(value, lo), hi), (hi - lo) / 100 or 0.01,
                      key=slider_key(name, concept), on_change=slider_moved, args=(s, name, concept, now),
                      help="; ".join(marks))
        if low is not None:
            absent.button("absent", key=f"absent|{name}|{concept}", on_click=set_to, args=(s, name, concept, low, now),
                          help=f"set to {low:.3g}, the typical value when the concept is absent")
        if high is not None:
            present.button("present", key=f"present|{name}|{concept}", on_click=set_to,
                           args=(s, name, concept, high, now),
                           help=f"set to {high:.3g}, the typical value when the concept is present")
        reset.button("reset", key=f"undo|{name}|{concept}", on_click=set_to, args=(s, name, concept, now, now),
                     disabled=concept not in values, help=f"back to the model's value {now:.3g}")
        st.caption(md(" · ".join(marks)) + (f" · **set to {value:.3g}**" if concept in values else ""))


def two_series(what: str, index: list[str], before, after) -> pd.DataFrame:
    """A before/after frame for a grouped bar chart of ``what`` (the index: class or concept names)."""
    return pd.DataFrame({"before": [float(v) for v in before], "after": [float(v) for v in after]},
                        index=pd.Index(index, name=what))


def one_series(what: str, index: list[str], values) -> pd.DataFrame:
    return pd.DataFrame({"now": [float(v) for v in values]}, index=pd.Index(index, name=what))


def bars(frame: pd.DataFrame, value_label: str) -> None:
    """Horizontal bars, largest (after the change) on top, every row labelled; grouped when before/after. A plain
    Vega-Lite spec: ``st.bar_chart`` builds and validates an Altair chart (~40 ms a chart on every slider move) and
    adds pan/zoom handlers nobody needs here."""
    frame = frame.sort_values(frame.columns[-1], ascending=False)
    what, series = frame.index.name, list(frame.columns)
    long = frame.reset_index().melt(id_vars=what, var_name="series", value_name="value")
    encoding = {"y": {"field": what, "type": "nominal", "sort": None, "title": None, "axis": {"labelLimit": 260}},
                "x": {"field": "value", "type": "quantitative", "title": value_label},
                "tooltip": [{"field": what, "type": "nominal"}, {"field": "series", "type": "nominal"},
                            {"field": "value", "type": "quantitative", "format": ".3f"}]}
    if len(series) > 1:
        encoding["yOffset"] = {"field": "series", "sort": series}
        encoding["color"] = {"field": "series", "type": "nominal", "sort": series,
                             "legend": {"orient": "bottom", "title": None}}
    st.vega_lite_chart(long, {"mark": "bar", "height": 40 + len(frame) * (14 + 10 * len(series)),
                              "encoding": encoding}, width="stretch")


def top_rows(before: torch.Tensor, after: torch.Tensor, k: int = CHART_ROWS) -> list[int]:
    return (before.abs() + after.abs()).argsort(descending=True)[:k].tolist()


def show_outcome(s: EditorSession, name: str, outcome: InterventionOutcome) -> bool:
    """Before/after, side by side with the sliders: the prediction, the drivers, the contributions; True when
    the intervention was just recorded."""
    model = s.model
    names = model.class_names
    old, new = outcome.predicted_before, outcome.predicted_after
    st.markdown(md(f"New prediction: {names[new]} ({percent(float(outcome.after[new]))})")
                .join(["**", "**"]) + md(f" (was {names[old]} {percent(float(outcome.before[old]))})"))
    rows = top_rows(outcome.before, outcome.after)
    bars(two_series("class", [names[r] for r in rows], outcome.before[rows], outcome.after[rows]), "probability")
    drivers = sorted(outcome.drivers.items(), key=lambda kv: -abs(kv[1]))
    between = f"{names[new]} over {names[outcome.rival]}"
    st.caption(md(f"What moved the decision ({between}, logit margin {outcome.margin:+.2f} in all): " +
                  ", ".join(f"{concept} {effect:+.2f}" for concept, effect in drivers) +
                  (f"; together beyond each alone {outcome.interaction:+.2f}" if abs(outcome.interaction) >= 0.005
                   else "")))
    if outcome.contributions_after is not None:
        rows = top_rows(outcome.contributions_before, outcome.contributions_after)
        st.markdown(md(f"Concept contributions to {names[new]}, before and after"))
        bars(two_series("concept", [model.concept_names[r] for r in rows], outcome.contributions_before[rows],
                        outcome.contributions_after[rows]), f"contribution to the logit of {names[new]}")
    if hasattr(model, "propagate"):
        concept_shifts(s, name, outcome)
    return st.button("Record this intervention in the audit trail", key="record", on_click=record,
                     args=(s, name, outcome))


def record(s: EditorSession, name: str, outcome: InterventionOutcome) -> None:
    s.record_intervention(name, outcome, dict(s.intervention(name)))
    flash("success", "Recorded in the audit trail.")


def concept_shifts(s: EditorSession, name: str, outcome: InterventionOutcome, top: int = 10) -> None:
    """Energy models re-infer the concepts you did not touch: which ones moved, and how far (the same
    probabilities the contribution chart is computed at)."""
    model = s.model
    corrected = {model.concept_index(c) for c in s.intervention(name)}
    shift = outcome.concepts_after - outcome.concepts_before
    order = [k for k in shift.abs().argsort(descending=True).tolist() if k not in corrected and abs(float(shift[k])) >= 0.01]
    st.markdown("**How the other concepts respond**")
    if not order:
        st.caption("No other concept moved by 0.01 or more.")
        return
    order = order[:top]
    names = [model.concept_names[k] for k in order]
    bars(two_series("concept", names, outcome.concepts_before[order], outcome.concepts_after[order]),
         "concept probability")
    st.caption(md("Probability before -> after the correction: " + ", ".join(
        f"{name} {float(outcome.concepts_before[k]):.2f} -> {float(outcome.concepts_after[k]):.2f}"
        for name, k in zip(names, order))))


def show_unchanged(s: EditorSession, name: str, features: torch.Tensor | VideoSequences,
                   probabilities: torch.Tensor, current: torch.Tensor) -> None:
    """The right-hand column before any correction: the probabilities and the contributions as they are."""
    model = s.model
    names = model.class_names
    predicted = int(probabilities.argmax())
    st.caption("Move a slider (or press absent/present): the new prediction and what moved it appear here.")
    rows = probabilities.argsort(descending=True)[:CHART_ROWS].tolist()
    bars(one_series("class", [names[r] for r in rows], probabilities[rows]), "probability")
    if not s.is_video:
        e = explanation(s, name, features)
        labels = [concept for concept, _, _ in e.top] + ["all other concepts", "not from concepts"]
        st.markdown(md(f"Why {names[predicted]}: contributions to its logit (they add up to it)"))
        bars(one_series("concept", labels, [value for _, _, value in e.top] + [e.other, e.rest]),
             f"contribution to the logit of {names[predicted]}")


def sample_view(s: EditorSession, name: str, features: torch.Tensor):
    """``explain``'s view of one sample under the current model version (kept)."""
    return s.memo(("view", name), lambda: make_view(s.model, EvalData(features, None, ids=[name])))


def explanation(s: EditorSession, name: str, features: torch.Tensor):
    """The sample's top contributions to its predicted class, the other concepts' and the rest (``explain``)."""
    return s.memo(("explanation", name), lambda: explain_samples(sample_view(s, name, features), rows=[0],
                                                                 k=CHART_ROWS, counterfactuals=False)[0])


def counterfactual_section(s: EditorSession, name: str, features: torch.Tensor) -> None:
    """The smallest change that flips the prediction: at once where the search is cheap (additive heads), on
    request where every try re-runs the model."""
    view = sample_view(s, name, features)
    # whether interventions are head(concepts) + offset is the model's property: checked on the first sample opened
    if s.memo(("additive",), lambda: view.additive) or st.session_state.get("search_counterfactual") == (id(s.model), name):
        with st.spinner("Searching the smallest change that flips it..."):
            found = s.memo(("counterfactual", name), lambda: counterfactual(view, row=0))
        st.markdown("**Smallest change that flips it:** " + md(found.describe()))
    else:
        st.button("Find the smallest change that flips it", key="counterfactual", on_click=search_counterfactual,
                  args=(s, name), help="each try re-runs this model's inference, so this takes a few seconds")


def search_counterfactual(s: EditorSession, name: str) -> None:
    st.session_state.search_counterfactual = (id(s.model), name)


def explain_video(s: EditorSession, index: int, video: VideoSequences, predicted: int) -> None:
    """A video's per-window concept timeline."""
    model = s.model
    label = model.class_names[predicted]

    def figure() -> bytes:
        from explain.plots import timeline_figure  # matplotlib is imported for video models only

        explanation = model.explain(video, return_attention=False)
        return png(timeline_figure(explanation, model.concept_names, row=0, k=TIMELINE_CONCEPTS,
                                   windows=s.data.window_spans(index), decisive_window=int(model.decisive_windows(video)[0]),
                                   value_label=f"contribution to {label}"))
    st.subheader(md(f"Why {label}: concepts over time"))
    st.image(s.memo(("timeline", index), figure))
    st.caption("Each window's concepts times their weight for the predicted class; above, the weight the "
               "model's pooling gives each window (the most important one outlined); dashed: the decisive "
               "window, where the evidence for the predicted class rises most as the video unfolds.")


@st.fragment
def intervention_panel(s: EditorSession, name: str, features: torch.Tensor | VideoSequences,
                       probabilities: torch.Tensor, current: torch.Tensor) -> None:
    """The sliders and, beside them, what they do. A slider move reruns only this panel."""
    controls, results = st.columns([3, 2], gap="large")
    with controls:
        st.subheader("Intervene on concepts")
        if s.is_video:
            st.caption("A slider sets its concept in every window of the video; it starts at the video-level value "
                       "(the model's pooling of the windows' values).")
        concept_sliders(s, name, features, current)
    with results:
        outcome = s.outcome(name, features)
        if outcome is None:
            show_unchanged(s, name, features, probabilities, current)
        elif show_outcome(s, name, outcome):
            st.rerun()  # a full run: the confirmation shows at the top of the page


def explore(s: EditorSession) -> None:
    index, truth = None, None
    picked = upload_box(s)
    if picked is None:
        index = st.session_state.get("sample")
        if index is None:
            st.info("No sample is open: pick one in the sidebar.")
            return
        truth = int(s.labels[index])
        picked = s.sample_ids[index], s.sample(index), None
    name, features, image = picked
    probabilities, current = s.before(name, features, index)
    predicted = int(probabilities.argmax())
    st.divider()
    if s.is_video:
        st.image(s.memo(("frames", index), lambda: s.data.video_frames(index)),
                 caption=[f"{start}–{stop}" for start, stop in s.data.window_spans(index)], width=64)
        st.caption(f"{s.sample_ids[index]}: one frame per window (frames start–stop).")
        show_prediction(s, probabilities, truth)
    else:
        left, right = st.columns([1, 3])
        left.image(image if image is not None else s.data.thumbnail(index), width=160)
        with right:
            st.caption(md(f"sample: {name}"))
            show_prediction(s, probabilities, truth)
    intervention_panel(s, name, features, probabilities, current)
    st.divider()
    if s.is_video:
        explain_video(s, index, features, predicted)
    else:
        counterfactual_section(s, name, features)


# ---------------------------------------------------------------------------------------------- editing
def prune_target() -> list[str] | None:
    target = st.session_state.get("edit_class", "all classes")
    return None if target == "all classes" else [target]


def preview(s: EditorSession) -> None:
    st.session_state.preview_request = (st.session_state.edit_concept, st.session_state.get("edit_class", "all classes"))


def prune(s: EditorSession) -> None:
    concept = st.session_state.edit_concept
    try:
        applied = s.apply_edit(concept, prune_target(), st.session_state.get("edit_reason", ""))
    except ValueError as error:
        flash("warning", md(error))
        return
    st.session_state.last_edit = applied
    st.session_state.pop("preview_request", None)
    flash("success", md(f"Pruned {concept} for {applied.target}") +
          f": accuracy {applied.before.accuracy:.3f} -> {applied.after.accuracy:.3f} on this data.")


def undo(s: EditorSession) -> None:
    s.undo()
    st.session_state.pop("last_edit", None)
    flash("info", f"Undone; accuracy is back to {s.validation_accuracy():.3f}.")


def show_preview(s: EditorSession, p: EditPreview, title: str) -> None:
    """An edit's effect: accuracy before/after, the current sample, the flipped samples, per-class accuracy."""
    names = s.model.class_names
    st.markdown(f"**{title}**")
    if p.after is None:
        st.info(md(f"{p.concept} is already pruned for {p.target}: nothing to do."))
        return
    if p.already:
        st.caption(md(f"Already pruned for {', '.join(p.already)}: those classes are left as they are."))
    st.markdown(f"Accuracy on this data: {p.before.accuracy:.3f} -> **{p.after.accuracy:.3f}**")
    sample = st.session_state.get("sample")
    if isinstance(sample, int) and sample < len(s.sample_ids):
        b, a = p.before.probabilities[sample], p.after.probabilities[sample]
        st.markdown(md(f"This sample ({s.sample_ids[sample]}): {names[int(b.argmax())]} {percent(float(b.max()))} -> "
                       f"{names[int(a.argmax())]} {percent(float(a.max()))}"))
    flipped = p.flipped
    fixed, broken = (sum(bool(outputs.correct[i]) for i in flipped) for outputs in (p.after, p.before))
    st.markdown(f"{len(flipped)} samples change their prediction: {fixed} become right, {broken} become wrong, "
                f"{len(flipped) - fixed - broken} go from one wrong class to another.")
    if flipped:
        st.dataframe(pd.DataFrame({
            "sample": [s.sample_ids[i] for i in flipped],
            "true class": [names[int(s.labels[i])] for i in flipped],
            "before": [names[int(p.before.predicted[i])] for i in flipped],
            "after": [names[int(p.after.predicted[i])] for i in flipped]}), hide_index=True, height=180)
    per_class = pd.DataFrame({"class": names, "accuracy before": p.before.class_accuracy(),
                              "accuracy after": p.after.class_accuracy()})
    per_class["change"] = per_class["accuracy after"] - per_class["accuracy before"]
    st.dataframe(per_class.sort_values("change", key=abs, ascending=False), hide_index=True, height=220,
                 column_config={c: st.column_config.NumberColumn(format="%.3f")
                                for c in ("accuracy before", "accuracy after", "change")})


def edit_globally(s: EditorSession) -> None:
    model = s.model
    st.subheader("Prune a concept")
    concept = st.selectbox("Concept", model.concept_names, key="edit_concept")
    target = st.selectbox("For class", ["all classes", *model.class_names], key="edit_class")
    st.text_input("Why (kept in the model's edit history)", key="edit_reason")
    already = set(prune_target() or model.class_names) <= pruned_classes(s.model, concept)
    if already:
        st.info(md(f"{concept} is already pruned for {target}: nothing to do."))
    left, right, undo_column = st.columns(3)
    left.button("Preview the prune", key="preview", on_click=preview, args=(s,), disabled=already)
    right.button("Prune", key="prune", on_click=prune, args=(s,), disabled=already, type="primary")
    undo_column.button("Undo the last edit", key="undo", on_click=undo, args=(s,), disabled=not s.history)
    if st.session_state.get("preview_request") == (concept, target) and not already:
        with st.spinner("Computing the edit's effect on every sample..."):
            show_preview(s, s.preview_edit(concept, prune_target()), "If you prune it")
    last = st.session_state.get("last_edit")
    if last is not None and last.edited is model:
        show_preview(s, last, f"The last edit: {md(last.concept)} pruned for {md(last.target)}")
    st.markdown(f"Edits in this model's history: {len(model.edits_)}")
    for edit in model.edits_:
        st.caption(md(describe_edit(edit)))
    st.subheader("Save")
    st.text_input("Save the edited model as", value=str(s.model_path.with_name(s.model_path.stem + "-edited.cbm")),
                  key="save_path")
    st.checkbox("Replace the file if it exists", key="overwrite")
    st.button("Save", key="save", on_click=save, args=(s,))


def save(s: EditorSession) -> None:
    try:
        saved = s.save(st.session_state.save_path, overwrite=st.session_state.get("overwrite", False))
    except (FileExistsError, OSError, ValueError) as error:
        flash("error", md(error))
    else:
        flash("success", md(f"Saved to {saved}."))


def audit_trail(s: EditorSession) -> None:
    if not s.trail:
        st.info("Nothing recorded yet: interventions you record and every edit appear here.")
        return
    st.dataframe(pd.DataFrame(s.trail_rows()), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.3f")
                                for c in ("accuracy_before", "accuracy_after")})
    st.download_button("Download JSON", s.trail_json(), "audit_trail.json", "application/json", key="dl_json")
    st.download_button("Download CSV", s.trail_csv(), "audit_trail.csv", "text/csv", key="dl_csv")


def main() -> None:
    try:
        s = session()
    except (OSError, ValueError, RuntimeError) as error:
        OPENING.empty()
        st.error(f"Cannot open the model: {md(error)}")
        st.stop()
    OPENING.empty()
    progress = st.empty()  # drawn on every run, so the tabs below keep their place
    if not s.outputs().ready:
        progress.info(f"Running the model on the {len(s.sample_ids)} {'videos' if s.is_video else 'samples'} (once "
                      "per model version, shared by every browser session)...")
        s.outputs().probabilities
        progress.empty()
    show_flash()
    st.session_state.pop("sample_changed", None)  # this run draws the picked sample
    sidebar(s)
    # only the open tab runs (switching tabs reruns the page): a sample change does not redraw the others
    tabs = st.tabs(list(TABS), key="tab", on_change="rerun")
    for tab, draw in zip(tabs, TABS.values()):
        if tab.open:
            with tab:
                draw(s)


TABS = {"Explore and intervene": explore, "Edit the model": edit_globally, "Audit trail": audit_trail}

main()
