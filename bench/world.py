"""A procedural image world with exactly known labels: shapes x colours x styles, drawn at 32 px.

Every concept (shape, colour, style) has several phrasings; captions are built from templates.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SCALE = 4  # drawn at 4x and downsampled, for clean edges

SHAPES = {
    "circle": ("a circle", "a round disc", "a circle shape"),
    "square": ("a square", "a square block", "a square shape"),
    "triangle": ("a triangle", "a three-sided triangle", "a triangle shape"),
    "star": ("a star", "a five-pointed star", "a star shape"),
    "cross": ("a cross", "a plus sign", "a cross shape"),
    "diamond": ("a diamond", "a rhombus", "a diamond shape"),
    "ring": ("a ring", "a hollow circle", "a ring shape"),
    "hexagon": ("a hexagon", "a six-sided polygon", "a hexagon shape"),
}
COLOURS = {
    "red": ((220, 30, 30), ("red", "crimson", "scarlet")),
    "green": ((30, 170, 50), ("green", "emerald", "grass-green")),
    "blue": ((30, 60, 220), ("blue", "navy", "cobalt")),
    "yellow": ((240, 210, 20), ("yellow", "golden", "lemon")),
    "purple": ((140, 40, 180), ("purple", "violet", "lilac")),
    "orange": ((245, 130, 20), ("orange", "tangerine", "amber")),
}
STYLES = {
    "plain": ("on a plain background", "on a blank background", "plain style"),
    "stripes": ("on stripes", "on a striped background", "with stripes behind it"),
    "dots": ("on dots", "on a dotted background", "with polka dots behind it"),
    "sketch": ("as a sketch", "as an outline drawing", "drawn as a line sketch"),
}
CONCEPT_KINDS = {**{s: "shape" for s in SHAPES}, **{c: "colour" for c in COLOURS}, **{s: "style" for s in STYLES}}


@dataclass(frozen=True)
class Label:
    shape: str
    colour: str
    style: str

    def value(self, kind: str) -> str:
        return {"shape": self.shape, "colour": self.colour, "style": self.style}[kind]


def _polygon(cx, cy, radius, sides, rotation, inner=None):
    points = []
    count = sides * (2 if inner else 1)
    for i in range(count):
        r = radius if not inner or i % 2 == 0 else radius * inner
        angle = rotation + 2 * math.pi * i / count - math.pi / 2
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(draw, shape, cx, cy, radius, rotation, fill, outline_only, width):
    kwargs = {"outline": fill, "width": width} if outline_only else {"fill": fill}
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), **kwargs)
    elif shape == "ring":
        if outline_only:
            inner = radius * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=fill, width=width)
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=width)
        else:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=int(radius * 0.4))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.25, 4, rotation + math.pi / 4), **kwargs)
    elif shape == "diamond":
        points = [(cx, cy - radius * 1.2), (cx + radius * 0.75, cy), (cx, cy + radius * 1.2), (cx - radius * 0.75, cy)]
        draw.polygon(points, **kwargs)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 3, rotation), **kwargs)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 6, rotation), **kwargs)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.3, 5, rotation, inner=0.45), **kwargs)
    elif shape == "cross":
        arm = radius * 0.38
        bars = [(cx - radius, cy - arm, cx + radius, cy + arm), (cx - arm, cy - radius, cx + arm, cy + radius)]
        if outline_only:
            outline = [(cx - arm, cy - radius), (cx + arm, cy - radius), (cx + arm, cy - arm), (cx + radius, cy - arm),
                       (cx + radius, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + radius), (cx - arm, cy + radius),
                       (cx - arm, cy + arm), (cx - radius, cy + arm), (cx - radius, cy - arm), (cx - arm, cy - arm)]
            draw.polygon(outline, outline=fill, width=width)
        else:
            for bar in bars:
                draw.rectangle(bar, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(style: str, rng: random.Random) -> Image.Image:
    big = SIZE * SCALE
    image = Image.new("RGB", (big, big), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    if style == "stripes":
        step = rng.randint(14, 20)
        offset = rng.randint(0, step)
        for x in range(-big, 2 * big, step):
            draw.line([(x + offset, 0), (x + offset + big, big)], fill=(120, 120, 120), width=step // 2)
    elif style == "dots":
        step = rng.randint(16, 22)
        ox, oy = rng.randint(0, step), rng.randint(0, step)
        for x in range(ox - step, big, step):
            for y in range(oy - step, big, step):
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(110, 110, 110))
    elif style == "sketch":
        image.paste((245, 235, 200), (0, 0, big, big))  # paper
    return image


def render(label: Label, rng: random.Random) -> Image.Image:
    """One 32x32 RGB image of the label, with random position, size, rotation and colour jitter."""
    image = _background(label.style, rng)
    draw = ImageDraw.Draw(image)
    big = SIZE * SCALE
    radius = rng.uniform(0.24, 0.32) * big
    cx = rng.uniform(radius * 1.1, big - radius * 1.1)
    cy = rng.uniform(radius * 1.1, big - radius * 1.1)
    base = COLOURS[label.colour][0]
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in base)
    outline_only = label.style == "sketch"
    _draw_shape(draw, label.shape, cx, cy, radius, rng.uniform(0, 2 * math.pi / 5), fill, outline_only, 6)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def caption(label: Label, rng: random.Random) -> str:
    """A caption naming all three attributes with random phrasings."""
    shape = rng.choice(SHAPES[label.shape])
    colour = rng.choice(COLOURS[label.colour][1])
    style = rng.choice(STYLES[label.style])
    article, noun = shape.split(" ", 1)
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {noun} {style}"


def all_labels() -> list[Label]:
    return [Label(s, c, st) for s in SHAPES for c in COLOURS for st in STYLES]


def sample(count: int, seed: int, labels: list[Label] | None = None) -> tuple[np.ndarray, list[Label], list[str]]:
    """``count`` images [N, 32, 32, 3] uint8 with their labels and captions (seeded)."""
    rng = random.Random(seed)
    labels = labels or all_labels()
    chosen = [rng.choice(labels) for _ in range(count)]
    images = np.stack([np.asarray(render(label, rng)) for label in chosen])
    return images, chosen, [caption(label, rng) for label in chosen]


def phrasings(concept: str) -> tuple[str, ...]:
    """All phrasings of a concept (a shape, a colour or a style name)."""
    if concept in SHAPES:
        return SHAPES[concept]
    if concept in COLOURS:
        return COLOURS[concept][1]
    if concept in STYLES:
        return STYLES[concept]
    raise ValueError(f"unknown concept {concept!r}; known: {', '.join(CONCEPT_KINDS)}")
