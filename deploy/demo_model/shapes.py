"""Synthetic shape pictures with questions and exact answers: the demo model's whole world.

A scene is one to three non-overlapping shapes (circle, square, triangle, star) in six clearly
distinct colours, of varied size, position and rotation, on a plain or lightly noisy background.
Every sample is a pure function of (split, index): a seeded numpy generator draws the scene and the
question, so the training stream and the held-out set are reproducible and never share a seed
(training seeds are ``index``, held-out seeds start at ``HELDOUT_SEED_BASE``).

Answers are canonical strings, which the model is trained to reproduce exactly:

    shape     "What shape is this?"          -> "A circle."          (one-shape pictures)
    colour    "What colour is the square?"   -> "Red."               (that shape occurs once)
    count     "How many shapes are there?"   -> "Two."
    describe  "Describe the image."          -> "A red circle and a blue square."  (left to right)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # == the vision tower's input: the CLIP processor's resize and crop are no-ops
HELDOUT_SEED_BASE = 1_000_000_000  # training indices must stay below this

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # far apart in RGB, so jitter and noise never make one look like another
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS = (  # light and dark neutrals, none close to a shape colour
    (255, 255, 255), (235, 235, 235), (245, 240, 225), (225, 235, 245), (40, 40, 40), (0, 0, 0),
)
CATEGORIES = ("shape", "colour", "count", "describe")
NUMBERS = ("One", "Two", "Three")

QUESTIONS = {
    "shape": ("What shape is this?", "What shape is in the image?", "What is the shape?",
              "Which shape is shown?", "What shape do you see?", "Name the shape."),
    "colour": ("What colour is the {shape}?", "What color is the {shape}?",
               "Which colour is the {shape}?", "What is the colour of the {shape}?",
               "What is the color of the {shape}?"),
    # Only for one-shape pictures, where "the shape" is unambiguous.
    "colour_single": ("What colour is the shape?", "What color is this shape?",
                      "What colour is it?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?",
              "How many shapes do you see?", "Count the shapes.", "How many objects are there?"),
    "describe": ("Describe the image.", "What is in the image?", "What do you see?",
                 "Describe this picture.", "What's in this image?"),
}

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, like a resized photo
_RADIUS = {1: (8, 22), 2: (7, 15), 3: (7, 12)}  # bounding-circle radius range by shape count
_MIN_DX = 5  # shapes' centres differ this much in x, so "left to right" is always well defined


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    r: float  # radius of the bounding circle, pixels
    angle: float  # rotation, radians
    rgb: tuple[int, int, int]  # the colour with a little jitter


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # sorted left to right
    background: tuple[int, int, int]
    noise: float  # std of the Gaussian pixel noise (0 = plain)
    noise_seed: int


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # IMAGE_SIZE x IMAGE_SIZE RGB
    question: str
    answer: str
    category: str
    scene: Scene


def random_scene(rng: np.random.Generator, num_shapes: int) -> Scene:
    while True:  # rejection sampling: a few tries at most for three shapes in 64 px
        lo, hi = _RADIUS[num_shapes]
        radii = rng.uniform(lo, hi, num_shapes)
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(50):
                cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1, 2)
                if all(math.hypot(cx - x, cy - y) >= r + r2 + 2 and abs(cx - x) >= _MIN_DX
                       for (x, y), r2 in zip(centres, radii)):
                    centres.append((float(cx), float(cy)))
                    break
            else:
                break
        if len(centres) == num_shapes:
            break
    shapes = []
    for (cx, cy), r in zip(centres, radii):
        kind = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        jitter = rng.integers(-15, 16, 3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        shapes.append(Shape(kind, colour, cx, cy, float(r), float(rng.uniform(0, 2 * math.pi)),
                            rgb))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    noise = float(rng.uniform(4, 14)) if rng.random() < 0.5 else 0.0
    return Scene(tuple(sorted(shapes, key=lambda s: s.cx)), background, noise,
                 int(rng.integers(2**31)))


def _outline(s: Shape) -> list[tuple[float, float]]:
    """Polygon vertices of a square, triangle or star, in supersampled pixels."""
    k = _SUPERSAMPLE
    if s.kind == "star":  # five points; inner radius 0.45 keeps the points clearly visible
        radii = [s.r if i % 2 == 0 else 0.45 * s.r for i in range(10)]
        angles = [s.angle + i * math.pi / 5 for i in range(10)]
    else:
        n = {"square": 4, "triangle": 3}[s.kind]
        radii = [s.r] * n
        angles = [s.angle + i * 2 * math.pi / n for i in range(n)]
    return [(k * (s.cx + r * math.cos(a)), k * (s.cy + r * math.sin(a)))
            for r, a in zip(radii, angles)]


def render(scene: Scene) -> Image.Image:
    side = IMAGE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        if s.kind == "circle":  # a bit smaller than its bounding circle: similar area to the rest
            k, r = _SUPERSAMPLE, 0.85 * s.r
            draw.ellipse((k * (s.cx - r), k * (s.cy - r), k * (s.cx + r), k * (s.cy + r)),
                         fill=s.rgb)
        else:
            draw.polygon(_outline(s), fill=s.rgb)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if scene.noise > 0:
        pixels = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise, pixels.shape)
        img = Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
    return img


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(scene: Scene) -> str:
    parts = [_with_article(f"{s.colour} {s.kind}") for s in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _vary(question: str, rng: np.random.Generator) -> str:
    """Small surface variations users make: a lower-case start, no final punctuation."""
    if rng.random() < 0.15:
        question = question[0].lower() + question[1:]
    if rng.random() < 0.15:
        question = question.rstrip("?.")
    return question


def make_sample(seed: int, category: str | None = None) -> Sample:
    """The sample of one seed; ``category`` None draws it (shape 25%, colour 30%, count 20%,
    describe 25%)."""
    rng = np.random.default_rng(seed)
    if category is None:
        category = CATEGORIES[rng.choice(4, p=[0.25, 0.30, 0.20, 0.25])]
    while True:
        num = 1 if category == "shape" else int(rng.integers(1, 4))
        scene = random_scene(rng, num)
        kinds = [s.kind for s in scene.shapes]
        unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
        if category != "colour" or unique:
            break  # a colour question needs a shape that occurs exactly once
    if category == "shape":
        question, answer = rng.choice(QUESTIONS["shape"]), f"A {kinds[0]}."
    elif category == "colour":
        target = unique[rng.integers(len(unique))]
        if num == 1 and rng.random() < 0.3:
            question = str(rng.choice(QUESTIONS["colour_single"]))
        else:
            question = str(rng.choice(QUESTIONS["colour"])).format(shape=target.kind)
        answer = target.colour.capitalize() + "."
    elif category == "count":
        question, answer = rng.choice(QUESTIONS["count"]), NUMBERS[num - 1] + "."
    else:
        question, answer = rng.choice(QUESTIONS["describe"]), describe(scene)
    return Sample(render(scene), _vary(str(question), rng), answer, category, scene)


def training_sample(index: int) -> Sample:
    if not 0 <= index < HELDOUT_SEED_BASE:
        raise ValueError(f"training index {index} is outside [0, {HELDOUT_SEED_BASE})")
    return make_sample(index)


def heldout_seed(category: str, i: int) -> int:
    """The seed of held-out sample ``i`` of a category: never a training seed."""
    return HELDOUT_SEED_BASE + CATEGORIES.index(category) * 10_000_000 + i


def heldout_samples(category: str, n: int, start: int = 0) -> Iterator[Sample]:
    """``n`` held-out samples of one category (``start`` skips that many)."""
    for i in range(start, start + n):
        yield make_sample(heldout_seed(category, i), category)


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("color", "colour").strip().rstrip(".!").split())


def is_correct(prediction: str, sample: Sample) -> bool:
    """Lenient grading (case, final full stop, a digit for a count word); the model is trained
    to give the canonical answer exactly, which evaluate.py also reports."""
    got, want = normalize(prediction), normalize(sample.answer)
    if sample.category == "count":
        digit = str([n.lower() for n in NUMBERS].index(want) + 1)
        return got in (want, digit)
    return got == want
