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


# Everyday words for the ``unrelated_words`` option: the concept's slot filled with something that is neither the
# concept nor a neighbour, so the rest of the vocabulary keeps what it draws. A fixed list, not the tokenizer's
# vocabulary, because the hosts' backends only tokenize.
ORDINARY_WORDS = (
    "table", "window", "river", "mountain", "city", "garden", "bottle", "chair", "cloud", "bridge", "forest",
    "street", "kitchen", "book", "letter", "engine", "island", "market", "ladder", "pillow", "basket", "candle",
    "mirror", "wheel", "rope", "stone", "feather", "glass", "paper", "metal", "wood", "sand", "snow", "rain",
    "wind", "light", "shadow", "music", "voice", "morning", "evening", "winter", "summer", "people", "child",
    "friend", "teacher", "doctor", "farmer", "sailor", "horse", "rabbit", "eagle", "whale", "apple", "bread",
    "cheese", "coffee", "soup", "honey", "small", "large", "old", "new", "quiet", "loud", "soft", "hard",
    "bright", "dark", "warm", "cold", "happy", "tired", "busy", "empty", "heavy", "simple", "strange", "famous",
    "running", "sleeping", "flying", "reading", "singing", "broken", "hidden", "folded", "open", "closed",
    "ancient", "modern", "distant", "wooden", "electric", "digital", "frozen", "silent", "wild", "several",
    "about", "between", "during", "without", "under", "through", "again", "today", "perhaps", "every",
)


def ordinary_words(seed: int) -> list[str]:
    """ORDINARY_WORDS in a seeded order."""
    order = torch.randperm(len(ORDINARY_WORDS), generator=torch.Generator().manual_seed(seed)).tolist()
    return [ORDINARY_WORDS[i] for i in order]
