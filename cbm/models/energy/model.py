"""``EnergyCBM``: fitting, the shared interface, explanations and edits (see the package docstring)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from cbm.backbones import resolve_device
from cbm.embed import Embeddings
from cbm.models.base import (
    ConceptBottleneckModel,
    EditRecord,
    ProbabilityReferences,
    Validation,
    _restore_common,
    accuracy,
    as_labels,
    as_matrix,
    bank_from_state,
    bank_state,
    check_intervention,
    finite_output,
    holdout_split,
    intervention_pair,
    split_validation,
)
from cbm.models.energy.conditionals import EnergyConditionals
from cbm.models.energy.inference import (
    Inference,
    Propagation,
    concept_part,
    infer_batch,
    input_part,
)
from cbm.models.energy.networks import EnergyNetworks, LinkEdits, frozen
from cbm.models.streaming import Rows, Stream, should_stream
from concepts.bank import ConceptBank

logger = logging.getLogger(__name__)

#: Global-energy weights tried at inference when ``inference_weights="auto"``.
AUTO_GLOBAL_WEIGHTS = (0.01, 0.1, 1.0)

#: The reference setting (Xu et al.'s code): its objective (no pseudo-likelihood term), its inference
#: weights, network width, loss weights, augmentation and optimiser settings; see ``EnergyCBM.reference``.
REFERENCE_SETTING: dict[str, Any] = {
    "global_concept_weight": 0.0, "inference_weights": (1.0, 1.0, 0.01), "hidden": 512,
    "loss_weights": (3.0, 1.0, 1.0), "flip_samples": 0.2, "flip_concepts": 0.2, "weight_decay": 4e-5,
    "batch_size": 64, "max_epochs": 300, "inference_lr": 0.1, "inference_patience": 10,
    "inference_init": "uniform"}


class EnergyCBM(EnergyConditionals, ProbabilityReferences, ConceptBottleneckModel):
    """Energy-based CBM over frozen embeddings; see the module docstring.

    Parameters
    ----------
    hidden: width of the energy networks (reference: 512).
    loss_weights: (class, concept, global) weights of the training losses, real numbers (reference 3/1/1).
    global_concept_weight: weight of the pseudo-likelihood of the concepts given the class under the
        global energy (0 = the reference's objective); see the module docstring.
    flip_samples, flip_concepts: concept augmentation of the global energy (reference 0.2/0.2).
    dropout, lr, weight_decay, batch_size, max_epochs, patience: training (Adam; early stopping on the
        validation loss with ``patience`` epochs).
    inference_weights: (class, concept, global) energy weights of inference, for prediction and every
        intervention alike, or "auto": 1/1/g with the global weight g chosen among
        ``AUTO_GLOBAL_WEIGHTS`` (0.01 as in the reference, 0.1, 1 = the joint Boltzmann of the three
        energies) by validation class + concept accuracy. The same weights serve interventions: a small
        g (0.01) keeps the class close to the class energy's, so corrections move it little; pass
        (1, 1, 1) when interventions matter most. The class or the global weight must be
        positive (the class is read out from those energies). A larger global weight lets a
        corrected concept move the others more.
    inference_lr, inference_steps, tol, inference_patience: Adam on the relaxed variables and the relative
        convergence test; ``inference_batch`` samples are optimised together.
    inference_init: where a fresh inference starts: ``"networks"`` (default) at the class energy's and
        the concept energy's own predictions, which needs far fewer steps; ``"uniform"`` at uniform class
        and concept variables, as the reference does (``REFERENCE_SETTING``).
    bank, pseudo_threshold: a concept bank for pseudo-labels when the data has no concept labels.
    exact_max_concepts, gibbs_chains, gibbs_sweeps: conditional probabilities (exact or Gibbs).
    stream: keep the training data on the device (False), stream it from host memory in batches and
        chunks (True), or decide by free device memory ("auto"); see ``cbm.models.streaming``.
        Inference always goes ``inference_batch`` samples at a time.
    """

    family = "energy"

    def __init__(self, *, hidden: int = 256, loss_weights: Sequence[float] = (3.0, 1.0, 1.0),
                 global_concept_weight: float = 1.0, flip_samples: float = 0.2, flip_concepts: float = 0.2,
                 dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 4e-5, batch_size: int = 64,
                 max_epochs: int = 100, patience: int = 8,
                 inference_weights: Sequence[float] | Literal["auto"] = "auto", inference_lr: float = 0.1,
                 inference_steps: int = 300, tol: float = 1e-4, inference_patience: int = 10,
                 inference_init: Literal["networks", "uniform"] = "networks", inference_batch: int = 2048,
                 bank: ConceptBank | None = None,
                 pseudo_threshold: str | float | tuple[str, float] = "auto", exact_max_concepts: int = 14,
                 gibbs_chains: int = 256, gibbs_sweeps: int = 200, seed: int = 0, device: str = "auto",
                 stream: Stream = "auto") -> None:
        self.hidden = hidden
        self.loss_weights = loss_weights
        self.global_concept_weight = global_concept_weight
        self.flip_samples = flip_samples
        self.flip_concepts = flip_concepts
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.inference_weights = inference_weights
        self.inference_lr = inference_lr
        self.inference_steps = inference_steps
        self.tol = tol
        self.inference_patience = inference_patience
        self.inference_init = inference_init
        self.inference_batch = inference_batch
        self.bank = bank
        self.pseudo_threshold = pseudo_threshold
        self.exact_max_concepts = exact_max_concepts
        self.gibbs_chains = gibbs_chains
        self.gibbs_sweeps = gibbs_sweeps
        self.seed = seed
        self.device = device
        self.stream = stream

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _weights(value: Sequence[float], name: str) -> tuple[float, float, float]:
        try:
            weights = tuple(float(w) for w in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be three numbers (class, concept, global), got {value!r}.") from None
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"{name} must be three non-negative numbers, not all zero, got {value!r}.")
        return weights  # type: ignore[return-value]

    @classmethod
    def _inference_weights(cls, value: Sequence[float]) -> tuple[float, float, float]:
        weights = cls._weights(value, "inference_weights")
        if not (weights[0] or weights[2]):
            raise ValueError(f"inference_weights {value!r} leave the class out of the energy; give the class or the "
                             "global energy a positive weight.")
        return weights

    @classmethod
    def reference(cls, **overrides: Any) -> EnergyCBM:
        """An unfitted model in the reference setting (``REFERENCE_SETTING``: global_concept_weight 0,
        inference weights (1, 1, 0.01), hidden 512, loss weights 3/1/1, ...), with ``overrides`` on top."""
        return cls(**{**REFERENCE_SETTING, **overrides})

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean_) / self.feature_scale_

    def _links(self) -> LinkEdits:
        return LinkEdits(self.link_mask_, self.link_value_)

    def _net_on(self, device: torch.device) -> EnergyNetworks:
        return self.net_.to(device).eval()

    # ------------------------------------------------------------------ concept labels
    def _concept_targets(self, x: Any, features: torch.Tensor, concept_labels: Any,
                         fingerprint: str | None) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
        if concept_labels is None and self.bank is None and isinstance(x, Embeddings) and x.concept_labels is not None:
            concept_labels = x.concept_labels
            names = list(x.concept_names or [])
            source: dict[str, Any] = {"source": "dataset concept labels"}
        elif concept_labels is not None:
            names = list(self.bank.names) if self.bank is not None else []
            source = {"source": "given concept labels"}
        else:
            names = []
            source = {}
        if concept_labels is not None:
            labels = as_matrix(concept_labels, "concept_labels")
            if len(labels) != len(features):
                raise ValueError(f"concept_labels has {len(labels)} rows but x has {len(features)}.")
            if ((labels != 0) & (labels != 1)).any():
                raise ValueError("concept_labels must be binary (0/1); threshold soft labels first.")
            if len(names) != labels.shape[1]:
                names = [f"concept {i}" for i in range(labels.shape[1])]
            return labels, names, source
        if self.bank is None:
            raise ValueError("EnergyCBM needs concept labels: pass concept_labels=, data that carries them "
                             "(toy world, CUB, a manifest with concept columns), or bank= for pseudo-labels.")
        scores = self.bank.scores(features, fingerprint)
        thresholds, rule = self._pseudo_thresholds(scores)
        labels = (scores > thresholds).float()
        source = {"source": "pseudo-labels from a concept bank", "rule": rule, "thresholds": thresholds.tolist(),
                  "bank_kind": self.bank.kind, "positive_rate": labels.mean(0).tolist()}
        return labels, list(self.bank.names), source

    def _pseudo_thresholds(self, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
        rule = self.pseudo_threshold
        if isinstance(rule, (tuple, list)) and len(rule) == 2 and rule[0] == "value":
            return torch.full((scores.shape[1],), float(rule[1])), f"score > {float(rule[1])}"
        if rule == "auto":
            if self.bank is not None and self.bank.kind == "cav":
                return torch.zeros(scores.shape[1]), "CAV margin > 0"
            rule = 0.8
        if isinstance(rule, (int, float)) and 0 < float(rule) < 1:
            return torch.quantile(scores, float(rule), dim=0), f"score above the per-concept {float(rule):.2f} quantile"
        raise ValueError(f"pseudo_threshold must be 'auto', a quantile in (0, 1) or ('value', t), got {rule!r}.")

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, concept_labels: Any = None, validation: Validation = None,
            validation_concepts: Any = None, class_names: list[str] | None = None) -> EnergyCBM:
        """Train the three energies. Concept labels come, in this order, from ``concept_labels``, as
        pseudo-labels from ``bank`` when one was given, or from an Embeddings ``x`` that carries them;
        the validation split's from ``validation_concepts``, the same pseudo-labelling, or an
        Embeddings ``validation``."""
        if y is None and isinstance(x, Embeddings):
            y = x.labels
        if y is None:
            raise ValueError("y is required (or pass an Embeddings with labels as x).")
        weights = self._weights(self.loss_weights, "loss_weights")
        if self.inference_weights != "auto":
            self._inference_weights(self.inference_weights)
        if self.inference_init not in ("networks", "uniform"):
            raise ValueError(f"inference_init must be 'networks' or 'uniform', got {self.inference_init!r}.")
        fingerprint = x.backbone_fingerprint if isinstance(x, Embeddings) else None
        features = as_matrix(x, "x")
        labels = as_labels(y, len(features))
        concepts, names, source = self._concept_targets(x, features, concept_labels, fingerprint)
        n_classes = max(int(labels.max()) + 1, len(class_names or getattr(x, "class_names", None) or []))
        self._set_data_identity(x, class_names, n_classes)
        n_classes = len(self.class_names_)
        self.concept_names_ = names
        self.n_features_in_ = features.shape[1]

        # validation: features, labels and concepts; never test data
        if validation is None:
            train_idx, val_idx = holdout_split(len(features), self.seed)
            train_x, train_y, train_c = features[train_idx], labels[train_idx], concepts[train_idx]
            val_x, val_y, val_c = features[val_idx], labels[val_idx], concepts[val_idx]
            val_source = f"held out 10% of train (seed {self.seed})"
        else:
            train_x, train_y, train_c = features, labels, concepts
            _, _, val_x, val_y, val_source = split_validation(features, labels, validation, self.seed)
            val_y = as_labels(val_y, len(val_x), n_classes, "validation y")
            if validation_concepts is None and isinstance(validation, Embeddings) and source["source"] != \
                    "pseudo-labels from a concept bank":
                validation_concepts = validation.concept_labels
            if validation_concepts is not None:
                val_c = as_matrix(validation_concepts, "validation_concepts", len(names))
            elif source["source"] == "pseudo-labels from a concept bank":
                val_c = (self.bank.scores(val_x) > torch.tensor(source["thresholds"])).float()
            else:
                raise ValueError("validation data needs concept labels too: pass validation_concepts= or an "
                                 "Embeddings with concept labels.")
            if len(val_c) != len(val_x):
                raise ValueError(f"validation concepts have {len(val_c)} rows but validation x has {len(val_x)}.")

        self.feature_mean_ = train_x.mean(0)
        self.feature_scale_ = train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])
        self.concept_prior_ = train_c.mean(0)
        self.class_prior_ = torch.bincount(train_y, minlength=n_classes).float() / len(train_y)
        k = len(names)
        self.link_mask_ = torch.ones(n_classes, k, dtype=torch.bool)
        self.link_value_ = self.concept_prior_.expand(n_classes, k).clone()

        device = resolve_device(self.device)
        train = (self._standardise(train_x), train_y, train_c)
        val = (self._standardise(val_x), val_y, val_c)
        streamed = should_stream(self.stream, train + val, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            net = EnergyNetworks(self.n_features_in_, k, n_classes, self.hidden, self.dropout).to(device)
            history = self._train(net, weights, Rows(train, device, streamed), Rows(val, device, streamed))
        self.net_ = net.cpu().eval()
        self.metrics_ = {"val_loss": history["best_val_loss"]}
        if self.inference_weights == "auto":
            scores, trials = {}, {}
            for weight in AUTO_GLOBAL_WEIGHTS:
                self.inference_weights_ = (1.0, 1.0, weight)
                trials[weight] = trial = self.infer(val_x)
                scores[weight] = (accuracy(trial.logits, val_y)
                                  + float(((trial.concept_probs > 0.5).float() == val_c).float().mean()))
            best = max(AUTO_GLOBAL_WEIGHTS, key=lambda w: (round(scores[w], 4), w))
            self.inference_weights_ = (1.0, 1.0, best)
            self.training_selection_ = {str(w): v for w, v in scores.items()}
            val_inference = trials[best]
        else:
            self.inference_weights_ = self._inference_weights(self.inference_weights)
            self.training_selection_ = {}
            val_inference = self.infer(val_x)
        self.metrics_.update({
            "val_accuracy": accuracy(val_inference.logits, val_y),
            "val_concept_accuracy": float(((val_inference.concept_probs > 0.5).float() == val_c).float().mean()),
            "val_overall_concept_accuracy": float(((val_inference.concept_probs > 0.5).float() == val_c)
                                                  .all(1).float().mean())})
        self.training_ = {"samples": len(train_x), "validation": val_source, "validation_samples": len(val_x),
                          "concepts": source, "epochs": history["epochs"], "best_epoch": history["best_epoch"],
                          "streamed": streamed,
                          "loss_weights": list(weights), "stopped_early": history["stopped_early"],
                          "inference_weights": list(self.inference_weights_),
                          "inference_weight_selection": self.training_selection_}
        logger.info("ECBM: best epoch %d of %d, validation accuracy %.3f, concept accuracy %.3f",
                    history["best_epoch"], history["epochs"], self.metrics_["val_accuracy"],
                    self.metrics_["val_concept_accuracy"])
        return self

    def _losses(self, net: EnergyNetworks, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                weights: tuple[float, float, float], generator: torch.Generator | None) -> torch.Tensor:
        h, g = net.encode(x)
        class_loss = F.cross_entropy(-net.class_energy_all(h), y)
        concept_energy = net.concept_energy_both(g)  # [B, K, 2]
        concept_loss = F.cross_entropy(-concept_energy.reshape(-1, 2), c.long().reshape(-1),
                                       reduction="sum") / len(x)
        flipped = c
        if generator is not None and self.flip_samples > 0 and self.flip_concepts > 0:
            rows = torch.rand(len(c), 1, generator=generator) < self.flip_samples
            cells = torch.rand(c.shape, generator=generator) < self.flip_concepts
            flipped = torch.where((rows & cells).to(c.device), 1 - c, c)
        global_loss = F.cross_entropy(-net.global_energy_all(flipped), y)
        total = weights[0] * class_loss + weights[1] * concept_loss + weights[2] * global_loss
        if self.global_concept_weight > 0:
            total = total + self.global_concept_weight * self._pseudo_likelihood(net, c, y)
        return total

    @staticmethod
    def _pseudo_likelihood(net: EnergyNetworks, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """- sum_k log p(c_k | c_-k, y) under exp(-E_cy(., y)), averaged over samples."""
        base, slope = net.global_affine()
        e = base + c @ slope  # [B, H]
        u = net.units()[y]  # [B, H]
        e_on = e[:, None] + (1 - c)[..., None] * slope[None]  # concept k set to 1
        e_off = e[:, None] - c[..., None] * slope[None]  # concept k set to 0
        energy = lambda z: net.global_out(F.relu(z * (1 + u[:, None]))).squeeze(-1)
        delta = energy(e_on) - energy(e_off)  # [B, K]: E(c_k=1) - E(c_k=0)
        return F.binary_cross_entropy_with_logits(-delta, c, reduction="sum") / len(c)

    def _train(self, net: EnergyNetworks, weights: tuple[float, float, float], train: Rows,
               val: Rows) -> dict[str, Any]:
        """Adam on (standardised features, labels, concepts) ``train``; early stopping on the loss over ``val``."""
        generator = torch.Generator().manual_seed(self.seed)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_loss, best_state, best_epoch, stale, epoch = float("inf"), None, 0, 0, 0
        for epoch in range(1, self.max_epochs + 1):
            net.train()
            for batch in torch.randperm(len(train), generator=generator).split(self.batch_size):
                loss = self._losses(net, *train.batch(batch), weights, generator)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            net.eval()
            with torch.no_grad():  # the per-sample mean loss, summed chunk by chunk
                val_loss = float(val.sum(lambda x, y, c: self._losses(net, x, y, c, weights, None) * len(x))) / len(val)
            if best_state is None or val_loss < best_loss - 1e-4 * abs(best_loss):
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {name: t.detach().clone() for name, t in net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        optimiser.zero_grad(set_to_none=True)  # a fitted model holds no gradient buffers
        return {"best_val_loss": best_loss, "best_epoch": best_epoch, "epochs": epoch,
                "stopped_early": epoch < self.max_epochs}

    # ------------------------------------------------------------------ inference
    def infer(self, x: Any, mask: Any = None, values: Any = None, *, weights: Sequence[float] | None = None,
              init: Inference | None = None, device: str | None = None) -> Inference:
        """Gradient inference of the class and concepts, batched; ``mask``/``values`` [N, K] fix concepts.

        The class and concepts are relaxed and optimised together, as in the reference, under
        ``weights`` (default: the model's inference weights); the class is then read out exactly at the
        optimised concepts: ``logits[y]`` is minus the total energy of (x, y, c), i.e. the Boltzmann
        distribution over the discrete class given x and the concepts (the relaxed class variable is
        kept as ``relaxed_class_probs``).

        ``init`` (an earlier ``infer(x)`` of the same x under the same weights) makes this a continuation:
        rows whose fixed concepts already hold ``init``'s values (an empty mask included) keep ``init``'s
        result exactly, and the other rows resume ``init``'s optimisation (variables and Adam's moments,
        so that only the change itself moves them; a fresh optimiser would take full-size steps from the
        optimum). Without ``init``, the variables start where ``inference_init`` says (the networks' own
        predictions, or uniform as in the reference), and identical unconstrained rows are inferred once.
        """
        features = self._features(x).detach()
        n, k = len(features), len(self.concept_names_)
        lam = self._weights(weights if weights is not None else self.inference_weights_, "weights")
        fixed = torch.zeros(n, k, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        given = torch.zeros(n, k) if values is None else torch.as_tensor(values, dtype=torch.float32)
        if fixed.shape != (n, k) or given.shape != (n, k):
            raise ValueError(f"mask and values must be [{n}, {k}].")
        if ((given[fixed] < 0) | (given[fixed] > 1)).any():
            raise ValueError("intervened concept values are probabilities and must lie in [0, 1].")
        if init is None:
            if mask is None:
                unique, inverse = torch.unique(features, dim=0, return_inverse=True)
                if len(unique) < n:
                    return self.infer(unique, weights=lam, device=device).take(inverse)
            return self._optimise(features, fixed, given, lam, None, device)
        if len(init.logits) != n:
            raise ValueError(f"init must be an inference of the same {n} samples, got {len(init.logits)} rows.")
        todo = torch.nonzero((fixed & (given != init.concept_probs)).any(1)).flatten()
        result = init.take(torch.arange(n))
        if len(todo):
            result.put(todo, self._optimise(features[todo], fixed[todo], given[todo], lam, init.take(todo), device))
        return result

    def _optimise(self, features: torch.Tensor, fixed: torch.Tensor, given: torch.Tensor,
                  lam: tuple[float, float, float], start: Inference | None, device: str | None) -> Inference:
        """``infer``'s optimisation of every row, ``inference_batch`` rows at a time."""
        run_on = resolve_device(device or self.device)
        net = self._net_on(run_on)
        links = self._links()
        outs = []
        for rows in torch.arange(len(features)).split(self.inference_batch):
            outs.append(infer_batch(net, self._standardise(features[rows]).to(run_on), fixed[rows].to(run_on),
                                          given[rows].to(run_on), lam, links,
                                          None if start is None else start.take(rows).to(run_on),
                                     max_steps=self.inference_steps, lr=self.inference_lr, tol=self.tol,
                                     patience=self.inference_patience, init=self.inference_init))
        self.net_.cpu()
        return Inference(*(torch.cat([o[i] for o in outs]).cpu() for i in range(len(outs[0]))))

    def _parts(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input part, concept part) of the logits [N, C] at features ``x`` and concepts ``c``, on the CPU;
        differentiable w.r.t. ``x`` (not w.r.t. the network's weights)."""
        net, lam = self.net_.eval(), self.inference_weights_
        c = c.detach().cpu().clamp(0, 1)
        with frozen(net):
            h, g = net.encode(self._standardise(x.cpu()))
            rest = input_part(net, h, net.concept_energy_parts(g), c, lam)
            return rest, concept_part(net, c, self._links(), lam)

    # ------------------------------------------------------------------ the shared interface
    def concepts(self, x: Any) -> torch.Tensor:
        """Concept probabilities [N, K] from gradient inference."""
        return self.infer(x).concept_probs

    def decision_function(self, x: Any) -> torch.Tensor:
        """Class logits [N, C] after gradient inference (see ``infer``). When ``x`` requires grad they are
        differentiable w.r.t. it: the read-out at the inferred, detached concepts, whose gradient is that
        of the minimised energy (envelope theorem; see the module docstring)."""
        features = self._features(x)
        inference = self.infer(features)
        if not (features.requires_grad and torch.is_grad_enabled()):
            return finite_output(inference.logits)
        return finite_output(self._logits(features, inference.concept_probs))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        """The concepts' part of the logits, ``-l_cy E_cy(c, y)`` [N, C] with the inference weight ``l_cy``
        (its softmax over classes is the global energy's Boltzmann distribution at temperature 1 / l_cy);
        ``decision_function(x) == predict_from_concepts(concepts(x)) + contribution_rest(x) -
        contribution_baseline()``."""
        c = as_matrix(c, "concepts", len(self.concept_names_)).clamp(0, 1)
        with torch.no_grad():
            return concept_part(self.net_.eval(), c, self._links(), self.inference_weights_)

    def _logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Exact class logits with every concept fixed at ``c`` (the read-out, no optimisation)."""
        rest, concept_part = self._parts(x, c)
        return rest + concept_part

    def _intervention_mask(self, n: int, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        check_intervention(values)
        k = len(self.concept_names_)
        if isinstance(values, tuple):
            mask, given = intervention_pair(values, (n, k))
            return mask, torch.where(mask, given, torch.zeros(()))
        mask, given = torch.zeros(n, k, dtype=torch.bool), torch.zeros(n, k)
        for name, value in values.items():
            column, value = self.intervention_value(name, value, n)
            mask[:, column] = True
            given[:, column] = value
        return mask, given

    def propagate(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any], *,
                  before: Inference | None = None) -> Propagation:
        """Fix concepts (``{name: value}`` or ``(mask, values)``, values in [0, 1]), let the other concepts and
        the class respond, and report how they moved. ``before`` is the model's own inference (its
        prediction); the optimisation continues from it under the same inference weights, so an empty
        intervention, or concepts fixed at their inferred values, move nothing, and every shift is
        caused by the correction. Pass ``before`` (``model.infer(x)`` for the same x) to skip re-running it."""
        features = self._features(x)
        mask, given = self._intervention_mask(len(features), values)
        before = before if before is not None else self.infer(features)
        after = self.infer(features, mask, given, init=before)
        return Propagation(mask, before.concept_probs, after.concept_probs, before.logits, after.logits,
                           list(self.concept_names_), list(self.class_names_))

    def intervention(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [N, C], concept probabilities [N, K]) after fixing concepts and letting the rest respond
        (see ``propagate``): with nothing fixed, one inference gives ``decision_function(x)`` and ``concepts(x)``
        exactly; rows with every concept fixed get the exact read-out at the given concepts (no inference)."""
        features = self._features(x)
        mask, given = self._intervention_mask(len(features), values)
        if mask.any() and not mask.all():
            moved = self.propagate(features, (mask, given))
            return finite_output(moved.logits_after), moved.concepts_after
        inference = self.infer(features, mask, given) if mask.any() else self.infer(features)
        return finite_output(inference.logits), inference.concept_probs

    # ------------------------------------------------------------------ explanations
    def contribution_baseline(self) -> torch.Tensor:
        """``predict_from_concepts`` [C] at the training concept frequencies, the start of the attribution path."""
        return self.predict_from_concepts(self.concept_prior_[None])[0]

    def contribution_rest(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """The part of the logits [N, C] not attributed to concepts: ``contribution_baseline()`` plus
        ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` at the inferred concepts (or ``concepts``), so that
        ``contributions(x).sum(-1) + contribution_rest(x) == decision_function(x)`` (to float rounding)."""
        features = self._features(x).detach()
        c = self._concepts_or(features, concepts)
        with torch.no_grad():
            return self._parts(features, c)[0] + self.contribution_baseline()

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Exact integrated gradients of the concepts' part of the logits, ``-l_cy E_cy(c, y)`` [N, C, K], from
        the training concept frequencies to ``c`` (the inferred concepts, or ``concepts``):
        ``contributions.sum(-1) + contribution_baseline() == predict_from_concepts(c)`` and
        ``contributions(x).sum(-1) + contribution_rest(x) == decision_function(x)``."""
        c = self._concepts_or(x, concepts)
        net = self.net_.eval()
        links = self._links()
        with torch.no_grad():
            base, slope = net.global_affine()
            u = net.units()  # [M, H]
            c0 = self.concept_prior_[None].expand_as(c)
            scale = (1 + u)[None]  # [1, M, H]
            # effective concepts per class (cut links see a fixed value on both ends of the path)
            mask = links.mask.float()[None]  # [1, M, K]
            c_end = mask * c[:, None] + (1 - mask) * links.value[None]
            c_start = mask * c0[:, None] + (1 - mask) * links.value[None]
            z0 = (base + c_start @ slope) * scale  # [N, M, H]
            dz = ((c_end - c_start) @ slope) * scale
            # fraction of the path t in [0, 1] on which unit z0 + t dz is positive
            with np.errstate(all="ignore"):
                root = -z0 / dz
            pos_start = (z0 > 0).float()
            fraction = torch.where(dz > 0, (1 - root.clamp(0, 1)), root.clamp(0, 1))
            fraction = torch.where(dz == 0, pos_start, fraction)
            w = net.global_out.weight[0]  # [H]
            # dE/dc_k along the path = sum_h w_h 1[z_h > 0] scale_h slope_kh
            per_unit = fraction * scale * w  # [N, M, H]
            grad_integral = per_unit @ slope.T  # [N, M, K]
            return -self.inference_weights_[2] * (grad_integral * (c_end - c_start))

    # ------------------------------------------------------------------ conditional probabilities

    def edit(self, action: Literal["prune", "set_value", "restore"], concept: str,
             classes: str | list[str] | None = None, *, value: float = 0.0, validation: Validation = None,
             reason: str = "") -> tuple[EnergyCBM, EditRecord]:
        """An edited copy and its record. ``prune`` cuts the concept's link into the global energy of
        ``classes`` (all when None): those classes see the concept at its training frequency, so it no
        longer sways them either way; ``set_value`` makes them see it at ``value`` in [0, 1];
        ``restore`` reconnects it. With ``validation`` data the record holds accuracy before and after."""
        self._check_fitted()
        if action not in ("prune", "set_value", "restore"):
            raise ValueError(f"unknown edit {action!r}; use 'prune', 'set_value' or 'restore'.")
        if action == "set_value" and not 0 <= value <= 1:
            raise ValueError(f"set_value needs a value in [0, 1] (a concept probability), got {value}.")
        column = self.concept_index(concept)
        names = self.class_names_ if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        rows = [self.class_index(name) for name in names]
        edited = self.copy()
        previous = {self.class_names_[r]: [bool(self.link_mask_[r, column]), float(self.link_value_[r, column])]
                    for r in rows}
        for row in rows:
            edited.link_mask_[row, column] = action == "restore"
            edited.link_value_[row, column] = value if action == "set_value" else float(self.concept_prior_[column])
        record = EditRecord(action=action, concept=concept, classes=names, reason=reason,
                            details={"previous": previous, "value": value, "column": column})
        return self._record_edit(edited, record, validation)

    def undo(self) -> EnergyCBM:
        """A copy with the most recent edit reverted (its record removed from the history)."""
        self._check_fitted()
        if not self.edits_:
            raise ValueError("this model has no edits to undo.")
        reverted = self.copy()
        last = reverted.edits_.pop()
        column = int(last.details["column"])
        for name, (linked, value) in last.details["previous"].items():
            row = self.class_index(name)
            reverted.link_mask_[row, column] = bool(linked)
            reverted.link_value_[row, column] = float(value)
        return reverted

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"net.{name}": t for name, t in self.net_.state_dict().items()}
        tensors.update(feature_mean=self.feature_mean_, feature_scale=self.feature_scale_,
                       concept_prior=self.concept_prior_, class_prior=self.class_prior_,
                       link_mask=self.link_mask_.to(torch.uint8), link_value=self.link_value_)
        state: dict[str, Any] = {"bank": None}
        if self.bank is not None:
            bank_manifest, bank_tensors = bank_state(self.bank)
            state["bank"] = bank_manifest
            tensors.update(bank_tensors)
        return state, tensors

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EnergyCBM:
        state = manifest["state"]
        params = dict(manifest["params"])
        if "intervention_weights" in params:  # older bundles; interventions now share the inference weights
            logger.info("this bundle's intervention_weights %s are no longer used: interventions use the "
                        "inference weights", params.pop("intervention_weights"))
        params.setdefault("inference_init", "uniform")  # bundles from before the option started uniform
        for key in ("loss_weights", "inference_weights"):
            if params[key] != "auto":
                params[key] = tuple(params[key])
        if isinstance(params.get("pseudo_threshold"), list):
            params["pseudo_threshold"] = tuple(params["pseudo_threshold"])
        bank = bank_from_state(state["bank"], tensors) if state.get("bank") else None
        model = cls(bank=bank, **params)
        _restore_common(model, manifest)
        k, m, d = len(model.concept_names_), len(model.class_names_), model.n_features_in_
        hidden = int(model.hidden)
        if hidden < 1 or hidden * k * hidden > 2**31:
            raise ValueError(f"hidden width {hidden} is out of range")
        net = EnergyNetworks(d, k, m, hidden, float(model.dropout))
        expected = {f"net.{name}": tuple(t.shape) for name, t in net.state_dict().items()}
        expected.update(feature_mean=(d,), feature_scale=(d,), concept_prior=(k,), class_prior=(m,),
                        link_mask=(m, k), link_value=(m, k))
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} must have shape {shape}")
        net.load_state_dict({name[4:]: tensors[name].float() for name in expected if name.startswith("net.")})
        model.net_ = net.eval()
        model.feature_mean_, model.feature_scale_ = tensors["feature_mean"].float(), tensors["feature_scale"].float()
        if not (model.feature_scale_ > 0).all():
            raise ValueError("feature_scale must be positive")
        model.concept_prior_, model.class_prior_ = tensors["concept_prior"].float(), tensors["class_prior"].float()
        model.link_mask_ = tensors["link_mask"].bool()
        model.link_value_ = tensors["link_value"].float()
        model.inference_weights_ = model._inference_weights(model.training_.get("inference_weights", (1.0, 1.0, 1.0)))
        if bank is not None and (bank.names != model.concept_names_ or bank.dim != d):
            raise ValueError("the concept bank does not match the model's concepts or input width")
        return model


# ---------------------------------------------------------------------------------------------------- tables
