"""Concept bottleneck models on frozen image and video backbones.

The entry points: ``load_backbone`` (open_clip, torchvision, timm and the shipped toy models),
``embed`` (cached feature extraction) and the datasets in ``cbm.data``.
"""

from cbm.backbones import Backbone, WeightsUnavailableError, load_backbone
from cbm.embed import Embeddings, embed

__version__ = "0.1.0"

__all__ = ["Backbone", "Embeddings", "WeightsUnavailableError", "embed", "load_backbone", "__version__"]
