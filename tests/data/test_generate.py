"""alambic.data.generate: training prompts, resumable teacher generation, degenerate flags, the response set,
and `alambic generate`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from alambic.config import ConfigError, DataConfig, TeacherResponsesConfig, validate_config
from alambic.data.generate import (
    degenerate_flags,
    generate_teacher_responses,
    load_response_set,
    read_generations,
    repeated_ngram_share,
    response_conversations,
    tokenize_responses,
    training_prompts,
    write_response_set,
)
from alambic.data.sources import DataSourceError
from alambic.data.tokenize import IGNORE_INDEX, split_documents, tokenize_chat
from alambic.decoding import generate_responses, stop_token_ids
from helpers import NEWS, save_tiny_pair, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_ID = "tiny@None:None"
SETTINGS = TeacherResponsesConfig(max_new_tokens=6, temperature=1.0, num_samples=2, batch_size=3, seed=1)
PROMPTS = [
    {"id": f"p{i}", "messages": [{"role": "user", "content": NEWS[i % 6][: 12 + 9 * i]}], "reference": "ok"}
    for i in range(7)
]  # 7 prompts x 2 samples = 14 responses in batches of 3, 3, 3, 3, 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(tie=False)  # untied: a tied random model greedily repeats its input token


class Killed(Exception):
    pass


def _kill_after(batches: int):
    def on_batch(done: int) -> None:
        if done == batches:
            raise Killed

    return on_batch


def test_an_interrupted_generation_resumes_without_duplicates_and_as_if_never_stopped(model, tok, tmp_path):
    path = tmp_path / "a" / "generations.jsonl"
    with pytest.raises(Killed):
        generate_teacher_responses(
            model, tok, PROMPTS, path, settings=SETTINGS, teacher_id=TEACHER_ID, on_batch=_kill_after(2)
        )
    assert len(read_generations(path)) == 6  # two batches of 3 were flushed before the kill
    with path.open("a") as f:
        f.write('{"prompt_id": "p0", "sample": 1, "resp')  # a write torn by the crash
    assert len(read_generations(path)) == 6

    records, counts = generate_teacher_responses(model, tok, PROMPTS, path, settings=SETTINGS, teacher_id=TEACHER_ID)
    assert counts["resumed"] == 6 and counts["generated"] == 8 and counts["responses"] == 14
    on_disk = read_generations(path)
    keys = [(r["prompt_id"], r["sample"]) for r in on_disk]
    assert keys == [(p["id"], s) for p in PROMPTS for s in (0, 1)]  # every one, once, in prompt order
    assert on_disk == records

    uninterrupted, _ = generate_teacher_responses(
        model, tok, PROMPTS, tmp_path / "b.jsonl", settings=SETTINGS, teacher_id=TEACHER_ID
    )
    assert [r["response"] for r in uninterrupted] == [r["response"] for r in records]
    assert len({r["response"] for r in records}) > 1  # sampling at temperature 1 does vary


def test_records_carry_what_made_them_and_other_settings_are_generated_anew(model, tok, tmp_path):
    path = tmp_path / "generations.jsonl"
    records, _ = generate_teacher_responses(model, tok, PROMPTS[:3], path, settings=SETTINGS, teacher_id=TEACHER_ID)
    prompt_ids = {p["id"]: p for p in PROMPTS}
    for r in records:
        assert r["messages"] == prompt_ids[r["prompt_id"]]["messages"] and r["teacher"] == TEACHER_ID
        assert r["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "seed": 1}
        assert 1 <= r["response_tokens"] <= 6 and r["prompt_tokens"] > 0
        assert ("length" in r["flags"]) == (r["finish_reason"] == "length")
        assert ("empty" in r["flags"]) == (not r["response"].strip())
    cooler = SETTINGS.model_copy(update={"temperature": 0.5})
    _, counts = generate_teacher_responses(model, tok, PROMPTS[:3], path, settings=cooler, teacher_id=TEACHER_ID)
    assert counts["discarded"] == 6 and counts["generated"] == 6 and counts["resumed"] == 0
    assert all(r["sampling"]["temperature"] == 0.5 for r in read_generations(path))
    _, counts = generate_teacher_responses(model, tok, PROMPTS[:3], path, settings=cooler, teacher_id="other")
    assert counts["discarded"] == 6  # another teacher's answers are not this one's


def test_generate_responses_can_return_the_token_ids(model, tok):
    conversations = [p["messages"] for p in PROMPTS[:4]]
    plain = generate_responses(model, tok, conversations, max_new_tokens=5, batch_size=2, show_progress=False)
    full = generate_responses(model, tok, conversations, max_new_tokens=5, batch_size=2, with_tokens=True)
    stops = set(stop_token_ids(tok))
    for a, b, conversation in zip(plain, full, conversations):
        assert {k: b[k] for k in a} == a  # additive: the same responses
        assert len(b["token_ids"]) == b["num_tokens"]
        content = b["token_ids"][:-1] if b["finish_reason"] == "stop" else b["token_ids"]
        assert (b["token_ids"][-1] in stops) == (b["finish_reason"] == "stop")
        assert tok.decode(content, skip_special_tokens=True).strip() == b["response"]
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert b["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])


def test_repeated_ngram_share():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6, 7, 8], 2) == 0.0
    assert repeated_ngram_share([1, 2, 3, 4] * 8, 4) == pytest.approx(1 - 4 / 29)  # 29 4-grams, 4 distinct
    assert repeated_ngram_share([7] * 10, 1) == pytest.approx(0.9)
    assert repeated_ngram_share([1, 2, 3], 4) == 0.0 and repeated_ngram_share([1, 2, 3, 4], 4) == 0.0
    with pytest.raises(ValueError, match="n = 0"):
        repeated_ngram_share([1, 2], 0)


@pytest.mark.parametrize(
    "response, tokens, finish, expected",
    [
        ("A fine answer.", list(range(12)), "stop", []),
        ("   ", [], "stop", ["empty"]),
        ("cut off in the mid", list(range(12)), "length", ["length"]),
        ("la la la", [5, 6] * 10, "stop", ["repetition"]),
        ("", [5] * 10, "length", ["empty", "length", "repetition"]),
    ],
)
def test_degenerate_flags(response, tokens, finish, expected):
    assert degenerate_flags(response, tokens, finish, ngram=4, threshold=0.5) == expected


def _record(prompt_messages, response, flags=()):
    return {"prompt_id": "x", "sample": 0, "messages": prompt_messages, "response": response, "flags": list(flags)}


def test_only_the_teachers_response_is_counted(tok):
    """A multi-turn prompt holds the corpus's earlier assistant turn: context, not a target."""
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "Markets?"},
    ]
    response = "Markets rallied as the central bank held interest rates steady."
    docs = response_conversations([_record(prompt, response)], filter_degenerate=True)
    [sample] = tokenize_responses(docs, tok, max_seq_len=256)
    counted = [t for t in sample["labels"] if t != IGNORE_INDEX]
    assert tok.decode(counted) == response + "<|im_end|>"
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(sample["labels"], sample["input_ids"]))
    assert sample["input_ids"] == tokenize_chat(docs, tok, 256)[0]["input_ids"]  # the same rendering ...
    both = [t for t in tokenize_chat(docs, tok, 256)[0]["labels"] if t != IGNORE_INDEX]
    assert len(both) > len(counted)  # ... where the chat tokenization also counts the corpus's turn

    # a response that starts past max_seq_len has nothing to learn: dropped
    assert tokenize_responses(docs, tok, max_seq_len=10) == []


