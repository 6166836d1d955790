"""Tests of the cbm.data loaders on tiny datasets written into tmp_path."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import write_video

from cbm.data.base import ImageReadError, window_spans
from cbm.data.cifar import CIFAR
from cbm.data.cub import CUB, class_level_attributes, select_attributes, stratified_val_split
from cbm.data.folders import ImageFolder, ManifestDataset, natural_key
from cbm.data.registry import DATASET_SCHEMES, load_dataset, parse_spec, register_dataset_scheme
from cbm.data.video import FrameFolderVideos, VideoFileDataset, _SequentialDecoder


def save_image(path: Path, value: int, size: int = 8, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path, format=fmt)
    return path


def gray(image: Image.Image) -> float:
    return float(np.asarray(image, dtype=np.float64).mean())


# -- base ------------------------------------------------------------------------------------


def test_window_spans_cover_frames_without_empty_spans():
    assert window_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_spans(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert window_spans(3, 8) == [(0, 3)]
    assert window_spans(0, 4) == []
    # stride > window skips frames between windows and must not add an empty (10, 10) span
    assert window_spans(10, 2, 5) == [(0, 2), (5, 7)]
    assert window_spans(11, 2, 5) == [(0, 2), (5, 7), (10, 11)]


def test_natural_key_orders_numbers_by_value():
    names = ["frame10.png", "frame2.png", "frame1.png"]
    assert sorted(names, key=natural_key) == ["frame1.png", "frame2.png", "frame10.png"]


# -- image folder ----------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save_image(root / "dog" / "d2.png", 30)
    save_image(root / "dog" / "d10.jpg", 40)
    save_image(root / "cat" / "c1.png", 10)
    save_image(root / "cat" / "sub" / "c2.png", 20)
    (root / "cat" / "._c1.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_ids_labels_and_order(image_folder: Path):
    ds = ImageFolder(image_folder)
    assert ds.class_names == ["cat", "dog"]
    assert ds.ids == ["cat/c1.png", "cat/sub/c2.png", "dog/d2.png", "dog/d10.jpg"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.concept_names is None and ds.concept_labels is None
    image, label = ds[1]
    assert image.mode == "RGB" and label == 0 and gray(image) == pytest.approx(20)
    assert len(ds) == 4 and "2 classes" in ds.describe()


def test_image_folder_fingerprint_tracks_files(image_folder: Path):
    first = ImageFolder(image_folder).fingerprint()
    assert ImageFolder(image_folder).fingerprint() == first
    save_image(image_folder / "dog" / "d2.png", 99, size=9)
    assert ImageFolder(image_folder).fingerprint() != first


def test_image_folder_errors(tmp_path: Path, image_folder: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    save_image(flat / "a.png", 1)
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ImageFolder(flat)
    (image_folder / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class.*no images"):
        ImageFolder(image_folder)
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(flat, on_error="ignore")


def test_corrupt_image_raises_with_path_and_skip_is_stored(image_folder: Path):
    bad = image_folder / "dog" / "d3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageFolder(image_folder)
    index = ds.ids.index("dog/d3.png")
    with pytest.raises(ImageReadError, match="d3.png"):
        ds.load(index)
    skipping = ImageFolder(image_folder, on_error="skip")
    assert skipping.on_error == "skip"
    assert skipping.ids == ds.ids  # skipping happens at embedding time, sample by sample


# -- manifests -------------------------------------------------------------------------------


@pytest.fixture
def manifest_images(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name, value in [("a.png", 10), ("b.png", 20), ("c.png", 30)]:
        save_image(root / "img" / name, value)
    return root


def test_csv_manifest_with_concepts(manifest_images: Path):
    manifest = manifest_images / "train.csv"
    manifest.write_text("path,label,striped,furry\nimg/a.png,zebra,1,0\nimg/b.png,cat,0,1\nimg/c.png,zebra,true,no\n")
    ds = ManifestDataset(manifest)
    assert ds.class_names == ["cat", "zebra"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.ids == ["img/a.png", "img/b.png", "img/c.png"]
    assert ds.concept_names == ["striped", "furry"]
    assert ds.concept_labels.dtype == np.float32
    np.testing.assert_array_equal(ds.concept_labels, [[1, 0], [0, 1], [1, 0]])
    assert gray(ds.load(2)) == pytest.approx(30)
    fixed = ManifestDataset(manifest, class_names=["zebra", "cat"])
    assert fixed.labels.tolist() == [0, 1, 0]
    assert fixed.fingerprint() != ds.fingerprint()  # labels changed


def test_jsonl_manifest_concepts_object_and_root(manifest_images: Path, tmp_path: Path):
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    manifest.parent.mkdir()
    rows = [
        {"path": "img/b.png", "label": 1, "concepts": {"red": 1, "round": False}},
        {"path": "img/a.png", "label": 0, "concepts": {"round": 1, "red": 0}},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = ManifestDataset(manifest, root=manifest_images)
    assert ds.class_names == ["0", "1"] and ds.labels.tolist() == [1, 0]
    assert ds.concept_names == ["red", "round"]
    np.testing.assert_array_equal(ds.concept_labels, [[1, 0], [0, 1]])
    assert gray(ds.load(0)) == pytest.approx(20)
    # flat rows: every key other than path/label is a concept; an absolute path outside the root needs consent
    flat = tmp_path / "elsewhere" / "flat.jsonl"
    flat.write_text(json.dumps({"path": str(manifest_images / "img/c.png"), "label": "x", "shiny": 1}) + "\n")
    with pytest.raises(ValueError, match="outside the image root"):
        ManifestDataset(flat)
    ds = ManifestDataset(flat, allow_outside_root=True)
    assert ds.concept_names == ["shiny"] and ds.class_names == ["x"]


def test_manifest_errors_name_file_and_line(manifest_images: Path):
    bad_value = manifest_images / "bad.csv"
    bad_value.write_text("path,label,striped\nimg/a.png,cat,1\nimg/b.png,cat,maybe\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: concept 'striped' must be 0 or 1"):
        ManifestDataset(bad_value)
    no_label = manifest_images / "nolabel.csv"
    no_label.write_text("path,striped\nimg/a.png,1\n")
    with pytest.raises(ValueError, match=r"nolabel\.csv:1:.*'label'"):
        ManifestDataset(no_label)
    bad_json = manifest_images / "bad.jsonl"
    bad_json.write_text('{"path": "img/a.png", "label": "cat"}\n{"path": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        ManifestDataset(bad_json)
    uneven = manifest_images / "uneven.jsonl"
    uneven.write_text('{"path": "img/a.png", "label": "cat", "red": 1}\n{"path": "img/b.png", "label": "cat"}\n')
    with pytest.raises(ValueError, match=r"uneven\.jsonl:2: concepts"):
        ManifestDataset(uneven)
    duplicate = manifest_images / "dup.csv"
    duplicate.write_text("path,label\nimg/a.png,cat\nimg/a.png,dog\n")
    with pytest.raises(ValueError, match=r"dup\.csv:3:.*line 2"):
        ManifestDataset(duplicate)
    unknown_class = manifest_images / "cls.csv"
    unknown_class.write_text("path,label\nimg/a.png,cat\n")
    with pytest.raises(ValueError, match=r"cls\.csv:2: label 'cat'"):
        ManifestDataset(unknown_class, class_names=["dog"])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ManifestDataset(manifest_images / "nope.csv")


def test_manifest_missing_image_raise_or_skip(manifest_images: Path, caplog: pytest.LogCaptureFixture):
    manifest = manifest_images / "m.csv"
    manifest.write_text("path,label\nimg/a.png,cat\nimg/gone.png,dog\nimg/b.png,dog\n")
    with pytest.raises(FileNotFoundError, match=r"m\.csv:3: image .*gone\.png"):
        ManifestDataset(manifest)
    with caplog.at_level(logging.WARNING):
        ds = ManifestDataset(manifest, on_error="skip")
    assert ds.ids == ["img/a.png", "img/b.png"] and ds.labels.tolist() == [0, 1]
    assert "gone.png" in caplog.text


# -- CIFAR -----------------------------------------------------------------------------------


def write_fake_cifar10(root: Path, per_batch: int = 3) -> Path:
    """torchvision's cifar-10-batches-py layout with a few images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for b, name in enumerate(names):
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        data[:, :1024] = b * 40  # red plane encodes the batch
        labels = [(b + i) % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return folder


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake CIFAR-10 whose MD5 sums are registered on torchvision's class for this test only."""
    from torchvision import datasets

    folder = write_fake_cifar10(tmp_path / "cifar")

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(
        datasets.CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    )
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(
        datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")}
    )
    return tmp_path / "cifar"


def test_cifar_wraps_torchvision(fake_cifar: Path):
    train = CIFAR(fake_cifar, "cifar10", "train")
    test = CIFAR(fake_cifar, "cifar10", "test")
    assert len(train) == 15 and len(test) == 3
    assert train.ids[:2] == ["cifar10/train/00000", "cifar10/train/00001"] and test.ids[-1] == "cifar10/test/00002"
    assert train.class_names[:2] == ["class0", "class1"]
    assert train.labels.tolist()[:4] == [0, 1, 2, 1] and train.labels.dtype == np.int64
    image = train.load(3)  # first image of data_batch_2: red plane 40
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image)[..., 0].min() == 40
    assert train.fingerprint() != test.fingerprint()
    assert train.fingerprint() == CIFAR(fake_cifar, "cifar10", "train").fingerprint()


