"""TCAV with statistics: Holm correction, a planted concept, calibration on random concepts, CNN layers."""

import importlib

import numpy as np
import pytest
import torch
from test_explain_core import one_thread  # noqa: F401 (an autouse fixture)
from torch import nn

from cbm.backbones import FeatureBackbone
from explain.tcav import embedding_gradients, holm, layer_activations, tcav, tcav_layer

DIM = 16


def test_holm_matches_the_step_down_procedure():
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert np.all(holm([0.5, 0.9]) <= 1.0)


@pytest.fixture(scope="module")
def head():
    """A non-linear three-class head over a 16-d layer; class 0's logit grows along ``planted``."""
    generator = torch.Generator().manual_seed(0)
    hidden, out = torch.randn(DIM, 16, generator=generator), torch.randn(16, 3, generator=generator)

    def logits(a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(a @ hidden) @ out

    samples = torch.randn(60, DIM, generator=generator) + 0.5
    gradients = {f"class {c}": embedding_gradients(logits, samples, c) for c in range(3)}
    planted = gradients["class 0"].mean(0)
    return {"gradients": gradients, "planted": planted / planted.norm()}


def test_a_planted_concept_is_significant_and_a_random_one_is_not(head):
    generator = torch.Generator().manual_seed(1)
    concepts = {"planted": torch.randn(30, DIM, generator=generator) + 1.5 * head["planted"],
                "random": torch.randn(30, DIM, generator=generator)}
    report = tcav(head["gradients"], concepts, torch.randn(900, DIM, generator=generator))
    planted = report.result("planted", "class 0")
    assert planted.significant and planted.mean > 0.9 and planted.p_adjusted < 0.01
    assert not any(r.significant for r in report.results if r.concept == "random")
    assert len(planted.scores) == 10 and len(planted.random_scores) == 20 and planted.cav_accuracy > 0.6
    assert report.to_dict()["correction"] == "holm" and report.plot().axes
    assert report.settings["solver"] == "fastcav" and report.settings["negatives"] == "independent"
    assert "fastcav CAVs, independent negatives" in report.plot().axes[0].get_title()


def test_independent_negatives_are_a_fresh_disjoint_set_per_run(head, monkeypatch):
    """As Kim et al.: each run's CAV is learned against its own random negatives; "shared" draws them from
    one pool of twice the concept's size (the runs' negatives overlap)."""
    module = importlib.import_module("explain.tcav")
    seen = {}
    learn = module.learn_cavs
    monkeypatch.setattr(module, "learn_cavs", lambda positives, negatives, **kw: seen.update(negatives=negatives)
                        or learn(positives, negatives, **kw))
    random = torch.arange(900, dtype=torch.float32)[:, None] * torch.ones(1, DIM)  # row i holds the value i
    concept = {"x": torch.randn(30, DIM, generator=torch.Generator().manual_seed(3))}
    rows = lambda name: {int(v) for v in seen["negatives"][name][:, 0].tolist()}  # noqa: E731
    for negatives, pool in (("independent", 300), ("shared", 60)):
        report = tcav(head["gradients"], concept, random, runs=10, random_concepts=5, negatives=negatives)
        assert report.settings["negatives"] == negatives
        runs = [rows(f"30\0x\0{run}") for run in range(10)]
        assert all(len(r) == 30 for r in runs) and len(set().union(*runs)) == pool
        if negatives == "independent":
            assert all(not a & b for i, a in enumerate(runs) for b in runs[i + 1:])
    with pytest.raises(ValueError, match="'independent'.*'shared'"):
        tcav(head["gradients"], concept, random, negatives="pool")


def test_random_directions_are_flagged_in_at_most_five_percent_of_draws(head):
    """Each draw: a fresh random concept and random pool, tested against every class (Holm over them)."""
    flagged, raw = [], []
    for draw in range(100):
        generator = torch.Generator().manual_seed(1000 + draw)
        report = tcav(head["gradients"], {"random": torch.randn(30, DIM, generator=generator)},
                      torch.randn(900, DIM, generator=generator), seed=draw)
        flagged.append(any(r.significant for r in report.results))
        raw += [r.p_value < 0.05 for r in report.results]
    assert np.mean(flagged) <= 0.05
    assert np.mean(raw) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / len(raw))  # each unadjusted test is calibrated too


