"""Evaluation harness: erase one concept from the world model and measure what changed.

    python -m bench.evaluate --concept star --method contextual --out out/star.json

Draws N example images of the concept with their world captions (the concept's slot marked "{}"), erases it
the way a user would (its phrasings but one, the captions as contexts, the other values of its kind as the
keep list; methods that erase with a learned token learn one first), then generates and classifies:
  erased      prompts with the erased phrasings, in random compositions      (want ~0)
  synonyms    the held-out phrasing (the one sharing the fewest words with the erased ones)   (want ~0)
  unusual     all phrasings in an unusual but renderable form (a comma before the style)  (want ~0)
  others      other concepts of the same kind; kept only if every attribute the prompt names survives
  related     the examples' other attributes with another value of the kind; same rule
  ti_attack_recovery  a token re-learned on the erased model (2 vectors, 300 steps) shows the concept
  ti_token_clean      the same attack on the clean model (its ceiling)
  h_o         harmonic mean of 1-erased, others kept, 1-synonyms
Every accuracy has its counts and a 95 % Wilson interval in the report. Cost: seconds and UNet forward calls and
samples, token learning included when the method erases with a token. Writes report.json, a before/after grid PNG
and the loss curve PNG beside it. The clean model's side (before images, the attack ceiling) is cached per
concept and seed under --cache, so methods compared on one concept share it.

--prompts FILE replaces the generated prompt sets; schema (JSON):
  {"erase": [{"prompt": "a red star on stripes", "expect": {"shape": "star"}}, ...],
   "synonyms": [...], "others": [...], "related": [...]}
"expect" names the attributes (shape / colour / style) the classifier must read off the image.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unlearn_core.config import EraseConfig, LoraConfig, TokenConfig
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase
from unlearn_core.inversion import learn_token
from unlearn_core.kv_edit import applied
from unlearn_core.methods import method_config
from unlearn_core.plots import grid, loss_curve
from unlearn_core.tokens import ConceptToken, encode

from . import classifier as world_classifier
from . import world

MODEL = Path(__file__).parent / "world_model"
CLASSIFIER = Path(__file__).parent / "classifier.safetensors"
METHODS = ("contextual", "weighted", "fewshot", "paper", "anchor")
TABLE_NAMES = {"paper": "fewshot-paper"}  # the harness's short names for the core's methods
TOKEN_METHODS = ("weighted", "fewshot", "paper", "anchor")  # erase with a token learned from the images
ERASE_TOKEN = dict(n_vectors=1, steps=150)  # the token a user learns to erase with
ATTACK_TOKEN = dict(n_vectors=2, steps=300)  # the re-learning attack's budget
STOP_WORDS = frozenset({"a", "an", "on", "as", "with", "it", "the", "of", "in", "behind", "drawn"})
SETS = ("erase", "synonyms", "unusual", "others", "related")
KINDS = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}


def engine_phrase(concept: str, phrase: str) -> str:
    """A phrasing as it stands in a world caption: shapes without their article ("a star" -> "star")."""
    return phrase.split(" ", 1)[1] if world.CONCEPT_KINDS[concept] == "shape" else phrase


def content_words(phrase: str) -> set[str]:
    return {w for w in phrase.lower().replace("-", " ").split() if w not in STOP_WORDS}


def held_out_index(concept: str) -> int:
    """The phrasing that shares the fewest content words with the others (the last one on a tie)."""
    phrases = world.phrasings(concept)

    def shared(i):
        return len(content_words(phrases[i]) & set().union(*(content_words(p) for j, p in enumerate(phrases) if j != i)))

    return min(reversed(range(len(phrases))), key=shared)


def erase_phrasings(concept: str) -> list[str]:
    held = held_out_index(concept)
    return [p for i, p in enumerate(world.phrasings(concept)) if i != held]


def example_images(concept: str, count: int, seed: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``count`` world images of the concept and, per image, its caption with "{}" in place of the concept.

    The captions are what a user writes for their images; textual inversion (the erase token and the
    re-learning attack) uses them too: the strongest attacker knows the captions."""
    kind = world.CONCEPT_KINDS[concept]
    labels = [label for label in world.all_labels() if label.value(kind) == concept]
    pixels, chosen, _ = world.sample(count, seed=seed, labels=labels)
    rng = random.Random(seed + 7)
    captions = tuple(caption_with(label, kind, "a {}" if kind == "shape" else "{}", rng) for label in chosen)
    return world_classifier.to_tensor(pixels), captions


