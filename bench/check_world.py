"""Is the world model good enough to measure on? Per-concept accuracy of the clean model's generations.

    python -m bench.check_world --per-concept 64 --out bench/results/world_check.json

For each concept, --per-concept random world captions naming it are sampled on the clean model (20 DDIM steps,
guidance 4, as the harness) and read by the classifier: the share drawn as prompted, its 95 % Wilson interval,
and what the other images were read as (the confusions, which say which concepts the model mixes up).
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


def check(model=evaluate.MODEL, per_concept: int = 64, seed: int = 0, steps: int = 20,
          guidance: float = 4.0) -> dict[str, dict]:
    """Per concept: ``evaluate.measured`` (k, n, value, ci95) plus ``read_as``, the counts of the value of the
    concept's kind the classifier read on the images that missed it."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe)
    judge = world_classifier.load(evaluate.CLASSIFIER)
    rng = random.Random(seed)
    scores = {}
    for concept, kind in world.CONCEPT_KINDS.items():
        labels = [label for label in world.all_labels() if label.value(kind) == concept]
        entries = [{"prompt": world.caption(label, rng), "expect": {kind: concept}}
                   for label in (rng.choice(labels) for _ in range(per_concept))]
        images = evaluate.generate(pipe, backend, [e["prompt"] for e in entries], seed, steps=steps, guidance=guidance)
        read = [label.value(kind) for label in judge.predict(images)]
        missed = Counter(value for value in read if value != concept)
        scores[concept] = {**evaluate.measured(len(read) - sum(missed.values()), len(read)),
                           "read_as": dict(missed.most_common())}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-concept", type=int, default=64)
    parser.add_argument("--model", default=str(evaluate.MODEL))
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, as the harness)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default 4, as the harness)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest beside other jobs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scores = check(args.model, args.per_concept, steps=args.steps, guidance=args.guidance)
    for concept, score in scores.items():
        low, high = score["ci95"]
        confusions = ", ".join(f"{value} {count}" for value, count in score["read_as"].items())
        print(f"{concept:<10} {world.CONCEPT_KINDS[concept]:<7} {100 * score['value']:5.0f} % "
              f"[{100 * low:.0f}-{100 * high:.0f}]  {('read as: ' + confusions) if confusions else ''}")
    print(f"{'mean':<18} {100 * sum(s['value'] for s in scores.values()) / len(scores):5.0f} %")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
