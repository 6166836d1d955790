"""Matplotlib figures of explanations, interventions, metrics and TCAV, built once and reused.

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot (no global figure
registry, no GUI backend, safe in Streamlit and threads): the audit report embeds them, the
concept editor shows them with ``st.pyplot(fig)``, and users can ``fig.savefig(...)``.
``to_svg`` turns a figure into an ``<svg>`` element an HTML page can inline.
``timeline_figure`` shows one video of a temporal model window by window (concepts x windows).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cbm.models.temporal import TemporalExplanation
from cbm.untrusted import for_matplotlib
from explain.core import ci95
from explain.interventions import POLICY_LABELS

if TYPE_CHECKING:
    from explain.explanations import Importance, SampleExplanation
    from explain.interventions import InterventionCurves
    from explain.tcav import TCAVReport

POLICY_COLOURS = {"random": "#7f7f7f", "uncertain": "#1f77b4", "contribution": "#ff7f0e", "oracle": "#2ca02c"}
POSITIVE, NEGATIVE = "#2b7bba", "#d7301f"
PEAK, EVENT = "#ff7f0e", "#2ca02c"


def _short(name: str, width: int = 28) -> str:
    """A name as a figure draws it: at most ``width`` characters, then literal (no mathtext, see
    :func:`cbm.untrusted.for_matplotlib`): every name a figure shows goes through here."""
    return for_matplotlib(name if len(name) <= width else name[: width - 1] + "…")


def to_svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element (text kept as text, so it stays small and searchable)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cbm"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None,
                                                                         "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix (rows: true class), counts written in the cells when few classes."""
    matrix = np.asarray(confusion, dtype=float)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    side = min(2.5 + 0.42 * n, 11)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    labels = [_short(c, 18) for c in class_names]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return fig


def importance_figure(importance: Importance, k: int = 3, highlight: Sequence[str] = ()) -> Figure:
    """Heatmap of classes x the union of every class's top-``k`` concepts (share of the class's
    total importance, signed); ``highlight`` concepts (e.g. suspects) are marked in red."""
    share = importance.share().numpy()
    chosen: list[int] = []
    for row in np.abs(share):
        chosen += [int(i) for i in np.argsort(-row)[:k] if row[i] > 0 and int(i) not in chosen]
    chosen = chosen[:40] or [0]
    values = share[:, chosen]
    limit = max(float(np.abs(values).max()), 1e-6)
    fig = Figure(figsize=(min(3 + 0.32 * len(chosen), 14), min(2 + 0.3 * len(importance.class_names), 10)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(chosen)), [_short(importance.concept_names[i], 22) for i in chosen], rotation=60,
                  ha="right", fontsize=7)
    for tick, index in zip(ax.get_xticklabels(), chosen):
        if importance.concept_names[index] in highlight:
            tick.set_color(NEGATIVE)
            tick.set_fontweight("bold")
    ax.set_yticks(range(len(importance.class_names)), [_short(c, 18) for c in importance.class_names], fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.03, label="share of class importance")
    ax.set_title("global concept importance per class", fontsize=9)
    return fig


def contribution_figure(explanation: SampleExplanation) -> Figure:
    """Horizontal bars of one sample's top contributions to its predicted class, plus the rest."""
    names = [_short(c, 24) for c, _, _ in explanation.top] + ["other concepts", "bias / residual"]
    values = [v for _, _, v in explanation.top] + [explanation.other, explanation.rest]
    fig = Figure(figsize=(3.6, 0.3 * len(names) + 0.8))
    ax = fig.add_subplot()
    colours = [POSITIVE if v >= 0 else NEGATIVE for v in values[:-2]] + ["#bbbbbb", "#dddddd"]
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"why {_short(explanation.predicted, 20)}", fontsize=8)
    return fig


