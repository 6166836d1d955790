"""Explanations, interventions, metrics, TCAV and audit reports for any fitted concept bottleneck model.

Everything works through the shared model interface (``concepts``, ``predict_from_concepts``,
``intervene``, ``contributions``, ...), so every family plugs in; family-specific additions to the
audit's model card register with ``register_family_extra``. ``explain.plots`` holds the figures
(matplotlib Figure objects, reusable by the concept editor); ``explain.cli`` the ``cbm audit`` command.
Temporal (video) models are audited on whole videos through ``VideoView``; ``explain.video`` holds
what their audit adds (attention interventions, timelines, localisation).
"""

from explain.audit import GATE_METRICS, Report, audit, check_gates, parse_gates, register_family_extra
from explain.batch import BatchReport, audit_many
from explain.core import EvalData, ModelView, VideoView, as_data, make_view
from explain.explanations import (
    Counterfactual,
    Importance,
    SampleExplanation,
    concept_effects,
    counterfactual,
    explain_samples,
    global_importance,
)
from explain.interventions import POLICIES, InterventionCurves, intervention_curves
from explain.metrics import (
    classification,
    completeness,
    concept_quality,
    effective_concepts,
    leakage,
    stability,
    suspect_concepts,
)
from explain.tcav import (
    TCAVReport,
    TCAVResult,
    embedding_gradients,
    holm,
    layer_activations,
    tcav,
    tcav_datasets,
    tcav_layer,
)

__all__ = [
    "GATE_METRICS", "POLICIES", "BatchReport", "Counterfactual", "EvalData", "Importance", "InterventionCurves",
    "ModelView", "Report", "SampleExplanation", "TCAVReport", "TCAVResult", "VideoView", "as_data", "audit",
    "audit_many", "check_gates", "classification", "completeness", "concept_effects", "concept_quality",
    "counterfactual", "effective_concepts", "embedding_gradients", "explain_samples", "global_importance", "holm",
    "intervention_curves", "layer_activations", "leakage", "make_view", "parse_gates", "register_family_extra",
    "stability", "suspect_concepts", "tcav", "tcav_datasets", "tcav_layer",
]
