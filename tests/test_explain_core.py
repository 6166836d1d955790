"""explain on synthetic concept worlds: explanations, counterfactuals, interventions, metrics, suspects."""

import json

import numpy as np
import pytest
import torch

import explain
from cbm.models import PosthocCBM
from cbm.models.base import ConceptBottleneckModel
from concepts.bank import ConceptBank
from explain.audit import FAMILY_EXTRAS
from explain.core import EvalData, ModelView, as_data
from explain.metrics import ablation_drop

N_CLASSES, N_SIGNAL, DIM = 4, 8, 24
NAMES = [f"concept {i}" for i in range(N_SIGNAL)] + [f"background {i}" for i in range(N_CLASSES)]


def spurious_world(seed: int = 0) -> dict:
    """Binary concepts along orthogonal directions; classes from concepts 0-7; one "background"
    concept per class that agrees with the class in train (95%) and is random in test."""
    generator = torch.Generator().manual_seed(seed)
    k = len(NAMES)
    directions = 1.5 * torch.linalg.qr(torch.randn(DIM, k, generator=generator))[0].T
    truth = torch.zeros(N_CLASSES, k)
    truth[torch.arange(N_CLASSES), torch.arange(N_CLASSES)] = 3.0
    truth[torch.arange(N_CLASSES), torch.arange(N_CLASSES) + 4] = 1.5

    def split(n: int, spurious: float) -> tuple:
        present = (torch.rand(n, k, generator=generator) < 0.35).float()
        y = (present @ truth.T + 0.6 * torch.randn(n, N_CLASSES, generator=generator)).argmax(1)
        background = torch.randint(0, N_CLASSES, (n,), generator=generator)
        background = torch.where(torch.rand(n, generator=generator) < spurious, y, background)
        present[:, N_SIGNAL:] = torch.nn.functional.one_hot(background, N_CLASSES).float()
        x = present @ directions + 0.5 * torch.randn(n, DIM, generator=generator)
        return x, y, present, NAMES

    return {"bank": ConceptBank(NAMES, directions, kind="cav"), "train": split(1500, 0.95),
            "val": split(300, 0.95), "test": split(800, 0.0)}


class SquashedCBM(ConceptBottleneckModel):
    """A deliberately non-linear family (tanh concepts, input-dependent logit scale) wrapping a PCBM,
    so that explain's generic code paths (no additive or linear shortcut) are exercised."""

    def __init__(self, inner: PosthocCBM | None = None) -> None:
        self.inner = inner

    def fit(self, x, y=None, **kwargs):
        self.class_names_, self.concept_names_ = self.inner.class_names, self.inner.concept_names
        self.n_features_in_ = self.inner.n_features_in_
        self.backbone_spec_, self.backbone_fingerprint_ = "", ""
        self.edits_, self.training_, self.metrics_ = [], {}, {}
        return self

    def concepts(self, x):
        return self.inner.concepts(x)

    def predict_from_concepts(self, c):
        return 2.0 * torch.tanh(torch.as_tensor(c) / 2.0) @ self.inner.weight_.T + self.inner.bias_

    def _logits(self, x, c):
        return self.predict_from_concepts(c) * (1.0 + 0.2 * torch.sigmoid(x[:, :1]))

    def contributions(self, x, concepts=None):
        c = self._concepts_or(x, concepts)
        return (2.0 * torch.tanh(c / 2.0))[:, None, :] * self.inner.weight_[None]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tests' tensors are tiny: one thread avoids oversubscribing the shared cores (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    world = spurious_world()
    x, y, concepts, _ = world["train"]
    pcbm = PosthocCBM(world["bank"], c=0.5, max_iter=400).fit(x, y, validation=world["val"][:2], concept_labels=concepts)
    hybrid = PosthocCBM(world["bank"], c=0.5, max_iter=400, hybrid=True, residual_epochs=3, batch_size=256).fit(x, y, validation=world["val"][:2], concept_labels=concepts)
    world["models"] = {"posthoc": pcbm, "posthoc-hybrid": hybrid, "non-linear": SquashedCBM(pcbm).fit(x, y)}
    return world


