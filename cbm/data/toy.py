"""The offline toy world: procedurally generated shapes with known concepts, classes and videos.

Everything here is deterministic from seeds and needs no download. An image shows one object
(or a pair of identical copies) on a background; 30 binary concepts describe it in plain
words that CLIP captions use ("red", "striped", "on the left", "dark background", ...).

Classes (``CLASS_NAMES``) are concept profiles: each class is a mixture of one or two *modes*,
and inside a mode every concept group is drawn independently. Two-mode classes keep some
concept pairs strongly dependent within the class (``DEPENDENT_PAIRS``), for example a kite
is either blue and striped or red and checkered, so knowing its colour tells its pattern.
``class_concept_matrix()`` gives the exact class x concept marginal probabilities and
``conditional_concept_matrix(c)`` the exact P(concept j | concept i, class c).

Spurious variant: with strength ``s`` the training split draws the background from the
class's assigned background (``SPURIOUS_BACKGROUND``) with probability ``s``; validation and
test backgrounds never depend on the class.

Videos (``ToyVideos``): one object changes over 12-48 frames; the action classes
(``VIDEO_CLASS_NAMES``) are defined by the ORDER of two events ("turns red then blue" vs
"turns blue then red"); other changes are distractors. Ground truth: a concept vector per
frame and the frame span of every event.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cbm.data.base import ConceptDataset, VideoWindowDataset, digest, window_spans

logger = logging.getLogger(__name__)

WORLD_VERSION = "toy-world-2"

# ---------------------------------------------------------------------------------------------
# Concepts
# ---------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "medium", "large")  # "medium" is no concept (neither small nor large)
PATTERNS = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("light", "dark", "noisy")
HPOS = ("left", "centre", "right")  # horizontal third of the object's centre
VPOS = ("top", "middle", "bottom")  # vertical third of the object's centre
OUTLINES = ("none", "black", "white")

CONCEPT_GROUPS: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "size": ["small", "large"],
    "pattern": list(PATTERNS),
    "background": ["light background", "dark background", "noisy background"],
    "position": ["on the left", "on the right", "at the top", "at the bottom"],
    "count": ["a pair of objects"],
    "outline": ["black outline", "white outline"],
    "frame": ["frame around the image"],
    "blur": ["blurry"],
}
CONCEPTS: list[str] = [name for names in CONCEPT_GROUPS.values() for name in names]
CONCEPT_INDEX: dict[str, int] = {name: i for i, name in enumerate(CONCEPTS)}
NUM_CONCEPTS = len(CONCEPTS)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 175, 45),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "cyan": (30, 210, 220),
}
OUTLINE_RGB = {"black": (0, 0, 0), "white": (255, 255, 255)}
FRAME_RGB = (135, 88, 45)  # a wooden brown, distinct from every object colour

# Object radius (fraction of the image side) per size category; concepts use the thresholds.
SIZE_RADIUS = {"small": (0.11, 0.125), "medium": (0.16, 0.175), "large": (0.215, 0.235)}
SMALL_BELOW = 0.1425
LARGE_ABOVE = 0.195
PAIR_SCALE = 0.75  # each copy of a pair is this much smaller
FRAME_WIDTH = 0.065
BLUR_RADIUS = 0.02
PATTERN_SHADE = 0.4  # patterns alternate the object's colour with this darker shade of it

# ---------------------------------------------------------------------------------------------
# Classes: mixtures of modes; each mode overrides the world defaults of some groups
# ---------------------------------------------------------------------------------------------

# Group -> categorical values (binary groups use a probability of True instead).
CATEGORICAL = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "hpos": HPOS,
    "vpos": VPOS,
    "outline": OUTLINES,
}
BINARY = ("pair", "frame", "blurry")

# World defaults: also the distribution of "free" scenes (``random_scene``) for every group.
DEFAULTS: dict[str, dict[str, float] | float] = {
    "shape": {v: 1 / 6 for v in SHAPES},
    "colour": {v: 1 / 6 for v in COLOURS},
    "size": {v: 1 / 3 for v in SIZES},
    "pattern": {v: 1 / 4 for v in PATTERNS},
    "background": {v: 1 / 3 for v in BACKGROUNDS},
    "hpos": {v: 1 / 3 for v in HPOS},
    "vpos": {v: 1 / 3 for v in VPOS},
    "outline": {"none": 0.5, "black": 0.25, "white": 0.25},
    "pair": 0.2,
    "frame": 0.25,
    "blurry": 0.15,
}

Mode = dict  # group -> {value: prob} or probability (binary groups)

CLASS_PROFILES: dict[str, list[tuple[float, Mode]]] = {
    "tomato": [(1.0, {"shape": {"circle": 1}, "colour": {"red": 1}, "pattern": {"solid": 0.8, "dotted": 0.2},
                      "size": {"large": 0.6, "medium": 0.35, "small": 0.05}, "pair": 0.03})],
    "cherries": [(1.0, {"shape": {"circle": 1}, "colour": {"red": 1}, "pattern": {"solid": 0.85, "striped": 0.15},
                        "size": {"small": 0.6, "medium": 0.4}, "pair": 0.97})],
    "lime": [(1.0, {"shape": {"circle": 1}, "colour": {"green": 1}, "pattern": {"solid": 0.6, "dotted": 0.4},
                    "size": {"small": 0.5, "medium": 0.4, "large": 0.1}, "pair": 0.3})],
    "sun": [(1.0, {"shape": {"circle": 1}, "colour": {"yellow": 1}, "pattern": {"solid": 0.9, "dotted": 0.1},
                   "size": {"large": 0.7, "medium": 0.3}, "vpos": {"top": 0.85, "middle": 0.15}, "pair": 0.0,
                   "outline": {"none": 0.8, "white": 0.2}})],
    "beach ball": [(0.5, {"shape": {"circle": 1}, "colour": {"blue": 1}, "pattern": {"striped": 1},
                          "vpos": {"bottom": 0.6, "middle": 0.3, "top": 0.1}}),
                   (0.5, {"shape": {"circle": 1}, "colour": {"yellow": 1}, "pattern": {"checkered": 1},
                          "vpos": {"bottom": 0.6, "middle": 0.3, "top": 0.1}})],
    "chessboard": [(1.0, {"shape": {"square": 1}, "colour": {"purple": 0.5, "cyan": 0.5},
                          "pattern": {"checkered": 0.97, "solid": 0.03}, "size": {"large": 0.6, "medium": 0.4},
                          "frame": 0.7, "pair": 0.0, "outline": {"black": 0.5, "none": 0.5}})],
    "brick": [(1.0, {"shape": {"square": 1}, "colour": {"red": 1}, "pattern": {"striped": 0.7, "solid": 0.3},
                     "outline": {"white": 0.6, "none": 0.4}, "size": {"medium": 0.6, "small": 0.2, "large": 0.2},
                     "pair": 0.35})],
    "gift box": [(0.5, {"shape": {"square": 1}, "colour": {"purple": 1}, "pattern": {"dotted": 1}}),
                 (0.5, {"shape": {"square": 1}, "colour": {"green": 1}, "pattern": {"striped": 1}})],
    "ice cube": [(1.0, {"shape": {"square": 1}, "colour": {"cyan": 0.5, "blue": 0.5}, "pattern": {"solid": 0.9, "dotted": 0.1},
                        "outline": {"white": 0.7, "none": 0.3}, "size": {"small": 0.5, "medium": 0.5}, "pair": 0.4})],
    "warning sign": [(0.5, {"shape": {"triangle": 1}, "colour": {"yellow": 1}, "outline": {"black": 1},
                            "pattern": {"solid": 0.9, "striped": 0.1}}),
                     (0.5, {"shape": {"triangle": 1}, "colour": {"red": 1}, "outline": {"white": 1},
                            "pattern": {"solid": 0.9, "striped": 0.1}})],
    "christmas tree": [(1.0, {"shape": {"triangle": 1}, "colour": {"green": 1}, "pattern": {"dotted": 0.75, "solid": 0.25},
                              "size": {"large": 0.6, "medium": 0.4}, "vpos": {"bottom": 0.5, "middle": 0.5}, "pair": 0.1})],
    "starfish": [(1.0, {"shape": {"star": 1}, "colour": {"red": 0.6, "purple": 0.4}, "pattern": {"dotted": 0.8, "solid": 0.2},
                        "vpos": {"bottom": 0.6, "middle": 0.4}})],
    "sheriff badge": [(1.0, {"shape": {"star": 1}, "colour": {"yellow": 1}, "pattern": {"solid": 0.8, "checkered": 0.2},
                             "outline": {"black": 0.7, "none": 0.3}, "size": {"small": 0.5, "medium": 0.5}, "pair": 0.05})],
    "first aid kit": [(1.0, {"shape": {"cross": 1}, "colour": {"red": 1}, "pattern": {"solid": 0.9, "striped": 0.1},
                             "outline": {"white": 0.8, "none": 0.2}, "frame": 0.4})],
    "pharmacy sign": [(1.0, {"shape": {"cross": 1}, "colour": {"green": 0.8, "cyan": 0.2},
                             "pattern": {"solid": 0.5, "checkered": 0.5}, "frame": 0.5})],
    "kite": [(0.5, {"shape": {"diamond": 1}, "colour": {"blue": 1}, "pattern": {"striped": 1},
                    "vpos": {"top": 0.8, "middle": 0.2}}),
             (0.5, {"shape": {"diamond": 1}, "colour": {"red": 1}, "pattern": {"checkered": 1},
                    "vpos": {"top": 0.8, "middle": 0.2}})],
    "gemstone": [(1.0, {"shape": {"diamond": 1}, "colour": {"cyan": 0.4, "blue": 0.3, "purple": 0.3},
                        "pattern": {"solid": 0.8, "dotted": 0.2}, "size": {"small": 0.6, "medium": 0.4},
                        "outline": {"white": 0.5, "none": 0.5}, "pair": 0.3})],
}
CLASS_NAMES: list[str] = list(CLASS_PROFILES)
NUM_CLASSES = len(CLASS_NAMES)

#: Concept pairs that are (near-)deterministically tied inside a class by its two modes.
DEPENDENT_PAIRS: dict[str, list[tuple[str, str]]] = {
    "beach ball": [("blue", "striped"), ("yellow", "checkered")],
    "gift box": [("purple", "dotted"), ("green", "striped")],
    "warning sign": [("yellow", "black outline"), ("red", "white outline")],
    "kite": [("blue", "striped"), ("red", "checkered")],
}

#: Spurious variant: the background each class gets (with probability ``spurious``) in train.
SPURIOUS_BACKGROUND: dict[str, str] = {
    name: BACKGROUNDS[i % len(BACKGROUNDS)] for i, name in enumerate(CLASS_NAMES)
}

SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_029, "test": 3_000_017}
VIDEO_SPLIT_SEEDS = {"train": 4_000_037, "val": 5_000_011, "test": 6_000_023}


def _split_seed(split: str, table: dict[str, int]) -> int:
    if split not in table:
        raise ValueError(f"split must be one of {sorted(table)}, got {split!r}.")
    return table[split]


def _mode_dist(mode: Mode, group: str) -> dict[str, float] | float:
    return mode.get(group, DEFAULTS[group])


def _value_probs(dist: dict[str, float], values: Sequence[str]) -> np.ndarray:
    probs = np.array([float(dist.get(v, 0.0)) for v in values])
    return probs / probs.sum()


# ---------------------------------------------------------------------------------------------
# Scenes: everything needed to render one image
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """Parameters of one image. Geometry is in fractions of the image side."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    radius: float
    cx: float
    cy: float
    pattern: str
    pattern_angle: int
    pattern_phase: float
    background: str
    bg_level: float
    bg_tint: tuple[int, int, int]
    noise_seed: int
    pair: bool
    pair_axis: str  # "h" or "v"
    outline: str
    frame: bool
    blurry: bool
    rotation: float = 0.0
    visible: bool = True
    label: int = -1

    def concepts(self) -> np.ndarray:
        """The binary concept vector (float32 [K]) of this scene."""
        return scene_concepts(self)


