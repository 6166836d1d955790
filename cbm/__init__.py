"""Concept bottleneck models on frozen image and video backbones.

Entry points: ``load_backbone`` (open_clip, torchvision, timm and the shipped toy models),
``embed`` (cached feature extraction), the datasets in ``cbm.data``, the model families in
``cbm.models`` and ``load`` for any saved model bundle.
"""

from cbm.backbones import Backbone, WeightsUnavailableError, load_backbone
from cbm.embed import Embeddings, embed
from cbm.models import (
    ConceptBottleneck,
    ConceptEmbeddingModel,
    EnergyCBM,
    LaBoCBM,
    PosthocCBM,
    SparseCBM,
    TemporalCBM,
    load,
)

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "ConceptBottleneck",
    "ConceptEmbeddingModel",
    "Embeddings",
    "EnergyCBM",
    "LaBoCBM",
    "PosthocCBM",
    "SparseCBM",
    "TemporalCBM",
    "WeightsUnavailableError",
    "embed",
    "load",
    "load_backbone",
    "__version__",
]