def test_cifar_missing_and_corrupt_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=True"):
        CIFAR(tmp_path / "empty", "cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR(tmp_path / "empty", "cifar100", "test")
    write_fake_cifar10(tmp_path / "fake")  # real MD5 sums do not match: refused, not loaded
    with pytest.raises(RuntimeError, match="integrity"):
        CIFAR(tmp_path / "fake", "cifar10")
    with pytest.raises(ValueError, match="split"):
        CIFAR(tmp_path / "fake", "cifar10", "val")


# -- CUB -------------------------------------------------------------------------------------

N_CLASSES = 6
TRAIN_PER_CLASS = 5
TEST_PER_CLASS = 6
# class-level truth for attributes 0..9: attribute a is present in classes c < PRESENT_IN[a]
PRESENT_IN = [6, 5, 4, 3, 3, 2, 1, 0, 6, 4]
TRAP = 10  # absent in every train image, present in every val/test image
NOISY = 11  # per-image noise only


def write_cub(root: Path, attributes_in_subfolder: bool = False) -> Path:
    """A CUB-200-2011 layout: 6 classes, 5 train + 6 test images each, 12 attributes."""
    (root / "attributes").mkdir(parents=True)
    images, labels, split, attr_lines = [], [], [], []
    classes = [f"{c + 1:03d}.Bird_{c}" for c in range(N_CLASSES)]
    image_id = 0
    for c, folder in enumerate(classes):
        for k in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            image_id += 1
            is_train = k < TRAIN_PER_CLASS
            rel = f"{folder}/Bird_{c}_{k:04d}.jpg"
            save_image(root / "images" / rel, 10 * c + k, fmt="JPEG")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(is_train)}")
            for a in range(12):
                if a < len(PRESENT_IN):
                    present = int(c < PRESENT_IN[a])
                elif a == TRAP:
                    present = int(not is_train)
                else:
                    present = (image_id + a) % 2
                certainty = 4 if present else 3
                extra = " 0" if (image_id, a) == (3, 5) else ""  # quirk: an extra field
                attr_lines.append(f"{image_id} {a + 1} {present} {certainty}{extra} 12.5")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{c + 1} {name}" for c, name in enumerate(classes)) + "\n")
    names = "\n".join(f"{a + 1} has_part_{a}::value_{a}" for a in range(12)) + "\n"
    target = root / "attributes" / "attributes.txt" if attributes_in_subfolder else root / "attributes.txt"
    target.write_text(names)
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attr_lines) + "\n")
    return root


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