def scene_concepts(scene: Scene) -> np.ndarray:
    """Binary concept vector (float32 [K]) derived from a scene's parameters."""
    vec = np.zeros(NUM_CONCEPTS, dtype=np.float32)
    vec[CONCEPT_INDEX[f"{scene.background} background"]] = 1
    if scene.frame:
        vec[CONCEPT_INDEX["frame around the image"]] = 1
    if scene.blurry:
        vec[CONCEPT_INDEX["blurry"]] = 1
    if not scene.visible:
        return vec
    vec[CONCEPT_INDEX[scene.shape]] = 1
    vec[CONCEPT_INDEX[scene.colour]] = 1
    if scene.radius < SMALL_BELOW:
        vec[CONCEPT_INDEX["small"]] = 1
    elif scene.radius > LARGE_ABOVE:
        vec[CONCEPT_INDEX["large"]] = 1
    vec[CONCEPT_INDEX[scene.pattern]] = 1
    if scene.cx < 1 / 3:
        vec[CONCEPT_INDEX["on the left"]] = 1
    elif scene.cx > 2 / 3:
        vec[CONCEPT_INDEX["on the right"]] = 1
    if scene.cy < 1 / 3:
        vec[CONCEPT_INDEX["at the top"]] = 1
    elif scene.cy > 2 / 3:
        vec[CONCEPT_INDEX["at the bottom"]] = 1
    if scene.pair:
        vec[CONCEPT_INDEX["a pair of objects"]] = 1
    if scene.outline != "none":
        vec[CONCEPT_INDEX[f"{scene.outline} outline"]] = 1
    return vec


