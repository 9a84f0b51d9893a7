"""The report's record of how a run was scaled out: world size, engine, precision, peak memory per rank
(train_summary.json's `scale`), in report.md and report.html; an older train_summary without it shows nothing new."""

from __future__ import annotations

import json

from alambic.report.markdown import human_bytes
from alambic.report.render import write_report
from alambic.report.spec import scale_line, training_section

CONFIG = {
    "data": {"source": "bbc_news", "format": "text", "max_seq_len": 256},
    "training": {"max_steps": 60, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
}
TRAIN = {
    "global_step": 60,
    "tokens_per_step": 2048,
    "train_seconds": 700.0,
    "device": "cpu",
    "torch_threads": 1,
    "precision": "fp32",
}


def _scale(**changes) -> dict:
    scale = {
        "world_size": 2,
        "engine": "fsdp",
        "precision": "bf16",
        "peak_memory_bytes_per_rank": [3 * 2**30 + 2**29, 805 * 2**20],
        "memory_kind": "cuda max allocated",
    }
    return {**scale, **changes}


def test_human_bytes_picks_the_unit_a_reader_compares():
    assert [human_bytes(n) for n in (0, 512, 1536, 805 * 2**20, int(3.5 * 2**30), 2 * 2**40)] == [
        "0 B",
        "512 B",
        "1.50 KiB",
        "805 MiB",
        "3.50 GiB",
        "2.00 TiB",
    ]
    assert human_bytes(None) == "–"


def test_the_training_section_gives_world_size_engine_precision_and_each_ranks_peak():
    text = "\n".join(training_section(CONFIG, {**TRAIN, "scale": _scale()}, {}, None))
    assert (
        "- scale: 2 processes, FSDP, bf16; peak memory per rank (cuda max allocated): rank 0 3.50 GiB, rank 1 805 MiB"
    ) in text
    one = scale_line(
        {
            "world_size": 1,
            "engine": "single",
            "precision": "fp32",
            "peak_memory_bytes_per_rank": [123 * 2**20],
            "memory_kind": "process peak RSS",
        }
    )
    assert one == "- scale: 1 process, fp32; peak memory per rank (process peak RSS): rank 0 123 MiB"
    zero3 = scale_line(_scale(engine="deepspeed-zero3"))
    assert zero3.startswith("- scale: 2 processes, DeepSpeed ZeRO-3, bf16;")
    # a rank that could not measure its memory, and an engine alambic has no display name for: shown as recorded
    odd = scale_line(_scale(engine="megatron", peak_memory_bytes_per_rank=[2**30, None]))
    assert odd.startswith("- scale: 2 processes, megatron, bf16;") and odd.endswith("rank 0 1.00 GiB, rank 1 –")


def test_many_ranks_are_summarised_by_their_range_and_the_heaviest_rank():
    peaks = [10 * 2**30] * 16
    peaks[5] = 12 * 2**30
    peaks[9] = 9 * 2**30
    line = scale_line(_scale(world_size=16, engine="deepspeed", peak_memory_bytes_per_rank=peaks))
    assert line == (
        "- scale: 16 processes, DeepSpeed, bf16; peak memory per rank (cuda max allocated): "
        "9.00 GiB to 12.0 GiB over 16 ranks, the most on rank 5"
    )


def test_a_train_summary_without_scale_adds_nothing_and_does_not_fail():
    assert scale_line(None) is None and scale_line({}) is None
    assert not any("scale" in line for line in training_section(CONFIG, TRAIN, {}, None))
    assert not any("scale" in line for line in training_section(CONFIG, {}, {}, None))


def test_report_md_and_html_show_the_scale_of_the_run(fake_run):
    run = fake_run()
    assert "- scale:" not in write_report(run).read_text()  # make_run's train_summary has no `scale`
    summary = json.loads((run / "train_summary.json").read_text())
    (run / "train_summary.json").write_text(json.dumps({**summary, "scale": _scale(engine="ddp")}))
    markdown = write_report(run).read_text()
    line = "- scale: 2 processes, DDP, bf16; peak memory per rank (cuda max allocated): rank 0 3.50 GiB, rank 1 805 MiB"
    assert line in markdown
    assert markdown.index("## Training") < markdown.index(line)
    assert line.removeprefix("- ") in (run / "report.html").read_text()
