"""The embedding cache: hits, corruption, interruption, skipping, storage precision, video windows."""

import json

import numpy as np
import pytest
import torch

from cbm.backbones import load_backbone
from cbm.data.base import ImageReadError, VideoWindowDataset, digest
from cbm.embed import cache_entries, embed
from tiny_models import ColourSquares, write_tiny_clip_dir


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(f"openclip:local-dir:{write_tiny_clip_dir(tmp_path_factory.mktemp('clip'))}", device="cpu")


def counting(backbone, monkeypatch, fail_after=None):
    """Count encode_images calls; optionally raise after ``fail_after`` calls (a crash mid-run)."""
    calls = {"n": 0}
    original = type(backbone).encode_images

    def encode(self, images):
        if fail_after is not None and calls["n"] >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return original(self, images)

    monkeypatch.setattr(type(backbone), "encode_images", encode)
    return calls


def run(backbone, dataset, cache_dir, **kwargs):
    options = dict(batch_size=4, cache_dir=cache_dir, num_workers=0, progress=False, shard_size=8)
    return embed(backbone, dataset, **{**options, **kwargs})


def test_features_match_bare_forward_and_align_with_ids(backbone, tmp_path):
    data = ColourSquares(10)
    result = run(backbone, data, tmp_path)
    bare = backbone.encode_images(torch.stack([backbone.preprocess(data.load(i)) for i in range(10)]))
    assert torch.allclose(result.features, bare, atol=1e-5)
    assert result.ids == data.ids and result.labels.tolist() == data.labels.tolist()
    assert result.concept_labels.shape == (10, 3) and result.concept_names == data.concept_names
    assert result.backbone_fingerprint == backbone.fingerprint
    with_workers = run(backbone, data, tmp_path, num_workers=2, cache=False)
    assert torch.allclose(with_workers.features, result.features, atol=1e-6)


def test_second_call_is_a_cache_hit(backbone, tmp_path, monkeypatch):
    data = ColourSquares(20)
    first = run(backbone, data, tmp_path)
    calls = counting(backbone, monkeypatch)
    second = run(backbone, ColourSquares(20), tmp_path)
    assert calls["n"] == 0
    assert torch.equal(first.features, second.features)
    # another dataset fingerprint is another entry
    run(backbone, ColourSquares(20, tag="b"), tmp_path)
    assert calls["n"] > 0
    entries = cache_entries(tmp_path)
    assert len(entries) == 2 and all(entry["samples"] == 20 for entry in entries)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_shard_is_detected_and_recomputed(backbone, tmp_path, monkeypatch, damage):
    data = ColourSquares(20)
    first = run(backbone, data, tmp_path)
    shard = sorted(tmp_path.glob("embeddings/*/shard_00001.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[-5] ^= 0xFF  # inside the feature bytes: only the checksum can tell
    else:
        raw = bytearray(b"not a safetensors file at all")
    shard.write_bytes(bytes(raw))
    calls = counting(backbone, monkeypatch)
    again = run(backbone, data, tmp_path)
    assert calls["n"] == 2  # shard 1 holds 8 samples = 2 batches of 4; the other shards are reused
    assert torch.allclose(again.features, first.features, atol=1e-6)


def test_interrupted_run_resumes_from_finished_shards(backbone, tmp_path, monkeypatch):
    data = ColourSquares(24)  # 3 shards of 8, 2 batches each
    reference = run(backbone, data, tmp_path / "ref")
    calls = counting(backbone, monkeypatch, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(backbone, data, tmp_path / "cache")
    monkeypatch.undo()
    calls = counting(backbone, monkeypatch)
    resumed = run(backbone, data, tmp_path / "cache")
    assert calls["n"] == 4  # shard 0 was finished before the interruption; shards 1 and 2 are recomputed
    assert torch.allclose(resumed.features, reference.features, atol=1e-6)
    assert not list((tmp_path / "cache").glob("embeddings/*/.*tmp"))


def test_float16_storage_halves_the_files(backbone, tmp_path):
    data = ColourSquares(16)
    full = run(backbone, data, tmp_path / "f32")
    half = run(backbone, data, tmp_path / "f16", dtype="float16")
    assert half.features.dtype == torch.float32
    assert torch.allclose(full.features, half.features, atol=1e-2)
    size = lambda root: sum(p.stat().st_size for p in root.glob("embeddings/*/shard_*"))  # noqa: E731
    assert size(tmp_path / "f16") < 0.7 * size(tmp_path / "f32")


class Flaky(ColourSquares):
    def load(self, index):
        if index in (3, 11):
            raise ImageReadError(f"cannot read image /data/img{index}.png: truncated")
        return super().load(index)


def test_unreadable_samples_raise_by_default_and_skip_on_request(backbone, tmp_path, caplog):
    with pytest.raises(ImageReadError, match="img3.png"):
        run(backbone, Flaky(16), tmp_path / "a", cache=False)
    data = Flaky(16)
    data.on_error = "skip"
    result = run(backbone, data, tmp_path / "b")
    assert result.skipped == ["a/0003", "a/0011"]
    assert len(result) == 14 and "a/0003" not in result.ids
    assert "img11.png" in caplog.text
    again = run(backbone, data, tmp_path / "b")  # the skip list survives in the cache
    assert again.skipped == result.skipped and torch.equal(again.features, result.features)


class TwoVideos(VideoWindowDataset):
    """Two 'videos' of solid frames cut into windows of 3 frames, all frames averaged."""

    def __init__(self):
        self.frames = [[ColourSquares(9).load(i) for i in range(7)], [ColourSquares(9).load(i) for i in range(5)]]
        spans = [(v, s, min(s + 3, len(f))) for v, f in enumerate(self.frames) for s in range(0, len(f), 3)]
        self.window_video = np.array([v for v, _, _ in spans])
        self.window_spans = np.array([(s, e) for _, s, e in spans])
        self.ids = [f"v{v}#w{i}" for i, (v, _, _) in enumerate(spans)]
        self.labels = self.window_video.copy()
        self.class_names = ["first", "second"]
        self.video_ids, self.video_labels = ["v0", "v1"], np.array([0, 1])
        self.frames_per_window = 3

    def load(self, index):
        frames = self.frames[self.window_video[index]]
        return [frames[i] for i in self.sampled_frames(index)]

    def fingerprint(self):
        return digest("two-videos")


def test_video_windows_average_their_frames(backbone, tmp_path):
    data = TwoVideos()
    result = run(backbone, data, tmp_path)
    assert len(result) == 5 and result.meta["window_video"].tolist() == [0, 0, 0, 1, 1]
    assert result.meta["window_spans"].tolist()[2] == [6, 7]
    frames = data.load(1)
    expected = backbone.encode_images(torch.stack([backbone.preprocess(f) for f in frames])).mean(0)
    assert len(frames) == 3 and torch.allclose(result.features[1], expected, atol=1e-5)


def test_invalid_arguments(backbone, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        run(backbone, ColourSquares(4), tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="positive"):
        run(backbone, ColourSquares(4), tmp_path, batch_size=0)


def test_manifest_describes_the_entry(backbone, tmp_path):
    run(backbone, ColourSquares(8), tmp_path)
    manifest = json.loads(next(tmp_path.glob("embeddings/*/manifest.json")).read_text())
    assert manifest["samples"] == 8 and manifest["backbone_fingerprint"] == backbone.fingerprint
    assert manifest["embed_dim"] == 32
