"""Which part of an erasure erases and which part damages: the text-encoder LoRA alone, the UNet key/value edit
alone, and both, on the same prompts, seeds and images as the harness.

    python -m bench.components circle dots --set kv_preserve_weight=3

For each concept: one erasure (the harness's settings, ``bench.evaluate.erase_config``), then the erase, others
and related sets generated four ways (clean; text encoder only; UNet edit only; both) and classified. Prints the
counts kept per way and every kept-set image that both parts together lost, with the attribute read instead and
whether each part alone lost it too. Paired: the images differ only by what each part changes.
"""
from __future__ import annotations

import argparse
import json

import torch

from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase

from . import classifier as world_classifier
from . import evaluate

SETS = ("erase", "others", "related")
WAYS = ("clean", "text_encoder", "unet_edit", "both")


def components(pipe, backend, judge, concept: str, per_set: int = 24, seed: int = 0, **overrides) -> dict:
    images, captions = evaluate.example_images(concept, 4, seed)
    result = erase(backend, evaluate.erase_config("contextual", concept, captions, **overrides), images)
    parts = {"clean": {}, "text_encoder": {"deltas": result.deltas}, "unet_edit": {"unet_deltas": result.unet_deltas},
             "both": {"deltas": result.deltas, "unet_deltas": result.unet_deltas}}
    report = {"concept": concept, "overrides": {k: str(v) for k, v in overrides.items()}}
    for name, entries in evaluate.default_prompt_sets(concept, per_set, seed).items():
        if name not in SETS:
            continue
        prompts = [e["prompt"] for e in entries]
        labels = {way: judge.predict(evaluate.generate(pipe, backend, prompts, seed, **parts[way])) for way in WAYS}
        kept = {way: [all(getattr(label, a) == v for a, v in e["expect"].items())
                      for label, e in zip(labels[way], entries)] for way in WAYS}
        report[name] = {way: sum(kept[way]) for way in WAYS} | {"n": len(entries)}
        if name != "erase":
            report[f"{name}_lost"] = [
                {"prompt": e["prompt"], "read": {a: getattr(labels["both"][i], a) for a, v in e["expect"].items()
                                                 if getattr(labels["both"][i], a) != v},
                 "text_encoder_alone_kept": kept["text_encoder"][i], "unet_edit_alone_kept": kept["unet_edit"][i]}
                for i, e in enumerate(entries) if kept["clean"][i] and not kept["both"][i]]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="+")
    parser.add_argument("--per-set", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="an EraseConfig override")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(evaluate.MODEL)
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe)
    judge = world_classifier.load(evaluate.CLASSIFIER)
    for concept in args.concepts:
        print(json.dumps(components(pipe, backend, judge, concept, args.per_set, args.seed,
                                    **evaluate.parse_overrides(args.set))), flush=True)


if __name__ == "__main__":
    main()
