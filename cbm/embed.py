"""Embedding extraction with a content-addressed, crash-safe disk cache.

``embed(backbone, dataset)`` runs the backbone once per (backbone fingerprint, dataset
fingerprint, storage dtype) and stores the features in shards under the cache directory::

    <cache_dir>/<key>/shard_00000.safetensors ...   one file per ``shard_size`` samples
    <cache_dir>/<key>/manifest.json                  written last: what the entry holds

Each shard is written to a temporary file and renamed into place (atomic). Its metadata carries a
checksum that binds its tensors to its entry (the folder), its position, its sample ids and its
list of skipped samples: SHA-256, or HMAC-SHA256 under ``$CBM_CACHE_KEY`` for a cache that others
can write. Before use a shard is checked: its checksum; its content (a float32/float16 feature
matrix of finite values, indices and skipped samples that cover its range exactly once); then
against the run (its sample ids, feature width = ``embed_dim``, storage dtype, skipped samples
only under ``on_error="skip"`` and only ones that still fail to load). A shard that is damaged or
stale (made for other samples or settings) is logged and recomputed; one that passes its checksum
with invalid content, or whose keyed checksum fails or is missing while a key is set, is forged or
foreign: a ``CacheError`` refuses it. A corrupt ``manifest.json`` is a ``CacheError`` naming the
file. An interrupted run resumes from the shards that were finished. Memory stays flat while
extracting: besides the result, only one shard is held before it is written. Video windows
(samples that are lists of frames) are embedded frame by frame and averaged per window.

Faults: a killed run leaves at most a temporary file (removed by a later run once it is an hour
old), never a shard under its final name; concurrent processes filling one entry each write whole
shards (the last rename wins, both are valid); a full disk raises an ``OSError`` (ENOSPC) that
names the cache and leaves no partial shard.

Distributed: when a ``torch.distributed`` process group is initialised, or the environment comes
from ``torchrun`` (``WORLD_SIZE`` > 1; the group is then initialised here: NCCL for a CUDA
backbone, gloo otherwise), every rank must call ``embed`` with the same arguments. The ranks agree
on the shards the cache lacks, each embeds every ``world_size``-th of them into the shared cache,
and after all have finished each rank reads the others' shards back, so all return the same
``Embeddings`` as a single process would. The cache directory must be one filesystem seen by all
ranks (on several machines: a shared mount).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cbm.backbones import Backbone
from cbm.data.base import ConceptDataset, ImageReadError, VideoWindowDataset, digest
from cbm.files import atomic_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: shards bound to their entry, position and ids; optional keyed checksums
CACHE_KEY_ENV = "CBM_CACHE_KEY"
MIN_KEY_CHARACTERS = 16
DEFAULT_SHARD_SIZE = 4096
STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old belongs to a dead writer (a write takes seconds)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
StorageDtype = Literal["float32", "float16"]


class CacheError(ValueError):
    """A cache shard or manifest that was forged, altered, or written under another key: refused, never used."""


def cache_secret() -> bytes | None:
    """The key of the cache's keyed checksums (``$CBM_CACHE_KEY``, UTF-8), or None when it is not set.

    An empty or short key is an error rather than a weak checksum: a typo such as ``CBM_CACHE_KEY=$UNSET``
    must not silently turn the protection off.
    """
    value = os.environ.get(CACHE_KEY_ENV)
    if value is None:
        return None
    if len(value) < MIN_KEY_CHARACTERS:
        raise ValueError(f"{CACHE_KEY_ENV} is set but has {len(value)} characters; use a secret of at least "
                         f"{MIN_KEY_CHARACTERS} (python -c 'import secrets; print(secrets.token_hex(16))'), or unset "
                         "it for unkeyed checksums.")
    return value.encode()


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

    def subset(self, rows: Sequence[int] | np.ndarray | torch.Tensor | slice) -> Embeddings:
        """The samples ``rows`` (indices or a slice), every per-sample field kept aligned."""
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if index.ndim != 1 or (len(index) and (index.min() < -len(self) or index.max() >= len(self))):
            raise IndexError(f"rows must be a 1-d list of sample indices in [0, {len(self)}).")
        tensor_index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, features=self.features[tensor_index], labels=self.labels[tensor_index],
                       ids=[self.ids[i] for i in index], meta={key: value[index] for key, value in self.meta.items()},
                       concept_labels=None if self.concept_labels is None else self.concept_labels[tensor_index])


def match_classes(data: Embeddings, class_names: Sequence[str]) -> Embeddings:
    """``data`` with its labels renumbered into the order of ``class_names`` (a model's classes), matched by
    name, so data holding some of the model's classes, or the same ones in another order, is scored against
    the right classes. Data without class names is returned as is (positional); a ValueError names the
    data's classes that ``class_names`` lacks."""
    names, known = list(data.class_names or []), list(class_names)
    if not names or names == known:
        return data
    labels = torch.as_tensor(data.labels).long()
    used = sorted(set(labels[labels >= 0].tolist()))
    if used and used[-1] >= len(names):
        raise ValueError(f"labels go up to {used[-1]} but the data names only {len(names)} classes.")
    index = {name: i for i, name in enumerate(known)}
    unknown = [names[i] for i in used if names[i] not in index]
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {', '.join(unknown[:10])}"
                         f"{' ...' if len(unknown) > 10 else ''} (the model's classes: {', '.join(known[:10])}"
                         f"{' ...' if len(known) > 10 else ''}).")
    lookup = torch.tensor([index.get(name, -1) for name in names], dtype=torch.long)
    remapped = torch.where(labels >= 0, lookup[labels.clamp_min(0)], labels)
    return replace(data, labels=remapped.to(torch.as_tensor(data.labels).dtype), class_names=known)


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


