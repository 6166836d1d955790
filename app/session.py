"""The editor's session: which model and data are open, what the person changed, and the audit trail.

Nothing here computes a prediction or changes a weight by itself: every number comes from the
public API of ``cbm`` (and ``explain``). The session keeps what the person did (interventions per
sample, edits, the audit trail) so it can be shown, undone, exported and saved, and it keeps the
model's outputs on the data once per model version, so that a rerun recomputes only what changed.

One browser session is one ``EditorSession``. The data, its embeddings and the model as loaded from
disk are shared between sessions (``OpenedData``, read-only); everything a person changes is theirs.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cbm.backbones import Backbone
from cbm.data.base import MAX_UPLOAD_BYTES, ConceptDataset, ImageReadError, digest, read_image_bytes
from cbm.data.registry import load_dataset
from cbm.data.toy import VIDEO_CLASS_NAMES
from cbm.embed import Embeddings, cache_secret, default_cache_dir, embed, keyed_checksum
from cbm.files import atomic_path
from cbm.models import ConceptBottleneckModel, TemporalCBM, VideoSequences, load, sequences_from_windows
from cbm.models.bundle import tensor_digest
from cbm.untrusted import for_csv

logger = logging.getLogger(__name__)

DEFAULT_DATA = "toy:images@val"
DEFAULT_VIDEO_DATA = "toy:videos@val"
UPLOAD_TYPES = ("png", "jpg", "jpeg", "bmp", "webp")
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
PRUNE_ACTIONS = ("prune", "prune_normalize")
OUTPUTS_FORMAT = 1


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
        from cbm.models import PosthocCBM
        from cbm.toy import toy_embeddings, toy_text_bank

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


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(modification time in ns, size) of a file: a changed file on disk is opened afresh."""
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


