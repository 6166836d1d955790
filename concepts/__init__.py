"""Concept banks and how they are made: generation, filtering, selection and CAV learning.

This package depends on no other part of the toolkit: it takes any text encoder with
``encode_texts(list[str]) -> Tensor[K,D]`` (and, optionally, a ``fingerprint``) and learns CAVs
from embedding tensors.

- ``ConceptBank``: named concept vectors with scores, editing, provenance and safe persistence.
- ``learn_cavs`` / ``cavs_from_labels``: CAVs (batched torch SVMs: SVC's hinge, LinearSVC's squared hinge;
  scikit-learn SVC and LinearSVC; FastCAV).
- ``concepts.generate``: candidates from an LLM, ConceptNet, CUB/AwA/CSV attribute files, lists,
  a class x concept matrix and the shipped CIFAR starters.
- ``concepts.filters``: cleaning, length, class-name, near-duplicate and absent-from-data filters.
- ``select_concepts``: LaBo-style per-class submodular selection (and top-k / random baselines).
"""

from concepts.bank import BackboneMismatchError, BankFormatError, ConceptBank, encode_concepts
from concepts.cavs import cavs_from_labels, learn_cavs
from concepts.generate import (
    Candidates,
    ChatClient,
    from_awa,
    from_class_concept_matrix,
    from_conceptnet,
    from_csv,
    from_cub,
    from_list,
    from_llm,
    from_starter,
    parse_list,
)
from concepts.select import select_concepts

__all__ = [
    "BackboneMismatchError", "BankFormatError", "Candidates", "ChatClient", "ConceptBank", "cavs_from_labels",
    "encode_concepts", "from_awa", "from_class_concept_matrix", "from_conceptnet", "from_csv", "from_cub",
    "from_list", "from_llm", "from_starter", "learn_cavs", "parse_list", "select_concepts",
]