def test_degenerate_responses_are_filtered_only_when_asked(tok):
    prompt = [{"role": "user", "content": "Hi"}]
    records = [
        _record(prompt, "Hello there."),
        _record(prompt, "la la la la", ["repetition"]),
        _record(prompt, "", ["empty"]),
        _record(prompt, "cut", ["length"]),
    ]
    assert [d["messages"][-1]["content"] for d in response_conversations(records, filter_degenerate=True)] == [
        "Hello there."
    ]
    # unfiltered, an empty answer is still left out: it has no token to learn
    assert len(response_conversations(records, filter_degenerate=False)) == 3


def _chat_file(tmp_path, n=20):
    rows = [
        {
            "messages": [
                {"role": "user", "content": NEWS[i % 6][: 20 + i]},
                {"role": "assistant", "content": NEWS[(i + 1) % 6]},
            ]
        }
        for i in range(n)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_prompts_come_from_the_training_conversations_only(tmp_path):
    cfg = DataConfig(
        source="files",
        format="chat",
        paths=[_chat_file(tmp_path)],
        validation_fraction=0.25,
        teacher_responses={"max_prompts": 10},
    )
    from alambic.data.sources import load_documents

    train_docs, validation_docs = split_documents(load_documents(cfg), cfg)
    prompts = training_prompts(cfg)
    assert [p["id"] for p in prompts] == [d["id"] for d in train_docs][:10]
    assert not {p["id"] for p in prompts} & {d["id"] for d in validation_docs}
    assert prompts[0]["messages"] == train_docs[0]["messages"][:-1]
    with pytest.raises(DataSourceError, match="differ from those the data stage split"):
        training_prompts(cfg, {"train_ids_hash": "0123456789abcdef"})


def test_the_response_set_is_written_and_reloads_and_an_empty_one_is_refused(model, tok, tmp_path):
    summary = write_response_set(
        model,
        tok,
        PROMPTS,
        tmp_path / "g",
        settings=SETTINGS.model_copy(update={"filter_degenerate": False}),
        teacher_id=TEACHER_ID,
        max_seq_len=64,
    )
    dataset = load_response_set(tmp_path / "g")
    assert len(dataset) == summary["training_sequences"] > 0
    assert summary["counted_tokens"] == sum(sum(t != IGNORE_INDEX for t in row) for row in dataset["labels"])
    generations = read_generations(tmp_path / "g" / "generations.jsonl")
    assert summary["kept"] == sum(bool(r["response"].strip()) for r in generations)
    assert json.loads((tmp_path / "g" / "summary.json").read_text()) == summary

    # a 1-token cap: every answer is cut ("length") and, filtered, none is left
    with pytest.raises(DataSourceError, match="no teacher response is left to train on: 14 of 14 flagged"):
        write_response_set(
            model,
            tok,
            PROMPTS,
            tmp_path / "h",
            settings=SETTINGS.model_copy(update={"max_new_tokens": 1}),
            teacher_id=TEACHER_ID,
            max_seq_len=64,
        )


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"format": "text", "teacher_responses": {}},
            "data.teacher_responses answers chat prompts: set data.format: chat",
        ),
        ({"teacher_responses": {"num_samples": 3, "temperature": 0}}, "num_samples = 3 with temperature 0"),
        ({"teacher_responses": {"top_p": 0}}, "data.teacher_responses.top_p"),
        ({"teacher_responses": {}, "teacher_cache": {}}, "remove data.teacher_cache or data.teacher_responses"),
    ],
)
def test_contradictory_settings_are_refused_naming_the_fields(tmp_path, data, message):
    base = {"source": "files", "format": "chat", "paths": [str(_chat_file(tmp_path))]}
    with pytest.raises(ConfigError) as err:
        validate_config({"teacher": {"model": "x"}, "student": {"model": "y"}, "data": {**base, **data}})
    assert message in " ".join(str(err.value).split())


