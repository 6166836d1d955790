"""Untrusted files: crafted and corrupted model bundles (with a seeded fuzz of a real one), hostile images
(truncated, 1x1, decompression bombs, CMYK / 16-bit / alpha / palette modes, EXIF rotation, random damage) and
videos (zero, one frame, truncated, garbage), and cbm.embed's on_error="skip" over such files. Every outcome is
a correct load or one clean error (a ValueError or ImageReadError subclass); nothing executes, hangs or
allocates what the file merely declares."""

from __future__ import annotations

import io
import json
import pickle
import random
import resource
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import rewrite_manifest, write_tiny_clip_dir, write_video

from cbm.backbones import load_backbone
from cbm.data.base import ImageReadError, read_image, read_image_bytes
from cbm.data.folders import ImageFolder
from cbm.data.video import VideoFileDataset
from cbm.embed import embed
from cbm.models import BundleError, PosthocCBM, TemporalCBM, load
from concepts import ConceptBank

D, K, C = 8, 4, 3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real PCBM-h bundle (bank, head and residual tensors), its bytes and its predictions on a probe batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, D, generator=g), torch.arange(60) % C
    bank = ConceptBank([f"c{i}" for i in range(K)], torch.randn(K, D, generator=g), kind="cav", backbone="fp-a")
    model = PosthocCBM(bank, hybrid=True, residual_epochs=2, device="cpu").fit(x, y)
    path = model.save(tmp_path_factory.mktemp("bundle") / "model.cbm")
    return {"path": path, "bytes": path.read_bytes(), "probe": x[:8], "logits": model.decision_function(x[:8])}


def craft(bundle, tmp_path, change) -> Path:
    path = tmp_path / "crafted.cbm"
    path.write_bytes(bundle["bytes"])
    rewrite_manifest(path, change)
    return path


def _set(key, value):
    def change(manifest, header):
        manifest[key] = value
    return change


def _shape(name, shape, header_too=True):
    def change(manifest, header):
        manifest["tensors"][name] = shape
        if header_too:
            header[name]["shape"] = shape
    return change


def _rename_tensor(old, new):
    def change(manifest, header):  # and drop the checksum (as in a bundle from before checksums), else it trips first
        manifest["tensors"][new] = manifest["tensors"].pop(old)
        header[new] = header.pop(old)
        del header["__metadata__"]["cbm_tensor_sha256"]
    return change


def _other_bank_backbone(manifest, header):
    manifest["backbone"]["fingerprint"] = "fp-a"
    manifest["state"]["bank"]["backbone"] = "fp-b"


