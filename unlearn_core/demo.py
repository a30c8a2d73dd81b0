"""End-to-end demo of the command line on a tiny SD2-architecture model with RANDOM weights.

It shows every step runs (learn a token, erase, inspect, generate with the adapter loaded by
diffusers' own loader); with random weights the pictures mean nothing. The benchmark world in
bench/ is where erasure is measured.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def example_images(folder: Path, count: int = 4, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (240, 240, 240))
        r = 4 + i % 2
        c = size // 2 + (i - 2)
        ImageDraw.Draw(image).ellipse((c - r, c - r, c + r, c + r), fill=(220, 30, 30))
        image.save(folder / f"red_circle_{i}.png")
    return folder


def run_demo(out: Path, force: bool = False) -> None:
    from .cli import main
    from .plots import grid
    from .tiny import save_pipeline

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-sd2"
    if not (model / "model_index.json").exists():
        save_pipeline(model)
    images = example_images(out / "images")
    flag = ["--force"] if force else []
    print("NOTE: this demo model has random weights; it shows the flow, not erasure quality.")
    steps = [
        ["learn-token", "--model", str(model), "--images", str(images), "--name", "<red-circle>",
         "--steps", "30", "--out", str(out / "red-circle.safetensors")],
        ["erase", "--model", str(model), "--concept", "a red circle", "--synonym", "a red disc",
         "--images", str(images), "--token-file", str(out / "red-circle.safetensors"), "--steps", "20",
         "--out", str(out / "erase-red-circle.safetensors")],
        ["inspect", str(out / "erase-red-circle.safetensors")],
        ["generate", "--model", str(model), "--prompt", "a red circle", "--sample-steps", "10",
         "--out", str(out / "before.png")],
        ["generate", "--model", str(model), "--prompt", "a red circle", "--sample-steps", "10",
         "--adapter", str(out / "erase-red-circle.safetensors"), "--out", str(out / "after.png")],
    ]
    for argv in steps:
        print("$ concept-unlearn " + " ".join(argv))
        if main(argv + (flag if argv[0] != "inspect" else [])) != 0:
            raise SystemExit(f"demo step failed: {argv[0]}")
    picture = grid([[Image.open(out / "before.png"), Image.open(out / "after.png")]],
                   ["a red circle"], ["before", "after"])
    picture.save(out / "grid.png")
    print(f"demo done: {out}/grid.png (random weights: the images are noise by design)")
