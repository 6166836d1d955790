"""Temporal CBM (MoTIF) on synthetic videos whose classes are orders of events, and on toy videos."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_cores

from cbm.embed import Embeddings
from cbm.models import BundleError, load
from cbm.models.baselines import TimeAveragedCBM
from cbm.models.temporal import (
    TemporalCBM,
    VideoSequences,
    decisive_windows,
    localisation_hits,
    pad_sequences,
    reverse_time,
    sequences_from_windows,
    zero_shot_video,
)
from concepts.bank import ConceptBank

CLASSES = ["red then blue", "blue then red", "big then left", "left then big"]
CONCEPTS = ["red", "blue", "big", "left", "noise a", "noise b"]
D = 24


def _directions() -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(123).normal(size=(D, 7)))[0].T  # 6 concepts + a shared base


def make_videos(n: int, seed: int) -> tuple[VideoSequences, list[list[tuple[int, int]]]]:
    """Videos of 4-12 windows: two state changes at windows t1 < t2; the class is their order.
    Colour changes replace each other (red then blue: red from t1 to t2, blue after); size and
    position persist. Two noise concepts flicker at random. Events: windows [t, t+1)."""
    rng = np.random.default_rng(seed)
    directions = _directions()
    sequences, labels, events = [], [], []
    for _ in range(n):
        y, length = int(rng.integers(4)), int(rng.integers(4, 13))
        t1 = int(rng.integers(1, length - 1))
        t2 = int(rng.integers(t1 + 1, length))
        present = np.zeros((length, 6))
        first, second = [(0, 1), (1, 0), (2, 3), (3, 2)][y]
        present[t1:t2 if y < 2 else length, first] = 1
        present[t2:, second] = 1
        present[:, 4:] = rng.random((length, 2)) < 0.3
        features = present @ directions[:6] + directions[6] + 0.25 * rng.normal(size=(length, D))
        sequences.append(torch.tensor(features, dtype=torch.float32))
        labels.append(y)
        events.append([(t1, t1 + 1), (t2, t2 + 1)])
    x, valid = pad_sequences(sequences)
    steps = torch.arange(x.shape[1])
    spans = torch.stack([steps, steps + 1], -1).expand(n, -1, -1).clone()
    index = torch.full(valid.shape, -1)
    return VideoSequences(x, valid, torch.tensor(labels), [f"video {i}" for i in range(n)], index, spans,
                          CLASSES, "synthetic", "synthetic-fp"), events


def synthetic_bank() -> ConceptBank:
    """A text bank whose directions are the synthetic world's six concepts."""
    return ConceptBank(CONCEPTS, torch.tensor(_directions()[:6], dtype=torch.float32), kind="text")


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    bank = synthetic_bank()
    train, _ = make_videos(300, 0)
    val, _ = make_videos(100, 1)
    test, events = make_videos(200, 2)
    model = TemporalCBM(bank, epochs=100, seed=0).fit(train, validation=val)
    return {"bank": bank, "train": train, "val": val, "test": test, "events": events, "model": model}


def test_regrouping_windows_into_sequences_orders_and_pads():
    features = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    owner = np.array([1, 0, 1, 0, 1, 2, 0])
    spans = np.array([[8, 12], [4, 8], [0, 4], [0, 4], [4, 8], [0, 4], [8, 10]])
    ids = [f"vid/{v}/w{s // 4}" for v, (s, _) in zip(owner, spans)]
    windows = Embeddings(features, torch.tensor([5, 3, 5, 3, 5, 1, 3]), ids, ["a"] * 6, "toy:clip", "fp",
                         meta={"window_video": owner, "window_spans": spans})
    seq = sequences_from_windows(windows)
    assert seq.video_ids == ["vid/1", "vid/0", "vid/2"] and seq.labels.tolist() == [5, 3, 1]
    assert seq.valid.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert seq.window_index.tolist() == [[2, 4, 0], [3, 1, 6], [5, -1, -1]]
    assert torch.equal(seq.features[0], features[[2, 4, 0]]) and seq.features[2, 1:].abs().sum() == 0
    assert seq.window_spans[1].tolist() == [[0, 4], [4, 8], [8, 10]]
    assert seq.subset([2]).features.shape == (1, 1, 3)
    windows.labels[0] = 4
    with pytest.raises(ValueError, match="different labels"):
        sequences_from_windows(windows)
    with pytest.raises(ValueError, match="window_video"):
        sequences_from_windows(Embeddings(features, torch.zeros(7), ids, ["a"], "s", "f"))


