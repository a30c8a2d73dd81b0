"""The benchmark suite: the harness on every concept of a split, pooled over seeds, one table and a summary.

    python -m bench.suite --method contextual --split test --jobs 2            # report
    python -m bench.suite --method contextual --split dev --set negative_guidance=0.5   # tune

Splits are fixed and balanced over kinds: tune settings on ``dev`` concepts, report on ``test`` concepts.
Each concept's counts are pooled over ``--seeds`` (different example images, prompts and attack seeds), and
every accuracy has its 95 % Wilson interval. Writes <out>/suite-<name>.json and <out>/suite-<name>.md.
``--from-file`` is passed to every run (bench.evaluate: the after sets from the adapter file loaded by diffusers),
and so are ``--prompt-attack`` (the prompt-search attack: a "prompt attack" column and summary entry) and
``--descriptive`` (prompts describing the concept without naming it, bench.descriptive: a "descriptive" column, "-" for
a concept with no description, and a summary entry over the concepts that have one).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import evaluate, world

SPLITS = {
    "dev": ("circle", "triangle", "cross", "ring", "red", "yellow", "purple", "plain", "dots"),
    "test": ("square", "star", "diamond", "hexagon", "green", "blue", "orange", "stripes", "sketch"),
}
SPLITS["all"] = SPLITS["dev"] + SPLITS["test"]
RATES = ("erased", "synonyms", "unusual", "others", "related", "ti_attack", "ti_token_clean")


def run_one(concept: str, seed: int, args, out: Path) -> dict:
    report = out / f"{concept}-{seed}.json"
    if args.reuse and report.is_file():
        return json.loads(report.read_text())
    command = [sys.executable, "-m", "bench.evaluate", "--concept", concept, "--method", args.method,
               "--per-set", str(args.per_set), "--seed", str(seed), "--cache", args.cache, "--out", str(report)]
    for option in ("steps", "attack_steps", "sample_steps"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    for item in args.set:
        command += ["--set", item]
    if args.from_file:
        command.append("--from-file")
    if getattr(args, "prompt_attack", False):
        command.append("--prompt-attack")
    if getattr(args, "descriptive", False):
        command.append("--descriptive")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"concept": concept, "seed": seed, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(report.read_text())


def pool(reports: list[dict]) -> dict:
    """One concept's reports (one per seed) pooled: counts added, intervals recomputed, costs averaged."""
    row = {"concept": reports[0]["concept"], "seeds": [r["seed"] for r in reports]}
    optional = tuple(name for name in ("prompt_attack", "prompt_attack_floor", "descriptive", "descriptive_before")
                     if all(name in r for r in reports))
    for name in RATES + optional + tuple(f"{n}_before" for n in ("erased", "synonyms", "unusual", "others", "related")):
        key = "ti_token_clean_ci" if name == "ti_token_clean" else name
        k, n = sum(r[key]["k"] for r in reports), sum(r[key]["n"] for r in reports)
        row[name] = evaluate.measured(k, n)
    for name in ("seconds", "unet_calls", "unet_samples"):
        row[name] = sum(r[name] for r in reports) / len(reports)
    row["others_drop"] = row["others_before"]["value"] - row["others"]["value"]
    row["related_drop"] = row["related_before"]["value"] - row["related"]["value"]
    row["h_o"] = evaluate.harmonic([1 - row["erased"]["value"], row["others"]["value"], 1 - row["synonyms"]["value"]])
    return row