def caption_with(label: world.Label, kind: str, phrase: str, rng: random.Random, unusual: bool = False) -> str:
    """A caption of label whose ``kind`` attribute is written as ``phrase``; ``unusual``: the style after a comma
    (of the word orders tried, the one the clean model still renders; "style first" and "no article" it does not)."""
    shape = phrase if kind == "shape" else rng.choice(world.SHAPES[label.shape])
    colour = phrase if kind == "colour" else rng.choice(world.COLOURS[label.colour][1])
    style = phrase if kind == "style" else rng.choice(world.STYLES[label.style])
    noun = shape.split(" ", 1)[1]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {noun}{',' if unusual else ''} {style}"


def default_prompt_sets(concept: str, per_set: int, seed: int) -> dict[str, list[dict]]:
    kind = world.CONCEPT_KINDS[concept]
    names = {k: list(v) for k, v in KINDS.items()}
    erased, held_out = erase_phrasings(concept), world.phrasings(concept)[held_out_index(concept)]
    rng = random.Random(seed)

    def random_label(**fixed) -> world.Label:
        values = {k: fixed.get(k, rng.choice(names[k])) for k in names}
        return world.Label(values["shape"], values["colour"], values["style"])

    def concept_entry(phrase: str, unusual: bool = False) -> dict:
        label = random_label(**{kind: concept})
        return {"prompt": caption_with(label, kind, phrase, rng, unusual), "expect": {kind: concept}}

    def kept_entry(label: world.Label) -> dict:  # every attribute the prompt names must survive
        return {"prompt": world.caption(label, rng),
                "expect": {"shape": label.shape, "colour": label.colour, "style": label.style}}

    others = [kept_entry(random_label(**{kind: rng.choice([n for n in names[kind] if n != concept])}))
              for _ in range(per_set)]
    anchor_label = random_label(**{kind: concept})  # related: the examples' other attributes, another value
    related = []
    for _ in range(per_set):
        values = {"shape": anchor_label.shape, "colour": anchor_label.colour, "style": anchor_label.style,
                  kind: rng.choice([n for n in names[kind] if n != concept])}
        related.append(kept_entry(world.Label(values["shape"], values["colour"], values["style"])))
    all_phrasings = world.phrasings(concept)
    return {"erase": [concept_entry(erased[i % len(erased)]) for i in range(per_set)],
            "synonyms": [concept_entry(held_out) for _ in range(per_set)],
            "unusual": [concept_entry(all_phrasings[i % len(all_phrasings)], unusual=True) for i in range(per_set)],
            "others": others, "related": related}


def attack_prompt_set(concept: str, count: int, token: str, seed: int) -> list[dict]:
    """World captions in which the concept is written as the re-learned token."""
    kind = world.CONCEPT_KINDS[concept]
    rng = random.Random(seed + 99)
    labels = [label for label in world.all_labels() if label.value(kind) == concept]
    phrase = f"a {token}" if kind == "shape" else token
    return [{"prompt": caption_with(rng.choice(labels), kind, phrase, rng), "expect": {kind: concept}}
            for _ in range(count)]


