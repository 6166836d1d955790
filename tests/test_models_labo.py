"""LaBo (Language in a Bottle): language prior, softmax-convex class weights, few-shot protocol, linear
probe, explanations, interventions, edits and bundles; unit tests on synthetic embeddings, then the
toy-world acceptance (1-shot and all-data against the linear probe) once the shipped toy:clip exists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import rewrite_manifest

from cbm.models import BundleError, load
from cbm.models.baselines import LinearProbe
from cbm.models.labo import (
    FEW_SHOTS,
    LaBoCBM,
    few_shot,
    few_shot_indices,
    few_shot_protocol,
)
from concepts.bank import ConceptBank

C, K, D = 6, 24, 48


def make_world(seed: int = 0):
    """Images are sums of concept text directions (3 typical concepts per class) plus noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    offset = torch.randn(D, generator=g)

    def sample(n: int):
        y = torch.arange(n) % C
        present = (torch.rand(n, K, generator=g) < 0.1).float()
        for c in range(C):
            rows = y == c
            present[rows, 3 * c:3 * c + 3] = (torch.rand(int(rows.sum()), 3, generator=g) < 0.8).float()
        x = present @ directions + 0.45 * torch.randn(n, D, generator=g) + 0.3 * offset
        return 5.0 * x, y

    class_concepts = {f"class {c}": [f"concept {j}" for j in range(3 * c, 3 * c + 3)] for c in range(C)}
    associations = {f"concept {j}": [f"class {j // 3}"] for j in range(3 * C)}
    associations["concept 2"].append("class 1")  # proposed by two classes
    bank = ConceptBank([f"concept {j}" for j in range(K)], directions,
                       provenance={"class_concepts": class_concepts, "associations": associations})
    return {"train": sample(900), "val": sample(300), "test": sample(600), "bank": bank,
            "class_names": [f"class {c}" for c in range(C)]}


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_world()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(world):
    return LaBoCBM(world["bank"]).fit(*world["train"], validation=world["val"], class_names=world["class_names"])


def test_prior_counts_a_concept_for_every_class_that_proposed_it(world):
    model = LaBoCBM(world["bank"])
    prior = model.prior_matrix(world["class_names"])
    assert prior.shape == (C, K) and prior.sum() == 3 * C + 1
    assert prior[0, 2] == 1 and prior[1, 2] == 1 and prior[1, 3] == 1 and prior[0, 3] == 0
    assert prior[:, 3 * C:].sum() == 0  # concepts no class proposed start at zero
    given = LaBoCBM(world["bank"], prior={"class 0": ["concept 5"]}).prior_matrix(world["class_names"])
    assert given.sum() == 1 and given[0, 5] == 1
    assert LaBoCBM(world["bank"], prior="none").prior_matrix(world["class_names"]).sum() == 0


def test_training_improves_on_the_prior_and_matches_the_linear_probe(world, fitted):
    test_x, test_y = world["test"]
    probe = LinearProbe().fit(*world["train"], validation=world["val"])
    accuracy = fitted.score(test_x, test_y)
    assert fitted.metrics_["val_accuracy"] > fitted.metrics_["prior_val_accuracy"]
    assert accuracy > probe.score(test_x, test_y) - 0.03
    assert fitted.training_["validation"] == "given" and fitted.training_["best_epoch"] > 0
    assert fitted.training_["prior_pairs"] == 3 * C + 1
    # the initial W is the prior: with zero epochs of improvement the model is the prior classifier
    start = LaBoCBM(world["bank"], epochs=1, lr=1e-12).fit(*world["train"], validation=world["val"])
    assert torch.allclose(start.association_, start.prior_, atol=1e-6)


def test_weights_are_softmax_convex_and_explain_exactly(world, fitted):
    weights = fitted.class_concept_weights()
    assert torch.allclose(weights.sum(1), torch.ones(C)) and (weights >= 0).all()
    assert torch.allclose(weights, torch.softmax(fitted.association_, dim=1))
    test_x = world["test"][0][:7]
    contributions = fitted.contributions(test_x)
    assert contributions.shape == (7, C, K)
    assert torch.allclose(contributions.sum(-1), fitted.decision_function(test_x), atol=1e-3)
    similarities = fitted.concepts(test_x)
    cosines = torch.nn.functional.normalize(test_x, dim=1) @ world["bank"].vectors.T
    assert torch.allclose(similarities, cosines, atol=1e-6)
    for c in range(C):  # each class's top concepts are the ones it proposed
        top = [name for name, _ in fitted.top_concepts(2)[f"class {c}"]]
        assert set(top) <= {f"concept {j}" for j in range(3 * c, 3 * c + 3)}
    assert np.allclose(fitted.predict_proba(test_x).sum(1), 1, atol=1e-5)


