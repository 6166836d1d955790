"""Frozen image backbones behind one interface: open_clip, torchvision, timm and the toy models.

``load_backbone(spec)`` parses a spec string and returns a :class:`Backbone` that carries its own
preprocessing, an ``embed_dim`` and a ``fingerprint`` covering both the weights and the
preprocessing (the same weights with another preprocessing give other embeddings, so the
embedding cache must tell them apart). Backbones are always in ``eval()`` mode and encode under
``torch.inference_mode``; on CUDA they run in bfloat16 autocast.

Spec strings::

    openclip:ViT-B-32@laion2b_s34b_b79k   open_clip architecture @ pretrained tag ("random": no weights)
    openclip:hf-hub:ORG/REPO              open_clip model + preprocessing from a Hugging Face repo
    openclip:local-dir:PATH               open_clip_config.json + weights in a folder
    torchvision:resnet50@IMAGENET1K_V2    torchvision architecture @ weights enum tag, "DEFAULT",
                                          "random", or a path to a .safetensors/.pth state dict
    timm:convnext_tiny                    timm model with its pretrained weights; "@random" or
                                          "@PATH" (a local weight file) as for torchvision
    toy:clip, toy:cnn                     the offline models shipped with the toolkit

Weights that are missing with no network fail at once with one sentence naming the weights,
their cache directory and how to get them; nothing ever waits on a dead connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
TOY_SPECS = {"toy:clip": ASSETS / "toy_clip", "toy:cnn": ASSETS / "toy_cnn"}
TEXT_BATCH = 256
#: Weight files open_clip looks for in an ``openclip:local-dir:`` folder (it would build a random model without one).
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable right now."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present (under ``torchrun``: the GPU of the ``LOCAL_RANK``), else the CPU."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank) % torch.cuda.device_count()) if local_rank else torch.device("cuda")
    return torch.device(device)


def state_dict_digest(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (identity of its weights)."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Make ``@random`` weights reproducible: the same spec always builds the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def describe_transform(transform: Callable) -> str:
    """A stable text description of a preprocessing pipeline (memory addresses removed)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


class Backbone:
    """A frozen image encoder with its preprocessing.

    ``preprocess(PIL image) -> [3,H,W]``, ``encode_images([B,3,H,W]) -> [B,D]`` float32 on the CPU.
    Vision-language backbones also offer ``encode_texts(list[str]) -> [K,D]``.
    """

    def __init__(self, spec: str, model: nn.Module, transform: Callable, embed_dim: int,
                 device: str | torch.device = "auto", weights_id: str | None = None) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.transform = transform
        self.embed_dim = int(embed_dim)
        self._weights_id = weights_id
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, embed_dim={self.embed_dim}, device={self.device})"

    @property
    def is_vision_language(self) -> bool:
        return hasattr(self, "encode_texts")

    @property
    def input_size(self) -> int:
        """Side of the square input the preprocessing produces."""
        return _transform_size(self.transform)

    @property
    def preprocess_description(self) -> str:
        return describe_transform(self.transform)

    @property
    def fingerprint(self) -> str:
        """Hash of the weights' identity AND the preprocessing (computed once, on first use)."""
        if self._fingerprint is None:
            weights = self._weights_id or state_dict_digest(self.model)
            payload = json.dumps([type(self).__name__, weights, self.preprocess_description, self._extra_identity()])
            self._fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:32]
        return self._fingerprint

    def _extra_identity(self) -> str:
        """Anything besides weights and preprocessing that changes the features (e.g. the layer)."""
        return ""

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image to the model's input tensor [3,H,W]."""
        return self.transform(image.convert("RGB"))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images [B,3,H,W] -> float32 [B,D] on the CPU."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects a [B,3,H,W] batch, got shape {tuple(images.shape)}.")
        with torch.inference_mode(), self._autocast():
            features = self._forward_images(images.to(self.device, non_blocking=True))
        return features.float().cpu().clone()

    def embed_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and embed PIL images (e.g. a user's upload) -> float32 [N,D]."""
        return self.encode_images(torch.stack([self.preprocess(image) for image in images]))

    def _forward_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenCLIPBackbone(Backbone):
    """An open_clip model: image and text towers sharing one embedding space."""

    def __init__(self, spec: str, model: nn.Module, transform: Callable, tokenizer: Callable,
                 device: str | torch.device = "auto", weights_id: str | None = None) -> None:
        embed_dim = getattr(model.visual, "output_dim", None)
        if embed_dim is None:
            with torch.inference_mode():
                embed_dim = model.encode_text(tokenizer(["a"])).shape[-1]
        super().__init__(spec, model, transform, embed_dim, device, weights_id)
        self.tokenizer = tokenizer

    def _forward_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts -> float32 [K,D] on the CPU (not normalised)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a list of strings, not a single string.")
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start:start + TEXT_BATCH])).to(self.device)
            with torch.inference_mode(), self._autocast():
                chunks.append(self.model.encode_text(tokens).float().cpu())
        if not chunks:
            return torch.empty(0, self.embed_dim)
        return torch.cat(chunks).clone()


