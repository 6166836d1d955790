"""The offline toy world: determinism, concepts that match the pixels, spurious split, videos."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from cbm.data import toy
from cbm.data.base import ConceptDataset, VideoWindowDataset

K = toy.NUM_CONCEPTS
SIZE = 64


def _frame_px(size: int = SIZE) -> int:
    return max(2, int(round(toy.FRAME_WIDTH * size)))


def _object_pixels(image: np.ndarray) -> np.ndarray:
    """Saturated pixels (the object's colour; backgrounds and outlines are grey), frame excluded."""
    arr = image.astype(np.int32)
    mask = (arr.max(axis=2) - arr.min(axis=2)) > 80
    w = _frame_px(image.shape[0]) + 2  # a blurred frame bleeds inwards
    mask[:w] = mask[-w:] = False
    mask[:, :w] = mask[:, -w:] = False
    return mask


def _nearest_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour closest in chromaticity (brightness-normalised) to the masked pixels."""
    mean = image[mask].astype(np.float64).mean(axis=0)
    mean = mean / mean.max()
    return min(toy.PALETTE, key=lambda c: float(np.sum((np.array(toy.PALETTE[c]) / max(toy.PALETTE[c]) - mean) ** 2)))


def _on(vector: np.ndarray, name: str) -> bool:
    return bool(vector[toy.CONCEPT_INDEX[name]] > 0.5)


@pytest.fixture(scope="module")
def test_images():
    data = toy.ToyImages("test", n=400, seed=3)
    return data, data.render_all()


def test_concept_vocabulary_and_classes():
    assert len(toy.CONCEPTS) >= 30 and len(set(toy.CONCEPTS)) == len(toy.CONCEPTS)
    flat = [n for names in toy.CONCEPT_GROUPS.values() for n in names]
    assert flat == toy.CONCEPTS
    assert len(toy.CLASS_NAMES) >= 12
    matrix = toy.class_concept_matrix()
    assert matrix.shape == (len(toy.CLASS_NAMES), K)
    assert np.all((matrix >= 0) & (matrix <= 1))
    for group in ("shape", "colour", "pattern", "background"):  # exclusive, exhaustive groups
        idx = [toy.CONCEPT_INDEX[n] for n in toy.CONCEPT_GROUPS[group]]
        np.testing.assert_allclose(matrix[:, idx].sum(axis=1), 1.0)


def test_dataset_contract_and_determinism():
    a = toy.ToyImages("train", n=50, seed=7)
    b = toy.ToyImages("train", n=50, seed=7)
    assert isinstance(a, ConceptDataset)
    assert a.ids[42] == "toy/train/000042" and len(a) == 50
    assert a.concept_labels.dtype == np.float32 and a.concept_labels.shape == (50, K)
    assert a.concept_names == toy.CONCEPTS and a.class_names == toy.CLASS_NAMES
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.concept_labels, b.concept_labels)
    np.testing.assert_array_equal(np.asarray(a.load(13)), np.asarray(b.load(13)))
    assert a.fingerprint() == b.fingerprint()
    # a sample does not depend on how many are asked for
    longer = toy.ToyImages("train", n=80, seed=7)
    np.testing.assert_array_equal(np.asarray(longer.load(13)), np.asarray(a.load(13)))
    np.testing.assert_array_equal(longer.render_all([3, 13]), a.render_all([3, 13]))
    # other seeds, splits and parameters give other samples and fingerprints
    other = toy.ToyImages("train", n=50, seed=8)
    val = toy.ToyImages("val", n=50, seed=7)
    assert not np.array_equal(other.concept_labels, a.concept_labels)
    assert not np.array_equal(val.concept_labels, a.concept_labels)
    prints = {a.fingerprint(), other.fingerprint(), val.fingerprint(), longer.fingerprint(),
              toy.ToyImages("train", n=50, seed=7, spurious=0.5).fingerprint(),
              toy.ToyImages("train", n=50, seed=7, image_size=32).fingerprint()}
    assert len(prints) == 6
    image, label = a[5]
    assert image.size == (SIZE, SIZE) and image.mode == "RGB" and label == a.labels[5]
    assert toy.ToyImages("train", n=3, image_size=96).load(0).size == (96, 96)
    with pytest.raises(ValueError):
        toy.ToyImages("holdout", n=3)


def test_colour_matches_pixels(test_images):
    data, images = test_images
    checked = 0
    for i in range(len(data)):
        mask = _object_pixels(images[i])
        if mask.sum() < 8:
            continue
        checked += 1
        colour = _nearest_colour(images[i], mask)
        assert _on(data.concept_labels[i], colour), (i, colour)
    assert checked > 0.9 * len(data)


def test_background_matches_pixels(test_images):
    data, images = test_images
    w = _frame_px()
    for i in range(len(data)):
        inner = images[i, w:-w, w:-w].astype(np.float32)
        median = float(np.median(inner.mean(axis=2)))
        vec = data.concept_labels[i]
        if _on(vec, "light background"):
            assert median > 150, i
        elif _on(vec, "dark background"):
            assert median < 90, i
        else:
            assert _on(vec, "noisy background")
            assert 70 < median < 185, i
            if not _on(vec, "blurry"):
                grey = inner.mean(axis=2)
                assert np.median(np.abs(np.diff(grey, axis=1))) > 15, i


def test_position_and_frame_match_pixels(test_images):
    data, images = test_images
    checked = 0
    for i in range(len(data)):
        scene = data.scene(i)
        vec = data.concept_labels[i]
        mask = _object_pixels(images[i])
        border = images[i, 1, SIZE // 2:SIZE // 2 + 4].astype(np.float32).mean(axis=0)
        is_brown = float(np.abs(border - np.array(toy.FRAME_RGB)).max()) < 30
        assert is_brown == _on(vec, "frame around the image"), i
        margins = [abs(scene.cx - b) for b in (1 / 3, 2 / 3)] + [abs(scene.cy - b) for b in (1 / 3, 2 / 3)]
        if mask.sum() < 20 or min(margins) < 0.06:
            continue
        ys, xs = np.nonzero(mask)
        x, y = (xs.mean() + 0.5) / SIZE, (ys.mean() + 0.5) / SIZE
        assert (x < 1 / 3) == _on(vec, "on the left"), i
        assert (x > 2 / 3) == _on(vec, "on the right"), i
        assert (y < 1 / 3) == _on(vec, "at the top"), i
        assert (y > 2 / 3) == _on(vec, "at the bottom"), i
        checked += 1
    assert checked > 100


def test_size_and_pair_match_pixels(test_images):
    data, images = test_images
    areas = {"small": [], "large": []}
    for i in range(len(data)):
        vec = data.concept_labels[i]
        if _on(vec, "a pair of objects") or _on(vec, "frame around the image"):
            continue
        area = int(_object_pixels(images[i]).sum())
        for size in areas:
            if _on(vec, size):
                areas[size].append(area)
    assert np.median(areas["large"]) > 2 * np.median(areas["small"])


def test_classes_separable_from_concepts_not_single_concepts():
    train = toy.ToyImages("train", n=3000, seed=0)
    test = toy.ToyImages("test", n=2000, seed=0)
    clf = LogisticRegression(max_iter=2000).fit(train.concept_labels, train.labels)
    assert clf.score(test.concept_labels, test.labels) >= 0.97
    best_single = max(
        LogisticRegression(max_iter=300).fit(train.concept_labels[:, [k]], train.labels)
        .score(test.concept_labels[:, [k]], test.labels) for k in range(K)
    )
    assert best_single < 0.5
    # every concept value is common in training
    assert train.concept_labels.mean(axis=0).min() > 0.05


def test_class_concept_matrix_matches_samples_and_dependencies():
    data = toy.ToyImages("train", n=8000, seed=1)
    matrix = toy.class_concept_matrix()
    for c in range(len(toy.CLASS_NAMES)):
        empirical = data.concept_labels[data.labels == c].mean(axis=0)
        assert np.abs(empirical - matrix[c]).max() < 0.13
    np.testing.assert_allclose(matrix[data.labels].mean(axis=0), data.concept_labels.mean(axis=0), atol=0.03)
    # planted within-class dependencies: exact conditionals and their samples
    for name, pairs in toy.DEPENDENT_PAIRS.items():
        cond = toy.conditional_concept_matrix(name)
        c = toy.CLASS_NAMES.index(name)
        rows = data.concept_labels[data.labels == c]
        for a, b in pairs:
            i, j = toy.CONCEPT_INDEX[a], toy.CONCEPT_INDEX[b]
            assert cond[i, j] == pytest.approx(1.0)
            assert cond[i, j] > matrix[c, j] + 0.3  # knowing a changes the odds of b
            given = rows[rows[:, i] > 0.5]
            assert len(given) > 20 and given[:, j].mean() == 1.0


def test_spurious_background_in_train_not_in_test():
    strength = 0.9
    assigned = np.array([toy.BACKGROUNDS.index(toy.SPURIOUS_BACKGROUND[n]) for n in toy.CLASS_NAMES])
    bg_idx = [toy.CONCEPT_INDEX[f"{b} background"] for b in toy.BACKGROUNDS]

    def agreement(data: toy.ToyImages) -> float:
        background = data.concept_labels[:, bg_idx].argmax(axis=1)
        return float(np.mean(background == assigned[data.labels]))

    train = toy.ToyImages("train", n=3000, seed=0, spurious=strength)
    test = toy.ToyImages("test", n=3000, seed=0, spurious=strength)
    plain = toy.ToyImages("train", n=3000, seed=0)
    assert agreement(train) == pytest.approx(strength + (1 - strength) / 3, abs=0.03)
    assert agreement(test) == pytest.approx(1 / 3, abs=0.04)
    assert agreement(plain) == pytest.approx(1 / 3, abs=0.04)
    # the same objects: only backgrounds moved
    others = [k for k in range(K) if k not in bg_idx]
    np.testing.assert_array_equal(train.labels, plain.labels)
    np.testing.assert_array_equal(train.concept_labels[:, others], plain.concept_labels[:, others])
    matrix = toy.class_concept_matrix(strength)[:, bg_idx]
    np.testing.assert_allclose(matrix[np.arange(len(assigned)), assigned], strength + (1 - strength) / 3)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_render_speed():
    data = toy.ToyImages("train", n=600, seed=0)
    start = time.process_time()  # CPU time: other processes on a shared machine do not count
    data.render_all()
    rate = 600 / (time.process_time() - start)
    assert rate > 600  # about 1,300/s on one core


def test_captions_and_prompts():
    data = toy.ToyImages("train", n=40, seed=0)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    caps = [toy.caption(v, rng_a, toy.CLASS_NAMES[y]) for v, y in zip(data.concept_labels, data.labels)]
    assert caps == [toy.caption(v, rng_b, toy.CLASS_NAMES[y]) for v, y in zip(data.concept_labels, data.labels)]
    assert len(set(caps)) > 35
    assert any(toy.CLASS_NAMES[y] in c for c, y in zip(caps, data.labels))
    rng = np.random.default_rng(0)
    vec = data.concept_labels[0]
    colour = next(c for c in toy.COLOURS if _on(vec, c))
    many = [toy.caption(vec, rng) for _ in range(200)]
    share = np.mean([colour in c for c in many])
    assert 0.5 < share < 0.95  # attributes are kept with probability ~0.7
    for name in toy.CONCEPTS:
        prompts = toy.concept_prompts(name)
        assert prompts and all(isinstance(p, str) for p in prompts)
    assert toy.class_prompts("ice cube")[0] == "a photo of an ice cube"


# ------------------------------------------------------------------ videos


@pytest.fixture(scope="module")
def videos():
    return toy.ToyVideos("test", n=120, seed=0, window=4)


def test_video_contract(videos):
    assert isinstance(videos, VideoWindowDataset)
    assert len(videos.class_names) >= 6
    assert videos.video_lengths.min() >= 12 and videos.video_lengths.max() <= 48
    assert len(videos.ids) == len(videos.labels) == len(videos.window_video) == len(videos.window_spans)
    for v in range(5):
        rows = np.nonzero(videos.window_video == v)[0]
        spans = videos.window_spans[rows]
        assert spans[0, 0] == 0 and spans[-1, 1] == videos.video_lengths[v]
        assert np.all(videos.labels[rows] == videos.video_labels[v])
        truth = videos.frame_concepts(v)
        assert truth.shape == (videos.video_lengths[v], K)
        start, stop = spans[0]
        np.testing.assert_array_equal(videos.concept_labels[rows[0]], truth[start:stop].mean(0) >= 0.5)
    frames = videos.load(0)
    assert len(frames) == 1 and frames[0].size == (SIZE, SIZE)
    again = toy.ToyVideos("test", n=120, seed=0, window=4)
    np.testing.assert_array_equal(np.asarray(again.frame(3, 5)), np.asarray(videos.frame(3, 5)))
    assert again.fingerprint() == videos.fingerprint()
    assert toy.ToyVideos("test", n=120, seed=0, window=8).fingerprint() != videos.fingerprint()
    assert toy.ToyVideos("test", n=10, seed=0, window=4, frames_per_window=2).load(0).__len__() == 2


def test_order_dependent_video_classes(videos):
    assert len(toy.VIDEO_ORDER_PAIRS) >= 3
    for a, b in toy.VIDEO_ORDER_PAIRS:
        assert toy.VIDEO_CLASSES[a] == tuple(reversed(toy.VIDEO_CLASSES[b]))
    for v in range(len(videos.video_ids)):
        defining = [e["event"] for e in videos.event_spans(v, defining_only=True)]
        assert tuple(defining) == toy.VIDEO_CLASSES[videos.class_names[videos.video_labels[v]]]


def _frame(videos, v: int, t: int) -> np.ndarray:
    return np.asarray(videos.frame(v, t))


def test_video_event_spans_match_frames(videos):
    seen = set()
    for v in range(len(videos.video_ids)):
        truth = videos.frame_concepts(v)
        for event in videos.event_spans(v):
            name, start, stop = event["event"], event["start"], event["stop"]
            before, after = start - 1, stop - 1
            assert 0 <= before and after < len(truth)
            mask_before = _object_pixels(_frame(videos, v, before))
            mask_after = _object_pixels(_frame(videos, v, after))
            if name in ("turns red", "turns blue"):
                colour = name.split()[1]
                assert not _on(truth[before], colour) and _on(truth[after], colour)
                if stop < len(truth):
                    assert _on(truth[stop], colour)
                if mask_after.sum() >= 8 and mask_before.sum() >= 8:
                    assert _nearest_colour(_frame(videos, v, after), mask_after) == colour
                    assert _nearest_colour(_frame(videos, v, before), mask_before) != colour
                    seen.add(name)
            elif name == "appears":
                assert truth[before][: len(toy.SHAPES)].sum() == 0 and truth[after][: len(toy.SHAPES)].sum() == 1
                assert mask_before.sum() == 0
                seen.add(name)
            elif name == "disappears":
                assert truth[after][: len(toy.SHAPES)].sum() == 0
                assert mask_after.sum() == 0
                seen.add(name)
            elif name == "moves left":
                assert _on(truth[after], "on the left") and not _on(truth[before], "on the left")
                if mask_after.sum() >= 8 and mask_before.sum() >= 8:
                    assert np.nonzero(mask_after)[1].mean() < np.nonzero(mask_before)[1].mean() - 5
                    seen.add(name)
            elif name in ("grows", "shrinks"):
                sign = 1 if name == "grows" else -1
                scene_before = toy.video_frame_scene(videos.video(v), before)
                scene_after = toy.video_frame_scene(videos.video(v), after)
                assert sign * (scene_after.radius - scene_before.radius) > 0.03
                assert not np.array_equal(truth[before][12:14], truth[after][12:14])  # small/large changed
                seen.add(name)
            elif name == "becomes striped":
                assert _on(truth[after], "striped") and not _on(truth[before], "striped")
                seen.add(name)
    assert seen >= {"turns red", "turns blue", "appears", "disappears", "moves left", "grows", "shrinks",
                    "becomes striped"}


# ------------------------------------------------------------------ quality functions and shipped models


def test_quality_functions_on_synthetic_embeddings():
    from cbm.toymodels import quality

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=300)
    concepts = (rng.random((300, 5)) < 0.4).astype(np.float32)
    # text embedding k = axis k; images carry their concepts on those axes plus noise
    images = np.concatenate([concepts + 0.05 * rng.normal(size=(300, 5)), np.eye(4)[labels]], axis=1)
    concept_text = np.eye(9)[:5]
    auc = quality.concept_auc(images, concept_text, concepts, list("abcde"), {"first": ["a", "b"], "rest": ["c", "d", "e"]})
    assert auc["mean"] > 0.99 and set(auc["per_group"]) == {"first", "rest"}
    shuffled = quality.concept_auc(images, concept_text[::-1], concepts)
    assert shuffled["mean"] < 0.8
    class_text = np.eye(9)[5:]
    assert quality.zero_shot_accuracy(images, class_text, labels) == 1.0
    probe = quality.linear_probe(images[:150], labels[:150], images[150:200], labels[150:200], images[200:], labels[200:])
    assert probe["accuracy"] > 0.95 and probe["C"] in quality.DEFAULT_CS
    constant = quality.concept_auc(images, concept_text, np.zeros_like(concepts))
    assert np.isnan(constant["mean"])  # no positives: undefined, not a fake 0.5
    report = quality.format_report("synthetic", quality.evaluate(
        train=(images[:150], labels[:150]), val=(images[150:200], labels[150:200]), test=(images[200:], labels[200:]),
        test_concepts=concepts[200:], concept_text_embeddings=concept_text, class_text_embeddings=class_text))
    assert "linear probe" in report and "zero-shot" in report


def _assets():
    from cbm.toymodels import TOY_CLIP_DIR, TOY_CNN_DIR

    if not (TOY_CLIP_DIR / "open_clip_model.safetensors").is_file() or not (TOY_CNN_DIR / "model.safetensors").is_file():
        pytest.skip("shipped toy models not built (python -m cbm.toymodels.train)")
    return TOY_CLIP_DIR, TOY_CNN_DIR


def test_shipped_assets_are_self_describing_and_small():
    import json

    from safetensors import safe_open

    clip_dir, cnn_dir = _assets()
    total = sum(f.stat().st_size for d in (clip_dir, cnn_dir) for f in d.iterdir())
    assert total <= 25 * 2**20
    clip_cfg = json.loads((clip_dir / "open_clip_config.json").read_text())
    assert clip_cfg["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert clip_cfg["preprocess_cfg"]["size"] == 64 and len(clip_cfg["preprocess_cfg"]["mean"]) == 3
    cnn_cfg = json.loads((cnn_dir / "config.json").read_text())
    for key in ("architecture", "kwargs", "image_size", "mean", "std", "class_names", "layer"):
        assert key in cnn_cfg
    assert cnn_cfg["class_names"] == toy.CLASS_NAMES
    for path in (clip_dir / "open_clip_model.safetensors", cnn_dir / "model.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert "torch.float16" in {str(d) for d in dtypes} and "torch.float32" not in {str(d) for d in dtypes}
    for directory in (clip_dir, cnn_dir):
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["world_version"] == toy.WORLD_VERSION


def test_shipped_clip_loads_with_open_clip_and_detects_concepts():
    import open_clip
    import torch

    from cbm.toymodels import quality

    clip_dir, _ = _assets()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    data = toy.ToyImages("test", n=300, seed=11)
    with torch.inference_mode():
        images = model.encode_image(torch.stack([preprocess(data.load(i)) for i in range(len(data))]))
        text = []
        for name in toy.CONCEPTS:
            emb = model.encode_text(tokenizer(toy.concept_prompts(name)))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            text.append(emb.mean(0))
        text = torch.stack(text)
    auc = quality.concept_auc(images, text, data.concept_labels, toy.CONCEPTS, toy.CONCEPT_GROUPS)
    assert auc["mean"] >= 0.88, auc["per_group"]  # acceptance: >= 0.90 on 3000 test images (metrics.json)
    assert auc["per_group"]["colour"] > 0.95 and auc["per_group"]["position"] > 0.9


def test_shipped_cnn_rebuilds_from_its_config():
    import json

    import torch
    from safetensors.torch import load_file
    from torchvision import models

    _, cnn_dir = _assets()
    cfg = json.loads((cnn_dir / "config.json").read_text())
    model = models.get_model(cfg["architecture"], weights=None, **cfg["kwargs"]).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(str(cnn_dir / "model.safetensors")).items()})
    data = toy.ToyImages("test", n=300, seed=11)
    size = cfg["image_size"]  # world images are upsampled for the CNN (bilinear, as cbm.backbones does)
    x = torch.from_numpy(np.stack([np.asarray(data.load(i).resize((size, size), Image.BILINEAR))
                                   for i in range(len(data))])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    captured = []
    layer = dict(model.named_modules())[cfg["layer"]]
    layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.inference_mode():
        logits = model(x)
    features = captured[0].mean(dim=(2, 3)) if captured[0].ndim == 4 else captured[0]
    assert features.shape == (300, cfg["embed_dim"])
    assert (logits.argmax(1).numpy() == data.labels).mean() > 0.8


@pytest.mark.parametrize("spec", ["toy:clip", "toy:cnn"])
def test_shipped_models_linear_probe(toy_splits, spec):
    """Acceptance: a linear probe on either shipped model's embeddings reaches 0.90 on test (margin 0.01)."""
    from cbm.toymodels import quality

    _assets()
    splits = toy_splits(spec)[1]
    probe = quality.linear_probe(*(v for s in ("train", "val", "test") for v in (splits[s].features, splits[s].labels)))
    assert probe["accuracy"] >= 0.89, probe


def test_shipped_clip_zero_shot_classes_well_above_chance(toy_splits):
    from cbm.toymodels import quality

    _assets()
    clip, splits = toy_splits("toy:clip")
    test = splits["test"]
    classes = torch.stack([torch.nn.functional.normalize(clip.encode_texts(toy.class_prompts(name)), dim=1).mean(0)
                           for name in toy.CLASS_NAMES])
    accuracy = quality.zero_shot_accuracy(test.features, classes, test.labels)
    assert accuracy > 8 / toy.NUM_CLASSES, accuracy  # chance is 1/17; the shipped model scores ~0.98