def test_reverse_time_keeps_padding():
    x = torch.arange(8, dtype=torch.float32).view(2, 4, 1)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert reverse_time(x, valid)[..., 0].tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]


def test_fit_beats_time_averaging_on_order_and_is_deterministic(world):
    model, test = world["model"], world["test"]
    averaged = TimeAveragedCBM(world["bank"]).fit(world["train"], validation=world["val"])
    pair = test.labels < 2  # red/blue: the colour fractions carry no order; big/left averaging can read
    temporal_acc = float((torch.as_tensor(model.predict(test)) == test.labels)[pair].float().mean())
    averaged_acc = float((torch.as_tensor(averaged.predict(test)) == test.labels)[pair].float().mean())
    assert temporal_acc >= averaged_acc + 0.20, (temporal_acc, averaged_acc)
    assert model.training_["validation"] == "given" and model.metrics_["val_accuracy"] > 0.7
    assert (model.weight_ >= 0).all()
    again = TemporalCBM(world["bank"], epochs=3, seed=5).fit(world["train"], validation=world["val"])
    twice = TemporalCBM(world["bank"], epochs=3, seed=5).fit(world["train"], validation=world["val"])
    assert torch.equal(again.decision_function(test), twice.decision_function(test))


def test_padded_batch_equals_one_by_one_for_lengths_4_to_64(world):
    model = world["model"]
    rng = np.random.default_rng(7)
    sequences = [torch.tensor(rng.normal(size=(n, D)), dtype=torch.float32) for n in (4, 9, 17, 33, 64, 5)]
    batch = model.explain(sequences)
    for i, seq in enumerate(sequences):
        alone = model.explain(seq[None])
        n = len(seq)
        assert torch.allclose(batch.logits[i], alone.logits[0], atol=1e-5)
        assert torch.allclose(batch.concepts[i, :n], alone.concepts[0], atol=1e-5)
        assert torch.allclose(batch.time_importance[i, :n], alone.time_importance[0], atol=1e-5)
        assert torch.allclose(batch.attention[i, :, :n, :n], alone.attention[0], atol=1e-5)
        assert batch.concepts[i, n:].abs().sum() == 0 and batch.time_importance[i, n:].abs().sum() == 0
    padded, valid = pad_sequences(sequences)
    assert torch.equal(model.decision_function((padded, valid)), batch.logits)
    with pytest.raises(ValueError, match="padding mask"):
        model.decision_function((padded, ~valid))
    with pytest.raises(ValueError, match="2-D"):
        model.decision_function(sequences[0])


def test_explanations_decompose_the_logits(world):
    model, test = world["model"], world["test"].subset(range(20))
    e = model.explain(test)
    bias = model.bias_[e.prediction]
    assert torch.allclose(e.concept_importance.sum(-1) + bias + e.entropy_term,
                          e.logits.gather(1, e.prediction[:, None])[:, 0], atol=1e-4)
    assert torch.allclose(e.time_importance.sum(1), torch.ones(20))
    contributions = model.contributions(test)
    assert contributions.shape == (20, 4, 6)
    assert torch.allclose(contributions.gather(1, e.prediction[:, None, None].expand(-1, 1, 6))[:, 0],
                          e.concept_importance, atol=1e-5)
    window = model.window_contributions(test)
    assert torch.allclose(window.sum(-1) + bias[:, None], e.window_logits.gather(
        2, e.prediction[:, None, None].expand(-1, e.valid.shape[1], 1))[..., 0] * e.valid + bias[:, None] * ~e.valid,
        atol=1e-4)
    attention = model.attention_maps(test)
    assert attention.shape == (20, 6, test.features.shape[1], test.features.shape[1])
    rows = attention.sum(-1)[e.valid[:, None, :].expand(-1, 6, -1)]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert torch.allclose(model.predict_from_concepts(e.concepts, e.valid), e.logits, atol=1e-5)
    importance = model.global_importance(world["test"])
    assert set(importance) <= set(CLASSES) and all(name in CONCEPTS for name, _ in importance["red then blue"])
    assert set(model.temperatures()) == set(CONCEPTS)


