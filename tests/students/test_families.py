"""Pruning across the decoder families transformers ships: depth for every one, width where the rules apply.

Each family is built tiny and random; every student is saved and reloaded and must give the logits it gave
in memory. The lists below are what README's Pruning section promises.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alambic.config import FromTeacherConfig
from alambic.models import count_parameters
from alambic.students.build import build_from_teacher
from alambic.students.importance import (
    ImportanceError,
    calibration_batches,
    measure_importance,
)
from alambic.students.prune import KeepPlan, PruningError, planned_parameters
from helpers import tiny_model, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> extra config fields (a small head_dim where the family's default is 128 or 256, for speed)
SMALL_HEADS = {"head_dim": 8}
WIDTH_FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": SMALL_HEADS,
    "mistral": {},
    "gemma": SMALL_HEADS,
    "gemma2": SMALL_HEADS,
    "gemma3_text": SMALL_HEADS,
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "granite": {},
    "cohere": {},
    "cohere2": {},
    "stablelm": {},
    "helium": SMALL_HEADS,
    "exaone4": {},
    "seed_oss": SMALL_HEADS,
    "nemotron": {},
    "arcee": {},
    "starcoder2": {},
    "phi": {},
    "smollm3": {},
    "glm": SMALL_HEADS,
    "glm4": SMALL_HEADS,
    "ernie4_5": {},
    "hunyuan_v1_dense": SMALL_HEADS,
    "apertus": {},
    "bitnet": {},
}
# Depth only: fused q|k|v of a layout the width rules do not read, Conv1D (transposed) weights, experts.
DEPTH_ONLY_FAMILIES = {
    "gpt2": {},
    "gpt_neox": {},
    "falcon": {},
    "bloom": {},
    "gptj": {},
    "codegen": {},
    "mixtral": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}
# The norms each layer applies over the hidden channels, as the family names them (pre- and post-norms).
RESIDUAL_NORMS = {
    "llama": ["input_layernorm", "post_attention_layernorm"],
    "cohere": ["input_layernorm"],  # attention and MLP in parallel on one norm
    "olmo2": ["post_attention_layernorm", "post_feedforward_layernorm"],  # post-norms only
    "gemma2": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ],
    "phi": ["input_layernorm"],
}

IDS = torch.randint(4, 320, (2, 11), generator=torch.Generator().manual_seed(0))


def _teacher(family: str) -> torch.nn.Module:
    if family in ("gpt2", "gpt_neox", "falcon", "bloom", "gptj", "codegen"):
        torch.manual_seed(0)
        fields = {
            "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64),
            "gptj": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4),
            "codegen": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4),
            "bloom": dict(hidden_size=32, n_layer=4, n_head=4),
            "falcon": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4),
            "gpt_neox": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64),
        }[family]
        cfg = AutoConfig.for_model(family, vocab_size=320, pad_token_id=3, bos_token_id=1, eos_token_id=2, **fields)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    extra = {**WIDTH_FAMILIES, **DEPTH_ONLY_FAMILIES}[family]
    return tiny_model(family, tie=False, **extra)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    data = tiny_prepared(tmp_path_factory.mktemp("data"))
    return calibration_batches(data.train, num_sequences=4, batch_size=2, pad_token_id=3)


def _reloads_with_the_same_logits(student, folder):
    before = _logits(student)
    student.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=0)
    return reloaded


DEPTH_REQUESTS = {
    "every_other": (dict(layers="every_other"), [0, 2]),
    "explicit": (dict(layers=[1, 3]), [1, 3]),
    "skip_loss": (dict(layers="importance", num_layers=2, layer_importance="skip_loss"), None),
    "block_influence": (dict(layers="importance", num_layers=3, layer_importance="block_influence"), None),
}


@pytest.mark.parametrize("request_name", DEPTH_REQUESTS)
@pytest.mark.parametrize("family", [*WIDTH_FAMILIES, *DEPTH_ONLY_FAMILIES])
def test_depth_pruning_works_and_reloads_for_every_family(family, request_name, batches, tmp_path):
    fields, expected_layers = DEPTH_REQUESTS[request_name]
    teacher = _teacher(family)
    student, record = build_from_teacher(teacher, FromTeacherConfig(**fields), batches)
    assert student.config.num_hidden_layers == len(record["kept_layers"])
    if expected_layers is not None:
        assert record["kept_layers"] == expected_layers
    else:  # ranked by the measured metric: the kept layers are the best-scoring ones
        scores = record["importance"]["skip_loss_increase" if request_name == "skip_loss" else "block_influence"]
        best = sorted(range(4), key=lambda i: -scores[i])[: len(record["kept_layers"])]
        assert record["kept_layers"] == sorted(best)
    reloaded = _reloads_with_the_same_logits(student, tmp_path)
    assert reloaded.config.num_hidden_layers == len(record["kept_layers"])
    # the student's kept layers are the teacher's, copied: a student of every layer is the teacher itself
    if request_name == "every_other":
        everything, _ = build_from_teacher(teacher, FromTeacherConfig(layers=[0, 1, 2, 3]), None)
        torch.testing.assert_close(_logits(everything), _logits(teacher), rtol=0, atol=0)


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_width_pruning_works_and_reloads_for_every_width_family(family, batches, tmp_path):
    teacher = _teacher(family)
    cfg = FromTeacherConfig(
        layers=[0, 2], num_attention_heads=2, num_key_value_heads=1, intermediate_size=40, hidden_size=16
    )  # 16 / 2 heads = the teacher's head_dim, which some families derive
    student, record = build_from_teacher(teacher, cfg, batches)
    c = student.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size) == (
        2,
        2,
        1,
        40,
        16,
    )
    assert record["student_parameters"] == count_parameters(student)
    assert planned_parameters(teacher, KeepPlan(**record["plan"]))["total"] == count_parameters(student)["total"]
    assert len(record["importance"]["channel_activation"]) == 32
    _reloads_with_the_same_logits(student, tmp_path)


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_keeping_every_unit_of_a_width_family_is_the_teacher(family, batches):
    """Width slicing that keeps everything must not move a single weight, fused or not."""
    teacher = _teacher(family)
    c = teacher.config
    cfg = FromTeacherConfig(
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        intermediate_size=c.intermediate_size,
        hidden_size=c.hidden_size,
    )
    student, _ = build_from_teacher(teacher, cfg, batches)
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["phi3", "glm", "llama"])
def test_pruning_heads_and_neurons_equals_zeroing_them_in_the_teacher(family):
    """For fused q|k|v and gate|up (Phi-3) as for separate projections: the kept rows are the right ones."""
    from alambic.students.prune import apply_plan, model_dims

    teacher = _teacher(family)
    plan = KeepPlan(layers=[0, 1, 2, 3], heads=[[2, 3]] * 4, kv_heads=[[1]] * 4, neurons=[list(range(8, 48))] * 4)
    student = apply_plan(teacher, plan)
    masked = _teacher(family)
    for layer in masked.model.layers:
        o_proj = layer.self_attn.o_proj.weight
        o_proj.data[:, : 2 * model_dims(masked).head_dim] = 0  # query heads 0 and 1 contribute nothing
        down = layer.mlp.down_proj.weight
        down.data[:, :8] = 0
        down.data[:, 48:] = 0
    torch.testing.assert_close(_logits(student), _logits(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family,norms",
    [
        ("olmo2", {"self_attn.q_norm": "query_head", "self_attn.k_norm": "kv_head", "input_layernorm": None}),
        (
            "bitnet",
            {"self_attn.attn_sub_norm": "query_head", "mlp.ffn_sub_norm": "neuron", "input_layernorm": "channel"},
        ),
        ("qwen3", {"self_attn.q_norm": None, "self_attn.k_norm": None, "post_attention_layernorm": "channel"}),
    ],
)
def test_norms_inside_attention_and_mlp_are_cut_with_the_units_they_span(family, norms):
    """A norm over all heads' outputs (OLMo 2's q/k norms, BitNet's attn_sub_norm, 32 entries like the hidden
    size here) keeps the kept heads' entries, not the kept channels; one over head_dim (Qwen3) stays whole."""
    from alambic.students.prune import apply_plan, model_dims

    teacher = _teacher(family)
    d = model_dims(teacher)
    heads, groups, neurons, channels = [1, 3], [0, 1], list(range(8, 48)), list(range(1, 17))
    plan = KeepPlan(layers=[0, 2], heads=[heads] * 2, kv_heads=[groups] * 2, neurons=[neurons] * 2, channels=channels)
    student = apply_plan(teacher, plan)
    rows = {
        "query_head": [h * d.head_dim + i for h in heads for i in range(d.head_dim)],
        "kv_head": [g * d.head_dim + i for g in groups for i in range(d.head_dim)],
        "neuron": neurons,
        "channel": channels,
    }
    for path, unit in norms.items():
        if unit is None and family == "olmo2":  # OLMo 2 has post-norms only
            assert not hasattr(teacher.model.layers[2], path)
            continue
        kept = teacher.model.layers[2].get_submodule(path).weight
        kept = kept if unit is None else kept[rows[unit]]
        torch.testing.assert_close(student.model.layers[1].get_submodule(path).weight, kept, rtol=0, atol=0)


