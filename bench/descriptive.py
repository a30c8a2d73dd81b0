"""Descriptive prompts: the concept described, never named (issue 11, item 6c).

DESCRIPTIONS maps a concept to phrases that describe it without any content word of the concept's own phrasings
(bench.evaluate.content_words): dots are "with disc behind it". The world's text encoder learned only the words of
the world's captions, so a description recombines those words (another concept's words among them, never a colour
word); it is written like the concept's phrasings (a shape with its article), so that it takes the concept's slot in
a caption. bench.evaluate --descriptive measures an erasure on them (the report's "descriptive").

    python -m bench.descriptive --check   # the clean model on each description -> results/descriptive_check.json

The check generates 8 images per description (seed 0) on the clean world model and prints the share the classifier
reads as the concept, beside the share for the concept's own phrasings on the same captions. The table keeps only
descriptions the clean model renders as the concept in at least 75 % (KEEP) of them: pruned by hand after
``python -m bench.descriptive --check`` on 2026-12-07 (every candidate's share is in results/descriptive_check.json
of that run; a later --check covers the kept ones only). Tried and pruned (share): triangle "a pointed polygon" 0,
"a pointed block" 0; diamond "a pointed square" 0, "a pointed block" 0, "a pointed square block" 0; ring "a round
outline" 0, "a round line" 0, "a round disc outline" 0, "a disc outline" 0 (all read as circle or hexagon); stripes
"with line behind it" 0, "on line" 0, "on a line" 0; dots "with round disc behind it" 38, "on round disc" 38,
"on circle" 62, "with circle behind it" 62, "with ring behind it" 12; sketch "drawn hollow" 12.

So only two concepts have descriptions; the others are absent. The colours have none (every colour word the captions
have is a colour's phrasing), nor circle, square, star, cross, hexagon (the words that describe them are their own:
round, disc, block, five-pointed, plus sign, six-sided polygon, shape) and plain (blank, background, style); the
candidates for triangle, diamond, ring and stripes were all pruned. The sketch descriptions work through "as" (a stop
word of content_words that only sketch's phrasings use: "as a shape" renders a sketch in 16 of 16 images, "a hollow
shape" without it in 0 of 16), so they measure whether an erasure reaches that word more than a description; the
dots ones are near the threshold (--per-description 16 on --seed 0 and 1: "with disc behind it" 62 and 69 %,
"on disc" 62 and 56 %).
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline

from . import classifier as world_classifier
from . import evaluate, world

DESCRIPTIONS = {
    "dots": ("with disc behind it", "on disc"),
    "sketch": ("as a hollow shape", "as a hollow", "drawn as a hollow shape"),
}
KEEP = 0.75  # a description stays in the table when the clean model renders the concept in this share of images


def descriptive_prompts(concept: str, count: int, seed: int) -> list[dict]:
    """``count`` entries in the harness's format writing the concept as its descriptions in turn, in captions with
    random other attributes (composed as the erase set's); [] for a concept with no description."""
    phrases = DESCRIPTIONS.get(concept, ())
    rng = random.Random(seed)
    return [evaluate.concept_entry(concept, phrases[i % len(phrases)], rng) for i in range(count)] if phrases else []


def own_words(concept: str, phrase: str) -> set[str]:
    """The content words of ``phrase`` that one of the concept's own phrasings has (a description has none)."""
    named = set().union(*(evaluate.content_words(p) for p in world.phrasings(concept)))
    return evaluate.content_words(phrase) & named


def check(model=evaluate.MODEL, per_description: int = 8, seed: int = 0, steps: int = 20) -> dict:
    """Per concept with descriptions: the share of ``per_description`` clean images read as the concept for each
    description (and what the classifier read), and for the concept's own phrasings on the same captions."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe)
    judge = world_classifier.load(evaluate.CLASSIFIER)

    def measure(concept: str, phrases) -> dict:
        rng = random.Random(seed)  # the same random attributes for every phrase of a concept
        entries = [evaluate.concept_entry(concept, phrases[i % len(phrases)], rng) for i in range(per_description)]
        images = evaluate.generate(pipe, backend, [e["prompt"] for e in entries], seed, steps=steps)
        read = Counter(p.value(world.CONCEPT_KINDS[concept]) for p in judge.predict(images))
        return {"share": read[concept] / per_description, "read": dict(read.most_common()),
                "example": entries[0]["prompt"]}

    return {concept: {"named": measure(concept, world.phrasings(concept)),
                      "descriptions": {phrase: measure(concept, [phrase]) for phrase in descriptions}}
            for concept, descriptions in DESCRIPTIONS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="generate every description on the clean model")
    parser.add_argument("--per-description", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(evaluate.MODEL))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "descriptive_check.json"))
    args = parser.parse_args()
    if not args.check:
        for concept, descriptions in DESCRIPTIONS.items():
            print(f"{concept:<10} {' | '.join(descriptions)}")
        return
    torch.set_num_threads(1)
    results = check(args.model, args.per_description, args.seed)
    for concept, result in results.items():
        print(f"{concept:<10} {'(its own phrasings)':<28} {100 * result['named']['share']:4.0f} %")
        for phrase, measured in result["descriptions"].items():
            verdict = "keep" if measured["share"] >= KEEP else f"prune (read {measured['read']})"
            print(f"{'':<10} {phrase:<28} {100 * measured['share']:4.0f} %  {verdict}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"per_description": args.per_description, "seed": args.seed,
                                          "keep": KEEP, "concepts": results}, indent=2))


if __name__ == "__main__":
    main()