def generate(pipe, backend, prompts: list[str], seed: int, deltas=None, token=None, steps: int = 20,
             guidance: float = 4.0, unet_deltas=None) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1]; conditioning from the engine (deltas / token spliced in), the UNet's
    key/value edit (``unet_deltas``) hooked while sampling."""
    def conditioning(texts, use_token):
        return encode(backend, texts, token if use_token else None)

    with torch.no_grad():
        if deltas is not None:
            with deltas.inject(backend.linear):
                cond = conditioning(prompts, True)
                uncond = conditioning([""] * len(prompts), False)
        else:
            cond = conditioning(prompts, True)
            uncond = conditioning([""] * len(prompts), False)
        generator = torch.Generator().manual_seed(seed)
        with applied(unet_deltas, backend):
            result = pipe(prompt_embeds=cond.to(pipe.unet.dtype), negative_prompt_embeds=uncond.to(pipe.unet.dtype),
                          num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
                          height=32, width=32)
    return torch.from_numpy(np.asarray(result.images)).permute(0, 3, 1, 2).float()


def hits(model, images: torch.Tensor, entries: list[dict]) -> int:
    predicted = model.predict(images)
    return sum(all(p.value(k) == v for k, v in e["expect"].items()) for p, e in zip(predicted, entries))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def measured(k: int, n: int) -> dict:
    low, high = wilson(k, n)
    return {"k": int(k), "n": int(n), "value": k / n if n else 0.0, "ci95": [round(low, 4), round(high, 4)]}


def harmonic(values) -> float:
    values = [max(v, 1e-6) for v in values]
    return len(values) / sum(1 / v for v in values)


def erase_config(method: str, concept: str, captions: tuple[str, ...], steps: int | None = None,
                 **overrides) -> EraseConfig:
    """The harness's erase settings, as a user would give them to any host (the core's method table);
    ``overrides`` are EraseConfig fields."""
    kind = world.CONCEPT_KINDS[concept]
    phrases = [engine_phrase(concept, p) for p in erase_phrasings(concept)]
    neighbours = tuple(engine_phrase(n, p) for n in KINDS[kind] if n != concept for p in world.phrasings(n))
    settings = dict(synonyms=tuple(phrases[1:]), kind="style" if kind == "style" else "object", steps=steps)
    if method == "contextual":
        settings.update(contexts=captions, keep=neighbours)
    config = method_config(TABLE_NAMES.get(method, method), phrases[0], **settings)
    return dataclasses.replace(config, **overrides) if overrides else config


class CleanSide:
    """What does not depend on the method, cached per concept, seed and prompt sets: the before counts and the
    attack-budget token learned on the clean model (the attack's ceiling)."""

    def __init__(self, cache: Path | None, concept: str, seed: int, prompt_sets: dict, sample_steps: int):
        key = json.dumps([concept, seed, prompt_sets, sample_steps, ATTACK_TOKEN], sort_keys=True)
        self.stem = f"{concept}-{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.cache = cache

    def load(self):
        if self.cache is None or not (self.cache / f"{self.stem}.json").is_file():
            return None
        data = json.loads((self.cache / f"{self.stem}.json").read_text())
        vectors = load_file(str(self.cache / f"{self.stem}.token.safetensors"))["emb_params"]
        return data, ConceptToken(data["token"], vectors)

    def save(self, data: dict, token: ConceptToken) -> None:
        if self.cache is None:
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        save_file({"emb_params": token.vectors.contiguous()}, str(self.cache / f"{self.stem}.token.safetensors"))
        (self.cache / f"{self.stem}.json").write_text(json.dumps(data | {"token": token.name}))


def evaluate(concept: str, method: str, n_images: int, prompt_sets: dict, model_path=MODEL,
             classifier_path=CLASSIFIER, seed: int = 0, token_steps: int | None = None,
             attack_steps: int | None = None, erase_steps: int | None = None, sample_steps: int = 20,
             cache: Path | None = None, log=lambda message: None, **erase_overrides):
    torch.manual_seed(seed)
    pipe = load_pipeline(model_path)
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe)
    judge = world_classifier.load(classifier_path)
    images, captions = example_images(concept, n_images, seed)
    kind = "style" if world.CONCEPT_KINDS[concept] == "style" else "object"
    attack_budget = ATTACK_TOKEN | ({"steps": attack_steps} if attack_steps else {})

    def token(name: str, token_seed: int, budget: dict):
        config = TokenConfig(token=name, kind=kind, lr=2e-2, seed=token_seed, captions=captions, **budget)
        return learn_token(backend, images, config)

    def count(entries, deltas=None, learned=None, unet=None) -> tuple[int, torch.Tensor]:
        pictures = generate(pipe, backend, [e["prompt"] for e in entries], seed, deltas=deltas, token=learned,
                            steps=sample_steps, unet_deltas=unet)
        return hits(judge, pictures, entries), pictures

    attack_entries = lambda name: attack_prompt_set(concept, len(prompt_sets["erase"]), name, seed)  # noqa: E731
    clean = CleanSide(cache, concept, seed, prompt_sets, sample_steps)
    cached = clean.load()
    generated = {}
    if cached is None:
        log(f"clean model: {sum(map(len, prompt_sets.values()))} prompts and the attack's ceiling token")
        before = {}
        for name, entries in prompt_sets.items():
            before[name], generated[name] = count(entries)
        ceiling = token("<clean>", seed + 1, attack_budget).token
        before["ti_token_clean"], _ = count(attack_entries(ceiling.name), learned=ceiling)
        clean.save(before, ceiling)
    else:
        before, _ = cached

    seconds, calls, samples = 0.0, 0, 0
    erase_token = None
    if method in TOKEN_METHODS:
        log(f"learning the erase token <{concept}> from {n_images} images ({ERASE_TOKEN['steps']} steps)")
        learned = token(f"<{concept}>", seed, ERASE_TOKEN | ({"steps": token_steps} if token_steps else {}))
        erase_token = learned.token
        seconds, calls, samples = learned.seconds, learned.unet_calls, learned.unet_samples
    config = erase_config(method, concept, captions, erase_steps, **erase_overrides)
    log(f"erasing with the {method} method ({config.steps} steps)")
    result = erase(backend, config, images, erase_token)

    report = {"concept": concept, "method": method, "mode": config.lora.mode, "lr": config.lr,
              "compress_rank": config.lora.compress_rank, "images": n_images, "seed": seed,
              "erase_phrases": [config.concept, *config.synonyms] + ([erase_token.name] if erase_token else []),
              "held_out_phrase": world.phrasings(concept)[held_out_index(concept)],
              "keep": list(config.keep), "contexts": list(config.contexts), "unet_kv_edit": config.unet_kv_edit}
    log(f"generating and classifying {sum(map(len, prompt_sets.values()))} prompts after erasure")
    for name, entries in prompt_sets.items():
        after, pictures = count(entries, deltas=result.deltas, unet=result.unet_deltas)
        generated[name] = (generated.get(name), pictures)
        field = "erased" if name == "erase" else name
        report[f"{field}_before"] = measured(before[name], len(entries))
        report[field] = measured(after, len(entries))
        report[f"acc_{field}_before"], report[f"acc_{field}"] = before[name] / len(entries), after / len(entries)

    log(f"re-learning attack: a fresh token on the erased model ({attack_budget})")
    result.deltas.requires_grad_(False)  # fixed during the attack: only the new token's vectors train
    with result.deltas.inject(backend.linear), applied(result.unet_deltas, backend):
        attack = token("<attack>", seed + 1, attack_budget).token
    recovered, _ = count(attack_entries(attack.name), deltas=result.deltas, learned=attack, unet=result.unet_deltas)
    n_attack = len(prompt_sets["erase"])
    report["ti_token_clean_ci"], report["ti_attack"] = measured(before["ti_token_clean"], n_attack), \
        measured(recovered, n_attack)
    report["ti_token_clean"], report["ti_attack_recovery"] = before["ti_token_clean"] / n_attack, recovered / n_attack
    report["attack_budget"] = attack_budget
    report["h_o"] = harmonic([1 - report["acc_erased"], report["acc_others"], 1 - report["acc_synonyms"]])
    report["seconds"] = round(seconds + result.seconds, 2)
    report["unet_calls"], report["unet_samples"] = calls + result.unet_calls, samples + result.unet_samples
    report["final_losses"] = result.history[-1]
    return report, result, generated, prompt_sets