def test_evidence_over_time_is_the_model_on_each_prefix(world):
    model, test = world["model"], world["test"].subset(range(6))
    evidence = model.evidence_over_time(test)
    lengths = test.valid.sum(1)
    predicted = torch.as_tensor(model.predict(test))
    full = model.decision_function(test).gather(1, predicted[:, None])[:, 0]
    assert torch.allclose(evidence[torch.arange(6), lengths - 1], full, atol=1e-5)
    assert evidence.isnan().equal(~test.valid)
    row, cut = int(lengths.argmax()), 3
    prefix = (test.features[row:row + 1, :cut], test.valid[row:row + 1, :cut])
    assert evidence[row, cut - 1] == pytest.approx(float(model.decision_function(prefix)[0, predicted[row]]), abs=1e-5)
    other = (predicted + 1) % len(CLASSES)
    assert not torch.allclose(model.evidence_over_time(test, target=other).nan_to_num(), evidence.nan_to_num())


def test_decisive_window_is_the_largest_rise_after_the_first():
    nan = float("nan")
    evidence = torch.tensor([[5.0, 1.0, 4.0, 4.5, nan], [0.0, 0.5, 0.2, 3.0, 2.9], [2.0, nan, nan, nan, nan]])
    assert decisive_windows(evidence).tolist() == [2, 3, 0]
    assert decisive_windows(torch.tensor([[1.0], [2.0]])).tolist() == [0, 0]


def test_localisation_of_the_decisive_window(world):
    """The decisive window lands on a change far more often than a random window, and than MoTIF's peak
    time importance, which after a change of state may sit anywhere later (the >= 80% criterion is the
    toy-world acceptance test below)."""
    model, test, events = world["model"], world["test"], world["events"]
    e = model.explain(test)
    correct = e.prediction == test.labels
    decisive = localisation_hits(model.decisive_windows(test), test.window_spans, events)[correct].float().mean()
    peak = localisation_hits(e.most_important_window(), test.window_spans, events)[correct].float().mean()
    lengths = test.valid.sum(1).float()[correct]
    chance = float((2.0 / lengths).mean())  # two one-window events per video
    print(f"synthetic videos: decisive {float(decisive):.3f}, peak importance {float(peak):.3f}, chance {chance:.3f}")
    assert float(decisive) >= chance + 0.3 and decisive > peak


def test_interventions_on_concepts_windows_and_attention(world):
    model, test = world["model"], world["test"]
    base = model.decision_function(test)
    assert torch.equal(model.intervene(test), base)
    with pytest.raises(ValueError, match="every window of video"):
        model.intervene(test, drop_windows=list(range(12)))
    noisy = model.intervene(test, noise_concepts=["red"], noise_std=2.0, seed=1)
    assert torch.equal(noisy, model.intervene(test, noise_concepts=["red"], noise_std=2.0, seed=1))
    assert not torch.equal(noisy, base)
    # the bottleneck: setting a concept with a zero weight for every class changes nothing
    dropped, _ = model.edit("prune", "noise a")
    assert torch.allclose(dropped.intervene(test, {"noise a": 5.0}), dropped.decision_function(test))
    mask = torch.zeros(len(test), test.features.shape[1], 6, dtype=torch.bool)
    mask[:, :, 0] = True
    assert torch.allclose(model.intervene(test, (mask, torch.zeros_like(mask, dtype=torch.float32))),
                          model.intervene(test, {"red": 0.0}))
    for mode in ("identity", "uniform", "reversed", "shuffled"):
        e = model.explain(test, attention_mode=mode, seed=3)
        rows = e.attention.sum(-1)[e.valid[:, None, :].expand(-1, 6, -1)]
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5), mode
    identity = model.explain(test.subset([0]), attention_mode="identity").attention[0, 0]
    assert torch.equal(identity, torch.eye(len(identity)))
    with pytest.raises(ValueError, match="unknown attention mode"):
        model.explain(test, attention_mode="sideways")
    with pytest.raises(KeyError, match="unknown concept"):
        model.intervene(test, drop_concepts=["purple"])