def test_view_detects_which_shortcut_is_exact(world):
    data = as_data(world["test"])
    assert ModelView(world["models"]["posthoc"], data).weight is not None
    hybrid = ModelView(world["models"]["posthoc-hybrid"], data)
    assert hybrid.additive and hybrid.weight is not None
    generic = ModelView(world["models"]["non-linear"], data)
    assert not generic.additive and generic.weight is None
    # one sample of a family without low/high values: its activations span nothing, so no shortcut is assumed
    assert not ModelView(world["models"]["non-linear"], EvalData(data.features[:1], None)).additive
    rows = torch.arange(5)
    values = generic.concepts[:5] + 1.0
    single = generic.single_change_logits(rows, generic.concepts[:5], values)
    changed = generic.concepts[:5].clone()
    changed[:, 3] = values[:, 3]
    assert torch.allclose(single[:, 3], world["models"]["non-linear"].intervene(data.features[:5], (
        torch.ones_like(changed, dtype=torch.bool), changed)), atol=1e-5)


@pytest.mark.parametrize("family", ["posthoc", "posthoc-hybrid", "non-linear"])
def test_sample_explanations_decompose_the_logit_and_counterfactuals_flip(world, family):
    model = world["models"][family]
    view = ModelView(model, as_data(world["test"]))
    for e in explain.explain_samples(view, rows=list(range(6)), k=3):
        logit = float(view.logits[e.index, view.class_names.index(e.predicted)])
        assert sum(v for _, _, v in e.top) + e.other + e.rest == pytest.approx(logit, abs=1e-4)
        cf = e.counterfactual
        assert cf.flipped and 1 <= len(cf.changes) <= 8
        names = {c.concept: c.after for c in cf.changes}
        new = model.intervene(view.data.features[e.index:e.index + 1], names).argmax(1)
        assert view.class_names[int(new)] == cf.new != e.predicted


def test_counterfactual_towards_a_chosen_class(world):
    view = ModelView(world["models"]["posthoc"], as_data(world["test"]))
    row = int(torch.nonzero(view.predictions == 0)[0])
    cf = explain.counterfactual(view, row=row, target="class 2")
    assert cf.flipped and cf.new == "class 2"


def test_global_importance_finds_the_planted_concepts(world):
    importance = explain.global_importance(world["models"]["posthoc"], world["test"])
    for c, name in enumerate(importance.class_names):
        assert importance.top(1)[name][0][0] == f"concept {c}"
    effective = explain.effective_concepts(importance)
    assert all(1 <= v <= 6 for v in effective.values())


def _other_family(world: dict, family: str) -> ConceptBottleneckModel:
    """The other families, small and quick, on the same world (text banks: unit concept directions)."""
    from cbm.models.energy import EnergyCBM
    from cbm.models.labo import LaBoCBM
    from cbm.models.sparse import SparseCBM

    x, y, concepts, _ = world["train"]
    text = ConceptBank(NAMES, torch.nn.functional.normalize(world["bank"].vectors, dim=1), kind="text")
    if family == "labo":
        return LaBoCBM(text, prior="none", epochs=60).fit(x, y, validation=world["val"][:2])
    if family == "sparse":
        return SparseCBM(text, epochs=10).fit(x, y, validation=world["val"][:2])
    return EnergyCBM(hidden=32, max_epochs=4, inference_steps=20).fit(
        x, y, concept_labels=concepts, validation=world["val"][:2], validation_concepts=world["val"][2])


@pytest.mark.parametrize("family", ["posthoc", "posthoc-hybrid", "non-linear", "labo", "sparse", "energy"])
def test_oracle_curve_lies_on_or_above_random_for_every_family(world, family):
    model = world["models"][family] if family in world["models"] else _other_family(world, family)
    cheap = family != "energy"  # energy interventions run gradient inference per sample and concept
    competences = (1.0, 0.7) if cheap else (1.0,)
    curves = explain.intervention_curves(model, world["val"], competences=competences, seeds=(0, 1) if cheap else (0,),
                                         max_concepts=5 if cheap else 3, max_samples=300 if cheap else 60)
    for competence in competences:
        oracle, random = curves.curve("oracle", competence), curves.curve("random", competence)
        assert np.all(oracle >= random - 1e-9), (family, competence, oracle, random)
        assert np.all(np.diff(oracle) >= -1e-9)  # the oracle may stop: never worse with more concepts
    assert curves.curve("oracle")[-1] >= curves.curve("oracle")[0]
    if family in FAMILY_EXTRAS:  # the family's own section of the model card
        assert FAMILY_EXTRAS[family](model, ModelView(model, as_data(world["val"])))


