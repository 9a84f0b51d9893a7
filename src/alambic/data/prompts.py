"""Held-out prompts for generation: one per held-out conversation that ends with an assistant turn.

A prompt is `{"id", "messages", "reference"}`: the conversation without its last message, and that last
(assistant) message's content, which the model's response is scored against (`evaluation.generation`).
They are built from the held-out documents only, so no prompt's reference was ever trained on.
`data.generate` builds the same prompts from the training documents, for the teacher to answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.jsonl"


def build_prompts(docs: list[dict[str, Any]], *, limit: int | None = None) -> list[dict[str, Any]]:
    """One prompt per conversation whose last message is a non-empty assistant turn, in document order.

    A conversation is skipped when its last message is not the assistant's (nothing to score against),
    when that message is blank (every response would score 0 against it), or when nothing precedes it
    (the model would answer an empty prompt).

    Args:
        docs: chat documents `{"id", "messages": [{"role", "content"}, ...]}` (`data.sources`).
        limit: keep the first `limit` prompts (deterministic, like `data.max_validation_sequences`); None: all.

    Returns:
        [{"id", "messages": messages[:-1], "reference": messages[-1]["content"]}]
    Raises:
        ValueError: limit < 1, or a document has no "messages" list (text documents have no prompts).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"build_prompts: limit = {limit} must be >= 1, or None for every prompt")
    prompts: list[dict[str, Any]] = []
    skipped = 0
    for doc in docs:
        messages = doc.get("messages")
        if not isinstance(messages, list):
            raise ValueError(
                f"document {doc.get('id')!r} has no 'messages' list: prompts are built from chat documents "
                "(data.format: chat)"
            )
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            skipped += 1
            continue
        prompts.append(
            {
                "id": doc["id"],
                "messages": [dict(m) for m in messages[:-1]],  # copies: callers may edit prompts, not the documents
                "reference": messages[-1]["content"],
            }
        )
        if limit is not None and len(prompts) == limit:
            break
    if skipped:
        logger.info(
            "%d conversation(s) give no prompt: not ending with a non-empty assistant turn "
            "after at least one other message",
            skipped,
        )
    return prompts


def write_prompts(prompts: list[dict[str, Any]], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is)."""
    lines = [json.dumps(p, ensure_ascii=False) for p in prompts]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read what `write_prompts` wrote; a missing file (data prepared before prompts existed) gives [].

    Raises:
        ValueError: a line is not a JSON prompt with "id", "messages" and "reference".
    """
    path = Path(path)
    if not path.exists():
        return []
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc}); re-run the data stage to rewrite it") from None
        missing = [k for k in ("id", "messages", "reference") if not isinstance(prompt, dict) or k not in prompt]
        if missing:
            raise ValueError(f"{path}, line {number}: prompt without {missing}; re-run the data stage to rewrite it")
        prompts.append(prompt)
    return prompts