def test_cub_splits_are_disjoint_stratified_and_seeded(cub_root: Path):
    train = CUB(cub_root, "train", val_fraction=0.2, seed=0, min_classes=3)
    val = CUB(cub_root, "val", val_fraction=0.2, seed=0, min_classes=3)
    test = CUB(cub_root, "test", val_fraction=0.2, seed=0, min_classes=3)
    assert len(train) == 24 and len(val) == 6 and len(test) == 36
    assert not set(train.ids) & set(val.ids) and not set(test.ids) & (set(train.ids) | set(val.ids))
    assert np.bincount(val.labels).tolist() == [1] * N_CLASSES  # one val image per class
    assert all(int(i.split("_")[-1][:4]) < TRAIN_PER_CLASS for i in train.ids + val.ids)
    assert CUB(cub_root, "val", val_fraction=0.2, seed=0, min_classes=3).ids == val.ids
    other_seeds = {tuple(CUB(cub_root, "val", val_fraction=0.2, seed=s, attributes="all312").ids) for s in range(1, 5)}
    assert other_seeds - {tuple(val.ids)}
    assert train.class_names[0] == "Bird 0" and train.class_folders[0] == "001.Bird_0"
    assert train.ids[0].startswith("001.Bird_0/") and train.labels.dtype == np.int64
    assert gray(train.load(0)) == pytest.approx(10 * train.labels[0] + int(train.ids[0][-8:-4]), abs=2)
    assert train.fingerprint() != val.fingerprint()
    assert CUB(cub_root, "val", val_fraction=0.2, seed=1, min_classes=3).fingerprint() != val.fingerprint()


