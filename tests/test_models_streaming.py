"""Streaming training data from host memory (cbm.models.streaming): the decision, the chunked passes, and
for every family that a streamed fit (forced on the CPU, in small chunks) equals the resident one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbm.backbones import TOY_SPECS
from cbm.models import EnergyCBM, LaBoCBM, PosthocCBM, SparseCBM, TemporalCBM, streaming
from cbm.models.solvers import elastic_net_path, elastic_net_softmax, lambda_max
from cbm.models.streaming import Rows, should_stream
from concepts.bank import ConceptBank

C, K, D = 3, 6, 16
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every streamed pass goes in many pieces (on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 600)
    yield
    torch.set_num_threads(threads)


def make_data(n: int, seed: int, directions: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    present = (torch.rand(n, K, generator=g) < 0.2).float()
    present[torch.arange(n), y] = 1.0
    x = present @ directions + 0.4 * torch.randn(n, D, generator=g) + 0.5
    return x, y, present


@pytest.fixture(scope="module")
def world():
    directions = torch.nn.functional.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(7)), dim=1)
    names = [f"concept {i}" for i in range(K)]
    prior = {f"class {c}": [names[c], names[(c + 3) % K]] for c in range(C)}
    bank = ConceptBank(names, directions, kind="text", provenance={"class_concepts": prior})
    return {"bank": bank, "train": make_data(150, 0, directions), "val": make_data(60, 1, directions),
            "test": make_data(40, 2, directions), "class_names": [f"class {c}" for c in range(C)]}


def videos(x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Videos of 2 to 4 windows made of consecutive rows, labelled by their first row."""
    starts = range(0, len(x) - 4, 3)
    return [x[i:i + 2 + i % 3] for i in starts], y[list(starts)]


def fit(family: str, world, stream) -> tuple:
    """A small fit of ``family`` and the inputs to compare its outputs on."""
    (x, y, c), (vx, vy, vc), test = world["train"], world["val"], world["test"][0]
    bank, names = world["bank"], world["class_names"]
    if family.startswith("pcbm"):
        options = {"pcbm": {}, "pcbm-path": {"lam": "path", "n_lambdas": 4},
                   "pcbm-h": {"hybrid": True, "residual_epochs": 4, "batch_size": 32}}[family]
        model = PosthocCBM(bank, stream=stream, **options).fit(x, y, validation=(vx, vy), class_names=names)
    elif family.startswith("labo"):
        batch = {"labo": None, "labo-batch": 32}[family]
        model = LaBoCBM(bank, epochs=15, batch_size=batch, diversity=0.1, l1=0.01, patience=None, stream=stream)
        model.fit(x, y, validation=(vx, vy), class_names=names)
    elif family == "sparse":
        model = SparseCBM(bank, epochs=4, batch_size=32, stream=stream).fit(x, y, validation=(vx, vy),
                                                                          class_names=names)
    elif family == "energy":
        model = EnergyCBM(hidden=16, batch_size=32, max_epochs=4, inference_weights=(1.0, 1.0, 1.0),
                          inference_steps=20, stream=stream)
        model.fit(x, y, concept_labels=c, validation=(vx, vy), validation_concepts=vc, class_names=names)
    else:
        model = TemporalCBM(bank, epochs=4, batch_size=8, stream=stream)
        model.fit(*videos(x, y), validation=videos(vx, vy), class_names=names)
        test = videos(test, world["test"][1])[0]
    return model, test


FAMILIES = ["pcbm", "pcbm-path", "pcbm-h", "labo", "labo-batch", "sparse", "energy", "temporal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_fit_equals_the_resident_one(world, family, monkeypatch):
    resident, test = fit(family, world, stream=False)
    pieces = []
    arrive = Rows._arrive

    def counted(self, parts):
        if self.streaming:
            pieces.append((len(parts[0]), len(self)))
        return arrive(self, parts)

    monkeypatch.setattr(Rows, "_arrive", counted)
    streamed, _ = fit(family, world, stream=True)
    assert not resident.training_["streamed"] and streamed.training_["streamed"]
    assert pieces and all(size < rows for size, rows in pieces)  # every pass went in batches or chunks
    tensors_a, tensors_b = resident._state()[1], streamed._state()[1]
    assert tensors_a.keys() == tensors_b.keys()
    for name, value in tensors_a.items():
        assert torch.allclose(value.float(), tensors_b[name].float(), rtol=1e-4, atol=1e-5), name
    for key, value in resident.metrics_.items():
        assert streamed.metrics_[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    history = [[step.get("val_loss", np.nan) for step in model.__dict__.get("history_", [])]
               for model in (resident, streamed)]
    assert np.allclose(*history, rtol=1e-5, equal_nan=True)
    assert torch.allclose(resident.decision_function(test), streamed.decision_function(test), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["pcbm-h", "labo", "energy", "temporal"])
def test_auto_streams_only_when_the_data_exceed_the_device_budget(world, family, monkeypatch):
    assert not fit(family, world, stream="auto")[0].training_["streamed"]  # the CPU budget is unlimited
    monkeypatch.setattr(streaming, "device_budget", lambda device: 1000.0)
    assert fit(family, world, stream="auto")[0].training_["streamed"]


def test_the_budget_is_a_share_of_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8000, 10**9))
    cuda = torch.device("cuda")
    assert streaming.device_budget(cuda) == streaming.DEVICE_FRACTION * 8000
    assert streaming.device_budget(CPU) == float("inf")
    assert not should_stream("auto", [torch.zeros(1000)], cuda)  # 4,000 bytes fit in half of 8,000
    assert should_stream("auto", [torch.zeros(1000), torch.zeros(1, dtype=torch.int64)], cuda)
    assert should_stream(True, [torch.zeros(1)], CPU) and not should_stream(False, [torch.zeros(10**6)], cuda)
    with pytest.raises(ValueError, match="stream must be"):
        should_stream("yes", [torch.zeros(1)], CPU)


