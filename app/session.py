"""The editor's session: which model and data are open, the edits made, and the audit trail.

Nothing here computes a prediction or changes a weight by itself: every number comes from the
public API of ``cbm`` (and ``explain``). The session only keeps what the person did, so it can be
undone, exported and saved.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cbm.backbones import Backbone
from cbm.data.base import (
    MAX_UPLOAD_BYTES,
    ConceptDataset,
    ImageReadError,
    read_image_bytes,
)
from cbm.data.registry import load_dataset
from cbm.data.toy import VIDEO_CLASS_NAMES
from cbm.embed import Embeddings, default_cache_dir, embed
from cbm.models import (
    ConceptBottleneckModel,
    TemporalCBM,
    VideoSequences,
    load,
    sequences_from_windows,
)

DEFAULT_DATA = "toy:images@val"
DEFAULT_VIDEO_DATA = "toy:videos@val"
UPLOAD_TYPES = ("png", "jpg", "jpeg", "bmp", "webp")
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")


def read_upload(name: str, data: bytes) -> Image.Image:
    """An uploaded image as RGB: its name must end in one of ``UPLOAD_TYPES``, its content must be one of
    ``UPLOAD_FORMATS`` within the size and pixel limits of ``read_image_bytes``; ImageReadError otherwise."""
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise ImageReadError(f"{name!r} is not a {', '.join(UPLOAD_TYPES)} file; upload an image of one of those types.")
    return read_image_bytes(data, max_bytes=MAX_UPLOAD_BYTES, formats=UPLOAD_FORMATS)


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """The toy-world demo model (PCBM on ``toy:clip`` text concepts), built on first use and cached."""
    path = Path(cache_dir or default_cache_dir()) / "models" / "toy_pcbm.cbm"
    if not path.exists():
        from cbm.backbones import load_backbone
        from cbm.toy import toy_embeddings, toy_text_bank
        from cbm.models import PosthocCBM

        clip = load_backbone("toy:clip")
        splits = toy_embeddings(clip, cache_dir=cache_dir, progress=False)
        model = PosthocCBM(toy_text_bank(clip)).fit(splits["train"], validation=splits["val"])
        model.save(path)
    return path


def default_data(model: ConceptBottleneckModel) -> str:
    """The data the editor browses when none is given: the toy images for an image model, the toy videos for a
    video model trained on them; a ValueError asking for ``--data`` for any other video model."""
    if not isinstance(model, TemporalCBM):
        return DEFAULT_DATA
    if list(model.class_names) != VIDEO_CLASS_NAMES:
        raise ValueError("this video model was not trained on the toy videos, so there is no default data to "
                         "browse; give its videos with --data, e.g. cbm app MODEL --data frames:PATH or videos:PATH.")
    return DEFAULT_VIDEO_DATA


@dataclass
class InterventionOutcome:
    """What one slider change does to a sample: class probabilities before and after, and how much each
    corrected concept alone moves the new top class's logit."""

    before: torch.Tensor  # [C]
    after: torch.Tensor  # [C]
    drivers: dict[str, float]

    @property
    def predicted_before(self) -> int:
        return int(self.before.argmax())

    @property
    def predicted_after(self) -> int:
        return int(self.after.argmax())


def intervention_outcome(model: ConceptBottleneckModel, features: torch.Tensor | VideoSequences,
                         changed: dict[str, float]) -> InterventionOutcome:
    """The editor's recomputation after a slider moves: the head only, on the cached embedding [1, D] (or one
    video's cached window embeddings, where ``model.intervene`` sets each value in every window)."""
    logits = model.decision_function(features)[0]
    after = torch.softmax(model.intervene(features, changed), dim=1)[0]
    new = int(after.argmax())
    drivers = {concept: float(model.intervene(features, {concept: value})[0, new] - logits[new])
               for concept, value in changed.items()}
    return InterventionOutcome(torch.softmax(logits, dim=0), after, drivers)


@dataclass
class TrailEntry:
    """One thing the person did: an intervention or a global edit."""

    kind: str
    sample: str
    details: dict[str, Any]
    prediction_before: str = ""
    prediction_after: str = ""
    time: float = field(default_factory=time.time)