def test_cub_cbm_subset_majority_vote_and_min_classes(cub_root: Path):
    ds = CUB(cub_root, "test", val_fraction=0.2, seed=0, min_classes=3)
    expected = [a for a, n in enumerate(PRESENT_IN) if n >= 3]  # attributes 0, 1, 2, 3, 4, 8, 9
    # the trap attribute is present in all val/test images but no train image: if val or test
    # leaked into the vote it would be kept; NOISY is 50/50 per class in train, so ties decide
    assert TRAP not in ds.attribute_ids.tolist()
    kept = ds.attribute_ids.tolist()
    assert [a for a in kept if a < len(PRESENT_IN)] == expected
    assert ds.concept_names[: len(expected)] == [f"has_part_{a}::value_{a}" for a in expected]
    truth = np.array([[int(c < PRESENT_IN[a]) for a in expected] for c in range(N_CLASSES)], dtype=np.float32)
    np.testing.assert_array_equal(ds.concept_labels[:, : len(expected)], truth[ds.labels])
    # every image carries its class's labels (class-level), while the instance labels differ for TRAP
    for c in range(N_CLASSES):
        rows = ds.concept_labels[ds.labels == c]
        assert (rows == rows[0]).all()
    assert ds.concept_labels.dtype == np.float32 and ds.concept_certainty.shape == ds.concept_labels.shape
    strict = CUB(cub_root, "test", val_fraction=0.2, seed=0, min_classes=5)
    assert [a for a in strict.attribute_ids.tolist() if a < len(PRESENT_IN)] == [0, 1, 8]
    # the subset is the same whichever split is built
    assert CUB(cub_root, "train", val_fraction=0.2, seed=0, min_classes=3).concept_names == ds.concept_names


def test_cub_all312_instance_labels_and_certainty(cub_root: Path):
    ds = CUB(cub_root, "test", attributes="all312")
    assert ds.concept_names == [f"has_part_{a}::value_{a}" for a in range(12)]
    assert ds.concept_labels.shape == (36, 12)
    np.testing.assert_array_equal(ds.concept_labels[:, TRAP], 1.0)
    expected_certainty = np.where(ds.concept_labels == 1, 4, 3)
    np.testing.assert_array_equal(ds.concept_certainty, expected_certainty)
    assert ds.concept_certainty.dtype == np.int64


