"""The concept bottleneck model families, behind one scikit-learn-style interface.

Importing this package registers every family, so ``load`` can read any bundle.
"""

from cbm.models.base import FAMILIES, ConceptBottleneckModel, EditRecord, load
from cbm.models.baselines import LinearProbe, TimeAveragedCBM
from cbm.models.bottleneck import ConceptBottleneck, ConceptEmbeddingModel
from cbm.models.bundle import BundleError
from cbm.models.energy import EnergyCBM
from cbm.models.labo import LaBoCBM, few_shot, few_shot_protocol
from cbm.models.posthoc import PosthocCBM
from cbm.models.sparse import ConceptMatrixSearch, SparseCBM
from cbm.models.temporal import TemporalCBM, VideoSequences, sequences_from_windows

__all__ = [
    "FAMILIES",
    "BundleError",
    "ConceptBottleneck",
    "ConceptBottleneckModel",
    "ConceptEmbeddingModel",
    "ConceptMatrixSearch",
    "EditRecord",
    "EnergyCBM",
    "LaBoCBM",
    "LinearProbe",
    "PosthocCBM",
    "SparseCBM",
    "TemporalCBM",
    "TimeAveragedCBM",
    "VideoSequences",
    "few_shot",
    "few_shot_protocol",
    "load",
    "sequences_from_windows",
]
