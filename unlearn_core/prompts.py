"""Prompt templates for concept tokens and erase prompts (phrases, not single nouns)."""
from __future__ import annotations

import torch

OBJECT_TEMPLATES = (
    "{}",
    "a photo of {}",
    "an image of {}",
    "a picture showing {}",
    "a close-up of {}",
    "a rendering of {}",
    "{}, high quality",
    "a cropped photo of {}",
)
STYLE_TEMPLATES = (
    "{}",
    "an image in the style of {}",
    "a picture, {}",
    "art in the style of {}",
    "a rendering in the style of {}",
    "a painting in the style of {}",
)


def templates_for(kind: str) -> tuple[str, ...]:
    return STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES


def sample_prompts(subjects: list[str], kind: str, count: int, generator: torch.Generator) -> list[str]:
    """``count`` prompts, each a random template filled with a random subject (seeded)."""
    templates = templates_for(kind)
    picks = torch.randint(0, len(subjects) * len(templates), (count,), generator=generator).tolist()
    return [templates[i % len(templates)].format(subjects[i // len(templates)]) for i in picks]
