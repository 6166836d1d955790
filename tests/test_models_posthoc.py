"""Post-hoc CBM on synthetic concept data: solver, head, hybrid, explanations, interventions, edits, bundles."""


import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from tiny_models import rewrite_manifest

from cbm.models import BundleError, PosthocCBM, load
from cbm.models.solvers import elastic_net_path, elastic_net_softmax, lambda_max
from concepts.bank import ConceptBank


@pytest.fixture(scope="module")
def world():
    """Features built from binary concepts along known directions; classes from sparse concept weights."""
    torch.manual_seed(0)
    n, d, k, c = 1800, 24, 12, 4
    directions = 1.5 * torch.linalg.qr(torch.randn(d, k))[0].T  # orthogonal: a margin measures one concept
    present = (torch.rand(n, k) < 0.35).float()
    x = present @ directions + 0.5 * torch.randn(n, d)
    truth = torch.zeros(c, k)
    truth[torch.arange(c), torch.arange(c)] = 3.0
    truth[torch.arange(c), torch.arange(c) + 4] = 1.5
    y = (present @ truth.T + 0.3 * torch.randn(n, c)).argmax(1)
    bank = ConceptBank([f"concept {i}" for i in range(k)], directions, kind="cav")
    split = {"train": slice(0, 1200), "val": slice(1200, 1500), "test": slice(1500, None)}
    return {name: (x[s], y[s], present[s]) for name, s in split.items()} | {"bank": bank}


def test_solver_matches_sklearn_l2_logistic_regression(world):
    x, y, _ = world["train"]
    s = x[:, :8]
    lam = 0.01
    ours = elastic_net_softmax(s, y, 4, lam, l1_ratio=0.0, tol=1e-8, max_iter=20000)
    reference = LogisticRegression(C=1 / (lam * len(s)), max_iter=5000, tol=1e-8).fit(s.numpy(), y.numpy())
    assert ours.converged
    assert np.allclose(ours.weight.numpy(), reference.coef_, atol=2e-3)


def test_l1_path_gets_sparser_as_the_penalty_grows(world):
    x, y, _ = world["train"]
    top = lambda_max(x, y, 4, 0.99)
    path = elastic_net_path(x, y, 4, [top * 1.01, top * 0.1, top * 0.01], 0.99)
    nonzero = [int((solution.weight != 0).sum()) for solution in path]
    assert nonzero[0] == 0 and nonzero[0] < nonzero[1] < nonzero[2]


@pytest.mark.parametrize("lam", ["rule", "path"])
def test_pcbm_is_accurate_sparse_and_exactly_decomposed(world, lam):
    x, y, _ = world["train"]
    model = PosthocCBM(world["bank"], lam=lam, c=0.5).fit(x, y, validation=world["val"][:2])
    test_x, test_y, _ = world["test"]
    probe = LogisticRegression(max_iter=3000).fit(x.numpy(), y.numpy()).score(test_x.numpy(), test_y.numpy())
    assert model.score(test_x, test_y) > probe - 0.05
    if lam == "rule":
        assert sum(model.sparsity().values()) < 0.8 * 4 * 12
    else:  # the path runs from all-zero weights to dense ones and keeps the best on validation
        nonzero = [step["nonzero"] for step in model.path_]
        assert nonzero[0] == 0 and nonzero[-1] > nonzero[0]
    top = model.top_concepts(2)
    assert [name for name, _ in top["class 0"]][0] == "concept 0"
    contributions = model.contributions(test_x[:5])
    assert contributions.shape == (5, 4, 12)
    assert torch.allclose(contributions.sum(-1) + model.bias_, model.decision_function(test_x[:5]), atol=1e-4)
    assert np.allclose(model.predict_proba(test_x[:5]).sum(1), 1, atol=1e-5)


def test_hybrid_residual_helps_and_never_sees_test_data(world):
    x, y, _ = world["train"]
    plain = PosthocCBM(world["bank"], c=20.0).fit(x, y, validation=world["val"][:2])
    hybrid = PosthocCBM(world["bank"], c=20.0, hybrid=True).fit(x, y, validation=world["val"][:2])
    test_x, test_y, _ = world["test"]
    assert torch.equal(plain.weight_, hybrid.weight_)  # the PCBM head stays frozen
    assert hybrid.score(test_x, test_y) > plain.score(test_x, test_y)
    decomposition = hybrid.contributions(test_x[:4]).sum(-1) + hybrid.bias_ + hybrid.residual(test_x[:4])
    assert torch.allclose(decomposition, hybrid.decision_function(test_x[:4]), atol=1e-4)
    assert hybrid.training_["validation"] == "given"


