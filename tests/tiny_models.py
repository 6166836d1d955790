"""Tiny, weight-free models and in-memory datasets shared by the tests (no downloads)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from cbm.data.base import ConceptDataset, digest

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def write_tiny_clip_dir(path: Path, seed: int = 0, **preprocess) -> Path:
    """An open_clip local-dir folder (config + safetensors weights) of a tiny random CLIP."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {**CLIP_PREPROCESS, **preprocess}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return path


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]


class ColourSquares(ConceptDataset):
    """N solid-colour images in three classes; concept k = "is colour k"."""

    def __init__(self, n: int = 30, size: int = 40, tag: str = "a") -> None:
        self.ids = [f"{tag}/{i:04d}" for i in range(n)]
        self.labels = np.arange(n) % 3
        self.class_names = ["red", "green", "blue"]
        self.concept_names = ["reddish", "greenish", "bluish"]
        self.concept_labels = np.eye(3, dtype=np.float32)[self.labels]
        self.size, self.tag = size, tag

    def load(self, index: int) -> Image.Image:
        shade = (index * 7) % 25
        colour = tuple(min(255, c + shade) for c in COLOURS[index % 3])
        return Image.new("RGB", (self.size, self.size), colour)

    def fingerprint(self) -> str:
        return digest(self.ids, self.size, self.tag)


def rewrite_manifest(path, change):
    """Tamper with a model bundle's manifest in place (``change(manifest, header)``), keeping the tensors."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    manifest = json.loads(header["__metadata__"]["cbm_manifest"])
    change(manifest, header)
    header["__metadata__"]["cbm_manifest"] = json.dumps(manifest)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


def write_video(path: Path, n_frames: int = 20, codec: str = "mpeg4", size: int = 32, rate: int = 10,
                shade_step: int = 12) -> Path:
    """A small grey video whose frame i has every pixel at ``shade_step * i``; 0 frames gives a valid empty file."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), shade_step * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def capture_app_launch(monkeypatch, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The Streamlit arguments ``cbm app ARGV`` would serve the editor with, and the editor's environment
    (captured instead of served)."""
    import argparse
    import os

    from app import cli as app_cli
    from app import server

    parser = argparse.ArgumentParser()
    app_cli.add_commands(parser.add_subparsers())
    for name in ("CBM_APP_MODEL", "CBM_APP_DATA"):
        monkeypatch.setenv(name, "")  # restored after the test
    captured = []
    monkeypatch.setattr(server, "serve", lambda arguments: captured.append((arguments, dict(os.environ))) or 0)
    args = parser.parse_args(["app", *argv])
    args.run(args)
    return captured[0]
