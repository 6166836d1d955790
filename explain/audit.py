"""Audit reports: one self-contained HTML page and one JSON file holding every number in it.

``audit(model, data, ...)`` computes everything into a JSON-able dict first and renders the
HTML from that dict only, so the two cannot disagree: every number in the page is a
``<data value=... data-path=...>`` element whose path points into the JSON. Figures are inline SVG
(thumbnails inline PNG); the page has no script and loads nothing.

Sections: model card, accuracy against baselines, confusion matrix, global concept importance,
explained samples (correct and wrong, with counterfactuals), intervention curves, suspect
concepts, concept quality, metrics (sparsity, completeness, leakage), edit history.
``audit_many`` runs a batch over models x datasets and writes an index with a summary table
(and the models' stability when several share concepts and classes); ``gates`` turn
``metric=value`` lower bounds into failures for CI exit codes.

Temporal (video) models get the same report on whole videos (see :class:`~explain.core.VideoView`:
time-weighted contributions, video-level pooled concepts, a probe on time-averaged embeddings)
where explained samples become per-window concept timelines, intervention curves become accuracy
under attention interventions and zeroed top concepts, and localisation is added when the videos'
event spans are known (:mod:`explain.video`); sections that need what videos lack (suspect
concepts, concept-correction curves) are listed in ``omitted`` with the reason and shown as a note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cbm.files import atomic_write_text
from cbm.models.base import ConceptBottleneckModel
from cbm.models.temporal import VideoSequences
from cbm.untrusted import for_utf8
from explain import metrics, video
from explain.core import DataLike, EvalData, ModelView, VideoView, make_view
from explain.explanations import Importance, concept_effects, explain_samples, global_importance
from explain.interventions import POLICY_LABELS, intervention_curves

if TYPE_CHECKING:  # matplotlib loads only when a report draws its figures
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

FamilyExtra = Callable[[ConceptBottleneckModel, ModelView | VideoView], dict[str, Any]]
FAMILY_EXTRAS: dict[str, FamilyExtra] = {}
EFFECTIVE_MASS = 0.9
GATE_METRICS = ("accuracy", "balanced_accuracy", "min_class_accuracy", "completeness", "concept_auc",
                "concept_accuracy", "shift_accuracy", "oracle_gain", "probe_accuracy", "localisation")
OMITTED_FOR_VIDEOS = {
    "samples": "shown as per-window concept timelines below.",
    "interventions": "concept-correction curves need concept labels per video; see the attention and concept "
                     "interventions instead.",
    "suspects": "the ablation and plausibility tests work on single embeddings, not on sequences of windows."}
TIMELINE_CONCEPTS = 8


def register_family_extra(family: str, extra: FamilyExtra) -> None:
    """Add a family-specific section to the model card (``extra(model, view) -> dict`` of JSON values)."""
    FAMILY_EXTRAS[family] = extra


def _posthoc_extra(model: ConceptBottleneckModel, view: ModelView) -> dict[str, Any]:
    """Post-hoc CBM: concept bank provenance, CAV quality, sparsity, the residual's share (PCBM-h)."""
    bank = model.bank
    extra: dict[str, Any] = {"bank_kind": bank.kind, "bank_provenance": bank.provenance,
                             "nonzero_weights_per_class": model.sparsity(), "hybrid": bool(model.hybrid)}
    if "val_accuracy" in bank.stats:
        extra["cav_validation_accuracy_mean"] = float(bank.stats["val_accuracy"].mean())
    if model.hybrid:
        residual = model.residual(view.data.features)
        extra["residual_logit_share"] = float(residual.abs().mean() / view.logits.abs().mean().clamp_min(1e-12))
    return extra


def _energy_extra(model: ConceptBottleneckModel, view: ModelView) -> dict[str, Any]:
    """Energy CBM: the concepts the global energy finds most probable for each class, p(c | y)."""
    probabilities = model.conditionals()["p_c_given_y"]
    return {"most_probable_concepts_per_class": {
        name: {view.concept_names[k]: float(row[k]) for k in torch.as_tensor(row).argsort(descending=True)[:3].tolist()}
        for name, row in zip(view.class_names, probabilities)}}


def _temporal_extra(model: ConceptBottleneckModel, view: VideoView) -> dict[str, Any]:
    """Temporal CBM (MoTIF): attention kind, pooling temperature, windows per video, the concepts
    with the sharpest attention over time."""
    lengths = view.sequences.lengths.float()
    temperatures = sorted(model.temperatures().items(), key=lambda item: -item[1])[:3]
    return {"attention": model.attention, "pooling_tau": model.tau, "windows_audited": int(lengths.sum()),
            "windows_per_video": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
            "sharpest_attention_temperatures": dict(temperatures)}


