"""The concept-supervised families on the toy world (toy:cnn embeddings, the world's 30 concept labels):
Koh et al.'s concept bottleneck (independent, sequential, joint) and the Concept Embedding Model.

They are checked against the linear probe, for what ground-truth interventions do (0/1 labels are
absent/present), for CEM's RandInt gain, for bundles, edits, exact decompositions and the CLI.
"""

from __future__ import annotations

import pytest
import torch

from cbm.backbones import TOY_SPECS
from cbm.data.toy import CONCEPT_GROUPS
from cbm.models import ConceptBottleneck, ConceptEmbeddingModel, load
from cbm.models.baselines import LinearProbe
from concepts.bank import concept_groups

pytestmark = pytest.mark.skipif(not TOY_SPECS["toy:cnn"].is_dir(), reason="the shipped toy:cnn is missing")

SIZES = {"train": 2000, "val": 500, "test": 1000}
MODELS = {
    "joint": lambda: ConceptBottleneck(training="joint"),
    "sequential": lambda: ConceptBottleneck(training="sequential"),
    "independent": lambda: ConceptBottleneck(training="independent"),
    "cem": lambda: ConceptEmbeddingModel(),
    "cem without RandInt": lambda: ConceptEmbeddingModel(training_intervention_prob=0.0),
}


@pytest.fixture(scope="module")
def world(toy_splits):
    _, splits = toy_splits("toy:cnn", "toy:images", SIZES)
    models: dict = {}

    def model(name: str):
        if name not in models:
            models[name] = MODELS[name]().fit(splits["train"], validation=splits["val"])
        return models[name]

    return {**splits, "model": model}


@pytest.fixture(scope="module")
def small(world):
    """A quick fit's data: 600 training and 200 validation images."""
    return world["train"].subset(slice(0, 600)), world["val"].subset(slice(0, 200)), world["test"].subset(slice(0, 200))


def accuracy_with(model, data, mask) -> float:
    truth = torch.as_tensor(data.concept_labels)
    return float((model.intervene(data, (mask, truth)).argmax(1) == torch.as_tensor(data.labels)).float().mean())


def random_mask(shape, count: int) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    return mask.scatter_(1, torch.rand(shape, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :count], True)


def test_every_training_matches_the_linear_probe_and_learns_the_concepts(world):
    test = world["test"]
    probe = LinearProbe(cs=(0.1,), refine=0).fit(world["train"], validation=world["val"]).score(test)
    truth = torch.as_tensor(test.concept_labels)
    for name in ("joint", "sequential", "independent", "cem"):
        model = world["model"](name)
        assert model.score(test) >= probe - 0.015, (name, model.score(test), probe)
        concept_accuracy = float(((model.concept_probabilities(test) > 0.5).float() == truth).float().mean())
        assert concept_accuracy >= 0.9, (name, concept_accuracy)


def test_ground_truth_labels_raise_accuracy_and_0_1_mean_absent_present(world):
    test = world["test"]
    shape = torch.as_tensor(test.concept_labels).shape
    for name in ("joint", "sequential", "independent", "cem"):
        model = world["model"](name)
        base = model.score(test)
        assert accuracy_with(model, test, random_mask(shape, 4)) >= base + 0.005, name
        assert accuracy_with(model, test, torch.ones(shape, dtype=torch.bool)) >= 0.95, name
    model, rows = world["model"]("sequential"), test.subset(slice(0, 50))
    column = model.concept_index("red")
    by_name = model.intervene(rows, {"red": "present"})
    by_mask = model.intervene(rows, (random_mask((50, 30), 0) | (torch.arange(30) == column), torch.ones(50, 30)))
    assert torch.equal(by_name, by_mask) and torch.equal(model.intervene(rows, {"red": 1}), by_name)
    assert (model.intervene(rows, {"red": "absent"})[:, model.class_index("tomato")]
            < by_name[:, model.class_index("tomato")]).all()


def test_randint_makes_cem_use_corrected_concepts(world):
    test = world["test"]
    every = torch.ones(torch.as_tensor(test.concept_labels).shape, dtype=torch.bool)
    randint, plain = world["model"]("cem"), world["model"]("cem without RandInt")
    assert accuracy_with(randint, test, every) >= accuracy_with(plain, test, every) + 0.03
    assert randint.score(test) >= plain.score(test) - 0.01