@pytest.mark.parametrize("family", RESIDUAL_NORMS)
def test_channel_importance_reads_the_norms_each_family_has(family, batches):
    teacher = _teacher(family)
    outputs = []
    norms = [getattr(layer, n) for layer in teacher.model.layers for n in RESIDUAL_NORMS[family]]
    final = getattr(teacher.model, "norm", None) or teacher.model.final_layernorm
    handles = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for m in [*norms, final]]
    expected = torch.zeros(32, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for b in batches:
            outputs.clear()
            teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            mask = torch.zeros_like(b["attention_mask"], dtype=torch.bool)
            real = b["attention_mask"].bool()
            mask[:, :-1] = (b["labels"][:, 1:] != -100) & real[:, 1:] & real[:, :-1]
            assert len(outputs) == len(norms) + 1
            expected += sum(o[mask].double().abs().sum(0) for o in outputs)
            n += int(mask.sum())
    for h in handles:
        h.remove()
    imp = measure_importance(teacher, batches, skip_loss=False, progress=False)
    torch.testing.assert_close(imp.channel_activation.double(), expected / n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", DEPTH_ONLY_FAMILIES)
def test_width_on_a_depth_only_family_names_the_family_and_the_config_field(family, batches):
    teacher = _teacher(family)
    model_type = teacher.config.model_type
    with pytest.raises(PruningError, match=rf"model_type '{model_type}'.*student\.from_teacher\.hidden_size") as e:
        build_from_teacher(teacher, FromTeacherConfig(layers=[0, 2], hidden_size=16), batches)
    assert "width=False" not in str(e.value) and "head_gradient" not in str(e.value)
    with pytest.raises(ImportanceError, match=rf"model_type '{model_type}'"):
        measure_importance(teacher, batches, skip_loss=False, progress=False)


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_a_width_budget_is_met_for_every_width_family(family, batches, tmp_path):
    teacher = _teacher(family)
    budget = int(count_parameters(teacher)["total"] * 0.7)
    student, record = build_from_teacher(
        teacher, FromTeacherConfig(target_parameters=budget, target_axis="width"), batches
    )
    assert record["student_parameters"]["total"] <= budget
    _reloads_with_the_same_logits(student, tmp_path)


def test_a_family_that_derives_head_dim_refuses_a_cut_that_would_change_it():
    """StableLM sizes heads as hidden_size / num_attention_heads: a cut that changes the ratio is refused by name."""
    teacher = _teacher("stablelm")
    with pytest.raises(
        PruningError,
        match=r"model_type 'stablelm'.*student\.from_teacher\.hidden_size 24 / "
        r"num_attention_heads 2 = 12.*head_dim 8.*e\.g\. 16",
    ):
        build_from_teacher(teacher, FromTeacherConfig(hidden_size=24, num_attention_heads=2), None)


@pytest.mark.parametrize("family", ["olmo2", "gpt2"])
def test_alambic_prune_by_importance_works_on_a_post_norm_and_a_conv1d_teacher(family, tmp_path):
    """The issue's own case, through the CLI: `layers: importance` on a saved OLMo 2 (and gpt2) teacher."""
    import yaml
    from typer.testing import CliRunner

    from alambic.cli import app
    from helpers import tiny_tokenizer, write_text_corpus

    teacher = tmp_path / "teacher"
    _teacher(family).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "fam",
                "output_dir": str(tmp_path / "runs"),
                "teacher": {"model": str(teacher), "device": "cpu"},
                "student": {"from_teacher": {"layers": "importance", "num_layers": 2, "calibration_sequences": 2}},
                "data": {"source": "files", "paths": [str(write_text_corpus(tmp_path / "corpus"))], "max_seq_len": 16},
            }
        )
    )
    result = CliRunner().invoke(app, ["prune", str(config)])
    assert result.exit_code == 0, result.output
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "fam" / "student")
    assert student.config.num_hidden_layers == 2 and student.config.model_type == family


