"""Embedding extraction with a content-addressed, crash-safe disk cache.

``embed(backbone, dataset)`` runs the backbone once per (backbone fingerprint, dataset
fingerprint, storage dtype) and stores the features in shards under the cache directory::

    <cache_dir>/<key>/shard_00000.safetensors ...   one file per ``shard_size`` samples
    <cache_dir>/<key>/manifest.json                  written last: what the entry holds

Each shard is written to a temporary file and renamed into place (atomic), and carries a
checksum of its tensors in its metadata. On every read the checksum is verified: a truncated or
corrupted shard is logged and recomputed, never used. An interrupted run resumes from the shards
that were finished. Memory stays flat while extracting: only one shard is held before it is
written. Video windows (samples that are lists of frames) are embedded frame by frame and
averaged per window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cbm.backbones import Backbone
from cbm.data.base import ConceptDataset, ImageReadError, VideoWindowDataset, digest

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_SHARD_SIZE = 4096
StorageDtype = Literal["float32", "float16"]


def default_cache_dir() -> Path:
    """``$CBM_CACHE_DIR``, else ``~/.cache/cbm``; embeddings live in its ``embeddings/`` folder."""
    return Path(os.environ.get("CBM_CACHE_DIR", Path.home() / ".cache" / "cbm")).expanduser()


@dataclass
class Embeddings:
    """Features of a dataset under one backbone, aligned with ids and labels.

    ``meta`` holds per-sample arrays that some datasets add (for video windows: ``window_video``
    and ``window_spans``). ``skipped`` lists the ids of unreadable samples left out under
    ``on_error="skip"``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    class_names: list[str]
    backbone_spec: str
    backbone_fingerprint: str
    concept_names: list[str] | None = None
    concept_labels: torch.Tensor | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class _Preprocessed(Dataset):
    """Loads and preprocesses samples in DataLoader workers; ``None`` marks a skipped sample."""

    def __init__(self, dataset: ConceptDataset, backbone: Backbone) -> None:
        self.dataset, self.preprocess = dataset, backbone.preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            sample = self.dataset.load(index)
        except ImageReadError as error:
            if self.dataset.on_error != "skip":
                raise
            logger.warning("skipping sample %s: %s", self.dataset.ids[index], error)
            return index, None
        frames = sample if isinstance(sample, list) else [sample]
        if not frames:
            raise ImageReadError(f"sample {self.dataset.ids[index]} has no frames.")
        return index, torch.stack([self.preprocess(frame) for frame in frames])


def _collate(batch: list[tuple[int, torch.Tensor | None]]) -> tuple[list[int], list[int], torch.Tensor | None]:
    """Stack all frames of the readable samples; remember how many frames each one has."""
    kept = [(index, frames) for index, frames in batch if frames is not None]
    skipped = [index for index, frames in batch if frames is None]
    if not kept:
        return [], skipped, None
    indices = [index for index, _ in kept]
    counts = torch.tensor([frames.shape[0] for _, frames in kept])
    return indices, skipped, (torch.cat([frames for _, frames in kept]), counts)


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], skipped: list[int]) -> None:
    """Write a shard to a temporary file, fsync it, then rename it into place."""
    metadata = {"checksum": _tensor_checksum(tensors), "skipped": json.dumps(skipped), "format": str(CACHE_FORMAT)}
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_shard(path: Path, expected: range) -> tuple[dict[str, torch.Tensor], list[int]] | None:
    """A verified shard, or None when it is missing, truncated, corrupted or for other samples."""
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        skipped = json.loads(metadata.get("skipped", "[]"))
        ok = metadata.get("checksum") == _tensor_checksum(tensors)
        covered = sorted(tensors["index"].tolist() + skipped) == list(expected)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        logger.warning("cache shard %s is unreadable (%s); recomputing it", path, error)
        return None
    if not (ok and covered):
        logger.warning("cache shard %s failed verification; recomputing it", path)
        return None
    return tensors, skipped


def cache_key(backbone: Backbone, dataset: ConceptDataset, dtype: str, shard_size: int) -> str:
    """The cache entry name: backbone fingerprint + dataset fingerprint + storage settings."""
    return digest(CACHE_FORMAT, backbone.fingerprint, dataset.fingerprint(), dtype, shard_size)


