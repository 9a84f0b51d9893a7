"""The stages whose work splits across ranks, on tiny models, run alone or as one rank under torchrun (gloo):
the offline teacher cache, the teacher's responses and the evaluate stage.

Usage: `python split_worker.py INPUTS OUT` (INPUTS: the folder `test_split_stages.make_inputs` filled). Each part
writes its outputs under OUT (cache/, generations/, run/eval.json); every rank writes OUT/work{rank}.json, what it
computed itself, so that a test can tell work split from work repeated. `run_parts` is also called in-process for
the single-process reference.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from alambic import distributed  # noqa: E402
from helpers import tiny_model, tiny_tokenizer  # noqa: E402

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "num_samples": 1, "batch_size": 2, "filter_degenerate": False}
SAMPLED = {"max_new_tokens": 5, "temperature": 1.0, "num_samples": 2, "batch_size": 3, "seed": 1}


@contextlib.contextmanager
def patched(module, name: str, wrapper):
    """`module.name` replaced by `wrapper(original)` for the block (in-process runs leave nothing behind)."""
    original = getattr(module, name)
    setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def counting_rows(seen: list[int]):
    """A final_hidden_states wrapper that adds the rows of each batch it runs to `seen`."""

    def wrapper(original):
        def run(model, core, input_ids, *args, **kwargs):
            seen.append(int(input_ids.shape[0]))
            return original(model, core, input_ids, *args, **kwargs)

        return run

    return wrapper


def counting_prompts(seen: list[int]):
    """A generate_responses wrapper that adds the number of conversations of each call to `seen`."""

    def wrapper(original):
        def run(model, tokenizer, conversations, **kwargs):
            seen.append(len(conversations))
            return original(model, tokenizer, conversations, **kwargs)

        return run

    return wrapper


def cache_part(inputs: Path, out: Path) -> dict[str, int]:
    """The cache written whole, then again after its manifest and middle shard are removed (resume)."""
    import alambic.data.cache.write as write_module
    from alambic.data.cache import cache_fingerprint, write_teacher_cache

    rows = json.loads((inputs / "cache_rows.json").read_text())
    teacher, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    fingerprint = cache_fingerprint(tokenizer, rows, k=8, temperature=2.0, teacher_id="tiny-llama")

    def write() -> None:
        write_teacher_cache(
            teacher,
            rows,
            out / "cache",
            k=8,
            temperature=2.0,
            fingerprint=fingerprint,
            dtype="float16",
            batch_size=3,
            sequences_per_shard=5,
            progress=distributed.is_main(),
        )

    first, resumed = [], []
    with patched(write_module, "final_hidden_states", counting_rows(first)):
        write()
    if distributed.is_main():
        (out / "cache" / "manifest.json").unlink()
        (out / "cache" / "shard-00001.safetensors").unlink()
    distributed.barrier("test: cache cut")
    with patched(write_module, "final_hidden_states", counting_rows(resumed)):
        write()
    return {"cache_sequences": sum(first), "cache_resumed_sequences": sum(resumed)}


def generate_part(inputs: Path, out: Path) -> dict[str, int]:
    """Greedy responses through `write_response_set`, and sampled ones through `generate_teacher_responses`."""
    import alambic.decoding
    from alambic.config import TeacherResponsesConfig
    from alambic.data.generate import generate_teacher_responses, write_response_set

    prompts = json.loads((inputs / "prompts.json").read_text())
    model, tokenizer = tiny_model(tie=False), tiny_tokenizer()  # untied: a tied random model repeats its input
    seen: list[int] = []
    with patched(alambic.decoding, "generate_responses", counting_prompts(seen)):
        write_response_set(
            model,
            tokenizer,
            prompts,
            out / "greedy",
            settings=TeacherResponsesConfig(**GREEDY),
            teacher_id="tiny",
            max_seq_len=64,
        )
        generate_teacher_responses(
            model,
            tokenizer,
            prompts,
            out / "sampled" / "generations.jsonl",
            settings=TeacherResponsesConfig(**SAMPLED),
            teacher_id="tiny",
        )
    return {"generate_prompts": sum(seen)}


def evaluate_part(inputs: Path, out: Path) -> dict[str, int]:
    """The evaluate stage on a run folder holding the data and a distilled student (eval.json)."""
    import shutil

    import alambic.decoding
    import alambic.evaluation.cost
    import alambic.evaluation.quality as quality
    from alambic.config import load_config
    from alambic.pipeline import StageContext
    from alambic.stages import evaluate

    run = out / "run"
    if distributed.is_main():
        shutil.copytree(inputs / "run", run)
    distributed.barrier("test: run folder copied")
    config = load_config(inputs / "config.yaml")
    rows, prompts, costs = [], [], []

    def counting_calls(original):
        def run(*args, **kwargs):
            costs.append(1)
            return original(*args, **kwargs)

        return run

    with (
        patched(quality, "final_hidden_states", counting_rows(rows)),
        patched(alambic.decoding, "generate_responses", counting_prompts(prompts)),
        patched(alambic.evaluation.cost, "measure_cost", counting_calls),
    ):
        evaluate(config, StageContext(run_dir=run, resume=False))
    return {"evaluate_rows": sum(rows), "evaluate_prompts": sum(prompts), "cost_runs": sum(costs)}


PARTS = {"cache": cache_part, "generate": generate_part, "evaluate": evaluate_part}


def run_parts(inputs: Path, out: Path) -> None:
    distributed.init()
    out.mkdir(parents=True, exist_ok=True)
    work = {}
    for part in PARTS.values():
        work.update(part(inputs, out))
    (out / f"work{distributed.rank()}.json").write_text(json.dumps(work))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_parts(Path(sys.argv[1]), Path(sys.argv[2]))
