"""Unit tests of the concepts package on synthetic tensors and a word-hashing text encoder."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from concepts import (
    BackboneMismatchError,
    BankFormatError,
    Candidates,
    ConceptBank,
    cavs_from_labels,
    filters,
    from_awa,
    from_class_concept_matrix,
    from_csv,
    from_cub,
    from_list,
    from_starter,
    learn_cavs,
    select_concepts,
)
from concepts.select import SelectionObjective, discriminability, greedy
from concepts.text import clean_concept, merge_plurals, singular


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensor loops are slower with several threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WordEncoder:
    """Texts embed as the sum of fixed random vectors of their words: shared words, similar texts."""

    fingerprint = "word-encoder-v1"
    spec = "test:words"

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def word(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        stop = {"a", "photo", "of", "something"}
        return torch.stack([sum((self.word(w) for w in t.lower().split() if w not in stop),
                                torch.zeros(self.dim)) + 1e-3 for t in texts])


# ------------------------------------------------------------------------------------------ text

@pytest.mark.parametrize("raw, cleaned", [
    ("pizza box", "pizza box"), ("A Pizza Box.", "pizza box"), ("the  red   wing ", "red wing"),
    ("an apple", "apple"), ("banana", "banana"), ("a", "a"), ("theatre seats", "theatre seats"),
    ("**Striped fur**", "striped fur"),
])
def test_clean_concept_strips_only_whole_leading_articles(raw, cleaned):
    assert clean_concept(raw) == cleaned


def test_singular_and_plural_merging():
    assert [singular(w) for w in ["stripes", "boxes", "cherries", "leaves", "glass", "bus", "christmas"]] == \
        ["stripe", "box", "cherry", "leaf", "glass", "bus", "christmas"]
    kept, merged = merge_plurals(["red stripes", "red stripe", "glasses", "dots", "wing"])
    assert kept == ["red stripe", "glasses", "dots", "wing"]
    assert merged == {"red stripes": "red stripe"}


@pytest.mark.parametrize("bad", ["", "   ", None, 3, b"x"])
def test_blank_or_non_text_concepts_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        ConceptBank([bad], torch.ones(1, 4))
    with pytest.raises((ValueError, TypeError)):
        Candidates({"cls": [bad]})


# ------------------------------------------------------------------------------------------ bank

def test_text_bank_scores_are_cosines_and_cav_scores_are_margins():
    encoder = WordEncoder()
    bank = ConceptBank.from_text(["red", "blue circle"], encoder, templates=("{}", "a photo of {}"))
    assert bank.kind == "text" and bank.backbone == encoder.fingerprint
    assert torch.allclose(bank.vectors.norm(dim=1), torch.ones(2))
    features = torch.randn(5, 64) * 7
    expected = torch.nn.functional.normalize(features, dim=1) @ bank.vectors.T
    assert torch.allclose(bank.scores(features), expected, atol=1e-6)

    cav = ConceptBank(["x"], torch.tensor([[3.0, 4.0]]), torch.tensor([5.0]), kind="cav")
    assert torch.allclose(cav.scores(torch.tensor([[1.0, 1.0]])), torch.tensor([[(3 + 4 + 5) / 5.0]]))


def test_bank_refuses_features_of_another_backbone():
    bank = ConceptBank(["a", "b"], torch.randn(2, 8), backbone="fp-one")
    with pytest.raises(BackboneMismatchError, match="dimension 9"):
        bank.scores(torch.randn(3, 9))
    with pytest.raises(BackboneMismatchError, match="backbone"):
        bank.scores(torch.randn(3, 8), backbone="fp-two")
    assert bank.scores(torch.randn(3, 8), backbone="fp-one").shape == (3, 2)


def test_bank_validation_errors():
    with pytest.raises(ValueError, match="at least one"):
        ConceptBank([], torch.zeros(0, 4))
    with pytest.raises(ValueError, match="unique"):
        ConceptBank(["a", "a"], torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-zero"):
        ConceptBank(["a"], torch.zeros(1, 4))


def test_subset_drop_rename_concatenate_keep_stats():
    stats = {"val_accuracy": torch.tensor([0.9, 0.8, 0.7])}
    bank = ConceptBank(["a", "b", "c"], torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0]), kind="cav",
                       backbone="fp", stats=stats)
    sub = bank.subset(["c", "a"])
    assert sub.names == ["c", "a"] and sub.intercepts.tolist() == [3.0, 1.0]
    assert sub.stats["val_accuracy"].tolist() == pytest.approx([0.7, 0.9])
    assert bank.drop(["b"]).names == ["a", "c"]
    assert bank.rename({"a": "apple"}).names == ["apple", "b", "c"]
    with pytest.raises(ValueError, match="unique"):
        bank.rename({"a": "b"})
    with pytest.raises(KeyError, match="no concept"):
        bank.drop(["zzz"])
    with pytest.raises(ValueError, match="empty"):
        bank.drop(["a", "b", "c"])
    other = ConceptBank(["d"], torch.randn(1, 4), kind="cav", backbone="fp")
    both = ConceptBank.concatenate([bank, other])
    assert both.names == ["a", "b", "c", "d"] and math.isnan(both.stats["val_accuracy"][3])
    with pytest.raises(ValueError, match="kind|scales"):
        ConceptBank.concatenate([bank, ConceptBank(["t"], torch.randn(1, 4))])


def test_save_load_round_trip_and_hostile_files(tmp_path):
    bank = ConceptBank(["a", "b"], torch.randn(2, 4), torch.tensor([0.5, -0.5]), kind="cav", backbone="fp",
                       provenance={"generator": "test", "nested": {"x": [1, 2]}}, stats={"C": torch.tensor([1., 2.])})
    folder = bank.save(tmp_path / "bank")
    loaded = ConceptBank.load(folder)
    assert loaded.names == bank.names and torch.equal(loaded.vectors, bank.vectors)
    assert loaded.provenance == bank.provenance and torch.equal(loaded.stats["C"], bank.stats["C"])

    with pytest.raises(BankFormatError, match="not a concept bank folder"):
        ConceptBank.load(tmp_path / "missing")
    (folder / "vectors.safetensors").write_bytes(b"\x00" * 20 + b"garbage")
    with pytest.raises(BankFormatError, match="safetensors"):
        ConceptBank.load(folder)
    bank.save(folder)
    (folder / "bank.json").write_text("{not json")
    with pytest.raises(BankFormatError, match="JSON"):
        ConceptBank.load(folder)
    manifest = json.loads(json.dumps({"format": "concepts.bank/1", "names": ["a"], "kind": "cav"}))
    (folder / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(BankFormatError, match="inconsistent"):
        ConceptBank.load(folder)


# ------------------------------------------------------------------------------------------ CAVs

def synthetic(n_concepts=6, n=60, dim=16, seed=0, separation=2.5):
    g = torch.Generator().manual_seed(seed)
    positives, negatives = {}, {}
    for k in range(n_concepts):
        direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
        negatives[f"c{k}"] = torch.randn(n, dim, generator=g)
        positives[f"c{k}"] = torch.randn(n + k, dim, generator=g) + separation * direction
    return positives, negatives


def test_torch_solver_matches_sklearn_svc():
    positives, negatives = synthetic()
    torch_bank = learn_cavs(positives, negatives, solver="torch", cs=(0.01, 0.1, 1.0), seed=1)
    sk_bank = learn_cavs(positives, negatives, solver="sklearn", cs=(0.01, 0.1, 1.0), seed=1)
    fast = learn_cavs(positives, negatives, solver="fastcav", seed=1)
    assert torch_bank.kind == "cav" and len(torch_bank) == 6
    for bank in (torch_bank, sk_bank, fast):
        assert bank.stats["val_accuracy"].mean() > 0.85
    assert abs(torch_bank.stats["val_accuracy"].mean() - sk_bank.stats["val_accuracy"].mean()) < 0.03
    same_c = torch_bank.stats["C"] == sk_bank.stats["C"]
    cosine = torch.nn.functional.cosine_similarity(torch_bank.vectors, sk_bank.vectors)
    assert (cosine[same_c] > 0.95).all()
    stats = torch_bank.stats
    assert (stats["pos_mean"] > 0).all() and (stats["neg_mean"] < 0).all()
    assert (stats["pos_q10"] <= stats["pos_q90"]).all() and stats["pos_count"][5] == 65
    # positives score positive margins
    scores = torch_bank.scores(positives["c0"])
    assert (scores[:, 0] > 0).float().mean() > 0.85


def test_newton_solver_matches_linearsvc_through_learn_cavs():
    """On each concept's own examples (learn_cavs' padded layout) newton picks the same C as LinearSVC and reaches
    the same held-out accuracy."""
    positives, negatives = synthetic()
    newton = learn_cavs(positives, negatives, solver="newton", seed=1)
    reference = learn_cavs(positives, negatives, solver="liblinear", seed=1)
    assert torch.equal(newton.stats["C"], reference.stats["C"])
    assert torch.allclose(newton.stats["val_accuracy"], reference.stats["val_accuracy"])
    assert (torch.nn.functional.cosine_similarity(newton.vectors, reference.vectors) > 0.999).all()


def test_cavs_are_deterministic_under_a_seed():
    positives, negatives = synthetic(n_concepts=2)
    a = learn_cavs(positives, negatives, seed=3)
    b = learn_cavs(positives, negatives, seed=3)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.intercepts, b.intercepts)


def test_cav_input_errors():
    positives, negatives = synthetic(n_concepts=1)
    with pytest.raises(ValueError, match="same concepts"):
        learn_cavs(positives, {"other": negatives["c0"]})
    with pytest.raises(ValueError, match="at least 4 positive examples .* choose C"):
        learn_cavs({"c0": positives["c0"][:3]}, negatives)
    with pytest.raises(ValueError, match="at least 2 positive"):  # one C: nothing to choose
        learn_cavs({"c0": positives["c0"][:1]}, negatives, cs=(0.1,))
    assert len(learn_cavs({"c0": positives["c0"][:2]}, negatives, solver="fastcav")) == 1
    with pytest.raises(ValueError, match="folds"):
        learn_cavs(positives, negatives, folds=1)
    with pytest.raises(ValueError, match="empty"):
        learn_cavs({}, {})


def test_reported_cav_accuracy_is_not_the_one_that_chose_c():
    """On pure noise every CAV is at chance. Choosing C by the held-out accuracy and reporting that
    same accuracy gave 0.552 on average here; the held-out part must be used neither to fit nor to
    choose C, so its accuracy stays at chance, while the cross-validated accuracy that chose C is
    the optimistic one and is labelled as such."""
    g = torch.Generator().manual_seed(1)
    positives = {f"c{k}": torch.randn(16, 8, generator=g) for k in range(200)}
    negatives = {f"c{k}": torch.randn(16, 8, generator=g) for k in range(200)}
    bank = learn_cavs(positives, negatives, cs=(1e-3, 1e-2, 0.1, 1.0), seed=0)
    reported, selection = float(bank.stats["val_accuracy"].mean()), float(bank.stats["selection_accuracy"].mean())
    assert abs(reported - 0.5) < 0.025, reported
    assert selection > reported + 0.03, (selection, reported)
    assert bank.provenance["C_selection"] == "3-fold cross-validation on the training part"
    single = learn_cavs(positives, negatives, cs=(0.1,), seed=0)
    assert single.stats["selection_accuracy"].isnan().all() and single.provenance["C_selection"] == "none"


def test_cavs_from_labels_samples_negatives_and_reports_skips():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, 3, generator=g) < 0.3).float()
    labels[:, 2] = 0
    labels[0, 2] = 1  # a single positive: cannot be learned
    directions = torch.randn(3, 16, generator=g)
    features = torch.randn(200, 16, generator=g) + 3 * labels @ directions
    with pytest.raises(ValueError, match="on_missing"):
        cavs_from_labels(features, labels, ["x", "y", "z"])
    bank = cavs_from_labels(features, labels, ["x", "y", "z"], on_missing="skip", max_positives=40, seed=0)
    assert bank.names == ["x", "y"] and "z" in bank.provenance["skipped"]
    assert bank.stats["pos_count"].tolist() == [40, 40] and bank.stats["val_accuracy"].mean() > 0.9


def labelled_features(n=400, dim=24, concepts=3, noise=0.15, seed=0):
    """Non-negative, correlated features with binary concept labels, a share of them flipped (as real labels)."""
    g = torch.Generator().manual_seed(seed)
    truth = (torch.rand(n, concepts, generator=g) < 0.35).float()
    mixing = torch.randn(4, dim, generator=g)
    features = torch.relu(torch.randn(n, 4, generator=g) @ mixing + truth @ torch.randn(concepts, dim, generator=g)
                          + torch.randn(n, dim, generator=g) + 0.5)
    flipped = torch.rand(n, concepts, generator=g) < noise
    return features, torch.where(flipped, 1 - truth, truth)


@pytest.mark.parametrize("shared", [True, False])
def test_newton_solver_reaches_linearsvcs_optimum(shared):
    """squared_hinge_svm minimises LinearSVC's objective (the intercept a regularised constant feature) for
    every problem and C at once, whether the problems share one feature matrix or bring their own rows."""
    from sklearn.svm import LinearSVC

    from concepts.cavs import squared_hinge_svm

    features, labels = labelled_features()
    y = (2 * labels - 1).T                                                # [K,N] in {-1,+1}
    rows = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) < 0.7  # each problem its own subset
    cs = (0.01, 0.1, 1.0)
    x = features if shared else features.expand(len(y), -1, -1).contiguous()
    weights, bias = squared_hinge_svm(x, y, rows, cs, tol=1e-5)
    for k in range(len(y)):
        for j, c in enumerate(cs):
            svc = LinearSVC(C=c, tol=1e-6, max_iter=100_000).fit(features[rows[k]].numpy(), y[k, rows[k]].numpy())
            theirs = torch.tensor(svc.coef_[0], dtype=torch.float32), torch.tensor(float(svc.intercept_[0]))

            def objective(w, b):
                slack = (1 - y[k, rows[k]] * (features[rows[k]] @ w + b)).clamp(min=0)
                return float(0.5 * (w @ w + b * b) + c * (slack ** 2).sum())

            ours = objective(weights[k, j], bias[k, j])
            assert ours <= objective(*theirs) * (1 + 1e-4), (k, c)
            assert torch.nn.functional.cosine_similarity(weights[k, j], theirs[0], dim=0) > 0.999


def test_cavs_from_labels_fits_each_concept_on_the_examples_learn_cavs_would_see():
    """The hinge solver gets each concept's examples laid out exactly as learn_cavs lays them out (same seed, same
    split: the same CAVs, bit for bit); newton and liblinear read one feature matrix that every concept shares,
    fit on the same examples (same counts), and agree on held-out accuracy."""
    features, labels = labelled_features(n=300)
    names = ["x", "y", "z"]
    from_labels = cavs_from_labels(features, labels, names, solver="torch", max_positives=60, seed=2)
    rng = np.random.default_rng(2)
    positives, negatives = {}, {}
    for k, name in enumerate(names):
        present = labels[:, k] >= 0.5
        pos = rng.choice(torch.nonzero(present).flatten().numpy(), size=60, replace=False)
        neg = rng.choice(torch.nonzero(~present).flatten().numpy(), size=60, replace=False)
        positives[name], negatives[name] = features[np.sort(pos)], features[np.sort(neg)]
    direct = learn_cavs(positives, negatives, solver="torch", seed=2)
    assert torch.equal(from_labels.vectors, direct.vectors) and torch.equal(from_labels.stats["C"], direct.stats["C"])

    newton = cavs_from_labels(features, labels, names, seed=0)
    reference = cavs_from_labels(features, labels, names, solver="liblinear", seed=0)
    hinge = cavs_from_labels(features, labels, names, solver="torch", seed=0)
    assert newton.provenance["solver"] == "newton" and reference.provenance["solver"] == "liblinear"
    for stat in ("pos_count", "neg_count"):
        assert torch.equal(newton.stats[stat], reference.stats[stat]) and torch.equal(newton.stats[stat], hinge.stats[stat])
    assert newton.stats["val_accuracy"].mean() > 0.6  # chance: 0.5; the labels are 15% flipped
    assert abs(newton.stats["val_accuracy"] - reference.stats["val_accuracy"]).max() < 0.02


# ------------------------------------------------------------------------------------------ generators

def test_class_concept_matrix_and_attribute_files(tmp_path):
    cands = from_class_concept_matrix(["a", "b"], ["red", "round"], [[0.9, 0.1], [0.6, 0.7]], 0.5)
    assert cands.per_class == {"a": ["red"], "b": ["red", "round"]}
    assert cands.classes_of()["red"] == ["a", "b"]

    cub = tmp_path / "cub"
    (cub / "CUB_200_2011" / "attributes").mkdir(parents=True)
    (cub / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n2 has_wing_color::blue\n")
    (cub / "CUB_200_2011" / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (cub / "CUB_200_2011" / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "80.0 10.0\n20.0 55.5\n")
    result = from_cub(cub)
    assert result.per_class == {"Black footed Albatross": ["curved (up or down) bill shape"],
                                "Laysan Albatross": ["blue wing color"]}

    awa = tmp_path / "awa"
    awa.mkdir()
    (awa / "classes.txt").write_text("1\tantelope\n2\tgrizzly+bear\n")
    (awa / "predicates.txt").write_text("1\tblack\n2\tbig\n")
    (awa / "predicate-matrix-binary.txt").write_text("0 1\n1 1\n")
    assert from_awa(awa).per_class == {"antelope": ["big"], "grizzly bear": ["black", "big"]}

    table = tmp_path / "attrs.csv"
    table.write_text("class,striped,furry\nzebra,1,0.2\ncat,0,0.9\n")
    assert from_csv(table).per_class == {"zebra": ["striped"], "cat": ["furry"]}
    table.write_text("class,striped\nzebra,yes\n")
    with pytest.raises(ValueError, match="non-numeric"):
        from_csv(table)


def test_lists_in_every_format(tmp_path):
    (tmp_path / "l.txt").write_text("# colours\nred\n\nblue  # comment\n")
    assert from_list(tmp_path / "l.txt").per_class == {"*": ["red", "blue"]}
    (tmp_path / "l.json").write_text(json.dumps({"cat": ["whiskers", "fur"]}))
    assert from_list(tmp_path / "l.json").for_class("cat") == ["whiskers", "fur"]
    (tmp_path / "l.yaml").write_text("cat:\n  - whiskers\ndog:\n  - snout\n")
    assert from_list(tmp_path / "l.yaml").per_class == {"cat": ["whiskers"], "dog": ["snout"]}
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty"):
        from_list(tmp_path / "empty.txt")
    with pytest.raises(TypeError):
        from_list({"cat": [1, 2]})


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_starter_banks(name, classes):
    cands = from_starter(name)
    assert len(cands.class_names) == classes and all(len(cands.per_class[c]) >= 5 for c in cands.class_names)


def test_candidates_round_trip(tmp_path):
    cands = Candidates({"a": ["x", "y"], "b": ["y"]}, {"generator": "test"})
    loaded = Candidates.load(cands.save(tmp_path / "c.json"))
    assert loaded.per_class == cands.per_class and loaded.provenance == cands.provenance
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="candidates"):
        Candidates.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ filters

def test_filters_record_what_they_remove_and_why():
    cands = Candidates({"cat": ["Whiskers", "the whisker", "Cats", "a very long phrase that goes on and on",
                                "soft fur", "pizza box"],
                        "dog": ["soft fur", "Snout", "dog"]})
    cleaned = filters.clean(cands)
    assert cleaned.per_class["cat"] == ["whisker", "cats", "very long phrase that goes on and on", "soft fur",
                                        "pizza box"]
    short = filters.remove_too_long(cleaned, max_chars=30)
    assert short.provenance["filters"][-1]["removed"][0]["reason"].startswith("36 characters")
    named = filters.remove_class_names(short)
    assert "cats" not in named.per_class["cat"] and "dog" not in named.per_class["dog"]
    assert {r["concept"] for r in named.provenance["filters"][-1]["removed"]} == {"cats", "dog"}
    steps = [s["filter"] for s in named.provenance["filters"]]
    assert steps == ["clean", "too_long", "class_names"]
    with pytest.raises(ValueError, match="every candidate"):
        filters.remove_too_long(named, max_chars=2)


def test_near_duplicates_keep_every_class_association():
    encoder = WordEncoder()
    cands = Candidates({"a": ["red fur"], "b": ["fur red", "green scales"]})
    result = filters.remove_near_duplicates(cands, encoder, threshold=0.9)
    assert result.per_class == {"a": ["red fur"], "b": ["red fur", "green scales"]}
    assert result.provenance["filters"][0]["replaced"] == [{"concept": "fur red", "by": "red fur"}]


def test_absent_filter_uses_top_k_activation():
    encoder = WordEncoder()
    present = torch.nn.functional.normalize(encoder.encode_texts(["stripes"]), dim=1)
    features = torch.cat([present.repeat(5, 1), torch.randn(20, 64)]) * 3
    result = filters.remove_absent(Candidates({"*": ["stripes", "spaceship"]}), encoder, features, cutoff=0.5)
    assert result.concepts() == ["stripes"]
    assert "activation" in result.provenance["filters"][0]["removed"][0]["reason"]


# ------------------------------------------------------------------------------------------ selection

def brute_force(objective: SelectionObjective, n: int, k: int) -> float:
    return max(objective.value(list(s)) for s in itertools.combinations(range(n), k))


def test_discriminability_is_each_concepts_share_of_the_mutual_information():
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(4, 6, generator=g, dtype=torch.float64) * 1.6 + 0.2  # 1 + class means of cosines
    positive[:, 0] = 0.2 * positive[:, 1:].sum(dim=1)  # follows each class's overall response to text
    scores = discriminability(positive - 1)
    joint = positive / (4 * positive.sum(dim=1, keepdim=True))  # each class sums to p(y) = 1/4
    mutual_information = sum(float(joint[y, c] * torch.log(joint[y, c] / (joint[:, c].sum() / 4)))
                              for y in range(4) for c in range(6))
    assert float(scores.sum()) == pytest.approx(mutual_information)
    assert (scores >= 0).all() and float(scores[0]) == pytest.approx(0.0, abs=1e-12)
    louder = positive.clone()
    louder[2] *= 1.5  # a class whose images respond more strongly to every text: the same scores
    assert torch.allclose(discriminability(louder - 1), scores)


def test_lazy_greedy_is_near_optimal_on_small_instances():
    ratios = []
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        n, k = 10, 3
        vectors = torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=1)
        objective = SelectionObjective(torch.rand(n, generator=g) * 2 - 0.5, vectors @ vectors.T, 0.5)
        chosen = greedy(objective, k)
        assert len(set(chosen)) == k
        best = brute_force(objective, n, k)
        ratios.append(objective.value(chosen) / best)
        assert objective.value(chosen) >= (1 - 1 / math.e) * best - 1e-9
    assert np.mean(ratios) >= 0.99


def test_selection_prefers_concepts_seen_in_the_data_and_keeps_shared_associations():
    encoder = WordEncoder(dim=64)
    # "black stripes" tells zebras and tigers from elephants: shared, yet informative about the class
    real = {"zebra": ["black stripes", "white stripes", "hooves"], "tiger": ["orange fur", "black stripes", "claws"],
            "elephant": ["grey skin", "trunk", "tusks"]}
    distractors = ["quantum physics", "tax return", "opera singer", "spreadsheet", "volcano ash", "saxophone"]
    cands = Candidates({c: v + distractors for c, v in real.items()})
    g = torch.Generator().manual_seed(0)
    features, labels = [], []
    for y, phrases in enumerate(real.values()):
        proto = torch.nn.functional.normalize(encoder.encode_texts(phrases), dim=1).sum(0)
        features.append(proto + 0.3 * torch.randn(40, 64, generator=g))
        labels += [y] * 40
    features, labels = torch.cat(features), torch.tensor(labels)
    bank = select_concepts(cands, encoder, features, labels, list(real), k=3, templates=("{}",))
    chosen = bank.provenance["class_concepts"]
    for name, phrases in real.items():
        assert sum(p in phrases for p in chosen[name]) >= 2
    assert bank.provenance["associations"]["black stripes"] == ["zebra", "tiger"]
    for method in ("top", "random"):
        other = select_concepts(cands, encoder, features, labels, list(real), k=3, method=method, seed=1)
        assert all(len(v) == 3 for v in other.provenance["class_concepts"].values())
    with pytest.raises(ValueError, match="no training sample"):
        select_concepts(cands, encoder, features[:40], labels[:40], list(real), k=3)


# ------------------------------------------------------------------------------------------ CLI

def test_cli_generate_filter_select_show(tmp_path, capsys):
    import argparse

    from concepts.cli import add_commands

    encoder = WordEncoder()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(30, 64, generator=g)
    labels = torch.arange(30) % 2
    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(dest="command"), load_encoder=lambda spec: encoder,
                 load_embeddings=lambda backbone, data: (features, labels, ["cat", "dog"]))

    def run(*argv):
        args = parser.parse_args(argv)
        return args.run(args)

    (tmp_path / "l.json").write_text(json.dumps({"cat": ["Whiskers", "Cats", "fur", "tail"],
                                                 "dog": ["snout", "fur", "Dogs", "collar"]}))
    assert run("concepts", "generate", "list", str(tmp_path / "l.json"), "--out", str(tmp_path / "c.json")) == 0
    assert run("concepts", "filter", str(tmp_path / "c.json"), "--clean", "--class-names", "exact", "--max-chars", "30",
               "--out", str(tmp_path / "f.json")) == 0
    assert run("concepts", "select", str(tmp_path / "f.json"), "--encoder", "x", "--data", "y", "--k", "2",
               "--out", str(tmp_path / "bank")) == 0
    assert run("concepts", "show", str(tmp_path / "bank"), "--provenance") == 0
    out = capsys.readouterr().out
    assert "ConceptBank(kind='text'" in out and "class_concepts" in out
    bank = ConceptBank.load(tmp_path / "bank")
    assert "cats" not in bank.names and set(bank.provenance["class_concepts"]) == {"cat", "dog"}


def test_cli_help_explains_itself(capsys):
    import argparse

    from concepts.cli import add_commands

    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(), load_encoder=None, load_embeddings=None)
    for argv in (["concepts", "--help"], ["concepts", "filter", "--help"], ["concepts", "generate", "llm", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "workflow" in out and "--absent" in out and "--base-url" in out


def test_concepts_imports_nothing_from_the_other_packages():
    code = ("import sys, concepts, concepts.cli, concepts.filters, concepts.select; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cbm', 'explain', 'app')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_merging_candidate_sets_keeps_all_classes_and_sources():
    a = Candidates({"cat": ["fur"], "*": ["photo"]}, {"generator": "one"})
    b = Candidates({"cat": ["whiskers", "fur"], "dog": ["fur"]}, {"generator": "two"})
    merged = Candidates.merge([a, b])
    assert merged.per_class == {"cat": ["fur", "whiskers"], "*": ["photo"], "dog": ["fur"]}
    assert merged.for_class("dog") == ["fur", "photo"] and merged.class_names == ["cat", "dog"]
    assert [s["generator"] for s in merged.provenance["sources"]] == ["one", "two"]
