"""The ULD benchmark's student: SmolLM2-135M-Instruct pruned to 15 of its 30 layers by measured importance.

alambic prunes a student only from the run's own teacher (`student.from_teacher`); a student with another tokenizer
than the teacher's is given as `student.model`. This script makes that student as the quickstart's student stage
would (skip-loss importance on 8 BBC News training sequences of 128 tokens, split as the runs split them; few, for a
shared 2-core CPU), and saves
it where `uld.yaml` reads it: `python benchmarks/uld_gemma3/make_student.py [OUT]` (default runs/uld_gemma3_student).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from alambic.config import DataConfig, FromTeacherConfig, ModelConfig
from alambic.data import prepare_datasets
from alambic.models import load_model, load_tokenizer
from alambic.students.build import build_from_teacher
from alambic.students.importance import calibration_batches
from alambic.utils import native_bf16


def main(out: Path) -> None:
    started = time.perf_counter()
    source = ModelConfig(model="smollm2-135m-instruct", dtype="float32", device="cpu")
    teacher, tokenizer = load_model(source), load_tokenizer(source)
    # the quickstart's data section at 128 tokens: the ULD runs hold out the same documents (same seed)
    data = prepare_datasets(
        DataConfig(
            source="bbc_news", format="text", max_seq_len=128, validation_fraction=0.05, max_validation_sequences=64
        ),
        tokenizer,
    )
    cfg = FromTeacherConfig(layers="importance", num_layers=15, layer_importance="skip_loss", calibration_sequences=8)
    calibration = calibration_batches(data.train, num_sequences=8, batch_size=8, pad_token_id=tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16("cpu")):
        student, record = build_from_teacher(teacher, cfg, calibration)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / "pruning.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"student: layers {record.get('layers', record.get('kept_layers'))} -> {out} in {record['seconds']} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/uld_gemma3_student"))
