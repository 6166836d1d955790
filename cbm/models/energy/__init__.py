"""Energy-Based Concept Bottleneck Models (Xu et al., ICLR 2024): ``EnergyCBM``.

Three energy networks over frozen, standardised embeddings ``f(x)`` (hidden width ``hidden``):

- class energy ``E_xy(x, y) = w . ReLU(h + h * u_y)`` with ``h = W_xy f(x)`` and unit class embeddings ``u``;
- concept energy ``E_xc(x, c_k = j) = w_k . ReLU(g + g * v_kj)`` with ``g = W_xc f(x)`` and two learned
  embeddings per concept (``v_k0`` absent, ``v_k1`` present);
- global energy ``E_cy(c, y) = w . ReLU(e + e * u_y)`` with ``e = P [v_{1,c_1}; ...; v_{K,c_K}]``.

Each is trained with the negative log-likelihood of its Boltzmann distribution (classes given x, each
concept given x, classes given concepts), weighted ``loss_weights`` = (class, concept, global), real
valued, default (3, 1, 1). The global energy sees ground-truth concepts with random flips
(``flip_samples`` of a batch get ``flip_concepts`` of their concepts flipped). Training stops early
on the validation loss (a seeded 10% of train when no validation data is given, never test data)
and keeps the best epoch.

Inference relaxes the class to ``softmax(a)`` and each concept to ``sigmoid(b_k)`` and minimises the
weighted total energy ``E = l_xy E_xy + l_xc E_xc + l_cy E_cy`` (``inference_weights``) with Adam, per
sample, batched, until the relative change of each sample's energy stays under ``tol`` for ``patience``
steps (a converged sample is frozen, so a sample's result does not depend on the batch it is in). Soft
concepts enter every energy by mixing their two embeddings, ``(1 - p) v_k0 + p v_k1``; the class likewise
mixes the class embeddings. The class is then read out exactly at the inferred concepts ``c``: the logit
of class y is minus the total energy of (x, y, c),
``logits[y] = -(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k) + l_cy E_cy(c, y))``, whose softmax is the
Boltzmann distribution over the discrete class given x and c (the concept term is the same for every
class; it makes the logit the minimised energy, see gradients below).

One inference configuration serves prediction and every intervention: an intervention fixes concepts
and continues the optimisation from the unintervened solution (class and concept variables) under the
same weights, so a null intervention (an empty mask, or fixed values equal to the inferred ones) returns
the prediction exactly, and every move of the other concepts is caused by the correction. With every
concept fixed, the read-out alone gives the logits (no optimisation).

Gradients w.r.t. the input (TCAV at the embedding): when ``x`` requires grad, ``decision_function``
recomputes the read-out at the inferred, detached concepts, so its gradient is the partial derivative
``-d/dx (l_xy E_xy + l_xc E_xc)`` at the optimum. By the envelope theorem this is the gradient of minus
the minimised energy ``-min_c E(x, y, c)`` for the class the relaxed optimum settled on (the concepts'
own response to x drops out at a minimum); for the other classes it is the same partial derivative at
the shared optimum, a first-order approximation.

The reference setting (``REFERENCE_SETTING``, ``EnergyCBM.reference()``): the reference objective
(``global_concept_weight=0``), inference weights (1, 1, 0.01), the reference's network width, loss
weights and augmentation, and the exact class read-out above.

Departures from the reference code, on purpose (see docs/recipes/energy_cub.md):

- the global energy mixes the concept embeddings by the soft probabilities, so it passes gradients to
  the concept variables (the reference thresholds them at 0.5, so a corrected concept never moves
  the others);
- one convention for "present" (``v_k1``) in both the concept and the global energy;
- loss weights are real numbers (the reference truncates them to integers);
- ``global_concept_weight`` adds the pseudo-likelihood of each concept given the others and the
  class under ``exp(-E_cy)``. The reference only trains ``E_cy`` to rank classes, which leaves
  ``exp(-E_cy(., y))`` over concepts (what Propositions 3.2-3.5 normalise) unconstrained; this term
  makes the conditional probabilities read off the energy identifiable. Set it to 0 for the
  reference's objective.
- Adam (lr 1e-3) on frozen embeddings instead of SGD on a fine-tuned ResNet; the relative convergence
  test replaces the reference's absolute ``delta=1``.
- interventions use the inference weights and continue from the unintervened solution; the reference
  resets the class variables and re-optimises with the global energy alone (weights 0/0/3), so its
  "nothing corrected" point is not its prediction.
- a fresh inference starts at the networks' own predictions (``inference_init="networks"``: the class
  variable at ``-E_xy``, each concept at its log-odds under ``E_xc``), not uniform, which saves most of the
  steps; the reference's start is ``inference_init="uniform"``;
- inside the optimisation the concept energy is evaluated as the exact piecewise-linear function of the
  relaxed concept it is (``ConceptEnergyTable``), not as a sum over its hidden units at every step;
- the class is read out exactly from the discrete class energies at the inferred concepts rather than
  as the argmax of the relaxed class variable (kept as ``relaxed_class_probs``).

Conditional probabilities (Propositions 3.2-3.5) are expectations under ``p(c | y) ~ exp(-E_cy(c, y))``:
exact by enumeration up to ``exact_max_concepts`` concepts, else by batched Gibbs sampling with
Rao-Blackwellised marginals; ``p(c_k | c_j)`` mixes the classes by their training frequency.
``empirical_conditionals`` gives the reference's estimates from predictions, for comparison.

Explanations (``contributions``): the global energy is affine in the concepts before its ReLU, so
integrated gradients of the concepts' part of the logits, ``-l_cy E_cy(c, y)`` (``predict_from_concepts``),
from the training concept frequencies to ``c`` have a closed form. They decompose the logits exactly:
``contributions(x).sum(-1) + contribution_baseline() + contribution_rest(x) == decision_function(x)``,
where the rest ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` is the part that does not pass through
the global energy (and ``contributions.sum(-1) + contribution_baseline() == predict_from_concepts(c)``).

Edits cut a concept's link into the global energy for some classes: for those classes ``E_cy`` sees
the concept at a fixed value (``prune``: its training frequency; ``set_value``: a given value).

Concepts come from concept labels (given, or carried by an ``Embeddings``) or, when the data has
none, from a concept bank as pseudo-labels: a concept is "present" where the bank's score exceeds a
per-concept threshold (``pseudo_threshold``: "auto" = margin > 0 for CAV banks and the top 20% of
training scores, i.e. above the 0.8 quantile, for text banks; a number in (0, 1) is a quantile;
``("value", t)`` an absolute threshold). The rule and thresholds are recorded in ``training_``.
"""

from cbm.models.energy.conditionals import conditional_table, pearson_r
from cbm.models.energy.inference import Inference, Propagation
from cbm.models.energy.model import AUTO_GLOBAL_WEIGHTS, REFERENCE_SETTING, EnergyCBM
from cbm.models.energy.networks import EnergyNetworks, LinkEdits

__all__ = ["AUTO_GLOBAL_WEIGHTS", "REFERENCE_SETTING", "EnergyCBM", "EnergyNetworks", "Inference", "LinkEdits",
           "Propagation", "conditional_table", "pearson_r"]
