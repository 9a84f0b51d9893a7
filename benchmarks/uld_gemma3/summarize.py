"""Print the ULD-vs-CE table of a finished `uld.yaml` run: `python benchmarks/uld_gemma3/summarize.py [RUN_DIR]`.

Held-out perplexity per student token with its 95 % bootstrap interval (the same resampled sequences for every
model, so the intervals are paired), for the teacher (its own tokens, per student token), the pruned student before
training, the ULD + CE student and the CE-only control; and each stage's wall time from the run's manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {
    "teacher": "Gemma 3 270M teacher",
    "student_before": "student before training",
    "student_distilled": "ULD + CE (alpha 0.5)",
    "student_ce_control": "CE alone (control)",
}


def main(run: Path) -> None:
    results = json.loads((run / "eval.json").read_text())["models"]
    print("| model | held-out perplexity | 95 % interval | tokens |")
    print("|---|---|---|---|")
    for key, label in NAMES.items():
        if key in results:
            r = results[key]
            low, high = r["intervals"]["perplexity"]
            print(f"| {label} | {r['perplexity']:.2f} | {low:.2f} – {high:.2f} | {r['num_tokens']} |")
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest.get("stages", manifest)
    times = {name: s.get("seconds") or s.get("duration_s") for name, s in stages.items() if isinstance(s, dict)}
    print("\nstage wall times (s):", json.dumps(times))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/uld_gemma3"))