def test_raw_features_option_is_the_papers_dot_product(world):
    x, y = world["train"]
    raw = LaBoCBM.paper_recipe(world["bank"], epochs=20).fit(x, y, validation=world["val"])
    assert raw.get_params()["normalize"] is False and raw.get_params()["lr"] == 1e-4
    assert torch.allclose(raw.concepts(x[:4]), x[:4] @ world["bank"].vectors.T, atol=1e-5)
    assert raw.training_["epochs_run"] == 20 and len(raw.history_) == 3  # epoch 0, 10, 20


def test_normalised_default_is_much_faster_than_the_papers_recipe_to_equal_accuracy(world):
    ours = LaBoCBM(world["bank"]).fit(*world["train"], validation=world["val"])
    paper = LaBoCBM.paper_recipe(world["bank"], epochs=300).fit(*world["train"], validation=world["val"])
    assert ours.metrics_["val_accuracy"] >= paper.metrics_["val_accuracy"] - 0.01
    assert ours.training_["best_epoch"] * 10 < paper.training_["epochs_run"]


def test_optional_l1_and_diversity_terms_change_the_solution(world):
    args = dict(epochs=30, patience=None)
    plain = LaBoCBM(world["bank"], **args).fit(*world["train"], validation=world["val"])
    l1 = LaBoCBM(world["bank"], l1=0.05, **args).fit(*world["train"], validation=world["val"])
    diverse = LaBoCBM(world["bank"], diversity=0.5, **args).fit(*world["train"], validation=world["val"])
    assert l1.association_.abs().sum(1).max() < plain.association_.abs().sum(1).max()
    assert not torch.allclose(diverse.association_, plain.association_)


def test_validation_is_held_out_from_train_when_not_given(world):
    model = LaBoCBM(world["bank"], epochs=5).fit(*world["train"])
    assert model.training_["validation_samples"] == 90 and model.training_["samples"] == 810


def test_few_shot_sampling_is_seeded_per_class_and_leaves_small_classes_whole():
    labels = np.repeat(np.arange(4), [10, 10, 10, 2])
    one = few_shot_indices(labels, 4, seed=1)
    assert np.array_equal(np.bincount(labels[one]), [4, 4, 4, 2])
    assert np.array_equal(one, few_shot_indices(labels, 4, seed=1))
    assert not np.array_equal(one, few_shot_indices(labels, 4, seed=2))
    assert len(few_shot_indices(labels, "all")) == len(labels)
    assert FEW_SHOTS == (1, 2, 4, 8, 16, "all")
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(labels, 0)


def test_few_shot_protocol_keeps_validation_and_test_full(world):
    from cbm.embed import Embeddings

    def as_embeddings(pair, name):
        x, y = pair
        return Embeddings(x, y, [f"{name}{i}" for i in range(len(y))], world["class_names"], "synthetic", "fp")

    train, val, test = (as_embeddings(world[s], s) for s in ("train", "val", "test"))
    subset = few_shot(train, 2, seed=1)
    assert len(subset) == 2 * C and subset.ids[0].startswith("train")
    rows = few_shot_protocol(lambda: LaBoCBM(world["bank"], epochs=50), train, val, test, shots=(1, "all"))
    assert [row["train_samples"] for row in rows] == [C, len(train)]
    assert all(0 <= row["model_accuracy"] <= 1 and 0 <= row["probe_accuracy"] <= 1 for row in rows)
    assert rows[0]["model_accuracy"] > rows[0]["probe_accuracy"]  # the prior pays off at one shot


def test_linear_probe_chooses_c_on_validation(world):
    probe = LinearProbe(refine=2).fit(*world["train"], validation=world["val"])
    assert probe.val_accuracy_ == max(probe.tried_.values()) and len(probe.tried_) >= 6
    assert probe.C_ in probe.tried_


