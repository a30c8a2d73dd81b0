"""Writes the example images in examples/images/ with the benchmark world's own drawing code (bench/world.py).

    python -m examples.make_images          # from the repository root; same seed, same pixels

Each folder holds one concept of the bundled world model (bench/world_model): 32x32 PNGs like the ones it was
trained on, for the README's command-line example (stripes) and the ComfyUI example workflows (a red star; copy
those into ComfyUI/input/ to use them with Load Image).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from bench.world import Label, caption, render

FOLDER = Path(__file__).resolve().parent / "images"
# concept folder -> the labels drawn (shape, colour, style); other attributes vary so only the concept is shared
CONCEPTS = {
    "stripes": [Label("circle", "red", "stripes"), Label("square", "blue", "stripes"),
                Label("triangle", "green", "stripes"), Label("hexagon", "yellow", "stripes"),
                Label("diamond", "purple", "stripes")],
    "red-star": [Label("star", "red", "plain"), Label("star", "red", "dots"), Label("star", "red", "sketch"),
                 Label("star", "red", "plain")],
}
SEED = 15


def make(folder: Path = FOLDER) -> list[Path]:
    written = []
    for concept, labels in CONCEPTS.items():
        rng = random.Random(f"{SEED}-{concept}")
        (folder / concept).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, label in enumerate(labels, 1):
            path = folder / concept / f"{concept}-{i}.png"
            render(label, rng).save(path, optimize=True)
            lines.append(f"{path.name}\t{caption(label, rng)}")
            written.append(path)
        (folder / concept / "captions.txt").write_text("\n".join(lines) + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FOLDER, help="folder to write into (default examples/images)")
    for path in make(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
