import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alambic.students.prune import PruningError, keep_layers, layer_indices
from helpers import TINY_ARCHS, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec,n,expected", [
    ("every_other", 5, [0, 2, 4]),
    ("first_half", 5, [0, 1, 2]),
    ("last_half", 4, [2, 3]),
    ([3, 0], 4, [0, 3]),
])
def test_layer_indices(spec, n, expected):
    assert layer_indices(spec, n) == expected


def test_layer_indices_out_of_range_names_them():
    with pytest.raises(PruningError, match=r"\[7\].*4 layers"):
        layer_indices([0, 7], 4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_keeping_every_layer_gives_the_same_logits(arch):
    teacher = tiny_model(arch)
    student = keep_layers(teacher, list(range(4)))
    torch.testing.assert_close(_logits(student, IDS), _logits(teacher, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS + ("gpt2",))
def test_student_copies_the_kept_layers_and_reloads(arch, tmp_path):
    if arch == "gpt2":
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=4, n_head=4, n_positions=64)
        teacher = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    else:
        teacher = tiny_model(arch)
    student = keep_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # teacher untouched
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        # layer 1 of the student is layer 3 of the teacher
        src = key.replace(".1.", ".3.", 1) if (".1." in key and any(p in key for p in ("layers.", ".h."))) else key
        torch.testing.assert_close(value, t_state[src], rtol=0, atol=0, msg=f"{key} <- {src}")
    before = _logits(student, IDS)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, IDS), before, rtol=0, atol=0)
    # the student generates with a KV cache (layer indices were renumbered)
    out = reloaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_tied_embeddings_stay_tied():
    student = keep_layers(tiny_model("llama", tie=True), [1])
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
