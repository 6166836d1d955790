"""The CUDA paths, run for real on a GPU (``pytest -m gpu``; every test is skipped with its reason elsewhere):
extraction in bfloat16 autocast (channels-last for CNNs) against the CPU's float32 features, streamed fits
(pinned host memory, non-blocking copies) against resident ones for PCBM, ECBM and MoTIF, ECBM inference on
the GPU against the CPU, and distributed extraction under ``torchrun --nproc_per_node 1`` through NCCL.

Run as a script under torchrun (``torchrun --standalone --nproc_per_node 1 tests/test_gpu.py DIR``), this
file is one rank of that extraction (NCCL on a GPU, gloo on the CPU): ``benchmarks/gpu_check.sh`` does so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cbm.backbones import load_backbone
from cbm.data.registry import load_dataset
from cbm.embed import embed
from cbm.models import streaming
from cbm.models.streaming import Rows
from test_models_streaming import fit, world  # noqa: F401 (the module's small world and fits, reused)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                                                       "is false)")]

TORCHRUN_IMAGES = 256


def _toy_images(n: int):
    return load_dataset("toy:images@test", n=n)


@pytest.mark.parametrize("spec", ["toy:cnn", "toy:clip"])
def test_embed_on_cuda_in_bfloat16_matches_the_cpu_features(spec):
    data = _toy_images(96)
    gpu = load_backbone(spec, device="cuda")
    if spec == "toy:cnn":  # CNNs run channels-last on CUDA
        convolution = next(m for m in gpu.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    ours = embed(gpu, data, batch_size=32, cache=False, progress=False).features
    reference = embed(load_backbone(spec, device="cpu"), data, batch_size=32, cache=False, num_workers=0,
                      progress=False).features
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    assert cosine.min() > 0.995, float(cosine.min())  # bfloat16 keeps ~3 significant digits
    assert (ours - reference).norm(dim=1).max() < 0.1 * reference.norm(dim=1).min()


@pytest.mark.parametrize("family", ["pcbm", "pcbm-h", "energy", "temporal"])
def test_streamed_fits_on_cuda_equal_the_resident_ones(world, family, monkeypatch):  # noqa: F811
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 600)  # every streamed pass in many chunks
    resident, test = fit(family, world, stream=False)  # device "auto": the GPU
    pinned = []
    arrive = Rows._arrive

    def spied(self, parts):
        if self.streaming:
            pinned.append(self.tensors[0].is_pinned() and self.device.type == "cuda")
        return arrive(self, parts)

    monkeypatch.setattr(Rows, "_arrive", spied)
    streamed, _ = fit(family, world, stream=True)
    assert pinned and all(pinned)  # copied to the GPU from pinned host memory
    tensors_a, tensors_b = resident._state()[1], streamed._state()[1]
    for name, value in tensors_a.items():
        assert torch.allclose(value.float(), tensors_b[name].float(), rtol=1e-3, atol=1e-4), name
    assert torch.allclose(resident.decision_function(test), streamed.decision_function(test), rtol=1e-3, atol=1e-3)


def test_energy_inference_on_cuda_equals_the_cpu(world):  # noqa: F811
    model, test = fit("energy", world, stream=False)
    on_gpu, on_cpu = model.infer(test, device="cuda"), model.infer(test, device="cpu")
    assert torch.allclose(on_gpu.concept_probs, on_cpu.concept_probs, atol=1e-3)
    assert torch.equal(on_gpu.logits.argmax(1), on_cpu.logits.argmax(1))


def test_torchrun_one_rank_embeds_through_nccl(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rank 0 of 1 (nccl)" in run.stdout, run.stdout[-2000:]
    features = load_file(str(tmp_path / "rank0.safetensors"))["features"]
    single = embed(load_backbone("toy:cnn", device="cuda"), _toy_images(TORCHRUN_IMAGES), batch_size=64, cache=False,
                   progress=False).features
    assert torch.allclose(features, single, atol=1e-3, rtol=1e-3)


def _rank_main(root: Path) -> None:
    """One rank under torchrun: join the process group (NCCL on a GPU, else gloo), embed the toy images into a
    fresh cache (the shards split between the ranks through the group), save the features, print the rate."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    backbone = load_backbone("toy:cnn", device="cuda" if cuda else "cpu")
    started = time.perf_counter()
    result = embed(backbone, _toy_images(TORCHRUN_IMAGES), batch_size=64, cache_dir=root / "cache", progress=False,
                   shard_size=64)
    seconds = time.perf_counter() - started
    save_file({"features": result.features}, str(root / f"rank{rank}.safetensors"))
    print(f"rank {rank} of {ranks} ({torch.distributed.get_backend()}): {len(result)} images in {seconds:.2f} s "
          f"({len(result) / seconds:.1f} img/s) on {backbone.device}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # a rank started by torchrun (the test above, or benchmarks/gpu_check.sh)
    _rank_main(Path(sys.argv[1]))