def save_pictures(out: Path, result, generated: dict, prompt_sets: dict, title: str) -> None:
    """Before/after grid (when the clean side was generated in this run, else after only) and loss curve."""
    from unlearn_core.images import to_pil

    rows, labels, has_before = [], [], all(before is not None for before, _ in generated.values())
    for name in SETS:
        if name not in generated:
            continue
        before, after = generated[name]
        for i in range(min(2, len(after))):
            rows.append([to_pil(before[i]), to_pil(after[i])] if has_before else [to_pil(after[i])])
            labels.append(f"{name}: {prompt_sets[name][i]['prompt']}")
    grid(rows, labels, ["before", "after"] if has_before else ["after"], cell=96).save(out.with_suffix(".grid.png"))
    loss_curve(result.history, title).save(out.with_suffix(".loss.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", required=True, help=f"one of: {', '.join(world.CONCEPT_KINDS)}")
    parser.add_argument("--method", choices=METHODS, default="contextual",
                        help="contextual / weighted / fewshot / anchor: engine defaults; paper: Fuchi & Takagi's settings")
    parser.add_argument("--images", type=int, default=4, help="example images of the concept (default 4)")
    parser.add_argument("--prompts", help="JSON prompt sets (see the module doc for the schema)")
    parser.add_argument("--per-set", type=int, default=48, help="prompts per generated set (default 48)")
    parser.add_argument("--model", default=str(MODEL), help="world model folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="out/bench-cache", help="folder caching the clean model's side")
    parser.add_argument("--mode", choices=("lora", "full"), help="override the method's deltas: LoRA or full weights")
    parser.add_argument("--compress-rank", type=int, help="full mode: compress to a LoRA of this rank (SVD)")
    parser.add_argument("--lr", type=float, help="override the method's learning rate")
    parser.add_argument("--steps", type=int, help="override the method's erase steps")
    parser.add_argument("--attack-steps", type=int, help=f"re-learning attack steps (default {ATTACK_TOKEN['steps']})")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps per image (default 20)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override an EraseConfig field, e.g. --set negative_guidance=0.5 --set 'lora={\"preset\": \"final\"}'")
    parser.add_argument("--out", required=True, help="report .json (grid and loss PNGs are written beside it)")
    args = parser.parse_args()
    if args.concept not in world.CONCEPT_KINDS:
        raise SystemExit(f"error: unknown concept {args.concept!r}; known: {', '.join(world.CONCEPT_KINDS)}")
    torch.set_num_threads(1)
    prompt_sets = (json.loads(Path(args.prompts).read_text()) if args.prompts
                   else default_prompt_sets(args.concept, args.per_set, args.seed))
    overrides = parse_overrides(args.set)
    if args.mode:
        overrides["lora"] = LoraConfig(mode=args.mode, compress_rank=args.compress_rank)
    lr = args.lr or (1e-5 if args.mode == "full" else None)  # the CLI's default for full weights
    if lr:
        overrides["lr"] = lr
    start = time.time()
    report, result, generated, prompt_sets = evaluate(args.concept, args.method, args.images, prompt_sets,
                                                      args.model, seed=args.seed, erase_steps=args.steps,
                                                      attack_steps=args.attack_steps, sample_steps=args.sample_steps,
                                                      cache=Path(args.cache) if args.cache else None,
                                                      log=lambda message: print(message, file=sys.stderr, flush=True),
                                                      **overrides)
    report["overrides"] = {k: (v if not isinstance(v, LoraConfig) else vars(v)) for k, v in overrides.items()}
    report["total_seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    save_pictures(out, result, generated, prompt_sets, f"erase {args.concept} ({args.method})")
    print(json.dumps({k: v for k, v in report.items() if k.startswith("acc_") or k in ("h_o", "ti_attack_recovery",
                                                                                     "ti_token_clean", "seconds")}))


def parse_overrides(items: list[str]) -> dict:
    """``FIELD=JSON`` pairs into EraseConfig overrides (``lora`` becomes a LoraConfig)."""
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        overrides[name] = LoraConfig(**parsed) if name == "lora" else tuple(parsed) if isinstance(parsed, list) else parsed
    return overrides


if __name__ == "__main__":
    main()
