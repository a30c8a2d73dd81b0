"""How far an erasure moves what the UNet reads, per prompt set, without generating an image (seconds, not minutes).

    python -m bench.drift circle red dots --set kv_ridge=0.03

For each concept: the harness's erasure (``bench.evaluate.erase_config``, the contextual method), then on the
harness's prompt sets
  *_progress  for prompts naming the concept: how much of the way to its target the erasure went, 1 - |R' - R_t| /
              |R - R_t|, where R is what the UNet's cross-attention keys/values read of the clean conditioning, R'
              the same under the adapter (text-encoder LoRA and key/value edit), R_t the read of the target (the
              same prompt with each neighbour in the concept's place, averaged). 1: all the way; 0: not moved.
  others, related, keep, empty   for prompts that must not change: the relative change |R' - R| / |R|.
  others_flips, related_flips    (text encoder only) how many of those prompts moved more than half the distance
              from their conditioning to the nearest same prompt with another value of the erased kind ("an orange
              star" -> "a red star"): the ones likely to be drawn as something else.
Each value is a pair (text encoder alone, the UNet's reads): the first is the same measure on the conditioning.
A proxy for tuning (the suite's accuracies decide): it shows which part of an erasure moves the prompts it should
keep, and by how much, with no sampling noise.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from unlearn_core.contexts import build_contexts, keep_prompts
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase
from unlearn_core.kv_edit import kv_modules
from unlearn_core.tokens import encode

from . import evaluate, world

CONCEPT_SETS = ("erase", "synonyms", "unusual")
KEPT_SETS = ("others", "related", "keep", "empty")


def _relative(after: torch.Tensor, before: torch.Tensor) -> float:
    return float(((after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def _progress(after: torch.Tensor, before: torch.Tensor, target: torch.Tensor) -> float:
    return 1 - float(((after - target).flatten(1).norm(dim=1)
                      / (before - target).flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def replace_value(prompt: str, value: str, phrase: str) -> str:
    """``prompt`` with its phrasing of ``value`` (the longest one it holds) replaced by ``phrase``."""
    phrases = sorted((evaluate.engine_phrase(value, p) for p in world.phrasings(value)), key=len, reverse=True)
    return prompt.replace(next(p for p in phrases if p in prompt), phrase, 1)


def neighbour_targets(backend, concept: str, prompts: list[str], neighbours: tuple[str, ...]) -> torch.Tensor:
    """Each prompt's conditioning with every neighbour in the concept's place, averaged."""
    return torch.stack([encode(backend, [replace_value(prompt, concept, n) for n in neighbours]).float().mean(0)
                        for prompt in prompts])


def half_way_flips(backend, entries: list[dict], kind: str, before: torch.Tensor, after: torch.Tensor) -> int:
    """How many prompts moved more than half way to the nearest same prompt with another value of ``kind``."""
    flips = 0
    for entry, b, a in zip(entries, before, after):
        value = entry["expect"][kind]
        others = [replace_value(entry["prompt"], value, evaluate.engine_phrase(v, world.phrasings(v)[0]))
                  for v in evaluate.KINDS[kind] if v != value]
        nearest = (encode(backend, others).float() - b).flatten(1).norm(dim=1).min()
        flips += int((a - b).norm() > 0.5 * nearest)
    return flips


def drift(backend, concept: str, per_set: int = 24, seed: int = 0, **overrides) -> dict:
    images, captions = evaluate.example_images(concept, 4, seed)
    config = evaluate.erase_config("contextual", concept, captions, **overrides)
    result = erase(backend, config, images)
    entries = evaluate.default_prompt_sets(concept, per_set, seed)
    sets = {name: [e["prompt"] for e in set_entries] for name, set_entries in entries.items()}
    keep = keep_prompts(build_contexts(config.contexts, config.kind, config.max_contexts, config.seed),
                        config.keep, config.preserve)
    sets["keep"] = random.Random(seed).sample(keep, min(2 * per_set, len(keep)))
    sets["empty"] = [""]
    weights = {name: m.weight.detach().float() for name, m in kv_modules(backend).items()}
    unet = result.unet_deltas

    def reads(cond: torch.Tensor, edited: bool) -> torch.Tensor:  # [n, modules * 77 * out]
        return torch.cat([(cond @ (w + (unet.delta_weight(n).float() if edited and unet else 0)).t()).flatten(1)
                          for n, w in weights.items()], dim=1)

    row = {"concept": concept, "seconds": round(result.seconds, 1)}
    with torch.no_grad():
        for name, prompts in sets.items():
            before = encode(backend, prompts).float()
            with result.deltas.inject(backend.linear):
                after = encode(backend, prompts).float()
            if name in CONCEPT_SETS:
                target = neighbour_targets(backend, concept, prompts, config.keep)
                row[f"{name}_progress"] = (round(_progress(after, before, target), 3),
                                           round(_progress(reads(after, True), reads(before, False),
                                                           reads(target, False)), 3))
            elif name in KEPT_SETS:
                row[name] = (round(_relative(after, before), 3),
                             round(_relative(reads(after, True), reads(before, False)), 3))
                if name in entries:
                    row[f"{name}_flips"] = half_way_flips(backend, entries[name], world.CONCEPT_KINDS[concept],
                                                          before, after)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concepts", nargs="+", help=f"of: {', '.join(world.CONCEPT_KINDS)}")
    parser.add_argument("--per-set", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="an EraseConfig override")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    backend = DiffusersBackend(load_pipeline(evaluate.MODEL))
    rows = []
    for concept in args.concepts:
        rows.append(drift(backend, concept, args.per_set, args.seed, **evaluate.parse_overrides(args.set)))
        print(json.dumps(rows[-1]), flush=True)
    keys = [f"{s}_progress" for s in CONCEPT_SETS] + list(KEPT_SETS)
    print("mean", json.dumps({k: [round(sum(r[k][i] for r in rows) / len(rows), 3) for i in (0, 1)] for k in keys}
                             | {f"{s}_flips": sum(r[f"{s}_flips"] for r in rows) for s in ("others", "related")}))


if __name__ == "__main__":
    main()