def test_dropped_windows_and_concepts_leave_the_decision(world):
    """Drops act on the bottleneck: a dropped window is out of the pooling (the logits are the
    pooling of the other windows' own logits), a dropped concept contributes exactly zero, noise
    touches only its concept; the old input-stage zeroing failed all three."""
    model, test = world["model"], world["test"].subset(range(40))
    base = model.explain(test)
    weight, red = model.weight_, CONCEPTS.index("red")

    dropped = model.explain(test, drop_windows=[1, 2])
    kept = test.valid.clone()
    kept[:, 1:3] = False
    others = (model.tau * base.window_logits).masked_fill(~kept[..., None], float("-inf"))
    assert torch.allclose(dropped.logits, torch.logsumexp(others, 1) / model.tau, atol=1e-5)
    assert torch.equal(dropped.kept, kept) and torch.equal(dropped.valid, test.valid)
    assert dropped.concepts[:, 1:3].abs().sum() == 0 and dropped.time_importance[:, 1:3].abs().sum() == 0
    assert torch.allclose(model.predict_from_concepts(dropped.concepts, dropped.kept), dropped.logits, atol=1e-5)
    mask = torch.zeros_like(test.valid)
    mask[:, 1:3] = True
    assert torch.equal(model.intervene(test, drop_windows=mask), dropped.logits)

    big = CONCEPTS.index("big")  # zeroing its standardised input left its bottleneck at 644 of 780
    without = model.explain(test, drop_concepts=["big"])
    assert without.concepts[..., big].abs().sum() == 0 and without.concept_importance[:, big].abs().sum() == 0
    rest = [k for k in range(len(CONCEPTS)) if k != big]
    assert torch.equal(without.concepts[..., rest], base.concepts[..., rest])
    expected = base.window_logits - base.concepts[..., big, None] * weight[:, big]
    assert torch.allclose(without.window_logits[test.valid], expected[test.valid], atol=1e-5)
    assert base.concepts[..., big].abs().sum() > 1.0  # big mattered before the drop

    noisy = model.explain(test, noise_concepts=["red"], noise_std=2.0, seed=1)
    assert torch.equal(noisy.concepts[..., red + 1:], base.concepts[..., red + 1:])
    assert (noisy.concepts[..., red] >= 0).all() and noisy.concepts[..., red][~test.valid].abs().sum() == 0
    assert not torch.equal(noisy.concepts[..., red], base.concepts[..., red])


def test_reference_architecture_preset_is_documented_and_builds_the_reference_net(world):
    """Every preset entry differs from a default, is named in the module docstring, and builds the
    reference's network: width-K input encoding, LayerNorm, width-1 query/key/value and feed-forward."""
    import inspect

    import cbm.models.temporal as temporal

    defaults = {k: p.default for k, p in inspect.signature(TemporalCBM.__init__).parameters.items()}
    assert set(temporal.REFERENCE_ARCHITECTURE) == {"positional", "norm", "head_dim", "hidden", "lr"}
    for key, value in temporal.REFERENCE_ARCHITECTURE.items():
        assert defaults[key] != value and f"``{key}=" in temporal.__doc__, key
    model = TemporalCBM(world["bank"], epochs=2, **temporal.REFERENCE_ARCHITECTURE).fit(
        world["train"].subset(range(40)), validation=world["val"].subset(range(20)))
    net = model._network()
    assert isinstance(net.norm1, torch.nn.LayerNorm) and net.q_weight.shape == (6, 1)
    assert net.ffn_w1.shape == (6, 1) and not hasattr(net, "q_position")