def test_a_logit_bottleneck_puts_absent_and_present_at_the_training_percentiles(small):
    train, val, test = small
    for training in ("joint", "sequential"):
        model = ConceptBottleneck(training=training, head_input="logits", max_epochs=40).fit(train, validation=val)
        scaled = model.concepts(train)
        assert torch.allclose(torch.quantile(scaled, 0.05, dim=0), torch.zeros(30), atol=1e-4), training
        assert torch.allclose(torch.quantile(scaled, 0.95, dim=0), torch.ones(30), atol=1e-4), training
        assert model.score(test) >= 0.8, training  # the folded head computes what was trained
        if training == "sequential":  # (a joint head leans on logits beyond the references: 0.91 -> 0.85 here)
            every = torch.ones(torch.as_tensor(test.concept_labels).shape, dtype=torch.bool)
            assert accuracy_with(model, test, every) >= model.score(test) + 0.03


@pytest.mark.parametrize("make", [
    lambda: ConceptBottleneck(head="mlp", predictor="mlp", hidden=32, head_hidden=16, max_epochs=15),
    lambda: ConceptEmbeddingModel(head="mlp", predictor="mlp", hidden=32, head_hidden=16, embedding_size=4,
                                  max_epochs=15)], ids=["cbm", "cem"])
def test_mlp_heads_decompose_exactly_prune_for_all_classes_and_round_trip(make, small, tmp_path):
    train, val, test = small
    model = make().fit(train, validation=val)
    logits = model.decision_function(test)
    contributions = model.contributions(test)
    assert torch.allclose(contributions.sum(-1) + model.contribution_rest(test), logits, atol=1e-4)
    with pytest.raises(ValueError, match="all classes"):
        model.edit("prune", "red", "tomato")
    pruned, record = model.edit("prune", "red", validation=val)
    column = model.concept_index("red")
    assert pruned.contributions(test)[:, :, column].abs().max() == 0
    assert torch.equal(pruned.intervene(test, {"red": 1.0}), pruned.intervene(test, {"red": 0.0}))
    assert "val_accuracy" in record.before and model.contributions(test)[:, :, column].abs().max() > 0
    path = pruned.save(tmp_path / "model.cbm")
    loaded = load(path)
    assert type(loaded) is type(model) and loaded.edits_[0].concept == "red"
    assert torch.equal(loaded.decision_function(test), pruned.decision_function(test))
    assert torch.equal(loaded.undo().decision_function(test), logits)


def test_linear_heads_edit_per_class_and_bundles_refuse_other_shapes(world, tmp_path):
    test = world["test"].subset(slice(0, 100))
    for name in ("joint", "cem"):
        model = world["model"](name)
        tomato, red = model.class_index("tomato"), model.concept_index("red")
        edited, _ = model.edit("prune", "red", "tomato")
        after, before = edited.contributions(test), model.contributions(test)
        assert after[:, tomato, red].abs().max() == 0 and before[:, tomato, red].abs().max() > 0, name
        others = [c for c in range(len(model.class_names)) if c != tomato]
        assert torch.equal(after[:, others], before[:, others]), name
        assert torch.equal(edited.undo().decision_function(test), model.decision_function(test)), name
        path = edited.save(tmp_path / f"{name}.cbm")
        assert torch.equal(load(path).decision_function(test), edited.decision_function(test)), name
    joint = world["model"]("joint")
    assert dict(joint.top_concepts(30)["tomato"])["red"] > 0  # tomatoes are red
    broken = joint.copy()
    broken.net_["head.0.weight"] = broken.net_["head.0.weight"][:, :5]
    broken.save(tmp_path / "broken.cbm")
    with pytest.raises(ValueError, match="inconsistent cbm bundle"):
        load(tmp_path / "broken.cbm")