def test_curves_export_csv_json_and_intervals(world, tmp_path):
    curves = explain.intervention_curves(world["models"]["posthoc"], world["test"], seeds=(0, 1, 2), max_concepts=3,
                                         policies=("random", "uncertain", "contribution"))
    rows = curves.rows()
    assert len(rows) == 3 * 4 and all(r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in rows)
    text = curves.to_csv(tmp_path / "curves.csv").read_text().splitlines()
    assert text[0] == "policy,competence,concepts,accuracy,ci_low,ci_high" and len(text) == 13
    assert json.loads(curves.to_json(tmp_path / "curves.json").read_text())["rows"] == rows
    assert curves.plot().axes[0].get_xlabel() == "concepts corrected per sample"
    with pytest.raises(ValueError, match="unknown policy"):
        explain.intervention_curves(world["models"]["posthoc"], world["test"], policies=("best",))


def test_label_free_curves_use_class_means(world):
    x, y, _, _ = world["test"]
    curves = explain.intervention_curves(world["models"]["posthoc"], (x, y), seeds=(0,), max_concepts=4)
    assert curves.truth.startswith("class mean") and curves.curve("oracle")[-1] > curves.curve("oracle")[0]


def test_metrics(world):
    view = ModelView(world["models"]["posthoc"], as_data(world["val"]))  # in distribution
    train = ModelView(world["models"]["posthoc"], as_data(world["train"]))
    assert explain.classification(view)["confusion"] and 0.5 < explain.classification(view)["accuracy"] < 1
    quality = explain.concept_quality(view)
    assert quality["mean_auc"] > 0.95 and quality["mean_accuracy"] > 0.85
    complete = explain.completeness(view, train)
    assert 0.8 < complete["completeness"] < 1.1 and complete["probe_accuracy"] > complete["chance"]
    assert abs(explain.leakage(view, train)["leakage"]) < 0.05  # binary concepts: nothing leaks
    x, y, _, _ = world["train"]
    models = [PosthocCBM(world["bank"], c=0.5, max_iter=400, seed=s).fit(x, y) for s in (0, 1)]
    stable = explain.stability(models, world["test"])
    assert stable["importance_spearman"] > 0.8 and stable["top_concept_overlap"] > 0.6


def test_leakage_probe_sees_information_in_soft_scores():
    generator = torch.Generator().manual_seed(0)
    n = 1200
    y = torch.randint(0, 2, (n,), generator=generator)
    # one concept, always "present" (binarised: constant) but its strength encodes the class
    x = torch.stack([2.0 + 0.8 * y + 0.1 * torch.randn(n, generator=generator), torch.randn(n, generator=generator)], 1)
    bank = ConceptBank(["strong"], torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]), kind="cav",
                       stats={"pos_mean": torch.tensor([2.4]), "neg_mean": torch.tensor([-2.0])})
    model = PosthocCBM(bank, lam=1e-4, max_iter=300).fit(x[:800], y[:800])
    result = explain.leakage(ModelView(model, as_data((x[800:], y[800:]))),
                             ModelView(model, as_data((x[:800], y[:800]))))
    assert result["leakage"] > 0.3


def test_suspects_rank_the_planted_backgrounds_first(world):
    model = world["models"]["posthoc"]
    test, train = ModelView(model, as_data(world["test"])), ModelView(model, as_data(world["train"]))
    effects = explain.concept_effects(test)
    # centred importance hides the spurious weight on data without the correlation; effects do not
    backgrounds = [NAMES.index(f"background {c}") for c in range(N_CLASSES)]
    assert all(effects[c, k] > 0.5 for c, k in enumerate(backgrounds))
    rates = explain.metrics.class_concept_rates(test)
    mean = train.concepts.mean(0)
    names = (test.class_names, test.concept_names)
    suspects = explain.suspect_concepts(effects, *names, plausibility=rates, drop_in=ablation_drop(train, mean),
                                        drop_shift=ablation_drop(test, mean))
    assert {s["concept"] for s in suspects[:4]} == {f"background {i}" for i in range(N_CLASSES)}
    only_labels = explain.suspect_concepts(effects, *names, plausibility=rates)
    assert only_labels[0]["concept"].startswith("background") and "class" in only_labels[0]
    assert explain.suspect_concepts(effects, *names) == []


def test_gates():
    assert explain.parse_gates(["accuracy=0.8", "concept_auc=0.5"]) == {"accuracy": 0.8, "concept_auc": 0.5}
    with pytest.raises(ValueError, match="unknown metric"):
        explain.parse_gates(["accurcy=0.8"])
    failures = explain.check_gates({"accuracy": 0.7, "concept_auc": None}, {"accuracy": 0.8, "concept_auc": 0.5})
    assert len(failures) == 2 and "0.7000 < 0.8" in failures[0] and "not computed" in failures[1]