def test_a_concept_its_cavs_cannot_separate_from_random_examples_is_warned_about(head, caplog):
    generator = torch.Generator().manual_seed(2)
    concepts = {"planted": torch.randn(30, DIM, generator=generator) + 1.5 * head["planted"],
                "like random": torch.randn(30, DIM, generator=generator)}
    with caplog.at_level("WARNING", logger="explain.tcav"):
        report = tcav(head["gradients"], concepts, torch.randn(900, DIM, generator=generator))
    warned = [record.getMessage() for record in caplog.records if "held-out accuracy" in record.getMessage()]
    assert len(warned) == 1 and "'like random'" in warned[0], warned
    assert report.result("like random", "class 0").cav_accuracy < 0.6 < report.result("planted", "class 0").cav_accuracy


def test_too_small_a_random_pool_is_refused(head):
    with pytest.raises(ValueError, match="random examples"):
        tcav(head["gradients"], {"x": torch.randn(30, DIM)}, torch.randn(100, DIM))


def _images(n: int, generator: torch.Generator, red: bool) -> torch.Tensor:
    """Noise images [n,3,16,16]; with ``red`` a bright red square at a random place."""
    images = 0.3 * torch.rand(n, 3, 16, 16, generator=generator)
    if red:
        for i, (y, x) in enumerate(torch.randint(0, 10, (n, 2), generator=generator).tolist()):
            images[i, 0, y:y + 6, x:x + 6] = 1.0
    return images


def test_tcav_at_a_cnn_layer_finds_the_concept_a_class_depends_on():
    from torchvision import transforms

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    backbone = FeatureBackbone("test:cnn", cnn, transforms.Compose([transforms.Resize(16), transforms.ToTensor()]),
                               device="cpu")
    generator = torch.Generator().manual_seed(2)
    red, plain = _images(40, generator, True), _images(40, generator, False)
    features = backbone.encode_images(torch.cat([red, plain]))
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    linear = nn.Linear(features.shape[1], 2)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=100)

    def step():
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(linear(features), labels)
        loss.backward()
        return loss

    optimiser.step(step)
    activations = layer_activations(backbone, "2", red[:4], pooling="mean")
    assert activations.shape == (4, 8)
    assert layer_activations(backbone, "2", red[:4]).shape == (4, 8 * 16 * 16)
    report = tcav_layer(backbone, "2", linear, ["red square", "plain"], {"red square": red},
                        {"red": _images(24, generator, True)}, _images(24 * 22, generator, False), runs=6,
                        random_concepts=20, pooling="mean")
    result = report.result("red", "red square")
    assert result.significant and result.mean > 0.9
    at_embedding = tcav_layer(backbone, None, linear, ["red square", "plain"], {"red square": red[:8]},
                              {"red": red[8:16]}, _images(8 * 12, generator, False), runs=3, random_concepts=5)
    assert at_embedding.results[0].layer == "embedding" and len(at_embedding.results[0].random_scores) == 5
    with pytest.raises(ValueError, match="not a module"):
        layer_activations(backbone, "nope", red[:2])


class _Shapes:
    """A labelled image dataset (classes "a", "b", "c"; concept "dot" on every third image) that records loads."""

    def __init__(self, n: int = 90, class_names=("a", "b", "c")) -> None:
        self.labels = np.arange(n) % len(class_names)
        self.class_names = list(class_names)
        self.concept_names = ["dot"]
        self.concept_labels = (np.arange(n)[:, None] % 3 == 1).astype(np.float32)
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int):
        from PIL import Image

        self.loaded.append(index)
        return Image.new("RGB", (8, 8), (index % 256, 0, 0))