def _extent(radius: float, pair: bool, axis: str) -> tuple[float, float]:
    """Half extent (x, y) of the object or pair around its centre of mass."""
    if not pair:
        return radius, radius
    r = radius * PAIR_SCALE
    offset = _pair_offset(radius)
    return (offset + r, r) if axis == "h" else (r, offset + r)


def _pair_offset(radius: float) -> float:
    return radius * PAIR_SCALE * 1.25


def _place(u: float, third: int, extent: float) -> float:
    """A centre coordinate inside the given third (0, 1, 2), keeping the object mostly in view."""
    lo_third, hi_third = third / 3 + 0.02, (third + 1) / 3 - 0.02
    lo = max(lo_third, min(extent + 0.01, hi_third))
    hi = min(hi_third, max(1 - extent - 0.01, lo_third))
    if lo > hi:
        lo, hi = hi, lo
    return float(lo + u * (hi - lo))


_GROUPS = tuple(CATEGORICAL) + BINARY


@functools.lru_cache(maxsize=None)
def _mode_tables(label: int | None) -> tuple[tuple[float, ...], list[tuple[tuple[float, ...], ...]]]:
    """Cumulative mode weights and, per mode, the cumulative distribution of every group."""
    modes = [(1.0, {})] if label is None else CLASS_PROFILES[CLASS_NAMES[label]]
    weights = np.cumsum([w for w, _ in modes]).tolist()
    tables = []
    for _, mode in modes:
        cums = []
        for group in _GROUPS:
            if group in CATEGORICAL:
                cums.append(tuple(np.cumsum(_value_probs(_mode_dist(mode, group), CATEGORICAL[group])).tolist()))
            else:
                cums.append((1.0 - float(_mode_dist(mode, group)), 1.0))
        tables.append(tuple(cums))
    return tuple(w / weights[-1] for w in weights), tables


def _pick(cum: tuple[float, ...], u: float) -> int:
    return min(bisect.bisect_right(cum, u), len(cum) - 1)


def sample_scene(
    rng: np.random.Generator,
    label: int | None = None,
    *,
    spurious: float = 0.0,
) -> Scene:
    """Draw a scene of class ``label`` (``None``: a free scene, every group from the world defaults).

    ``spurious`` is the probability that the background is replaced by the class's assigned
    background (``SPURIOUS_BACKGROUND``). The random stream consumed does not depend on
    ``spurious``, so the same seed gives the same object whatever the strength.
    """
    u = rng.random(24)
    weights, tables = _mode_tables(label)
    cums = tables[_pick(weights, u[0])]
    draws: dict = {}
    for k, group in enumerate(_GROUPS):
        index = _pick(cums[k], u[1 + k])
        draws[group] = CATEGORICAL[group][index] if group in CATEGORICAL else bool(index == 1)
    if label is not None and u[13] < spurious:
        draws["background"] = SPURIOUS_BACKGROUND[CLASS_NAMES[label]]
    lo, hi = SIZE_RADIUS[draws["size"]]
    radius = lo + u[14] * (hi - lo)
    hpos, vpos = HPOS.index(draws["hpos"]), VPOS.index(draws["vpos"])
    if hpos != 1 and vpos == 1:
        axis = "v"
    elif vpos != 1 and hpos == 1:
        axis = "h"
    else:
        axis = "h" if u[15] < 0.5 else "v"
    ex, ey = _extent(radius, draws["pair"], axis)
    cx, cy = _place(u[16], hpos, ex), _place(u[17], vpos, ey)
    base = PALETTE[draws["colour"]]
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(min(255, max(0, int(b + j))) for b, j in zip(base, jitter))
    lo_level, hi_level = {"light": (175, 215), "dark": (35, 70), "noisy": (85, 165)}[draws["background"]]
    level = lo_level + u[18] * (hi_level - lo_level)
    tint = tuple(int(v) for v in rng.integers(-8, 9, size=3))
    return Scene(
        shape=draws["shape"], colour=draws["colour"], rgb=rgb, radius=float(radius), cx=cx, cy=cy,
        pattern=draws["pattern"], pattern_angle=(0, 45, 90, 135)[int(u[19] * 4)],
        pattern_phase=float(u[20]), background=draws["background"], bg_level=float(level),
        bg_tint=tint, noise_seed=int(u[21] * (2**31 - 1)), pair=draws["pair"], pair_axis=axis,
        outline=draws["outline"], frame=draws["frame"], blurry=draws["blurry"],
        rotation=float(u[22] * 20 - 10), visible=True, label=-1 if label is None else int(label),
    )


TWIN_GROUPS = {"shape": 0.45, "pattern": 0.2, "size": 0.15, "count": 0.1, "outline": 0.1}


def twin_scene(scene: Scene, rng: np.random.Generator, group: str | None = None) -> tuple[Scene, str]:
    """The same scene with one concept group changed (a counterfactual twin) and that group's name.

    Groups: shape, pattern, size, count (single <-> pair) or outline; ``None`` draws one with
    ``TWIN_GROUPS`` weights. Position concepts stay as they were (the centre does not move).
    """
    if group is None:
        names = list(TWIN_GROUPS)
        group = names[int(rng.choice(len(names), p=np.array(list(TWIN_GROUPS.values()))))]

    def other(values: Sequence[str], current: str) -> str:
        options = [v for v in values if v != current]
        return options[int(rng.integers(len(options)))]

    if group == "shape":
        return replace(scene, shape=other(SHAPES, scene.shape)), group
    if group == "pattern":
        return replace(scene, pattern=other(PATTERNS, scene.pattern)), group
    if group == "size":
        current = "small" if scene.radius < SMALL_BELOW else "large" if scene.radius > LARGE_ABOVE else "medium"
        lo, hi = SIZE_RADIUS[other(SIZES, current)]
        return replace(scene, radius=float(rng.uniform(lo, hi))), group
    if group == "count":
        return replace(scene, pair=not scene.pair), group
    if group == "outline":
        return replace(scene, outline=other(OUTLINES, scene.outline)), group
    raise ValueError(f"cannot make a twin by changing {group!r}; use one of {sorted(TWIN_GROUPS)}.")


