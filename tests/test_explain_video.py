"""The audit of temporal (video) models: JSON numbers against direct model calls, the self-contained HTML,
the concept timeline figure, and `cbm audit` on a saved temporal bundle of the toy world."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_explain_audit import _data_elements, assert_every_number_is_the_json
from test_models_temporal import CONCEPTS, _directions, make_videos, synthetic_bank

import explain
from cbm.embed import Embeddings
from cbm.models.temporal import TemporalCBM, decisive_windows, localisation_hits
from explain.batch import report_folder
from explain.plots import timeline_figure

TOY_CLIP = Path(__file__).resolve().parents[1] / "cbm" / "assets" / "toy_clip"


def as_windows(sequences) -> Embeddings:
    """The window Embeddings a video dataset would give for ``sequences`` (concept labels: the concept's
    direction is present in the window, read off the synthetic features)."""
    rows = sequences.valid.nonzero().tolist()
    features = torch.stack([sequences.features[b, t] for b, t in rows])
    present = (features @ torch.tensor(_directions()[:6], dtype=torch.float32).T > 0.5).float()
    return Embeddings(features, sequences.labels[[b for b, _ in rows]], [f"video {b}/w{t:03d}" for b, t in rows],
                      sequences.class_names, sequences.backbone_spec, sequences.backbone_fingerprint,
                      concept_names=list(CONCEPTS), concept_labels=present,
                      meta={"window_video": np.array([b for b, _ in rows]),
                            "window_spans": np.array([[t, t + 1] for _, t in rows])})


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    torch.set_num_threads(1)
    bank = synthetic_bank()
    train, _ = make_videos(160, 0)
    val, _ = make_videos(40, 1)
    test, events = make_videos(80, 2)
    model = TemporalCBM(bank, epochs=25, seed=0).fit(train, validation=val)
    by_id = dict(zip(test.video_ids, events))
    out = tmp_path_factory.mktemp("video-audit")
    report = explain.audit(model, test, name="motif", data_name="synthetic videos", events=by_id, seeds=(0, 1),
                           gates={"accuracy": 0.0, "localisation": 1.01}, out=out, progress=False)
    return {"model": model, "test": test, "events": events, "by_id": by_id, "report": report, "out": out}


def test_video_report_numbers_agree_with_the_model(audited):
    model, test, data = audited["model"], audited["test"], audited["report"].data
    assert json.loads((audited["out"] / "report.json").read_text()) == data
    assert data["samples_audited"] == len(test) and data["model"]["family"] == "temporal"
    assert data["summary"]["accuracy"] == pytest.approx(model.score(test))
    assert np.trace(data["classification"]["confusion"]) == round(model.score(test) * len(test))
    assert np.asarray(data["importance"]["matrix"]).shape == (len(model.class_names), len(CONCEPTS))

    def accuracy(logits):
        return float((logits.argmax(1) == test.labels).float().mean())

    modes = {row["mode"]: row for row in data["attention"]["modes"]}
    assert list(modes) == ["learned", "identity", "uniform", "reversed", "shuffled"]
    for mode in ("identity", "uniform", "reversed"):
        assert modes[mode]["accuracy"] == pytest.approx(accuracy(model.intervene(test, attention_mode=mode)))
    shuffled = np.mean([accuracy(model.intervene(test, attention_mode="shuffled", seed=s)) for s in (0, 1)])
    assert modes["shuffled"]["accuracy"] == pytest.approx(shuffled) and modes["shuffled"]["seeds"] == 2
    e = model.explain(test)
    top = e.concept_importance.argmax(1)
    mask = torch.zeros(e.concepts.shape, dtype=torch.bool)
    mask[torch.arange(len(test)), :, top] = True
    zeroed = data["attention"]["zeroed"][0]
    assert zeroed["concepts"] == 1
    assert zeroed["accuracy"] == pytest.approx(accuracy(model.intervene(test, (mask, torch.zeros(mask.shape)))))
    assert [row["concepts"] for row in data["attention"]["zeroed"]] == [1, 3, 5]

    correct = e.prediction == test.labels
    evidence = model.evidence_over_time(test)
    hits = localisation_hits(decisive_windows(evidence), test.window_spans, audited["events"])[correct]
    assert data["localisation"]["hits"] == int(hits.sum()) and data["localisation"]["videos"] == int(correct.sum())
    assert data["summary"]["localisation"] == pytest.approx(float(hits.float().mean()))
    assert 0 < data["localisation"]["chance"] < 1
    assert audited["report"].failures == [f"localisation = {data['summary']['localisation']:.4f} < 1.01"]

    timelines = data["timelines"]
    assert {t["true"] == t["predicted"] for t in timelines} == {True, False}  # correct and wrong videos
    for t in timelines:
        row = test.video_ids.index(t["id"])
        assert t["most_important_window"] == int(e.most_important_window()[row])
        assert t["evidence"] == pytest.approx(evidence[row, :int(test.lengths[row])].tolist(), abs=1e-5)
        assert t["decisive_window"] == int(decisive_windows(evidence)[row])
        assert np.asarray(t["contributions"]).shape == (len(t["concepts"]), int(test.lengths[row]))
        assert t["hit"] == (t["decisive_window"] in t["event_windows"]) and t["frames"] is None
    assert set(data["omitted"]) == {"samples", "interventions", "suspects"}
    assert "samples" not in data and "suspects" not in data


def test_video_report_html_is_self_contained_and_every_number_is_the_json(audited):
    page = (audited["out"] / "report.html").read_text()
    data = audited["report"].data
    for heading in ("Per-window concept timelines", "Attention and concept interventions",
                    "Localisation of the decisive window", "Explained samples", "Suspect concepts"):
        assert f">{heading}</h2>" in page
    assert page.count("Not part of a video audit") == 3
    assert not re.search(r"<script|<link|<iframe|url\((?!#)|@import", page)  # url(#id): clip paths inside SVGs
    assert all(link.startswith(("data:", "#")) for link in re.findall(r"(?:src|href)=['\"]([^'\"]*)", page))
    assert not re.search(r"https?://(?!www\.w3\.org/)", page)  # only SVG namespaces
    assert len(re.findall(r"<svg", page)) == 4 + len(data["timelines"])
    assert_every_number_is_the_json(page, data, _data_elements(page), strip=" ,;()=p.:")


def test_window_embeddings_give_the_same_audit_with_concept_quality(audited):
    model, test = audited["model"], audited["test"]
    report = explain.audit(model, as_windows(test), events=audited["by_id"], seeds=(0,), examples=1, progress=False)
    data = report.data
    assert data["summary"]["accuracy"] == pytest.approx(model.score(test))
    assert data["localisation"] == audited["report"].data["localisation"]
    quality = data["concept_quality"]
    assert quality["labelled"] and 0.5 < quality["mean_auc"] <= 1.0
    without = explain.audit(model, test, seeds=(0,), examples=1, progress=False).data
    assert "localisation" not in without and "event spans" in without["omitted"]["localisation"]
    assert not without["concept_quality"]["labelled"]
    edited, _ = model.edit("prune", "red")  # batches compare models of the same concepts: videos too
    assert explain.stability([model, edited], test)["models"] == 2


def test_timeline_figure_one_row_per_concept(audited):
    model, test = audited["model"], audited["test"]
    e = model.explain(test.subset([0, 1]))
    length = int(e.valid[1].sum())
    fig = timeline_figure(e, model.concept_names, row=1, concepts=["blue", "red", "left"], event_windows=[1],
                          windows=test.window_spans[1, :length].tolist(), decisive_window=2, title="video 1")
    top, heat, bar = fig.axes
    assert [label.get_text() for label in heat.get_yticklabels()] == ["blue", "red", "left"]
    assert heat.images[0].get_array().shape == (3, length)
    bars = top.containers[0].patches
    assert len(bars) == length and bar.get_ylabel() == "contribution to the predicted class"
    peak = int(e.most_important_window()[1])
    assert [b.get_facecolor() for b in bars].count(bars[peak].get_facecolor()) == 1
    dashed = [p for p in heat.patches if p.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_x() == pytest.approx(2 - 0.4)
    values = np.random.default_rng(0).random((5, len(CONCEPTS)))
    plain = timeline_figure(values, CONCEPTS, k=4)
    assert len(plain.axes[1].get_yticklabels()) == 4 and plain.axes[1].images[0].get_array().shape == (4, 5)
    with pytest.raises(ValueError, match="per-window values"):
        timeline_figure(values[:, :3], CONCEPTS)


@pytest.mark.skipif(not TOY_CLIP.exists(), reason="the toy CLIP (cbm/assets/toy_clip) is not shipped")
def test_cbm_audit_command_on_a_saved_temporal_bundle(tmp_path, capsys):
    from cbm.backbones import load_backbone
    from cbm.cli import main
    from cbm.data.toy import ToyVideos
    from cbm.embed import embed
    from cbm.toy import toy_text_bank

    torch.set_num_threads(1)
    clip = load_backbone("toy:clip", device="cpu")
    cache = tmp_path / "cache"
    train = embed(clip, ToyVideos("train", 60), cache_dir=cache, progress=False, num_workers=0)
    model = TemporalCBM(toy_text_bank(clip), epochs=4, seed=0).fit(train)
    model.save(tmp_path / "video_model.cbm")
    out = tmp_path / "audit"
    code = main(["audit", str(tmp_path / "video_model.cbm"), "--data", "toy:videos@test", "--out", str(out),
                 "--cache-dir", str(cache), "--device", "cpu", "--seeds", "1", "--quiet",
                 "--fail-under", "accuracy=0.0"])
    assert code == 0 and "all gates passed" in capsys.readouterr().out
    report = json.loads((out / report_folder("video_model", "toy:videos@test") / "report.json").read_text())
    assert report["samples_audited"] == 200 and report["model"]["family"] == "temporal"
    assert report["localisation"]["videos_with_events"] == 200
    assert report["timelines"][0]["frames"][0].startswith("data:image/png;base64,")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["localisation"] == report["summary"]["localisation"]
