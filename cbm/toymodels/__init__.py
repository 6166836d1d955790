"""The offline models shipped with the toolkit, trained on the toy world by ``cbm.toymodels.train``.

- ``toy:clip`` (``cbm/assets/toy_clip``): a small open_clip ``CLIP`` (ModifiedResNet image tower,
  2-layer text transformer, default CLIP tokenizer) trained contrastively on world images and
  generated captions; open_clip ``local-dir:`` layout, fp16 safetensors.
- ``toy:cnn`` (``cbm/assets/toy_cnn``): torchvision ``shufflenet_v2_x0_5`` trained to classify
  world images; ``config.json`` names the architecture, its kwargs, preprocessing, class names
  and the embedding layer (penultimate features), weights in fp16 safetensors.

``cbm.toymodels.quality`` scores any embedding space on the world (zero-shot concept AUC,
zero-shot class accuracy, linear probe) from embeddings alone.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOY_CLIP_DIR = ASSETS_DIR / "toy_clip"
TOY_CNN_DIR = ASSETS_DIR / "toy_cnn"

__all__ = ["ASSETS_DIR", "TOY_CLIP_DIR", "TOY_CNN_DIR"]