class FeatureBackbone(Backbone):
    """A CNN or ViT classifier used as a feature extractor (torchvision, timm, toy:cnn).

    By default the features are the penultimate activations: the input of the model's last
    ``nn.Linear`` (its classifier). With ``layer=NAME`` they are the output of that named module,
    global-average-pooled over space ([B,C,H,W] -> [B,C]) or over tokens ([B,T,C] -> [B,C]).
    """

    def __init__(self, spec: str, model: nn.Module, transform: Callable, device: str | torch.device = "auto",
                 weights_id: str | None = None, layer: str | None = None) -> None:
        self.layer = layer
        self._target = self._find_target(model, layer)
        self._captured: torch.Tensor | None = None
        self._target.register_forward_hook(self._capture)
        embed_dim = self._probe_dim(model, transform)
        super().__init__(spec, model, transform, embed_dim, device, weights_id)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @staticmethod
    def _find_target(model: nn.Module, layer: str | None) -> nn.Module:
        modules = dict(model.named_modules())
        if layer is not None:
            if layer not in modules:
                sample = ", ".join(name for name in list(modules)[1:12])
                raise ValueError(f"layer {layer!r} is not a module of this model; names look like: {sample}, ...")
            return modules[layer]
        linears = [module for module in modules.values() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError("this model has no nn.Linear classifier; pass layer=NAME to choose the features.")
        return linears[-1]

    def _capture(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.layer is None:
            self._captured = inputs[0]
            return
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if tensor.ndim == 4:
            tensor = tensor.mean(dim=(2, 3))
        elif tensor.ndim == 3:
            tensor = tensor.mean(dim=1)
        self._captured = tensor.flatten(1)

    def _probe_dim(self, model: nn.Module, transform: Callable) -> int:
        size = _transform_size(transform)
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, size, size))
        return int(self._captured.shape[-1])

    def _extra_identity(self) -> str:
        return f"layer={self.layer}"

    def _forward_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        self.model(images)
        features, self._captured = self._captured, None
        return features


def _transform_size(transform: Callable) -> int:
    """The square input size a preprocessing pipeline produces (probed on a dummy image)."""
    return int(transform(Image.new("RGB", (256, 256))).shape[-1])


# --------------------------------------------------------------------------- weights availability

def _hub_cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _require_download(what: str, cache_dir: Path, url: str, how: str) -> None:
    """Fail at once, in one sentence, when uncached weights cannot be downloaded now."""
    if _offline():
        reason = "HF_HUB_OFFLINE=1 forbids downloads"
    elif not _reachable(url):
        reason = f"{urlparse(url).hostname} cannot be reached"
    else:
        return
    raise WeightsUnavailableError(
        f"The weights for {what} are not in the cache {cache_dir} and {reason}; {how}.")


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