def test_validation_is_held_out_from_train_when_not_given(world):
    x, y, _ = world["train"]
    model = PosthocCBM(world["bank"]).fit(x, y)
    assert model.training_["validation_samples"] == 120 and model.training_["samples"] == 1080


def test_interventions_by_name_reference_and_mask(world):
    x, y, present = world["train"]
    model = PosthocCBM(world["bank"], c=0.5).fit(x, y, validation=world["val"][:2], concept_labels=present)
    test_x, test_y, test_present = world["test"]
    scores = model.concepts(x)
    assert torch.allclose(model.reference_high_[3], scores[present[:, 3] > 0, 3].mean())
    # ground-truth interventions on every concept raise accuracy
    high, low = model.reference_high_, model.reference_low_
    truth_values = torch.where(test_present.bool(), high, low)
    mask = torch.ones_like(test_present, dtype=torch.bool)
    intervened = model.intervene(test_x, (mask, truth_values)).argmax(1)
    assert float((intervened == test_y).float().mean()) > model.score(test_x, test_y)
    # by name: one number, one per sample, or a reference value
    logits = model.intervene(test_x[:3], {"concept 0": "high"})
    manual = model.concepts(test_x[:3])
    manual[:, 0] = model.concept_reference("concept 0", "high")
    assert torch.allclose(logits, model.predict_from_concepts(manual))
    assert model.intervene(test_x[:3], {"concept 1": torch.tensor([0.0, 1.0, 2.0])}).shape == (3, 4)
    with pytest.raises(KeyError, match="unknown concept 'concept 99'"):
        model.intervene(test_x[:3], {"concept 99": 1.0})
    with pytest.raises(ValueError, match="one number per sample"):
        model.intervene(test_x[:3], {"concept 1": torch.zeros(5)})
    with pytest.raises(ValueError, match="mask and values"):
        model.intervene(test_x[:3], (torch.ones(2, 12, dtype=torch.bool), torch.zeros(2, 12)))


def test_global_edits_record_metrics_and_undo(world):
    x, y, _ = world["train"]
    model = PosthocCBM(world["bank"], c=0.5).fit(x, y, validation=world["val"][:2])
    edited, record = model.edit("prune", "concept 0", validation=world["val"][:2], reason="test")
    assert edited.weight_[:, 0].abs().sum() == 0 and model.weight_[:, 0].abs().sum() > 0
    assert record.after["val_accuracy"] < record.before["val_accuracy"]  # concept 0 defines class 0
    normalised, _ = model.edit("prune_normalize", "concept 4", "class 0")
    assert normalised.weight_[0].abs().sum() == pytest.approx(float(model.weight_[0].abs().sum()), rel=1e-5)
    set_one, _ = edited.edit("set_weight", "concept 1", ["class 2"], value=0.7)
    assert set_one.weight_[2, 1] == pytest.approx(0.7) and len(set_one.edits_) == 2
    assert torch.equal(set_one.undo().undo().weight_, model.weight_)
    with pytest.raises(ValueError, match="no edits to undo"):
        model.undo()
    with pytest.raises(KeyError, match="unknown class"):
        model.edit("prune", "concept 0", "zebra")


def test_bundle_round_trip_keeps_predictions_and_history(world, tmp_path):
    x, y, _ = world["train"]
    model = PosthocCBM(world["bank"], hybrid=True).fit(x, y, validation=world["val"][:2])
    edited, _ = model.edit("prune", "concept 2", reason="spurious")
    path = edited.save(tmp_path / "model.cbm")
    loaded = load(path)
    test_x = world["test"][0]
    assert torch.equal(loaded.decision_function(test_x), edited.decision_function(test_x))
    assert loaded.edits_[0].reason == "spurious" and loaded.class_names == edited.class_names
    assert loaded.bank.names == world["bank"].names and loaded.get_params()["hybrid"] is True
    assert torch.equal(loaded.undo().weight_, model.weight_)


