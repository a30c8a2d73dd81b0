"""Where a concept goes in its contexts when no anchor is named: its neighbours' average, or one neighbour.

The average of the neighbours' conditionings is what the concept shares with its kind. But a concept that sits
near the middle of its kind (a colour between the others, a model's default shape) is itself the neighbour
nearest that average, and the average renders as the concept: erasing towards it changes little. Then the
concept goes to its kind's most typical neighbour instead (the one nearest the average), a point the model
renders as something else.

Distances are mean Euclidean distances per position of the frozen conditioning, averaged over the contexts.
"""
from __future__ import annotations

import torch

TARGETS = ("auto", "mean", "typical")
CENTRAL = 0.9  # "auto": the concept is central when nearer the average than 0.9 x the neighbours' mean distance


class Spread:
    """Running distances to the neighbours' average, one context at a time (keeps no per-context tensors)."""

    def __init__(self, neighbours: int):
        self.concept = 0.0
        self.neighbours = torch.zeros(neighbours, dtype=torch.float64)
        self.contexts = 0

    def add(self, concept: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """``concept`` [L, d] (the concept's phrases averaged), ``neighbours`` [k, L, d] in one context; returns
        their average [L, d] there."""
        mean = neighbours.float().mean(0)
        self.concept += float((concept.float() - mean).norm(dim=-1).mean())
        self.neighbours += (neighbours.float() - mean).norm(dim=-1).mean(-1).double().cpu()
        self.contexts += 1
        return mean

    def choice(self, target: str) -> int | None:
        """The index of the neighbour to map onto, or None for the average. ``target`` (``neighbour_target``): "mean" (always the
        average), "typical" (always the neighbour nearest the average), "auto" (the typical neighbour only when
        the concept is central: nearer the average than ``CENTRAL`` x the neighbours' mean distance to it)."""
        if target not in TARGETS:
            raise ValueError(f"neighbour_target: must be one of {', '.join(TARGETS)}, got {target!r}")
        if target == "mean" or self.contexts == 0:
            return None
        typical = int(self.neighbours.argmin())
        if target == "typical":
            return typical
        return typical if self.concept < float(self.neighbours.mean()) * CENTRAL else None

