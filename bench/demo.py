"""The newcomer's demo: erase one concept from the bundled world model and show what changed.

    python -m bench.demo [--concept stripes] [--out out/demo]

Writes out/demo/REPORT.md with a before/after grid and the loss curve (about 2-5 minutes on a CPU).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import evaluate, world


def _percent(value: float) -> str:
    return f"{100 * value:.0f} %"


def write_report(out: Path, report: dict) -> Path:
    concept = report["concept"]
    lines = [
        f"# Erasing \"{concept}\" from the world model",
        "",
        f"The bundled mini model (Stable Diffusion 2 architecture, trained on a procedural world of shapes, colours "
        f"and styles) was shown {report['images']} example images of {concept} with their captions. Concept Unlearn "
        f"trained a text-encoder LoRA with the `{report['method']}` method"
        f"{' (then edited the UNet cross-attention keys/values in closed form)' if report.get('unet_kv_edit') else ''}"
        " to erase "
        f"{', '.join(repr(p) for p in report['erase_phrases'])} inside those captions (and their cross-overs), "
        f"keeping {len(report['keep'])} neighbours ({', '.join(report['keep'][:4])}, ...). "
        "A classifier judges every generated image; kept prompts count only when every attribute they name survives.",
        "",
        "| prompts | showing what was asked, before | after |",
        "|---|---|---|",
        f"| the erased phrasings | {_percent(report['acc_erased_before'])} | {_percent(report['acc_erased'])} (want 0 %) |",
        f"| a phrasing not used in training ({report['held_out_phrase']!r}) | {_percent(report['acc_synonyms_before'])} "
        f"| {_percent(report['acc_synonyms'])} (want 0 %) |",
        f"| an unusual form (a comma before the style) | {_percent(report['acc_unusual_before'])} "
        f"| {_percent(report['acc_unusual'])} (want 0 %) |",
        f"| other concepts | {_percent(report['acc_others_before'])} | {_percent(report['acc_others'])} (want unchanged) |",
        f"| close relatives (same other attributes, another {world.CONCEPT_KINDS[concept]}) "
        f"| {_percent(report['acc_related_before'])} "
        f"| {_percent(report['acc_related'])} (want unchanged) |",
        "",
        f"Re-learning attack: a fresh token ({report['attack_budget']['n_vectors']} vectors, "
        f"{report['attack_budget']['steps']} steps) learned on the erased model from the same images shows {concept} in "
        f"{_percent(report['ti_attack_recovery'])} of its images (lower is more robust). For reference, the same kind "
        f"of token learned on the clean model shows it in {_percent(report['ti_token_clean'])}: a low attack number "
        f"means most when this one is high.",
        "",
        f"Erasing took {report['seconds']:.1f} s ({report['unet_calls']} UNet calls) on this machine.",
        "",
        "One concept, one seed, 8 prompts per row: `bench/RESULTS.md` has the suite over every concept with "
        "intervals, failures included (`--concept NAME` runs this demo on another one).",
        "",
        "![before and after](report.grid.png)",
        "",
        "![loss curve](report.loss.png)",
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def quiet_libraries() -> None:
    """A newcomer reads the report, not the libraries' loading bars and deprecation notes."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.simplefilter("ignore", FutureWarning)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="stripes", help=f"one of: {', '.join(world.CONCEPT_KINDS)}")
    parser.add_argument("--method", default="contextual", choices=evaluate.METHODS)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"erasing {args.concept!r} from the bundled world model with 4 example images ...")
    sets = evaluate.default_prompt_sets(args.concept, per_set=8, seed=0)
    report, result, generated, sets = evaluate.evaluate(args.concept, args.method, 4, sets,
                                                         log=lambda message: print(f"  {message} ...", flush=True))
    report["total_seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    evaluate.save_pictures(out / "report.json", result, generated, sets, f"erase {args.concept} ({args.method})")
    path = write_report(out, report)
    print(path.read_text())
    print(f"done in {report['total_seconds']:.0f} s: open {path} (pictures beside it)")


if __name__ == "__main__":
    main()
