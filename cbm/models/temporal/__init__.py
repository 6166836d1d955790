"""MoTIF, Concepts in Motion (Knab et al. 2025): a temporal concept bottleneck model for videos.

A video is a sequence of windows (a fixed number of frames each, embedded through the cache and
averaged per window). The model works on per-window embeddings ``[B, T, D]`` with a validity mask
(or a list of ``[T_i, D]``, or window :class:`~cbm.embed.Embeddings` regrouped by
:func:`sequences_from_windows`):

1. per-window concept activations ``max(0, cos(window, concept))``, standardised per concept with
   the training windows' mean and std;
2. a sinusoidal encoding of time (by default inside each concept's attention; the reference adds
   it to the activations, ``positional="input"``, see below);
3. one block of attention over time *separately for every concept* (queries, keys and values of a
   concept come from that concept's channel alone, so concepts never mix) with a learnable
   per-concept temperature, then a per-concept feed-forward layer, both with residuals;
4. a non-negative per-concept affine output: the per-window concepts
   ``c_t = max(0, softplus(a_k x + b_k) - log 2)``, the bottleneck;
5. a per-window linear classifier with non-negative weights, ``z_t = W c_t + b``;
6. log-sum-exp pooling over the valid windows, ``logits = logsumexp_t(tau z_t) / tau``.

``attention="mixing"`` replaces step 3's attention by ordinary multi-head attention across
concepts, for comparison. Training minimises class-weighted cross-entropy with label smoothing +
``l1`` on the classifier + ``sparsity`` on the per-window concepts (AdamW, gradient clipping,
weights clamped to be non-negative after every step) and keeps the epoch with the best
*validation* accuracy.

Explanations follow the paper: the time importance ``alpha_t = softmax_t(tau z_t[class])`` (the
weights the LSE pooling gives each window), per-window contributions ``c_t[k] W[class, k]``, the
global time-weighted contributions ``sum_t alpha_t c_t[k] W[class, k]`` (exact up to the pooling's
entropy term, returned alongside) and the per-concept ``T x T`` attention maps. Interventions act on
the bottleneck ``c_t``, as the reference's do: dropping a concept sets it to 0 (absent) in every
window, noise perturbs it, dropping a window zeroes it and takes it out of the pooling; attention
can be replaced by identity, uniform, reversed or shuffled weights.

Defaults that differ from the reference (``REFERENCE_ARCHITECTURE`` sets the reference's values:
``TemporalCBM(bank, **REFERENCE_ARCHITECTURE)``):
- ``positional="attention"``: each concept's queries and keys get their own projection of a shared
  sinusoidal encoding of time (width ``position_dim`` = 8). The reference (``"input"``) adds a
  width-K sinusoidal encoding to the standardised activations, so concept k's input carries the
  k-th sinusoid, a different clock per concept, and the high channels barely change over time;
- ``norm="concept"``: a learned per-concept scale and shift (no statistics: normalising one value
  per channel would make it constant). The reference's LayerNorm over the concept axis
  (``"layer"``) lets one concept's value change another's output, which breaks "concepts never
  mix" and single-concept interventions;
- ``head_dim=2`` (the reference's per-concept query/key/value width is 1);
- ``hidden=4``: per-concept feed-forward width (the reference's grouped 1x1 convolutions have width 1);
- ``lr=1e-2`` (the reference's AdamW uses 1e-3);
- dropout sits on the encoding and on each residual branch (the reference also drops inside the
  feed-forward layer); parameters are initialised near identity (query/key/value weights around 1,
  classifier weights uniform in [0, 1/sqrt(K)]) rather than with PyTorch's defaults.

Other departures, on purpose:
- model selection and early stopping use the validation split (the reference selects on test);
  with no validation data a seeded 10% of the training videos is held out;
- a dropped window is left out of the log-sum-exp pooling; the reference only zeroes its concepts,
  so its bias-only logit ``b`` still enters the pooling and the decision;
- ``noise_concepts`` adds seeded Gaussian noise to the bottleneck and clips at 0 (the reference's
  noise insertion replaces the channel by noise);
- ``attention="mixing"`` is this module's block with multi-head attention in place of the
  per-concept one (pre-norm, per-concept feed-forward, ``heads`` default 1), not the reference's
  ``FullAttentionTemporalBlock`` (post-norm, 4K-wide feed-forward that mixes concepts);
- cosines use the bank vectors' directions for any bank kind (CAV intercepts are ignored).
"""

from cbm.models.temporal.evaluation import (
                                           decisive_windows,
                                           localisation_hits,
                                           zero_shot_video,
)
from cbm.models.temporal.model import (
                                           REFERENCE_ARCHITECTURE,
                                           TemporalCBM,
                                           TemporalExplanation,
)
from cbm.models.temporal.networks import ATTENTION_MODES, TemporalNet
from cbm.models.temporal.sequences import (
                                           VideoSequences,
                                           as_sequences,
                                           concept_cosines,
                                           labelled_sequences,
                                           pad_sequences,
                                           reverse_time,
                                           sequences_from_windows,
)

__all__ = ["ATTENTION_MODES", "REFERENCE_ARCHITECTURE", "TemporalCBM", "TemporalExplanation", "TemporalNet",
           "VideoSequences", "as_sequences", "concept_cosines", "decisive_windows", "labelled_sequences",
           "localisation_hits", "pad_sequences", "reverse_time", "sequences_from_windows", "zero_shot_video"]
