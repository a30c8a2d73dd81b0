"""Where a concept goes in its contexts when no anchor is named: its neighbours' average, or its most typical
neighbour.

The average of the neighbours' conditionings is what the concept shares with its kind. But a concept near the
middle of its kind (a colour between the others, a model's default shape or style) lies nearer that average than
the neighbours do, and the average renders as the concept: erasing towards it changes little. The most typical
neighbour (the one nearest the average) is a point the model renders as something else, and as close to the
kind's middle as any neighbour. Distances are mean Euclidean distances per position of the frozen conditioning,
averaged over the contexts.
"""
from __future__ import annotations

import torch

TARGETS = ("typical", "mean")


class Spread:
    """Running distances of the neighbours to their average, one context at a time (no per-context tensors kept)."""

    def __init__(self, neighbours: int):
        self.distances = torch.zeros(neighbours, dtype=torch.float64)
        self.contexts = 0

    def add(self, neighbours: torch.Tensor) -> torch.Tensor:
        """``neighbours`` [k, L, d] in one context; returns their average [L, d] there."""
        mean = neighbours.float().mean(0)
        self.distances += (neighbours.float() - mean).norm(dim=-1).mean(-1).double().cpu()
        self.contexts += 1
        return mean

    def choice(self, target: str) -> int | None:
        """The index of the neighbour to map onto ("typical": the one nearest the average), or None for the
        average itself ("mean")."""
        if target not in TARGETS:
            raise ValueError(f"neighbour_target: must be one of {', '.join(TARGETS)}, got {target!r}")
        if target == "mean" or self.contexts == 0:
            return None
        return int(self.distances.argmin())
