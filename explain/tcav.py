"""TCAV (Kim et al. 2018) with statistics: random-concept baselines, a t-test, Holm correction.

For a layer, a concept's CAV separates activations of the concept's examples from random
examples; the TCAV score of a class is the fraction of the class's samples whose class logit
grows along the CAV (positive directional derivative). The concept's score is averaged over
``runs`` CAVs. With ``negatives="independent"`` (the default, as Kim et al. do) each run's CAV is
learned against a fresh, disjoint set of random negatives (``runs`` x the concept's size random
examples); ``negatives="shared"`` draws each run's negatives from one pool of twice the concept's
size, which needs fewer random examples but lets the runs' negatives overlap (the runs are not
independent draws). The CAV learner (``solver``: "fastcav", the
mean-difference direction of FastCAV, by default; or a linear SVM, see :func:`concepts.learn_cavs`)
and the negatives are recorded in every report's settings and shown by ``cbm tcav``.

The baseline: ``random_concepts`` sets of random examples (as many as the concept has, disjoint
from the negatives) are scored exactly like the concept, against the same negative sets, and
averaged over the runs. Under the null hypothesis the concept is one more such set, so its score
is tested as a new observation of the random scores (a prediction t-test):
``t = (score - mean_r) / (sd_r * sqrt(1 + 1/J))`` with ``J - 1`` degrees of freedom. This is
calibrated: random "concepts" are flagged at rate at most alpha. The original two-sample t-test
(concept runs against random runs) is not: the concept's runs share one example set, so their
spread misses the variation between example sets, and it flagged 20-40% of random concepts in
our simulations at alpha 0.05, which is why it is not offered.

p-values are corrected over all (concept, class) pairs of a report with Holm's step-down method;
``significant`` is False for "not significant" pairs, which should not be read as explanations.

Activations come from any named module of a backbone (``layer_activations``; a conv layer's
[B,C,H,W] output is flattened as in TCAV, or mean-pooled with ``pooling="mean"``) or are the
embeddings themselves (``layer=None``), and logits from any CBM over the embeddings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from cbm.backbones import Backbone
from cbm.models.base import ConceptBottleneckModel
from cbm.models.temporal import TemporalCBM
from concepts.cavs import Solver, learn_cavs

logger = logging.getLogger(__name__)

Pooling = Literal["flatten", "mean"]
Head = ConceptBottleneckModel | Callable[[torch.Tensor], torch.Tensor]

#: Mean held-out accuracy of a concept's CAVs under which TCAV warns that the concept is not separated
#: from the random examples at the layer (chance is 0.5).
WEAK_CAV_ACCURACY = 0.6


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(p) - rank) * p[index])
        adjusted[index] = min(running, 1.0)
    return adjusted


@dataclass
class TCAVResult:
    """One (concept, class) pair: the concept's score per run, the random concepts' mean scores,
    the test and its verdict."""

    concept: str
    target: str
    layer: str
    scores: list[float]
    random_scores: list[float]
    cav_accuracy: float
    p_value: float
    p_adjusted: float = float("nan")
    significant: bool = False

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_scores))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "random_mean": self.random_mean}


@dataclass
class TCAVReport:
    """All pairs of one analysis, with the settings that produced them."""

    results: list[TCAVResult]
    alpha: float
    settings: dict[str, Any] = field(default_factory=dict)

    def result(self, concept: str, target: str) -> TCAVResult:
        for result in self.results:
            if result.concept == concept and result.target == target:
                return result
        raise KeyError(f"no TCAV result for concept {concept!r} and class {target!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "test": "prediction t-test", "correction": "holm", "settings": self.settings,
                "results": [r.to_dict() for r in self.results]}

    def plot(self):
        """A matplotlib Figure (see :func:`explain.plots.tcav_figure`)."""
        from explain.plots import tcav_figure
        return tcav_figure(self)


def _p_value(score: float, random_scores: np.ndarray) -> float:
    """Two-sided p-value of ``score`` as a new observation of ``random_scores``."""
    spread = random_scores.std(ddof=1) * np.sqrt(1 + 1 / len(random_scores))
    difference = abs(score - random_scores.mean())
    if spread == 0:
        return 1.0 if difference == 0 else 0.0
    return float(2 * stats.t.sf(difference / spread, len(random_scores) - 1))


Negatives = Literal["independent", "shared"]


def negatives_needed(largest: int, runs: int, negatives: Negatives) -> int:
    """Random examples that the negative sets take for concepts of up to ``largest`` examples."""
    if negatives not in ("independent", "shared"):
        raise ValueError(f"negatives must be 'independent' (a fresh set per run) or 'shared' (one pool), "
                         f"got {negatives!r}.")
    return runs * largest if negatives == "independent" else 2 * largest


def tcav(gradients: Mapping[str, torch.Tensor], concepts: Mapping[str, torch.Tensor], random: torch.Tensor, *,
         layer: str = "embedding", runs: int = 10, random_concepts: int = 20, alpha: float = 0.05,
         solver: Solver = "fastcav", negatives: Negatives = "independent",
         seed: int = 0) -> TCAVReport:
    """TCAV on precomputed tensors.

    ``gradients``: class name -> gradients [N, D] of that class's logit w.r.t. the layer's activations
    for the class's samples; ``concepts``: concept name -> activations [n, D] of its examples;
    ``random``: activations [M, D] of random examples: first the negatives (``runs`` x n_max disjoint
    ones with ``negatives="independent"``, a pool of 2 n_max with "shared"), then ``random_concepts``
    disjoint sets of each concept's size (at least 5). ``solver`` is the CAV learner of
    :func:`concepts.learn_cavs`.
    """
    if runs < 2 or random_concepts < 3:
        raise ValueError(f"TCAV needs runs >= 2 and random_concepts >= 3, got {runs} and {random_concepts}.")
    random = torch.as_tensor(random).float()
    generator = torch.Generator().manual_seed(seed)
    concepts = {name: torch.as_tensor(examples).float() for name, examples in concepts.items()}
    largest = max(len(examples) for examples in concepts.values())
    n_negative = negatives_needed(largest, runs, negatives)
    order = torch.randperm(len(random), generator=generator)
    negative_pool, positive_pool = random[order[:n_negative]], random[order[n_negative:]]
    positives, negative_sets_of, n_random = {}, {}, {}
    for size in sorted({len(examples) for examples in concepts.values()}):
        n_random[size] = min(random_concepts, len(positive_pool) // size)
        if n_random[size] < 5:
            raise ValueError(f"concepts with {size} examples need at least {n_negative + 5 * size} random examples "
                             f"({n_negative} for the {negatives} negatives of {runs} runs, then disjoint random "
                             f"concepts; {n_negative + random_concepts * size} for {random_concepts} of them), "
                             f"got {len(random)}.")
        if n_random[size] < random_concepts:
            logger.warning("only %d random concepts of %d examples fit in the random pool (asked for %d)",
                           n_random[size], size, random_concepts)
        if negatives == "independent":
            negative_sets = [negative_pool[run * largest:run * largest + size] for run in range(runs)]
        else:
            negative_sets = [negative_pool[torch.randperm(len(negative_pool), generator=generator)[:size]]
                             for _ in range(runs)]
        disjoint = torch.randperm(len(positive_pool), generator=generator)
        sets = {f"\0random {j}": positive_pool[disjoint[j * size:(j + 1) * size]] for j in range(n_random[size])}
        sets.update({name: examples for name, examples in concepts.items() if len(examples) == size})
        for name, examples in sets.items():
            for run, negative in enumerate(negative_sets):
                positives[f"{size}\0{name}\0{run}"], negative_sets_of[f"{size}\0{name}\0{run}"] = examples, negative
    bank = learn_cavs(positives, negative_sets_of, solver=solver, seed=seed)
    vectors = torch.nn.functional.normalize(bank.vectors, dim=1)
    column = {name: i for i, name in enumerate(bank.names)}
    accuracy = bank.stats["val_accuracy"]

    def columns(size: int, name: str) -> list[int]:
        return [column[f"{size}\0{name}\0{run}"] for run in range(runs)]

    separable = {name: float(accuracy[columns(len(examples), name)].mean()) for name, examples in concepts.items()}
    for name, held_out in separable.items():
        if held_out < WEAK_CAV_ACCURACY:
            logger.warning("the CAVs of %r at %s tell its examples from the random ones with only %.0f%% held-out "
                           "accuracy (chance: 50%%), so its scores rest on weak directions; more examples, or random "
                           "examples that do not show the concept, give sharper CAVs", name, layer, 100 * held_out)
    results = []
    for target, grads in gradients.items():
        signs = (torch.as_tensor(grads).float() @ vectors.T > 0).float().mean(0)  # TCAV score of every CAV
        for name, examples in concepts.items():
            size = len(examples)
            scores = signs[columns(size, name)].numpy()
            baseline = np.array([float(signs[columns(size, f"\0random {j}")].mean()) for j in range(n_random[size])])
            results.append(TCAVResult(name, target, layer, scores.tolist(), baseline.tolist(), separable[name],
                                      _p_value(float(scores.mean()), baseline)))
    for result, adjusted in zip(results, holm([r.p_value for r in results])):
        result.p_adjusted = float(adjusted)
        result.significant = bool(adjusted < alpha)
    logger.info("TCAV at %s: %d of %d (concept, class) pairs significant at alpha %.2f (Holm-corrected)",
                layer, sum(r.significant for r in results), len(results), alpha)
    return TCAVReport(results, alpha, {"runs": runs, "random_concepts": random_concepts, "solver": solver,
                                       "negatives": negatives, "seed": seed, "layer": layer})


def _logits(head: Head, embeddings: torch.Tensor) -> torch.Tensor:
    return head.decision_function(embeddings) if isinstance(head, ConceptBottleneckModel) else head(embeddings)


def embedding_gradients(head: Head, embeddings: torch.Tensor, target: int) -> torch.Tensor:
    """Gradients [N, D] of logit ``target`` w.r.t. the embeddings (TCAV at the embedding layer); video models,
    whose logits depend on a sequence of window embeddings, are refused with a TypeError."""
    if isinstance(head, TemporalCBM):
        raise TypeError("TCAV at the embedding is not available for TemporalCBM (video) models: a class logit depends "
                        "on a whole sequence of window embeddings, not on one embedding per sample.")
    x = torch.as_tensor(embeddings).float().detach().requires_grad_(True)
    _logits(head, x)[:, target].sum().backward()
    return x.grad.detach()


class _LayerTap:
    """A forward hook that makes a module's output a leaf requiring grad, so gradients stop there."""

    def __init__(self, backbone: Backbone, layer: str) -> None:
        modules = dict(backbone.model.named_modules())
        if layer not in modules:
            sample = ", ".join(name for name, m in list(modules.items())[1:40] if len(list(m.children())))
            raise ValueError(f"layer {layer!r} is not a module of {backbone.spec}; some layers: {sample}")
        self.module = modules[layer]
        self.output: torch.Tensor | None = None

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: Any) -> Any:
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        self.output = tensor.detach().requires_grad_(True)
        return (self.output, *output[1:]) if isinstance(output, (tuple, list)) else self.output


