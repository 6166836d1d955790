"""Counterfactuals are smallest sets (exact search where affordable), and the oracle intervention
policy is described as what it is (greedy), on a hand-built head where greedy needs 3 changes and 2 suffice."""

import pytest
import torch

import explain
from cbm.models.base import ConceptBottleneckModel
from explain.core import ModelView, as_data
from explain.interventions import POLICY_LABELS

CLASSES = ["a", "b", "c"]
CONCEPTS = ["decoy", "left", "right", "idle"]
# From all concepts at 0, "c" needs to beat "a" (bias 2.6) and "b" (2.55). "decoy" raises "c" most (1.5),
# "left" and "right" by 1 each, but "left" also lowers "a" by 2 and "right" "b" by 2: "left" + "right"
# reach "c" (2 against 0.6 and 0.55), while after "decoy" every second change leaves "c" short, so a
# greedy search (best single change at each step) needs 3 changes.
WEIGHT = torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0], [1.5, 1.0, 1.0, 0.0]])
BIAS = torch.tensor([2.6, 2.55, 0.0])


class TrapHead(ConceptBottleneckModel):
    """Concepts are the inputs (in [0, 1], references 0 and 1); logits are WEIGHT @ c + BIAS."""

    def fit(self, x=None, y=None, **kwargs):
        self.class_names_, self.concept_names_, self.n_features_in_ = list(CLASSES), list(CONCEPTS), len(CONCEPTS)
        self.backbone_spec_, self.backbone_fingerprint_ = "", ""
        self.edits_, self.training_, self.metrics_ = [], {}, {}
        return self

    def concepts(self, x):
        return torch.as_tensor(x).float()

    def predict_from_concepts(self, c):
        return torch.as_tensor(c).float() @ WEIGHT.T + BIAS

    def _logits(self, x, c):
        return self.predict_from_concepts(c)

    def contributions(self, x, concepts=None):
        return self._concepts_or(x, concepts)[:, None, :] * WEIGHT[None]

    def concept_reference(self, name, which):
        return 1.0 if which == "high" else 0.0


@pytest.fixture()
def view():
    x = torch.zeros(4, len(CONCEPTS))
    x[1:, 3] = torch.tensor([0.2, 0.5, 0.8])  # a few rows so the view's checks see varied activations
    present = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(4, -1)  # concept labels (the oracle's expert values)
    return ModelView(TrapHead().fit(), as_data((x, torch.tensor([2, 2, 2, 2]), present, CONCEPTS)))


def test_counterfactual_is_the_smallest_set_where_the_exact_search_is_affordable(view):
    cf = explain.counterfactual(view, row=0, target="c")
    assert cf.flipped and cf.search == "exact" and cf.new == "c"
    assert sorted(c.concept for c in cf.changes) == ["left", "right"]
    assert "exact search" in cf.describe()
    changed = view.model.intervene(view.data.features[:1], {c.concept: c.after for c in cf.changes})
    assert int(changed.argmax()) == CLASSES.index("c")
    # without a budget for the exact search it is greedy, takes the decoy first, and says so
    greedy = explain.counterfactual(view, row=0, target="c", exact_budget=0)
    assert greedy.search == "greedy" and greedy.flipped and len(greedy.changes) == 3
    assert greedy.changes[0].concept == "decoy" and "greedy search" in greedy.describe()
    # a budget for sets of 1 (8 sets) but not 2 (+24): exact up to 1 change, greedy beyond
    partial = explain.counterfactual(view, row=0, target="c", exact_budget=10)
    assert partial.search == "greedy" and partial.exact_up_to == 1 and "no set of up to 1" in partial.describe()


def test_counterfactual_towards_a_target_and_when_none_exists(view):
    towards_b = explain.counterfactual(view, row=0, target="b")
    assert towards_b.flipped and [c.concept for c in towards_b.changes] == ["left"] and towards_b.search == "exact"
    none = explain.counterfactual(view, row=0, target="c", max_changes=1)
    assert not none.flipped and not none.changes and none.search == "exact"
    assert none.describe() == "no set of up to 1 concept changes flips it (exact search)"
    with pytest.raises(ValueError, match="already predicted as 'a'"):
        explain.counterfactual(view, row=0, target="a")
    with pytest.raises(ValueError, match="exact_budget"):
        explain.counterfactual(view, row=0, exact_budget=-1)


def test_the_oracle_policy_is_greedy_and_not_called_an_upper_bound(view):
    """The oracle picks the best single correction at each step: with 2 corrections it finds no fix of
    row 0 (it takes the decoy), though "left" + "right" fix it. So it is not an upper bound."""
    single = ModelView(view.model, view.data.subset(torch.tensor([0])))
    curves = explain.intervention_curves(single, policies=("oracle",), seeds=(0,))
    assert curves.counts[:4] == [0, 1, 2, 3] and list(curves.curve("oracle")[:4]) == [0.0, 0.0, 0.0, 1.0]
    fix = explain.counterfactual(single, row=0, target="c")
    assert fix.search == "exact" and len(fix.changes) == 2  # 2 corrections suffice
    assert POLICY_LABELS["oracle"] == "greedy oracle"
    described = curves.to_dict()["policies"]["oracle"]
    assert "greedy" in described and "not an upper bound" in described
    figure = curves.plot()
    assert any("greedy oracle" in text.get_text() for text in figure.axes[0].get_legend().get_texts())