def test_interventions_by_name_reference_and_mask(world, fitted):
    test_x, test_y = world["test"]
    logits = fitted.intervene(test_x[:3], {"concept 0": "high"})
    manual = fitted.concepts(test_x[:3])
    manual[:, 0] = fitted.concept_reference("concept 0", "high")
    assert torch.allclose(logits, fitted.predict_from_concepts(manual))
    # raising class 1's concepts on every sample pulls predictions to class 1
    mask = torch.zeros(len(test_x), K, dtype=torch.bool)
    mask[:, 3:6] = True
    values = fitted.reference_high_.expand(len(test_x), K) * 2
    assert (fitted.intervene(test_x, (mask, values)).argmax(1) == 1).float().mean() > 0.9
    with pytest.raises(KeyError, match="unknown concept"):
        fitted.intervene(test_x[:3], {"concept 99": 1.0})
    with pytest.raises(ValueError, match="'high' or 'low'"):
        fitted.intervene(test_x[:3], {"concept 1": "medium"})


def test_global_edits_keep_convexity_record_metrics_and_undo(world, fitted):
    edited, record = fitted.edit("prune", "concept 0", "class 0", validation=world["val"], reason="test")
    assert edited.weight_[0, 0] == 0 and fitted.weight_[0, 0] > 0
    assert record.after["val_accuracy"] <= record.before["val_accuracy"]
    normalised, _ = fitted.edit("prune_normalize", "concept 1", "class 0")
    assert float(normalised.weight_[0].sum()) == pytest.approx(1.0, abs=1e-5)
    set_one, _ = edited.edit("set_weight", "concept 7", ["class 2"], value=0.5)
    assert set_one.weight_[2, 7] == pytest.approx(0.5) and len(set_one.edits_) == 2
    assert torch.equal(set_one.undo().undo().weight_, fitted.weight_)
    with pytest.raises(ValueError, match="no edits to undo"):
        fitted.undo()
    with pytest.raises(ValueError, match="finite"):
        fitted.edit("set_weight", "concept 7", value=float("nan"))


def test_bundle_round_trip_keeps_predictions_and_history(world, fitted, tmp_path):
    edited, _ = fitted.edit("prune", "concept 2", reason="spurious")
    path = edited.save(tmp_path / "labo.cbm")
    loaded = load(path)
    assert isinstance(loaded, LaBoCBM)
    test_x = world["test"][0]
    # (a bank renormalises its text vectors when rebuilt, hence float rounding and not bitwise equality)
    assert torch.allclose(loaded.decision_function(test_x), edited.decision_function(test_x), atol=1e-4)
    assert loaded.edits_[0].reason == "spurious" and loaded.class_names == world["class_names"]
    assert torch.equal(loaded.undo().weight_, fitted.weight_)
    assert torch.equal(loaded.prior_, fitted.prior_) and loaded.history_ == fitted.history_


def _swap_weight_for_prior_shape(manifest, header):
    manifest["concept_names"] = manifest["concept_names"][:-1]


@pytest.mark.parametrize("damage, message", [
    (lambda m, h: m["tensors"].update(weight=[C, K + 1]), "manifest says"),
    (_swap_weight_for_prior_shape, "inconsistent labo bundle"),
    (lambda m, h: m["params"].update(bogus=1), "inconsistent labo bundle"),
])
def test_crafted_bundles_are_refused(fitted, tmp_path, damage, message):
    path = fitted.save(tmp_path / "m.cbm")
    rewrite_manifest(path, damage)
    with pytest.raises(BundleError, match=message):
        load(path)


def test_non_finite_weights_in_a_bundle_are_refused(fitted, tmp_path):
    broken = fitted.copy()
    broken.weight_ = broken.weight_.clone()
    broken.weight_[0, 0] = float("nan")
    with pytest.raises(BundleError, match="NaN"):
        load(broken.save(tmp_path / "nan.cbm"))