def random_scene(rng: np.random.Generator) -> Scene:
    """A free scene: every concept group drawn from the world defaults, independent of any class."""
    return sample_scene(rng, None)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.86, y * 0.86) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(a)) * 1.12, math.sin(math.radians(a)) * 1.12 + 0.18) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            rr = 1.12 if k % 2 == 0 else 0.47
            pts.append((math.cos(a) * rr, math.sin(a) * rr + 0.08))
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "diamond":
        pts = [(0, -1.12), (0.7, 0), (0, 1.12), (-0.7, 0)]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape_mask(scene: Scene, size: int, grow: float = 0.0) -> np.ndarray:
    """Boolean mask of the object (both copies for a pair), radius enlarged by ``grow`` pixels."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    radius = scene.radius * size * (PAIR_SCALE if scene.pair else 1.0) + grow
    cx, cy = scene.cx * size, scene.cy * size
    if scene.pair:
        offset = _pair_offset(scene.radius) * size
        centres = [(cx - offset, cy), (cx + offset, cy)] if scene.pair_axis == "h" else [(cx, cy - offset), (cx, cy + offset)]
    else:
        centres = [(cx, cy)]
    for x, y in centres:
        if scene.shape == "circle":
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
        else:
            draw.polygon(_polygon(scene.shape, x, y, radius, scene.rotation), fill=255)
    return np.asarray(image) > 127


def _pattern_mask(scene: Scene, size: int) -> np.ndarray | None:
    """Where the pattern shows the dark shade of the object's colour (None for solid)."""
    if scene.pattern == "solid":
        return None
    xx, yy = _grid(size)
    r_px = scene.radius * size * (PAIR_SCALE if scene.pair else 1.0)
    period = max(3.0, 0.6 * r_px)
    phase = scene.pattern_phase * period
    if scene.pattern == "striped":
        a = math.radians(scene.pattern_angle)
        t = xx * math.cos(a) + yy * math.sin(a) + phase
        return (t % period) < period / 2
    if scene.pattern == "dotted":
        dx = (xx + phase) % period - period / 2
        dy = (yy + phase) % period - period / 2
        return dx * dx + dy * dy < (0.3 * period) ** 2
    cell = max(2.0, period / 2)
    return ((np.floor((xx + phase) / cell) + np.floor((yy + phase) / cell)) % 2) == 0


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed field of Gaussian noise; noisy backgrounds are crops of it."""
    return np.random.default_rng(20261129).normal(0.0, 36.0, size=(4 * size, 4 * size)).astype(np.float32)


def _background(scene: Scene, size: int) -> np.ndarray:
    base = np.clip(np.array(scene.bg_tint, dtype=np.float32) + scene.bg_level, 0, 255)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = base
    if scene.background == "noisy":
        bank = _noise_bank(size)
        span = bank.shape[0] - size
        oy, ox = scene.noise_seed % span, (scene.noise_seed // span) % span
        image += bank[oy:oy + size, ox:ox + size, None]
    return image


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene to a uint8 array [size, size, 3]."""
    image = _background(scene, size)
    if scene.visible:
        mask = _shape_mask(scene, size)
        if scene.outline != "none":
            width = max(1.5, 0.04 * size)
            outer = _shape_mask(scene, size, grow=width)
            image[outer & ~mask] = OUTLINE_RGB[scene.outline]
        fill = np.array(scene.rgb, dtype=np.float32)
        pattern = _pattern_mask(scene, size)
        if pattern is None:
            image[mask] = fill
        else:
            image[mask & ~pattern] = fill
            image[mask & pattern] = fill * PATTERN_SHADE
    if scene.frame:
        w = max(2, int(round(FRAME_WIDTH * size)))
        frame = np.array(FRAME_RGB, dtype=np.float32)
        image[:w] = frame
        image[-w:] = frame
        image[:, :w] = frame
        image[:, -w:] = frame
    out = np.clip(image, 0, 255).astype(np.uint8)
    if scene.blurry:
        blurred = Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=max(1.0, BLUR_RADIUS * size)))
        out = np.asarray(blurred)
    return out


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene to a PIL RGB image."""
    return Image.fromarray(render_array(scene, size), mode="RGB")


# ---------------------------------------------------------------------------------------------
# Ground-truth probabilities
# ---------------------------------------------------------------------------------------------


def _mode_concept_probs(mode: Mode) -> np.ndarray:
    """P(concept = 1) under one mode (groups independent), ignoring the spurious background."""
    p = np.zeros(NUM_CONCEPTS)
    for group in ("shape", "colour", "pattern"):
        dist = _value_probs(_mode_dist(mode, group), CATEGORICAL[group])
        for value, prob in zip(CATEGORICAL[group], dist):
            p[CONCEPT_INDEX[value]] = prob
    sizes = _value_probs(_mode_dist(mode, "size"), SIZES)
    p[CONCEPT_INDEX["small"]], p[CONCEPT_INDEX["large"]] = sizes[0], sizes[2]
    bgs = _value_probs(_mode_dist(mode, "background"), BACKGROUNDS)
    for value, prob in zip(BACKGROUNDS, bgs):
        p[CONCEPT_INDEX[f"{value} background"]] = prob
    h = _value_probs(_mode_dist(mode, "hpos"), HPOS)
    v = _value_probs(_mode_dist(mode, "vpos"), VPOS)
    p[CONCEPT_INDEX["on the left"]], p[CONCEPT_INDEX["on the right"]] = h[0], h[2]
    p[CONCEPT_INDEX["at the top"]], p[CONCEPT_INDEX["at the bottom"]] = v[0], v[2]
    outl = _value_probs(_mode_dist(mode, "outline"), OUTLINES)
    p[CONCEPT_INDEX["black outline"]], p[CONCEPT_INDEX["white outline"]] = outl[1], outl[2]
    p[CONCEPT_INDEX["a pair of objects"]] = float(_mode_dist(mode, "pair"))
    p[CONCEPT_INDEX["frame around the image"]] = float(_mode_dist(mode, "frame"))
    p[CONCEPT_INDEX["blurry"]] = float(_mode_dist(mode, "blurry"))
    return p


def _spurious_background(p: np.ndarray, class_name: str, spurious: float) -> np.ndarray:
    p = p.copy()
    assigned = SPURIOUS_BACKGROUND[class_name]
    for value in BACKGROUNDS:
        k = CONCEPT_INDEX[f"{value} background"]
        p[k] = (1 - spurious) * p[k] + (spurious if value == assigned else 0.0)
    return p


def class_concept_matrix(spurious: float = 0.0) -> np.ndarray:
    """Exact P(concept k = 1 | class c) as float64 [C, K] (rows follow ``CLASS_NAMES``).

    ``spurious`` gives the matrix of a spurious training split of that strength (validation and
    test always follow ``spurious=0``).
    """
    rows = []
    for name in CLASS_NAMES:
        row = sum(w * _mode_concept_probs(mode) for w, mode in CLASS_PROFILES[name])
        total = sum(w for w, _ in CLASS_PROFILES[name])
        rows.append(_spurious_background(row / total, name, spurious))
    return np.stack(rows)


def conditional_concept_matrix(class_name: str) -> np.ndarray:
    """Exact P(concept j = 1 | concept i = 1, class) as [K, K] (row i, column j; NaN where P(i)=0).

    Inside a mode, groups are independent and values of one group exclusive, so the class's
    dependencies come only from its mixture of modes (see ``DEPENDENT_PAIRS``).
    """
    modes = CLASS_PROFILES[class_name]
    total = sum(w for w, _ in modes)
    joint = np.zeros((NUM_CONCEPTS, NUM_CONCEPTS))
    for w, mode in modes:
        p = _mode_concept_probs(mode)
        pair = np.outer(p, p)
        for names in CONCEPT_GROUPS.values():  # one group: exclusive values
            idx = [CONCEPT_INDEX[n] for n in names]
            pair[np.ix_(idx, idx)] = np.diag(p[idx])
        joint += w / total * pair
    marginal = np.diag(joint).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(marginal[:, None] > 0, joint / marginal[:, None], np.nan)


# ---------------------------------------------------------------------------------------------
# Captions and prompts
# ---------------------------------------------------------------------------------------------

_SHAPE_WORDS = {
    "circle": (["circle"] * 4 + ["disc", "round shape"], ["circles"] * 4 + ["discs", "round shapes"]),
    "square": (["square"], ["squares"]),
    "triangle": (["triangle"], ["triangles"]),
    "star": (["star"] * 3 + ["five-pointed star"], ["stars"] * 3 + ["five-pointed stars"]),
    "cross": (["cross"] * 3 + ["plus sign"], ["crosses"] * 3 + ["plus signs"]),
    "diamond": (["diamond"] * 3 + ["rhombus"], ["diamonds"] * 3 + ["rhombuses"]),
}
_NOUNS = (["shape", "object"], ["shapes", "objects"])
_SIZE_WORDS = {"small": ["small", "small", "tiny"], "large": ["large", "large", "big"]}
_PATTERN_ADJ = {
    "solid": ["solid", "solid", "plain"],
    "striped": ["striped", "striped", "stripy"],
    "dotted": ["dotted", "dotted", "spotted", "polka-dot"],
    "checkered": ["checkered", "checkered", "checked"],
}
_PATTERN_POST = {
    "solid": ["in a solid colour"],
    "striped": ["with stripes"],
    "dotted": ["with dots"],
    "checkered": ["with a checkered pattern"],
}
_BACKGROUND_WORDS = {
    "light background": ["light background", "light background", "bright background", "white background"],
    "dark background": ["dark background", "dark background", "black background"],
    "noisy background": ["noisy background", "noisy background", "textured background", "grainy background"],
}
_POSITION_WORDS = {
    "on the left": ["on the left", "on the left", "on the left side"],
    "on the right": ["on the right", "on the right", "on the right side"],
    "at the top": ["at the top", "at the top", "near the top"],
    "at the bottom": ["at the bottom", "at the bottom", "near the bottom"],
}
_CENTRE_WORDS = ["in the centre", "in the middle"]
_OUTLINE_WORDS = {
    "black outline": ["with a black outline", "outlined in black"],
    "white outline": ["with a white outline", "outlined in white"],
}
_FRAME_WORDS = ["with a frame around the image", "in a frame", "framed"]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(
    concepts: np.ndarray | Sequence[float],
    rng: np.random.Generator,
    class_name: str | None = None,
    keep: float = 0.7,
    always: Collection[str] = (),
) -> str:
    """A random caption of a concept vector: several templates and synonyms, each attribute kept
    with probability ``keep``; ``class_name`` (if given) appears in about half of the captions.

    ``always`` names concept groups (keys of ``CONCEPT_GROUPS``) that every caption mentions
    when the image has them, e.g. ``{"shape"}`` for two images that differ only in shape."""
    on = {CONCEPTS[k] for k, v in enumerate(np.asarray(concepts)) if v > 0.5}

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    def kept(group: str = "") -> bool:
        return bool(rng.random() < keep) or group in always

    shape = next((s for s in SHAPES if s in on), None)
    colour = next((c for c in COLOURS if c in on), None)
    size = next((s for s in ("small", "large") if s in on), None)
    pattern = next((p for p in PATTERNS if p in on), None)
    background = next((b for b in _BACKGROUND_WORDS if b in on), None)
    positions = [p for p in _POSITION_WORDS if p in on]
    pair = "a pair of objects" in on
    outline = next((o for o in _OUTLINE_WORDS if o in on), None)
    frame = "frame around the image" in on
    blurry = "blurry" in on

    if shape is None:  # no object visible (videos)
        parts = ["an empty image", "nothing"]
        text = pick(parts)
        if background and kept():
            text += f" on a {pick(_BACKGROUND_WORDS[background])}"
        return text

    if rng.random() < 0.12:  # a bare list of attributes
        words = [w for w, g in ((size, "size"), (colour, "colour"), (pattern, "pattern"), (shape, "shape"))
                 if w and kept(g)] or [shape]
        if pair and kept("count"):
            words.insert(0, "a pair of objects")
        words += [p for p in positions if kept("position")]
        words += [w for w, g in ((background, "background"), (outline, "outline")) if w and kept(g)]
        if frame and kept("frame"):
            words.append("frame around the image")
        if blurry and kept("blur"):
            words.append("blurry")
        return ", ".join(words)

    adjectives = []
    if size and kept("size"):
        adjectives.append(pick(_SIZE_WORDS[size]))
    if colour and kept("colour"):
        adjectives.append(colour)
    post = []
    if pattern and kept("pattern"):
        if rng.random() < 0.7:
            adjectives.append(pick(_PATTERN_ADJ[pattern]))
        else:
            post.append(pick(_PATTERN_POST[pattern]))
    shape_kept = kept("shape") or not adjectives
    singular, plural = _SHAPE_WORDS[shape] if shape_kept else _NOUNS
    adj = " ".join(adjectives)
    if pair and kept("count"):
        noun = f"{adj} {pick(plural)}".strip()
        head = pick([f"two {noun}", f"a pair of {noun}", f"a pair of objects: two {noun}"])
    else:
        noun = f"{adj} {pick(singular)}".strip()
        head = f"{_article(noun)} {noun}"
    tail = list(post)
    if outline and kept("outline"):
        tail.append(pick(_OUTLINE_WORDS[outline]))
    where = [pick(_POSITION_WORDS[p]) for p in positions if kept("position")]
    if not positions and kept("position"):
        where = [pick(_CENTRE_WORDS)]
    if where:
        tail.append(" and ".join(where))
    if background and kept("background"):
        tail.append(f"on a {pick(_BACKGROUND_WORDS[background])}")
    if frame and kept("frame"):
        tail.append(pick(_FRAME_WORDS))
    rng.shuffle(tail)
    body = " ".join([head] + tail)
    if blurry and kept("blur"):
        body = pick([f"a blurry photo of {body}", f"{body}, blurry", f"{body}, out of focus"])
    elif rng.random() < 0.4:
        body = f"a photo of {body}"
    if class_name is not None and rng.random() < 0.5:
        name = f"{_article(class_name)} {class_name}"
        body = pick([f"{name}: {body}", f"{body}, {name}", f"a photo of {name}, {body}"])
    return body


_PROMPT_TEMPLATES = {
    "shape": ["a photo of a {c}", "a {c}", "a {c} shape"],
    "colour": ["a photo of a {c} shape", "a {c} object", "a {c} shape"],
    "size": ["a photo of a {c} shape", "a {c} object", "a {c} shape"],
    "pattern": ["a photo of a {c} shape", "a {c} object", "a {c} shape"],
    "background": ["a photo of a shape on a {c}", "an object on a {c}", "a shape on a {c}"],
    "position": ["a photo of a shape {c}", "an object {c}", "a shape {c}"],
    "count": ["a photo of {c}", "{c}", "a pair of shapes"],
    "outline": ["a photo of a shape with a {c}", "an object with a {c}", "a shape with a {c}"],
    "frame": ["a photo of a shape with a {c}", "a shape with a {c}", "a framed shape"],
    "blur": ["a {c} photo of a shape", "a {c} photo of an object", "a {c} shape"],
}
CONCEPT_GROUP_OF: dict[str, str] = {name: group for group, names in CONCEPT_GROUPS.items() for name in names}


def concept_prompts(concept: str) -> list[str]:
    """Text prompts for zero-shot detection of a world concept (average their embeddings)."""
    group = CONCEPT_GROUP_OF[concept]
    return [t.format(c=concept) for t in _PROMPT_TEMPLATES[group]]


def class_prompts(class_name: str) -> list[str]:
    """Text prompts for zero-shot classification by class name."""
    a = _article(class_name)
    return [f"a photo of {a} {class_name}", f"{a} {class_name}"]


# ---------------------------------------------------------------------------------------------
# Image dataset
# ---------------------------------------------------------------------------------------------


def _sample_rng(kind: str, split_seed: int, seed: int, index: int) -> np.random.Generator:
    tag = {"image": 1, "video": 2}[kind]
    return np.random.default_rng([tag, split_seed, seed, index])


class ToyImages(ConceptDataset):
    """Images of the toy world as a ``ConceptDataset`` (rendered on demand from per-sample seeds).

    Sample ``i`` of (split, seed) is the same whatever ``n``; ``spurious`` only acts on the
    training split (see ``SPURIOUS_BACKGROUND``). ``render_all()`` gives a uint8 array for training.
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 2000,
        seed: int = 0,
        spurious: float = 0.0,
        image_size: int = 64,
    ) -> None:
        if not 0.0 <= spurious <= 1.0:
            raise ValueError(f"spurious must lie in [0, 1], got {spurious}.")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}.")
        self.split, self.n, self.seed, self.image_size = split, int(n), int(seed), int(image_size)
        self.spurious = float(spurious)
        self._split_seed = _split_seed(split, SPLIT_SEEDS)
        self._effective_spurious = self.spurious if split == "train" else 0.0
        self.class_names = list(CLASS_NAMES)
        self.concept_names = list(CONCEPTS)
        self.ids = [f"toy/{split}/{i:06d}" for i in range(self.n)]
        scenes = [self.scene(i) for i in range(self.n)]
        self.labels = np.array([s.label for s in scenes], dtype=np.int64)
        self.concept_labels = (
            np.stack([s.concepts() for s in scenes]) if scenes else np.zeros((0, NUM_CONCEPTS), np.float32)
        )

    def scene(self, index: int) -> Scene:
        """The parameters of sample ``index`` (re-drawn from its own seed)."""
        if not 0 <= index < self.n:
            raise IndexError(f"sample {index} out of range for {self.n} samples.")
        rng = _sample_rng("image", self._split_seed, self.seed, index)
        label = int(rng.integers(NUM_CLASSES))
        return sample_scene(rng, label, spurious=self._effective_spurious)

    def load(self, index: int) -> Image.Image:
        return render(self.scene(index), self.image_size)

    def render_all(self, indices: Sequence[int] | None = None, progress: bool = False) -> np.ndarray:
        """Render many samples at once: uint8 array [N, S, S, 3]."""
        indices = range(self.n) if indices is None else indices
        out = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.uint8)
        iterator = enumerate(indices)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(indices), desc="render toy images", mininterval=5)
        for j, i in iterator:
            out[j] = render_array(self.scene(int(i)), self.image_size)
        return out

    def fingerprint(self) -> str:
        return digest("ToyImages", WORLD_VERSION, self.split, self.n, self.seed, self.spurious, self.image_size)


