"""Every number a user sees is the model's own: one invariant matrix over every family and entry point.

Each family is fitted once on the toy world (``toy:clip`` embeddings, the world's 30 text concepts, or their
labels for the concept-supervised CBM and CEM; videos for MoTIF) and every shared entry point is checked against the model's own computation:
a null intervention is the prediction, decompositions add up to the logits, the intervention
curve starts at ``model.score``, a counterfactual's changes flip the model itself, concept effects
are the model's own intervened logits, the audit reports the model's accuracy, and TCAV gradients
at the embedding are the model's. Entry points a family does not support raise a ``TypeError``
naming the family; objects outside the shared interface (the baselines) raise one too.
``pytest -s tests/test_invariants.py -k auc`` prints the concept AUC table of the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import explain
from cbm.backbones import TOY_SPECS
from cbm.data.toy import CLASS_NAMES, CONCEPTS, class_concept_matrix
from cbm.models import (ConceptBottleneck, ConceptEmbeddingModel, EnergyCBM, LaBoCBM, PosthocCBM, SparseCBM,
                        TemporalCBM)
from cbm.models.baselines import LinearProbe, TimeAveragedCBM
from cbm.models.sparse import ConceptMatrixSearch
from cbm.models.temporal import sequences_from_windows

pytestmark = pytest.mark.skipif(not all(path.is_dir() for path in TOY_SPECS.values()),
                                reason="the shipped toy models are missing (python -m cbm.toymodels.train)")

SIZES = {"train": 1000, "val": 300, "test": 300}
IMAGE_FAMILIES = ["pcbm", "pcbm-h", "labo", "sparse", "energy", "cbm", "cem"]
FAMILIES = [*IMAGE_FAMILIES, "temporal"]
ATOL = 1e-4
#: ECBM re-infers the other concepts for every intervention, so its checks run on the first test images only.
ENERGY_TEST = 16


def _fit(name: str, bank, train, val):
    if name in ("pcbm", "pcbm-h"):
        return PosthocCBM(bank, hybrid=name == "pcbm-h").fit(train, validation=val,
                                                             concept_labels=train.concept_labels)
    if name == "labo":  # the language prior: the concepts that are likely (> 0.5) for each class
        likely = class_concept_matrix() > 0.5
        prior = {c: [k for k, on in zip(CONCEPTS, row) if on] for c, row in zip(CLASS_NAMES, likely)}
        return LaBoCBM(bank, prior=prior, epochs=300).fit(train, validation=val)
    if name == "sparse":
        return SparseCBM(bank, epochs=30).fit(train, validation=val)
    if name == "energy":
        return EnergyCBM(hidden=64, max_epochs=15, patience=4).fit(train, validation=val)
    if name == "cbm":  # the world's concept labels, carried by the Embeddings
        return ConceptBottleneck().fit(train, validation=val)
    if name == "cem":
        return ConceptEmbeddingModel().fit(train, validation=val)
    raise KeyError(name)


@pytest.fixture(scope="module")
def world(toy_splits):
    """The toy:clip backbone, its image splits, the world's text bank and lazily fitted models."""
    from cbm.toy import toy_text_bank

    backbone, splits = toy_splits("toy:clip", "toy:images", SIZES)
    bank = toy_text_bank(backbone)
    models: dict = {}

    def model(name: str):
        if name not in models:
            models[name] = _fit(name, bank, splits["train"], splits["val"])
        return models[name]

    return {"backbone": backbone, "splits": splits, "bank": bank, "model": model}


@pytest.fixture(scope="module")
def videos(world, tmp_path_factory):
    """Toy videos embedded with toy:clip (window Embeddings per split) and a MoTIF model on them."""
    from conftest import all_cores

    from cbm.data.toy import ToyVideos
    from cbm.embed import embed

    cache = tmp_path_factory.mktemp("invariant-videos")
    windows = {}
    for split, n in {"train": 300, "val": 60, "test": 80}.items():
        with all_cores():
            windows[split] = embed(world["backbone"], ToyVideos(split, n, window=4, frames_per_window=4),
                                   cache_dir=cache, progress=False, num_workers=0)
    model = TemporalCBM(world["bank"], epochs=30, seed=0).fit(windows["train"], validation=windows["val"])
    return {"windows": windows, "model": model}


def family(name: str, world, videos_fixture=None):
    """(model, test data) of a family: image Embeddings, or window Embeddings for MoTIF."""
    if name == "temporal":
        return videos_fixture["model"], videos_fixture["windows"]["test"]
    test = world["splits"]["test"]
    return world["model"](name), test.subset(slice(0, ENERGY_TEST)) if name == "energy" else test


