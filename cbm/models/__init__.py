"""The concept bottleneck model families, behind one scikit-learn-style interface."""

from cbm.models.base import FAMILIES, ConceptBottleneckModel, EditRecord, load
from cbm.models.bundle import BundleError
from cbm.models.posthoc import PosthocCBM

__all__ = ["FAMILIES", "BundleError", "ConceptBottleneckModel", "EditRecord", "PosthocCBM", "load"]