def intervention_figure(curves: InterventionCurves) -> Figure:
    """Accuracy against concepts corrected, one line per policy (dashed: imperfect experts), 95% bands."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot()
    for (policy, competence), values in curves.accuracy.items():
        mean, low, high = ci95(values)
        style = "-" if competence == 1.0 else (0, (4, 2)) if competence >= 0.75 else ":"
        colour = POLICY_COLOURS.get(policy, "#000000")
        ax.plot(curves.counts, mean, linestyle=style, color=colour, marker="o", markersize=2.5,
                label=f"{POLICY_LABELS.get(policy, policy)} (expert {competence:.0%})")
        ax.fill_between(curves.counts, low, high, color=colour, alpha=0.12, linewidth=0)
    ax.set_xlabel("concepts corrected per sample")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"test-time interventions ({curves.samples} samples, truth: {curves.truth})", fontsize=8)
    return fig


def concept_quality_figure(rows: Sequence[dict[str, Any]], k: int = 40) -> Figure:
    """ROC-AUC of the ``k`` worst-detected concepts (the ones to look at), against chance."""
    rated = sorted((r for r in rows if r.get("auc") is not None), key=lambda r: r["auc"])[:k]
    fig = Figure(figsize=(6, 0.18 * max(len(rated), 4) + 1))
    ax = fig.add_subplot()
    ax.barh(range(len(rated)), [r["auc"] for r in rated], color=POSITIVE)
    ax.set_yticks(range(len(rated)), [_short(r["concept"], 26) for r in rated], fontsize=6)
    ax.axvline(0.5, color="black", linewidth=0.6, linestyle="--")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("concept ROC-AUC against the concept labels")
    return fig


def accuracy_figure(rows: Sequence[tuple[str, float]]) -> Figure:
    """Bars of the model's accuracy and its baselines."""
    fig = Figure(figsize=(5, 0.35 * len(rows) + 0.8))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [v for _, v in rows], color=[POSITIVE] + ["#999999"] * (len(rows) - 1))
    ax.set_yticks(range(len(rows)), [for_matplotlib(name) for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    return fig


def tcav_figure(report: TCAVReport) -> Figure:
    """TCAV scores per (concept, class) with the random concepts' mean and spread; pale bars are
    not significant after Holm correction and should not be read as explanations."""
    results = report.results
    fig = Figure(figsize=(max(4, 0.45 * len(results) + 1.5), 3.4))
    ax = fig.add_subplot()
    x = np.arange(len(results))
    ax.bar(x, [r.mean for r in results], color=[POSITIVE if r.significant else "#c6dbef" for r in results],
           yerr=[np.std(r.scores) for r in results], capsize=2, label="concept")
    ax.errorbar(x, [r.random_mean for r in results], yerr=[np.std(r.random_scores) for r in results], fmt="_",
                color="black", markersize=12, label="random concepts")
    for i, r in enumerate(results):
        if r.significant:
            ax.text(i, min(r.mean + np.std(r.scores) + 0.03, 1.02), "*", ha="center", fontsize=10)
    ax.set_xticks(x, [_short(f"{r.concept} → {r.target}", 30) for r in results], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    ax.legend(fontsize=7)
    settings = report.settings
    how = f", {settings['solver']} CAVs, {settings['negatives']} negatives" if "negatives" in settings else ""
    ax.set_title(f"TCAV (* significant, alpha {report.alpha}, Holm{how})", fontsize=8)
    return fig


def timeline_figure(explanation: TemporalExplanation | Any, concept_names: Sequence[str], *, row: int = 0,
                    concepts: Sequence[str] | None = None, k: int = 8, time_importance: Any = None,
                    windows: Sequence[Sequence[int]] | None = None, event_windows: Sequence[int] = (),
                    decisive_window: int | None = None, title: str = "",
                    value_label: str = "contribution to the predicted class") -> Figure:
    """The concept timeline of ONE video: a heatmap of concepts (rows) x windows (columns) with a
    colorbar, the time importance of every window above it, the most important window outlined
    (solid) and, when given, the ``decisive_window`` (where the evidence rises most) dashed.

    ``explanation``: a TemporalExplanation (video ``row``: its per-window contributions to the
    predicted class and its time importance) or an array [T, K] of per-window values of every
    concept (``time_importance`` [T] optional; without it the window with the largest total is
    marked). Rows: ``concepts`` in that order, else the ``k`` with the largest total magnitude.
    ``windows``: (start, stop) frames of each window for the x labels; ``event_windows``: windows
    overlapping a ground-truth event, shaded green.
    """
    if isinstance(explanation, TemporalExplanation):
        valid = explanation.valid[row]
        values = explanation.window_contributions[row][valid]
        if time_importance is None:
            time_importance = explanation.time_importance[row][valid]
    else:
        values = explanation
    values = np.asarray(torch.as_tensor(values, dtype=torch.float32))
    if values.ndim != 2 or values.shape[1] != len(concept_names):
        raise ValueError(f"per-window values must be [T, {len(concept_names)}], got {values.shape}.")
    columns = ([list(concept_names).index(name) for name in concepts] if concepts is not None
               else [int(i) for i in np.argsort(-np.abs(values).sum(0), kind="stable")[:k]])
    matrix = values[:, columns].T  # [rows, T]
    n_rows, n_windows = matrix.shape
    weights = None if time_importance is None else np.asarray(torch.as_tensor(time_importance, dtype=torch.float32))
    peak = int(np.argmax(weights if weights is not None else matrix.sum(0)))

    fig = Figure(figsize=(min(3.4 + 0.36 * n_windows, 14), 1.9 + 0.26 * n_rows))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, max(0.26 * n_rows, 1.2)], width_ratios=[40, 1], hspace=0.06,
                            wspace=0.03)
    top, heat, bar = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    heat.sharex(top)
    for window in event_windows:
        top.axvspan(window - 0.5, window + 0.5, color=EVENT, alpha=0.18, linewidth=0)
    if weights is not None:
        colours = [PEAK if t == peak else "#9ecae1" for t in range(n_windows)]
        top.bar(range(n_windows), weights, color=colours, width=0.8)
        top.set_ylim(0, max(float(weights.max()), 1e-6) * 1.2)
    top.set_ylabel("time\nimportance", fontsize=7)
    top.tick_params(axis="x", labelbottom=False, length=0)
    top.tick_params(axis="y", labelsize=6)
    top.grid(axis="y", alpha=0.3)
    handles = [Rectangle((0, 0), 1, 1, color=PEAK, label="most important window")]
    if decisive_window is not None:
        handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", linestyle="--",
                                 label="decisive window"))
    if event_windows:
        handles.append(Rectangle((0, 0), 1, 1, color=EVENT, alpha=0.3, label="ground-truth event"))
    top.legend(handles=handles, fontsize=6, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False,
               ncol=2, borderaxespad=0.2)
    if title:
        top.set_title(for_matplotlib(title), fontsize=8, loc="left", pad=14 if len(title) > 40 else 4)

    signed = bool((matrix < 0).any())
    limit = max(float(np.abs(matrix).max()), 1e-6)
    image = heat.imshow(matrix, aspect="auto", interpolation="nearest", cmap="RdBu_r" if signed else "YlOrRd",
                        vmin=-limit if signed else 0.0, vmax=limit)
    heat.add_patch(Rectangle((peak - 0.5, -0.5), 1, n_rows, fill=False, edgecolor="black", linewidth=1.6))
    if decisive_window is not None:
        heat.add_patch(Rectangle((decisive_window - 0.4, -0.4), 0.8, n_rows - 0.2, fill=False, edgecolor="black",
                                 linewidth=1.2, linestyle="--"))
    heat.set_yticks(range(n_rows), [_short(concept_names[i], 26) for i in columns], fontsize=7)
    step = max(1, int(np.ceil(n_windows / 24)))
    ticks = list(range(0, n_windows, step))
    labels = ([f"{int(windows[t][0])}–{int(windows[t][1])}" for t in ticks] if windows is not None
              else [str(t) for t in ticks])
    heat.set_xticks(ticks, labels, fontsize=6, rotation=60 if windows is not None else 0)
    heat.set_xlabel("window (frames)" if windows is not None else "window", fontsize=7)
    for tick, t in zip(heat.get_xticklabels(), ticks):
        if t == peak:
            tick.set_fontweight("bold")
    fig.colorbar(image, cax=bar).set_label(for_matplotlib(value_label), fontsize=7)
    bar.tick_params(labelsize=6)
    return fig
