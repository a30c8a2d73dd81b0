"""Evaluation harness: erase one concept from the world model and measure what changed.

    python -m bench.evaluate --concept star --method weighted --out out/star.json

Draws N example images of the concept, learns a token on the clean model, erases (concept +
one synonym + the token; a third phrasing is held out), then generates and classifies:
  acc_erased    erase prompts still showing the concept          (want ~0)
  acc_synonyms  held-out phrasing still showing the concept        (want ~0)
  acc_others    other concepts of the same kind shown as prompted  (want = acc_others_before)
  acc_related   other concepts sharing colour/style with the examples (want = before)
  ti_attack_recovery  a token re-learned on the erased model from the same images brings the concept back
  ti_token_clean      the same kind of token learned and used on the clean model (the attack's ceiling)
  h_o           harmonic mean of 1-acc_erased, acc_others, 1-acc_synonyms
Writes report.json, a before/after grid PNG and the loss curve PNG beside it.

--prompts FILE replaces the generated prompt sets; schema (JSON):
  {"erase": [{"prompt": "a red star on stripes", "expect": {"shape": "star"}}, ...],
   "synonyms": [...], "others": [...], "related": [...]}
"expect" names the attributes (shape / colour / style) the classifier must read off the image.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unlearn_core.config import EraseConfig, LoraConfig, TokenConfig
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase
from unlearn_core.inversion import learn_token
from unlearn_core.plots import grid, loss_curve
from unlearn_core.tokens import encode

from . import classifier as world_classifier
from . import world

MODEL = Path(__file__).parent / "world_model"
CLASSIFIER = Path(__file__).parent / "classifier.safetensors"
METHODS = ("weighted", "fewshot", "paper", "anchor")


def example_images(concept: str, count: int, seed: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``count`` world images of the concept and, per image, its caption with "{}" in place of the concept.

    The captions let textual inversion (the erase token and the re-learning attack) see the rest of each
    image described as the world model was trained to read it: the strongest attacker knows the captions."""
    kind = world.CONCEPT_KINDS[concept]
    labels = [label for label in world.all_labels() if label.value(kind) == concept]
    pixels, chosen, _ = world.sample(count, seed=seed, labels=labels)
    rng = random.Random(seed + 7)
    captions = tuple(caption_with(label, kind, "a {}" if kind == "shape" else "{}", rng) for label in chosen)
    return world_classifier.to_tensor(pixels), captions


def caption_with(label: world.Label, kind: str, phrase: str, rng: random.Random) -> str:
    """A caption of label whose ``kind`` attribute is written as ``phrase``."""
    shape = phrase if kind == "shape" else rng.choice(world.SHAPES[label.shape])
    colour = phrase if kind == "colour" else rng.choice(world.COLOURS[label.colour][1])
    style = phrase if kind == "style" else rng.choice(world.STYLES[label.style])
    noun = shape.split(" ", 1)[1]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {noun} {style}"


def default_prompt_sets(concept: str, per_set: int, seed: int) -> dict[str, list[dict]]:
    kind = world.CONCEPT_KINDS[concept]
    names = {"shape": list(world.SHAPES), "colour": list(world.COLOURS), "style": list(world.STYLES)}
    phrases = world.phrasings(concept)
    rng = random.Random(seed)

    def random_label(**fixed) -> world.Label:
        values = {k: fixed.get(k, rng.choice(names[k])) for k in names}
        return world.Label(values["shape"], values["colour"], values["style"])

    def entry(label: world.Label, phrase: str | None = None) -> dict:
        text = caption_with(label, kind, phrase, rng) if phrase else world.caption(label, rng)
        return {"prompt": text, "expect": {kind: label.value(kind)}}

    erase_set = [entry(random_label(**{kind: concept}), phrases[i % 2]) for i in range(per_set)]
    synonyms = [entry(random_label(**{kind: concept}), phrases[2]) for _ in range(per_set)]
    others = [entry(random_label(**{kind: rng.choice([n for n in names[kind] if n != concept])}))
              for _ in range(per_set)]
    # related: the examples' other attributes kept, only the erased attribute differs
    anchor_label = random_label(**{kind: concept})
    related = []
    for _ in range(per_set):
        other = rng.choice([n for n in names[kind] if n != concept])
        values = {"shape": anchor_label.shape, "colour": anchor_label.colour, "style": anchor_label.style, kind: other}
        related.append(entry(world.Label(values["shape"], values["colour"], values["style"])))
    return {"erase": erase_set, "synonyms": synonyms, "others": others, "related": related}