def _check_openclip_weights(spec: str, arch: str, tag: str) -> None:
    import open_clip
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; known tags: {tags}.")
    how = (f"run `python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"` once on a "
           "connected machine and copy its cache here, or use openclip:local-dir:PATH")
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, Path(filename).with_suffix(".safetensors").name, "open_clip_model.safetensors"]
        if not _hf_cached(repo_id, names):
            _require_download(spec, _hub_cache_dir(), "https://huggingface.co", how)
    elif cfg.get("url"):
        url = cfg["url"]
        cache = Path("~/.cache/clip").expanduser()
        if not (cache / Path(urlparse(url).path).name).exists():
            _require_download(spec, cache, url, how)


# --------------------------------------------------------------------------- loaders

def _load_openclip(spec: str, rest: str, device: str | torch.device) -> OpenCLIPBackbone:
    import open_clip
    if rest.startswith("local-dir:"):
        path = Path(rest.removeprefix("local-dir:")).expanduser()
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{path} has no open_clip_config.json; an openclip:local-dir: folder needs "
                                    "the config and a weights file (e.g. open_clip_model.safetensors).")
        weights = [file for suffix in LOCAL_WEIGHT_SUFFIXES for file in sorted(path.glob(f"*{suffix}"))]
        if not weights:
            raise FileNotFoundError(f"{path} has no weights file ({', '.join(LOCAL_WEIGHT_SUFFIXES)}), so open_clip "
                                    "would build a random model; put the model's weights (e.g. "
                                    "open_clip_model.safetensors) beside its config.")
        try:
            model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}")
        except Exception:  # say which file is not a weights file in one sentence; else open_clip's own error
            for file in weights:
                load_state_dict_file(file)
            raise
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        return OpenCLIPBackbone(spec, model, transform, tokenizer, device)
    if rest.startswith("hf-hub:"):
        repo_id = rest.removeprefix("hf-hub:")
        if not _hf_cached(repo_id, ["open_clip_config.json"]):
            _require_download(spec, _hub_cache_dir(), "https://huggingface.co",
                              f"download the repo {repo_id} on a connected machine and copy the Hugging Face cache, "
                              "or use openclip:local-dir:PATH")
        model, _, transform = open_clip.create_model_and_transforms(rest)
        return OpenCLIPBackbone(spec, model, transform, open_clip.get_tokenizer(rest), device, weights_id=spec)
    arch, _, tag = rest.partition("@")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models().")
    if tag in ("", "random"):
        with seeded_init():
            model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
        return OpenCLIPBackbone(spec, model, transform, open_clip.get_tokenizer(arch), device)
    _check_openclip_weights(spec, arch, tag)
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=tag)
    return OpenCLIPBackbone(spec, model, transform, open_clip.get_tokenizer(arch), device, weights_id=spec)


def _image_transform(size: int, crop: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bilinear") -> Callable:
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    return transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode(interpolation)),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (names -> tensors) from .safetensors, or from a torch file with ``weights_only=True``
    (no code runs); a file that is neither is a ValueError saying what the file must be."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: (\S+ \S+)", str(error))
        if found:  # a pickle that names Python objects: loading it could run code
            raise ValueError(f"{path} holds pickled Python objects besides tensors ({found.group(1)}), which could "
                             "run code when loaded, so it is refused; save only its tensors where it comes from "
                             "(e.g. safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')).") from None
        raise ValueError(_NOT_WEIGHTS.format(path=path)) from None
    except Exception:  # safetensors, zip and pickle readers fail in many ways on a file of another kind
        raise ValueError(_NOT_WEIGHTS.format(path=path)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (weight names -> tensors); save "
                         "model.state_dict() instead.")
    odd = next((key for key, value in state.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))),
               None)
    if odd is not None:
        raise ValueError(f"{path} is not a state dict: its entry {odd!r} is a {type(state[odd]).__name__}, not a "
                         "tensor; save model.state_dict() instead.")
    return state


_NOT_WEIGHTS = ("{path} is not a weights file: give a .safetensors file or a state dict saved with torch.save "
                "(torch files with other pickled objects are refused, since loading them can run code).")


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, spec: str) -> None:
    """One sentence when a state dict is not the weights of ``model`` (missing, unexpected or reshaped names)."""
    expected = model.state_dict()
    problems = [(what, names) for what, names in (
        ("missing", [k for k in expected if k not in state]),
        ("unexpected", [k for k in state if k not in expected]),
        ("of another shape", [k for k in expected if k in state and state[k].shape != expected[k].shape])) if names]
    if problems:
        raise ValueError(f"the weights in {path} do not fit {spec}: "
                         + ", ".join(f"{len(names)} {what} (e.g. {names[0]})" for what, names in problems)
                         + "; give weights saved from this architecture.")


def _load_weights(model: nn.Module, path: str | Path, spec: str) -> None:
    """Load a state-dict file into ``model`` (every weight, each of its shape)."""
    state = load_state_dict_file(path)
    _check_fits(model, state, path, spec)
    model.load_state_dict(state)


def _load_torchvision(spec: str, rest: str, device: str | torch.device, layer: str | None) -> FeatureBackbone:
    from torchvision import models
    arch, _, tag = rest.partition("@")
    if arch not in models.list_models():
        raise ValueError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models().")
    if not tag:
        raise ValueError(f"say which weights to use: torchvision:{arch}@DEFAULT, @<enum tag>, @random or @PATH.")
    if tag == "random" or Path(tag).suffix in {".safetensors", ".pth", ".pt", ".bin"}:
        with seeded_init():
            model = models.get_model(arch, weights=None)
        if tag != "random":
            _load_weights(model, tag, spec)
        transform = _image_transform(256, 224, IMAGENET_MEAN, IMAGENET_STD)
        weights_id = None
    else:
        enum = models.get_model_weights(arch)
        try:
            weights = enum[tag]
        except KeyError:
            raise ValueError(f"{arch} has no weights {tag!r}; choose one of {', '.join(w.name for w in enum)}.") from None
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        if not (cache / Path(urlparse(weights.url).path).name).exists():
            _require_download(spec, cache, weights.url,
                              f"run `python -c \"import torchvision; torchvision.models.get_model('{arch}', "
                              f"weights='{weights}')\"` once on a connected machine and copy {cache}")
        model = models.get_model(arch, weights=weights)
        transform = weights.transforms()
        weights_id = f"{spec}:{weights.url}"
    return FeatureBackbone(spec, model, transform, device, weights_id=weights_id, layer=layer)