def _encode_shards(backbone: Backbone, dataset: ConceptDataset, shards: list[range], batch_size: int,
                   num_workers: int, progress: tqdm) -> Iterator[tuple[int, dict[str, torch.Tensor], list[int]]]:
    """Encode the given shards with one DataLoader, yielding (shard number, tensors, skipped) as each completes.

    Batches never straddle two shards, so each shard can be written as soon as its last batch is done.
    """
    batches = [(number, list(indices[start:start + batch_size]))
               for number, indices in enumerate(shards) for start in range(0, len(indices), batch_size)]
    loader = DataLoader(_Preprocessed(dataset, backbone), batch_sampler=[indices for _, indices in batches],
                        num_workers=num_workers, collate_fn=_collate, pin_memory=backbone.device.type == "cuda")
    remaining = Counter(number for number, _ in batches)
    pending: dict[int, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for (number, _), (batch_indices, batch_skipped, stacked) in zip(batches, loader):
        kept, skipped, chunks = pending.setdefault(number, ([], [], []))
        skipped.extend(batch_skipped)
        if stacked is not None:
            frames, counts = stacked
            frame_features = backbone.encode_images(frames)
            owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
            sums = torch.zeros(len(counts), frame_features.shape[1]).index_add_(0, owner, frame_features)
            chunks.append(sums / counts[:, None])
            kept.extend(batch_indices)
        progress.update(len(batch_indices) + len(batch_skipped))
        remaining[number] -= 1
        if remaining[number] == 0:
            kept, skipped, chunks = pending.pop(number)
            features = torch.cat(chunks) if chunks else torch.empty(0, backbone.embed_dim)
            yield number, {"features": features, "index": torch.tensor(kept, dtype=torch.int64)}, skipped


def _default_workers() -> int:
    return min(4, max((os.cpu_count() or 1) - 1, 0))


def embed(backbone: Backbone, dataset: ConceptDataset, *, batch_size: int = 64,
          cache_dir: str | Path | None = None, num_workers: int | None = None, progress: bool = True,
          dtype: StorageDtype = "float32", shard_size: int = DEFAULT_SHARD_SIZE, cache: bool = True) -> Embeddings:
    """Embed every sample of ``dataset`` with ``backbone``, reusing and filling the disk cache.

    ``cache_dir`` defaults to ``default_cache_dir()``; ``cache=False`` computes without touching
    disk. ``dtype="float16"`` halves the storage (features are returned as float32 either way).
    ``num_workers`` defaults to the machine's cores minus one (at most 4).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive integers.")
    num_workers = _default_workers() if num_workers is None else num_workers
    total = len(dataset)
    shards = [range(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]
    entry = None
    if cache:
        entry = Path(cache_dir or default_cache_dir()).expanduser() / "embeddings" / cache_key(
            backbone, dataset, dtype, shard_size)
        entry.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    paths = [entry / f"shard_{number:05d}.safetensors" if entry else None for number in range(len(shards))]
    results = {number: found for number, (path, indices) in enumerate(zip(paths, shards))
               if path and (found := _read_shard(path, indices)) is not None}
    missing = [number for number in range(len(shards)) if number not in results]
    with tqdm(total=total, initial=total - sum(len(shards[n]) for n in missing), desc=f"embed {backbone.spec}",
              unit="sample", disable=not progress) as bar:
        encoded = _encode_shards(backbone, dataset, [shards[n] for n in missing], batch_size, num_workers, bar)
        for position, tensors, skipped in encoded:
            number = missing[position]
            tensors["features"] = tensors["features"].to(getattr(torch, dtype))
            if paths[number]:
                _write_shard(paths[number], tensors, skipped)
            results[number] = (tensors, skipped)
    if entry:
        _atomic_write_text(entry / "manifest.json", json.dumps({
            "format": CACHE_FORMAT, "backbone": backbone.spec, "backbone_fingerprint": backbone.fingerprint,
            "dataset": dataset.describe(), "dataset_fingerprint": dataset.fingerprint(), "samples": total,
            "shards": len(shards), "dtype": dtype, "embed_dim": backbone.embed_dim}, indent=2))
    logger.info("embedded %d samples with %s in %.1fs", total, backbone.spec, time.perf_counter() - started)
    return _assemble(backbone, dataset, [results[number] for number in range(len(shards))])


def _assemble(backbone: Backbone, dataset: ConceptDataset,
              results: list[tuple[dict[str, torch.Tensor], list[int]]]) -> Embeddings:
    """Concatenate shards into one Embeddings aligned with the kept samples."""
    index = torch.cat([tensors["index"] for tensors, _ in results]) if results else torch.empty(0, dtype=torch.int64)
    features = (torch.cat([tensors["features"].float() for tensors, _ in results]) if results
                else torch.empty(0, backbone.embed_dim))
    keep = index.numpy()
    concept_labels = None
    if dataset.concept_labels is not None:
        concept_labels = torch.as_tensor(np.asarray(dataset.concept_labels)[keep], dtype=torch.float32)
    meta = {}
    if isinstance(dataset, VideoWindowDataset):
        meta = {"window_video": np.asarray(dataset.window_video)[keep],
                "window_spans": np.asarray(dataset.window_spans)[keep]}
    return Embeddings(
        features=features,
        labels=torch.as_tensor(np.asarray(dataset.labels)[keep], dtype=torch.int64),
        ids=[dataset.ids[i] for i in keep],
        class_names=list(dataset.class_names),
        backbone_spec=backbone.spec,
        backbone_fingerprint=backbone.fingerprint,
        concept_names=list(dataset.concept_names) if dataset.concept_names else None,
        concept_labels=concept_labels,
        meta=meta,
        skipped=[dataset.ids[i] for _, skipped in results for i in skipped],
    )


def cache_entries(cache_dir: str | Path | None = None) -> list[dict]:
    """Describe every entry of the embedding cache (for ``cbm info``): manifest plus size on disk."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / "embeddings"
    entries = []
    for entry in sorted(root.glob("*")) if root.is_dir() else []:
        size = sum(path.stat().st_size for path in entry.glob("*") if path.is_file())
        manifest = entry / "manifest.json"
        info = json.loads(manifest.read_text()) if manifest.exists() else {"incomplete": True}
        entries.append({"key": entry.name, "bytes": size, **info})
    return entries