# ---------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------

VIDEO_CLASSES: dict[str, tuple[str, str]] = {
    "turns red then blue": ("turns red", "turns blue"),
    "turns blue then red": ("turns blue", "turns red"),
    "grows then moves left": ("grows", "moves left"),
    "moves left then grows": ("moves left", "grows"),
    "becomes striped then shrinks": ("becomes striped", "shrinks"),
    "shrinks then becomes striped": ("shrinks", "becomes striped"),
    "appears then disappears": ("appears", "disappears"),
    "disappears then reappears": ("disappears", "appears"),
}
VIDEO_CLASS_NAMES: list[str] = list(VIDEO_CLASSES)
#: Pairs of video classes made of the same two events in the opposite order.
VIDEO_ORDER_PAIRS: list[tuple[str, str]] = [
    (a, b) for i, a in enumerate(VIDEO_CLASS_NAMES) for b in VIDEO_CLASS_NAMES[i + 1:]
    if sorted(VIDEO_CLASSES[a]) == sorted(VIDEO_CLASSES[b])
]
DISTRACTOR_EVENTS = ("changes colour", "changes pattern", "moves up", "moves down")
_GRADUAL = {"grows", "shrinks", "moves left", "moves up", "moves down"}
MIN_FRAMES, MAX_FRAMES = 12, 48


