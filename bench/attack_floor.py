"""The prompt attack's floor on the clean model: how often the attack prompts draw the concept when its slot holds
random words of the search's vocabulary instead of searched ones (bench.evaluate's "prompt_attack_floor", the same
words and captions per concept, seed and prompt count). A prompt attack that recovers no more than this has found
nothing the world does not draw unasked.

    python -m bench.attack_floor --split test --seeds 0 1 --per-set 48
"""
from __future__ import annotations

import argparse
import json

from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline

from . import classifier as world_classifier
from . import evaluate
from .suite import SPLITS


def floor(pipe, backend, judge, concept: str, per_set: int, seed: int, sample_steps: int = 20) -> dict:
    words = evaluate.floor_phrases(pipe.tokenizer, concept, per_set, seed)
    entries = evaluate.attack_prompt_set(concept, per_set, words, seed)
    pictures = evaluate.generate(pipe, backend, [e["prompt"] for e in entries], seed, steps=sample_steps)
    return evaluate.measured(evaluate.hits(judge, pictures, entries), per_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="*", help="default: the split's")
    parser.add_argument("--split", choices=tuple(SPLITS), default="test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--per-set", type=int, default=48)
    args = parser.parse_args()
    pipe = load_pipeline(evaluate.MODEL)
    pipe.set_progress_bar_config(disable=True)
    backend, judge = DiffusersBackend(pipe), world_classifier.load(evaluate.CLASSIFIER)
    for concept in args.concepts or SPLITS[args.split]:
        counts = [floor(pipe, backend, judge, concept, args.per_set, seed) for seed in args.seeds]
        pooled = evaluate.measured(sum(c["k"] for c in counts), sum(c["n"] for c in counts))
        print(json.dumps({"concept": concept, "floor": pooled, "per_seed": [c["k"] for c in counts]}), flush=True)


if __name__ == "__main__":
    main()