def summary(rows: list[dict]) -> dict:
    def stat(values, worst):
        return {"mean": sum(values) / len(values), "worst": worst(values)}

    optional = {name: stat([r[name]["value"] for r in rows], max) for name in ("prompt_attack", "prompt_attack_floor")
                if all(name in r for r in rows)}
    described = [r["descriptive"]["value"] for r in rows if "descriptive" in r]  # concepts with a description
    if described:
        optional["descriptive"] = stat(described, max)
    return {
        "erased": stat([r["erased"]["value"] for r in rows], max),
        "synonyms": stat([r["synonyms"]["value"] for r in rows], max),
        "unusual": stat([r["unusual"]["value"] for r in rows], max),
        "others_drop": stat([r["others_drop"] for r in rows], max),
        "related_drop": stat([r["related_drop"] for r in rows], max),
        "ti_attack": stat([r["ti_attack"]["value"] for r in rows], max),
        "h_o": stat([r["h_o"] for r in rows], min),
        "unet_calls": stat([r["unet_calls"] for r in rows], max),
        "unet_samples": stat([r["unet_samples"] for r in rows], max),
        "seconds": stat([r["seconds"] for r in rows], max),
    } | optional


def _cell(m: dict, before: dict | None = None) -> str:
    low, high = m["ci95"]
    text = f"{100 * m['value']:.0f} [{100 * low:.0f}-{100 * high:.0f}]"
    return f"{100 * before['value']:.0f} → {text}" if before else text


def _floor(row: dict) -> str:
    return f" (floor {100 * row['prompt_attack_floor']['value']:.0f})" if "prompt_attack_floor" in row else ""


def table(rows: list[dict], summary_row: dict, title: str) -> str:
    prompt = "prompt_attack" in summary_row  # a column only when the runs had --prompt-attack
    described = "descriptive" in summary_row  # a column only when the runs had --descriptive (and a description)
    lines = [f"### {title}", "",
             "| concept | erased | held-out phrasing | unusual " + ("| descriptive " if described else "")
             + "| others kept | related kept | TI attack (clean) "
             + ("| prompt attack " if prompt else "") + "| h_o | UNet calls / samples | s |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if prompt else "") + ("---|" if described else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['concept']} | failed: {r['error']} |||||||||" + ("|" if prompt else "")
                         + ("|" if described else ""))
            continue
        descriptive = (f"| {_cell(r['descriptive'], r['descriptive_before'])} " if "descriptive" in r else "| - ") \
            if described else ""
        lines.append(
            f"| {r['concept']} | {_cell(r['erased'], r['erased_before'])} | {_cell(r['synonyms'], r['synonyms_before'])} "
            f"| {_cell(r['unusual'], r['unusual_before'])} {descriptive}"
            f"| {_cell(r['others'], r['others_before'])} "
            f"| {_cell(r['related'], r['related_before'])} | {_cell(r['ti_attack'])} ({100 * r['ti_token_clean']['value']:.0f}) "
            + (f"| {_cell(r['prompt_attack'])}{_floor(r)} " if prompt and "prompt_attack" in r else "| - " if prompt else "")
            + f"| {r['h_o']:.2f} | {r['unet_calls']:.0f} / {r['unet_samples']:.0f} | {r['seconds']:.1f} |")
    s = summary_row
    lines += ["", "Summary (mean / worst over concepts; accuracies in %, drops in points): "
              f"erased {100 * s['erased']['mean']:.1f} / {100 * s['erased']['worst']:.0f}, "
              f"held-out {100 * s['synonyms']['mean']:.1f} / {100 * s['synonyms']['worst']:.0f}, "
              f"unusual {100 * s['unusual']['mean']:.1f} / {100 * s['unusual']['worst']:.0f}, "
              + (f"descriptive {100 * s['descriptive']['mean']:.1f} / {100 * s['descriptive']['worst']:.0f}, "
                 if described else "") +
              f"others drop {100 * s['others_drop']['mean']:.1f} / {100 * s['others_drop']['worst']:.0f}, "
              f"related drop {100 * s['related_drop']['mean']:.1f} / {100 * s['related_drop']['worst']:.0f}, "
              f"TI attack {100 * s['ti_attack']['mean']:.1f} / {100 * s['ti_attack']['worst']:.0f}, "
              + (f"prompt attack {100 * s['prompt_attack']['mean']:.1f} / {100 * s['prompt_attack']['worst']:.0f}"
                 + (f" (random words on the clean model: {100 * s['prompt_attack_floor']['mean']:.1f} / "
                    f"{100 * s['prompt_attack_floor']['worst']:.0f})" if "prompt_attack_floor" in s else "") + ", "
                 if prompt else "")
              + f"h_o {s['h_o']['mean']:.2f} / {s['h_o']['worst']:.2f}, "
              f"UNet calls {s['unet_calls']['mean']:.0f} / {s['unet_calls']['worst']:.0f}, "
              f"seconds {s['seconds']['mean']:.1f} / {s['seconds']['worst']:.1f}"]
    return "\n".join(lines)