def attack_prompt_set(concept: str, count: int, token: str, seed: int) -> list[dict]:
    """World captions in which the concept is written as the re-learned token."""
    kind = world.CONCEPT_KINDS[concept]
    rng = random.Random(seed + 99)
    labels = [label for label in world.all_labels() if label.value(kind) == concept]
    phrase = f"a {token}" if kind == "shape" else token
    return [{"prompt": caption_with(rng.choice(labels), kind, phrase, rng), "expect": {kind: concept}}
            for _ in range(count)]


def generate(pipe, backend, prompts: list[str], seed: int, deltas=None, token=None, steps: int = 20,
             guidance: float = 4.0) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1]; conditioning from the engine (deltas / token spliced in)."""
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
        result = pipe(prompt_embeds=cond.to(pipe.unet.dtype), negative_prompt_embeds=uncond.to(pipe.unet.dtype),
                      num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
                      height=32, width=32)
    return torch.from_numpy(np.asarray(result.images)).permute(0, 3, 1, 2).float()


def share(model, images: torch.Tensor, entries: list[dict]) -> float:
    predicted = model.predict(images)
    hits = [all(p.value(k) == v for k, v in e["expect"].items()) for p, e in zip(predicted, entries)]
    return float(np.mean(hits))


def harmonic(values) -> float:
    values = [max(v, 1e-6) for v in values]
    return len(values) / sum(1 / v for v in values)


def erase_config(method: str, concept: str, steps: int | None = None, **overrides) -> EraseConfig:
    """The harness's erase settings; ``overrides`` are EraseConfig fields (e.g. lr, lora)."""
    kind = "style" if world.CONCEPT_KINDS[concept] == "style" else "object"
    phrases = world.phrasings(concept)
    common = dict(synonyms=(phrases[1],), kind=kind, **({"steps": steps} if steps else {}), **overrides)
    if method == "paper":
        return EraseConfig.fewshot_paper(phrases[0], **common)
    return EraseConfig(concept=phrases[0], method=method, **common)


def evaluate(concept: str, method: str, n_images: int, prompt_sets: dict, model_path=MODEL,
             classifier_path=CLASSIFIER, seed: int = 0, token_steps: int = 150, erase_steps: int | None = None,
             sample_steps: int = 20, log=lambda message: None, **erase_overrides):
    torch.manual_seed(seed)
    pipe = load_pipeline(model_path)
    pipe.set_progress_bar_config(disable=True)
    backend = DiffusersBackend(pipe)
    judge = world_classifier.load(classifier_path)
    images, captions = example_images(concept, n_images, seed)
    kind = "style" if world.CONCEPT_KINDS[concept] == "style" else "object"
    token_name = f"<{concept}>"

    def token_config(name: str, token_seed: int) -> TokenConfig:
        return TokenConfig(token=name, kind=kind, steps=token_steps, lr=2e-2, seed=token_seed, captions=captions)

    log(f"learning the token {token_name} from {n_images} images ({token_steps} steps)")
    token = learn_token(backend, images, token_config(token_name, seed)).token
    config = erase_config(method, concept, erase_steps, **erase_overrides)
    log(f"erasing with the {method} method ({config.steps} steps)")
    result = erase(backend, config, images, token)

    report = {"concept": concept, "method": method, "mode": config.lora.mode, "lr": config.lr,
              "compress_rank": config.lora.compress_rank, "images": n_images, "seed": seed,
              "erase_phrases": [config.concept, *config.synonyms, token_name],
              "held_out_phrase": world.phrasings(concept)[2]}
    generated = {}
    log(f"generating and classifying {sum(map(len, prompt_sets.values()))} prompts before and after")
    for name, entries in prompt_sets.items():
        prompts = [e["prompt"] for e in entries]
        before = generate(pipe, backend, prompts, seed, steps=sample_steps)
        after = generate(pipe, backend, prompts, seed, deltas=result.deltas, steps=sample_steps)
        generated[name] = (before, after)
        report[f"acc_{name}_before"] = share(judge, before, entries)
        report[f"acc_{name}"] = share(judge, after, entries)
    report["acc_erased"] = report.pop("acc_erase")
    report["acc_erased_before"] = report.pop("acc_erase_before")

    def shows_concept(learned, deltas=None) -> float:
        """Share of images of world captions with the concept written as the learned token that show it."""
        entries = attack_prompt_set(concept, len(prompt_sets["erase"]), learned.name, seed)
        pictures = generate(pipe, backend, [e["prompt"] for e in entries], seed, deltas=deltas, token=learned,
                            steps=sample_steps)
        return share(judge, pictures, entries)

    log("re-learning attack: a fresh token on the erased model")
    report["ti_token_clean"] = shows_concept(token)
    result.deltas.requires_grad_(False)  # fixed during the attack: only the new token's vectors train
    with result.deltas.inject(backend.linear):
        attack = learn_token(backend, images, token_config("<attack>", seed + 1)).token
    report["ti_attack_recovery"] = shows_concept(attack, result.deltas)
    report["h_o"] = harmonic([1 - report["acc_erased"], report["acc_others"], 1 - report["acc_synonyms"]])
    report["seconds"] = round(result.seconds, 2)
    report["unet_passes"] = result.unet_passes
    report["final_losses"] = result.history[-1]
    return report, result, generated, prompt_sets


