"""The model bundle: one safetensors file whose header carries a JSON manifest.

A bundle is a plain safetensors file. Its ``__metadata__`` holds ``cbm_manifest``, a JSON
document with the format version, the model family, its hyperparameters, the backbone spec
and fingerprint, class and concept names, the training data fingerprint, metrics and the edit
history, and ``cbm_tensor_sha256``, a checksum of every tensor (older bundles without it still
load). Every tensor (the model's and its concept bank's) lives in the same file. Loading never
executes code from the file: the manifest is parsed as JSON, checked field by field, and each
declared tensor shape is checked against the file's header before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cbm.files import atomic_path

FORMAT_NAME = "cbm-bundle"
FORMAT_VERSION = (1, 0)
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSOR_ELEMENTS = 2**31


class BundleError(ValueError):
    """A bundle file is corrupt, of another format or version, or does not match its use."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order): detects corrupted tensor data."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def write_bundle(path: str | Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``manifest`` + ``tensors`` atomically to ``path`` (a temporary file renamed into place)."""
    path = Path(path)
    manifest = {"format": FORMAT_NAME, "format_version": ".".join(map(str, FORMAT_VERSION)), **manifest,
                "tensors": {name: list(tensor.shape) for name, tensor in tensors.items()}}
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {"cbm_manifest": json.dumps(manifest), "cbm_tensor_sha256": tensor_digest(contiguous)}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return path


def _header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, read with a size check before anything is allocated."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BundleError(f"{path} is not a model bundle (the file is too short to be safetensors).")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES or size > path.stat().st_size - 8:
            raise BundleError(f"{path} is not a valid model bundle (its header declares {size} bytes).")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise BundleError(f"{path} is not a valid model bundle (unreadable header: {error}).") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path} is not a valid model bundle (its header is a JSON {type(header).__name__}, "
                          "not an object).")
    return header


def read_bundle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a bundle: its manifest and every tensor it declares."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model bundle {path} does not exist.")
    header = _header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or "cbm_manifest" not in metadata:
        raise BundleError(f"{path} is a safetensors file but not a cbm model bundle (no manifest).")
    try:
        manifest = json.loads(metadata["cbm_manifest"])
    except (json.JSONDecodeError, RecursionError, TypeError) as error:
        raise BundleError(f"{path} has an unreadable manifest ({error}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise BundleError(f"{path} is not a cbm model bundle (format {found!r}).")
    version = str(manifest.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise BundleError(f"{path} declares an unreadable format version {version!r}.") from None
    if major > FORMAT_VERSION[0]:
        raise BundleError(f"{path} uses bundle format {version}, newer than this toolkit reads "
                          f"({FORMAT_VERSION[0]}.x); upgrade the toolkit.")
    declared = manifest.get("tensors")
    if not isinstance(declared, dict):
        raise BundleError(f"{path} has no tensor list in its manifest.")
    for name, shape in declared.items():
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise BundleError(f"{path} declares an invalid shape for tensor {name!r}.")
        elements = 1
        for n in shape:
            elements *= n
        if elements > MAX_TENSOR_ELEMENTS:
            raise BundleError(f"{path} declares an absurdly large tensor {name!r} {shape}.")
        stored = header.get(name)
        if not isinstance(stored, dict):
            raise BundleError(f"{path} is missing tensor {name!r}; the file is incomplete or corrupt.")
        if stored.get("shape") != shape:
            raise BundleError(f"{path}: tensor {name!r} has shape {stored.get('shape')}, the manifest says {shape}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in declared}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise BundleError(f"{path} has corrupt tensor data ({error}).") from None
    expected = metadata.get("cbm_tensor_sha256")
    if expected is not None and expected != tensor_digest(tensors):
        raise BundleError(f"{path} has corrupt tensor data (their checksum does not match the one written with "
                          "them); restore the file from a good copy.")
    return manifest, tensors