@pytest.fixture
def fitted(request, world):
    name = request.param
    videos_fixture = request.getfixturevalue("videos") if name == "temporal" else None
    return (name, *family(name, world, videos_fixture))


def documented_rest(name: str, model, x) -> torch.Tensor:
    """The part of each logit [N, C] that a family documents as not attributed to concepts."""
    if name in ("pcbm", "pcbm-h"):
        return model.bias_ + model.residual(x)
    if name in ("labo", "sparse"):
        return torch.zeros(len(x), len(model.class_names))
    if name in ("energy", "cbm", "cem"):
        return model.contribution_rest(x)
    if name == "temporal":
        e = model.explain(x, return_attention=False)
        alpha = torch.softmax((model.tau * e.window_logits).masked_fill(~e.valid[..., None], float("-inf")), dim=1)
        entropy = -(alpha * alpha.clamp_min(1e-30).log()).sum(1)
        return model.bias_ + entropy / model.tau
    raise KeyError(name)


def concept_auc(model, data, name: str) -> float:
    """Mean ROC-AUC of the model's concept activations against the world's ground truth (per video:
    present in some window, scored by the video-level pooled activation)."""
    if name == "temporal":
        view = explain.make_view(model, data)
        scores, truth = view.concepts, view.data.concept_truth(model.concept_names)
    else:
        scores = model.concepts(data)
        index = [data.concept_names.index(c) for c in model.concept_names]
        truth = torch.as_tensor(data.concept_labels)[:, index]
    aucs = [roc_auc_score(truth[:, k].numpy(), scores[:, k].numpy()) for k in range(truth.shape[1])
            if 0 < truth[:, k].sum() < len(truth)]
    return float(np.mean(aucs))


# ----------------------------------------------------------------------------------------------- intervene
@pytest.mark.parametrize("fitted", FAMILIES, indirect=True)
def test_an_intervention_that_changes_nothing_is_the_prediction(fitted):
    name, model, data = fitted
    logits = model.decision_function(data)
    predicted = model.predict(data)
    concepts = model.concepts(data)
    empty = torch.zeros(concepts.shape, dtype=torch.bool)
    for values in ({}, (empty, torch.zeros(concepts.shape)), (~empty, concepts)):
        after = model.intervene(data, values)
        assert (after.argmax(1).numpy() == predicted).all(), (name, int((after.argmax(1).numpy() != predicted).sum()))
        assert torch.allclose(after, logits, atol=ATOL), (name, float((after - logits).abs().max()))


@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_the_views_intervened_logits_are_the_models(fitted):
    """explain's batched shortcut (ModelView) gives the logits of model.intervene itself."""
    name, model, data = fitted
    view = explain.ModelView(model, explain.as_data(data))
    rows = torch.arange(min(40, len(view.data)))
    assert torch.allclose(view.intervened_logits(rows, view.concepts[rows]), view.logits[rows], atol=ATOL), name
    low, high = explain.core.concept_bounds(view)
    changed = view.concepts[rows].clone()
    changed[:, :3] = high[:3]
    mask = torch.zeros_like(changed, dtype=torch.bool)
    mask[:, :3] = True
    direct = model.intervene(data.features[rows], (mask, changed))
    assert torch.allclose(view.intervened_logits(rows, changed), direct, atol=1e-3), name
    for row in range(3):  # a one-sample view, as the editor builds: its shortcut must be as exact
        one = explain.ModelView(model, explain.EvalData(data.features[row:row + 1], None))
        edited = one.concepts.clone()
        edited[:, :3] = high[:3]
        direct = model.intervene(data.features[row:row + 1], (mask[:1], edited))
        assert torch.allclose(one.intervened_logits(torch.tensor([0]), edited), direct, atol=1e-3), (name, row)


# ------------------------------------------------------------------------------------------- decompositions
@pytest.mark.parametrize("fitted", FAMILIES, indirect=True)
def test_contributions_add_up_to_the_logits(fitted):
    name, model, data = fitted
    logits = model.decision_function(data)
    total = model.contributions(data).sum(-1) + documented_rest(name, model, data)
    assert torch.allclose(total, logits, atol=ATOL), (name, float((total - logits).abs().max()))


@pytest.mark.parametrize("fitted", FAMILIES, indirect=True)
def test_explained_samples_are_the_models_contributions(fitted):
    name, model, data = fitted
    explanations = explain.explain_samples(model, data, rows=range(6), k=3, counterfactuals=False)
    predicted = model.predict(data)
    contributions = model.contributions(data)
    logits = model.decision_function(data)
    for e in explanations:
        assert model.class_index(e.predicted) == predicted[e.index], name
        c = model.class_index(e.predicted)
        for concept, _, value in e.top:
            assert abs(value - float(contributions[e.index, c, model.concept_index(concept)])) < ATOL, name
        listed = sum(value for _, _, value in e.top)
        assert abs(listed + e.other + e.rest - float(logits[e.index, c])) < 1e-3, name