def test_concept_label_map_gives_the_scores_that_labels_stand_for(world, tmp_path):
    x, y, present = world["train"]
    model = PosthocCBM(world["bank"]).fit(x, y, validation=world["val"][:2], concept_labels=present)
    test_x, _, test_present = world["test"]
    expected, actual = model.expected_concepts(test_present), model.concepts(test_x)
    # each margin is 1.5 x its concept plus unit-variance noise: the map recovers the 1.5 steps
    weight, _ = model.concept_label_map()
    assert torch.allclose(torch.diagonal(weight), torch.full((12,), 1.5), atol=0.1)
    assert (weight - torch.diag(torch.diagonal(weight))).abs().max() < 0.15
    assert (actual - expected).std() < 0.6 < actual.std()
    loaded = load(model.save(tmp_path / "m.cbm"))
    assert torch.equal(loaded.expected_concepts(test_present), expected)
    # without concept labels: the per-concept "high"/"low" references
    plain = PosthocCBM(world["bank"]).fit(x, y, validation=world["val"][:2])
    assert plain.concept_label_map() is None
    assert torch.equal(plain.expected_concepts(test_present[:1]),
                       torch.where(test_present[:1].bool(), plain.reference_high_, plain.reference_low_))
    with pytest.raises(ValueError, match="concept labels"):
        model.expected_concepts(test_present[:, :5])


@pytest.mark.parametrize("damage, message", [
    (lambda m, h: m.update(format_version="2.0"), "newer than this toolkit"),
    (lambda m, h: m.update(family="evil"), "unknown model family"),
    (lambda m, h: m["tensors"].update(weight=[4, 13]), "manifest says"),
    (lambda m, h: m["tensors"].update(extra=[2**20, 2**20]), "absurdly large"),
    (lambda m, h: m.update(format="other"), "not a cbm model bundle"),
])
def test_crafted_bundles_are_refused(world, tmp_path, damage, message):
    x, y, _ = world["train"]
    path = PosthocCBM(world["bank"]).fit(x, y, validation=world["val"][:2]).save(tmp_path / "m.cbm")
    rewrite_manifest(path, damage)
    with pytest.raises(BundleError, match=message):
        load(path)


def test_truncated_or_foreign_files_are_refused(world, tmp_path):
    x, y, _ = world["train"]
    path = PosthocCBM(world["bank"]).fit(x, y, validation=world["val"][:2]).save(tmp_path / "m.cbm")
    raw = path.read_bytes()
    (tmp_path / "cut.cbm").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(BundleError):
        load(tmp_path / "cut.cbm")
    (tmp_path / "junk.cbm").write_bytes(b"\xff" * 64)
    with pytest.raises(BundleError, match="not a valid model bundle"):
        load(tmp_path / "junk.cbm")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.cbm")


def test_bad_inputs_are_named(world):
    x, y, _ = world["train"]
    model = PosthocCBM(world["bank"]).fit(x, y, validation=world["val"][:2])
    with pytest.raises(ValueError, match="x has 5 columns but the model expects 24"):
        model.predict(torch.zeros(3, 5))
    bad = x[:3].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in 1 rows"):
        model.predict(bad)
    with pytest.raises(ValueError, match="labels outside"):
        PosthocCBM(world["bank"]).fit(x[:50], -torch.ones(50, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension"):
        PosthocCBM(world["bank"]).fit(torch.zeros(10, 7), torch.zeros(10))


def test_a_fit_in_small_chunks_equals_the_unchunked_fit_and_uses_float32_input_in_place(world, monkeypatch):
    """The fit's passes over all rows (scores, references, label map, finiteness checks, solver) go in chunks:
    the same model as in one chunk, and float32 input is neither copied nor checked with a full-size mask."""
    from cbm.models import posthoc, streaming
    from cbm.models.base import as_matrix
    from concepts import bank as bank_module

    x, y, present = world["train"]
    settings = [{"concept_labels": present}, {"validation": world["val"][:2]}, {}]  # references: labels, quantiles
    whole = [PosthocCBM(world["bank"], hybrid=True, residual_epochs=2).fit(x, y, **fit) for fit in settings]
    for module, name, value in ((posthoc, "ROW_CHUNK", 100), (streaming, "CHUNK_BYTES", 4000),
                                (bank_module, "FINITE_CHUNK", 50)):
        monkeypatch.setattr(module, name, value)
    for model, fit in zip(whole, settings):
        chunked = PosthocCBM(world["bank"], hybrid=True, residual_epochs=2).fit(x, y, **fit)
        assert chunked.training_ == model.training_ and chunked.metrics_ == pytest.approx(model.metrics_)
        for name, value in model._state()[1].items():
            assert torch.allclose(value, chunked._state()[1][name], rtol=1e-4, atol=1e-5), name
    array = x.numpy()
    assert as_matrix(array, "x").data_ptr() == array.ctypes.data  # float32 input used in place
    bad = x.clone()
    bad[[3, 40, 1000], 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite values in 3 rows"):
        as_matrix(bad, "x")
    with pytest.raises(ValueError, match="NaN or infinite"):
        PosthocCBM(world["bank"]).fit(bad, y)
