"""Sparse-CBM (CBL + head over CLIP concept similarities; Gumbel, contrastive and l1 losses) and the
training-free Concept Matrix Search; synthetic unit tests, then the toy-world acceptance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_models_labo import TOY_MISSING, make_world, toy  # noqa: F401 (toy: a shared fixture)
from tiny_models import rewrite_manifest

from cbm.models import BundleError, load
from cbm.models.baselines import LinearProbe
from cbm.models.sparse import (
    ConceptMatrixSearch,
    SparseCBM,
    alignment_loss,
    concept_matrix_search,
    contrastive_loss,
    gumbel_loss,
    top_share,
)
from concepts.bank import ConceptBank

C, K = 6, 24


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_world(1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(world):
    return {loss: SparseCBM(world["bank"], loss=loss).fit(*world["train"], validation=world["val"],
                                                                       class_names=world["class_names"])
            for loss in ("gumbel", "contrastive", "l1")}


def test_every_loss_trains_close_to_the_linear_probe(world, fitted):
    test_x, test_y = world["test"]
    probe = LinearProbe().fit(*world["train"], validation=world["val"]).score(test_x, test_y)
    for loss, model in fitted.items():  # the 24 concept directions span half of the 48-d space the probe sees
        assert model.score(test_x, test_y) > probe - 0.06, loss
        assert model.training_["validation"] == "given"


def test_both_the_bottleneck_layer_and_the_head_are_optimised(world, fitted):
    # the packaged reference trainer never updates its head; here both layers must move from their init
    for model in fitted.values():
        assert model.training_["relative_change_head"] > 0.05
        assert model.training_["relative_change_cbl"] > 0.05
    torch.manual_seed(0)
    init_cbl, init_head = torch.nn.Linear(K, K, bias=False), torch.nn.Linear(K, C, bias=False)
    one = SparseCBM(world["bank"], epochs=1, patience=None).fit(*world["train"], validation=world["val"])
    assert not torch.allclose(one.weight_, init_head.weight.detach())
    assert not torch.allclose(one.cbl_weight_, torch.eye(K) / K ** 0.5)
    free = SparseCBM(world["bank"], epochs=1, patience=None, init="random").fit(*world["train"], validation=world["val"])
    assert not torch.allclose(free.cbl_weight_, init_cbl.weight.detach())


def own_input_is_most_correlated(model, x) -> float:
    """Share of bottleneck outputs whose most correlated CBL input (concept similarity) is their own."""
    outputs, inputs = model.concepts(x), model.similarities(x)
    outputs = torch.nn.functional.normalize(outputs - outputs.mean(0), dim=0)
    inputs = torch.nn.functional.normalize(inputs - inputs.mean(0), dim=0)
    correlation = outputs.T @ inputs  # [output, input]
    return float((correlation.argmax(1) == torch.arange(len(correlation))).float().mean())


def test_alignment_loss_rewards_each_output_tracking_its_own_similarity():
    sims = torch.randn(64, 10)
    assert float(alignment_loss(3 * sims + 5, sims)) == pytest.approx(0.0, abs=1e-5)  # scale and offset are free
    assert float(alignment_loss(sims[:, torch.randperm(10, generator=torch.Generator().manual_seed(1))], sims)) > 0.7
    assert float(alignment_loss(-sims, sims)) == pytest.approx(2.0, abs=1e-5)


def test_each_bottleneck_output_is_the_concept_it_is_named_after(world, fitted):
    # interventions, top_concepts and edits address output j as concept j: it must follow concept j's similarity
    x = world["test"][0]
    for loss, model in fitted.items():
        assert own_input_is_most_correlated(model, x) >= 0.9, loss
        assert model.metrics_["val_concept_alignment"] > 0.8, loss
    free = SparseCBM(world["bank"], align=0, init="random").fit(*world["train"], validation=world["val"])
    assert own_input_is_most_correlated(free, x) < 0.5  # the reference's free layer mixes them
    with pytest.raises(ValueError, match="align must be"):
        SparseCBM(world["bank"], align=-1).fit(*world["train"])
    with pytest.raises(ValueError, match="init must be"):
        SparseCBM(world["bank"], init="zeros").fit(*world["train"])


def test_gumbel_loss_is_the_references_form():
    logits = torch.randn(8, 5)
    torch.manual_seed(3)
    ours = gumbel_loss(logits, tau=0.5)
    torch.manual_seed(3)
    expected = []
    for dim in (0, 1):
        noise = -torch.empty_like(logits).exponential_().log()
        expected.append(-torch.log_softmax((logits + noise) / 0.5, dim=dim).mean())
    assert float(ours) == pytest.approx(float(sum(expected) / 2), rel=1e-4)


def test_contrastive_loss_pairs_each_sample_with_its_own_profile():
    targets = torch.randn(16, 10)
    aligned = contrastive_loss(3 * targets, targets)
    shuffled = contrastive_loss(targets[torch.randperm(16, generator=torch.Generator().manual_seed(0))], targets)
    assert aligned < shuffled
    assert contrastive_loss(torch.randn(7, 10), torch.randn(7, 10)).isfinite()  # B != K is fine


def test_l1_loss_is_lambda_over_k(world):
    model = SparseCBM(world["bank"], loss="l1", l1_lambda=0.5)
    layer = torch.nn.Linear(K, K, bias=False)
    assert float(model._cbl_loss(torch.zeros(2, K), torch.zeros(2, K), layer).detach()) == pytest.approx(
        float(0.5 / K * layer.weight.detach().abs().sum()))


def test_sparsity_report(world, fitted):
    one_hot = torch.zeros(3, 20)
    one_hot[:, 4] = 7.0
    assert top_share(one_hot)["top5_abs_share"] == pytest.approx(1.0)
    flat = top_share(torch.ones(3, 20))
    assert flat["top5_abs_share"] == pytest.approx(0.25) and flat["top5_softmax_share"] == pytest.approx(0.25)
    report = fitted["gumbel"].sparsity(world["test"][0])
    assert 0.25 <= report["top5_abs_share"] <= 1 and report["uniform_share"] == pytest.approx(5 / K)
    assert "val_top5_abs_share" in fitted["gumbel"].metrics_


def test_similarities_are_scaled_cosines_and_contributions_exact(world, fitted):
    model = fitted["l1"]
    x = world["test"][0][:5]
    cosines = torch.nn.functional.normalize(x, dim=1) @ world["bank"].vectors.T
    assert torch.allclose(model.similarities(x), 100 * cosines, atol=1e-4)
    assert torch.allclose(model.concepts(x), model.similarities(x) @ model.cbl_weight_.T, atol=1e-4)
    assert torch.allclose(model.contributions(x).sum(-1), model.decision_function(x), atol=1e-3)
    assert len(model.top_concepts(3)["class 0"]) == 3


def test_interventions_edits_and_undo(world, fitted):
    model = fitted["gumbel"]
    x = world["test"][0][:4]
    logits = model.intervene(x, {"concept 3": "low"})
    manual = model.concepts(x)
    manual[:, 3] = model.concept_reference("concept 3", "low")
    assert torch.allclose(logits, model.predict_from_concepts(manual))
    mask = torch.ones(4, K, dtype=torch.bool)
    assert torch.allclose(model.intervene(x, (mask, torch.zeros(4, K))), torch.zeros(4, C))
    edited, record = model.edit("prune", "concept 0", validation=world["val"], reason="check")
    assert edited.weight_[:, 0].abs().sum() == 0 and "val_accuracy" in record.after
    assert torch.equal(edited.undo().weight_, model.weight_)


def test_bundle_round_trip_and_tampering(world, fitted, tmp_path):
    model = fitted["contrastive"]
    edited, _ = model.edit("set_weight", "concept 1", "class 1", value=2.0, reason="boost")
    loaded = load(edited.save(tmp_path / "sparse.cbm"))
    assert isinstance(loaded, SparseCBM) and loaded.get_params()["loss"] == "contrastive"
    x = world["test"][0]
    assert torch.allclose(loaded.decision_function(x), edited.decision_function(x), atol=1e-3)
    assert loaded.edits_[0].reason == "boost" and torch.equal(loaded.undo().weight_, model.weight_)
    path = model.save(tmp_path / "bad.cbm")
    rewrite_manifest(path, lambda m, h: m["tensors"].update(cbl_weight=[K, K + 1]))
    with pytest.raises(BundleError, match="manifest says"):
        load(path)


def test_bad_inputs_are_named(world):
    x, y = world["train"]
    with pytest.raises(ValueError, match="loss must be"):
        SparseCBM(world["bank"], loss="hinge").fit(x, y)
    with pytest.raises(ValueError, match="text concept bank"):
        SparseCBM(ConceptBank(world["bank"].names, world["bank"].vectors, kind="cav")).fit(x, y)
    with pytest.raises(ValueError, match="tau must be positive"):
        SparseCBM(world["bank"], tau=0).fit(x, y)


# ------------------------------------------------------------------------------------ Concept Matrix Search


def test_cms_rules_on_a_hand_made_case():
    concepts = torch.eye(4)
    classes = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]])
    images = torch.tensor([[0.9, 0.8, 0.1, 0.1], [0.1, 0.1, 0.2, 0.9], [0.1, 0.1, 0.9, 0.1]])
    assert concept_matrix_search(images, concepts, classes, "similarity").tolist() == [0, 1, 1]
    # max rule: image 1's top concept is 3, which class 1 owns (class 0 has none of it)
    assert concept_matrix_search(images, concepts, classes, "max").tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="rule must be"):
        concept_matrix_search(images, concepts, classes, "vote")
    with pytest.raises(ValueError, match="sums to zero"):
        concept_matrix_search(torch.tensor([[1.0, -1.0, 0.0, 0.0]]), concepts, classes)


def test_cms_from_text_uses_the_banks_templates(world):
    class Recorder:
        def __init__(self):
            self.texts = []

        def encode_texts(self, texts):
            self.texts += list(texts)
            return torch.randn(len(texts), world["bank"].dim, generator=torch.Generator().manual_seed(len(self.texts)))

    bank = ConceptBank(world["bank"].names, world["bank"].vectors, provenance={"templates": ["{}", "a {} thing"]})
    encoder = Recorder()
    ConceptMatrixSearch.from_text(bank, encoder, ["red", "blue"])
    assert encoder.texts == ["red", "a red thing", "blue", "a blue thing"]
    encoder.texts = []
    ConceptMatrixSearch.from_text(bank, encoder, ["red"], prompts=["a photo of {}"])
    assert encoder.texts == ["a photo of red"]


def test_cms_classifies_the_synthetic_world(world):
    bank = world["bank"]
    classes = torch.stack([bank.vectors[3 * c:3 * c + 3].mean(0) for c in range(C)])
    cms = ConceptMatrixSearch(bank, classes, world["class_names"])
    test_x, test_y = world["test"]
    chance = 1 / C
    assert cms.score(test_x, test_y) > 3 * chance and cms.score(test_x, test_y, rule="max") > 2 * chance
    assert cms.predict(test_x).shape == (len(test_y),)


# ------------------------------------------------------------------------------------ toy-world acceptance


@pytest.fixture(scope="module")
def toy_fitted(toy) -> dict:
    return {loss: SparseCBM(toy["bank"], loss=loss).fit(toy["train"], validation=toy["val"])
            for loss in ("gumbel", "contrastive", "l1")}


def toy_concept_auc(model, data) -> float:
    """Mean ROC AUC of the model's bottleneck outputs against the toy world's ground-truth concepts."""
    from sklearn.metrics import roc_auc_score

    activations = model.concepts(data).detach().numpy()
    labels = data.concept_labels.numpy()
    return float(np.mean([roc_auc_score(labels[:, j], activations[:, model.concept_names.index(name)])
                          for j, name in enumerate(data.concept_names)]))


@pytest.mark.skipif(TOY_MISSING, reason="the shipped toy:clip (cbm/assets/toy_clip) is missing")
def test_toy_world_bottleneck_outputs_are_their_concepts(toy, toy_fitted):
    test = toy["test"]
    similarity_auc = toy_concept_auc(type("Similarities", (), {"concepts": toy_fitted["gumbel"].similarities,
                                                                "concept_names": toy["bank"].names}), test)
    world = [toy["bank"].names.index(name) for name in test.concept_names]
    for loss, model in toy_fitted.items():
        auc = toy_concept_auc(model, test)
        outputs, inputs = model.concepts(test), model.similarities(test)
        outputs = torch.nn.functional.normalize(outputs - outputs.mean(0), dim=0)
        inputs = torch.nn.functional.normalize(inputs - inputs.mean(0), dim=0)
        own = float(((outputs.T @ inputs).argmax(1)[world] == torch.tensor(world)).float().mean())
        print(f"Sparse-CBM {loss:<11} bottleneck concept AUC {auc:.3f} (CLIP similarities {similarity_auc:.3f}); "
              f"own similarity most correlated for {own:.2f} of the world's concepts")
        assert auc >= 0.9, loss
        assert own >= 0.8, loss


@pytest.mark.skipif(TOY_MISSING, reason="the shipped toy:clip (cbm/assets/toy_clip) is missing")
def test_toy_world_sparse_cbm_variants_and_cms(toy, toy_fitted):
    from cbm.data.toy import class_prompts
    from cbm.toymodels.quality import zero_shot_accuracy

    train, val, test, bank = toy["train"], toy["val"], toy["test"], toy["bank"]
    probe = LinearProbe().fit(train, validation=val).score(test)
    print(f"\ntoy world, {len(bank)} concepts ({len(bank) - 30} distractors); linear probe {probe:.3f}")
    results = {}
    for loss, model in toy_fitted.items():
        share = model.sparsity(test)
        results[loss] = model.score(test)
        top = [name for name, _ in model.top_concepts(3)[toy["class_names"][0]]]
        print(f"Sparse-CBM {loss:<11} accuracy {results[loss]:.3f}  top-5 share |a| {share['top5_abs_share']:.3f} "
              f"softmax {share['top5_softmax_share']:.3f} (uniform {share['uniform_share']:.3f})  "
              f"{model.training_['seconds']:.1f} s; {toy['class_names'][0]}: {top}")
    cms = ConceptMatrixSearch.from_text(bank, toy["clip"], toy["class_names"], prompts=class_prompts)
    zero_shot = zero_shot_accuracy(test.features, cms.class_vectors, test.labels)
    print(f"CMS similarity {cms.score(test):.3f}, CMS max {cms.score(test, rule='max'):.3f}, "
          f"zero-shot class names {zero_shot:.3f}")
    assert results["gumbel"] >= probe - 0.03
