"""alambic's local lm-eval tasks: lm-eval custom-task YAML with local JSON data, written into the run folder from
documents the run never trained on, so they run offline (CI, this machine) through lm-eval's own task machinery.

- `alambic_bbc_topic`: which of BBC News's five topics an article is about, multiple choice scored by log-likelihood.
- `alambic_chatterbot_reply`: which of four replies answers a chatterbot question (the other three are replies to
  other questions), multiple choice scored by log-likelihood.

Why written at run time rather than shipped as fixed files: which documents are held out depends on the run's
data section (source, seed, validation_fraction, max_documents). A run that trains on BBC News gets the task built
from its own held-out articles (`split.json`'s validation_document_ids); a run on other data may use every article.
Either way no article whose text is among the run's training documents is kept: BBC News holds duplicate articles
under different file names, which an id check would miss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from alambic.config import ConfigError, DataConfig
from alambic.config.evaluation import LOCAL_LM_EVAL_TASKS
from alambic.data import load_documents
from alambic.evaluation.datasets import document_key

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the corpus's folder names
# The headline and the first paragraphs say the topic; whole articles (up to 4k tokens) would only slow the forwards.
ARTICLE_WORDS = 120
REPLY_CHOICES = 4
TASK_VERSION = 1.0  # bump when a prompt or the data selection changes: eval.json records it beside the scores


def held_out_documents(
    source: str, data: DataConfig, split: dict[str, Any], training_keys: set[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Documents of bundled corpus `source` ('bbc_news' or 'chatterbot') the run did not train on.

    When the run's own data is that corpus, only its held-out documents (`split["validation_document_ids"]`);
    in every case, none whose content is among `training_keys`. Returns (documents, a record of the selection).
    """
    docs = load_documents(DataConfig(source=source, format="chat" if source == "chatterbot" else "text"))
    record: dict[str, Any] = {"source": source, "documents_read": len(docs)}
    if data.source == source:
        held_out = set(split.get("validation_document_ids") or [])
        docs = [d for d in docs if d["id"] in held_out]
        record["from"] = "the run's held-out split"
    else:
        record["from"] = "the whole corpus (the run trained on other data)"
    kept = [d for d in docs if document_key(d) not in training_keys]
    record.update(same_text_as_training=len(docs) - len(kept), documents=len(kept))
    return kept, record


def bbc_topic_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One multiple-choice row per article: its first ARTICLE_WORDS words and its topic's index in BBC_TOPICS."""
    return [
        {"id": d["id"], "text": " ".join(d["text"].split()[:ARTICLE_WORDS]), "label": BBC_TOPICS.index(d["label"])}
        for d in docs
        if d.get("label") in BBC_TOPICS
    ]


def chatterbot_reply_rows(docs: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One row per distinct first question: its first reply among REPLY_CHOICES - 1 replies drawn (with `seed`) from
    other questions, in a seeded order, and the reply's index. The corpus asks some questions several times with
    different replies: none of a question's own replies is ever a wrong choice for it."""
    own: dict[str, set[str]] = {}
    for d in docs:
        own.setdefault(d["messages"][0]["content"], set()).add(d["messages"][1]["content"])
    replies = sorted({r for rs in own.values() for r in rs})
    rng = random.Random(seed)
    rows, seen = [], set()
    for d in docs:
        question, reply = d["messages"][0]["content"], d["messages"][1]["content"]
        if question in seen:
            continue
        seen.add(question)
        others = [r for r in replies if r not in own[question]]
        if len(others) < REPLY_CHOICES - 1:
            continue
        choices = [reply, *rng.sample(others, REPLY_CHOICES - 1)]
        rng.shuffle(choices)
        rows.append({"id": d["id"], "question": question, "choices": choices, "label": choices.index(reply)})
    return rows


def _task_yaml(name: str, data_file: Path, **fields: Any) -> dict[str, Any]:
    """An lm-eval custom task reading `data_file` (JSON lines) through `datasets`' json builder (no Hub)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        **fields,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": TASK_VERSION},
    }


def write_local_tasks(
    names: list[str], folder: Path, *, data: DataConfig, split: dict[str, Any], training_keys: set[str]
) -> dict[str, dict[str, Any]]:
    """Write each local task of `names` (those of LOCAL_LM_EVAL_TASKS) as `folder/<task>/<task>.yaml` + `.jsonl`.

    Returns {task: record of its documents}; `folder` is an lm-eval include_path (`lm_eval --include_path folder
    --tasks <task>` runs them outside alambic too).

    Raises:
        ConfigError: a task with no example left (every document was trained on).
    """
    records = {}
    for name in (n for n in names if n in LOCAL_LM_EVAL_TASKS):
        task_dir = folder / name
        task_dir.mkdir(parents=True, exist_ok=True)
        data_file = task_dir / f"{name}.jsonl"
        if name == "alambic_bbc_topic":
            docs, record = held_out_documents("bbc_news", data, split, training_keys)
            rows = bbc_topic_rows(docs)
            spec = _task_yaml(
                name,
                data_file,
                doc_to_text="{{text}}\n\nQuestion: Which topic is this BBC News "
                "article about: business, entertainment, politics, sports or tech?\nAnswer:",
                doc_to_choice=list(BBC_TOPICS),
                doc_to_target="label",
            )
        else:
            docs, record = held_out_documents("chatterbot", data, split, training_keys)
            rows = chatterbot_reply_rows(docs)
            spec = _task_yaml(
                name,
                data_file,
                doc_to_text="Question: {{question}}\nAnswer:",
                doc_to_choice="choices",
                doc_to_target="label",
            )
        random.Random(0).shuffle(rows)  # the corpus lists articles by topic: `limit` must take a mix, not one topic
        if not rows:
            raise ConfigError(
                f"evaluation.lm_eval.tasks: {name} has no example left: every {record['source']} "
                "document was trained on; remove it from the tasks"
            )
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        records[name] = {**record, "examples": len(rows), "folder": str(task_dir)}
    return records
