"""Backbones: tiny open_clip and torchvision models built without weights; fingerprints; offline errors."""

import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cbm import backbones
from cbm.backbones import FeatureBackbone, WeightsUnavailableError, load_backbone
from tiny_models import write_tiny_clip_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def images(backbone, n=3):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]
    return torch.stack([backbone.preprocess(Image.new("RGB", (48, 40), colours[i % 4])) for i in range(n)])


def test_openclip_local_dir_shapes_and_determinism(clip_dir):
    first = load_backbone(f"openclip:local-dir:{clip_dir}", device="cpu")
    second = load_backbone(f"openclip:local-dir:{clip_dir}", device="cpu")
    batch = images(first)
    assert batch.shape == (3, 3, 32, 32)
    features = first.encode_images(batch)
    assert features.shape == (3, first.embed_dim) == (3, 32)
    assert features.dtype == torch.float32 and not features.requires_grad
    assert torch.equal(features, second.encode_images(batch))
    assert not torch.allclose(features[0], features[1])
    texts = first.encode_texts(["a red square", "a green square"])
    assert texts.shape == (2, 32) and not torch.allclose(texts[0], texts[1])
    assert first.fingerprint == second.fingerprint
    assert not first.model.training


def test_fingerprint_covers_preprocessing_and_weights(clip_dir, tmp_path):
    base = load_backbone(f"openclip:local-dir:{clip_dir}", device="cpu")
    other_mean = write_tiny_clip_dir(tmp_path / "mean", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    other_interp = write_tiny_clip_dir(tmp_path / "interp", interpolation="bilinear")
    other_weights = write_tiny_clip_dir(tmp_path / "weights", seed=1)
    prints = {base.fingerprint}
    for path in (other_mean, other_interp, other_weights):
        prints.add(load_backbone(f"openclip:local-dir:{path}", device="cpu").fingerprint)
    assert len(prints) == 4
    # same weights, other preprocessing: other embeddings, as the fingerprint says
    same_weights = load_backbone(f"openclip:local-dir:{other_mean}", device="cpu")
    image = Image.new("RGB", (40, 40), (200, 50, 20))
    assert not torch.allclose(base.encode_images(base.preprocess(image)[None]),
                              same_weights.encode_images(same_weights.preprocess(image)[None]))


def test_openclip_text_requires_list(clip_dir):
    backbone = load_backbone(f"openclip:local-dir:{clip_dir}", device="cpu")
    with pytest.raises(TypeError, match="list of strings"):
        backbone.encode_texts("a red square")


def test_torchvision_penultimate_and_named_layer():
    penultimate = load_backbone("torchvision:resnet18@random", device="cpu")
    assert isinstance(penultimate, FeatureBackbone)
    assert penultimate.embed_dim == 512
    batch = torch.randn(2, 3, 64, 64)
    features = penultimate.encode_images(batch)
    assert features.shape == (2, 512)
    # penultimate features are exactly what the classifier consumes
    logits = penultimate.model(batch)
    assert torch.allclose(penultimate.model.fc(features), logits, atol=1e-4)
    layer3 = load_backbone("torchvision:resnet18@random", device="cpu", layer="layer3")
    assert layer3.embed_dim == 256 and layer3.encode_images(batch).shape == (2, 256)
    assert layer3.fingerprint != penultimate.fingerprint
    # @random is reproducible: the same spec gives the same weights
    assert load_backbone("torchvision:resnet18@random", device="cpu").fingerprint == penultimate.fingerprint


def test_torchvision_local_weights_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision import models
    torch.manual_seed(3)
    state = models.resnet18().state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = load_backbone(f"torchvision:resnet18@{path}", device="cpu")
    assert torch.equal(backbone.model.conv1.weight, state["conv1.weight"])


def test_bad_specs_and_layers_have_clear_errors():
    with pytest.raises(ValueError, match="cannot read backbone spec"):
        load_backbone("resnet50")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        load_backbone("torchvision:resnet5000@DEFAULT")
    with pytest.raises(ValueError, match="no weights 'NOPE'"):
        load_backbone("torchvision:resnet18@NOPE")
    with pytest.raises(ValueError, match="layer 'layer9' is not a module"):
        load_backbone("torchvision:resnet18@random", layer="layer9")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_backbone("openclip:NoSuchNet@x")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_backbone("openclip:local-dir:/nonexistent/folder")
    with pytest.raises(ValueError, match="encode_images expects"):
        load_backbone("torchvision:resnet18@random", device="cpu").encode_images(torch.zeros(3, 32, 32))


def test_missing_weights_fail_fast_offline_in_a_fresh_process(tmp_path):
    """The acceptance check: empty caches + HF_HUB_OFFLINE=1 -> one sentence in well under 5 s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    code = ("import time; t = time.time()\n"
            "from cbm.backbones import load_backbone\n"
            "try:\n    load_backbone('openclip:ViT-B-32@laion2b_s34b_b79k')\n"
            "except Exception as error:\n    print(type(error).__name__, '|', error, '|', time.time() - t)\n")
    started = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "WeightsUnavailableError" in out.stdout, out.stderr
    _, message, _ = out.stdout.split(" | ")
    assert "openclip:ViT-B-32@laion2b_s34b_b79k" in message and str(tmp_path / "hf") in message
    assert "HF_HUB_OFFLINE=1" in message and message.count(". ") == 0  # one sentence
    assert time.time() - started < 30  # includes interpreter + torch import; the load itself is instant


@pytest.mark.parametrize("spec", ["torchvision:resnet50@IMAGENET1K_V2", "timm:resnet18", "openclip:hf-hub:org/repo"])
def test_other_missing_weights_fail_offline(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(backbones, "_hf_cached", lambda repo, names: False)
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE=1 forbids downloads"):
        load_backbone(spec)


def test_unreachable_network_fails_without_waiting(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbones, "_hf_cached", lambda repo, names: False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbones.socket, "create_connection", refuse)
    with pytest.raises(WeightsUnavailableError, match="huggingface.co cannot be reached"):
        load_backbone("openclip:ViT-B-32@laion2b_s34b_b79k")