def test_reversed_attention_moves_order_predictions_towards_the_partner(world):
    model, test = world["model"], world["test"]
    partner = torch.tensor([1, 0, 3, 2])[test.labels]
    rows = torch.arange(len(test))

    def margin(logits):  # partner minus true class
        return logits[rows, partner] - logits[rows, test.labels]

    normal = model.decision_function(test)
    reversed_ = model.intervene(test, attention_mode="reversed")
    correct = normal.argmax(1) == test.labels
    shift = (margin(reversed_) - margin(normal))[correct]
    assert float(shift.mean()) > 0
    flipped = reversed_.argmax(1)[correct]
    assert int((flipped == partner[correct]).sum()) > int(((flipped != partner[correct])
                                                            & (flipped != test.labels[correct])).sum())


def test_mixing_attention_and_reference_options_run(world):
    small = world["train"].subset(range(60))
    mixing = TemporalCBM(world["bank"], attention="mixing", heads=2, epochs=2).fit(small, validation=world["val"])
    assert mixing.attention_maps(world["test"].subset(range(3))).shape[1] == 2
    reference = TemporalCBM(world["bank"], positional="input", norm="layer", head_dim=1, epochs=2).fit(small)
    assert reference.training_["validation_videos"] == 6
    with pytest.raises(ValueError, match="heads dividing"):
        TemporalCBM(world["bank"], attention="mixing", heads=4, epochs=1).fit(small, validation=world["val"])


def test_edits_and_undo(world):
    model, val = world["model"], world["val"]
    edited, record = model.edit("prune", "red", "red then blue", validation=val, reason="test")
    assert edited.weight_[0, 0] == 0 and model.weight_[0, 0] >= 0 and "val_accuracy" in record.before
    assert torch.equal(edited.undo().weight_, model.weight_)
    with pytest.raises(ValueError, match="non-negative"):
        model.edit("set_weight", "red", value=-1.0)
    with pytest.raises(ValueError, match="no edits"):
        model.undo()


def test_baselines(world):
    averaged = TimeAveragedCBM(world["bank"]).fit(world["train"], validation=world["val"])
    assert averaged.score(world["test"]) > 0.5  # the big/left pair is readable from averages
    texts = torch.tensor(_directions()[:4], dtype=torch.float32)
    for method in ("pooled", "soft", "majority"):
        assert zero_shot_video(texts, world["test"], method).shape == (200, 4)


def test_bundle_round_trip_and_tampering(world, tmp_path):
    model = world["model"]
    edited, _ = model.edit("prune", "blue", reason="why not")
    path = edited.save(tmp_path / "temporal.cbm", metrics={"test_accuracy": 0.5})
    loaded = load(path)
    test = world["test"]
    assert isinstance(loaded, TemporalCBM) and loaded.edits_[0].reason == "why not"
    assert torch.allclose(loaded.decision_function(test), edited.decision_function(test), atol=1e-5)
    assert torch.allclose(loaded.attention_maps(test.subset(range(4))), edited.attention_maps(test.subset(range(4))),
                          atol=1e-5)
    assert torch.equal(loaded.undo().weight_, model.weight_) and loaded.metrics_["test_accuracy"] == 0.5

    def rewrite(change):
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + size])
        manifest = json.loads(header["__metadata__"]["cbm_manifest"])
        change(manifest)
        header["__metadata__"]["cbm_manifest"] = json.dumps(manifest)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        bad = tmp_path / "bad.cbm"
        bad.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])
        return bad

    with pytest.raises(BundleError, match="inconsistent temporal"):
        load(rewrite(lambda m: m["params"].update(hidden=7)))
    with pytest.raises(BundleError, match="inconsistent temporal"):
        load(rewrite(lambda m: m["params"].update(attention="mixing")))
    with pytest.raises(BundleError, match="inconsistent temporal"):
        load(rewrite(lambda m: m["state"]["network"].pop()))


