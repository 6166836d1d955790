"""Shared test settings and fixtures.

One torch thread (small tensors; no oversubscription on 2-core CI machines) except while the toy
world is embedded (``all_cores``), and ``toy_splits``: the toy world embedded once per session per
(shipped model, world), so that the acceptance modules do not each embed their own copies.
"""

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch

torch.set_num_threads(1)


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Every core for the block: embedding the toy world is the suite's one heavy tensor job."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

# The most any test asks for; smaller sizes are prefixes (a toy sample does not depend on the split's size).
TOY_SIZES = {"train": 2000, "val": 500, "test": 1000}


@pytest.fixture(scope="session")
def toy_splits(tmp_path_factory) -> Callable:
    """``toy_splits(spec, dataset="toy:images", sizes=None)`` -> ``(backbone, {split: Embeddings})``
    for a shipped model (``toy:clip``/``toy:cnn``); ``sizes`` picks the first n samples of each split."""
    from cbm.backbones import load_backbone
    from cbm.toy import toy_embeddings

    cache_dir = tmp_path_factory.mktemp("toy_cache")
    embedded: dict = {}

    def get(spec: str, dataset: str = "toy:images", sizes: dict[str, int] | None = None):
        if spec not in embedded:
            embedded[spec] = (load_backbone(spec, device="cpu"), {})
        backbone, worlds = embedded[spec]
        if dataset not in worlds:
            with all_cores():
                worlds[dataset] = toy_embeddings(backbone, dataset, sizes=TOY_SIZES, cache_dir=cache_dir,
                                                 progress=False)
        full = worlds[dataset]
        wanted = sizes or TOY_SIZES
        if any(n > TOY_SIZES[split] for split, n in wanted.items()):
            raise ValueError(f"toy_splits serves at most {TOY_SIZES}; raise TOY_SIZES in tests/conftest.py.")
        return backbone, {split: full[split].subset(slice(0, n)) for split, n in wanted.items()}

    return get