def code_version() -> str | None:
    """The commit the code was read from, "+changes" when the engine or the bench differ from it (every run of a
    suite imports the code as it is when it starts: a long suite started with changes, or edited meanwhile, may
    mix versions); None outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", str(here.parent / "unlearn_core"), str(here))
    return (commit + ("+changes" if changed else "")) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=evaluate.METHODS, default="contextual")
    parser.add_argument("--split", choices=tuple(SPLITS), default="dev")
    parser.add_argument("--concepts", nargs="+", help="a named subset instead of the split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-set", type=int, default=48)
    parser.add_argument("--steps", type=int, help="erase steps (default: the method's)")
    parser.add_argument("--attack-steps", type=int, help="re-learning attack steps (default: the harness's)")
    parser.add_argument("--sample-steps", type=int, help="sampler steps per image (default: the harness's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="an EraseConfig override passed to every run (see bench.evaluate --help)")
    parser.add_argument("--from-file", action="store_true",
                        help="after images from the adapter file loaded by diffusers (see bench.evaluate --help)")
    parser.add_argument("--prompt-attack", action="store_true",
                        help="also run the prompt-search attack in every run (see bench.evaluate --help)")
    parser.add_argument("--descriptive", action="store_true",
                        help="also measure descriptive prompts in every run (see bench.evaluate --help)")
    parser.add_argument("--name", help="name of this configuration in file names (default: method-split, "
                                       "-from-file added with --from-file)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", default="out/bench-cache")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reuse", action="store_true", help="keep per-run reports already in the run folder")
    args = parser.parse_args()
    concepts = args.concepts or SPLITS[args.split]
    unknown = [c for c in concepts if c not in world.CONCEPT_KINDS]
    if unknown:
        raise SystemExit(f"error: unknown concepts {unknown}; known: {', '.join(world.CONCEPT_KINDS)}")
    name = args.name or f"{args.method}-{args.split}" + ("-from-file" if args.from_file else "")
    out = Path(args.out)
    runs_dir = out / "runs" / name
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(c, s) for c in concepts for s in args.seeds]
    version = code_version()
    if version and version.endswith("+changes"):
        print("note: unlearn_core/ or bench/ has uncommitted changes; every run imports the code as it is when it "
              "starts (run long suites from a snapshot: git worktree add)", file=sys.stderr)
    with ThreadPoolExecutor(args.jobs) as executor:
        reports = list(executor.map(lambda cs: run_one(cs[0], cs[1], args, runs_dir), jobs))
    failed = [r for r in reports if "error" in r]
    rows = [pool([r for r in reports if r["concept"] == c and "error" not in r]) for c in concepts
            if any(r["concept"] == c and "error" not in r for r in reports)]
    rows += [{"concept": r["concept"], "error": r["error"]} for r in failed]
    ok = [r for r in rows if "error" not in r]
    result = {"method": args.method, "split": args.split, "concepts": list(concepts), "seeds": args.seeds,
              "per_set": args.per_set, "overrides": args.set, "steps": args.steps, "from_file": args.from_file,
              "prompt_attack": args.prompt_attack, "descriptive": args.descriptive, "code": version,
              "rows": rows, "summary": summary(ok) if ok else None}
    (out / f"suite-{name}.json").write_text(json.dumps(result, indent=1))
    text = table(rows, result["summary"], f"{name}: {len(ok)} concepts x {len(args.seeds)} seeds, "
                                          f"{args.per_set} prompts per set") if ok else "every run failed"
    (out / f"suite-{name}.md").write_text(text + "\n")
    print(text)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