# ---------------------------------------------------------------------------------------------
# Acceptance on the toy world (toy:clip, toy:videos); skipped until the toy CLIP ships
# ---------------------------------------------------------------------------------------------

TOY_CLIP = Path(__file__).resolve().parents[1] / "cbm" / "assets" / "toy_clip"
needs_toy_clip = pytest.mark.skipif(not TOY_CLIP.exists(), reason="the toy CLIP (cbm/assets/toy_clip) is not shipped yet")


@pytest.fixture(scope="session")
def toy_videos(tmp_path_factory):
    from cbm.backbones import load_backbone
    from cbm.data.toy import ToyVideos
    from cbm.embed import embed
    from cbm.toy import toy_text_bank

    torch.set_num_threads(1)
    clip = load_backbone("toy:clip", device="cpu")
    cache = tmp_path_factory.mktemp("temporal-cache")
    data, sequences = {}, {}
    for split, n in {"train": 1000, "val": 100, "test": 150}.items():
        data[split] = ToyVideos(split, n, window=4, frames_per_window=4)
        with all_cores():
            windows = embed(clip, data[split], cache_dir=cache, progress=False, num_workers=0)
        sequences[split] = sequences_from_windows(windows)
    bank = toy_text_bank(clip)
    model = TemporalCBM(bank, seed=0).fit(sequences["train"], validation=sequences["val"])
    averaged = TimeAveragedCBM(bank).fit(sequences["train"], validation=sequences["val"])
    return {"data": data, "seq": sequences, "model": model, "averaged": averaged}


@needs_toy_clip
def test_toy_temporal_beats_time_averaging_by_20_points(toy_videos):
    test = toy_videos["seq"]["test"]
    temporal = toy_videos["model"].score(test)
    averaged = toy_videos["averaged"].score(test)
    print(f"toy videos: temporal {temporal:.3f}, time-averaged {averaged:.3f}")
    assert temporal >= averaged + 0.20


@needs_toy_clip
def test_toy_decisive_window_overlaps_the_event(toy_videos):
    data, test, model = toy_videos["data"]["test"], toy_videos["seq"]["test"], toy_videos["model"]
    events = [[(ev["start"], ev["stop"]) for ev in data.event_spans(v, defining_only=True)] for v in range(len(test))]
    correct = torch.as_tensor(model.predict(test)) == test.labels
    rate = float(localisation_hits(model.decisive_windows(test), test.window_spans, events)[correct].float().mean())
    print(f"toy videos: localisation {rate:.3f} over {int(correct.sum())} correct videos")
    assert rate >= 0.8


@needs_toy_clip
def test_toy_reversed_attention_moves_predictions_to_the_partner(toy_videos):
    from cbm.data.toy import VIDEO_CLASS_NAMES, VIDEO_ORDER_PAIRS

    test, model = toy_videos["seq"]["test"], toy_videos["model"]
    partner = {}
    for a, b in VIDEO_ORDER_PAIRS:
        partner[VIDEO_CLASS_NAMES.index(a)], partner[VIDEO_CLASS_NAMES.index(b)] = (VIDEO_CLASS_NAMES.index(b),
                                                                                    VIDEO_CLASS_NAMES.index(a))
    other = torch.tensor([partner[int(y)] for y in test.labels])
    rows = torch.arange(len(test))
    normal, flipped = model.decision_function(test), model.intervene(test, attention_mode="reversed")
    correct = normal.argmax(1) == test.labels
    shift = ((flipped[rows, other] - flipped[rows, test.labels]) - (normal[rows, other] - normal[rows, test.labels]))
    print(f"toy videos: reversed attention, mean partner-margin shift {float(shift[correct].mean()):.3f}")
    assert float(shift[correct].mean()) > 0
