"""Hostile caches and manifests: shards copied between entries or crafted with a valid checksum, entries
of another key, corrupt cache manifests, and dataset manifests that declare huge labels or reach outside
their root.

A forger here knows the checksum algorithm (it is no secret): ``forge`` rewrites a shard's tensors or
metadata and signs them as the toolkit would, unkeyed or with a key it holds.
"""

import importlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import ColourSquares, write_tiny_clip_dir

from cbm.backbones import load_backbone
from cbm.data.base import ImageReadError, digest
from cbm.data.folders import ManifestDataset
from cbm.embed import CacheError, cache_entries, embed

embed_module = importlib.import_module("cbm.embed")  # the module (``cbm.embed`` is also the function)
KEY, OTHER_KEY = "k" * 16 + "-first", "k" * 16 + "-second"
N, SHARD = 16, 8  # two shards, each two batches of 4


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(f"openclip:local-dir:{write_tiny_clip_dir(tmp_path_factory.mktemp('clip'))}", device="cpu")


class Shifted(ColourSquares):
    """Samples ``shift`` onwards, under a fingerprint that ignores ``shift`` (one that misses a change)."""

    def __init__(self, n: int = N, shift: int = 0, tag: str = "a") -> None:
        super().__init__(n, tag=tag)
        self.shift = shift
        self.ids = [f"{tag}/{i + shift:04d}" for i in range(n)]

    def load(self, index):
        return super().load(index + self.shift)

    def fingerprint(self):
        return digest("shifted", self.tag)


class Flaky(ColourSquares):
    def load(self, index):
        if index == 11:
            raise ImageReadError("cannot read image /data/img11.png: truncated")
        return super().load(index)


def run(backbone, dataset, cache_dir, monkeypatch=None, **kwargs):
    """``embed`` with small batches and shards, and how many batches it encoded (counted with ``monkeypatch``)."""
    calls = {"n": 0}
    original = type(backbone).encode_images

    def encode(self, images):
        calls["n"] += 1
        return original(self, images)

    options = {"batch_size": 4, "cache_dir": cache_dir, "num_workers": 0, "progress": False, "shard_size": SHARD}
    if monkeypatch is None:
        return embed(backbone, dataset, **{**options, **kwargs}), None
    with monkeypatch.context() as patch:
        patch.setattr(type(backbone), "encode_images", encode)
        return embed(backbone, dataset, **{**options, **kwargs}), calls["n"]


def shard(cache_dir, number=1):
    return next(cache_dir.glob(f"embeddings/*/shard_{number:05d}.safetensors"))


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def forge(path, tensors=None, key=None, **metadata):
    """Rewrite a shard with other tensors or metadata, signed for where it lies (``key``: keyed)."""
    old_tensors, old_metadata = read(path)
    tensors, metadata = tensors or old_tensors, {**old_metadata, **metadata}
    metadata["auth"] = "hmac-sha256" if key else "sha256"
    start = int(path.stem.split("_")[1]) * SHARD
    metadata["checksum"] = embed_module._shard_checksum(path.parent.name, start, metadata, tensors,
                                                        key.encode() if key else None)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def reference(backbone):
    return run(backbone, ColourSquares(N), None, cache=False)[0]


def crafted(case):
    """Tensors and metadata changes of shard 1 (samples 8..15) for a crafted-shard case."""
    index = torch.arange(8, 16)
    features = torch.randn(8, 32)
    return {
        "wrong width": ({"features": torch.randn(8, 48), "index": index}, {}),
        "all skipped, but they load": ({"features": torch.empty(0, 32), "index": torch.empty(0, dtype=torch.int64)},
                                       {"skipped": json.dumps(list(range(8, 16)))}),
        "NaN features": ({"features": features.index_fill(0, torch.tensor([3]), float("nan")), "index": index}, {}),
        "float64 features": ({"features": features.double(), "index": index}, {}),
        "a sample listed twice": ({"features": features, "index": index.clone().index_fill(0, torch.tensor([1]), 8)},
                                  {}),
        "a skipped sample outside the shard": ({"features": features[:7], "index": index[:7]},
                                               {"skipped": "[3]"}),
        "unreadable skip list": ({"features": features, "index": index}, {"skipped": "{"}),
    }[case]