@contextlib.contextmanager
def _tapped(backbone: Backbone, layer: str) -> Iterator[_LayerTap]:
    """The tap of ``layer`` while the block runs (the hook is removed afterwards, even on errors)."""
    tap = _LayerTap(backbone, layer)
    handle = tap.module.register_forward_hook(tap._hook)
    try:
        yield tap
    finally:
        handle.remove()


def _pool(tensor: torch.Tensor, pooling: Pooling, gradient: bool) -> torch.Tensor:
    """[B, ...] -> [B, D]: flattened, or per channel over positions (``mean``): activations are
    averaged, gradients summed (the derivative along adding the direction at every position)."""
    if pooling == "flatten" or tensor.ndim == 2:
        return tensor.flatten(1)
    dims = (2, 3) if tensor.ndim == 4 else (1,)
    return tensor.sum(dim=dims) if gradient else tensor.mean(dim=dims)


def layer_activations(backbone: Backbone, layer: str | None, images: torch.Tensor, *, pooling: Pooling = "flatten",
                      batch_size: int = 64, head: Head | None = None, target: int | None = None,
                      progress: bool = False) -> torch.Tensor:
    """Activations [N, D] of ``layer`` (None: the embedding) for preprocessed images [N,3,H,W]; with
    ``head`` and ``target``, the gradients of that class's logit w.r.t. them instead."""
    parts = []
    for batch in tqdm(images.split(batch_size), desc=f"layer {layer or 'embedding'}", disable=not progress,
                      leave=False):
        batch = batch.to(backbone.device)
        if layer is None:
            with torch.no_grad():
                embedding = backbone.encode_images(batch)
            parts.append(embedding if head is None else embedding_gradients(head, embedding, target))
            continue
        with _tapped(backbone, layer) as tap, torch.enable_grad():
            embedding = backbone._forward_images(batch).float()
            if head is None:
                parts.append(_pool(tap.output.detach(), pooling, gradient=False).cpu())
                continue
            _logits(head, embedding.cpu())[:, target].sum().backward()
            parts.append(_pool(tap.output.grad, pooling, gradient=True).cpu())
    return torch.cat(parts)