@dataclass(frozen=True)
class Event:
    """One change in a video over frames [start, stop): frames before ``start`` show the old
    state, frames from ``stop - 1`` on the new one (gradual changes interpolate in between)."""

    name: str
    start: int
    stop: int
    defining: bool
    target: object = None

    def as_dict(self) -> dict:
        return {"event": self.name, "start": self.start, "stop": self.stop, "defining": self.defining}


@dataclass(frozen=True)
class VideoSpec:
    """A video: its initial scene, length, label and events in time order."""

    label: int
    n_frames: int
    initial: Scene
    events: tuple[Event, ...] = field(default_factory=tuple)


def _next_size(radius: float, step: int) -> float:
    names = list(SIZES)
    current = 0 if radius < SMALL_BELOW else 2 if radius > LARGE_ABOVE else 1
    lo, hi = SIZE_RADIUS[names[current + step]]
    return (lo + hi) / 2


def sample_video(rng: np.random.Generator, label: int) -> VideoSpec:
    """Draw a video of action class ``label``: initial scene, length and event schedule."""
    first, second = VIDEO_CLASSES[VIDEO_CLASS_NAMES[label]]
    defining = {first, second}
    n_frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    scene = random_scene(rng)
    # make the defining events visible changes from the initial state
    colours = [c for c in COLOURS if c not in ("red", "blue")] if defining & {"turns red", "turns blue"} else list(COLOURS)
    colour = colours[int(rng.integers(len(colours)))]
    if "grows" in defining:
        size = ("small", "medium")[int(rng.integers(2))]
    elif "shrinks" in defining:
        size = ("medium", "large")[int(rng.integers(2))]
    else:
        size = SIZES[int(rng.integers(3))]
    pattern = scene.pattern
    if "becomes striped" in defining and pattern == "striped":
        pattern = ("solid", "dotted", "checkered")[int(rng.integers(3))]
    radius = float(rng.uniform(*SIZE_RADIUS[size]))
    if "grows" in defining:  # room to grow without leaving the image
        radius = min(radius, SIZE_RADIUS["medium"][1])
    cx = float(rng.uniform(0.45, 0.75)) if "moves left" in defining else float(rng.uniform(0.2, 0.8))
    cy = float(rng.uniform(0.3, 0.7))
    scene = replace(
        scene, colour=colour, rgb=PALETTE[colour], radius=radius, cx=cx, cy=cy, pattern=pattern,
        pair=False, blurry=bool(rng.random() < 0.1), visible=first != "appears", label=-1,
    )
    n_distractors = int(rng.integers(0, 3))
    kinds = [DISTRACTOR_EVENTS[int(rng.integers(len(DISTRACTOR_EVENTS)))] for _ in range(n_distractors)]
    order: list[tuple[str, bool]] = [(first, True), (second, True)]
    for kind in kinds:
        order.insert(int(rng.integers(len(order) + 1)), (kind, False))
    durations = [int(rng.integers(3, 7)) if name in _GRADUAL else 1 for name, _ in order]

    def min_gaps(count: int) -> np.ndarray:  # frames before, between and after the events
        return np.array([2] + [3] * (count - 1) + [1])

    slack = n_frames - sum(durations) - int(min_gaps(len(order)).sum())
    while slack < 0 and len(order) > 2:  # too short: drop distractors
        drop = next(i for i, (_, d) in enumerate(order) if not d)
        order.pop(drop)
        durations.pop(drop)
        slack = n_frames - sum(durations) - int(min_gaps(len(order)).sum())
    if slack < 0:
        durations = [min(d, 3) for d in durations]
        slack = n_frames - sum(durations) - int(min_gaps(len(order)).sum())
    gaps = min_gaps(len(order)) + rng.multinomial(max(slack, 0), np.ones(len(order) + 1) / (len(order) + 1))
    events, t = [], 0
    state_colour, state_pattern, state_cy = colour, pattern, cy
    for (name, is_defining), duration, gap in zip(order, durations, gaps[:-1]):
        start = t + int(gap)
        target: object = None
        if name == "turns red":
            target = "red"
        elif name == "turns blue":
            target = "blue"
        elif name == "becomes striped":
            target = "striped"
        elif name == "changes colour":
            options = [c for c in COLOURS if c not in ("red", "blue", state_colour)]
            target = options[int(rng.integers(len(options)))]
        elif name == "changes pattern":
            options = [p for p in PATTERNS if p not in ("striped", state_pattern)]
            target = options[int(rng.integers(len(options)))]
        elif name == "moves left":
            target = float(rng.uniform(0.15, 0.28))
        elif name in ("moves up", "moves down"):
            target = float(np.clip(state_cy + (-1 if name == "moves up" else 1) * rng.uniform(0.15, 0.3), 0.15, 0.85))
            state_cy = target
        if name in ("turns red", "turns blue", "changes colour"):
            state_colour = str(target)
        if name in ("becomes striped", "changes pattern"):
            state_pattern = str(target)
        events.append(Event(name, start, start + duration, is_defining, target))
        t = start + duration
    return VideoSpec(label=int(label), n_frames=n_frames, initial=scene, events=tuple(events))


