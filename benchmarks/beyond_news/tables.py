"""The tables of benchmarks/beyond_news/README.md from a run's eval.json: quality against the teacher on the held-out
split and on each extra set (with intervals), the perplexity each model keeps per set, and lm-eval's tasks (with
lm-eval's standard errors and the share of the teacher's score kept).

Usage: python benchmarks/beyond_news/tables.py [RUN_FOLDER/eval.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alambic.report.datasets import kept_by_set, set_rows
from alambic.report.lm_eval import kept, score
from alambic.report.markdown import model_label, percent, table

QUALITY = ["model", "perplexity", "top-1 agree", "top-5 agree", "KL to teacher"]


def tables(ev: dict) -> list[str]:
    first = ev["models"]["teacher"]
    lines = [f"**BBC News held-out split** ({first['num_tokens']} tokens in {first['num_sequences']} sequences)", "",
             table(QUALITY, set_rows(ev["models"]))]
    for name, s in (ev.get("datasets") or {}).items():
        f = next(iter(s["models"].values()))
        lines += ["", f"**{name}** ({s['source']}, {s['format']}: {f['num_tokens']} tokens in {s['sequences']} sequences "
                  f"of {s['documents']} documents; documents shared with the training data: {s['overlap']['documents']})",
                  "", table(QUALITY, set_rows(s["models"]))]
    ppl, top1 = kept_by_set(ev), kept_by_set(ev, "top1_agreement")
    names = [n for n in ev["models"] if n != "teacher"]
    lines += ["", "**Perplexity kept (teacher ÷ model) and top-1 agreement with the teacher, per set**", "",
              table(["model", *(f"{s}: ppl kept" for s in ppl), *(f"{s}: top-1" for s in top1)],
                    [[model_label(n), *(percent(ppl[s][n]) for s in ppl), *(percent(top1[s][n]) for s in top1)]
                     for n in names])]
    bench = ev.get("lm_eval")
    if bench:
        rows = []
        for task in bench["tasks"]:
            for metric in bench["models"]["teacher"]["results"][task]:
                t = bench["models"]["teacher"]["results"][task][metric]
                cells = []
                for n in names:
                    m = bench["models"][n]["results"][task][metric]
                    cells.append(score(m) + (f" ({kept(m, t)})" if kept(m, t) else ""))
                rows.append([task, metric, score(t), *cells])
        samples = {t: (i.get("samples") or {}).get("effective") for t, i in bench["tasks"].items()}
        lines += ["", f"**lm-eval {bench['lm_eval_version']}** (examples per task: {samples}; score ± lm-eval's standard "
                  "error; (kept): model ÷ teacher)", "",
                  table(["task", "metric", "teacher", *(model_label(n) for n in names)], rows), "",
                  f"lm-eval time: {bench['seconds']:.0f} s ("
                  + ", ".join(f"{model_label(n)} {m['seconds']:.0f} s" for n, m in bench["models"].items()) + ")"]
    if ev.get("timings"):
        lines += ["", "evaluate stage, seconds per part: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in ev["timings"].items())]
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/eval.json")
    print("\n".join(tables(json.loads(path.read_text()))))