# ---------------------------------------------------------------------------------------------------- outputs
class ModelOutputs:
    """One model version's outputs on the session's data, each computed on first use and then kept:
    class probabilities [N, C] and the concept values the sliders start from [N, K]."""

    def __init__(self, model: ConceptBottleneckModel, inputs: Embeddings | VideoSequences, labels: torch.Tensor,
                 store: Path | None = None) -> None:
        self.model = model
        self.inputs = inputs
        self.labels = labels
        self.store = store  # where these outputs are kept between runs (see OpenedData.open); None: nowhere
        self._probabilities: torch.Tensor | None = None
        self._concepts: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether the outputs are computed (the first use runs the model on every sample)."""
        return self._probabilities is not None

    @property
    def probabilities(self) -> torch.Tensor:
        if self._probabilities is None:
            self._compute()
        return self._probabilities

    def _compute(self) -> None:
        """Probabilities and concepts of every sample: one pass of an image model (``intervention(x, {})``), or
        what an earlier run stored for the same model file and data."""
        if self.store is not None and self._load():
            return
        model = self.model
        if isinstance(model, TemporalCBM):
            self._probabilities = torch.as_tensor(model.predict_proba(self.inputs)).float()
            self._concepts = model.pooled_concepts(self.inputs).float()
        else:
            logits, concepts = model.intervention(self.inputs, {})
            self._probabilities, self._concepts = torch.softmax(logits, dim=1).float(), concepts.float()
        if self.store is not None:
            self._save()

    def _checksum(self, tensors: dict[str, torch.Tensor], secret: bytes | None) -> str:
        """Checksum of stored outputs, tied to the file's name (its key) and keyed like the embedding cache."""
        payload = json.dumps([OUTPUTS_FORMAT, self.store.name, tensor_digest(tensors)]).encode()
        return keyed_checksum(payload, secret)

    def _save(self) -> None:
        tensors = {"probabilities": self._probabilities.contiguous(), "concepts": self._concepts.contiguous()}
        secret = cache_secret()
        metadata = {"format": str(OUTPUTS_FORMAT), "auth": "hmac-sha256" if secret else "sha256",
                    "checksum": self._checksum(tensors, secret)}
        try:
            with atomic_path(self.store) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
        except OSError as error:  # a read-only or full cache costs the next run time, nothing else
            logger.warning("could not keep the model's outputs in %s (%s)", self.store, error)

    def _load(self) -> bool:
        """Use stored outputs when their checksum holds and their shapes fit the model and data; anything else
        is recomputed (never trusted)."""
        if not self.store.exists():
            return False
        secret = cache_secret()
        try:
            with safe_open(str(self.store), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            logger.warning("stored outputs %s are unreadable (%s); recomputing them", self.store, error)
            return False
        expected = {"probabilities": (len(self.labels), len(self.model.class_names)),
                    "concepts": (len(self.labels), len(self.model.concept_names))}
        checksum = metadata.get("checksum")
        if not (isinstance(checksum, str) and hmac.compare_digest(checksum, self._checksum(tensors, secret))):
            logger.warning("stored outputs %s fail their checksum (damaged, or written under another key); "
                           "recomputing them", self.store)
            return False
        if set(tensors) != set(expected) or any(tuple(tensors[n].shape) != shape or not tensors[n].isfinite().all()
                                                for n, shape in expected.items()):
            logger.warning("stored outputs %s do not fit this model and data; recomputing them", self.store)
            return False
        self._probabilities, self._concepts = tensors["probabilities"], tensors["concepts"]
        return True

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(1)

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.labels

    @property
    def accuracy(self) -> float:
        """Accuracy on the session's data (the same number as ``model.score``)."""
        return float(self.correct.double().mean())

    @property
    def concepts(self) -> torch.Tensor:
        """The model's concepts of every sample (of a video: its pooled, video-level concepts)."""
        if self._concepts is None:
            self._compute()
        return self._concepts

    def class_accuracy(self) -> np.ndarray:
        """Accuracy per class [C] (NaN for a class without samples)."""
        classes = len(self.model.class_names)
        total = torch.bincount(self.labels, minlength=classes).float()
        right = torch.bincount(self.labels[self.correct], minlength=classes).float()
        return (right / total).numpy()


# ---------------------------------------------------------------------------------------------------- outcomes
@dataclass
class InterventionOutcome:
    """What the corrected concepts do to one sample, all from the model itself: class probabilities before and
    after; the concepts the head reads after (for energy models the others respond); per-concept contributions
    to the class ``shown`` before and after (None for video models); and how much each corrected concept alone
    moves the margin between the new class and the old one (``drivers``, in logits; ``margin`` is the whole
    change, ``interaction`` what the concepts alone do not account for)."""

    before: torch.Tensor  # [C]
    after: torch.Tensor  # [C]
    concepts_before: torch.Tensor | None  # [K] (None for video models)
    concepts_after: torch.Tensor | None
    drivers: dict[str, float]
    margin: float
    rival: int
    contributions_before: torch.Tensor | None = None  # [K], to the class shown
    contributions_after: torch.Tensor | None = None

    @property
    def predicted_before(self) -> int:
        return int(self.before.argmax())

    @property
    def predicted_after(self) -> int:
        return int(self.after.argmax())

    @property
    def shown(self) -> int:
        """The class whose contributions and margin are shown: the new prediction."""
        return self.predicted_after

    @property
    def interaction(self) -> float:
        return self.margin - sum(self.drivers.values())


def intervention_outcome(model: ConceptBottleneckModel, features: torch.Tensor | VideoSequences,
                         changed: dict[str, float]) -> InterventionOutcome:
    """The editor's recomputation after a slider moves, on the cached embedding [1, D] (or one video's cached
    window embeddings, where ``model.intervene`` sets each value in every window).

    The drivers measure the margin that decides between classes: logit(new) - logit(old) when the prediction
    changed, else logit(predicted) - logit(its closest rival after the change). An image model runs once, on
    a batch of the sample before, with every correction, and with each correction alone."""
    names = list(changed)
    alone = names if len(names) > 1 else []  # with one correction, it alone is the whole change
    if isinstance(model, TemporalCBM):
        logits = torch.cat([model.decision_function(features), model.intervene(features, changed),
                            *(model.intervene(features, {name: changed[name]}) for name in alone)])
        concepts = (None, None)  # a video's concepts are per window: none is read as one vector
    else:
        columns = [model.concept_index(name) for name in names]
        rows = 2 + len(alone)
        mask = torch.zeros(rows, len(model.concept_names), dtype=torch.bool)
        values = torch.zeros(mask.shape)
        for row, chosen in enumerate([[], columns, *([c] for c in columns[:len(alone)])]):
            mask[row, chosen] = True
            values[row, chosen] = torch.tensor([changed[model.concept_names[c]] for c in chosen])
        logits, concepts = model.intervention(features.expand(rows, -1), (mask, values))
    old, new = int(logits[0].argmax()), int(logits[1].argmax())
    if new != old:
        rival = old
    else:
        others = logits[1].clone()
        others[new] = -float("inf")
        rival = int(others.argmax())
    margins = logits[:, new] - logits[:, rival]
    margin = float(margins[1] - margins[0])
    drivers = {name: float(margins[2 + i] - margins[0]) for i, name in enumerate(alone)} or {names[0]: margin}
    contributions = (None, None) if isinstance(model, TemporalCBM) else tuple(
        model.contributions(features.expand(2, -1), concepts[:2])[:, new])
    return InterventionOutcome(torch.softmax(logits[0], 0), torch.softmax(logits[1], 0), concepts[0], concepts[1],
                               drivers, margin, rival, *contributions)


@dataclass
class EditPreview:
    """What an edit would do before it is applied: the edited copy and its record, accuracy on the session's
    data before and after, per class, and the samples whose prediction it flips."""

    concept: str
    classes: list[str] | None  # None: all classes
    already: list[str]  # classes for which the concept is pruned already (left out of the edit)
    edited: ConceptBottleneckModel | None
    record: Any
    before: ModelOutputs
    after: ModelOutputs | None

    @property
    def flipped(self) -> list[int]:
        """Indices of the samples whose predicted class the edit changes."""
        if self.after is None:
            return []
        return torch.nonzero(self.before.predicted != self.after.predicted).flatten().tolist()

    @property
    def target(self) -> str:
        return "all classes" if self.classes is None else ", ".join(self.classes)


# ---------------------------------------------------------------------------------------------------- trail
def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass
class TrailEntry:
    """One thing the person did: an intervention, an edit, an undo, a save or a discard. ``details`` is one
    readable line; accuracies are on the session's data (edits, undos) and predictions are class names."""

    kind: str
    details: str
    sample: str = ""
    prediction_before: str = ""
    prediction_after: str = ""
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    time: str = field(default_factory=_now)


TRAIL_FIELDS = ["time", "kind", "sample", "details", "prediction_before", "prediction_after", "accuracy_before",
                "accuracy_after"]


def describe_edit(record: Any) -> str:
    """One line for an edit record: action, concept, classes (the first four), reason."""
    classes = list(record.classes)
    shown = ", ".join(map(repr, classes[:4])) + (f" and {len(classes) - 4} more" if len(classes) > 4 else "")
    return f"{record.action} {record.concept!r} for {shown}" + (f"; reason: {record.reason}" if record.reason else "")


def pruned_classes(model: ConceptBottleneckModel, concept: str) -> set[str]:
    """The classes for which the model's edit history has ``concept`` pruned (a later edit of the same
    concept and class, such as a restore or a set weight, undoes that)."""
    pruned: set[str] = set()
    for record in getattr(model, "edits_", []):
        if record.concept != concept:
            continue
        if record.action in PRUNE_ACTIONS:
            pruned.update(record.classes)
        else:
            pruned.difference_update(record.classes)
    return pruned


_SHARED: dict[tuple, tuple[tuple[int, int] | None, OpenedData]] = {}
_SHARED_LOCK = threading.Lock()


def shared_data(model_path: str | None, data_spec: str | None) -> OpenedData:
    """The ``OpenedData`` every browser session of this server process shares: opened once per version of the
    model file (its modification time and size; a changed file is opened afresh and replaces the old version,
    which only the sessions already on it keep) and data spec. ``cbm app`` opens it as the server starts
    (``app.server``), so the first page does not wait for it."""
    stamp = file_stamp(model_path) if model_path else None
    with _SHARED_LOCK:
        kept = _SHARED.get((model_path, data_spec))
        if kept is None or kept[0] != stamp:
            kept = _SHARED[(model_path, data_spec)] = stamp, OpenedData.open(model_path, data_spec)
        return kept[1]


# ---------------------------------------------------------------------------------------------------- the data
class RecordedBackbone:
    """The model's backbone as its bundle records it (spec, fingerprint, width), loaded on first real use.

    Embeddings found in the cache need only that record, so opening a model whose data is cached loads no
    weights (toy CLIP: 4.6 s of the first render); an upload, or a sample missing from the cache, loads the
    backbone and checks its fingerprint against the record (``model.load_backbone``)."""

    def __init__(self, model: ConceptBottleneckModel) -> None:
        self._model, self._loaded = model, None
        self.spec, self.fingerprint = model.backbone_spec_, model.backbone_fingerprint_
        self.embed_dim, self.device = model.n_features_in_, torch.device("cpu")

    def __getattr__(self, name: str) -> Any:  # only for what the record lacks
        if name.startswith("_"):
            raise AttributeError(name)
        if self._loaded is None:
            self._loaded = self._model.load_backbone()
        return getattr(self._loaded, name)


@dataclass
class OpenedData:
    """What every browser session on the same file and data shares, read-only: the model as loaded from disk,
    the dataset, its embeddings (or video sequences), the backbone, and that model's outputs."""

    model_path: Path
    data_spec: str
    model: ConceptBottleneckModel
    dataset: ConceptDataset
    embeddings: Embeddings
    backbone: Backbone | RecordedBackbone
    sequences: VideoSequences | None = None
    outputs: ModelOutputs | None = None
    _thumbnails: dict[int, Image.Image] = field(default_factory=dict, repr=False)
    _thumbnail_png: dict[int, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model_path: str | Path | None = None, data_spec: str | None = None,
             cache_dir: str | Path | None = None) -> OpenedData:
        """Open a bundle (default: the toy demo model) and embed its data (default: ``default_data``) through
        the cache; a video model's windows are regrouped into videos."""
        path = Path(model_path) if model_path else default_model_path(cache_dir)
        model = load(path)
        spec = data_spec or default_data(model)
        backbone = RecordedBackbone(model)
        dataset = load_dataset(spec)
        embeddings = embed(backbone, dataset, cache_dir=cache_dir, progress=False, num_workers=0)
        sequences = sequences_from_windows(embeddings) if isinstance(model, TemporalCBM) else None
        opened = cls(path, spec, model, dataset, embeddings, backbone, sequences)
        # the file's outputs on this data are kept on disk: an energy model takes a minute to score 1,000 samples
        key = digest(OUTPUTS_FORMAT, hashlib.sha256(path.read_bytes()).hexdigest(), dataset.fingerprint())
        store = Path(cache_dir or default_cache_dir()).expanduser() / "editor-outputs" / f"{key}.safetensors"
        opened.outputs = ModelOutputs(model, opened.inputs, opened.labels, store)
        return opened

    @property
    def inputs(self) -> Embeddings | VideoSequences:
        """Every sample as the model reads it: the embeddings, or the videos' window sequences."""
        return self.embeddings if self.sequences is None else self.sequences

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.inputs.labels).long()

    def thumbnail(self, i: int) -> Image.Image:
        """The image of sample ``i``; for a video the frame of its middle window (see ``video_frames``)."""
        if i not in self._thumbnails:
            if self.sequences is None:
                self._thumbnails[i] = self.dataset.load(i)
            else:
                windows = self._windows(i)
                self._thumbnails[i] = self._window_frame(windows[len(windows) // 2])
        return self._thumbnails[i]

    def thumbnail_png(self, i: int, size: int = 144) -> bytes:
        """Sample ``i``'s thumbnail as PNG bytes at most ``size`` pixels wide, encoded once (the grid redraws it)."""
        if i not in self._thumbnail_png:
            image = self.thumbnail(i).copy()
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._thumbnail_png[i] = buffer.getvalue()
        return self._thumbnail_png[i]

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


@dataclass
class EditorSession:
    """One person's session on an open model and its data: the model version they see (edits make new
    versions), the versions before it (undo), their interventions per sample, and their audit trail.

    A sample is an image, or for a video model (``TemporalCBM``) a whole video: sample ``i`` is then video ``i``.
    """

    data: OpenedData
    model: ConceptBottleneckModel
    history: list[ConceptBottleneckModel] = field(default_factory=list)
    trail: list[TrailEntry] = field(default_factory=list)
    interventions: dict[str, dict[str, float]] = field(default_factory=dict)
    _outputs: dict[int, ModelOutputs] = field(default_factory=dict, repr=False)
    _memo: dict[tuple, Any] = field(default_factory=dict, repr=False)
    _versions: dict[int, ConceptBottleneckModel] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model_path: str | Path | None = None, data_spec: str | None = None,
             cache_dir: str | Path | None = None) -> EditorSession:
        """A session on a freshly opened model and data (see ``OpenedData.open``)."""
        return cls.on(OpenedData.open(model_path, data_spec, cache_dir))

    @classmethod
    def on(cls, data: OpenedData) -> EditorSession:
        """A new session on shared ``data``, starting from the model as loaded (its outputs shared too)."""
        shared = {} if data.outputs is None else {id(data.model): data.outputs}
        return cls(data, data.model, _outputs=shared, _versions={id(data.model): data.model})

    def _version(self, model: ConceptBottleneckModel) -> int:
        """A key for a model version; every version seen is kept alive, so a key is never reused."""
        self._versions[id(model)] = model
        return id(model)

    # ------------------------------------------------------------------ the samples
    model_path = property(lambda self: self.data.model_path)
    data_spec = property(lambda self: self.data.data_spec)
    dataset = property(lambda self: self.data.dataset)
    embeddings = property(lambda self: self.data.embeddings)
    backbone = property(lambda self: self.data.backbone)
    sequences = property(lambda self: self.data.sequences)
    inputs = property(lambda self: self.data.inputs)
    labels = property(lambda self: self.data.labels)

    @property
    def is_video(self) -> bool:
        return self.sequences is not None

    @property
    def sample_ids(self) -> list[str]:
        return list(self.embeddings.ids if self.sequences is None else self.sequences.video_ids)

    def sample(self, i: int) -> torch.Tensor | VideoSequences:
        """Sample ``i`` as the model reads it: its embedding [1, D], or video ``i``'s window sequence."""
        return self.embeddings.features[i:i + 1] if self.sequences is None else self.sequences.subset([i])

    # ------------------------------------------------------------------ the model's view of the data
    def outputs(self, model: ConceptBottleneckModel | None = None) -> ModelOutputs:
        """The outputs of ``model`` (default: the current version) on the data, computed once per version."""
        model = self.model if model is None else model
        key = self._version(model)
        if key not in self._outputs:
            self._outputs[key] = ModelOutputs(model, self.inputs, self.labels)
        return self._outputs[key]

    def validation_accuracy(self) -> float:
        return self.outputs().accuracy

    def before(self, name: str, features: torch.Tensor | VideoSequences,
               index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities [C], concepts [K]) of sample ``name`` before any correction: from the outputs on
        the data for sample ``index``, else (an upload) from one pass of the model, kept."""
        if index is not None:
            return self.outputs().probabilities[index], self.outputs().concepts[index]

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            logits, concepts = self.model.intervention(features, {})
            return torch.softmax(logits[0], 0), concepts[0]
        return self.memo(("before", name), compute)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` for the current model version and ``key``, computed once (explanations of a sample)."""
        full = (self._version(self.model), *key)
        if full not in self._memo:
            self._memo[full] = compute()
        return self._memo[full]

    def forget(self, name: str) -> None:
        """Drop everything kept for sample ``name`` (a new upload under the same file name)."""
        self.interventions.pop(name, None)
        for key in [key for key in self._memo if name in key[1:]]:
            del self._memo[key]

    def concept_range(self, k: int) -> tuple[float, float]:
        """A slider's range for concept ``k``: the values it takes on the data and its "low"/"high" references."""
        values = self.outputs().concepts[:, k]
        references = [v for v in self.references(self.model.concept_names[k]) if v is not None]
        return min([float(values.min()), *references]), max([float(values.max()), *references])

    def references(self, concept: str) -> tuple[float | None, float | None]:
        """The typical value of ``concept`` when absent and when present: the "low"/"high" references that
        ``intervene`` uses (None where the family has none)."""
        def reference(which: str) -> float | None:
            try:
                return float(self.model.concept_reference(concept, which))
            except ValueError:
                return None
        return self.memo(("references", concept), lambda: (reference("low"), reference("high")))

    # ------------------------------------------------------------------ interventions
    def intervention(self, name: str) -> dict[str, float]:
        """The concept values this person set on sample ``name`` (empty: none)."""
        return self.interventions.setdefault(name, {})

    def set_concept(self, name: str, concept: str, value: float, current: float) -> None:
        """Set ``concept`` of sample ``name`` to ``value``; setting it back to the model's ``current`` value
        removes the correction."""
        values = self.intervention(name)
        if abs(value - current) <= 1e-9:
            values.pop(concept, None)
        else:
            values[concept] = float(value)

    def reset(self, name: str, concept: str | None = None) -> None:
        """Forget the correction of ``concept`` on sample ``name`` (all of them when None)."""
        if concept is None:
            self.interventions.pop(name, None)
        else:
            self.intervention(name).pop(concept, None)

    def outcome(self, name: str, features: torch.Tensor | VideoSequences) -> InterventionOutcome | None:
        """The outcome of the current corrections on sample ``name`` (None without any), computed once."""
        changed = self.intervention(name)
        if not changed:
            return None
        key = ("outcome", name, tuple(sorted(changed.items())))
        return self.memo(key, lambda: intervention_outcome(self.model, features, dict(changed)))

    def record_intervention(self, name: str, outcome: InterventionOutcome, values: dict[str, float]) -> TrailEntry:
        names = self.model.class_names
        details = ", ".join(f"{concept} = {value:.3g}" for concept, value in values.items())
        entry = TrailEntry("intervention", f"set {details}", name, names[outcome.predicted_before],
                           names[outcome.predicted_after])
        self.trail.append(entry)
        return entry

    # ------------------------------------------------------------------ editing the model
    def preview_edit(self, concept: str, classes: list[str] | None) -> EditPreview:
        """What pruning ``concept`` for ``classes`` (all when None) would do, computed once per version; classes
        for which it is pruned already are left out (``already``; no edit when nothing is left)."""
        def compute() -> EditPreview:
            targets = list(self.model.class_names) if classes is None else list(classes)
            already = pruned_classes(self.model, concept)
            remaining = [c for c in targets if c not in already]
            before = self.outputs()
            if not remaining:
                return EditPreview(concept, classes, sorted(already & set(targets)), None, None, before, None)
            edited, record = self.model.edit("prune", concept, None if remaining == targets and classes is None
                                             else remaining)
            return EditPreview(concept, classes, [c for c in targets if c in already], edited, record, before,
                               self.outputs(edited))
        return self.memo(("preview", concept, None if classes is None else tuple(classes)), compute)

    def apply_edit(self, concept: str, classes: list[str] | None, reason: str = "") -> EditPreview:
        """Apply the previewed prune (see ``preview_edit``); a ValueError when it is pruned there already."""
        preview = self.preview_edit(concept, classes)
        if preview.edited is None:
            raise ValueError(f"{concept!r} is already pruned for {preview.target}; nothing to do.")
        preview.record.reason = reason
        preview.record.before = {"val_accuracy": preview.before.accuracy}
        preview.record.after = {"val_accuracy": preview.after.accuracy}
        self.history.append(self.model)
        self.model = preview.edited
        self.interventions.clear()
        self.trail.append(TrailEntry("edit", describe_edit(preview.record), accuracy_before=preview.before.accuracy,
                                     accuracy_after=preview.after.accuracy))
        return preview

    def undo(self) -> None:
        """Go back to the version before the last edit."""
        if not self.history:
            raise ValueError("there is no edit to undo.")
        before = self.outputs().accuracy
        undone = describe_edit(self.model.edits_[-1]) if self.model.edits_ else "the last edit"
        self.model = self.history.pop()
        self.interventions.clear()
        self.trail.append(TrailEntry("undo", f"undo {undone}", accuracy_before=before,
                                     accuracy_after=self.outputs().accuracy))

    def discard(self) -> None:
        """Throw away this session's edits and interventions and reload the model from its file (which another
        session may have saved since)."""
        model = load(self.model_path)
        before = self.outputs().accuracy
        self.history.clear()
        self.interventions.clear()
        self.model = model
        self.trail.append(TrailEntry("discard", f"discarded this session's edits; reloaded {self.model_path.name}",
                                     accuracy_before=before, accuracy_after=self.outputs().accuracy))

    # ------------------------------------------------------------------ saving
    @property
    def folder(self) -> Path:
        """The folder of the opened model: a bare file name typed in the editor lands there."""
        return self.model_path.resolve().parent

    def user_path(self, text: str | Path) -> Path:
        """A path typed in the editor: a relative one is taken inside ``folder`` and may not climb out of it
        with ``..`` (a ValueError); an absolute one is the person's explicit choice."""
        if "\x00" in str(text) or not str(text).strip() or str(text).strip() in (".", ".."):
            raise ValueError("the file name is empty, '.', '..' or holds a NUL character; type a file name.")
        typed = Path(text).expanduser()
        path = (self.folder / typed).resolve()
        if not typed.is_absolute() and not path.is_relative_to(self.folder):
            raise ValueError(f"{str(text)!r} leads outside the model's folder {self.folder}; give a file name inside "
                             "it, or an absolute path if you mean another folder.")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; type a file name.")
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
        self.trail.append(TrailEntry("save", f"saved the model with {len(self.model.edits_)} edit(s) to "
                                     f"{os.fspath(path)}"))
        return path

    # ------------------------------------------------------------------ export
    def trail_rows(self) -> list[dict[str, Any]]:
        """The trail as rows of ``TRAIL_FIELDS`` (the table, the JSON and the CSV show the same fields)."""
        return [{name: row[name] for name in TRAIL_FIELDS} for row in map(asdict, self.trail)]

    def trail_json(self) -> str:
        return json.dumps(self.trail_rows(), indent=2)

    def trail_csv(self) -> str:
        """The trail as CSV; cells that a spreadsheet would run as formulas are neutralised."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(TRAIL_FIELDS)
        for row in self.trail_rows():
            writer.writerow(["" if row[name] is None else for_csv(row[name]) for name in TRAIL_FIELDS])
        return buffer.getvalue()