def test_bad_inputs_are_named(world):
    x, y = world["train"]
    bank = world["bank"]
    with pytest.raises(ValueError, match="text concept bank"):
        LaBoCBM(ConceptBank(bank.names, bank.vectors, kind="cav")).fit(x, y)
    with pytest.raises(ValueError, match="no class-concept associations"):
        LaBoCBM(ConceptBank(bank.names, bank.vectors)).fit(x, y)
    with pytest.raises(ValueError, match="none of the prior's classes"):
        LaBoCBM(bank, prior={"zebra": ["concept 0"]}).fit(x, y, class_names=world["class_names"])
    with pytest.raises(ValueError, match="lr must be positive"):
        LaBoCBM(bank, lr=0).fit(x, y, class_names=world["class_names"])
    model = LaBoCBM(bank, epochs=2).fit(x, y, class_names=world["class_names"])
    with pytest.raises(ValueError, match="x has 5 columns but the model expects 48"):
        model.predict(torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------------
# Toy-world acceptance (needs the shipped toy:clip); the setup is shared with test_models_sparse
# ---------------------------------------------------------------------------------------------------

def _toy_missing() -> bool:
    from cbm.backbones import TOY_SPECS
    return not TOY_SPECS["toy:clip"].is_dir()


TOY_MISSING = _toy_missing()
TOY_SIZES = {"train": 800, "val": 300, "test": 600}
# Phrases that describe nothing in the toy world (it has only shapes, colours, patterns and layout).
_OBJECTS = ["accordion", "lighthouse", "marathon runner", "spreadsheet", "waterfall", "espresso machine",
            "kangaroo", "stock market", "snowboard", "courtroom", "cactus", "helicopter", "orchestra",
            "laundromat", "hedgehog", "wedding cake", "oil rig", "chess clock", "violinist", "mailbox",
            "rainforest", "barber shop", "tugboat", "koala", "hot air balloon", "bookshelf"]
_FRAMES = ["a {} seen from far away", "a picture of a {}", "the smell of a {}", "a {} during winter"]
DISTRACTORS = [frame.format(thing) for thing in _OBJECTS for frame in _FRAMES]


@pytest.fixture(scope="module")
def toy(toy_splits) -> dict:
    """Toy-world splits embedded with toy:clip (small sizes), candidates (each class's real concepts
    plus every distractor) and the full 30 + 104 concept bank."""
    from cbm.data.toy import CLASS_NAMES, CONCEPTS, class_concept_matrix
    from concepts import Candidates, from_class_concept_matrix

    clip, splits = toy_splits("toy:clip", sizes=TOY_SIZES)
    real = from_class_concept_matrix(CLASS_NAMES, CONCEPTS, class_concept_matrix(), threshold=0.5)
    candidates = Candidates({name: phrases + DISTRACTORS for name, phrases in real.per_class.items()})
    return {**splits, "clip": clip, "candidates": candidates, "class_names": list(CLASS_NAMES),
            "bank": ConceptBank.from_text(list(CONCEPTS) + DISTRACTORS, clip)}


@pytest.mark.skipif(TOY_MISSING, reason="the shipped toy:clip (cbm/assets/toy_clip) is missing")
def test_toy_world_labo_against_the_linear_probe(toy):
    from concepts import select_concepts

    assert len(DISTRACTORS) >= 100
    train, val, test = toy["train"], toy["val"], toy["test"]
    rows = []
    for shots in (1, "all"):
        subset = few_shot(train, shots, seed=1)
        bank = select_concepts(toy["candidates"], toy["clip"], subset.features, subset.labels, toy["class_names"],
                               k=4, backbone=subset.backbone_fingerprint)
        model = LaBoCBM(bank).fit(subset, validation=val)
        probe = LinearProbe().fit(subset, validation=val)
        rows.append((model.score(test), probe.score(test)))
        print(f"toy world, {shots} shot(s) per class: LaBo {rows[-1][0]:.3f} ({len(bank)} concepts, "
              f"{model.training_['seconds']:.2f} s, best epoch {model.training_['best_epoch']}) "
              f"vs linear probe {rows[-1][1]:.3f} (C={probe.C_:g})")
    (labo_one, probe_one), (labo_all, probe_all) = rows
    assert labo_one > probe_one
    assert labo_all >= probe_all - 0.03


# ---------------------------------------------------------------------------------------------------
# The diversity term, foreign class names and few-shot selection from the command line
# ---------------------------------------------------------------------------------------------------


def test_diversity_term_is_the_references_variance_over_the_batch():
    from cbm.models.labo import diversity_term

    # each image scores every class alike (variance over classes 0) but images differ (over the batch)
    scores = torch.tensor([[0.1] * 3, [0.5] * 3, [0.9] * 3])
    assert float(diversity_term(scores)) == pytest.approx(-0.16)
    # shares of parts of a batch (a streamed full batch) add up to the whole batch's value and gradient
    batch = torch.randn(10, 4, requires_grad=True)
    centre = batch.mean(0).detach()
    shares = diversity_term(batch[:3], centre, 10) + diversity_term(batch[3:], centre, 10)
    whole = -batch.var(dim=0).mean()
    assert float(shares.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    assert torch.allclose(torch.autograd.grad(shares, batch)[0], torch.autograd.grad(whole, batch)[0], atol=1e-6)


class HashEncoder:
    """A deterministic stand-in text encoder: each text gets its own random direction."""

    def encode_texts(self, texts):
        return torch.stack([torch.randn(D, generator=torch.Generator().manual_seed(sum(map(ord, t)) * 7 + len(t)))
                            for t in texts])


def test_selection_matches_foreign_class_names_and_lists_the_rest(world):
    from concepts import Candidates, select_concepts

    x, y = world["train"]
    class_names = ["Black_footed_Albatross", "aquarium_fish", "class 2", "class 3", "class 4", "class 5"]
    candidates = Candidates({"black footed albatross": ["white head", "long wings"],
                             "Aquarium  Fish": ["orange scales", "fins"], "class 2": ["stripes"]})
    bank = select_concepts(candidates, HashEncoder(), x, y, class_names, k=1, templates=["{}"])
    assert set(bank.provenance["class_concepts"]) == {"Black_footed_Albatross", "aquarium_fish", "class 2"}
    assert bank.provenance["candidates"]["renamed_classes"] == {"black footed albatross": "Black_footed_Albatross",
                                                                "Aquarium  Fish": "aquarium_fish"}
    assert bank.provenance["templates"] == ["{}"] and bank.provenance["selection"]["samples"] == len(y)
    prior = LaBoCBM(bank).prior_matrix(class_names)
    assert prior[0].sum() == 1 and prior[1].sum() == 1
    with pytest.raises(ValueError, match=r"match no class.*\['zebra', 'sea_horse'\]"):
        select_concepts(Candidates({"zebra": ["stripes"], "class 2": ["dots"], "sea_horse": ["curl"]}),
                        HashEncoder(), x, y, class_names, k=1)
    given = LaBoCBM(bank, prior={"BLACK FOOTED albatross": [bank.names[-1]]}).prior_matrix(class_names)
    assert given.sum() == 1 and given[0, -1] == 1


@pytest.mark.skipif(TOY_MISSING, reason="the shipped toy:clip (cbm/assets/toy_clip) is missing")
def test_cbm_fit_labo_selects_concepts_on_the_few_shot_rows_only(tmp_path, monkeypatch):
    import concepts
    from cbm import cli
    from cbm.data.toy import CLASS_NAMES, CONCEPTS, class_concept_matrix
    from concepts import from_class_concept_matrix

    real = from_class_concept_matrix(CLASS_NAMES, CONCEPTS, class_concept_matrix(), threshold=0.5)
    path = tmp_path / "class2concepts.json"  # keyed like LaBo's files: other case, underscores
    path.write_text(json.dumps({name.upper().replace(" ", "_"): phrases for name, phrases in real.per_class.items()}))
    seen = []

    def spy(candidates, encoder, features, labels, *args, **kwargs):
        seen.append(torch.bincount(torch.as_tensor(labels), minlength=len(CLASS_NAMES)))
        return select(candidates, encoder, features, labels, *args, **kwargs)

    select = concepts.select_concepts
    monkeypatch.setattr(concepts, "select_concepts", spy)
    out = tmp_path / "labo.cbm"
    assert cli.main(["fit", "labo", "--backbone", "toy:clip", "--data", "toy:images@val", "--concepts", str(path),
                     "--shots", "2", "--k", "3", "--templates", "a photo of {}", "--epochs", "5", "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert len(seen) == 1 and seen[0].tolist() == [2] * len(CLASS_NAMES)  # 2 per class, not the 900 training rows
    bank = load(out).bank
    assert bank.provenance["selection"]["samples"] == 2 * len(CLASS_NAMES)
    assert bank.provenance["templates"] == ["a photo of {}"]
    assert set(bank.provenance["class_concepts"]) <= set(CLASS_NAMES)
