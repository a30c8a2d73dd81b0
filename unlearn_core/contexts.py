"""Prompts that carry a concept in context, for erasing it where it is used and keeping its neighbours.

A context is a prompt with one ``{}`` slot: "a {} on a sofa". The concept, its synonyms and its token fill
the slot for the erase prompts; the anchor fills it for their targets; each neighbour ("keep" word) fills it
for the prompts that must not change.
"""
from __future__ import annotations

import random

from .prompts import templates_for

SLOT = "{}"


def tidy(prompt: str) -> str:
    """Collapse the spaces an empty filling leaves ("a  on a sofa" -> "a on a sofa")."""
    return " ".join(prompt.split())


def fill(context: str, phrase: str) -> str:
    return tidy(context.replace(SLOT, phrase))


def crossovers(contexts: list[str]) -> list[str]:
    """New contexts from the text before the slot of one context and after the slot of another.

    "a golden {} on dots" x "a navy {} as a sketch" -> "a golden {} as a sketch": the concept is met with
    combinations of words the user's captions hold, not only the combinations they happen to write."""
    parts = [c.split(SLOT, 1) for c in contexts if c.count(SLOT) == 1]
    return [f"{before}{SLOT}{after}" for before, _ in parts for _, after in parts]


def build_contexts(captions: tuple[str, ...], kind: str, limit: int, seed: int) -> list[str]:
    """Up to ``limit`` distinct contexts: the captions, their cross-overs and the kind's templates (seeded)."""
    captions = [c for c in dict.fromkeys(captions) if c.count(SLOT) == 1]
    extra = [c for c in dict.fromkeys(crossovers(captions) + list(templates_for(kind))) if c not in captions]
    random.Random(seed).shuffle(extra)
    return (captions + extra)[:limit]


def erase_pairs(contexts: list[str], subjects: list[str], anchor: str) -> list[tuple[str, str]]:
    """(prompt with a subject, the same prompt with the anchor) for every context and subject."""
    return [(fill(c, s), fill(c, anchor)) for c in contexts for s in subjects]


def keep_prompts(contexts: list[str], keep: tuple[str, ...], preserve: tuple[str, ...]) -> list[str]:
    """The contexts with each neighbour in the slot, then the plain preserve prompts (deduplicated)."""
    return list(dict.fromkeys([fill(c, k) for c in contexts for k in keep] + [p for p in preserve if p]))