CRAFTED = {
    "unknown family": (_set("family", "../../evil"), "unknown model family"),
    "family not a string": (_set("family", {"x": 1}), "unknown model family"),
    "newer format": (_set("format_version", "2.0"), "newer"),
    "unreadable format version": (_set("format_version", "one"), "format version"),
    "format version null": (_set("format_version", None), "format version"),
    "another format": (_set("format", "pickle"), "not a cbm model bundle"),
    "10^12-element tensor": (_shape("weight", [10**6, 10**6]), "absurdly large"),
    "negative dimension": (_shape("weight", [-1, K]), "invalid shape"),
    "shape is a string": (_shape("weight", "3x4"), "invalid shape"),
    "manifest and header shapes differ": (_shape("weight", [C, K + 1], header_too=False), "manifest says"),
    "tensor list missing": (_set("tensors", None), "no tensor list"),
    "declared tensor missing": (_rename_tensor("weight", "weight_gone"), "inconsistent"),
    "tensor name with path separators": (_rename_tensor("weight", "../../etc/passwd"), "inconsistent"),
    "class names with path separators and duplicates": (_set("class_names", ["../a", "../a", "/etc"]), "unique"),
    "class names a string": (_set("class_names", "abc"), "class_names"),
    "concept names not strings": (_set("concept_names", [1, 2, 3, 4]), "concept_names"),
    "width a float": (_set("n_features_in", 8.5), "n_features_in"),
    "backbone not a mapping": (_set("backbone", "toy:clip"), "backbone"),
    "unexpected hyperparameter": (_set("params", {"evil": "__import__('os')"}), "inconsistent"),
    "edit record with unknown fields": (_set("edits", [{"action": "prune", "shell": "rm -rf /"}]), "inconsistent"),
    "bank of another backbone": (_other_bank_backbone, "another backbone"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_manifests_are_refused_cleanly(bundle, tmp_path, case):
    change, message = CRAFTED[case]
    path = craft(bundle, tmp_path, change)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(BundleError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value) and time.perf_counter() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big allocated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.cbm"]  # names were never used as paths


def test_names_with_path_separators_are_only_names(bundle, tmp_path):
    path = craft(bundle, tmp_path, _set("class_names", ["../../etc/passwd", "/tmp/x", "C:\\a"]))
    model = load(path)
    assert model.class_names == ["../../etc/passwd", "/tmp/x", "C:\\a"]
    assert torch.equal(model.decision_function(bundle["probe"]), bundle["logits"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.cbm"]


def header_of(raw: bytes) -> tuple[int, dict]:
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8:8 + size])


def with_header(raw: bytes, header: dict) -> bytes:
    size, _ = header_of(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:]


def test_broken_safetensors_are_refused(bundle, tmp_path):
    raw = bundle["bytes"]
    size, header = header_of(raw)
    cases = {
        "empty file": b"",
        "shorter than the length prefix": raw[:5],
        "header length beyond the file": struct.pack("<Q", 2**62) + raw[8:],
        "header cut short": raw[:8 + size // 2],
        "tensor data cut short": raw[:-17],
        "header not JSON": raw[:8] + b"\xff" * size + raw[8 + size:],
        "header nested 100k deep": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000 + raw[8 + size:],
        "manifest nested 100k deep": with_header(raw, {**header, "__metadata__": {
            "cbm_manifest": header["__metadata__"]["cbm_manifest"][:-1] + ', "x": ' + "[" * 10**5 + "]" * 10**5 + "}"}}),
        "no manifest": with_header(raw, {k: v for k, v in header.items() if k != "__metadata__"}),
        "manifest not JSON": with_header(raw, {**header, "__metadata__": {"cbm_manifest": "{not json"}}),
        "manifest a list": with_header(raw, {**header, "__metadata__": {"cbm_manifest": "[1, 2]"}}),
        "offsets outside the data": with_header(raw, {**header, "weight": {**header["weight"],
                                                                           "data_offsets": [0, 10**9]}}),
        "dtype changed": with_header(raw, {**header, "weight": {**header["weight"], "dtype": "F64"}}),
        "a pickle": pickle.dumps({"weight": torch.zeros(3)}),
    }
    for name, content in cases.items():
        path = tmp_path / "broken.cbm"
        path.write_bytes(content)
        with pytest.raises(BundleError) as info:
            load(path)
        assert "\n" not in str(info.value), name


def test_flipped_tensor_bytes_fail_the_checksum(bundle, tmp_path):
    raw = bytearray(bundle["bytes"])
    raw[-3] ^= 0x10  # inside the last tensor's data: still a well-formed safetensors file
    path = tmp_path / "flipped.cbm"
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="checksum"):
        load(path)


def test_loading_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.cbm"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BundleError):
        load(path)
    torch.save({"x": Payload()}, tmp_path / "evil2.cbm", _use_new_zipfile_serialization=True)
    with pytest.raises(BundleError):
        load(tmp_path / "evil2.cbm")
    assert not marker.exists()


class Hang(Exception):
    pass


def test_fuzzed_bundles_load_correctly_or_fail_cleanly(bundle, tmp_path):
    """100 seeded damaged copies: single bit flips, random bytes, zeroed runs, printable bytes in the header,
    truncations. A load must give the original logits; anything else must be one BundleError, within 5 s."""
    raw, (size, _) = bundle["bytes"], header_of(bundle["bytes"])
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "refused": 0}

    def alarm(*_):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        for case in range(100):
            data = bytearray(raw)
            kind = case % 5
            if kind == 0:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif kind == 1:
                for _ in range(rng.randint(2, 16)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 2:
                start = rng.randrange(len(data))
                data[start:start + 32] = bytes(len(data[start:start + 32]))
            elif kind == 3:
                data[8 + rng.randrange(size)] = rng.randrange(32, 127)
            else:
                data = data[:rng.randrange(len(data))]
            path = tmp_path / f"fuzz{case}.cbm"
            path.write_bytes(bytes(data))
            signal.alarm(5)
            try:
                model = load(path)
                assert torch.equal(model.decision_function(bundle["probe"]), bundle["logits"]), case
                outcomes["loaded"] += 1
            except BundleError as error:
                assert "\n" not in str(error)
                outcomes["refused"] += 1
            finally:
                signal.alarm(0)
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > 50 and sum(outcomes.values()) == 100, outcomes


def test_temporal_bundle_with_crafted_network_shapes(tmp_path):
    bank = ConceptBank([f"c{i}" for i in range(K)], torch.randn(K, D), kind="text")
    sequences = [torch.randn(3, D) for _ in range(12)]
    path = TemporalCBM(bank, epochs=1, device="cpu").fit(sequences, torch.arange(12) % C).save(tmp_path / "t.cbm")

    def grow(manifest, header):
        manifest["tensors"]["net.classifier.weight"] = [10**7, 10**6]
        header["net.classifier.weight"]["shape"] = [10**7, 10**6]

    rewrite_manifest(path, grow)
    with pytest.raises(BundleError, match="absurdly large"):
        load(path)


# ----------------------------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header is rewritten to declare ``width`` x ``height`` (CRC fixed): a bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def mode_cases() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """Encoded images of awkward modes and the RGB colour the toolkit must give their first pixel."""
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    return {
        "1x1 RGB": (encode(Image.new("RGB", (1, 1), (1, 2, 3))), (1, 2, 3)),
        "CMYK JPEG": (encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        "16-bit greyscale": (encode(Image.fromarray(np.full((4, 4), 40000, np.uint16))), (156, 156, 156)),
        "32-bit greyscale TIFF": (encode(Image.fromarray(np.full((4, 4), 65535, np.int32)), "TIFF"), (255, 255, 255)),
        "float greyscale TIFF": (encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"), (128, 128, 128)),
        "RGBA fully transparent red": (encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), (255, 255, 255)),
        "RGBA opaque blue": (encode(Image.new("RGBA", (4, 4), (0, 0, 255, 255))), (0, 0, 255)),
        "LA black at half alpha": (encode(Image.new("LA", (4, 4), (0, 128))), (127, 127, 127)),
        "P with a transparent index": (encode(palette), (255, 255, 255)),
        "1-bit": (encode(Image.new("1", (4, 4), 1)), (255, 255, 255)),
    }


@pytest.mark.parametrize("case", list(mode_cases()))
def test_image_modes_become_the_right_rgb(tmp_path, case):
    data, colour = mode_cases()[case]
    path = tmp_path / "image.img"
    path.write_bytes(data)
    for image in (read_image(path), read_image_bytes(data, formats=("PNG", "JPEG", "TIFF"))):
        assert image.mode == "RGB"
        assert max(abs(a - b) for a, b in zip(image.getpixel((0, 0)), colour)) <= 2, (case, image.getpixel((0, 0)))


def test_exif_rotation_is_applied():
    pixels = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high, red top-left corner
    pixels[:3, :3] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    image = read_image_bytes(data)
    assert image.size == (10, 20)
    assert image.getpixel((8, 1))[0] > 200 and image.getpixel((1, 1))[0] < 60  # the corner is now top-right


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header_bomb = png_declaring(100_000, 100_000)  # 10^10 pixels declared by a 70-byte file
    with pytest.raises(ImageReadError, match="pixels"):
        read_image_bytes(header_bomb)
    (tmp_path / "bomb.png").write_bytes(header_bomb)
    with pytest.raises(ImageReadError, match="bomb.png.*pixels"):
        read_image(tmp_path / "bomb.png")
    # a real one: 144 M pixels, above our 100 M limit but below Pillow's own error threshold (179 M)
    real = tmp_path / "real_bomb.png"
    Image.new("1", (12_000, 12_000)).save(real)
    assert real.stat().st_size < 100_000
    with pytest.raises(ImageReadError, match="144,000,000 pixels|12000x12000"):
        read_image(real)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 150_000  # KiB (the 18 MB bitmap we drew)
    assert time.perf_counter() - started < 5


def test_uploads_are_limited_in_size_and_format():
    with pytest.raises(ImageReadError, match="MB"):
        read_image_bytes(b"\x89PNG" + bytes(21 * 2**20))
    tga = encode(Image.new("RGB", (4, 4)), "TGA")
    assert read_image(io.BytesIO(tga)).size == (4, 4)  # a dataset file may be any format Pillow reads
    with pytest.raises(ImageReadError, match="not an image"):
        read_image_bytes(tga)  # an upload only PNG, JPEG, BMP, WebP, GIF or TIFF
    with pytest.raises(ImageReadError, match="not an image"):
        read_image_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def test_fuzzed_images_decode_or_fail_cleanly():
    """200 seeded damaged images of six formats: each decodes to RGB or raises ImageReadError, nothing else."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 3
    seeds = [encode(base), encode(base, "JPEG", exif=exif), encode(base.convert("P"), "GIF"), encode(base, "WEBP"),
             encode(base, "BMP"), encode(base.convert("RGBA"), "TIFF")]
    draw = random.Random(7)
    decoded = 0
    for case in range(200):
        data = bytearray(seeds[case % len(seeds)])
        if case % 2:
            data = data[:draw.randrange(len(data))]
        else:
            for _ in range(draw.randint(1, 6)):
                data[draw.randrange(len(data))] = draw.randrange(256)
        try:
            decoded += read_image_bytes(bytes(data)).mode == "RGB"
        except ImageReadError as error:
            assert "\n" not in str(error)
    assert 0 < decoded < 200


# ----------------------------------------------------------------------------------------- videos
def test_zero_and_single_frame_and_broken_videos(tmp_path, caplog):
    write_video(tmp_path / "a" / "one.avi", 1, size=16, rate=5, shade_step=60)
    write_video(tmp_path / "b" / "three.avi", 3, size=16, rate=5, shade_step=60)
    write_video(tmp_path / "b" / "zero.avi", 0, size=16, rate=5, shade_step=60)
    (tmp_path / "b" / "cut.avi").write_bytes((tmp_path / "b" / "three.avi").read_bytes()[:300])
    (tmp_path / "b" / "noise.mp4").write_bytes(bytes(range(256)) * 4)
    with pytest.raises((ImageReadError, ValueError)) as info:
        VideoFileDataset(tmp_path, window=2)
    assert "cut.avi" in str(info.value) or "noise.mp4" in str(info.value) or "zero.avi" in str(info.value)
    videos = VideoFileDataset(tmp_path, window=2, on_error="skip")
    assert videos.video_ids == ["a/one.avi", "b/three.avi"]
    assert [videos.load(i)[0].mode for i in range(len(videos))] == ["RGB"] * 3  # one window + two windows
    assert videos.load(0)[0].size == (16, 16)
    for name in ("zero.avi", "cut.avi", "noise.mp4"):
        assert name in caplog.text
    write_video(tmp_path / "empty" / "c" / "zero.avi", 0, size=16, rate=5, shade_step=60)
    with pytest.raises(ValueError, match="no usable videos"):
        VideoFileDataset(tmp_path / "empty", on_error="skip")


# ----------------------------------------------------------------------------------------- cbm.embed
def test_embed_skips_unreadable_files_and_converts_the_rest(tmp_path, caplog):
    folder = tmp_path / "data" / "things"
    folder.mkdir(parents=True)
    good = {name: data for name, (data, _) in mode_cases().items() if "TIFF" not in name}
    for i, data in enumerate(good.values()):
        (folder / f"good{i}.png").write_bytes(data)
    (folder / "bomb.png").write_bytes(png_declaring(50_000, 50_000))
    (folder / "cut.png").write_bytes(encode(Image.new("RGB", (64, 64), (9, 9, 9)))[:60])
    (folder / "text.jpg").write_bytes(b"this is not a jpeg")
    backbone = load_backbone(f"openclip:local-dir:{write_tiny_clip_dir(tmp_path / 'clip')}", device="cpu")
    with pytest.raises(ImageReadError, match="bomb.png"):
        embed(backbone, ImageFolder(tmp_path / "data"), cache=False, progress=False, num_workers=0)
    result = embed(backbone, ImageFolder(tmp_path / "data", on_error="skip"), cache_dir=tmp_path / "cache",
                   progress=False, num_workers=0)
    assert sorted(result.skipped) == ["things/bomb.png", "things/cut.png", "things/text.jpg"]
    assert len(result) == len(good) and torch.isfinite(result.features).all()
    for name in ("bomb.png", "cut.png", "text.jpg"):
        assert name in caplog.text
