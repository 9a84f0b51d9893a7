"""Which features combine with which teacher signal: one table, read off each kind's declared `Requirements`.

Torch-free, so the config checks it when it loads (`config_refusals`, every problem at once), the distill stage
when it finds a student with its own tokenizer (`two_vocabulary_refusals`), and `teachers.choose` when it picks the
source (`teachers.rules`). Each kind of teacher signal declares its requirements here (`DECLARED`, which the
classes of `alambic.teachers` take as theirs); each feature is one `Row`: when the config turns it on, what it
needs of the source, and the refusal for each kind that does not offer it, naming both and the way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Requirements:
    """What a kind of teacher signal needs from the run, and what it offers the other features.

    Attributes:
        shared_vocabulary: compares the logits id by id: student and teacher need one tokenizer.
        one_row_per_sequence: one logit row per sequence (a classifier's (B, C)), not one per token.
        live_hidden_states: runs the teacher on the student's own tokens, so its hidden states and attention are at
            hand (feature terms) and it can score any sequence (on-policy samples).
        several_teachers: can combine more teachers (`additional_teachers`) with the first.
        logits: its signal is the teacher's logits (an offline cache keeps log-probs only).
        columns: the batch keys it reads besides input_ids, attention_mask and labels (its collator adds them).
    """

    shared_vocabulary: bool
    one_row_per_sequence: bool
    live_hidden_states: bool
    several_teachers: bool
    logits: bool = True
    columns: tuple[str, ...] = ()

    @property
    def next_token_rows(self) -> bool:
        """One logit row per token: what a next-token cache or the teacher's next-token entropy is made of."""
        return not self.one_row_per_sequence


LIVE, CACHED, CROSS, CLASSIFIER, PLAIN = (
    "live teacher",
    "offline teacher cache",
    "teacher with another tokenizer",
    "classifier teacher",
    "no teacher",
)

# Each kind's declaration (its class in alambic.teachers adds the batch columns its collator brings).
DECLARED: dict[str, Requirements] = {
    LIVE: Requirements(
        shared_vocabulary=True, one_row_per_sequence=False, live_hidden_states=True, several_teachers=True
    ),
    CACHED: Requirements(
        shared_vocabulary=True,
        one_row_per_sequence=False,
        live_hidden_states=False,
        several_teachers=False,
        logits=False,
    ),
    CROSS: Requirements(
        shared_vocabulary=False, one_row_per_sequence=False, live_hidden_states=False, several_teachers=False
    ),
    CLASSIFIER: Requirements(
        shared_vocabulary=True, one_row_per_sequence=True, live_hidden_states=False, several_teachers=False
    ),
    PLAIN: Requirements(
        shared_vocabulary=False, one_row_per_sequence=False, live_hidden_states=False, several_teachers=False
    ),
}


@dataclass(frozen=True)
class Row:
    """One feature of the table.

    Attributes:
        feature: as the refusals name it.
        on: whether a config turns it on (reads `config.loss`, `.data`, `.additional_teachers`, `.training`).
        needs: the field (or property) of `Requirements` the source must offer; None: needs nothing of the source.
        one_vocabulary: compares student and teacher token by token, so a student with its own tokenizer cannot
            have it (ULD, or response distillation at alpha 0).
        refusals: the config's refusal for each kind that does not offer `needs` (naming both and the way round).
        sections: the config sections `on` reads (`LossConfig` checks the rows that read the loss alone).
    """

    feature: str
    on: Callable[[Any], bool]
    needs: str | None
    one_vocabulary: bool
    refusals: dict[str, str] = field(default_factory=dict)
    sections: tuple[str, ...] = ("loss",)

    def serves(self, kind: str) -> bool:
        """Whether the kind of source `kind` offers what the feature needs."""
        return self.needs is None or bool(getattr(DECLARED[kind], self.needs))


ROWS: tuple[Row, ...] = (
    Row(
        "loss.features",
        lambda c: c.loss.features is not None,
        "live_hidden_states",
        True,
        {
            CACHED: "loss.features needs the live teacher's hidden states and attention, which data.teacher_cache does "
            "not keep: remove one of them",
            PLAIN: "loss.features needs the live teacher, which alpha = 0 (plain cross-entropy) does not load: raise "
            "loss.alpha above 0 or remove loss.features",
            CLASSIFIER: "loss.features (hidden states, attention) is not supported for classifiers: "
            "remove loss.features",
        },
    ),
    Row(
        "loss.on_policy",
        lambda c: c.loss.on_policy is not None,
        "live_hidden_states",
        True,
        {
            CACHED: "loss.on_policy has the live teacher score the student's fresh responses, which data.teacher_cache "
            "(written for the corpus sequences) cannot: remove one of them",
            PLAIN: "loss.on_policy has the teacher score the student's own responses, which alpha = 0 (plain "
            "cross-entropy, no teacher) would only imitate: raise loss.alpha above 0 (1 is GKD's objective) or "
            "remove loss.on_policy",
            CLASSIFIER: "loss.on_policy samples responses from a language model: task 'sequence_classification' has "
            "none; remove loss.on_policy",
        },
    ),
    Row(
        "data.teacher_cache",
        lambda c: c.data.teacher_cache is not None,
        "next_token_rows",
        True,
        {
            CLASSIFIER: "data.teacher_cache keeps next-token log-probs: a classifier's teacher runs live; remove "
            "data.teacher_cache",
        },
        sections=("data",),
    ),
    Row(
        "data.selection",
        lambda c: c.data.selection is not None,
        "next_token_rows",
        True,
        {
            CLASSIFIER: "data.selection ranks sequences by the teacher's next-token entropy, which a classifier "
            "does not give: remove data.selection",
        },
        sections=("data",),
    ),
    Row(
        "additional_teachers",
        lambda c: bool(c.additional_teachers),
        "several_teachers",
        True,
        {
            CACHED: "data.teacher_cache holds the top-k log-probs of `teacher` alone: several teachers cannot use it; "
            "remove data.teacher_cache or additional_teachers",
            PLAIN: "additional_teachers weigh the soft loss, which loss.alpha = 0 (plain cross-entropy) does not "
            "compute: raise loss.alpha above 0 or remove additional_teachers",
            CLASSIFIER: "additional_teachers (teacher ensembles) are not supported for classifiers: remove them",
        },
        sections=("additional_teachers",),
    ),
    # at alpha 0 with another tokenizer the responses are the whole signal (response distillation): no logits
    Row(
        "data.teacher_responses with loss.alpha > 0",
        lambda c: c.loss.alpha > 0 and c.data.teacher_responses is not None,
        None,
        True,
        sections=("loss", "data"),
    ),
    Row(
        "training.packing: padding_free",
        lambda c: c.loss.alpha > 0 and c.training.packing == "padding_free",
        None,
        True,
        sections=("loss", "training"),
    ),
    Row(
        "loss.divergence: logit_mse",
        lambda c: c.loss.divergence == "logit_mse",
        "logits",
        False,
        {
            CACHED: "data.teacher_cache keeps log-probs, not logits: logit_mse cannot use it; choose another "
            "loss.divergence or remove data.teacher_cache",
        },
    ),
)

# Every refusal the table derives has its words (tests/test_teacher_sources.py checks it both ways).
for _row in ROWS:
    _refused = {kind for kind in DECLARED if kind != CROSS and not _row.serves(kind)}
    if _refused != set(_row.refusals):
        raise RuntimeError(
            f"{_row.feature}: the kinds it refuses {sorted(_refused)} and the refusals written "
            f"{sorted(_row.refusals)} differ: write the missing refusal"
        )


def kinds_of(config: Any) -> list[str]:
    """The kinds of teacher signal a run config declares, before any model is loaded (the teacher with another
    tokenizer shows only when the tokenizers are compared: `two_vocabulary_refusals`)."""
    kinds = []
    if config.task != "causal_lm":
        kinds.append(CLASSIFIER)
    if config.data.teacher_cache is not None:
        kinds.append(CACHED)
    if config.loss.alpha == 0:
        kinds.append(PLAIN)
    return kinds or [LIVE]


def config_refusals(config: Any, kinds: list[str] | None = None, sections: set[str] | None = None) -> list[str]:
    """Each refusal of a feature `config` turns on that one of its kinds of source does not serve.

    Args:
        kinds: the kinds to check against; default `kinds_of(config)`.
        sections: only the rows that read these config sections alone (`LossConfig` checks {'loss'}).
    """
    problems = []
    for row in ROWS:
        if sections is not None and not set(row.sections) <= sections:
            continue
        if not row.on(config):
            continue
        problems += [
            row.refusals[kind]
            for kind in (kinds_of(config) if kinds is None else kinds)
            if kind in row.refusals and not row.serves(kind)
        ]
    return problems


def two_vocabulary_refusals(config: Any) -> list[str]:
    """The features `config` turns on that compare the models token by token, which a student with its own
    tokenizer cannot have (the teacher with another tokenizer declares no shared vocabulary)."""
    return [row.feature for row in ROWS if row.one_vocabulary and row.on(config)]


def combination_table() -> list[tuple[str, dict[str, bool]]]:
    """Each feature and, for each kind of source, whether it combines (docs/architecture.md shows it)."""
    return [
        (row.feature, {kind: row.serves(kind) and not (kind == CROSS and row.one_vocabulary) for kind in DECLARED})
        for row in ROWS
    ]
