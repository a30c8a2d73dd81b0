"""Erasing several concepts of the world at once: one joint run against one adapter per concept, merged, and
against the concepts erased one after another into one growing file (continual).

    python -m bench.many --sizes 1 3 5 --per-set 24 --split test
    python -m bench.many --sizes 5 --modes continual --per-set 24

For each N of --sizes: the first N concepts of one seeded order of the split (the kinds taken in turn, so the
concepts are drawn across kinds; the choice for N is part of the choice for a larger N); the world's other
concepts are the rest.
  joint   one erasure with the core's default (contextual, bench.evaluate.erase_config) of the first concept with
          ``also`` = the other N-1, each concept with its own contexts (its example captions), kind and neighbours
          (its kind's other values) but the phrasings of the concepts erased (the engine then leaves out contexts
          naming one of them)
  merged  the same default erasure per concept, each written with its UNet key/value edit (write_adapter), merged
          into one stack (unlearn_core.stacking.merge)
  continual  the same default erasure per concept, one after another: each run with the file so far applied
          (erase(..., earlier=continual.read_earlier(file))), the file growing by concept (continual.grown); the
          first step is the merged N=1 part. For the largest N, the table "continual: after each step" measures the
          file after each step k = 1..N: the first concept's erase prompts (kept erased: issue target <= 10 %), the k
          concepts erased so far (pooled), the rest of the largest N (issue target: a drop of at most 3 points)
All are applied as read back from their file (read_adapter: text-encoder LoRA and UNet key/value edit).
  erased  each concept's erase prompts (bench.evaluate.default_prompt_sets, --per-set per concept), pooled; a hit
          when the classifier reads that concept's attribute                              (want ~0)
  rest    --per-set captions of the rest's concepts only; a hit when every attribute survives  (want the clean)
          also with only the file's text-encoder deltas and with only its UNet key/value edit (which part damages)
  remove-one  (merged, N >= 2) stacking.remove one concept (a seeded pick) from the stack: its erase prompts
          against its clean accuracy (target >= 90 % of clean), the other concepts' (still erased), the rest
Before (clean) and after images share prompts and seeds (paired); the clean side is generated once per set.
Accuracies carry 95 % Wilson intervals; seconds are erase time (merged: the parts' sum, plus merging;
continual: the steps' sum, each with reading the earlier file and growing it); MB the file. Modes by default:
joint, merged. A concept's erasure is made once and reused by every N and mode whose config is the same (joint N=1 is
the merged N=1 part). Writes <out>/<name>.json and <out>/<name>.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from unlearn_core import continual, stacking
from unlearn_core.adapter_io import base_fingerprint, read_adapter, write_adapter
from unlearn_core.config import Concept, EraseConfig
from unlearn_core.diffusers_backend import DiffusersBackend, load_pipeline
from unlearn_core.erase import erase

from . import classifier as world_classifier
from . import evaluate, world
from .suite import SPLITS, code_version

MODES = ("joint", "merged", "continual")
DEFAULT_MODES = ("joint", "merged")


def concept_order(split: str, seed: int) -> list[str]:
    """The split's concepts in one seeded order that takes the kinds in turn (each kind's concepts shuffled); the
    last of a kind whose every value is in the split is left out, so the rest always has a value of each kind."""
    rng = random.Random(seed)
    by_kind = {kind: [c for c in SPLITS[split] if world.CONCEPT_KINDS[c] == kind] for kind in evaluate.KINDS}
    for kind, concepts in by_kind.items():
        rng.shuffle(concepts)
        if len(concepts) == len(evaluate.KINDS[kind]):  # a split with every value of a kind: one stays for the rest
            concepts.pop()
    kinds = list(by_kind)
    rng.shuffle(kinds)
    depth = max(map(len, by_kind.values()))
    return [by_kind[k][i] for i in range(depth) for k in kinds if i < len(by_kind[k])]


def rest_set(erased: list[str], per_set: int, seed: int) -> list[dict]:
    """Captions of labels none of whose attributes is erased; every attribute must survive."""
    rng = random.Random(seed)
    values = {kind: [c for c in names if c not in erased] for kind, names in evaluate.KINDS.items()}
    entries = []
    for _ in range(per_set):
        label = world.Label(*(rng.choice(values[kind]) for kind in ("shape", "colour", "style")))
        entries.append({"prompt": world.caption(label, rng),
                        "expect": {"shape": label.shape, "colour": label.colour, "style": label.style}})
    return entries


class Bench:
    """The world model, the classifier, each concept's example images, erase prompts and clean counts, and the
    erasures made so far (by config)."""

    def __init__(self, model, per_set: int, seed: int, images: int, steps: int | None, sample_steps: int, folder,
                 log=lambda message: None, overrides: dict | None = None):
        self.overrides = dict(overrides or {})
        self.steps = evaluate.steps_setting(steps, self.overrides)  # refused before the model is loaded
        self.pipe = load_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.backend = DiffusersBackend(self.pipe)
        self.judge = world_classifier.load(evaluate.CLASSIFIER)
        self.per_set, self.seed, self.images, self.sample_steps = per_set, seed, images, sample_steps
        self.folder, self.log = Path(folder), log
        self.examples, self.erase_sets, self.clean, self.made, self.sequence = {}, {}, {}, {}, {}

    def count(self, entries: list[dict], adapter=None) -> int:
        pictures = evaluate.generate(self.pipe, self.backend, [e["prompt"] for e in entries], self.seed,
                                     deltas=adapter and adapter.deltas, unet_deltas=adapter and adapter.unet,
                                     steps=self.sample_steps)
        return evaluate.hits(self.judge, pictures, entries)

    def concept(self, concept: str) -> tuple:
        """(images, captions) of the concept; its erase prompts and clean count prepared on first use."""
        if concept not in self.examples:
            self.examples[concept] = evaluate.example_images(concept, self.images, self.seed)
            self.erase_sets[concept] = evaluate.default_prompt_sets(concept, self.per_set, self.seed)["erase"]
            self.log(f"clean model: {concept}'s erase prompts")
            self.clean[concept] = self.count(self.erase_sets[concept])
        return self.examples[concept]

    def config(self, concepts: list[str]):
        """The default erasure of ``concepts`` (one, or several jointly: the first with ``also`` the others, each
        with its own captions, kind and neighbours but the phrasings of the concepts erased)."""
        singles = [evaluate.erase_config("contextual", c, self.concept(c)[1], self.steps, **self.overrides)
                   for c in concepts]
        if len(concepts) == 1:
            return singles[0]
        erased = {evaluate.engine_phrase(c, p) for c in concepts for p in world.phrasings(c)}
        own = [Concept(s.concept, s.synonyms, s.contexts, tuple(k for k in s.keep if k not in erased), s.kind)
               for s in singles]
        return dataclasses.replace(singles[0], keep=own[0].keep, also=tuple(own[1:]))

    def adapter_file(self, concepts: list[str]) -> tuple[Path, float]:
        """The default erasure of ``concepts`` written as one adapter file (made once per config), and its seconds."""
        config = self.config(concepts)
        if config not in self.made:
            self.log(f"erasing {', '.join(concepts)} ({config.steps} steps)")
            images = torch.cat([self.concept(c)[0] for c in concepts])
            result = erase(self.backend, config, images)
            path = self.folder / f"{'+'.join(concepts)}.safetensors"
            write_adapter(path, result.deltas, base_fingerprint(self.backend), result.info(), unet=result.unet_deltas)
            self.made[config] = (path, result.seconds)
        return self.made[config]

    def continual_file(self, concepts: list[str]) -> tuple[Path, float, float]:
        """``concepts`` erased one after another (each with the default config, run after the file so far), the file
        growing by concept; made once per prefix. (file, the last step's seconds, all steps' seconds)."""
        key = tuple(concepts)
        if key not in self.sequence:
            if len(concepts) == 1:  # the first step: the plain erasure (the merged mode's part)
                path, seconds = self.adapter_file(concepts)
                self.sequence[key] = (path, seconds, seconds)
                return self.sequence[key]
            before, _, total = self.continual_file(concepts[:-1])
            concept = concepts[-1]
            config = self.config([concept])
            self.log(f"continual step {len(concepts)}: erasing {concept} after {', '.join(concepts[:-1])} "
                     f"({config.steps} steps)")
            start = time.perf_counter()
            earlier = continual.read_earlier(before, self.backend)
            result = erase(self.backend, config, self.concept(concept)[0], earlier=earlier)
            stack = continual.grown(earlier, result, base_fingerprint(self.backend), f"{concept}.safetensors")
            path = stacking.write(self.folder / f"continual-{len(concepts)}.safetensors", stack)
            seconds = time.perf_counter() - start
            self.sequence[key] = (path, seconds, total + seconds)
        return self.sequence[key]

    def measure(self, concepts: list[str], rest: list[dict], rest_clean: int, path: Path) -> dict:
        """Erased (pooled and per concept) and rest, before and after the adapter file at ``path``."""
        adapter = read_adapter(path, self.backend)
        after = {c: self.count(self.erase_sets[c], adapter) for c in concepts}
        n = self.per_set
        return {"erased_before": evaluate.measured(sum(self.clean[c] for c in concepts), n * len(concepts)),
                "erased": evaluate.measured(sum(after.values()), n * len(concepts)),
                "per_concept": {c: {"before": evaluate.measured(self.clean[c], n), "after": evaluate.measured(k, n)}
                                for c, k in after.items()},
                "rest_before": evaluate.measured(rest_clean, len(rest)),
                "rest": evaluate.measured(self.count(rest, adapter), len(rest))}

    def rest_by_part(self, rest: list[dict], path: Path) -> dict:
        """The rest with only the file's text-encoder deltas, and with only its UNet key/value edit: which part of
        an adapter (or of a stack's summed parts) does the damage."""
        adapter = read_adapter(path, self.backend)
        only = {"text_encoder": dataclasses.replace(adapter, unet=None),
                "unet_edit": dataclasses.replace(adapter, deltas=None)}
        return {part: evaluate.measured(self.count(rest, a), len(rest)) for part, a in only.items()}


def _same_tensors(a: stacking.StoredAdapter, b: stacking.StoredAdapter) -> bool:
    same = stacking._same_bits
    return a.tensors.keys() == b.tensors.keys() and all(same(t.reshape(-1), b.tensors[k].reshape(-1))
                                                        for k, t in a.tensors.items())


def remove_one(bench: Bench, concepts: list[str], stack_path: Path, stack_row: dict, rest: list[dict],
               rest_clean: int, parts: dict[str, Path]) -> dict:
    """One concept (a seeded pick) taken out of the merged stack: it should come back, the others stay erased."""
    removed = random.Random(bench.seed + len(concepts)).choice(concepts)
    kept = [c for c in concepts if c != removed]
    start = time.perf_counter()
    left = stacking.remove(stacking.load(stack_path), removed)  # by the part's file name: the world concept
    seconds = time.perf_counter() - start
    path = stacking.write(bench.folder / f"merged-{len(concepts)}-without-{removed}.safetensors", left)
    measured = bench.measure(concepts, rest, rest_clean, path)
    n = bench.per_set
    back, clean = measured["per_concept"][removed]["after"], bench.clean[removed]
    others_k = lambda row: sum(row["per_concept"][c]["after"]["k"] for c in kept)  # noqa: E731
    return {"n": len(concepts), "removed": removed, "parts_left": [p.concept for p in left.parts()],
            "equals_merge_of_others": _same_tensors(left, stacking.merge(stacking.parts_from_files(
                [parts[c] for c in kept]))),
            "removed_clean": evaluate.measured(clean, n),
            "removed_in_stack": stack_row["per_concept"][removed]["after"], "removed_after": back,
            "removed_ratio": back["k"] / clean if clean else None,
            "target_met": back["k"] >= 0.9 * clean,
            "others_in_stack": evaluate.measured(others_k(stack_row), n * len(kept)),
            "others_after": evaluate.measured(others_k(measured), n * len(kept)),
            "rest_in_stack": stack_row["rest"], "rest": measured["rest"], "seconds": round(seconds, 3),
            "bytes": path.stat().st_size}


def continual_steps(bench: Bench, concepts: list[str], rest: list[dict], rest_clean: int, last: dict) -> list[dict]:
    """The continual file after each step k: the first concept (kept erased), the k erased so far, the rest (``last``:
    the row of the whole sequence, measured already)."""
    steps = []
    for k in range(1, len(concepts) + 1):
        path, seconds, total = bench.continual_file(concepts[:k])
        measured = last if k == len(concepts) else bench.measure(concepts[:k], rest, rest_clean, path)
        first = measured["per_concept"][concepts[0]]
        drop = 100 * (measured["rest_before"]["value"] - measured["rest"]["value"])
        steps.append({"step": k, "concept": concepts[k - 1], "concepts": concepts[:k],
                      "first_before": first["before"], "first": first["after"],
                      "first_target_met": first["after"]["value"] <= 0.10}
                     | {name: measured[name] for name in ("erased_before", "erased", "per_concept", "rest_before",
                                                          "rest")}
                     | {"rest_drop_points": round(drop, 1), "rest_target_met": drop <= 3,
                        "seconds": round(seconds, 2), "total_seconds": round(total, 2), "bytes": path.stat().st_size,
                        "parts": [p.concept for p in stacking.load(path).parts()]})
    return steps


def many(sizes=(1, 3, 5), per_set: int = 24, split: str = "test", seed: int = 0, modes=DEFAULT_MODES,
         model=evaluate.MODEL, images: int = 4, steps: int | None = None, sample_steps: int = 20,
         log=lambda message: None, concepts: tuple[str, ...] = (), overrides: dict | None = None) -> dict:
    """``overrides``: EraseConfig fields set on every erasure (``--set``), as in bench.suite."""
    order = list(concepts) or concept_order(split, seed)
    unknown = [c for c in order if c not in world.CONCEPT_KINDS]
    if unknown or len(set(order)) < len(order):
        raise ValueError(f"--concepts: give distinct world concepts ({', '.join(world.CONCEPT_KINDS)}); "
                         f"got {', '.join(order)}")
    if any(all(v in order for v in evaluate.KINDS[kind]) for kind in evaluate.KINDS):
        raise ValueError("--concepts: leave at least one value of each kind out, for the rest")
    if max(sizes) > len(order):
        raise ValueError(f"--sizes: the {split} split has {len(order)} concepts, {max(sizes)} asked for "
                         "(--split all has every concept)")
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(EraseConfig)}
    if set(overrides) - fields:
        raise ValueError(f"--set: {', '.join(sorted(set(overrides) - fields))} is not an erase setting "
                         f"(EraseConfig has {', '.join(sorted(fields))})")
    torch.manual_seed(seed)
    report = {"split": split, "seed": seed, "per_set": per_set, "sizes": list(sizes), "modes": list(modes),
              "order": order, "images": images, "steps": steps, "sample_steps": sample_steps,
              "overrides": {k: (vars(v) if dataclasses.is_dataclass(v) else v) for k, v in overrides.items()},
              "rows": [], "remove_one": [], "continual": []}
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(model, per_set, seed, images, steps, sample_steps, folder, log, overrides)
        for n in sizes:
            concepts = order[:n]
            rest = rest_set(concepts, per_set, seed + n)
            log(f"N={n}: {', '.join(concepts)}; clean model: the rest")
            for c in concepts:
                bench.concept(c)
            rest_clean = bench.count(rest)
            base = {"n": n, "concepts": concepts,
                    "rest_concepts": [c for c in world.CONCEPT_KINDS if c not in concepts]}
            for mode in modes:
                merge_seconds = 0.0
                if mode == "joint":
                    path, seconds = bench.adapter_file(concepts)
                elif mode == "continual":
                    path, _, seconds = bench.continual_file(concepts)
                else:
                    parts = {c: bench.adapter_file([c]) for c in concepts}
                    start = time.perf_counter()
                    path = stacking.merge_files([p for p, _ in parts.values()],
                                                Path(folder) / f"merged-{n}.safetensors", overwrite=True)[0]
                    merge_seconds = time.perf_counter() - start
                    seconds = sum(s for _, s in parts.values()) + merge_seconds
                log(f"N={n} {mode}: generating and classifying")
                row = base | {"mode": mode} | bench.measure(concepts, rest, rest_clean, path) | {
                    "seconds": round(seconds, 2), "merge_seconds": round(merge_seconds, 3),
                    "bytes": path.stat().st_size, "adapter_concept": read_adapter(path).info("concept"),
                    "rest_by_part": bench.rest_by_part(rest, path),
                    "warnings": continual.undoing_each_other(stacking.load(path).parts(path.name))}
                report["rows"].append(row)
                if mode == "merged" and n >= 2:
                    log(f"N={n}: one concept removed from the stack")
                    report["remove_one"].append(remove_one(bench, concepts, path, row, rest, rest_clean,
                                                           {c: p for c, (p, _) in parts.items()}))
                if mode == "continual" and n == max(sizes):
                    log(f"N={n}: the continual file after each step")
                    report["continual"] = continual_steps(bench, concepts, rest, rest_clean, row)
    report["clean"] = {c: evaluate.measured(k, per_set) for c, k in bench.clean.items()}
    return report


