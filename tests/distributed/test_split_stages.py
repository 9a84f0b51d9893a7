"""The stages whose work splits across ranks (the teacher cache, the teacher's responses, held-out evaluation): two
gloo processes give what one process gives, file for file, and each rank did only its share of the work.

One torchrun launch runs all three parts (`split_worker.py`); the single-process reference runs them in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from sharded_launch import launch
from split_worker import GREEDY, run_parts

from alambic.evaluation.pareto import COST_GAINS
from helpers import NEWS, tiny_model, tiny_prepared, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

WORKER = Path(__file__).with_name("split_worker.py")
TIMEOUT = 480  # seconds: a hung collective fails the test, it never hangs CI


def write_chat(path: Path, rows: int, offset: int = 0) -> Path:
    """Chat rows of uneven lengths (batches pad, sequences count different numbers of tokens)."""
    lines = [
        {
            "prompt": f"Q{offset + i}: {NEWS[i % 6][: 8 + 4 * (i % 5)]}",
            "response": f"{NEWS[(i + 1) % 6][: 12 + 4 * (i % 7)]} {offset + i}.",
        }
        for i in range(rows)
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def make_inputs(folder: Path) -> Path:
    """What every rank reads: the cache's sequences, the prompts, and a run folder ready for the evaluate stage
    (prepared chat data, a given student and its distilled copy in final/), with its config."""
    from alambic.config import validate_config
    from alambic.data import prepare_datasets, save_prepared

    folder.mkdir(parents=True)
    # 12 sequences cut to different lengths: shards of 5, 5 and 2, batches of 3 (the last shard's only batch is
    # rank 0's alone)
    (folder / "tiny").mkdir()
    train = tiny_prepared(folder / "tiny", chat=True).train
    rows = []
    for i in range(len(train)):
        cut = len(train[i]["input_ids"]) - 5 * (i % 4)
        rows.append({key: train[i][key][:cut] for key in ("input_ids", "attention_mask", "labels")})
    (folder / "cache_rows.json").write_text(json.dumps(rows))
    prompts = [
        {"id": f"p{i}", "messages": [{"role": "user", "content": NEWS[i % 6][: 12 + 9 * i]}], "reference": "ok"}
        for i in range(7)
    ]
    (folder / "prompts.json").write_text(json.dumps(prompts))

    teacher, student = folder / "teacher", folder / "student"
    tiny_model(seed=1, tie=False).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    tiny_model(seed=2, num_layers=2, tie=False).save_pretrained(student)
    run = folder / "run"
    tiny_model(seed=3, num_layers=2, tie=False).save_pretrained(run / "final")
    config = {
        "name": "split",
        "output_dir": str(folder / "runs"),
        "teacher": {"model": str(teacher), "device": "cpu"},
        "student": {"model": str(student)},
        "data": {
            "source": "files",
            "format": "chat",
            "paths": [str(write_chat(folder / "chat.jsonl", 40))],
            "max_seq_len": 64,
            "validation_fraction": 0.25,
        },
        "evaluation": {
            "batch_size": 3,
            "ce_control": False,
            "cost": {"prompt_tokens": 4, "new_tokens": 2, "batch_size": 2, "warmup": 0, "repeats": 1},
            "generation": {"max_prompts": 7, "max_new_tokens": 4, "batch_size": 2},
            "datasets": {
                "extra": {
                    "source": "files",
                    "format": "chat",
                    "paths": [str(write_chat(folder / "extra.jsonl", 8, offset=100))],
                }
            },
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    save_prepared(prepare_datasets(validate_config(config).data, tiny_tokenizer()), run / "data")
    return folder


def launch_split(inputs: Path, out: Path, processes: int) -> None:
    launch(WORKER, [str(inputs), str(out)], processes, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(one process's outputs, two processes' outputs) of the same inputs."""
    root = tmp_path_factory.mktemp("split")
    inputs = make_inputs(root / "inputs")
    launch_split(inputs, root / "two", processes=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_parts(inputs, root / "one")
    finally:
        torch.set_num_threads(previous)
    return root / "one", root / "two"


def work(out: Path, rank: int) -> dict[str, int]:
    return json.loads((out / f"work{rank}.json").read_text())


def shard_contents(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_the_cache_two_ranks_write_is_the_single_process_cache(runs):
    one, two = runs
    names = sorted(p.name for p in (one / "cache").iterdir())
    assert names == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert sorted(p.name for p in (two / "cache").iterdir()) == names  # no leftover of a rank's own
    for name in names[1:]:
        (meta_one, tensors_one), (meta_two, tensors_two) = (shard_contents(run / "cache" / name) for run in runs)
        assert meta_two == meta_one, name
        assert tensors_two.keys() == tensors_one.keys()
        for key, tensor in tensors_one.items():
            assert tensors_two[key].dtype == tensor.dtype and torch.equal(tensors_two[key], tensor), f"{name}: {key}"
    manifests = [json.loads((run / "cache" / "manifest.json").read_text()) for run in runs]
    assert without(manifests[1], "created") == without(manifests[0], "created")  # fingerprint, key, totals, quality

    # each rank ran the teacher over its share only: 12 sequences, then the 5 of the removed shard on resume
    assert work(one, 0)["cache_sequences"] == 12 and work(one, 0)["cache_resumed_sequences"] == 5
    shares = [work(two, r) for r in (0, 1)]
    assert [s["cache_sequences"] for s in shares] == [3 + 3 + 2, 2 + 2]  # shards of batches (3 | 2), (3 | 2), (2 | -)
    assert [s["cache_resumed_sequences"] for s in shares] == [3, 2]


def test_greedy_responses_of_two_ranks_are_those_of_one_process(runs):
    one, two = runs
    for name in ("greedy/generations.jsonl", "sampled/generations.jsonl"):
        assert (two / name).read_text() == (one / name).read_text(), name  # same records, same order, written once
    summaries = [json.loads((run / "greedy" / "summary.json").read_text()) for run in runs]
    assert without(summaries[1], "seconds", "tokens_per_second") == without(
        summaries[0], "seconds", "tokens_per_second"
    )
    assert summaries[0]["responses"] == 7 and summaries[0]["settings"]["temperature"] == GREEDY["temperature"]
    assert len({json.loads(line)["response"] for line in (one / "greedy/generations.jsonl").open()}) > 1
    for arrow in ("greedy/train",):  # the tokenized training set, saved once
        assert sorted(p.name for p in (two / arrow).iterdir()) == sorted(p.name for p in (one / arrow).iterdir())
    # 7 greedy prompts in batches of 2 (4 batches: 2 each), 14 sampled items in batches of 3 (5 batches: 3 | 2)
    assert work(one, 0)["generate_prompts"] == 7 + 14
    assert [work(two, r)["generate_prompts"] for r in (0, 1)] == [4 + 9, 3 + 5]


MEASURED = ("timings", "seconds", "cost", "pareto_front", *COST_GAINS)  # times and memory, measured anew each run


def figures(record):
    """eval.json without what is measured anew each time: timings, the cost runs and what is derived from them."""
    if isinstance(record, dict):
        return {k: figures(v) for k, v in record.items() if k not in MEASURED}
    if isinstance(record, list):
        return [figures(v) for v in record]
    return record


def test_eval_json_of_two_ranks_has_the_single_process_figures(runs):
    one, two = runs
    evals = [json.loads((run / "run" / "eval.json").read_text()) for run in runs]
    assert figures(evals[1]) == figures(evals[0])
    student = evals[0]["models"]["student_distilled"]
    assert student["num_sequences"] == 10 and student["intervals"]["perplexity"][0] < student["perplexity"]
    assert evals[0]["datasets"]["extra"]["models"]["student_distilled"]["num_sequences"] == 8
    assert len(student["generation"]["examples"]) == 3
    # cost: measured for every model, on rank 0 alone (the device to itself)
    assert set(evals[1]["models"]) == {"teacher", "student_before", "student_distilled"}
    assert all(m["cost"]["latency_per_token_seconds"]["median"] > 0 for m in evals[1]["models"].values())
    assert [work(two, r)["cost_runs"] for r in (0, 1)] == [3, 0]

    # the held-out batches and the generation prompts were split, not repeated: 3 models x (10 + 8 sequences), and
    # 3 models x 7 prompts (batches of 2: 2 | 2 batches, the last of one prompt)
    assert work(one, 0)["evaluate_rows"] == 3 * (10 + 8) and work(one, 0)["evaluate_prompts"] == 3 * 7
    shares = [work(two, r) for r in (0, 1)]
    # batches of 3: the split's 4 (3, 3 | 3, 1), the extra set's 3 (3, 3 | 2)
    assert [s["evaluate_rows"] for s in shares] == [3 * (6 + 6), 3 * (4 + 2)]
    assert [s["evaluate_prompts"] for s in shares] == [3 * 4, 3 * 3]