@dataclass
class EditorSession:
    """An open model with its data, edit history and audit trail.

    A sample is an image, or for a video model (``TemporalCBM``) a whole video: ``sequences`` then holds the
    window embeddings regrouped per video, and sample ``i`` is video ``i``.
    """

    model_path: Path
    data_spec: str
    model: ConceptBottleneckModel
    dataset: ConceptDataset
    embeddings: Embeddings
    backbone: Backbone
    sequences: VideoSequences | None = None
    history: list[ConceptBottleneckModel] = field(default_factory=list)
    trail: list[TrailEntry] = field(default_factory=list)

    @classmethod
    def open(cls, model_path: str | Path | None = None, data_spec: str | None = None,
             cache_dir: str | Path | None = None) -> EditorSession:
        """Open a bundle (default: the toy demo model) and embed its data (default: ``default_data``) through
        the cache; a video model's windows are regrouped into videos."""
        path = Path(model_path) if model_path else default_model_path(cache_dir)
        model = load(path)
        spec = data_spec or default_data(model)
        backbone = model.load_backbone()
        dataset = load_dataset(spec)
        embeddings = embed(backbone, dataset, cache_dir=cache_dir, progress=False, num_workers=0)
        sequences = sequences_from_windows(embeddings) if isinstance(model, TemporalCBM) else None
        return cls(path, spec, model, dataset, embeddings, backbone, sequences)

    # ------------------------------------------------------------------ the samples
    @property
    def is_video(self) -> bool:
        return self.sequences is not None

    @property
    def inputs(self) -> Embeddings | VideoSequences:
        """Every sample as the model reads it: the embeddings, or the videos' window sequences."""
        return self.embeddings if self.sequences is None else self.sequences

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.inputs.labels)

    @property
    def sample_ids(self) -> list[str]:
        return list(self.embeddings.ids if self.sequences is None else self.sequences.video_ids)

    def sample(self, i: int) -> torch.Tensor | VideoSequences:
        """Sample ``i`` as the model reads it: its embedding [1, D], or video ``i``'s window sequence."""
        return self.embeddings.features[i:i + 1] if self.sequences is None else self.sequences.subset([i])

    def thumbnail(self, i: int) -> Image.Image:
        """The image of sample ``i``; for a video the frame of its middle window (see ``video_frames``)."""
        if self.sequences is None:
            return self.dataset.load(i)
        windows = self._windows(i)
        return self._window_frame(windows[len(windows) // 2])

    def video_frames(self, i: int) -> list[Image.Image]:
        """Video ``i``'s frame strip: one frame per window in time order, the middle one of the frames the model
        saw from that window."""
        return [self._window_frame(row) for row in self._windows(i)]

    def window_spans(self, i: int) -> list[list[int]]:
        """(start, stop) frames of every window of video ``i``."""
        return self.sequences.window_spans[i][self.sequences.valid[i]].tolist()

    def _windows(self, i: int) -> list[int]:
        rows = self.sequences.window_index[i]
        return rows[rows >= 0].tolist()

    def _window_frame(self, row: int) -> Image.Image:
        frames = self.dataset.load(row)
        return frames[len(frames) // 2]

    # ------------------------------------------------------------------ the model's view of the data
    def probabilities(self) -> torch.Tensor:
        return torch.as_tensor(self.model.predict_proba(self.inputs))

    def validation_accuracy(self) -> float:
        return float(self.model.score(self.inputs))

    def concept_values(self, x: torch.Tensor | VideoSequences | None = None) -> torch.Tensor:
        """The concept values the sliders start from, one row per sample [N, K] (all samples when ``x`` is
        None): the model's concepts of an image, or of a video its pooled (video-level) concepts."""
        x = self.inputs if x is None else x
        return self.model.pooled_concepts(x) if self.is_video else self.model.concepts(x)

    # ------------------------------------------------------------------ what the person does
    def record_intervention(self, sample: str, values: dict[str, float], before: str, after: str) -> None:
        self.trail.append(TrailEntry("intervention", sample, {"values": values}, before, after))

    def apply_edit(self, concept: str, classes: list[str] | None, reason: str = "") -> Any:
        """Prune ``concept`` for ``classes`` (all when None); returns the edit record."""
        edited, record = self.model.edit("prune", concept, classes, validation=self.inputs, reason=reason)
        self.history.append(self.model)
        self.model = edited
        self.trail.append(TrailEntry("edit", "", asdict(record)))
        return record

    def undo(self) -> None:
        if not self.history:
            raise ValueError("there is no edit to undo.")
        self.model = self.history.pop()
        self.trail.append(TrailEntry("undo", "", {}))

    @property
    def folder(self) -> Path:
        """The folder of the opened model: a bare file name typed in the editor lands there."""
        return self.model_path.resolve().parent

    def user_path(self, text: str | Path) -> Path:
        """A path typed in the editor: a relative one is taken inside ``folder`` and may not climb out of it
        with ``..`` (a ValueError); an absolute one is the person's explicit choice."""
        if "\x00" in str(text) or not str(text).strip():
            raise ValueError("the file name is empty or holds a NUL character; type a file name.")
        typed = Path(text).expanduser()
        path = (self.folder / typed).resolve()
        if not typed.is_absolute() and not path.is_relative_to(self.folder):
            raise ValueError(f"{str(text)!r} leads outside the model's folder {self.folder}; give a file name inside "
                             "it, or an absolute path if you mean another folder.")
        return path

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the edited model as a new file (see ``user_path``); refuses to replace a file unless ``overwrite``."""
        path = self.user_path(path)
        if path.suffix == "":
            path = path.with_suffix(".cbm")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another name or tick 'replace it'.")
        if path.resolve() == self.model_path.resolve() and not overwrite:
            raise FileExistsError("that is the file this model was opened from; save it under a new name.")
        self.model.save(path)
        self.trail.append(TrailEntry("save", "", {"path": os.fspath(path)}))
        return path

    # ------------------------------------------------------------------ export
    def trail_json(self) -> str:
        return json.dumps([asdict(entry) for entry in self.trail], indent=2)

    def trail_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["time", "kind", "sample", "prediction_before", "prediction_after", "details"])
        for entry in self.trail:
            writer.writerow([f"{entry.time:.3f}", entry.kind, entry.sample, entry.prediction_before,
                             entry.prediction_after, json.dumps(entry.details)])
        return buffer.getvalue()