def _pct(m: dict) -> str:
    low, high = m["ci95"]
    return f"{100 * m['value']:.0f} [{100 * low:.0f}-{100 * high:.0f}]"


def table(report: dict, title: str) -> str:
    lines = [f"### {title}", "",
             "| N | mode | concepts | erased before → after [CI] | rest before → after [CI] "
             "| rest, text-encoder part only / UNet edit only [CI] | s | MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        parts = r.get("rest_by_part")
        by_part = f"{_pct(parts['text_encoder'])} / {_pct(parts['unet_edit'])}" if parts else "–"
        lines.append(f"| {r['n']} | {r['mode']} | {', '.join(r['concepts'])} "
                     f"| {100 * r['erased_before']['value']:.0f} → {_pct(r['erased'])} "
                     f"| {100 * r['rest_before']['value']:.0f} → {_pct(r['rest'])} | {by_part} | {r['seconds']:.1f} "
                     f"| {r['bytes'] / 1e6:.2f} |")
    warned = [f"- N {r['n']} {r['mode']}: warning: {w}" for r in report["rows"] for w in r.get("warnings", [])]
    lines += [""] + warned if warned else []
    if report["remove_one"]:
        lines += ["", "Remove one concept from the merged stack (`stacking.remove`):", "",
                  "| N | removed | its accuracy: clean / in stack / removed [CI] | ≥ 90 % of clean | others erased: "
                  "in stack → removed [CI] | rest: in stack → removed [CI] | parts left = merge of them |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["remove_one"]:
            ratio = "–" if r["removed_ratio"] is None else f"{100 * r['removed_ratio']:.0f} %"
            lines.append(f"| {r['n']} | {r['removed']} | {100 * r['removed_clean']['value']:.0f} / "
                         f"{100 * r['removed_in_stack']['value']:.0f} / {_pct(r['removed_after'])} "
                         f"| {'yes' if r['target_met'] else 'no'} ({ratio}) "
                         f"| {100 * r['others_in_stack']['value']:.0f} → {_pct(r['others_after'])} "
                         f"| {100 * r['rest_in_stack']['value']:.0f} → {_pct(r['rest'])} "
                         f"| {', '.join(r['parts_left'])}: {'yes' if r['equals_merge_of_others'] else 'NO'} |")
    if report.get("continual"):
        lines += ["", "continual: after each step (the concepts erased one after another into one growing file; "
                      "rest: the last step's)", "",
                  "| step | erased now | first concept before → after [CI] (≤ 10 %) "
                  "| all erased so far before → after [CI] | rest before → after [CI] | rest drop (≤ 3 points) "
                  "| s (step / all) | MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["continual"]:
            lines.append(f"| {r['step']} | {r['concept']} | {100 * r['first_before']['value']:.0f} → "
                         f"{_pct(r['first'])} {'yes' if r['first_target_met'] else 'no'} "
                         f"| {100 * r['erased_before']['value']:.0f} → {_pct(r['erased'])} "
                         f"| {100 * r['rest_before']['value']:.0f} → {_pct(r['rest'])} "
                         f"| {r['rest_drop_points']:.0f} {'yes' if r['rest_target_met'] else 'no'} "
                         f"| {r['seconds']:.1f} / {r['total_seconds']:.1f} | {r['bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 5], help="numbers of concepts (default 1 3 5)")
    parser.add_argument("--per-set", type=int, default=24, help="erase prompts per concept and rest prompts (24)")
    parser.add_argument("--split", choices=tuple(SPLITS), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concepts", nargs="+", default=(),
                        help="the concepts in this order instead of the split's seeded order (N takes the first N)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                        help="default joint merged; continual: one after another, reported after each step")
    parser.add_argument("--images", type=int, default=4, help="example images per concept (default 4)")
    parser.add_argument("--steps", type=int, help="erase steps (default: the method's)")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps per image (default 20)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="an EraseConfig field for every erasure, as in bench.suite (e.g. --set preserve_weight=3)")
    parser.add_argument("--model", default=str(evaluate.MODEL), help="world model folder")
    parser.add_argument("--name", help="file name stem (default many-<split>-seed<seed>)")
    parser.add_argument("--out", default="bench/results/many", help="folder of <name>.json and <name>.md")
    args = parser.parse_args()
    if min(args.sizes) < 1:
        raise SystemExit("error: --sizes: give numbers of concepts >= 1")
    torch.set_num_threads(1)
    start, commit = time.time(), code_version()  # the code the run started with, not what was committed meanwhile
    try:
        report = many(tuple(args.sizes), args.per_set, args.split, args.seed, tuple(args.modes), args.model,
                      args.images, args.steps, args.sample_steps,
                      log=lambda message: print(message, file=sys.stderr, flush=True), concepts=tuple(args.concepts),
                      overrides=evaluate.parse_overrides(args.set))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    report["total_seconds"] = round(time.time() - start, 1)
    report["command"] = " ".join(["python -m bench.many", *sys.argv[1:]])
    report["commit"] = commit
    name = args.name or f"many-{args.split}-seed{args.seed}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, name)
    (out / f"{name}.md").write_text(text + "\n")
    print(text)


def markdown(report: dict, name: str) -> str:
    settings = "".join(f", {k}={v}" for k, v in report.get("overrides", {}).items())
    title = f"{name}: {report['per_set']} erase prompts per concept, {report['per_set']} rest prompts, " \
            f"seed {report['seed']}{settings}"
    ran = (f"\n\n`{report['command']}` at {report['commit']}, {report['total_seconds']:.0f} s"
           if "command" in report else "")
    return table(report, title) + ran


if __name__ == "__main__":
    main()