register_family_extra("posthoc", _posthoc_extra)
register_family_extra("energy", _energy_extra)
register_family_extra("temporal", _temporal_extra)


# ---------------------------------------------------------------------------------------------- numbers


def jsonable(value: Any) -> Any:
    """Tensors, arrays, numpy scalars and dataclasses to plain JSON values (NaN/inf become None); strings
    (and keys) that UTF-8 cannot encode, such as ids from undecodable file names, show those bytes as
    ``\\xff`` escapes (:func:`cbm.untrusted.for_utf8`)."""
    if isinstance(value, str):
        return for_utf8(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {for_utf8(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    return value


def format_number(value: float | None) -> str:
    """How every number appears in the HTML: integers as is, other numbers with 3 decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, int)):
        return str(int(value))
    return f"{value:.3f}"


def pointer(*keys: str | int) -> str:
    """A JSON pointer (RFC 6901) to ``keys``."""
    return "".join("/" + str(key).replace("~", "~0").replace("/", "~1") for key in keys)


def resolve(document: Any, path: str) -> Any:
    """The value at a JSON pointer."""
    for part in path.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """One audit: ``data`` (the JSON), the figures (reusable), the HTML, and where they were written."""

    name: str
    data: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    html: str = ""
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float | None]:
        return self.data["summary"]

    @property
    def failures(self) -> list[str]:
        return self.data.get("gates", {}).get("failures", [])

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write ``report.json`` and ``report.html`` into the folder ``out``, each atomically (a reader never
        sees a half-written report)."""
        out = Path(out)
        self.paths = {"html": out / "report.html", "json": out / "report.json"}
        atomic_write_text(self.paths["json"], json.dumps(self.data, indent=1, allow_nan=False))
        atomic_write_text(self.paths["html"], self.html)
        return self.paths


def parse_gates(items: Sequence[str]) -> dict[str, float]:
    """``["accuracy=0.8", ...]`` -> ``{"accuracy": 0.8}``; unknown metrics are an error."""
    gates = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--fail-under takes METRIC=VALUE, got {item!r}.")
        if name not in GATE_METRICS:
            raise ValueError(f"unknown metric {name!r} for --fail-under; choose from {', '.join(GATE_METRICS)}.")
        gates[name] = float(value)
    return gates


def check_gates(summary: Mapping[str, float | None], gates: Mapping[str, float]) -> list[str]:
    """One message per gate that fails (a metric below its bound, or not computed)."""
    failures = []
    for name, bound in gates.items():
        value = summary.get(name)
        if value is None:
            failures.append(f"{name} was not computed (needs data this audit did not get), required >= {bound}")
        elif value < bound:
            failures.append(f"{name} = {value:.4f} < {bound}")
    return failures


def _thumbnail(images: Any, sample_id: str, size: int = 96) -> str | None:
    """A PNG data URI of the sample's image (the middle frame of a video window), or None."""
    if images is None or sample_id not in images.ids:
        return None
    image = images.load(images.ids.index(sample_id))
    if isinstance(image, list):
        image = image[len(image) // 2]
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pick_samples(view: ModelView | VideoView, count: int) -> list[int]:
    """Up to ``count`` correct and ``count`` wrong samples, the most confident of each."""
    confidence = torch.softmax(view.logits, dim=1).max(dim=1).values
    correct = view.predictions == view.data.labels
    rows = []
    for group in (correct, ~correct):
        index = torch.nonzero(group).flatten()
        rows += index[confidence[index].argsort(descending=True)[:count]].tolist()
    return rows


def audit(model: ConceptBottleneckModel, data: DataLike | EvalData | VideoSequences, *, name: str = "model",
          data_name: str = "data", train: DataLike | EvalData | VideoSequences | None = None,
          shift: DataLike | EvalData | VideoSequences | None = None, images: Any = None,
          events: Mapping[str, video.Spans] | None = None, plausibility: Any = None, seeds: Sequence[int] = (0, 1, 2),
          competences: Sequence[float] = (1.0, 0.8), max_samples: int = 2000, examples: int = 3,
          gates: Mapping[str, float] | None = None, out: str | Path | None = None,
          progress: bool = True) -> Report:
    """Audit one model on one labelled split; see the module docstring for the sections.

    ``train``: the training split (probes for completeness and leakage, the in-distribution side
    of the shift test); ``shift``: a shifted split (accuracy, and the suspects whose ablation costs
    accuracy on train but not there); ``images``: the dataset behind ``data`` (thumbnails, matched by
    id); ``plausibility``: P(concept | class) [C, K], else estimated from the concept labels of the
    shifted split, else of ``data``. ``gates``: ``{metric: lower bound}`` (see ``GATE_METRICS``).
    Temporal models take window Embeddings of a video dataset or VideoSequences; ``events``: per
    video id, the frame spans of its ground-truth events (default: from ``images`` when it knows them).
    The classes of Embeddings are matched to the model's by name (:func:`cbm.embed.match_classes`; data
    with classes the model does not know is an error naming them).
    """
    from explain import plots  # matplotlib is imported here, when a report draws its figures

    started = time.perf_counter()
    timings: dict[str, float] = {}
    stages = tqdm(total=8, desc=f"audit {name} on {data_name}", disable=not progress, leave=False)

    def stage(label: str, since: float) -> float:
        timings[label] = time.perf_counter() - since
        stages.update(1)
        return time.perf_counter()

    view = make_view(model, data, data_name)
    if view.data.labels is None:
        raise ValueError("an audit needs class labels in the data.")
    videos = isinstance(view, VideoView)
    train_view = None if train is None else make_view(model, train, "train")
    shift_view = None if shift is None else make_view(model, shift, "shift")
    now = time.perf_counter()

    report: dict[str, Any] = {"name": name, "data": data_name, "samples_audited": len(view.data)}
    report["model"] = _model_card(model, view)
    classification = metrics.classification(view)
    report["classification"] = classification
    completeness = metrics.completeness(view, train_view)
    probe = "linear probe on time-averaged embeddings" if videos else "linear probe on embeddings"
    baselines = [("model", classification["accuracy"]), (probe, completeness["probe_accuracy"]),
                 ("majority class", completeness["chance"])]
    recorded = model.metrics_.get("val_accuracy") if hasattr(model, "metrics_") else None
    if recorded is not None:
        baselines.append(("recorded validation accuracy", float(recorded)))
    if shift_view is not None:
        baselines.append(("model on the shifted split", float((shift_view.predictions == shift_view.data.labels)
                                                             .float().mean())))
    report["accuracy"] = [{"name": label, "accuracy": value} for label, value in baselines]
    now = stage("accuracy", now)

    importance = global_importance(view)
    report["importance"] = {"top": {c: [{"concept": k, "value": v} for k, v in rows]
                                    for c, rows in importance.top(5).items()},
                            "matrix": importance.values}
    report["metrics"] = {"effective_concepts": metrics.effective_concepts(importance, EFFECTIVE_MASS),
                         "effective_concept_mass": EFFECTIVE_MASS, **completeness,
                         **metrics.leakage(view, train_view)}
    now = stage("importance and metrics", now)

    if videos:
        figures, findings, now = _video_sections(report, view, importance, images, events, seeds, examples, stage,
                                                 now)
    else:
        figures, findings, now = _image_sections(report, view, train_view, shift_view, images, plausibility, seeds,
                                                 competences, max_samples, examples, stage, now)

    quality = metrics.concept_quality(view)
    report["concept_quality"] = quality
    report["edits"] = [asdict(edit) for edit in model.edits_]
    report["summary"] = _summary(report, shift_view, findings)
    report["gates"] = {"bounds": dict(gates or {}), "failures": check_gates(report["summary"], gates or {})}
    now = stage("concept quality", now)

    figures.update({"accuracy": plots.accuracy_figure(baselines),
                    "confusion": plots.confusion_figure(classification["confusion"], view.class_names),
                    "importance": plots.importance_figure(importance, highlight=[s["concept"] for s in
                                                                                 report.get("suspects", [])[:3]])})
    if quality["labelled"]:
        figures["concept quality"] = plots.concept_quality_figure(quality["concepts"])
    svgs = {key: plots.to_svg(figure) for key, figure in figures.items()}
    now = stage("plots", now)

    timings["total"] = time.perf_counter() - started
    report["timings_seconds"] = timings
    report = jsonable(report)
    page = render_html(report, svgs)
    stage("html", now)
    stages.close()
    result = Report(name, report, figures, page)
    if out is not None:
        result.write(out)
    logger.info("audit of %s on %s: accuracy %.3f, %d suspects, %.1f s (plots %.1f s)", name, data_name,
                classification["accuracy"], len(report.get("suspects", [])), timings["total"], timings["plots"])
    return result


Stage = Callable[[str, float], float]


def _image_sections(report: dict[str, Any], view: ModelView, train_view: ModelView | None,
                    shift_view: ModelView | None, images: Any, plausibility: Any, seeds: Sequence[int],
                    competences: Sequence[float], max_samples: int, examples: int, stage: Stage,
                    now: float) -> tuple[dict[str, Figure], dict[str, float | None], float]:
    """Explained samples, intervention curves and suspects into ``report``; their figures and the
    greedy oracle's gain for the summary."""
    from explain import plots

    explained = explain_samples(view, rows=_pick_samples(view, examples), k=5)
    report["samples"] = [{**e.to_dict(), "thumbnail": _thumbnail(images, e.id)} for e in explained]
    now = stage("explained samples", now)

    curves = intervention_curves(view, seeds=seeds, competences=competences, max_samples=max_samples)
    report["interventions"] = {**curves.to_dict(), "interval": "95% Student-t intervals across the seeds"}
    now = stage("interventions", now)

    report["suspects"] = _suspects(view, train_view, shift_view, plausibility, max_samples)
    now = stage("suspects", now)
    figures = {"interventions": plots.intervention_figure(curves)}
    figures.update({f"sample {i}": plots.contribution_figure(e) for i, e in enumerate(explained)})
    oracle = curves.curve("oracle") if ("oracle", 1.0) in curves.accuracy else None
    return figures, {"oracle_gain": None if oracle is None else float(oracle[-1] - oracle[0])}, now


def _video_sections(report: dict[str, Any], view: VideoView, importance: Importance, images: Any,
                    events: Mapping[str, video.Spans] | None, seeds: Sequence[int], examples: int, stage: Stage,
                    now: float) -> tuple[dict[str, Figure], dict[str, float | None], float]:
    """Timelines, attention and concept interventions and localisation into ``report``; their figures
    and the localisation rate for the summary."""
    from explain import plots

    spans = video.events_of(view, events if events is not None else video.dataset_events(images))
    top = importance.top(TIMELINE_CONCEPTS)
    timelines, figures = [], {}
    for i, row in enumerate(_pick_samples(view, examples)):
        predicted = view.class_names[int(view.predictions[row])]
        concepts = [c for c, _ in top.get(predicted, [])] or _own_top(view, row)
        entry = video.timeline(view, row, concepts, None if spans is None else spans[row])
        entry["frames"] = _window_thumbnails(images, view, row)
        timelines.append(entry)
        figures[f"timeline {i}"] = plots.timeline_figure(
            view.explanation, view.concept_names, row=row, concepts=entry["concepts"], windows=entry["windows"],
            event_windows=entry.get("event_windows", ()), decisive_window=entry["decisive_window"],
            title=f"{_short_id(entry['id'])}: true {entry['true']}, predicted {predicted}",
            value_label=f"contribution to {predicted}")
    report["timelines"] = timelines
    now = stage("timelines", now)

    attention = video.attention_modes(view, seeds)
    zeroed = video.zeroed_top_concepts(view)
    report["attention"] = {"modes": attention, "zeroed": zeroed, "shuffled_seeds": list(seeds)}
    figures["attention"] = plots.accuracy_figure(
        [(f"attention: {row['mode']}", row["accuracy"]) for row in attention]
        + [(f"top {row['concepts']} concepts zeroed", row["accuracy"]) for row in zeroed])
    now = stage("attention and concept interventions", now)

    report["omitted"] = dict(OMITTED_FOR_VIDEOS)
    if spans is None:
        report["omitted"]["localisation"] = ("the data carry no ground-truth event spans (pass events=, or the "
                                             "dataset, e.g. toy:videos, as images=).")
    else:
        report["localisation"] = video.localisation(view, spans)
    now = stage("localisation", now)
    return figures, {"localisation": report.get("localisation", {}).get("rate")}, now


def _own_top(view: VideoView, row: int) -> list[str]:
    """The concepts with the largest time-weighted contributions to video ``row``'s prediction."""
    order = view.explanation.concept_importance[row].argsort(descending=True)[:TIMELINE_CONCEPTS]
    return [view.concept_names[int(k)] for k in order]


def _short_id(sample_id: str) -> str:
    return sample_id if len(sample_id) <= 32 else "…" + sample_id[-31:]


def _window_thumbnails(images: Any, view: VideoView, row: int) -> list[str] | None:
    """PNG data URIs of the middle frame of every window of video ``row`` (None without the dataset)."""
    if images is None or view.window_ids is None:
        return None
    frames = [_thumbnail(images, window, size=48) for window in view.window_ids[row]]
    return None if None in frames else frames


def _model_card(model: ConceptBottleneckModel, view: ModelView | VideoView) -> dict[str, Any]:
    params = {key: value for key, value in model.get_params(deep=False).items()
              if isinstance(value, (str, int, float, bool, type(None)))}
    card = {"family": model.family or type(model).__name__, "class": type(model).__name__,
            "backbone": model.backbone_spec_, "backbone_fingerprint": model.backbone_fingerprint_,
            "concepts": len(view.concept_names), "classes": len(view.class_names), "parameters": params,
            "training": dict(model.training_) if hasattr(model, "training_") else {},
            "recorded_metrics": dict(model.metrics_) if hasattr(model, "metrics_") else {}}
    if model.family in FAMILY_EXTRAS:
        card["family_extras"] = FAMILY_EXTRAS[model.family](model, view)
    return card


def _suspects(view: ModelView, train_view: ModelView | None, shift_view: ModelView | None, plausibility: Any,
              max_samples: int) -> list[dict[str, Any]]:
    if plausibility is None:
        plausibility = metrics.class_concept_rates(shift_view) if shift_view is not None else None
        if plausibility is None:
            plausibility = metrics.class_concept_rates(view)
    drop_in = drop_shift = None
    if shift_view is not None:
        reference = train_view or view
        mean = reference.concepts.mean(dim=0)
        drop_in, drop_shift = metrics.ablation_drop(reference, mean), metrics.ablation_drop(shift_view, mean)
    return metrics.suspect_concepts(concept_effects(view, max_samples=max_samples), view.class_names,
                                    view.concept_names, plausibility=plausibility, drop_in=drop_in,
                                    drop_shift=drop_shift)


def _summary(report: dict[str, Any], shift_view: ModelView | VideoView | None,
             findings: Mapping[str, float | None]) -> dict[str, float | None]:
    classification = report["classification"]
    per_class = [v for v in classification["per_class_accuracy"].values() if v is not None]
    quality = report["concept_quality"]
    return {"accuracy": classification["accuracy"], "balanced_accuracy": classification["balanced_accuracy"],
            "min_class_accuracy": min(per_class), "probe_accuracy": report["metrics"]["probe_accuracy"],
            "completeness": report["metrics"]["completeness"], "leakage": report["metrics"]["leakage"],
            "concept_auc": quality["mean_auc"], "concept_accuracy": quality["mean_accuracy"],
            "shift_accuracy": None if shift_view is None else report["accuracy"][-1]["accuracy"],
            "oracle_gain": None, "localisation": None, **findings}


# ---------------------------------------------------------------------------------------------- HTML

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em;
color:#222;line-height:1.4}h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4}data{font-variant-numeric:tabular-nums}.fail{color:#b00020;font-weight:600}.ok{color:#1a7f37}
.samples{display:flex;flex-wrap:wrap;gap:12px}.sample{border:1px solid #ddd;border-radius:6px;padding:8px;width:330px}
.sample img{image-rendering:pixelated;float:right;margin-left:6px}.wrong{border-color:#d7301f}
.timeline{border:1px solid #ddd;border-radius:6px;padding:8px;margin:10px 0}.frames{display:flex;gap:2px;margin:6px 0}
.frames img{image-rendering:pixelated;border:1px solid #ccc}
svg{max-width:100%;height:auto}.note{color:#666;font-size:.85em}nav a{margin-right:.8em}
"""


class _Page:
    """Builds the HTML from the report dict; numbers only through :meth:`num`."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def num(self, *keys: str | int) -> str:
        path = pointer(*keys)
        value = resolve(self.report, path)
        return f'<data value="{html.escape(json.dumps(value))}" data-path="{html.escape(path)}">{format_number(value)}</data>'

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.add("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        self.add("".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows) + "</table>")


def _text(value: Any) -> str:
    return html.escape(str(value))


def render_html(report: dict[str, Any], svgs: Mapping[str, str]) -> str:
    """The self-contained page of one (JSON-able) report and its figures as inline SVG."""
    page = _Page(report)
    title = f"Audit of {report['name']} on {report['data']}"
    page.add(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_text(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{_text(title)}</h1>")
    omitted = report.get("omitted", {})
    sections = [(label, key, heading, render) for label, key, heading, render in SECTIONS
                if key in report or key in omitted]
    page.add("<nav>" + "".join(f"<a href='#{label.replace(' ', '-')}'>{label}</a>" for label, key, *_ in sections
                               if key not in omitted) + "</nav>")
    gates = report["gates"]
    if gates["bounds"]:
        verdict = ("<span class='fail'>FAILED</span>" + "<ul>" + "".join(f"<li>{_text(f)}</li>" for f in gates["failures"])
                   + "</ul>" if gates["failures"] else "<span class='ok'>passed</span>")
        page.add(f"<p>Gates {verdict}</p>")
        page.table(["metric", "required at least", "value"],
                   [[_text(k), page.num("gates", "bounds", k), page.num("summary", k)] for k in gates["bounds"]])
    for label, key, heading, render in sections:
        page.add(f"<h2 id='{label.replace(' ', '-')}'>{heading}</h2>")
        if key in omitted:
            page.add(f"<p class='note'>Not part of a video audit: {_text(omitted[key])}</p>")
        else:
            render(page, report, svgs)
    page.add("</body></html>")
    return "".join(page.parts)


def _is_video(report: Mapping[str, Any]) -> bool:
    return "attention" in report


def _html_model_card(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    card = report["model"]
    rows = [["family", _text(card["family"])], ["backbone", _text(card["backbone"])],
            ["backbone fingerprint", _text(card["backbone_fingerprint"])], ["concepts", page.num("model", "concepts")],
            ["classes", page.num("model", "classes")],
            ["videos audited" if _is_video(report) else "samples audited", page.num("samples_audited")]]
    rows += _key_values(page, ("model", "parameters"), card["parameters"])
    rows += _key_values(page, ("model", "training"), card["training"])
    rows += _key_values(page, ("model", "recorded_metrics"), card["recorded_metrics"])
    page.table(["", ""], rows)
    if "family_extras" in card:
        page.add(f"<h3>{_text(card['family'])} specifics</h3>")
        page.table(["", ""], _key_values(page, ("model", "family_extras"), card["family_extras"]))


def _html_accuracy(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.table(["", "accuracy"], [[_text(row["name"]), page.num("accuracy", i, "accuracy")]
                                  for i, row in enumerate(report["accuracy"])])
    page.add(svgs["accuracy"])


def _html_confusion(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add(f"<p>Balanced accuracy {page.num('classification', 'balanced_accuracy')}.</p>")
    page.add(svgs["confusion"])
    page.table(["class", "accuracy"], [[_text(c), page.num("classification", "per_class_accuracy", c)]
                                       for c in report["classification"]["per_class_accuracy"]])


def _html_importance(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add("<p class='note'>Mean contribution of a concept to the class's logit on the class's samples, minus its "
             "mean over all samples. " + ("Contributions of a video are time-weighted: each window's counts with the "
                                          "weight the model's pooling gives it." if _is_video(report)
                                          else "Suspect concepts are marked red.") + "</p>")
    page.add(svgs["importance"])
    page.table(["class", "top concepts"], [
        [_text(c), ", ".join(f"<span>{_text(item['concept'])}</span> ({page.num('importance', 'top', c, j, 'value')})"
                             for j, item in enumerate(items))] for c, items in report["importance"]["top"].items()])


def _html_samples(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add("<div class='samples'>")
    for i, sample in enumerate(report["samples"]):
        wrong = sample["true"] != sample["predicted"]
        image = f"<img src='{sample['thumbnail']}' width='96' height='96' alt='sample'>" if sample["thumbnail"] else ""
        cf = sample["counterfactual"]
        change = "; ".join(f"<span>{_text(c['concept'])}</span> {page.num('samples', i, 'counterfactual', 'changes', j, 'before')} "
                           f"&rarr; {page.num('samples', i, 'counterfactual', 'changes', j, 'after')}"
                           for j, c in enumerate(cf["changes"])) if cf else ""
        outcome = (f"would become <b>{_text(cf['new'])}</b>" if cf and cf["flipped"] else "no flip found")
        if cf:
            outcome += (" (exact search: no smaller set flips it)" if cf["search"] == "exact" and cf["changes"] else
                        " (exact search)" if cf["search"] == "exact" else " (greedy search: a smaller set may exist)")
        page.add(f"<div class='sample{' wrong' if wrong else ''}'>{image}<b>{_text(sample['id'])}</b><br>"
                 f"true <b>{_text(sample['true'])}</b>, predicted <b>{_text(sample['predicted'])}</b> "
                 f"(p = {page.num('samples', i, 'probability')})"
                 f"{svgs[f'sample {i}']}<p class='note'>Counterfactual: {change} {outcome}</p></div>")
    page.add("</div>")


def _html_timelines(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add("<p class='note'>The most confident correct and wrong videos. Frames: the middle frame of each window. "
             "Rows: the predicted class's top concepts; cells: each concept's contribution to the predicted class in "
             "each window; bars: the weight the pooling gives each window (time importance), the most important "
             "window outlined; dashed: the decisive window, where the evidence for the predicted class rises most as the "
             "video unfolds (the localisation measure); green: windows overlapping a ground-truth event.</p>")
    for i, entry in enumerate(report["timelines"]):
        wrong = entry["true"] != entry["predicted"]
        where = ""
        if "hit" in entry:
            where = "; it overlaps an event" if entry["hit"] else "; it does not overlap an event"
        page.add(f"<div class='timeline{' wrong' if wrong else ''}'><b>{_text(entry['id'])}</b>: true "
                 f"<b>{_text(entry['true'])}</b>, predicted <b>{_text(entry['predicted'])}</b> "
                 f"(p = {page.num('timelines', i, 'probability')}); most important window "
                 f"{page.num('timelines', i, 'most_important_window')}, decisive window "
                 f"{page.num('timelines', i, 'decisive_window')}{where}.")
        if entry["frames"]:
            page.add("<div class='frames'>" + "".join(f"<img src='{uri}' width='48' height='48' alt='window'>"
                                                      for uri in entry["frames"]) + "</div>")
        page.add(svgs[f"timeline {i}"] + "</div>")


def _html_interventions(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    curves = report["interventions"]
    page.add(f"<p class='note'>Truth: <span>{_text(curves['truth'])}</span>; {page.num('interventions', 'samples')} "
             f"samples; <span>{_text(curves['interval'])}</span>.</p>")
    page.add("<ul class='note'>" + "".join(f"<li><b>{_text(POLICY_LABELS.get(policy, policy))}</b>: "
                                           f"{_text(text)}</li>" for policy, text in curves["policies"].items())
             + "</ul>")
    page.add(svgs["interventions"])
    last = max(curves["counts"])
    page.table(["policy", "expert competence", "concepts corrected", "accuracy", "interval"], [
        [_text(POLICY_LABELS.get(row["policy"], row["policy"])), page.num("interventions", "rows", i, "competence"),
         page.num("interventions", "rows", i, "concepts"), page.num("interventions", "rows", i, "accuracy"),
         f"{page.num('interventions', 'rows', i, 'ci_low')} – {page.num('interventions', 'rows', i, 'ci_high')}"]
        for i, row in enumerate(curves["rows"]) if row["concepts"] in (0, min(5, last), last)])


ATTENTION_MODE_TEXT = {"learned": "the learned attention (the model as is)",
                       "identity": "identity: each window attends only to itself",
                       "uniform": "uniform: each window attends equally to every window",
                       "reversed": "reversed: each window reads the mirrored window's values",
                       "shuffled": "shuffled: keys permuted at random inside each video"}


def _html_attention(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add("<p class='note'>Accuracy when the attention over time is replaced (a model that uses the order of "
             "events loses accuracy under reversed and shuffled attention), and when each video's most "
             "contributing concepts are set to zero in every window. Changed: the share of predictions that differ "
             "from the model's.</p>")
    page.add(svgs["attention"])
    modes = [[_text(ATTENTION_MODE_TEXT.get(row["mode"], row["mode"])), page.num("attention", "modes", i, "accuracy"),
              page.num("attention", "modes", i, "changed"), page.num("attention", "modes", i, "seeds")]
             for i, row in enumerate(report["attention"]["modes"])]
    zeroed = [[f"top {page.num('attention', 'zeroed', i, 'concepts')} concepts of each video set to zero",
               page.num("attention", "zeroed", i, "accuracy"), page.num("attention", "zeroed", i, "changed"), ""]
              for i, _ in enumerate(report["attention"]["zeroed"])]
    page.table(["intervention", "accuracy", "changed", "seeds"], modes + zeroed)


def _html_localisation(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    page.add(f"<p>Of {page.num('localisation', 'videos')} correctly classified videos, the decisive window (where "
             f"the evidence for the predicted class rises most as the video unfolds) overlaps a ground-truth event in {page.num('localisation', 'hits')}: a rate of "
             f"{page.num('localisation', 'rate')}, where a random window of the same videos would reach "
             f"{page.num('localisation', 'chance')}. Videos with known events: "
             f"{page.num('localisation', 'videos_with_events')}.</p>")


def _html_suspects(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    if report["suspects"]:
        page.add("<p class='note'>Most suspect first.</p>")
        page.table(["concept", "score", "class", "effect share", "plausibility lift", "ablation drop in distribution",
                    "ablation drop shifted", "why"], [
            [_text(s["concept"]), page.num("suspects", rank, "score"), _text(s.get("class", "")),
             *[page.num("suspects", rank, key) if key in s else "" for key in
               ("effect_share", "plausibility_lift", "drop_in_distribution", "drop_shifted")],
             "<br>".join(map(_text, s["reasons"]))] for rank, s in enumerate(report["suspects"])])
    else:
        page.add("<p>Not computed: needs concept labels (or a plausibility matrix) or a shifted split.</p>")


def _html_concept_quality(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    quality = report["concept_quality"]
    if _is_video(report):
        page.add("<p class='note'>Video-level concepts: the model's log-sum-exp of the per-window concepts, against "
                 "labels that say whether a concept is present in some window of the video.</p>")
    if quality["labelled"]:
        page.add(f"<p>Mean ROC-AUC {page.num('concept_quality', 'mean_auc')}, mean accuracy "
                 f"{page.num('concept_quality', 'mean_accuracy')}.</p>")
        page.add(svgs["concept quality"])
    keys = ["mean", "std", "low", "high"] + (["auc", "accuracy"] if quality["labelled"] else [])
    page.table(["concept", *keys], [[_text(row["concept"]), *[page.num("concept_quality", "concepts", i, key) for key in keys]]
                                    for i, row in enumerate(quality["concepts"])])


def _html_metrics(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    scalar = [key for key, value in report["metrics"].items() if not isinstance(value, dict)]
    page.table(["metric", "value"], [[_text(key), page.num("metrics", key)] for key in scalar])
    page.add("<p class='note'>Effective concepts: the fewest concepts carrying a share effective_concept_mass of a "
             "class's mean absolute contribution. Completeness: (accuracy - chance) / (probe - chance). Leakage: probe accuracy on soft "
             "minus on binarised concept activations"
             + (" (video level; completeness's probe reads time-averaged embeddings)." if _is_video(report) else ".")
             + "</p>")
    page.table(["class", "effective concepts"], [[_text(c), page.num("metrics", "effective_concepts", c)]
                                                 for c in report["metrics"]["effective_concepts"]])


def _html_edits(page: _Page, report: dict[str, Any], svgs: Mapping[str, str]) -> None:
    if report["edits"]:
        page.table(["action", "concept", "classes", "reason", "before", "after"], [
            [_text(e["action"]), _text(e["concept"]), ", ".join(f"<span>{_text(c)}</span>" for c in e["classes"][:6]), _text(e["reason"]),
             ", ".join(f"{_text(k)} {page.num('edits', i, 'before', k)}" for k in e["before"]),
             ", ".join(f"{_text(k)} {page.num('edits', i, 'after', k)}" for k in e["after"])]
            for i, e in enumerate(report["edits"])])
    else:
        page.add("<p>No edits.</p>")


Section = Callable[[_Page, dict[str, Any], Mapping[str, str]], None]
#: (navigation label, JSON key, heading, renderer) in page order; a section shows when its key is in
#: the report, or as a one-line note when the key is in ``report["omitted"]``.
SECTIONS: list[tuple[str, str, str, Section]] = [
    ("model card", "model", "Model card", _html_model_card),
    ("accuracy", "accuracy", "Accuracy against baselines", _html_accuracy),
    ("confusion matrix", "classification", "Confusion matrix", _html_confusion),
    ("importance", "importance", "Global concept importance per class", _html_importance),
    ("explained samples", "samples", "Explained samples", _html_samples),
    ("timelines", "timelines", "Per-window concept timelines", _html_timelines),
    ("interventions", "interventions", "Intervention curves", _html_interventions),
    ("attention", "attention", "Attention and concept interventions", _html_attention),
    ("localisation", "localisation", "Localisation of the decisive window", _html_localisation),
    ("suspect concepts", "suspects", "Suspect concepts", _html_suspects),
    ("concept quality", "concept_quality", "Concept quality", _html_concept_quality),
    ("metrics", "metrics", "Metrics", _html_metrics),
    ("edit history", "edits", "Edit history", _html_edits),
]


def _key_values(page: _Page, prefix: tuple[str | int, ...], values: Mapping[str, Any] | list[Any],
                label: str = "") -> list[list[str]]:
    """Rows for a (nested) mapping: numbers through the page with their JSON path, the rest as text;
    nested keys are shown as a path of separate names (list items as bullets)."""
    rows = []
    entries = values.items() if isinstance(values, Mapping) else enumerate(values)
    for key, value in entries:
        shown = f"<span>{_text(key)}</span>" if isinstance(values, Mapping) else "&bull;"
        name = f"{label} &rsaquo; {shown}" if label else shown
        if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            rows += _key_values(page, (*prefix, key), value, name)
        elif isinstance(value, list):
            items = [page.num(*prefix, key, i) if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else _text(v) for i, v in enumerate(value)]
            rows.append([name, ", ".join(items)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append([name, page.num(*prefix, key)])
        else:
            rows.append([name, _text(value)])
    return rows