def test_teacher_responses_leave_the_data_stage_hash_alone(tmp_path):
    base = {
        "teacher": {"model": "x"},
        "student": {"model": "y"},
        "data": {"source": "files", "format": "chat", "paths": [str(_chat_file(tmp_path))]},
    }
    plain = validate_config(base)
    generating = validate_config({**base, "data": {**base["data"], "teacher_responses": {"temperature": 0.3}}})
    from alambic.stages import DATA_FIELDS

    assert plain.inputs_hash("teacher", *DATA_FIELDS) == generating.inputs_hash("teacher", *DATA_FIELDS)
    assert plain.inputs_hash("data.teacher_responses") != generating.inputs_hash("data.teacher_responses")


def test_alambic_generate_answers_the_training_prompts_without_building_the_student(tmp_path):
    from alambic.cli import app

    runner = CliRunner()
    assert "teacher answer" in " ".join(runner.invoke(app, ["generate", "--help"]).output.split())
    config = {
        "name": "gen",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {
            "source": "files",
            "format": "chat",
            "paths": [str(_chat_file(tmp_path, 12))],
            "max_seq_len": 64,
            "validation_fraction": 0.25,
            "teacher_responses": {"max_new_tokens": 4, "batch_size": 4, "filter_degenerate": False},
        },
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["generate", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "gen"
    assert len(read_generations(run / "generations" / "generations.jsonl")) == 9  # 12 conversations, 3 held out
    assert json.loads((run / "generations" / "summary.json").read_text())["prompts"] == 9
    assert set(json.loads((run / "manifest.json").read_text())["stages"]) == {"data", "generate"}
    assert not (run / "student").exists()

    del config["data"]["teacher_responses"]
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["generate", str(path)])
    assert result.exit_code == 2 and "no data.teacher_responses section" in " ".join(result.output.split())
