"""Batch audits: models x datasets, one report folder each, an index page and a summary JSON.

Datasets (and ``train``/``shift``) may be given as data or as callables ``model -> data`` so that
each model gets the data embedded with its own backbone (what ``cbm audit`` does). Models that
share concepts, classes and backbone (e.g. the same recipe fitted with several seeds) are also
compared for stability on every dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cbm.files import atomic_write_text
from cbm.models.base import ConceptBottleneckModel
from cbm.untrusted import for_terminal
from explain import metrics
from explain.audit import STYLE, Report, _Page, _text, audit, jsonable
from explain.video import Spans

logger = logging.getLogger(__name__)

DataSource = Any | Callable[[ConceptBottleneckModel], Any]
SUMMARY_COLUMNS = ("accuracy", "balanced_accuracy", "shift_accuracy", "completeness", "leakage", "concept_auc",
                   "oracle_gain", "localisation")


@dataclass
class BatchReport:
    """The reports of a batch, its summary rows, stability results, failures and written files."""

    reports: list[Report]
    summary: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [f"{r.name} on {r.data['data']}: {failure}" for r in self.reports for failure in r.failures]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "x"


def report_folder(model_name: str, data_name: str) -> str:
    """The folder name of one audit in a batch: readable slugs of both names and a short hash of the exact
    pair, so names that slug alike (``a+b`` and ``a_b``) never share a folder."""
    exact = json.dumps([model_name, data_name], ensure_ascii=True)
    return f"{_slug(model_name)}__{_slug(data_name)}-{hashlib.sha256(exact.encode()).hexdigest()[:8]}"


def _resolve(source: DataSource | None, model: ConceptBottleneckModel) -> Any:
    return source(model) if callable(source) else source


def audit_many(models: Mapping[str, ConceptBottleneckModel], datasets: Mapping[str, DataSource], out: str | Path, *,
               train: DataSource | None = None, shift: DataSource | None = None,
               images: Mapping[str, Any] | None = None, events: Mapping[str, Mapping[str, Spans]] | None = None,
               gates: Mapping[str, float] | None = None, progress: bool = True, **options: Any) -> BatchReport:
    """Audit every model on every dataset into ``out/<model>__<data>-<hash>/`` (:func:`report_folder`) plus
    ``out/index.html`` and ``out/summary.json``; ``images`` and ``events`` (video event spans per video id)
    are keyed by dataset name; ``options`` go to :func:`explain.audit.audit`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports, rows, resolved = [], [], {}
    jobs = [(m, d) for m in models for d in datasets]
    for model_name, data_name in tqdm(jobs, desc="audits", disable=not progress or len(jobs) < 2):
        model = models[model_name]
        data = _resolve(datasets[data_name], model)
        resolved[(model_name, data_name)] = data
        folder = out / report_folder(model_name, data_name)
        report = audit(model, data, name=model_name, data_name=data_name, train=_resolve(train, model),
                       shift=_resolve(shift, model), images=(images or {}).get(data_name),
                       events=(events or {}).get(data_name), gates=gates, out=folder, progress=progress, **options)
        reports.append(report)
        rows.append({"model": model_name, "data": data_name, "report": f"{folder.name}/report.html",
                     "family": report.data["model"]["family"],
                     "top_suspect": report.data["suspects"][0]["concept"] if report.data.get("suspects") else None,
                     "failures": report.failures, **{k: report.summary.get(k) for k in SUMMARY_COLUMNS}})
    summary = {"rows": rows, "gates": dict(gates or {}), "stability": _stability(models, datasets, resolved)}
    summary = jsonable(summary)
    result = BatchReport(reports, summary)
    result.paths = {"json": out / "summary.json", "html": out / "index.html"}
    atomic_write_text(result.paths["json"], json.dumps(summary, indent=1, allow_nan=False))
    atomic_write_text(result.paths["html"], render_index(summary))
    for failure in result.failures:
        logger.warning("gate failed: %s", failure)
    return result


def _stability(models: Mapping[str, ConceptBottleneckModel], datasets: Mapping[str, DataSource],
               resolved: Mapping[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """Stability of every group of >= 2 models with the same concepts, classes and backbone."""
    def key(name: str) -> tuple:
        model = models[name]
        return tuple(model.concept_names), tuple(model.class_names), model.backbone_fingerprint_

    results = []
    for _, group in groupby(sorted(models, key=key), key=key):
        names = list(group)
        if len(names) < 2:
            continue
        for data_name in datasets:
            data = resolved[(names[0], data_name)]
            results.append({**metrics.stability([models[n] for n in names], data), "models": names,
                            "data": data_name})
    return results


def render_index(summary: dict[str, Any]) -> str:
    """The batch's index page: one row per audit, links to the reports, then stability."""
    page = _Page(summary)
    page.add(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Audit summary</title>"
             f"<style>{STYLE}</style></head><body><h1>Audit summary</h1>")
    header = ["model", "data", "family", *SUMMARY_COLUMNS, "top suspect", "gates"]
    page.table(header, [
        [f"<a href='{_text(row['report'])}'>{_text(row['model'])}</a>", _text(row["data"]), _text(row["family"]),
         *[page.num("rows", i, column) for column in SUMMARY_COLUMNS], _text(row["top_suspect"] or ""),
         "<span class='fail'>failed</span>" if row["failures"] else ("<span class='ok'>passed</span>"
                                                                    if summary["gates"] else "")]
        for i, row in enumerate(summary["rows"])])
    if summary["stability"]:
        page.add("<h2>Stability across models</h2>")
        keys = ["accuracy_mean", "accuracy_std", "importance_spearman", "top_concept_overlap"]
        page.table(["models", "data", *keys], [
            [_text(", ".join(s["models"])), _text(s["data"]), *[page.num("stability", i, k) for k in keys]]
            for i, s in enumerate(summary["stability"])])
    page.add("</body></html>")
    return "".join(page.parts)


def summary_lines(batch: BatchReport) -> Sequence[str]:
    """A plain-text table of the batch for the terminal."""
    lines = [f"{'model':<24} {'data':<28} {'accuracy':>8} {'shift':>8} {'top suspect'}"]
    for row in batch.summary["rows"]:
        shift = "" if row["shift_accuracy"] is None else f"{row['shift_accuracy']:.3f}"
        lines.append(f"{for_terminal(row['model'])[:24]:<24} {for_terminal(row['data'])[:28]:<28} "
                     f"{row['accuracy']:>8.3f} {shift:>8} {for_terminal(row['top_suspect'] or '')}")
    return lines