def _ids_digest(ids: Sequence[str]) -> str:
    return digest("ids", list(ids))


def keyed_checksum(payload: bytes, secret: bytes | None) -> str:
    """SHA-256 of ``payload``, HMAC-SHA256 under ``secret`` when one is set (``cache_secret()``)."""
    return (hmac.new(secret, payload, hashlib.sha256) if secret else hashlib.sha256(payload)).hexdigest()


def _shard_checksum(entry: str, start: int, metadata: dict[str, str], tensors: dict[str, torch.Tensor],
                    secret: bytes | None) -> str:
    """The checksum of a shard at position ``start`` of the entry folder ``entry``: its declared range end, ids,
    skipped samples and checksum kind, and its tensors; keyed (HMAC-SHA256) when ``secret`` is given.

    Entry and position come from where the shard lies, not from the file, so a shard copied to another
    entry or position fails it."""
    # cbm.models imports this module, so bundle's tensor digest is imported on use
    from cbm.models.bundle import tensor_digest

    declared = [metadata.get(name) for name in ("stop", "ids_sha256", "skipped", "auth")]
    payload = json.dumps([CACHE_FORMAT, entry, start, *declared, tensor_digest(tensors)]).encode()
    return keyed_checksum(payload, secret)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[str]:
    """``cbm.files.atomic_path`` with an fsync, and a full disk turned into an ``OSError`` (errno kept) that
    says which cache and what to do."""
    try:
        with atomic_path(path, fsync=True) as tmp:
            yield str(tmp)
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        raise OSError(error.errno, f"no space left for the embedding cache in {path.parent.parent} "
                                   f"({os.strerror(error.errno)}); free space there, point CBM_CACHE_DIR "
                                   "(--cache-dir) at a larger disk, or embed without the cache (cache=False)",
                      str(path)) from error


def _atomic_write_text(path: Path, text: str) -> None:
    with _atomic_file(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], skipped: list[int], samples: range,
                 ids_sha256: str) -> None:
    """Write a shard with its checksum atomically (temporary file, fsync, rename)."""
    secret = cache_secret()
    metadata = {"format": str(CACHE_FORMAT), "entry": path.parent.name, "start": str(samples.start),
                "stop": str(samples.stop), "ids_sha256": ids_sha256, "skipped": json.dumps(sorted(skipped)),
                "auth": "hmac-sha256" if secret else "sha256"}
    metadata["checksum"] = _shard_checksum(path.parent.name, samples.start, metadata, tensors, secret)
    with _atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _remove_stale_temporaries(entry: Path) -> None:
    """Delete temporary files that killed writers left behind (old enough that no live writer owns them)."""
    now = time.time()
    for tmp in entry.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink()
                logger.info("removed %s, left by an interrupted writer", tmp)


