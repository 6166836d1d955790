"""Faults of the embedding cache: ``cbm embed`` killed at random moments and in the middle of a shard
write, two processes filling one entry at once, a full disk. None may leave a cache that gives wrong
features later.

``cbm embed`` runs in forked processes (``cbm.cli.main`` after fork), so a run costs no interpreter
start-up; a kill's random delay counts from the moment the process starts embedding, so it lands
inside the extraction, not in the set-up before it.
"""

from __future__ import annotations

import errno
import importlib
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as safetensors_save_file

from cbm import cli
from cbm.backbones import Backbone, load_backbone
from cbm.data.registry import load_dataset
from cbm.embed import cache_entries, embed
from tiny_models import write_tiny_clip_dir

embed_module = importlib.import_module("cbm.embed")  # the module (``cbm.embed`` is also the function)

DATA = "toy:images@test"  # 1000 images
SHARD_SIZE = 50  # 20 shards: many writes for a kill to land in


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return f"openclip:local-dir:{write_tiny_clip_dir(tmp_path_factory.mktemp('clip'))}"


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory):
    """An uninterrupted run, and how long its extraction took (backbone and dataset loaded before)."""
    backbone, data = load_backbone(spec, device="cpu"), load_dataset(DATA)
    started = time.perf_counter()
    result = embed(backbone, data, batch_size=25, cache_dir=tmp_path_factory.mktemp("reference"), num_workers=0,
                   progress=False, shard_size=SHARD_SIZE)
    return result, time.perf_counter() - started


def run_embed(spec: str, cache_dir: Path):
    backbone = load_backbone(spec, device="cpu")
    return embed(backbone, load_dataset(DATA), batch_size=25, cache_dir=cache_dir, num_workers=0,
                 progress=False, shard_size=SHARD_SIZE)


def cbm_embed(spec: str, cache_dir: Path, out: Path | None = None, embedding=None,
              save_file=None) -> multiprocessing.Process:
    """Start ``cbm embed`` in a forked process; ``embedding`` (an Event) is set when it starts extracting;
    ``save_file`` replaces the shard writer in that process only."""
    argv = ["embed", spec, DATA, "--batch-size", "25", "--shard-size", str(SHARD_SIZE), "--workers", "0",
            "--device", "cpu", "--cache-dir", str(cache_dir)] + (["--out", str(out)] if out else [])

    def child():
        encode_shards = embed_module._encode_shards

        def signalling(*args, **kwargs):
            if embedding is not None:
                embedding.set()
            yield from encode_shards(*args, **kwargs)

        embed_module._encode_shards = signalling
        embed_module.save_file = save_file or embed_module.save_file
        os._exit(cli.main(argv))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    return process


def shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("embeddings/*/shard_*.safetensors"))


def assert_same(result, expected) -> None:
    assert result.ids == expected.ids
    assert torch.equal(result.labels, expected.labels)
    assert torch.allclose(result.features, expected.features, atol=1e-6)


def count_encodes(monkeypatch) -> dict:
    calls = {"n": 0}
    original = Backbone.encode_images

    def encode(self, images):
        calls["n"] += 1
        return original(self, images)

    monkeypatch.setattr(Backbone, "encode_images", encode)
    return calls


def test_killed_five_times_then_rerun_gives_the_uninterrupted_features(spec, reference, tmp_path, monkeypatch):
    expected, seconds = reference
    rng = random.Random(12)
    killed_mid_run = 0
    for _ in range(5):
        embedding = multiprocessing.get_context("fork").Event()
        process = cbm_embed(spec, tmp_path, embedding=embedding)
        assert embedding.wait(timeout=60)
        time.sleep(rng.uniform(0.0, seconds * (20 - len(shards(tmp_path))) / 20))  # within the work left
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join()
        killed_mid_run += process.exitcode == -signal.SIGKILL
        for shard in shards(tmp_path):  # whatever a killed run left under a shard's name is a whole, valid shard
            number = int(shard.stem.split("_")[1])
            assert embed_module._read_shard(shard, range(number * SHARD_SIZE, (number + 1) * SHARD_SIZE)) is not None
    assert killed_mid_run >= 3 and 0 < len(shards(tmp_path)) < 20, (killed_mid_run, len(shards(tmp_path)))
    finished = len(shards(tmp_path))
    calls = count_encodes(monkeypatch)
    assert_same(run_embed(spec, tmp_path), expected)
    assert calls["n"] == 2 * (20 - finished)  # only the shards the killed runs did not finish are recomputed
    leftovers = [path for path in tmp_path.glob("embeddings/*/*") if not path.name.startswith("shard_")
                 and path.name != "manifest.json"]
    assert all(path.name.startswith(".") and path.name.endswith(".tmp") for path in leftovers)