# --------------------------------------------------------------------------------------- intervention curves
@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_the_intervention_curve_starts_at_the_models_accuracy(fitted):
    name, model, data = fitted
    curves = explain.intervention_curves(model, data, max_concepts=4, seeds=(0,))
    accuracy = model.score(data)
    for row in curves.rows():
        if row["concepts"] == 0:
            assert row["accuracy"] == pytest.approx(accuracy, abs=1e-6), (name, row)


@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_a_counterfactual_flips_the_model_itself(fitted):
    name, model, data = fitted
    predicted = model.predict(data)
    flipped = 0
    for row in range(3):
        cf = explain.counterfactual(model, data, row=row, max_changes=4)
        assert cf.original == model.class_names[predicted[row]], name
        if not cf.changes:
            continue
        flipped += 1
        values = {change.concept: change.after for change in cf.changes}
        after = model.intervene(data.features[row:row + 1], values).argmax(1).item()
        assert model.class_names[after] == cf.new, (name, cf.describe())
        assert cf.flipped == (cf.new != cf.original), name
    assert flipped, (name, "no counterfactual found for any of the first 3 samples: nothing was checked")


@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_concept_effects_are_the_models_intervened_logits(fitted):
    name, model, data = fitted
    effects = explain.concept_effects(model, data)
    view = explain.ModelView(model, explain.as_data(data))
    low, high = explain.core.concept_bounds(view)
    y = torch.as_tensor(data.labels)
    k = int(effects.abs().sum(0).argmax())
    concept = model.concept_names[k]
    up = model.intervene(data, {concept: float(high[k])})
    down = model.intervene(data, {concept: float(low[k])})
    change = (up - down).gather(1, y[:, None]).squeeze(1)
    # ECBM's iterative inference on a batch of another size agrees to optimisation tolerance only
    tolerance = 1e-2 if name == "energy" else 1e-4
    for c in y.unique().tolist():
        direct = float(change[y == c].mean())
        assert effects[c, k] == pytest.approx(direct, abs=tolerance), (name, model.class_names[c], concept)


# ---------------------------------------------------------------------------------------------------- audit
@pytest.mark.parametrize("fitted", FAMILIES, indirect=True)
def test_the_audit_reports_the_models_own_numbers(fitted, tmp_path):
    name, model, data = fitted
    report = explain.audit(model, data, name=name, seeds=(0,), competences=(1.0,), max_samples=1000,
                           out=tmp_path, progress=False)
    accuracy = model.score(sequences_from_windows(data)) if name == "temporal" else model.score(data)
    assert report.data["classification"]["accuracy"] == pytest.approx(accuracy, abs=1e-6), name
    curves = report.data.get("interventions")
    if name != "temporal":
        starts = [row["accuracy"] for row in curves["rows"] if row["concepts"] == 0]
        assert starts and all(abs(start - accuracy) < 1e-6 for start in starts), (name, starts)


# ----------------------------------------------------------------------------------------- TCAV, embedding
@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_tcav_at_the_embedding_uses_the_models_gradients(fitted, world):
    name, model, data = fitted
    x = data.features[:60]  # (ECBM: its first ENERGY_TEST)
    target = int(np.bincount(model.predict(x)).argmax())
    gradients = explain.embedding_gradients(model, x, target)
    assert gradients.shape == x.shape and torch.isfinite(gradients).all() and gradients.abs().sum() > 0, name
    # the gradient predicts how the model's own logit moves along it
    step = 1e-2 * gradients / gradients.norm(dim=1, keepdim=True)
    moved = model.decision_function(x + step)[:, target] - model.decision_function(x)[:, target]
    assert (moved > 0).float().mean() >= 0.9, (name, float((moved > 0).float().mean()))
    concept, examples = "red", world["splits"]["val"]
    has = torch.as_tensor(examples.concept_labels)[:, examples.concept_names.index(concept)] > 0.5
    report = explain.tcav({model.class_names[target]: gradients}, {concept: examples.features[has][:15]},
                          examples.features[~has][:200], runs=3, random_concepts=5)
    assert len(report.results) == 1 and 0.0 <= report.results[0].mean <= 1.0, name


# --------------------------------------------------------------------------------- unsupported entry points
def test_a_temporal_model_says_which_entry_points_it_does_not_support(videos):
    model, data = videos["model"], videos["windows"]["test"]
    for call in (lambda: explain.intervention_curves(model, data), lambda: explain.counterfactual(model, data),
                 lambda: explain.concept_effects(model, data),
                 lambda: explain.embedding_gradients(model, torch.zeros(2, model.n_features_in_), 0)):
        with pytest.raises(TypeError, match="TemporalCBM"):
            call()