def test_missing_or_soft_concept_labels_are_refused_with_what_to_do(small):
    train, val, _ = small
    x, y = train.features, train.labels
    with pytest.raises(ValueError, match="concept labels"):
        ConceptBottleneck().fit(x, y)
    with pytest.raises(ValueError, match="binary"):
        ConceptEmbeddingModel().fit(x, y, concept_labels=torch.full((len(x), 3), 0.5))
    with pytest.raises(ValueError, match="validation data need concept labels"):
        ConceptBottleneck().fit(train, validation=(val.features, val.labels))
    with pytest.raises(ValueError, match="training must be"):
        ConceptBottleneck(training="staged").fit(train)


def test_cbm_fit_cbm_and_cem_on_the_command_line(small, tmp_path, monkeypatch, capsys):
    from cbm import cli

    train, val, _ = small
    monkeypatch.setattr(cli, "_embed_for", lambda spec, data, args, fingerprint=None: (None, train if "train" in data
                                                                                       else val))
    common = ["--backbone", "toy:cnn", "--data", "toy:images@train", "--val", "toy:images@val", "--epochs", "5",
              "--device", "cpu"]
    assert cli.main(["fit", "cbm", *common, "--training", "sequential", "--head-input", "logits", "--balanced",
                     "--out", str(tmp_path / "cbm.cbm")]) == 0
    assert cli.main(["fit", "cem", *common, "--p-int", "0.5", "--embedding-size", "4", "--out",
                     str(tmp_path / "cem.cbm")]) == 0
    assert "with every concept set to its label" in capsys.readouterr().out
    cbm, cem = load(tmp_path / "cbm.cbm"), load(tmp_path / "cem.cbm")
    assert (cbm.training, cbm.head_input, cbm.max_epochs, cbm.concept_class_weights) == ("sequential", "logits", 5,
                                                                                       "balanced")
    assert cbm.positive_weight_ is not None and (cem.training_intervention_prob, cem.embedding_size) == (0.5, 4)
    assert cli.main(["fit", "cem", *common, "--concepts", "toy", "--out", str(tmp_path / "x.cbm")]) == 2
    assert "drop --concepts" in capsys.readouterr().err


def test_concept_groups_come_from_attribute_names_or_are_checked(small):
    names = ["has_bill_shape::dagger", "has_bill_shape::hooked", "has_wing_color::blue", "red"]
    assert concept_groups(names) == {"bill shape": names[:2]}  # a lone value is no group
    with pytest.raises(ValueError, match="both groups"):
        concept_groups(names, {"a": ["red"], "b": ["red"]})
    with pytest.raises(ValueError, match="not concepts"):
        concept_groups(names, {"a": ["blue"]})
    train, val, _ = small
    model = ConceptBottleneck(training="sequential", max_epochs=20).fit(train, validation=val,
                                                                        concept_groups=CONCEPT_GROUPS)
    rows = train.subset(slice(0, 20))
    colours = {name: float(name == "red") for name in CONCEPT_GROUPS["colour"]}
    assert torch.equal(model.intervene(rows, {"colour": "red"}), model.intervene(rows, colours))
    with pytest.raises(KeyError, match="not a value of the concept group 'colour'"):
        model.intervene(rows, {"colour": "crimson"})


def test_intervention_curves_by_group_correct_whole_groups(world):
    import explain

    test = world["test"].subset(slice(0, 300))
    model = world["model"]("sequential")
    with pytest.raises(ValueError, match="needs concept groups"):
        explain.intervention_curves(model, test, by="group")
    curves = explain.intervention_curves(model, test, by="group", groups=CONCEPT_GROUPS, seeds=(0,))
    assert curves.by == "group" and curves.counts == list(range(len(CONCEPT_GROUPS) + 1))
    every = torch.ones(torch.as_tensor(test.concept_labels).shape, dtype=torch.bool)
    for policy in ("random", "uncertain", "contribution", "oracle"):
        curve = curves.curve(policy)
        assert curve[0] == pytest.approx(model.score(test), abs=1e-6), policy
        if policy != "oracle":  # all groups corrected = every concept set to its label
            assert curve[-1] == pytest.approx(accuracy_with(model, test, every), abs=1e-6), policy
    assert curves.curve("oracle")[3] >= curves.curve("random")[3]
    assert curves.curve("random")[1] < curves.curve("random")[len(CONCEPT_GROUPS)]