def test_class_level_vote_rules():
    present = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=np.uint8)
    certainty = np.array([[4, 1, 4], [4, 1, 3], [3, 1, 3], [1, 4, 3]], dtype=np.uint8)
    labels = np.array([0, 0, 0, 0])
    # attr 0: 2 present vs 1 counted absent (the not-visible absent is ignored) -> 1
    # attr 1: 1 present vs 0 counted absent -> 1; attr 2: 1 present vs 3 absent -> 0
    np.testing.assert_array_equal(class_level_attributes(present, certainty, labels, 2), [[1, 1, 0], [0, 0, 0]])
    tie = class_level_attributes(np.array([[1], [0]], np.uint8), np.array([[4], [4]], np.uint8), np.array([0, 0]), 1)
    assert tie.tolist() == [[1]]  # 50% counts as present
    assert select_attributes(np.array([[1, 0, 1], [1, 0, 0]]), 2).tolist() == [0]
    mask = stratified_val_split(np.array([0] * 10 + [1] * 3 + [2]), 0.3, seed=7)
    assert mask[:10].sum() == 3 and mask[10:13].sum() == 1 and not mask[13]


def test_cub_needs_some_attribute_in_min_classes(cub_root: Path):
    with pytest.raises(ValueError, match="at least 10 classes"):
        CUB(cub_root)  # 6 classes cannot reach the default of 10


def test_cub_attribute_file_locations_and_errors(tmp_path: Path):
    root = write_cub(tmp_path / "sub" / "CUB_200_2011", attributes_in_subfolder=True)
    ds = CUB(root, "train", attributes="all312")
    assert len(ds.concept_names) == 12
    (root / "attributes" / "attributes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="attributes.txt"):
        CUB(root)
    (root / "attributes.txt").write_text("1 only_one\nnot a line\n")
    with pytest.raises(ValueError, match=r"attributes\.txt:2"):
        CUB(root)
    with pytest.raises(FileNotFoundError, match="missing_cub"):
        CUB(tmp_path / "missing_cub")
    (root / "images.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\.txt"):
        CUB(root)


def test_cub_bad_attribute_label_line(tmp_path: Path):
    root = write_cub(tmp_path / "CUB_200_2011")
    labels = root / "attributes" / "image_attribute_labels.txt"
    lines = labels.read_text().splitlines()
    lines[4] = "1 5 2 3 1.0"  # is_present must be 0/1
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"image_attribute_labels\.txt:5"):
        CUB(root, attributes="all312")


# -- videos ----------------------------------------------------------------------------------


@pytest.fixture
def frame_root(tmp_path: Path) -> Path:
    root = tmp_path / "frames"
    for cls, videos in [("run", ["v1", "v2"]), ("walk", ["w1"])]:
        for v, video in enumerate(videos):
            count = 10 if video != "w1" else 5
            for i in range(count):
                save_image(root / cls / video / f"frame{i + 1}.png", 20 * i + v)
    return root


def test_frame_folder_windows_and_natural_order(frame_root: Path):
    ds = FrameFolderVideos(frame_root, window=4, frames_per_window=2)
    assert ds.class_names == ["run", "walk"]
    assert ds.video_ids == ["run/v1", "run/v2", "walk/w1"]
    assert ds.video_labels.tolist() == [0, 0, 1]
    assert ds.ids[:3] == ["run/v1#w0000", "run/v1#w0001", "run/v1#w0002"]
    assert ds.window_spans.tolist()[:3] == [[0, 4], [4, 8], [8, 10]]
    assert ds.window_video.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ds.labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    frames = ds.load(1)  # frames 4..7 sampled at 4 and 7 (naturally sorted: frame5, frame8)
    assert [round(gray(f)) for f in frames] == [80, 140]
    assert [round(gray(f)) for f in ds.load(2)] == [160, 180]  # frame9 and frame10, not frame1x
    assert [round(gray(f)) for f in ds.load(7)] == [80]  # walk/w1 frames 4..4
    other = FrameFolderVideos(frame_root, window=4, stride=2)
    assert other.fingerprint() != ds.fingerprint()
    assert other.window_spans.tolist()[:4] == [[0, 4], [2, 6], [4, 8], [6, 10]]