def killed_while_writing(tensors, path, metadata=None):
    """The shard writer of a process that dies (SIGKILL) with half a shard written."""
    safetensors_save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_in_the_middle_of_a_shard_write(spec, reference, tmp_path):
    process = cbm_embed(spec, tmp_path, save_file=killed_while_writing)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    assert not shards(tmp_path)  # the half-written shard never got its final name
    assert len(list(tmp_path.glob("embeddings/*/.shard_00000.safetensors.*.tmp"))) == 1
    assert_same(run_embed(spec, tmp_path), reference[0])


def test_stale_temporary_files_are_removed(spec, reference, tmp_path):
    run_embed(spec, tmp_path)
    entry = shards(tmp_path)[0].parent
    old, fresh = entry / ".shard_00003.safetensors.abc.tmp", entry / ".shard_00004.safetensors.def.tmp"
    old.write_bytes(b"half a shard")
    fresh.write_bytes(b"a live writer's shard")
    os.utime(old, (time.time() - 2 * embed_module.STALE_TEMPORARY_SECONDS,) * 2)
    assert_same(run_embed(spec, tmp_path), reference[0])
    assert not old.exists() and fresh.exists()  # a young one may belong to a writer still at work


def test_two_processes_filling_one_cache_at_once(spec, reference, tmp_path, monkeypatch):
    processes = [cbm_embed(spec, tmp_path / "cache", tmp_path / f"out{i}.safetensors") for i in range(2)]
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    expected = reference[0]
    for i in range(2):
        exported = load_file(str(tmp_path / f"out{i}.safetensors"))
        assert json.loads((tmp_path / f"out{i}.json").read_text())["ids"] == expected.ids
        assert torch.allclose(exported["features"], expected.features, atol=1e-6)
    assert len(shards(tmp_path / "cache")) == 20
    assert not list((tmp_path / "cache").glob("embeddings/*/.*"))  # no temporary file left behind
    calls = count_encodes(monkeypatch)
    assert_same(run_embed(spec, tmp_path / "cache"), expected)
    assert calls["n"] == 0  # a complete, valid entry


def full_disk_in_save_file(after: int):
    """``save_file`` that writes half a shard and raises ENOSPC from shard number ``after`` on."""
    calls = {"n": 0}
    original = embed_module.save_file

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        original(tensors, path, metadata=metadata)
        if calls["n"] > after:
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save_file


def full_disk_in_fsync(descriptor):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["third shard", "fsync"])
def test_full_disk_is_a_clear_error_and_leaves_nothing_that_would_be_used(spec, reference, tmp_path, monkeypatch,
                                                                          capsys, where):
    if where == "third shard":
        monkeypatch.setattr(embed_module, "save_file", full_disk_in_save_file(after=2))
    else:
        monkeypatch.setattr(os, "fsync", full_disk_in_fsync)
    with pytest.raises(OSError, match="no space left for the embedding cache") as raised:
        run_embed(spec, tmp_path)
    assert raised.value.errno == errno.ENOSPC and str(tmp_path) in str(raised.value)
    assert cli.main(["embed", spec, DATA, "--shard-size", str(SHARD_SIZE), "--workers", "0", "--device", "cpu",
                     "--cache-dir", str(tmp_path)]) == 2
    assert "error: [Errno 28] no space left for the embedding cache" in capsys.readouterr().err
    written = 2 if where == "third shard" else 0
    assert len(shards(tmp_path)) == written  # the shards written before the disk filled up: whole and valid
    assert [path.name for path in tmp_path.glob("embeddings/*/*")] == [path.name for path in shards(tmp_path)]
    assert cache_entries(tmp_path)[0]["incomplete"]

    monkeypatch.undo()  # space freed
    calls = count_encodes(monkeypatch)
    assert_same(run_embed(spec, tmp_path), reference[0])
    assert calls["n"] == 2 * (20 - written)
