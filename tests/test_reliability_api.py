"""Hostile inputs to the public API of cbm, concepts and explain: wrong shapes and dtypes, NaN/inf, empty
inputs, unknown names, labels out of range, data of another backbone. Each must raise ONE clear error
(ValueError / TypeError / KeyError or a subclass, one line, naming the offending argument), never return
garbage. Property-based (hypothesis) with tiny models; the case counts are in the README's Reliability table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import explain
from cbm.embed import Embeddings
from cbm.models import EnergyCBM, LaBoCBM, PosthocCBM, SparseCBM, TemporalCBM
from cbm.models.temporal import VideoSequences, pad_sequences
from concepts import (
    Candidates,
    ConceptBank,
    cavs_from_labels,
    learn_cavs,
    select_concepts,
)
from concepts.bank import BackboneMismatchError
from explain.metrics import classification, completeness

N, D, K, C = 40, 8, 4, 3
NAMES = [f"c{i}" for i in range(K)]
CLASSES = ["a", "b", "c"]
FINGERPRINT = "backbone-a"
CASES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                 derandomize=True)
CLEAN_ERRORS = (ValueError, TypeError, KeyError)


def refused(call, *mentions: str) -> str:
    """``call()`` raises one clean error whose one-line message names one of ``mentions``; the message."""
    with pytest.raises(CLEAN_ERRORS) as info:
        call()
    message = str(info.value.args[0]) if info.value.args else ""
    assert "\n" not in message and message.rstrip().endswith((".", "?")), message
    assert any(m in message for m in mentions), (mentions, message)
    return message


def embeddings(x, y, fingerprint: str = FINGERPRINT, concepts=None) -> Embeddings:
    return Embeddings(torch.as_tensor(x), torch.as_tensor(y), [str(i) for i in range(len(x))], CLASSES, "toy:test",
                      fingerprint, None if concepts is None else NAMES, concepts)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.arange(N) % C
    concepts = (torch.rand(N, K, generator=g) < 0.5).float()
    vectors = torch.randn(K, D, generator=g)
    lengths = torch.randint(1, 5, (N,), generator=g).tolist()
    sequences = [torch.randn(t, D, generator=g) for t in lengths]
    features, valid = pad_sequences(sequences)
    videos = VideoSequences(features, valid, y, [f"v{i}" for i in range(N)], torch.zeros(valid.shape, dtype=torch.long),
                            torch.zeros(*valid.shape, 2, dtype=torch.long), CLASSES, "toy:test", FINGERPRINT)
    return {"x": x, "y": y, "concepts": concepts, "videos": videos,
            "cav": ConceptBank(NAMES, vectors, kind="cav", backbone=FINGERPRINT),
            "text": ConceptBank(NAMES, vectors, kind="text", backbone=FINGERPRINT)}


def make(family: str, data):
    """An unfitted tiny model of ``family`` and the keyword arguments its fit needs besides x, y."""
    if family == "posthoc":
        return PosthocCBM(data["cav"], max_iter=200, device="cpu"), {}
    if family == "hybrid":
        return PosthocCBM(data["cav"], hybrid=True, residual_epochs=2, max_iter=200, device="cpu"), {}
    if family == "labo":
        return LaBoCBM(data["text"], prior="none", epochs=2, device="cpu"), {}
    if family == "sparse":
        return SparseCBM(data["text"], epochs=1, device="cpu"), {}
    return EnergyCBM(hidden=8, max_epochs=1, inference_steps=5, device="cpu"), {"concept_labels": data["concepts"]}


FLAT = ["posthoc", "hybrid", "labo", "sparse", "energy"]


@pytest.fixture(scope="module")
def models(data):
    fitted = {}
    for family in FLAT:  # the energy model takes its concept labels (and names) from the Embeddings
        fitted[family] = make(family, data)[0].fit(embeddings(data["x"], data["y"], concepts=data["concepts"]))
    fitted["temporal"] = TemporalCBM(data["text"], epochs=1, device="cpu").fit(data["videos"])
    return fitted


# ----------------------------------------------------------------------------------------- model inputs
@st.composite
def feature_inputs(draw, width: int = D):
    """Arrays of assorted shapes, dtypes and values, as NumPy, torch or nested lists; mostly almost valid."""
    shape = draw(st.sampled_from([(3, width), (1, width), (0, width), (3, width + 1), (3, width - 1), (3, 0),
                                  (width,), (), (2, 3, width)]))
    values = draw(arrays(np.float64, shape, elements=st.floats(-50, 50) | st.sampled_from([np.nan, np.inf, -np.inf])
                         | st.floats(1e39, 1e300)))
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "bool", "complex64", "object", "str"]))
    if dtype == "str":
        array = values.astype(str)
    elif dtype in ("int64", "bool"):
        array = np.nan_to_num(values, posinf=0, neginf=0).clip(-50, 50).astype(dtype)
    else:
        array = values.astype(dtype)
    kind = draw(st.sampled_from(["numpy", "torch", "list"]))
    if kind == "torch" and dtype not in ("object", "str"):
        return torch.from_numpy(array)
    return array.tolist() if kind == "list" else array


def acceptable(value, width: int = D) -> bool:
    array = np.asarray(value)
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != width:
        return False
    return bool(np.isfinite(array.astype(np.float32)).all())


@pytest.mark.parametrize("family", FLAT)
@CASES
@given(x=feature_inputs())
def test_malformed_features_are_refused_naming_x(models, family, x):
    model = models[family]
    if acceptable(x):
        probabilities = model.predict_proba(x)
        assert probabilities.shape == (3 if np.ndim(x) == 2 and len(x) == 3 else 1, C)
        assert np.isfinite(probabilities).all()
    else:
        refused(lambda: model.predict(x), "x")
        refused(lambda: model.contributions(x), "x")


@pytest.mark.parametrize("family", FLAT)
@CASES
@given(c=feature_inputs(width=K))
def test_malformed_concepts_are_refused_by_the_head(models, family, c):
    model = models[family]
    if acceptable(c, K):
        assert torch.isfinite(model.predict_from_concepts(c)).all()
    else:
        refused(lambda: model.predict_from_concepts(c), "concept", "x")


@st.composite
def interventions(draw):
    """{name: value} mappings and (mask, values) pairs, a few of them valid, most of them not."""
    kind = draw(st.sampled_from(["mapping", "pair", "other"]))
    if kind == "other":
        return draw(st.sampled_from([[("c0", 1.0)], "c0", None, 3, ("c0",), ("a", "b", "c")]))
    if kind == "pair":
        rows = draw(st.sampled_from([3, 2]))
        columns = draw(st.sampled_from([K, K + 1]))
        mask = draw(arrays(np.bool_, (rows, columns)))
        values = draw(arrays(np.float64, (rows, columns), elements=st.floats(0, 1) | st.just(np.nan)))
        return mask, values
    name = draw(st.sampled_from(NAMES) | st.text(max_size=6) | st.integers(-2, 5) | st.none())
    value = draw(st.floats(0, 1) | st.sampled_from([np.nan, np.inf, "high", "weird", None, [0.1, 0.2], [[1.0]],
                                                   object()]))
    return {name: value}


def valid_intervention(values) -> bool:
    if isinstance(values, dict):
        (name, value), = values.items()
        number = isinstance(value, float) and np.isfinite(value)
        return name in NAMES and (number or value == "high")
    if isinstance(values, tuple) and len(values) == 2:
        mask, given = values
        return mask.shape == (3, K) and bool(np.isfinite(given[mask]).all())
    return False


@pytest.mark.parametrize("family", FLAT + ["temporal"])
@CASES
@given(values=interventions())
def test_interventions_refuse_unknown_concepts_and_bad_values(models, data, family, values):
    model = models[family]
    x = data["videos"].subset([0, 1, 2]) if family == "temporal" else data["x"][:3]
    if family == "temporal" and isinstance(values, tuple) and len(values) == 2:
        return  # the temporal pair form is [B, T, K]; covered by its own test below
    if family == "temporal" and (values is None or values == {"c0": "high"}):
        return  # for MoTIF None means no intervention, and it has no named reference values
    if valid_intervention(values):
        assert torch.isfinite(model.intervene(x, values)).all()
    else:
        refused(lambda: model.intervene(x, values), "concept", "intervention", "value", "mask", "reference",
                "c0", "unknown")


def test_temporal_interventions_and_sequences(models, data):
    model, videos = models["temporal"], data["videos"].subset([0, 1])
    t = videos.features.shape[1]
    refused(lambda: model.intervene(videos, (np.ones((2, t, K), bool), np.full((2, t, K), np.nan))), "NaN")
    refused(lambda: model.intervene(videos, (np.ones((2, t), bool), np.ones((2, t)))), "mask")
    refused(lambda: model.predict([torch.full((2, D), np.nan)]), "x")
    refused(lambda: model.predict([torch.zeros(0, D)]), "x[0]")
    refused(lambda: model.predict([]), "x")
    refused(lambda: model.predict(torch.randn(3, D)), "x")
    refused(lambda: model.predict([torch.randn(2, D + 1)]), "width", "x")
    refused(lambda: model.predict((torch.randn(2, 3, D), torch.tensor([[False, True, True]] * 2))), "mask")
    refused(lambda: model.predict_from_concepts(torch.zeros(0, 2, K)), "concepts")
    refused(lambda: model.predict_from_concepts(torch.full((2, K), np.inf)), "concepts")
    other = VideoSequences(videos.features, videos.valid, videos.labels, videos.video_ids, videos.window_index,
                           videos.window_spans, CLASSES, "toy:other", "backbone-b")
    refused(lambda: model.predict(other), "backbone")
    refused(lambda: model.score(videos, [0, 7]), "y")


@pytest.mark.parametrize("family", FLAT)
@CASES
@given(y=st.lists(st.integers(-3, 5), min_size=0, max_size=5) | st.lists(st.floats(-1, 4), min_size=3, max_size=3)
       | st.sampled_from([["a", "b", "c"], [[0], [1], [2]], [True, False, True]]))
def test_score_refuses_labels_that_are_not_class_indices(models, data, family, y):
    model, x = models[family], data["x"][:3]
    array = np.asarray(y)
    valid = (array.shape == (3,) and array.dtype.kind in "iuf" and bool(np.all(array == np.round(array)))
             and bool(np.all((array >= 0) & (array < C))))
    if valid:
        assert 0.0 <= model.score(x, y) <= 1.0
    else:
        refused(lambda: model.score(x, y), "y")


@pytest.mark.parametrize("family", FLAT)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.sampled_from(["negative", "huge", "fraction", "nan", "short", "2d", "strings", "bool"]),
       rows=st.integers(0, 3))
def test_fit_refuses_bad_labels_and_too_little_data(data, family, labels, rows):
    model, extra = make(family, data)
    x, y = data["x"], data["y"].clone()
    y = {"negative": y - 1, "huge": y + 10**12, "fraction": y + 0.5, "nan": y * np.nan, "short": y[:-1],
         "2d": torch.stack([y, y], 1), "strings": np.array(["a"] * N), "bool": y > 0}[labels]
    refused(lambda: model.fit(x, y, **extra), "y")
    if rows < 2:  # empty data, or one sample that cannot be split into training and validation
        extra = {k: v[:rows] for k, v in extra.items()}
        refused(lambda: make(family, data)[0].fit(x[:rows], data["y"][:rows], **extra), "x")


@pytest.mark.parametrize("family", FLAT)
def test_fit_refuses_bad_validation_and_class_names(data, family):
    x, y = data["x"], data["y"]

    def fit(**options):
        model, extra = make(family, data)
        return model.fit(x, y, **extra, **options)

    refused(lambda: fit(validation="val.pt"), "validation")
    refused(lambda: fit(validation=(x, y, y)), "validation")
    refused(lambda: fit(validation=(x[:0], y[:0])), "validation x")
    refused(lambda: fit(validation=(x[:5] * np.nan, y[:5])), "validation x")
    refused(lambda: fit(validation=(torch.randn(5, D + 1), y[:5])), "validation x")
    refused(lambda: fit(validation=(x[:5], torch.full((5,), 9))), "validation y")
    refused(lambda: fit(class_names=["a", "a", "b"]), "class_names")
    refused(lambda: fit(class_names=["a"]), "class names")
    refused(lambda: fit(class_names=["a", 2, "c"]), "class_names")


@pytest.mark.parametrize("family", ["posthoc", "labo", "sparse"])
def test_a_bank_from_another_backbone_is_refused(models, data, family):
    model, extra = make(family, data)
    other = embeddings(data["x"], data["y"], "backbone-b")
    refused(lambda: model.fit(other, **extra), "backbone")
    refused(lambda: make(family, data)[0].fit(embeddings(data["x"], data["y"]), validation=other), "backbone")
    refused(lambda: models[family].predict(other), "backbone", "embedded with")
    refused(lambda: models[family].fit(torch.randn(N, D + 3), data["y"]), "dimension", "backbone")


@pytest.mark.parametrize("family", FLAT + ["temporal"])
def test_unknown_names_in_edits_and_lookups(models, family):
    model = models[family]
    refused(lambda: model.concept_index("no such concept"), "no such concept")
    refused(lambda: model.concept_index(3), "string")
    refused(lambda: model.class_index("no such class"), "no such class")
    refused(lambda: model.class_index(None), "string")
    refused(lambda: model.edit("prune", "no such concept"), "no such concept")
    refused(lambda: model.edit("prune", None), "string")
    if family != "energy":  # energy edits cut concept links, which are not per class
        refused(lambda: model.edit("prune", "c0", "no such class"), "no such class")
    refused(lambda: model.edit("explode", "c0"), "explode")


def test_huge_but_finite_features_give_predictions_or_a_clear_overflow_error(models):
    x = torch.full((2, D), 3e38)
    for model in (models[f] for f in FLAT):
        try:
            assert np.isfinite(model.predict_proba(x)).all()
        except ValueError as error:
            assert "overflow" in str(error) and "\n" not in str(error)


# ----------------------------------------------------------------------------------------- concepts
@CASES
@given(names=st.lists(st.text(max_size=4) | st.integers(0, 3) | st.none(), min_size=0, max_size=4),
       rows=st.integers(0, 4), width=st.integers(0, 3), poison=st.sampled_from([None, np.nan, np.inf, 0.0]),
       dtype=st.sampled_from(["float32", "complex64", "bool", "str"]), backbone=st.sampled_from([None, "fp", 7]))
def test_concept_bank_construction(names, rows, width, poison, dtype, backbone):
    vectors = np.ones((rows, width))
    if poison is not None and vectors.size:
        vectors[0, 0] = poison
    vectors = vectors.astype(dtype)
    ok_names = (len(names) > 0 and all(isinstance(n, str) and n.strip() for n in names)
                and len(set(names)) == len(names))
    valid = (ok_names and rows == len(names) and width > 0 and poison in (None,) and dtype == "float32"
             and backbone != 7)
    if valid:
        bank = ConceptBank(names, vectors, kind="cav", backbone=backbone)
        assert bank.vectors.shape == (rows, width)
    else:
        refused(lambda: ConceptBank(names, vectors, kind="cav", backbone=backbone),
                "concept", "vectors", "backbone", "names", "K=")


@CASES
@given(features=feature_inputs(), backbone=st.sampled_from([None, FINGERPRINT, "backbone-b"]))
def test_bank_scores_refuse_malformed_features_and_other_backbones(data, features, backbone):
    bank = data["cav"]
    if acceptable(features) and backbone != "backbone-b":
        assert torch.isfinite(bank.scores(features, backbone=backbone)).all()
    else:
        with pytest.raises(CLEAN_ERRORS) as info:
            bank.scores(features, backbone=backbone)
        if backbone == "backbone-b":
            assert isinstance(info.value, BackboneMismatchError)
        assert "features" in str(info.value) or "backbone" in str(info.value)


def test_bank_lookups_and_subsets(data):
    bank = data["cav"]
    refused(lambda: bank.index("zzz"), "zzz")
    refused(lambda: bank.index(2), "string")
    refused(lambda: bank.subset([K]), "outside")
    refused(lambda: bank.subset([-1]), "outside")
    refused(lambda: bank.subset([]), "at least one")
    refused(lambda: bank.drop(NAMES), "empty")
    refused(lambda: ConceptBank(NAMES, torch.ones(K, D), provenance={"f": object()}).save("/nonexistent/never"),
            "provenance")


@CASES
@given(side=st.sampled_from(["positives", "negatives"]), block=feature_inputs(),
       cs=st.sampled_from([(0.1, 1.0), (), (-1.0,), (float("nan"),), (float("inf"),)]))
def test_cav_learning_refuses_malformed_examples(side, block, cs):
    g = torch.Generator().manual_seed(1)
    examples = {"positives": {"c": torch.randn(6, D, generator=g) + 2}, "negatives": {"c": torch.randn(6, D, generator=g)}}
    examples[side]["c"] = block
    array = np.asarray(block) if not isinstance(block, torch.Tensor) else block.numpy()
    valid = acceptable(block) and array.shape[0] >= 2 and cs == (0.1, 1.0)
    call = lambda: learn_cavs(examples["positives"], examples["negatives"], cs=cs, solver="fastcav"
                              if cs == (0.1, 1.0) else "torch")
    if valid:
        try:
            assert torch.isfinite(call().vectors).all()
        except ValueError as error:  # identical positive and negative means give no direction
            assert "non-zero" in str(error)
    else:
        refused(call, side, "examples", "C values", "concept 'c'")


def test_cavs_from_labels_arguments(data):
    x, labels = data["x"], data["concepts"]
    refused(lambda: cavs_from_labels(x * np.nan, labels, NAMES), "features")
    refused(lambda: cavs_from_labels(x, labels * np.nan, NAMES), "concept_labels")
    refused(lambda: cavs_from_labels(x, labels[:5], NAMES), "concept labels")
    refused(lambda: cavs_from_labels(x, labels, NAMES[:2]), "concept labels")
    refused(lambda: cavs_from_labels(x, labels, NAMES, on_missing="ignore"), "on_missing")
    refused(lambda: cavs_from_labels(x, labels, NAMES, max_positives=0), "max_positives")
    refused(lambda: cavs_from_labels(x, torch.zeros(N, K), NAMES), "c0")


class Encoder:
    fingerprint = FINGERPRINT

    def encode_texts(self, texts):
        return torch.randn(len(texts), D, generator=torch.Generator().manual_seed(len(texts)))


@CASES
@given(labels=st.sampled_from(["ok", "out", "negative", "short", "fraction", "nan"]),
       k=st.sampled_from([1, 0, 1.5, True]), beta=st.sampled_from([1.0, -1.0, float("nan")]),
       features=st.sampled_from(["ok", "nan", "empty"]))
def test_concept_selection_arguments(data, labels, k, beta, features):
    candidates = Candidates({"a": ["red", "blue"], "b": ["green", "tall"], "c": ["small", "round"]})
    x = {"ok": data["x"], "nan": data["x"] * np.nan, "empty": data["x"][:0]}[features]
    y = data["y"]
    y = {"ok": y, "out": y + C, "negative": y - 1, "short": y[:5], "fraction": y + 0.5, "nan": y * np.nan}[labels]
    call = lambda: select_concepts(candidates, Encoder(), x, y, k=k, beta=beta)
    if labels == "ok" and k == 1 and beta == 1.0 and features == "ok":
        assert len(call()) >= C
    else:
        refused(call, "labels", "k ", "beta", "features")


# ----------------------------------------------------------------------------------------- explain
@pytest.mark.parametrize("family", ["posthoc", "energy"])
@CASES
@given(case=st.sampled_from(["ok", "out", "negative", "short", "fraction", "empty", "concepts_shape",
                             "concepts_nan", "names_count", "nan_x", "wide_x", "string", "five"]))
def test_explanations_refuse_malformed_data(models, data, family, case):
    x, y, c = data["x"][:12], data["y"][:12], data["concepts"][:12]
    dataset = {"ok": (x, y, c, NAMES), "out": (x, y + C), "negative": (x, y - 1), "short": (x, y[:5]),
               "fraction": (x, y + 0.5), "empty": (x[:0], y[:0]), "concepts_shape": (x, y, c[:5], NAMES),
               "concepts_nan": (x, y, c * np.nan, NAMES), "names_count": (x, y, c, NAMES[:2]),
               "nan_x": (x * np.nan, y), "wide_x": (torch.randn(12, D + 1), y), "string": "test.pt",
               "five": (x, y, c, NAMES, None)}[case]
    model = models[family]
    if case == "ok":
        assert explain.global_importance(model, dataset).values.shape == (C, K)
    else:
        refused(lambda: explain.global_importance(model, dataset), "y of data", "data", "x", "concept labels")


def test_explanation_arguments(models, data):
    model, dataset = models["posthoc"], (data["x"][:10], data["y"][:10])
    refused(lambda: explain.explain_samples(model, dataset, rows=[10]), "rows")
    refused(lambda: explain.explain_samples(model, dataset, rows=[-1]), "rows")
    refused(lambda: explain.explain_samples(model, dataset, rows=[0], k=0), "k ")
    refused(lambda: explain.counterfactual(model, dataset, row=99), "rows")
    refused(lambda: explain.counterfactual(model, dataset, row=0, target="zebra"), "zebra")
    refused(lambda: explain.global_importance(model, dataset, by="colour"), "by")
    refused(lambda: explain.intervention_curves(model, dataset, policies=("psychic",)), "psychic")
    refused(lambda: explain.intervention_curves(model, dataset, competences=(1.5,)), "competence")
    refused(lambda: explain.intervention_curves(model, dataset, seeds=()), "seeds")
    refused(lambda: explain.intervention_curves(model, dataset, max_concepts=-2), "max_concepts")
    refused(lambda: explain.intervention_curves(model, (data["x"][:10],)), "labels")
    unlabelled = explain.ModelView(model, explain.as_data((data["x"][:10],)))
    refused(lambda: classification(unlabelled), "labels")
    refused(lambda: completeness(unlabelled), "labels")
    refused(lambda: explain.stability([model], dataset), "two models")
    refused(lambda: explain.global_importance(model, embeddings(data["x"], data["y"], "backbone-b")), "backbone",
            "embedded")