def tcav_layer(backbone: Backbone, layer: str | None, head: Head, class_names: Sequence[str],
               class_images: Mapping[str, torch.Tensor], concept_images: Mapping[str, torch.Tensor],
               random_images: torch.Tensor, *, pooling: Pooling = "flatten", batch_size: int = 64,
               progress: bool = False, **options: Any) -> TCAVReport:
    """TCAV at a backbone layer (None: the embedding) for a CBM ``head`` over that backbone.

    ``class_images``: class name -> preprocessed images of that class; ``concept_images``: concept
    name -> images showing it; ``random_images``: random images. ``options`` go to :func:`tcav`.
    """
    def activations(images: torch.Tensor) -> torch.Tensor:
        return layer_activations(backbone, layer, images, pooling=pooling, batch_size=batch_size, progress=progress)

    gradients = {name: layer_activations(backbone, layer, images, pooling=pooling, batch_size=batch_size, head=head,
                                         target=list(class_names).index(name), progress=progress)
                 for name, images in class_images.items()}
    concepts = {name: activations(images) for name, images in concept_images.items()}
    return tcav(gradients, concepts, activations(random_images), layer=layer or "embedding", **options)


def tcav_datasets(backbone: Backbone, layer: str | None, head: Head, class_names: Sequence[str], data: Any,
                  targets: Sequence[str], concepts: Sequence[str], *, concept_data: Any = None,
                  random_data: Any = None, examples: int = 20, random_concepts: int = 20, runs: int = 10,
                  negatives: Negatives = "independent", seed: int = 0, pooling: Pooling = "mean",
                  batch_size: int = 64, progress: bool = False, **options: Any) -> TCAVReport:
    """TCAV with the examples drawn from image datasets (``cbm.data`` datasets), seeded.

    Each target class gets ``examples`` of its images from ``data``. A concept's examples are images
    of ``concept_data`` whose class is named like the concept (a folder per concept) or, failing
    that, images of ``data`` whose concept label is on. Random examples come from ``random_data`` or,
    without it, from the images of ``data`` not used so far: the negatives (``runs`` x ``examples`` with
    ``negatives="independent"``, 2 x ``examples`` with "shared") plus ``random_concepts`` sets of
    ``examples``. Images of the target classes are never concept or
    random examples from ``data``: a CAV towards the class's own images would trivially raise its
    logit, and random sets holding more or fewer of them would scatter the baseline.
    ``options`` go to :func:`tcav`.
    """
    if examples < 2:
        raise ValueError(f"examples must be at least 2, got {examples}.")
    if not targets or not concepts:
        raise ValueError("name at least one target class and one concept.")
    order = np.random.default_rng(seed).permutation(len(data))
    labels = np.asarray(data.labels)[order]
    names = list(getattr(data, "class_names", []) or [])
    used: set[int] = set()

    def pick(rows: Sequence[int], dataset: Any) -> torch.Tensor:
        images = [dataset.load(int(i)) for i in rows]
        if images and isinstance(images[0], list):
            raise ValueError("TCAV takes image datasets; this one yields videos (lists of frames).")
        return torch.stack([backbone.preprocess(image) for image in images])

    class_images = {}
    targets_rows = np.isin(labels, [names.index(t) for t in targets if t in names])
    used.update(order[targets_rows].tolist())  # no target-class image is a concept or random example
    for target in targets:
        if target not in class_names:
            raise KeyError(f"unknown class {target!r} for the model; it knows {', '.join(class_names)}.")
        if target not in names:
            raise KeyError(f"class {target!r} is not a class of the dataset; it has {', '.join(names)}.")
        rows = order[labels == names.index(target)][:examples].tolist()
        if len(rows) < 2:
            raise ValueError(f"the dataset has {len(rows)} image(s) of class {target!r}; TCAV needs at least 2.")
        class_images[target] = pick(rows, data)
    concept_images = {}
    data_concepts = list(getattr(data, "concept_names", None) or [])
    for concept in concepts:
        if concept_data is not None and concept in concept_data.class_names:
            rows = np.flatnonzero(np.asarray(concept_data.labels) == concept_data.class_names.index(concept))
            rows, source = np.random.default_rng(seed).permutation(rows)[:examples].tolist(), concept_data
        elif concept in data_concepts:
            shows = np.asarray(data.concept_labels)[order, data_concepts.index(concept)] > 0.5
            rows, source = [i for i in order[shows].tolist() if i not in used][:examples], data
            used.update(rows)
        else:
            where = f" nor a class of the concept data ({', '.join(concept_data.class_names)})" if concept_data else ""
            raise KeyError(f"no examples of concept {concept!r}: it is not a concept label of the dataset{where}; "
                           "give a folder of its images with --concept-data / concept_data=.")
        if len(rows) < 2:
            raise ValueError(f"only {len(rows)} image(s) show {concept!r} outside the target classes; TCAV needs at "
                             "least 2.")
        concept_images[concept] = pick(rows, source)
    largest = max(len(images) for images in concept_images.values())
    wanted = negatives_needed(largest, runs, negatives) + random_concepts * largest
    if random_data is not None:
        random_rows, random_source = np.random.default_rng(seed).permutation(len(random_data))[:wanted], random_data
    else:
        random_rows, random_source = [i for i in order.tolist() if i not in used][:wanted], data
    if not len(random_rows):
        raise ValueError("no images are left for random examples; give a random dataset (random_data= / --random).")
    random_images = pick(random_rows, random_source)
    return tcav_layer(backbone, layer, head, class_names, class_images, concept_images, random_images,
                      pooling=pooling, batch_size=batch_size, progress=progress, random_concepts=random_concepts,
                      runs=runs, negatives=negatives, seed=seed, **options)
