"""The concept editor with hostile input, through app/session.py and app/cli.py (no browser): it binds to
localhost unless told otherwise, caps uploads, decodes uploads from their bytes only (never a path named by
the upload), keeps typed file names inside the model's folder, and fails on a crafted bundle like cbm.load."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import capture_app_launch, rewrite_manifest

from app import cli as app_cli
from app.session import EditorSession, OpenedData, read_upload
from cbm.data.base import ImageReadError
from cbm.models import BundleError, PosthocCBM, load
from concepts import ConceptBank


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_editor_binds_to_localhost_unless_asked_and_caps_uploads(monkeypatch, tmp_path):
    command = capture_app_launch(monkeypatch, [])[0]
    assert command[:2] == ["run", str(Path(app_cli.__file__).with_name("editor.py"))]  # Streamlit's, in-process
    assert option(command, "--server.address") == "127.0.0.1"
    assert option(command, "--server.maxUploadSize") == "20"  # MB, the same cap read_image_bytes applies
    assert option(capture_app_launch(monkeypatch, ["--host", "0.0.0.0"])[0], "--server.address") == "0.0.0.0"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        capture_app_launch(monkeypatch, [str(tmp_path / "../../no/such/model.cbm")])


def png(colour, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_are_decoded_from_their_bytes_and_limited(tmp_path):
    decoy = tmp_path / "decoy.png"
    decoy.write_bytes(png((255, 0, 0)))
    image = read_upload(str(decoy), png((0, 0, 255)))  # a name that is a real file elsewhere: never read
    assert image.getpixel((0, 0)) == (0, 0, 255)
    assert read_upload("../../../etc/passwd.png", png((0, 255, 0))).getpixel((0, 0)) == (0, 255, 0)
    refusals = {
        "../../etc/passwd": (b"root:x:0:0:root:/root:/bin/bash\n", "not a png"),
        "/etc/passwd.png": (b"root:x:0:0:root:/root:/bin/bash\n", "not an image"),
        "drawing.svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a png"),
        "scan.tga": (png((0, 0, 0)), "not a png"),
        "photo.jpg": (b"\xff\xd8\xff" + bytes(21 * 2**20), "MB"),
        "bomb.png": (None, "pixels"),
    }
    for name, (data, message) in refusals.items():
        if data is None:
            buffer = io.BytesIO()
            Image.new("1", (8000, 8000)).save(buffer, "PNG")  # 64 M pixels in a few kB
            data = buffer.getvalue()
        with pytest.raises(ImageReadError, match=message):
            read_upload(name, data)


@pytest.fixture
def session(tmp_path):
    bank = ConceptBank([f"c{i}" for i in range(3)], torch.randn(3, 6), kind="cav")
    model = PosthocCBM(bank, device="cpu").fit(torch.randn(30, 6), torch.arange(30) % 2)
    path = model.save(tmp_path / "models" / "model.cbm")
    return EditorSession.on(OpenedData(path, "none", load(path), None, None, None))


def test_typed_file_names_stay_inside_the_model_folder(session, tmp_path):
    folder = tmp_path / "models"
    assert session.save("edited") == folder / "edited.cbm"
    assert session.save(str(folder / "sub" / ".." / "again.cbm")) == folder / "again.cbm"
    (folder / "out").symlink_to(tmp_path)
    for typed in ("../../etc/passwd", "../escaped.cbm", "sub/../../escaped.cbm", "out/escaped.cbm", "",
                  "name\x00.cbm"):
        with pytest.raises(ValueError) as info:
            session.save(typed)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "escaped.cbm").exists() and sorted(p.name for p in folder.iterdir()) == [
        "again.cbm", "edited.cbm", "model.cbm", "out"]
    assert [entry.kind for entry in session.trail] == ["save", "save"]


def test_a_crafted_bundle_fails_in_the_editor_as_in_the_api(session, tmp_path):
    crafted = tmp_path / "models" / "crafted.cbm"
    crafted.write_bytes(session.model_path.read_bytes())
    rewrite_manifest(crafted, lambda manifest, header: manifest.update(family="evil", n_features_in=10**12))
    with pytest.raises(BundleError) as api:
        load(crafted)
    with pytest.raises(BundleError) as editor:
        EditorSession.open(crafted, "toy:images@val", cache_dir=tmp_path / "cache")
    assert str(editor.value) == str(api.value) and "unknown model family" in str(api.value)
    with pytest.raises(FileNotFoundError):
        EditorSession.open(tmp_path / "models" / ".." / ".." / "missing.cbm", "toy:images@val")
