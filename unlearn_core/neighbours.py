"""Where a concept goes in its contexts when no anchor is named: its neighbours' average, its most typical
neighbour, or its nearest neighbour.

The average of the neighbours' conditionings is what the concept shares with its kind. But a concept near the
middle of its kind (a colour between the others, a model's default shape or style) lies nearer that average than
the neighbours do, and the average renders as the concept: erasing towards it changes little. The most typical
neighbour (the one nearest the average) is a point the model renders as something else, and as close to the
kind's middle as any neighbour. The nearest neighbour (the one nearest the concept itself) is the smallest move
to something else: the less the concept's conditioning travels, the less the words near it (which share what the
edit changes) are dragged along. Where the model draws that neighbour much like the concept, the move is too
short; negative guidance (``negative_target``) puts the target past it, away from the concept. Distances are mean
Euclidean distances per position of the frozen conditioning, averaged over the contexts.
"""
from __future__ import annotations

from typing import Callable

import torch

from .contexts import fill

TARGETS = ("typical", "mean", "nearest")
# A neighbour an earlier erasure moved to under this share of its clean distance from the concept now renders
# much as the concept does (an earlier concept sent onto this one, or a phrasing of it the earlier erasure
# carried along): never a target, and it goes where the concept goes.
PULLED = 0.5
# A neighbour this much nearer a concept erased earlier than any other word (the concept included) is taken for a
# phrasing of it that the earlier file does not name ("scarlet" at 0.08 from red, 0.49 from orange): not a target.
PHRASING_OF = 0.75


class Spread:
    """Running distances of the neighbours to their average, one context at a time (no per-context tensors kept)."""

    def __init__(self, neighbours: int):
        self.distances = torch.zeros(neighbours, dtype=torch.float64)
        self.to_concept = torch.zeros(neighbours, dtype=torch.float64)
        self.contexts = self.concepts = 0

    def add(self, neighbours: torch.Tensor, concept: torch.Tensor | None = None) -> torch.Tensor:
        """``neighbours`` [k, L, d] in one context (and the concept [L, d] there); returns their average [L, d]."""
        mean = neighbours.float().mean(0)
        self.distances += _distance(neighbours, mean)
        if concept is not None:
            self.to_concept += _distance(neighbours, concept.float())
            self.concepts += 1
        self.contexts += 1
        return mean

    def choice(self, target: str) -> int | None:
        """The index of the neighbour to map onto ("typical": the one nearest the average; "nearest": the one
        nearest the concept), or None for the average itself ("mean")."""
        if target not in TARGETS:
            raise ValueError(f"neighbour_target: must be one of {', '.join(TARGETS)}, got {target!r}")
        if target == "mean" or self.contexts == 0:
            return None
        if target == "nearest" and self.concepts < self.contexts:
            raise ValueError("neighbour_target 'nearest' needs the concept's conditioning in every context")
        return int((self.to_concept if target == "nearest" else self.distances).argmin())


def _distance(points: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    return (points.float() - to).norm(dim=-1).mean(-1).double().cpu()


def distances_to_concept(encode: Callable[[list[str]], torch.Tensor], contexts: list[str], words: tuple[str, ...],
                         concept: str) -> torch.Tensor:
    """Each word's mean distance to ``concept`` over ``contexts`` (both in the slot; ``encode``: frozen prompts to
    conditioning), as ``Spread`` measures it."""
    spread = Spread(len(words))
    for context in contexts if words else ():
        spread.add(*encode([fill(context, w) for w in (*words, concept)]).split([len(words), 1]))
    return spread.to_concept / max(spread.contexts, 1)


def pulled_onto_concept(clean: torch.Tensor, now: torch.Tensor) -> list[bool]:
    """Which neighbours lie nearer the concept ``now`` (earlier erasures applied) than ``PULLED`` of ``clean``."""
    return (now < PULLED * clean).tolist()


def pairwise_distances(encode: Callable[[list[str]], torch.Tensor], contexts: list[str],
                       words: tuple[str, ...]) -> torch.Tensor:
    """[n, n] mean distances between the words over ``contexts`` (all in the slot), as ``Spread`` measures them
    (one row at a time: no [n, n, positions, width] tensor)."""
    total = torch.zeros(len(words), len(words), dtype=torch.float64)
    for context in contexts if len(words) > 1 else ():
        points = encode([fill(context, w) for w in words]).float()
        total += torch.stack([_distance(points, point) for point in points])
    return total / max(len(contexts), 1)


def phrasings_of(distances: torch.Tensor, erased: list[bool]) -> list[bool]:
    """Which words (rows of ``distances``; the last word is the concept) lie ``PHRASING_OF`` nearer an ``erased``
    word than any word not erased."""
    marks = []
    for i, row in enumerate(distances):
        near_erased = [float(row[j]) for j in range(len(row)) if j != i and erased[j]]
        near_kept = [float(row[j]) for j in range(len(row)) if j != i and not erased[j]]
        marks.append(not erased[i] and bool(near_erased) and bool(near_kept)
                     and min(near_erased) < PHRASING_OF * min(near_kept))
    return marks
