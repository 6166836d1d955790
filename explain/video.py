"""What an audit adds for temporal (video) models: attention and concept interventions, per-video
timelines and the localisation of the most important window.

Everything works on a :class:`~explain.core.VideoView` of a fitted
:class:`~cbm.models.temporal.TemporalCBM` and returns JSON-able values:

- ``attention_modes``: accuracy with the learned attention and with each attention intervention
  (identity, uniform, reversed, shuffled), and how many predictions each changes;
- ``zeroed_top_concepts``: accuracy when every video's ``k`` most contributing concepts are set to
  zero in every window (a deletion test of the bottleneck);
- ``timeline``: one video's per-window contributions of chosen concepts, its time importance, most
  important window, evidence over time and decisive window (the numbers behind
  :func:`explain.plots.timeline_figure`);
- ``localisation``: the share of correctly classified videos whose decisive window (where the
  evidence for the predicted class rises most) overlaps a ground-truth event span, against the share
  a random window would reach;
- ``dataset_events``: those spans from a dataset that knows them (``toy:videos``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cbm.models.temporal import ATTENTION_MODES, localisation_hits
from explain.core import VideoView

Spans = Sequence[tuple[int, int]]


def attention_modes(view: VideoView, seeds: Sequence[int] = (0,)) -> list[dict[str, Any]]:
    """Per attention mode (``learned`` first, then the model's interventions): accuracy and the share
    of predictions that differ from the learned attention's; ``shuffled`` is averaged over ``seeds``."""
    y = view.labels("attention modes")
    rows = [{"mode": "learned", "accuracy": float((view.predictions == y).float().mean()), "changed": 0.0, "seeds": 1}]
    for mode in ATTENTION_MODES:
        runs = seeds if mode == "shuffled" else seeds[:1]
        predicted = [view.model.intervene(view.sequences, attention_mode=mode, seed=seed).argmax(1) for seed in runs]
        rows.append({"mode": mode, "accuracy": float(np.mean([float((p == y).float().mean()) for p in predicted])),
                     "changed": float(np.mean([float((p != view.predictions).float().mean()) for p in predicted])),
                     "seeds": len(runs)})
    return rows


def top_concept_mask(view: VideoView, k: int) -> torch.Tensor:
    """[N, T, K] mask of every video's ``k`` concepts with the largest time-weighted contribution to
    its predicted class, in every window."""
    importance = view.explanation.concept_importance
    chosen = torch.zeros_like(importance, dtype=torch.bool)
    chosen.scatter_(1, importance.argsort(dim=1, descending=True)[:, :k], True)
    return chosen[:, None, :].expand(-1, view.sequences.valid.shape[1], -1).contiguous()


def zeroed_top_concepts(view: VideoView, counts: Sequence[int] = (1, 3, 5)) -> list[dict[str, Any]]:
    """Accuracy and changed predictions when every video's top ``k`` concepts (for each ``k`` in
    ``counts``, at most the number of concepts) are set to zero in every window of the bottleneck."""
    y = view.labels("concept zeroing")
    rows = []
    for k in sorted({min(int(c), len(view.concept_names)) for c in counts if c > 0}):
        mask = top_concept_mask(view, k)
        predicted = view.model.intervene(view.sequences, (mask, torch.zeros(mask.shape))).argmax(1)
        rows.append({"concepts": k, "accuracy": float((predicted == y).float().mean()),
                     "changed": float((predicted != view.predictions).float().mean())})
    return rows


def event_windows(view: VideoView, row: int, spans: Spans) -> list[int]:
    """The windows of video ``row`` that overlap one of the event ``spans`` (frames, [start, stop))."""
    windows = view.sequences.window_spans[row][view.sequences.valid[row]].tolist()
    return [t for t, (start, stop) in enumerate(windows) if any(start < b and a < stop for a, b in spans)]


def localisation(view: VideoView, events: Sequence[Spans]) -> dict[str, Any]:
    """How often the decisive window of a correctly classified video overlaps one of its event spans
    (``events``: per video, frame spans), and how often a random window of the video would."""
    y = view.labels("localisation")
    correct = view.predictions == y
    hits = localisation_hits(view.decisive_windows, view.sequences.window_spans, events)[correct]
    lengths = view.sequences.valid.sum(1)
    chance = [len(event_windows(view, row, events[row])) / int(lengths[row]) for row in correct.nonzero().flatten()]
    return {"videos": int(correct.sum()), "hits": int(hits.sum()),
            "rate": float(hits.float().mean()) if len(hits) else None,
            "chance": float(np.mean(chance)) if chance else None,
            "videos_with_events": int(sum(bool(spans) for spans in events))}


def timeline(view: VideoView, row: int, concepts: Sequence[str], events: Spans | None = None) -> dict[str, Any]:
    """The numbers of video ``row``'s timeline: per-window contributions of ``concepts`` to the
    predicted class, time importance, the most important window, the predicted class's evidence as
    the video unfolds, the decisive window and (with ``events``) the windows that overlap an event."""
    e = view.explanation
    valid = e.valid[row]
    columns = [view.concept_names.index(name) for name in concepts]
    predicted = int(e.prediction[row])
    labels = view.data.labels
    result = {"id": view.data.ids[row], "row": row,
              "true": None if labels is None else view.class_names[int(labels[row])],
              "predicted": view.class_names[predicted],
              "probability": float(torch.softmax(e.logits[row], dim=0)[predicted]),
              "windows": view.sequences.window_spans[row][valid].tolist(),
              "time_importance": e.time_importance[row][valid].tolist(),
              "most_important_window": int(e.most_important_window()[row]),
              "evidence": view.evidence[row][valid].tolist(),
              "decisive_window": int(view.decisive_windows[row]),
              "concepts": list(concepts),
              "contributions": e.window_contributions[row][valid][:, columns].T.tolist()}
    if events is not None:
        result["event_windows"] = event_windows(view, row, events)
        result["hit"] = result["decisive_window"] in result["event_windows"]
    return result


def dataset_events(dataset: Any) -> dict[str, list[tuple[int, int]]] | None:
    """Per video id, the frame spans of the class-defining events, from a dataset with
    ``video_ids`` and ``event_spans(v, defining_only=True)`` (e.g. ``toy:videos``); None otherwise."""
    if dataset is None or not (hasattr(dataset, "event_spans") and hasattr(dataset, "video_ids")):
        return None
    return {vid: [(int(e["start"]), int(e["stop"])) for e in dataset.event_spans(v, defining_only=True)]
            for v, vid in enumerate(dataset.video_ids)}


def events_of(view: VideoView, events: Mapping[str, Spans] | None) -> list[Spans] | None:
    """``events`` (per video id) in the view's video order; None unless every video has an entry."""
    if events is None or any(vid not in events for vid in view.data.ids):
        return None
    return [list(events[vid]) for vid in view.data.ids]