def test_rows_stream_every_row_once_in_chunks_and_apply_maps_to_each():
    x, y = torch.randn(100, 5), torch.arange(100)
    rows = Rows((x, y), CPU, stream=True)
    chunks = list(rows.chunks())
    assert rows.chunk_rows == 600 // (5 * 4 + 8) and len(chunks) == 5
    assert torch.equal(torch.cat([c[0] for c in chunks]), x) and torch.equal(torch.cat([c[1] for c in chunks]), y)
    index = torch.tensor([7, 3, 99])
    doubled = rows.map(lambda a, b: (2 * a, b + 1))
    assert torch.equal(doubled.batch(index)[0], 2 * x[index]) and torch.equal(doubled.batch(index)[1], y[index] + 1)
    assert torch.equal(doubled.tensors[0], x)  # streamed: the host keeps the data as given
    assert torch.allclose(doubled.sum(lambda a, b: a.sum(0)), 2 * x.sum(0), atol=1e-5)
    resident = Rows((x, y), CPU).map(lambda a, b: (2 * a, b))  # resident: passes in chunks too, mapped as used
    assert resident.chunk_rows == rows.chunk_rows and torch.equal(resident.tensors[0], x)
    assert torch.equal(torch.cat([c[0] for c in resident.chunks()]), 2 * x)
    assert torch.equal(resident.batch(index)[0], 2 * x[index])
    with pytest.raises(ValueError, match="same number of rows"):
        Rows((x, y[:5]), CPU)


def test_the_solvers_on_streamed_rows_equal_the_resident_ones(world):
    x, y, _ = world["train"]
    scores = x @ world["bank"].vectors.T
    rows = Rows((scores, y), CPU, stream=True)
    assert rows.chunk_rows < len(rows) / 5
    top = lambda_max(scores, y, C, 0.99)
    assert lambda_max(rows, None, C, 0.99) == pytest.approx(top, rel=1e-5)
    ours, theirs = elastic_net_softmax(scores, y, C, 0.01), elastic_net_softmax(rows, None, C, 0.01)
    assert ours.iterations == theirs.iterations
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-5) and torch.allclose(ours.bias, theirs.bias, atol=1e-5)
    lams = [top, top / 10, top / 100]
    for a, b in zip(elastic_net_path(scores, y, C, lams), elastic_net_path(rows, None, C, lams)):
        assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.equal(a.weight == 0, b.weight == 0)
    with pytest.raises(TypeError, match="y=None"):
        elastic_net_softmax(rows, y, C, 0.01)


@pytest.mark.skipif(not TOY_SPECS["toy:clip"].is_dir(), reason="the shipped toy:clip is missing")
def test_cbm_fit_streams_on_request_and_gives_the_resident_model(tmp_path, capsys):
    """`cbm fit --stream on|off --device cpu`: the bundle records which ran, and both predict alike."""
    from cbm import cli
    from cbm.models import load

    common = ["fit", "posthoc", "--backbone", "toy:clip", "--data", "toy:images@val", "--concepts", "toy",
              "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    fitted = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.cbm"
        assert cli.main([*common, "--stream", mode, "--out", str(out)]) == 0
        fitted[mode] = load(out)
    assert "saved" in capsys.readouterr().out
    assert fitted["on"].training_["streamed"] is True and fitted["off"].training_["streamed"] is False
    assert fitted["on"].get_params()["stream"] is True and fitted["on"].get_params()["device"] == "cpu"
    # streamed in chunks of a few rows (small_chunks): sums round differently over ~700 FISTA steps
    weight = fitted["off"].weight_
    assert (fitted["on"].weight_ - weight).abs().max() < 0.01 * weight.abs().max()
    with pytest.raises(SystemExit):
        cli.main([*common, "--stream", "sometimes", "--out", str(tmp_path / "x.cbm")])