class _Shard(NamedTuple):
    """A shard that passed its checksum and content checks."""

    tensors: dict[str, torch.Tensor]
    skipped: list[int]
    ids_sha256: str


def _malformed(tensors: dict[str, torch.Tensor], metadata: dict[str, str], start: int) -> str | None:
    """What is wrong with the content of a shard that passed its checksum (None when nothing is)."""
    features, index = tensors.get("features"), tensors.get("index")
    if set(tensors) != {"features", "index"} or not isinstance(metadata.get("ids_sha256"), str):
        return f"holds the tensors {sorted(tensors)} instead of features and index"
    if features.ndim != 2 or features.dtype not in (torch.float32, torch.float16):
        return f"its features are {features.dtype} of shape {tuple(features.shape)}, not a float32/float16 matrix"
    if index.ndim != 1 or index.dtype != torch.int64 or len(index) != len(features):
        return f"its index ({index.dtype}, shape {tuple(index.shape)}) does not list one sample per feature row"
    try:
        stop, skipped = int(metadata["stop"]), json.loads(metadata["skipped"])
    except (KeyError, ValueError, TypeError, RecursionError):
        return "its range end or list of skipped samples is unreadable"
    if not (isinstance(skipped, list) and all(type(number) is int for number in skipped)):
        return "its list of skipped samples is not a list of sample numbers"
    if len(index) + len(skipped) != stop - start or sorted(index.tolist() + skipped) != list(range(start, stop)):
        return f"its samples and skipped samples do not cover its range {start}..{stop - 1} exactly once"
    if not torch.isfinite(features).all():
        return "it holds NaN or infinite features"
    return None


def _read_shard(path: Path, expected: range) -> _Shard | None:
    """A shard whose checksum and content are valid; None when it is missing, unreadable, damaged (unkeyed) or
    made for a dataset of another length (recomputed); a CacheError when it is forged, altered under a key, or
    written with a key other than the one set."""
    if not path.exists():
        return None
    secret = cache_secret()
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        logger.warning("cache shard %s is unreadable (%s); recomputing it", path, error)
        return None
    keyed = metadata.get("auth") == "hmac-sha256"
    if keyed and secret is None:
        raise CacheError(f"cache shard {path} was written with a key ({CACHE_KEY_ENV}); set the same key to use "
                         f"it, or delete {path.parent} to rebuild the entry without one.")
    if secret is not None and not keyed:
        raise CacheError(f"cache shard {path} carries no keyed checksum, so anyone who can write the cache could "
                         f"have forged it, and {CACHE_KEY_ENV} is set: delete {path.parent} to rebuild the entry "
                         "with the key.")
    checksum = _shard_checksum(path.parent.name, expected.start, metadata, tensors, secret)
    if not hmac.compare_digest(str(metadata.get("checksum")).encode(), checksum.encode()):
        if secret is not None:
            raise CacheError(f"cache shard {path} fails its keyed checksum: it was altered, moved from another "
                             f"entry or position, or written with another {CACHE_KEY_ENV}; delete {path.parent} "
                             "and embed again.")
        logger.warning("cache shard %s fails its checksum (damaged, or copied from another entry or position); "
                       "recomputing it", path)
        return None
    problem = _malformed(tensors, metadata, expected.start)
    if problem:
        hint = "" if secret else f"; set {CACHE_KEY_ENV} if others can write the cache"
        raise CacheError(f"cache shard {path} passes its checksum but {problem}, so it was not written by this "
                         f"toolkit: delete {path.parent} and embed again{hint}.")
    if int(metadata["stop"]) != expected.stop:
        logger.warning("cache shard %s covers samples %d..%s but the dataset now ends at %d; recomputing it", path,
                       expected.start, int(metadata["stop"]) - 1, expected.stop - 1)
        return None
    return _Shard(tensors, json.loads(metadata["skipped"]), metadata["ids_sha256"])