def test_tcav_datasets_draws_class_concept_and_random_examples_apart(monkeypatch):
    module = importlib.import_module("explain.tcav")  # the module (``explain.tcav`` is also the function)
    seen = {}
    monkeypatch.setattr(module, "tcav_layer", lambda backbone, layer, head, names, classes, concepts, random, **kw:
                        seen.update(classes=classes, concepts=concepts, random=random, options=kw))
    backbone = type("B", (), {"preprocess": staticmethod(lambda image: torch.tensor([float(image.getpixel((0, 0))[0])]))})
    data = _Shapes()
    module.tcav_datasets(backbone, "layer", None, ["a", "b", "c"], data, ["a"], ["dot"], examples=5,
                         random_concepts=3, runs=4, seed=1)
    rows = lambda t: {int(v) for v in t.flatten().tolist()}  # the image's red value is its row
    classes, concept, random = rows(seen["classes"]["a"]), rows(seen["concepts"]["dot"]), rows(seen["random"])
    assert len(classes) == 5 and all(data.labels[i] == 0 for i in classes)
    assert len(concept) == 5 and all(data.concept_labels[i, 0] == 1 for i in concept) and not concept & classes
    assert len(random) == 4 * 5 + 3 * 5 and not random & (classes | concept)  # 4 runs' negatives, 3 random concepts
    assert all(data.labels[i] != 0 for i in concept | random)  # no image of the target class
    assert seen["options"]["random_concepts"] == 3 and seen["options"]["seed"] == 1
    assert seen["options"]["runs"] == 4 and seen["options"]["negatives"] == "independent"
    # concept examples from a folder per concept, random examples from their own dataset
    folders, pool = _Shapes(12, ("dot", "stripe")), _Shapes(60)
    module.tcav_datasets(backbone, "layer", None, ["a", "b", "c"], data, ["b"], ["stripe", "dot"], examples=4,
                         concept_data=folders, random_data=pool, random_concepts=3)
    by_folder = [folders.class_names[folders.labels[i]] for i in folders.loaded]  # a folder wins over concept labels
    assert sorted(by_folder) == ["dot"] * 4 + ["stripe"] * 4 and len(set(folders.loaded)) == 8
    assert len(pool.loaded) == 10 * 4 + 3 * 4
    with pytest.raises(KeyError, match="unknown class 'z'"):
        module.tcav_datasets(backbone, None, None, ["a", "b", "c"], data, ["z"], ["dot"])
    with pytest.raises(KeyError, match="not a class of the dataset"):
        module.tcav_datasets(backbone, None, None, ["a", "z"], data, ["z"], ["dot"])
    with pytest.raises(KeyError, match="no examples of concept 'stripe'.*--concept-data"):
        module.tcav_datasets(backbone, None, None, ["a", "b", "c"], data, ["a"], ["stripe"])
    with pytest.raises(ValueError, match="at least one target class and one concept"):
        module.tcav_datasets(backbone, None, None, ["a", "b", "c"], data, [], ["dot"])
    with pytest.raises(ValueError, match="show 'dot' outside the target classes"):
        module.tcav_datasets(backbone, None, None, ["a"], _Shapes(9, ("a",)), ["a"], ["dot"])
    with pytest.raises(ValueError, match=r"only 1 image\(s\) show 'dot'"):
        module.tcav_datasets(backbone, None, None, ["a", "b", "c"], data, ["a"], ["dot"],
                             concept_data=_Shapes(3, ("dot", "stripe", "x")))
    with pytest.raises(ValueError, match="no images are left for random examples"):
        module.tcav_datasets(backbone, None, None, ["a"], _Shapes(9, ("a",)), ["a"], ["stripe"], concept_data=folders)