@pytest.mark.parametrize("family", ["phi3", "phi", "olmo2", "gemma3_text", "starcoder2"])
def test_head_gradient_importance_reads_each_familys_attention_output(family, batches):
    teacher = _teacher(family)
    cfg = FromTeacherConfig(num_attention_heads=2, num_key_value_heads=1, head_importance="gradient")
    student, record = build_from_teacher(teacher, cfg, batches)
    grads = torch.tensor(record["importance"]["head_gradient"])
    assert grads.shape == (4, 4) and torch.isfinite(grads).all() and (grads > 0).any()
    assert student.config.num_attention_heads == 2


def test_a_norm_no_rule_slices_is_refused_naming_the_family_and_the_fields(monkeypatch):
    """A width cut that would leave a tensor the wrong size says which family, and how to prune it instead."""
    from alambic.students.prune import apply_plan

    teacher = _teacher("bitnet")
    monkeypatch.setattr("alambic.students.slicing._ATTENTION_PARENTS", ())  # attn_sub_norm where no rule looks
    with pytest.raises(
        PruningError,
        match=r"model_type 'bitnet'.*attn_sub_norm.*student\.from_teacher\.hidden_size "
        r"unset.*depth pruning",
    ):
        apply_plan(teacher, KeepPlan(layers=[0, 1], heads=[[0, 1]] * 2, channels=list(range(16))))