def _shard_for_run(path: Path, samples: range, ids_sha256: str, dataset: ConceptDataset, embed_dim: int,
                   dtype: StorageDtype) -> _Shard | None:
    """``_read_shard``, then checked against this run; None (recompute) when the shard is stale: made for other
    sample ids (a dataset whose fingerprint missed a change), another feature width (likewise a backbone) or
    storage dtype, or with skipped samples while this run raises on them or one of them now loads."""
    found = _read_shard(path, samples)
    if found is None:
        return None
    features = found.tensors["features"]
    stale = None
    if found.ids_sha256 != ids_sha256:
        stale = "it holds other sample ids than the dataset"
    elif features.shape[1] != embed_dim:
        stale = f"its features have {features.shape[1]} dimensions, the backbone's {embed_dim}"
    elif features.dtype != getattr(torch, dtype):
        stale = f"it stores {features.dtype}, not {dtype}"
    elif found.skipped and dataset.on_error != "skip":
        stale = 'it leaves out unreadable samples, but on_error="raise" stops at them'
    else:
        loading = next((number for number in found.skipped if _loads(dataset, number)), None)
        if loading is not None:
            stale = f"sample {dataset.ids[loading]!r}, skipped there as unreadable, loads now"
    if stale:
        logger.warning("cache shard %s does not fit this run (%s); recomputing it", path, stale)
        return None
    return found


def _loads(dataset: ConceptDataset, index: int) -> bool:
    """Whether sample ``index`` loads (a sample skipped as unreadable must still fail to)."""
    try:
        dataset.load(index)
    except ImageReadError:
        return False
    return True


def _check_finite(computed: torch.Tensor, stored: torch.Tensor, index: torch.Tensor, backbone: Backbone,
                  dataset: ConceptDataset, dtype: StorageDtype) -> None:
    """A ValueError when features are NaN or infinite (as computed, or after storage in ``dtype``)."""
    bad = ~torch.isfinite(stored).all(dim=1)
    if bad.any():
        first = dataset.ids[int(index[bad.nonzero()[0, 0]])]
        if torch.isfinite(computed[bad]).all():
            raise ValueError(f"{backbone.spec} gives features beyond the float16 range (65504) for {int(bad.sum())} "
                             f"samples (first: {first!r}); embed with dtype='float32' (--dtype float32).")
        raise ValueError(f"{backbone.spec} gives NaN or infinite features for {int(bad.sum())} samples (first: "
                         f"{first!r}); check the backbone and its weights.")


MANIFEST_FIELDS = {"format": int, "backbone": str, "backbone_fingerprint": str, "dataset": str,
                   "dataset_fingerprint": str, "samples": int, "shards": int, "dtype": str, "embed_dim": int}


def read_manifest(path: Path) -> dict[str, Any]:
    """An entry's ``manifest.json`` (what the entry holds, for ``cbm info``; nothing is computed from it), or a
    CacheError naming the file when it is not valid JSON with the expected fields."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CacheError(f"embedding cache manifest {path} is corrupt ({error}); delete {path.parent} and embed "
                         "again to rebuild the entry.") from None
    wrong = [name for name, kind in MANIFEST_FIELDS.items()
             if not isinstance(info, dict) or type(info.get(name)) is not kind]
    if wrong:
        raise CacheError(f"embedding cache manifest {path} is corrupt (missing or mistyped: {', '.join(wrong)}); "
                         f"delete {path.parent} and embed again to rebuild the entry.")
    return info


def cache_key(backbone: Backbone, dataset: ConceptDataset, dtype: str, shard_size: int) -> str:
    """The cache entry name: backbone fingerprint + dataset fingerprint + storage settings."""
    return digest(CACHE_FORMAT, backbone.fingerprint, dataset.fingerprint(), dtype, shard_size)


def _encode_shards(backbone: Backbone, dataset: ConceptDataset, shards: list[range], batch_size: int,
                   num_workers: int, progress: tqdm) -> Iterator[tuple[int, dict[str, torch.Tensor], list[int]]]:
    """Encode the given shards with one DataLoader, yielding (shard number, tensors, skipped) as each completes.

    Batches never straddle two shards, so each shard can be written as soon as its last batch is done.
    Without shards it touches nothing, not even the backbone's preprocessing (a cached run needs no weights).
    """
    if not shards:
        return
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


def _process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) an uninitialised group is initialised from the
    environment: NCCL when the backbone is on CUDA, gloo otherwise.
    """
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        logger.info("joined a process group of %d ranks as rank %d (%s)", dist.get_world_size(), dist.get_rank(),
                    dist.get_backend())
    return dist.get_rank(), dist.get_world_size()