def _load_timm(spec: str, rest: str, device: str | torch.device, layer: str | None) -> FeatureBackbone:
    import timm
    from timm.data import create_transform, resolve_data_config
    name, _, tag = rest.partition("@")
    if tag == "random":
        with seeded_init():
            model = timm.create_model(name, pretrained=False)
    elif tag:
        path = Path(tag).expanduser()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models().")
        try:  # timm's loader, which also adapts checkpoints of the original repositories
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except Exception:  # say what is wrong with the file in one sentence; else timm's own error
            _check_fits(timm.create_model(name, pretrained=False), load_state_dict_file(path), path, spec)
            raise
    else:
        model = timm.create_model(name, pretrained=False)
        cfg = model.pretrained_cfg
        hub_id = cfg.get("hf_hub_id")
        if hub_id and not _hf_cached(hub_id, ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]):
            _require_download(spec, _hub_cache_dir(), "https://huggingface.co",
                              f"run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` once on "
                              "a connected machine and copy the Hugging Face cache, or use timm:NAME@/path/to/weights")
        model = timm.create_model(name, pretrained=True)
    transform = create_transform(**resolve_data_config({}, model=model))
    weights_id = None if tag else spec  # random or local weights: hash their content
    return FeatureBackbone(spec, model, transform, device, weights_id=weights_id, layer=layer)


def _load_toy(spec: str, device: str | torch.device, layer: str | None) -> Backbone:
    path = TOY_SPECS[spec]
    if not path.is_dir():
        raise FileNotFoundError(f"the shipped model {spec} is missing from {path}; reinstall the toolkit or "
                                "rebuild it with `python -m cbm.toymodels.train`.")
    if spec == "toy:clip":
        return _load_openclip(spec, f"local-dir:{path}", device)
    from torchvision import models
    config = json.loads((path / "config.json").read_text())
    model = models.get_model(config["architecture"], weights=None, **config.get("kwargs", {}))
    model.load_state_dict({k: v.float() for k, v in load_state_dict_file(path / "model.safetensors").items()})
    size = int(config["image_size"])
    transform = _image_transform(size, size, config["mean"], config["std"])
    return FeatureBackbone(spec, model, transform, device, layer=layer or config.get("layer"))


def load_backbone(spec: str, device: str | torch.device = "auto", *, layer: str | None = None) -> Backbone:
    """Load a frozen backbone from a spec string (see the module docstring for the forms)."""
    scheme, _, rest = spec.partition(":")
    if spec in TOY_SPECS:
        return _load_toy(spec, device, layer)
    if scheme == "openclip" and rest:
        if layer is not None:
            raise ValueError("layer= applies to CNN backbones (torchvision, timm), not to open_clip models.")
        return _load_openclip(spec, rest, device)
    if scheme == "torchvision" and rest:
        return _load_torchvision(spec, rest, device, layer)
    if scheme == "timm" and rest:
        return _load_timm(spec, rest, device, layer)
    raise ValueError(f"cannot read backbone spec {spec!r}; use openclip:ARCH@TAG, openclip:hf-hub:ORG/REPO, "
                     f"openclip:local-dir:PATH, torchvision:ARCH@WEIGHTS, timm:NAME or one of {', '.join(TOY_SPECS)}.")
