"""Pictures people would rather look at than read: loss curves and image grids (PIL only)."""
from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189))


def _frame(size, title: str):
    """A white picture with the plot's box and title: (image, its drawing, the box (left, top, right, bottom))."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (50, 30, width - 10, height - 30)
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((box[0], 8), title, fill="black")
    return image, draw, box


def loss_curve(history: list[dict[str, float]], title: str = "loss", size=(640, 360)) -> Image.Image:
    """One line per loss term over the steps, each term scaled to its own range (legend gives the range)."""
    image, draw, (left, top, right, bottom) = _frame(size, f"{title} ({len(history)} steps)")
    draw.text((left, bottom + 8), "step 1", fill="black")
    draw.text((right - 60, bottom + 8), f"step {len(history)}", fill="black")
    names = [n for n in (history[0] if history else {})]
    for index, name in enumerate(names):
        values = [h[name] for h in history]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        colour = _COLOURS[index % len(_COLOURS)]
        points = [(left + (right - left) * i / max(1, len(values) - 1), bottom - (bottom - top) * (v - low) / span)
                  for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        draw.text((right - 230, top + 6 + 14 * index), f"{name}: {values[0]:.4g} -> {values[-1]:.4g}", fill=colour)
    return image


def line_chart(xs: list[float], lines: dict[str, list[float]], title: str, x_label: str = "x",
               size=(640, 360)) -> Image.Image:
    """Lines (label -> one value per x, in [0, 1], e.g. accuracies) over shared x values, a dot at each point."""
    image, draw, (left, top, right, bottom) = _frame(size, title)
    low, span = min(xs), (max(xs) - min(xs)) or 1.0
    at = lambda x, y: (left + (right - left) * (x - low) / span, bottom - (bottom - top) * y)  # noqa: E731
    for y in (0.0, 0.5, 1.0):
        draw.text((8, at(low, y)[1] - 6), f"{y:g}", fill="black")
    for x in xs:
        draw.text((at(x, 0)[0] - 8, bottom + 8), f"{x:g}", fill="black")
    draw.text((right - 60, bottom + 8 + 10), x_label, fill="black")
    for index, (label, values) in enumerate(lines.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        points = [at(x, y) for x, y in zip(xs, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((right - 150, top + 6 + 14 * index), label, fill=colour)
    return image


def grid(rows: list[list[Image.Image]], row_labels: list[str] = (), column_labels: list[str] = (),
         cell: int = 128) -> Image.Image:
    """Images in rows and columns with text labels (e.g. rows = prompts, columns = before / after)."""
    label_width = 220 if row_labels else 0
    label_height = 20 if column_labels else 0
    columns = max(len(r) for r in rows)
    image = Image.new("RGB", (label_width + columns * cell, label_height + len(rows) * cell), "white")
    draw = ImageDraw.Draw(image)
    for c, label in enumerate(column_labels):
        draw.text((label_width + c * cell + 4, 4), label, fill="black")
    for r, row in enumerate(rows):
        if r < len(row_labels):
            lines = textwrap.wrap(row_labels[r], 34)[: max(1, cell // 14)]
            top = label_height + r * cell + cell // 2 - 7 * len(lines)
            for i, line in enumerate(lines):
                draw.text((4, top + 14 * i), line, fill="black")
        for c, picture in enumerate(row):
            image.paste(picture.convert("RGB").resize((cell, cell), Image.NEAREST),
                        (label_width + c * cell, label_height + r * cell))
    return image