def _all_reduce_max(values: list[int]) -> list[int]:
    """Element-wise maximum over the ranks (on the GPU for NCCL, as it requires)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _missing_on_any_rank(key: str, missing: list[int], shards: int, refused: CacheError | None) -> list[int]:
    """The shards that some rank lacks; raises when the ranks are not embedding the same cache entry, or when a
    rank refused a shard (``refused``: every rank stops instead of waiting for it)."""
    key_value = int(key[:15], 16)
    if _all_reduce_max([key_value, -key_value]) != [key_value, -key_value]:  # equal keys first: then equal sizes
        raise ValueError("the ranks of the process group are embedding different data (backbone, dataset, dtype or "
                         "shard_size differ); every rank must call embed with the same arguments.")
    lacking = set(missing)
    reduced = _all_reduce_max([int(refused is not None)] + [int(number in lacking) for number in range(shards)])
    if refused is not None:
        raise refused
    if reduced[0]:
        raise CacheError("another rank refused a shard of this cache entry (see its log); no rank used the entry.")
    return [number for number, flag in enumerate(reduced[1:]) if flag]


class _Gathered:
    """Features of all samples, filled shard by shard into one preallocated tensor (the result + one shard)."""

    def __init__(self, total: int, dim: int) -> None:
        self.features = torch.empty(total, dim)
        self.kept = torch.zeros(total, dtype=torch.bool)
        self.skipped: set[int] = set()

    def add(self, tensors: dict[str, torch.Tensor], skipped: list[int]) -> None:
        """Place one shard (idempotent: a shard added twice changes nothing)."""
        index = tensors["index"]
        self.features[index] = tensors["features"].float()
        self.kept[index] = True
        self.skipped.update(skipped)


def embed(backbone: Backbone, dataset: ConceptDataset, *, batch_size: int = 64,
          cache_dir: str | Path | None = None, num_workers: int | None = None, progress: bool = True,
          dtype: StorageDtype = "float32", shard_size: int = DEFAULT_SHARD_SIZE, cache: bool = True) -> Embeddings:
    """Embed every sample of ``dataset`` with ``backbone``, reusing and filling the disk cache.

    ``cache_dir`` defaults to ``default_cache_dir()``; ``cache=False`` computes without touching
    disk. ``dtype="float16"`` halves the storage (features are returned as float32 either way).
    ``num_workers`` defaults to the machine's cores minus one (at most 4). In a ``torch.distributed``
    process group (or under ``torchrun``) the ranks share the missing shards through the cache (see
    the module docstring); without the cache every rank computes everything.

    Cached shards are verified before use (see the module docstring): stale or damaged ones are
    recomputed, forged ones raise ``CacheError``; features that are NaN or infinite (also after
    float16 storage) raise a ValueError and are never cached.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive integers.")
    num_workers = _default_workers() if num_workers is None else num_workers
    total = len(dataset)
    shards = [range(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]
    rank, world = _process_group(backbone.device)
    key = cache_key(backbone, dataset, dtype, shard_size) if cache else ""
    entry = Path(cache_dir or default_cache_dir()).expanduser() / "embeddings" / key if cache else None
    manifest, written, ids_digests = {}, None, []
    if entry:
        keyed = cache_secret() is not None  # a malformed key is an error before any work
        entry.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(entry)
        ids_digests = [_ids_digest(dataset.ids[indices.start:indices.stop]) for indices in shards]
        manifest = {"format": CACHE_FORMAT, "backbone": backbone.spec, "backbone_fingerprint": backbone.fingerprint,
                    "dataset": dataset.describe(), "dataset_fingerprint": dataset.fingerprint(), "samples": total,
                    "shards": len(shards), "dtype": dtype, "embed_dim": backbone.embed_dim,
                    "ids_sha256": digest(ids_digests), "keyed": keyed}
        written = read_manifest(entry / "manifest.json") if (entry / "manifest.json").exists() else None
        if written is not None and written != manifest:
            logger.warning("cache manifest %s describes other data or settings; it will be rewritten",
                           entry / "manifest.json")
    shared = entry is not None and world > 1

    started = time.perf_counter()
    gathered = _Gathered(total, backbone.embed_dim)
    paths = [entry / f"shard_{number:05d}.safetensors" if entry else None for number in range(len(shards))]
    missing, refused = [], None
    for number, (path, indices) in enumerate(zip(paths, shards)):
        try:
            found = _shard_for_run(path, indices, ids_digests[number], dataset, backbone.embed_dim, dtype) \
                if path else None
        except CacheError as error:
            if not shared:
                raise
            refused = error  # raised after the ranks agree, so that none waits for this one
            break
        if found is None:
            missing.append(number)
        else:
            gathered.add(found.tensors, found.skipped)
    if shared:
        missing = _missing_on_any_rank(key, missing, len(shards), refused)
        logger.info("rank %d of %d embeds %d of the %d missing shards", rank, world, len(missing[rank::world]),
                    len(missing))
    mine = missing[rank::world] if shared else missing
    cached = total - sum(len(shards[n]) for n in missing)
    done = False
    try:
        with tqdm(total=cached + sum(len(shards[n]) for n in mine), initial=cached, desc=f"embed {backbone.spec}",
                  unit="sample", disable=not progress or rank != 0) as bar:
            for position, tensors, skipped in _encode_shards(backbone, dataset, [shards[n] for n in mine],
                                                             batch_size, num_workers, bar):
                computed = tensors["features"]
                tensors["features"] = computed.to(getattr(torch, dtype))
                _check_finite(computed, tensors["features"], tensors["index"], backbone, dataset, dtype)
                number = mine[position]
                if entry:
                    _write_shard(paths[number], tensors, skipped, shards[number], ids_digests[number])
                gathered.add(tensors, skipped)
        done = True
    finally:
        if shared:
            failed_elsewhere = _all_reduce_max([int(not done)])[0] and done  # every rank waits here for the others
            if failed_elsewhere:
                raise RuntimeError("another rank failed while embedding (see its log); the shards finished so "
                                   "far stay in the cache and a rerun resumes from them.")
    if shared:
        for number in sorted(set(missing) - set(mine)):
            found = _shard_for_run(paths[number], shards[number], ids_digests[number], dataset, backbone.embed_dim,
                                   dtype)
            if found is None:
                raise RuntimeError(f"shard {number} of {entry}, embedded by another rank, cannot be read here: all "
                                   "ranks need one cache directory on a filesystem they share (--cache-dir or "
                                   "CBM_CACHE_DIR on a shared mount).")
            gathered.add(found.tensors, found.skipped)
    if entry and rank == 0 and (missing or written != manifest):
        _atomic_write_text(entry / "manifest.json", json.dumps(manifest, indent=2))
    logger.info("embedded %d samples with %s in %.1fs", total, backbone.spec, time.perf_counter() - started)
    return _assemble(backbone, dataset, gathered)


def _assemble(backbone: Backbone, dataset: ConceptDataset, gathered: _Gathered) -> Embeddings:
    """One Embeddings aligned with the kept samples, in dataset order."""
    keep = gathered.kept.nonzero().flatten().numpy()
    features = gathered.features if len(keep) == len(gathered.kept) else gathered.features[gathered.kept]
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
        skipped=[dataset.ids[i] for i in sorted(gathered.skipped)],
    )


def cache_entries(cache_dir: str | Path | None = None) -> list[dict]:
    """Describe every entry of the embedding cache (for ``cbm info``): manifest plus size on disk."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / "embeddings"
    entries = []
    for entry in sorted(path for path in root.glob("*") if path.is_dir()) if root.is_dir() else []:
        size = sum(path.stat().st_size for path in entry.glob("*") if path.is_file())
        manifest = entry / "manifest.json"
        info = read_manifest(manifest) if manifest.exists() else {"incomplete": True}
        entries.append({"key": entry.name, "bytes": size, **info})
    return entries
