"""A small CNN that reads shape, colour and style off 32x32 world images (three heads).

    python -m bench.classifier --out bench/classifier.safetensors    # train (seeded), report held-out accuracy
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import world

HEADS = {"shape": list(world.SHAPES), "colour": list(world.COLOURS), "style": list(world.STYLES)}


class WorldClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({kind: nn.Linear(96 * 4, len(names)) for kind, names in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [N, 3, 32, 32] in [0, 1] -> logits per head."""
        features = self.features(images * 2 - 1)
        return {kind: head(features) for kind, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[world.Label]:
        self.eval()
        logits = self(images)
        picks = {kind: logits[kind].argmax(1).tolist() for kind in HEADS}
        return [world.Label(HEADS["shape"][s], HEADS["colour"][c], HEADS["style"][st])
                for s, c, st in zip(picks["shape"], picks["colour"], picks["style"])]


def load(path="bench/classifier.safetensors") -> WorldClassifier:
    model = WorldClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def targets(labels: list[world.Label]) -> dict[str, torch.Tensor]:
    return {kind: torch.tensor([names.index(label.value(kind)) for label in labels]) for kind, names in HEADS.items()}


def accuracy(model: WorldClassifier, images: torch.Tensor, labels: list[world.Label]) -> dict[str, float]:
    predicted = model.predict(images)
    return {kind: float(np.mean([p.value(kind) == t.value(kind) for p, t in zip(predicted, labels)])) for kind in HEADS}


def train(count: int, steps: int, seed: int) -> WorldClassifier:
    torch.manual_seed(seed)
    pixels, labels, _ = world.sample(count, seed=seed + 1000)
    images, truth = to_tensor(pixels), targets(labels)
    model = WorldClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        index = torch.randint(0, count, (128,), generator=generator)
        logits = model(images[index])
        loss = sum(F.cross_entropy(logits[kind], truth[kind][index]) for kind in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/classifier.safetensors",
                        help="where to write (default out/classifier.safetensors; copy it over the committed one when it is better)")
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    model = train(args.images, args.steps, args.seed)
    pixels, labels, _ = world.sample(2000, seed=args.seed + 5000)
    print("held-out accuracy", accuracy(model, to_tensor(pixels), labels), f"{time.time() - start:.0f} s")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
