"""Run the harness over several concepts and methods and write the RESULTS.md table.

    python -m bench.results --concepts star circle red blue stripes sketch --methods paper weighted \
        --per-set 8 --jobs 2 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIELDS = ("acc_erased_before", "acc_erased", "acc_synonyms_before", "acc_synonyms", "acc_others_before", "acc_others",
          "acc_related_before", "acc_related", "ti_token_clean", "ti_attack_recovery", "h_o", "seconds",
          "unet_passes")


def run_one(concept: str, method: str, per_set: int, out: Path, reuse: bool = False) -> dict:
    report = out / f"{concept}-{method}.json"
    if reuse and report.is_file():
        return json.loads(report.read_text())
    command = [sys.executable, "-m", "bench.evaluate", "--concept", concept, "--method", method,
               "--per-set", str(per_set), "--out", str(report)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"concept": concept, "method": method, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(report.read_text())


def table(rows: list[dict]) -> str:
    header = "| concept | method | " + " | ".join(FIELDS) + " |"
    lines = [header, "|" + "---|" * (len(FIELDS) + 2)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['concept']} | {row['method']} | failed: {row['error']} |")
            continue
        cells = [f"{row[f]:.2f}" if isinstance(row[f], float) else str(row[f]) for f in FIELDS]
        lines.append(f"| {row['concept']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["star", "circle", "red", "blue", "stripes", "sketch"])
    parser.add_argument("--methods", nargs="+", default=["paper", "weighted"])
    parser.add_argument("--per-set", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reuse", action="store_true", help="keep reports already in --out instead of re-running")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(c, m) for c in args.concepts for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda cm: run_one(cm[0], cm[1], args.per_set, out, args.reuse), runs))
    (out / "table.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
