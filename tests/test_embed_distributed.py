"""Distributed extraction: ``torchrun --nproc_per_node 2`` (gloo, CPU) gives what one process gives.

The test launches this file under torchrun; each rank then embeds the toy world's test split with
the library (saving what its ``embed`` returned) and with ``cbm embed`` (rank 0 exports ``--out``),
each time into a fresh shared cache, so both paths split the missing shards between the ranks.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cbm.backbones import load_backbone
from cbm.data.registry import load_dataset
from cbm.embed import embed
from tiny_models import write_tiny_clip_dir

DATA = "toy:images@test"  # 1000 images
SHARD_SIZE = 100  # 10 shards: 5 per rank


def _backbone_spec(root: Path) -> str:
    return f"openclip:local-dir:{root / 'clip'}"


def _embed(root: Path, cache: str):
    backbone = load_backbone(_backbone_spec(root), device="cpu")
    return embed(backbone, load_dataset(DATA), batch_size=64, cache_dir=root / cache, num_workers=0,
                 progress=False, shard_size=SHARD_SIZE)


def _rank_main(root: Path) -> None:
    """One rank under torchrun: the library path, then the command line."""
    from cbm import cli

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = _embed(root, "library-cache")
    rank = torch.distributed.get_rank()
    save_file({"features": result.features, "labels": result.labels}, str(root / f"rank{rank}.safetensors"),
              metadata={"ids": json.dumps(result.ids)})
    code = cli.main(["embed", _backbone_spec(root), DATA, "--shard-size", str(SHARD_SIZE), "--workers", "0",
                     "--device", "cpu", "--cache-dir", str(root / "cli-cache"), "--out", str(root / "cli.safetensors")])
    sys.exit(code)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    write_tiny_clip_dir(tmp_path / "clip")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in (0, 1):  # each rank computed half of the shards, on both paths
        assert run.stderr.count(f"rank {rank} of 2 embeds 5 of the 10 missing shards") == 2, run.stderr[-4000:]

    single = _embed(tmp_path, "single-cache")
    assert len(single) == 1000
    for rank in (0, 1):
        path = str(tmp_path / f"rank{rank}.safetensors")
        with safe_open(path, framework="pt") as handle:
            ids = json.loads(handle.metadata()["ids"])
        tensors = load_file(path)
        assert ids == single.ids  # the same samples in the same order on every rank
        assert torch.equal(tensors["labels"], single.labels)
        assert torch.allclose(tensors["features"], single.features, atol=1e-6)
    exported = load_file(str(tmp_path / "cli.safetensors"))
    assert json.loads((tmp_path / "cli.json").read_text())["ids"] == single.ids
    assert torch.allclose(exported["features"], single.features, atol=1e-6)
    for cache in ("library-cache", "cli-cache"):
        assert len(list((tmp_path / cache).glob("embeddings/*/shard_*.safetensors"))) == 10
        assert len(list((tmp_path / cache).glob("embeddings/*/manifest.json"))) == 1


if __name__ == "__main__":  # a rank started by torchrun from the test above
    _rank_main(Path(sys.argv[1]))