def test_frame_folder_empty_video(frame_root: Path, caplog: pytest.LogCaptureFixture):
    (frame_root / "walk" / "w0_empty").mkdir()
    with pytest.raises(ValueError, match="w0_empty"):
        FrameFolderVideos(frame_root)
    with caplog.at_level(logging.WARNING):
        ds = FrameFolderVideos(frame_root, on_error="skip")
    assert "w0_empty" in caplog.text and "walk/w0_empty" not in ds.video_ids
    with pytest.raises(FileNotFoundError, match="no_frames_here"):
        FrameFolderVideos(frame_root / "no_frames_here")


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "jump" / "clip.mp4", 20)
    write_video(root / "sit" / "clip.mkv", 12)  # mkv: no frame count in the header -> decoded
    return root


def test_video_files_windows_and_frames(video_root: Path, monkeypatch: pytest.MonkeyPatch):
    ds = VideoFileDataset(video_root, window=8, frames_per_window=3)
    assert ds.class_names == ["jump", "sit"]
    assert ds.video_ids == ["jump/clip.mp4", "sit/clip.mkv"]
    assert ds.video_frame_counts.tolist() == [20, 12]
    assert ds.ids == ["jump/clip.mp4#w0000", "jump/clip.mp4#w0001", "jump/clip.mp4#w0002", "sit/clip.mkv#w0000", "sit/clip.mkv#w0001"]
    assert ds.window_spans.tolist() == [[0, 8], [8, 16], [16, 20], [0, 8], [8, 12]]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]

    opened = []
    original = _SequentialDecoder._reopen

    def counting_reopen(self):
        opened.append(self.path.name)
        original(self)

    monkeypatch.setattr(_SequentialDecoder, "_reopen", counting_reopen)
    values = [[gray(f) for f in ds.load(i)] for i in range(len(ds))]
    assert opened == ["clip.mp4", "clip.mkv"]  # each file opened once for all its windows
    expected = [[0, 4, 7], [8, 12, 15], [16, 18, 19], [0, 4, 7], [8, 10, 11]]
    for got, frames in zip(values, expected):
        assert got == pytest.approx([12 * f for f in frames], abs=5)
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in ds.load(0))
    ds.load(0)  # going back reopens
    assert opened[-1] == "clip.mp4" and len(opened) == 3
    ds.close()


def test_video_overlapping_windows_use_cache(video_root: Path, monkeypatch: pytest.MonkeyPatch):
    ds = VideoFileDataset(video_root, window=8, stride=4, frames_per_window=8)
    assert ds.window_spans.tolist()[:4] == [[0, 8], [4, 12], [8, 16], [12, 20]]
    opened = []
    original = _SequentialDecoder._reopen
    monkeypatch.setattr(_SequentialDecoder, "_reopen", lambda self: (opened.append(1), original(self)))
    for i in range(4):  # each window re-reads half of the previous one: served from the cache
        start = ds.window_spans[i, 0]
        assert [gray(f) for f in ds.load(i)] == pytest.approx([12 * (start + k) for k in range(8)], abs=5)
    assert len(opened) == 1
    ds.close()


def test_video_file_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "vids"
    write_video(root / "a" / "good.mp4", 6)
    (root / "a" / "broken.mp4").write_bytes(b"definitely not a video" * 10)
    with pytest.raises(ImageReadError, match="broken.mp4"):
        VideoFileDataset(root, window=4)
    with caplog.at_level(logging.WARNING):
        ds = VideoFileDataset(root, window=4, on_error="skip")
    assert ds.video_ids == ["a/good.mp4"] and "broken.mp4" in caplog.text
    assert ds.window_spans.tolist() == [[0, 4], [4, 6]]
    (root / "b").mkdir()
    with pytest.raises(ValueError, match="holds no video files"):
        VideoFileDataset(root, on_error="skip")
    with pytest.raises(FileNotFoundError, match="novids"):
        VideoFileDataset(tmp_path / "novids")