def video_frame_scene(spec: VideoSpec, t: int) -> Scene:
    """The scene shown at frame ``t`` of a video."""
    scene = spec.initial
    for event in spec.events:
        if t < event.start:
            break
        span = event.stop - event.start
        frac = min(1.0, (t - event.start + 1) / span)
        name, target = event.name, event.target
        if name in ("turns red", "turns blue", "changes colour"):
            scene = replace(scene, colour=str(target), rgb=PALETTE[str(target)])
        elif name in ("becomes striped", "changes pattern"):
            scene = replace(scene, pattern=str(target))
        elif name == "appears":
            scene = replace(scene, visible=True)
        elif name == "disappears":
            scene = replace(scene, visible=False)
        elif name in ("grows", "shrinks"):
            goal = _next_size(event_base_radius(spec, event), 1 if name == "grows" else -1)
            base = event_base_radius(spec, event)
            scene = replace(scene, radius=base + frac * (goal - base))
        elif name == "moves left":
            base = event_base(spec, event, "cx")
            scene = replace(scene, cx=base + frac * (float(target) - base))
        elif name in ("moves up", "moves down"):
            base = event_base(spec, event, "cy")
            scene = replace(scene, cy=base + frac * (float(target) - base))
    return scene


def event_base(spec: VideoSpec, event: Event, attribute: str) -> float:
    """Value of a scene attribute just before ``event`` starts."""
    return float(getattr(video_frame_scene(spec, event.start - 1) if event.start > 0 else spec.initial, attribute))