def save_pictures(out: Path, result, generated: dict, prompt_sets: dict, title: str) -> None:
    from unlearn_core.images import to_pil

    rows, labels = [], []
    for name in ("erase", "synonyms", "others", "related"):
        if name not in generated:
            continue
        before, after = generated[name]
        for i in range(min(2, len(before))):
            rows.append([to_pil(before[i]), to_pil(after[i])])
            labels.append(f"{name}: {prompt_sets[name][i]['prompt']}")
    grid(rows, labels, ["before", "after"], cell=96).save(out.with_suffix(".grid.png"))
    loss_curve(result.history, title).save(out.with_suffix(".loss.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", required=True, help=f"one of: {', '.join(world.CONCEPT_KINDS)}")
    parser.add_argument("--method", choices=METHODS, default="weighted",
                        help="weighted / fewshot / anchor: engine defaults; paper: Fuchi & Takagi's settings")
    parser.add_argument("--images", type=int, default=4, help="example images of the concept (default 4)")
    parser.add_argument("--prompts", help="JSON prompt sets (see the module doc for the schema)")
    parser.add_argument("--per-set", type=int, default=16, help="prompts per generated set (default 16)")
    parser.add_argument("--model", default=str(MODEL), help="world model folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("lora", "full"), help="override the method's deltas: LoRA or full weights")
    parser.add_argument("--compress-rank", type=int, help="full mode: compress to a LoRA of this rank (SVD)")
    parser.add_argument("--lr", type=float, help="override the method's learning rate")
    parser.add_argument("--steps", type=int, help="override the method's erase steps")
    parser.add_argument("--out", required=True, help="report .json (grid and loss PNGs are written beside it)")
    args = parser.parse_args()
    if args.concept not in world.CONCEPT_KINDS:
        raise SystemExit(f"error: unknown concept {args.concept!r}; known: {', '.join(world.CONCEPT_KINDS)}")
    torch.set_num_threads(1)
    prompt_sets = (json.loads(Path(args.prompts).read_text()) if args.prompts
                   else default_prompt_sets(args.concept, args.per_set, args.seed))
    overrides = {}
    if args.mode:
        overrides["lora"] = LoraConfig(mode=args.mode, compress_rank=args.compress_rank)
    lr = args.lr or (1e-5 if args.mode == "full" else None)  # the CLI's default for full weights
    if lr:
        overrides["lr"] = lr
    start = time.time()
    report, result, generated, prompt_sets = evaluate(args.concept, args.method, args.images, prompt_sets,
                                                      args.model, seed=args.seed, erase_steps=args.steps,
                                                      log=lambda message: print(message, file=sys.stderr, flush=True),
                                                      **overrides)
    report["total_seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    save_pictures(out, result, generated, prompt_sets, f"erase {args.concept} ({args.method})")
    print(json.dumps({k: v for k, v in report.items() if k != "final_losses"}, indent=2))


if __name__ == "__main__":
    main()