def test_video_dataset_pickles_without_open_decoder(video_root: Path):
    ds = VideoFileDataset(video_root, window=8)
    ds.load(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._decoder is None and clone.ids == ds.ids
    assert gray(clone.load(1)[0]) == pytest.approx(96, abs=5)
    ds.close()
    clone.close()


def _load_in_child(ds: VideoFileDataset, queue) -> None:
    queue.put([round(gray(f)) for f in ds.load(1)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_video_dataset_works_in_forked_worker(video_root: Path):
    """A decoder opened before fork (DataLoader workers) must not be reused or freed in the child."""
    import multiprocessing

    ds = VideoFileDataset(video_root, window=8)
    ds.load(0)  # the parent now holds an open, threaded decoder
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_load_in_child, args=(ds, queue))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("loading a video window in a forked child hung")
    assert child.exitcode == 0 and queue.get(timeout=5) == pytest.approx([96], abs=5)
    assert [round(gray(f)) for f in ds.load(2)] == pytest.approx([192], abs=5)  # parent still fine
    ds.close()


# -- registry --------------------------------------------------------------------------------


def test_registry_dispatch(image_folder: Path, manifest_images: Path, cub_root: Path, frame_root: Path, video_root: Path):
    assert isinstance(load_dataset(str(image_folder)), ImageFolder)
    assert isinstance(load_dataset(f"folder:{image_folder}", on_error="skip"), ImageFolder)
    manifest = manifest_images / "m.jsonl"
    manifest.write_text(json.dumps({"path": "img/a.png", "label": "cat"}) + "\n")
    assert isinstance(load_dataset(str(manifest)), ManifestDataset)
    assert load_dataset(f"manifest:{manifest}", class_names=["dog", "cat"]).labels.tolist() == [1]
    cub_val = load_dataset(f"cub:{cub_root}@val", val_fraction=0.2, min_classes=3)
    assert isinstance(cub_val, CUB) and cub_val.split == "val" and len(cub_val) == 6
    assert load_dataset(f"cub:{cub_root}", attributes="all312").split == "train"
    frames = load_dataset(f"frames:{frame_root}", window=5, stride=None)
    assert isinstance(frames, FrameFolderVideos) and frames.window == 5
    videos = load_dataset(f"videos:{video_root}", window=10)
    assert isinstance(videos, VideoFileDataset) and len(videos) == 4
    assert parse_spec(f"cifar100:{video_root}@test") == ("cifar100", str(video_root), "test")


def test_registry_cifar_spec(fake_cifar: Path):
    ds = load_dataset(f"cifar10:{fake_cifar}@test")
    assert isinstance(ds, CIFAR) and ds.split == "test" and len(ds) == 3


def test_registry_errors_and_custom_schemes(tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ValueError, match=r"unknown dataset scheme 'imagenet'.*cifar10:.*folder:"):
        load_dataset("imagenet:/data")
    with pytest.raises(FileNotFoundError, match="neither an existing directory"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"'folder' does not take option\(s\) \['window'\]"):
        load_dataset(f"folder:{image_folder}", window=4)
    with pytest.raises(ValueError, match="no splits"):
        load_dataset(f"folder:{image_folder}@train")
    at_dir = tmp_path / "my@data"
    save_image(at_dir / "x" / "1.png", 5)
    assert load_dataset(f"folder:{at_dir}").ids == ["x/1.png"]  # '@' in an existing path is kept

    monkeypatch.setattr("cbm.data.registry.DATASET_SCHEMES", dict(DATASET_SCHEMES))
    calls = []

    def factory(path, split, options):
        calls.append((path, split, options))
        return ImageFolder(image_folder)

    register_dataset_scheme("mine", factory)
    register_dataset_scheme("mine", factory)  # same factory again: fine
    assert isinstance(load_dataset("mine:world@test", size=3), ImageFolder)
    assert calls == [("world", "test", {"size": 3})]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset_scheme("mine", lambda p, s, o: None)
    with pytest.raises(ValueError, match="word"):
        register_dataset_scheme("bad name", factory)