@pytest.mark.parametrize("case", ["wrong width", "all skipped, but they load"])
def test_crafted_but_harmless_shard_is_recomputed(backbone, reference, tmp_path, monkeypatch, case):
    data = ColourSquares(N)
    data.on_error = "skip"
    run(backbone, data, tmp_path)
    tensors, changes = crafted(case)
    forge(shard(tmp_path), tensors, **changes)
    result, batches = run(backbone, data, tmp_path, monkeypatch)
    assert batches == 2 and result.skipped == []  # shard 1 recomputed, shard 0 reused
    assert torch.allclose(result.features, reference.features, atol=1e-6)


@pytest.mark.parametrize("case", ["NaN features", "float64 features", "a sample listed twice",
                                  "a skipped sample outside the shard", "unreadable skip list"])
def test_crafted_invalid_shard_with_a_valid_checksum_is_refused(backbone, tmp_path, case):
    data = ColourSquares(N)
    run(backbone, data, tmp_path)
    path = shard(tmp_path)
    tensors, changes = crafted(case)
    forge(path, tensors, **changes)
    with pytest.raises(CacheError, match="passes its checksum but") as refused:
        run(backbone, data, tmp_path)
    assert str(path) in str(refused.value) and "CBM_CACHE_KEY" in str(refused.value)


def test_shard_copied_from_another_entry_is_recomputed(backbone, reference, tmp_path, monkeypatch):
    run(backbone, ColourSquares(N), tmp_path / "a")
    run(backbone, Shifted(N, shift=1, tag="b"), tmp_path / "b")  # other images, same ranges
    shard(tmp_path / "a").write_bytes(shard(tmp_path / "b").read_bytes())
    result, batches = run(backbone, ColourSquares(N), tmp_path / "a", monkeypatch)
    assert batches == 2 and torch.allclose(result.features, reference.features, atol=1e-6)


def test_dataset_change_its_fingerprint_missed_is_recomputed(backbone, tmp_path, monkeypatch):
    run(backbone, Shifted(N, shift=0), tmp_path)
    changed = Shifted(N, shift=1)
    result, batches = run(backbone, changed, tmp_path, monkeypatch)
    assert batches == 4  # same cache key, other ids: every shard is recomputed
    expected = run(backbone, changed, None, cache=False)[0]
    assert torch.allclose(result.features, expected.features, atol=1e-6)


def test_skipped_samples_are_not_reused_by_a_run_that_raises(backbone, tmp_path):
    data = Flaky(N)
    data.on_error = "skip"
    assert run(backbone, data, tmp_path)[0].skipped == ["a/0011"]
    data.on_error = "raise"
    with pytest.raises(ImageReadError, match="img11.png"):
        run(backbone, data, tmp_path)
    data.on_error = "skip"
    assert run(backbone, data, tmp_path)[0].skipped == ["a/0011"]  # a skip-run still reuses the entry