def test_baselines_outside_the_shared_interface_are_refused_clearly(world):
    splits, bank, backbone = world["splits"], world["bank"], world["backbone"]
    probe = LinearProbe().fit(splits["train"], validation=splits["val"])
    search = ConceptMatrixSearch.from_text(bank, backbone, splits["train"].class_names)
    averaged = TimeAveragedCBM(bank)
    for baseline in (probe, search, averaged):
        kind = type(baseline).__name__
        for call in (explain.explain_samples, explain.intervention_curves, explain.concept_effects,
                     explain.counterfactual, explain.audit):
            with pytest.raises(TypeError, match=kind):
                call(baseline, splits["test"])


# ------------------------------------------------------------------------------------------- concept AUC
def test_concept_auc_of_every_family(world, videos):
    """Concept AUC of ``concepts(x)`` against the world's truth, all families side by side (README table)."""
    table = {name: concept_auc(*family(name, world, videos), name) for name in FAMILIES}
    print("\nconcept AUC on toy:clip:", {name: round(auc, 3) for name, auc in table.items()})
    for name in ("pcbm", "pcbm-h", "labo", "energy", "cbm", "cem"):
        assert table[name] >= 0.9, (name, table[name])
    assert table["sparse"] >= 0.9, table["sparse"]
    assert table["temporal"] >= 0.75, table["temporal"]


@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_contributions_after_an_intervention_add_up_to_the_intervened_logits(fitted):
    """What the editor charts after a slider moves: contributions at ``intervened_concepts`` plus the family's
    rest are ``intervene`` itself, and a null intervention leaves the decomposition as it was."""
    name, model, data = fitted
    x = data.features[:8]
    concepts = model.concepts(x)
    names = model.concept_names[:2]
    values = {names[0]: float(concepts[:, 0].max()) + 0.5, names[1]: float(concepts[:, 1].min())}
    if name == "energy":  # probabilities
        values = {names[0]: 1.0, names[1]: 0.0}
    after = model.intervened_concepts(x, values)
    assert torch.allclose(after[:, 0], torch.tensor(values[names[0]]), atol=1e-5), name
    contributions = model.contributions(x, after)
    rest = model.contribution_rest(x, after) if name == "energy" else documented_rest(name, model, x)
    logits = model.intervene(x, values)
    assert torch.allclose(contributions.sum(-1) + rest, logits, atol=1e-3), (
        name, float((contributions.sum(-1) + rest - logits).abs().max()))
    assert torch.allclose(model.intervened_concepts(x, {}), concepts, atol=ATOL), name
    assert torch.allclose(model.contributions(x, concepts), model.contributions(x), atol=ATOL), name
    with pytest.raises(ValueError, match="rows"):
        model.contributions(x, concepts[:3])


@pytest.mark.parametrize("fitted", IMAGE_FAMILIES, indirect=True)
def test_the_editors_intervention_outcome_is_the_models_own(fitted):
    """What the editor shows after sliders move (app.session.intervention_outcome): probabilities before and after
    are the model's, each driver is the model's own margin change for that correction alone, and the
    contributions after decompose the intervened logits with the family's rest."""
    from app.session import intervention_outcome

    name, model, data = fitted
    x = data.features[:1]
    concepts = model.concepts(x)[0]
    first, second = model.concept_names[:2]
    changed = ({first: 1.0, second: 0.0} if name == "energy"
               else {first: float(concepts[0]) + 2.0, second: float(concepts[1]) - 2.0})
    outcome = intervention_outcome(model, x, changed)
    before, after = model.decision_function(x)[0], model.intervene(x, changed)[0]
    assert torch.allclose(outcome.before, torch.softmax(before, 0), atol=ATOL), name
    assert torch.allclose(outcome.after, torch.softmax(after, 0), atol=1e-3), name
    new, rival = outcome.predicted_after, outcome.rival

    def margin(logits: torch.Tensor) -> float:
        return float(logits[new] - logits[rival])

    assert outcome.margin == pytest.approx(margin(after) - margin(before), abs=1e-3), name
    for concept, value in changed.items():
        alone = model.intervene(x, {concept: value})[0]
        assert outcome.drivers[concept] == pytest.approx(margin(alone) - margin(before), abs=1e-3), (name, concept)
    concepts_after = model.intervened_concepts(x, changed)
    rest = model.contribution_rest(x, concepts_after) if name == "energy" else documented_rest(name, model, x)
    assert float(outcome.contributions_after.sum() + rest[0, new]) == pytest.approx(float(after[new]), abs=1e-3), name