def event_base_radius(spec: VideoSpec, event: Event) -> float:
    return event_base(spec, event, "radius")


class ToyVideos(VideoWindowDataset):
    """Toy action videos cut into windows (``VideoWindowDataset``).

    Each video is one object over 12-48 frames; its class is the order of two events. Windows
    have ``window`` frames (the last may be shorter); ``load(i)`` renders ``frames_per_window``
    frames of window ``i``. Window concept labels: concepts present in at least half of the
    window's frames. Per-frame truth: ``frame_concepts(v)``; events: ``event_spans(v)``.
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 200,
        seed: int = 0,
        window: int = 4,
        frames_per_window: int = 1,
        image_size: int = 64,
    ) -> None:
        if window < 1 or frames_per_window < 1:
            raise ValueError("window and frames_per_window must be at least 1.")
        self.split, self.n, self.seed = split, int(n), int(seed)
        self.window, self.frames_per_window, self.image_size = int(window), int(frames_per_window), int(image_size)
        self._split_seed = _split_seed(split, VIDEO_SPLIT_SEEDS)
        self.class_names = list(VIDEO_CLASS_NAMES)
        self.concept_names = list(CONCEPTS)
        self.video_ids = [f"toyvideo/{split}/{v:06d}" for v in range(self.n)]
        specs = [self.video(v) for v in range(self.n)]
        self.video_labels = np.array([s.label for s in specs], dtype=np.int64)
        self.video_lengths = np.array([s.n_frames for s in specs], dtype=np.int64)
        ids, labels, owner, spans, concepts = [], [], [], [], []
        for v, spec in enumerate(specs):
            frame_truth = self._frame_concepts(spec)
            for w, (start, stop) in enumerate(window_spans(spec.n_frames, self.window)):
                ids.append(f"{self.video_ids[v]}/w{w:03d}")
                labels.append(spec.label)
                owner.append(v)
                spans.append((start, stop))
                concepts.append((frame_truth[start:stop].mean(axis=0) >= 0.5).astype(np.float32))
        self.ids = ids
        self.labels = np.array(labels, dtype=np.int64)
        self.window_video = np.array(owner, dtype=np.int64)
        self.window_spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
        self.concept_labels = np.stack(concepts) if concepts else np.zeros((0, NUM_CONCEPTS), np.float32)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - small, per-instance specs
    def video(self, v: int) -> VideoSpec:
        """The specification of video ``v`` (re-drawn from its own seed)."""
        if not 0 <= v < self.n:
            raise IndexError(f"video {v} out of range for {self.n} videos.")
        rng = _sample_rng("video", self._split_seed, self.seed, v)
        return sample_video(rng, int(rng.integers(len(VIDEO_CLASS_NAMES))))

    @staticmethod
    def _frame_concepts(spec: VideoSpec) -> np.ndarray:
        return np.stack([scene_concepts(video_frame_scene(spec, t)) for t in range(spec.n_frames)])

    def frame_concepts(self, v: int) -> np.ndarray:
        """Ground-truth concept vector of every frame of video ``v``: float32 [T, K]."""
        return self._frame_concepts(self.video(v))

    def event_spans(self, v: int, defining_only: bool = False) -> list[dict]:
        """Events of video ``v`` in time order: dicts with ``event``, ``start``, ``stop`` (frames
        [start, stop)) and ``defining`` (whether the event is one of the two that set the class)."""
        return [e.as_dict() for e in self.video(v).events if e.defining or not defining_only]

    def frame(self, v: int, t: int) -> Image.Image:
        """Frame ``t`` of video ``v``."""
        spec = self.video(v)
        if not 0 <= t < spec.n_frames:
            raise IndexError(f"frame {t} out of range for a video of {spec.n_frames} frames.")
        return render(video_frame_scene(spec, t), self.image_size)

    def frames(self, v: int) -> list[Image.Image]:
        """Every frame of video ``v``."""
        return [self.frame(v, t) for t in range(self.video(v).n_frames)]

    def load(self, index: int) -> list[Image.Image]:
        v = int(self.window_video[index])
        return [self.frame(v, t) for t in self.sampled_frames(index)]

    def fingerprint(self) -> str:
        return digest(
            "ToyVideos", WORLD_VERSION, self.split, self.n, self.seed, self.window, self.frames_per_window,
            self.image_size,
        )


__all__ = [
    "BACKGROUNDS", "CLASS_NAMES", "CLASS_PROFILES", "COLOURS", "CONCEPTS", "CONCEPT_GROUPS", "CONCEPT_INDEX",
    "DEPENDENT_PAIRS", "DISTRACTOR_EVENTS", "PATTERNS", "SHAPES", "SPURIOUS_BACKGROUND", "VIDEO_CLASSES",
    "VIDEO_CLASS_NAMES", "VIDEO_ORDER_PAIRS", "WORLD_VERSION", "Event", "Scene", "ToyImages", "ToyVideos",
    "VideoSpec", "caption", "class_concept_matrix", "class_prompts", "concept_prompts",
    "conditional_concept_matrix", "random_scene", "render", "render_array", "sample_scene", "sample_video",
    "scene_concepts", "twin_scene", "video_frame_scene",
]