def test_keyed_cache(backbone, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("CBM_CACHE_KEY", KEY)
    run(backbone, ColourSquares(N), tmp_path / "keyed")
    result, batches = run(backbone, ColourSquares(N), tmp_path / "keyed", monkeypatch)
    assert batches == 0 and torch.allclose(result.features, reference.features, atol=1e-6)
    assert read(shard(tmp_path / "keyed"))[1]["auth"] == "hmac-sha256"
    assert cache_entries(tmp_path / "keyed")[0]["keyed"] is True

    monkeypatch.setenv("CBM_CACHE_KEY", OTHER_KEY)
    with pytest.raises(CacheError, match="fails its keyed checksum"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")
    monkeypatch.delenv("CBM_CACHE_KEY")
    with pytest.raises(CacheError, match="was written with a key"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")
    run(backbone, ColourSquares(N), tmp_path / "plain")
    monkeypatch.setenv("CBM_CACHE_KEY", KEY)
    with pytest.raises(CacheError, match="carries no keyed checksum"):
        run(backbone, ColourSquares(N), tmp_path / "plain")

    path = shard(tmp_path / "keyed")
    good = path.read_bytes()
    run(backbone, Shifted(N, shift=1, tag="b"), tmp_path / "keyed-b")
    path.write_bytes(shard(tmp_path / "keyed-b").read_bytes())  # a keyed shard of another entry
    with pytest.raises(CacheError, match="fails its keyed checksum"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")
    raw = bytearray(good)
    raw[-5] ^= 0xFF  # a flipped feature byte: damage or tampering, refused under a key
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="fails its keyed checksum"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")
    path.write_bytes(good)
    forge(path, key=OTHER_KEY)  # the right content, signed with a key that is not this run's
    with pytest.raises(CacheError, match="fails its keyed checksum"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")
    forge(path, key=KEY)  # the key holder's own signature: used again
    assert run(backbone, ColourSquares(N), tmp_path / "keyed", monkeypatch)[1] == 0
    monkeypatch.setenv("CBM_CACHE_KEY", "short")
    with pytest.raises(ValueError, match="at least 16"):
        run(backbone, ColourSquares(N), tmp_path / "keyed")


@pytest.mark.parametrize("content", ["{ not json", "[1, 2]", '{"format": 2, "samples": "16"}'])
def test_corrupt_cache_manifest_is_an_error_naming_it(backbone, tmp_path, content):
    run(backbone, ColourSquares(N), tmp_path)
    manifest = next(tmp_path.glob("embeddings/*/manifest.json"))
    manifest.write_text(content)
    for call in (lambda: cache_entries(tmp_path), lambda: run(backbone, ColourSquares(N), tmp_path)):
        with pytest.raises(CacheError, match="manifest .* is corrupt") as raised:
            call()
        assert str(manifest) in str(raised.value)


def test_features_beyond_float16_are_an_error_and_never_cached(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(type(backbone), "encode_images", lambda self, images: torch.full((len(images), 32), 1e5))
    with pytest.raises(ValueError, match="beyond the float16 range .* dtype='float32'"):
        run(backbone, ColourSquares(N), tmp_path, dtype="float16")
    assert not list(tmp_path.glob("embeddings/*/shard_*"))
    monkeypatch.setattr(type(backbone), "encode_images", lambda self, images: torch.full((len(images), 32), np.nan))
    with pytest.raises(ValueError, match="NaN or infinite features"):
        run(backbone, ColourSquares(N), tmp_path)


# -- dataset manifests ---------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / "data" / "img").mkdir(parents=True, exist_ok=True)
        ColourSquares(2).load(0).save(tmp_path / "data" / "img" / name)
    (tmp_path / "secret.png").write_bytes((tmp_path / "data" / "img" / "a.png").read_bytes())
    return tmp_path / "data"


@pytest.mark.parametrize("label", [10**12, "1" * 5000, "-" + "9" * 30])
def test_huge_integer_label_is_refused_without_allocating(root, label):
    rows = [{"path": "img/a.png", "label": 0}, {"path": "img/b.png", "label": label}]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=r"m\.jsonl:2: integer label .* is (too large|negative)"):
        ManifestDataset(manifest)
    manifest.write_text(json.dumps(rows[0]) + '\n{"path": "img/b.png", "label": ' + "1" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):  # Python refuses ints of 4300+ digits
        ManifestDataset(manifest)
    (root / "m.csv").write_text(f"path,label\nimg/a.png,0\nimg/b.png,{label}\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: integer label .* is (too large|negative)"):
        ManifestDataset(root / "m.csv")
    with pytest.raises(ValueError, match=r"m\.csv:3: label .* is not one of class_names"):
        ManifestDataset(root / "m.csv", class_names=["x", "y"])


@pytest.mark.parametrize("path", ["../secret.png", "img/../../secret.png", "{tmp}/secret.png"])
def test_manifest_paths_stay_inside_the_root(root, path):
    path = path.format(tmp=root.parent)
    (root / "m.csv").write_text(f"path,label\nimg/a.png,cat\n{path},dog\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: path .* leads outside the image root"):
        ManifestDataset(root / "m.csv")
    allowed = ManifestDataset(root / "m.csv", allow_outside_root=True)
    assert allowed.paths[1] == root.parent / "secret.png" and allowed.class_names == ["cat", "dog"]


@pytest.mark.parametrize("again", ["./img/a.png", "img/x/../a.png", "{root}/img/a.png"])
def test_one_file_listed_twice_is_refused(root, again):
    again = again.format(root=root)
    (root / "m.csv").write_text(f"path,label\nimg/a.png,cat\nimg/b.png,dog\n{again},dog\n")
    with pytest.raises(ValueError, match=r"m\.csv:4: path .* is the file already listed on line 2"):
        ManifestDataset(root / "m.csv")
