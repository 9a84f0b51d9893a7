import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alambic.models import count_parameters
from alambic.students.prune import (
    KeepPlan,
    PruningError,
    Shape,
    apply_plan,
    keep_layers,
    layer_indices,
    plan_for_shape,
    planned_parameters,
    search_shape,
)
from helpers import TINY_ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        ("every_other", 5, [0, 2, 4]),
        ("first_half", 5, [0, 1, 2]),
        ("last_half", 4, [2, 3]),
        ([3, 0], 4, [0, 3]),
    ],
)
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


# ---- width + depth: plans, slicing, counting, search ------------------------------------------------------


def _gpt2():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt2", vocab_size=320, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _scores(model, seed=1):
    """Random importance scores of the right shapes, so the kept units are not simply the first ones."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        layer_scores=torch.rand(c.num_hidden_layers, generator=g).tolist(),
        head_scores=torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=g),
        neuron_scores=torch.rand(c.num_hidden_layers, c.intermediate_size, generator=g),
        channel_scores=torch.rand(c.hidden_size, generator=g),
    )


def _implied_parameters(config) -> int:
    """Slow twin of the counting rules: the parameter count a Llama/Qwen2/Mistral/Qwen3 config implies."""
    h, inter = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = h * (2 * q + 2 * kv)
    if config.model_type == "qwen2":
        attention += q + 2 * kv  # q/k/v biases
    if config.model_type == "qwen3":
        attention += 2 * d  # per-head q_norm, k_norm
    layer = attention + 3 * h * inter + 2 * h  # + input and post-attention norms
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * layer + h  # + final norm


# One Shape per slicing path; teacher: 4 layers, H=4 query heads in KV=2 groups, hidden 32, FFN 64.
PATHS = {
    "heads_per_group": (dict(), Shape(num_attention_heads=2), "per_group"),
    "kv_groups": (dict(), Shape(num_key_value_heads=1), "groups"),
    "mha_heads": (dict(kv_heads=4), Shape(num_attention_heads=2), "per_group"),
    "neurons": (dict(), Shape(intermediate_size=40), "per_group"),
    "channels": (dict(), Shape(hidden_size=24), "per_group"),
    "layers": (dict(), Shape(num_layers=2), "per_group"),
    "all": (
        dict(),
        Shape(num_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=40, hidden_size=24),
        "per_group",
    ),
}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_plan_keeping_everything_gives_bitwise_identical_logits(arch, tie):
    teacher = tiny_model(arch, tie=tie)
    c = teacher.config
    expected = _logits(teacher, IDS)
    everything = Shape(
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size
    )
    for plan in (KeepPlan(layers=list(range(4))), plan_for_shape(teacher, everything, **_scores(teacher))):
        torch.testing.assert_close(_logits(apply_plan(teacher, plan), IDS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_slicing_path_reloads_with_the_same_logits_and_planned_size(arch, path, tie, tmp_path):
    kwargs, shape, gqa = PATHS[path]
    teacher = tiny_model(arch, tie=tie, **kwargs)
    plan = plan_for_shape(teacher, shape, gqa=gqa, **_scores(teacher))
    student = apply_plan(teacher, plan)

    c = student.config
    assert (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) == 8  # the teacher's, always
    for field, value in shape.to_dict().items():
        if value is not None:
            assert getattr(c, "num_hidden_layers" if field == "num_layers" else field) == value, field
    assert teacher.config.hidden_size == 32 and teacher.config.num_hidden_layers == 4  # teacher untouched
    counted = count_parameters(student)
    planned = planned_parameters(teacher, plan)
    assert planned == {**counted, "embedding": counted["total"] - counted["non_embedding"]}
    assert planned["total"] == _implied_parameters(c)

    before = _logits(student, IDS)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, IDS), before, rtol=0, atol=0)
    if tie:
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_per_head_norms_are_left_whole_and_a_non_default_head_dim_is_kept(tmp_path):
    teacher = tiny_model("qwen3")  # q_norm/k_norm over head_dim; head_dim 128 != hidden 32 / 4 heads
    shape = PATHS["all"][1]
    plan = plan_for_shape(teacher, shape, **_scores(teacher))
    student = apply_plan(teacher, plan)
    assert student.config.head_dim == teacher.config.head_dim == 128
    assert (
        count_parameters(student)["total"]
        == planned_parameters(teacher, plan)["total"]
        == _implied_parameters(student.config)
    )
    before = _logits(student, IDS)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, IDS), before, rtol=0, atol=0)


def _masked_logits(teacher, module_name: str, masks: dict[int, torch.Tensor]):
    """Teacher logits with the inputs of `module_name` (o_proj or down_proj) zeroed where masks are 0."""
    handles = [
        teacher.model.layers[layer]
        .get_submodule(module_name)
        .register_forward_pre_hook(lambda _, args, mask=mask: (args[0] * mask,))
        for layer, mask in masks.items()
    ]
    try:
        return _logits(teacher, IDS)
    finally:
        for h in handles:
            h.remove()


def test_a_student_config_its_class_refuses_is_caught_before_slicing(tmp_path):
    # LlamaConfig wants hidden % heads == 0 (checked again by save_pretrained); Qwen2Config does not.
    with pytest.raises(PruningError, match=r"LlamaConfig refuses.*'num_attention_heads': 3.*not a multiple"):
        plan_for_shape(tiny_model("llama", kv_heads=4), Shape(num_attention_heads=3))
    teacher = tiny_model("qwen2", kv_heads=4)
    student = apply_plan(teacher, plan_for_shape(teacher, Shape(num_attention_heads=3), **_scores(teacher)))
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(student, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("path", ["heads_per_group", "kv_groups", "mha_heads"])
def test_pruning_heads_equals_masking_them_in_the_teacher(arch, path):
    kwargs, shape, gqa = PATHS[path]
    teacher = tiny_model(arch, **kwargs)
    plan = plan_for_shape(teacher, shape, gqa=gqa, **_scores(teacher))
    d = teacher.config.hidden_size // teacher.config.num_attention_heads
    masks = {}
    for layer, heads in zip(plan.layers, plan.heads):
        mask = torch.zeros(teacher.config.num_attention_heads, d)  # (H, d) -> (H*d,): the o_proj input columns
        mask[heads] = 1
        masks[layer] = mask.flatten()
    assert any(m.sum() < m.numel() for m in masks.values())
    masked = _masked_logits(teacher, "self_attn.o_proj", masks)
    torch.testing.assert_close(_logits(apply_plan(teacher, plan), IDS), masked)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pruning_neurons_equals_zeroing_them_in_the_teacher(arch):
    teacher = tiny_model(arch)
    plan = plan_for_shape(teacher, Shape(intermediate_size=24), **_scores(teacher))
    masks = {}
    for layer, neurons in zip(plan.layers, plan.neurons):
        masks[layer] = torch.zeros(teacher.config.intermediate_size)
        masks[layer][neurons] = 1
    torch.testing.assert_close(_logits(apply_plan(teacher, plan), IDS), _masked_logits(teacher, "mlp.down_proj", masks))


def test_plan_keeps_the_best_groups_then_the_best_heads_in_each():
    teacher = tiny_model("llama", heads=8, kv_heads=2)  # n_rep = 4: group 0 = heads 0-3, group 1 = heads 4-7
    head_scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0, 0.0, 0.0, 0.5]] * 4)  # group 1 sums higher
    per_group = plan_for_shape(teacher, Shape(num_attention_heads=2, num_key_value_heads=1), head_scores=head_scores)
    assert per_group.kv_heads == [[1]] * 4 and per_group.heads == [[4, 7]] * 4
    thinned = plan_for_shape(teacher, Shape(num_attention_heads=4), head_scores=head_scores)  # KV' defaults to 2
    assert thinned.kv_heads == [[0, 1]] * 4 and thinned.heads == [[2, 3, 4, 7]] * 4
    groups = plan_for_shape(teacher, Shape(num_key_value_heads=1), head_scores=head_scores, gqa="groups")
    assert groups.heads == [[4, 5, 6, 7]] * 4


def test_plan_keeps_the_top_layers_in_teacher_order_and_the_first_units_without_scores():
    teacher = tiny_model("llama")
    plan = plan_for_shape(
        teacher, Shape(num_layers=2, intermediate_size=3, hidden_size=8), layer_scores=[0.9, 0.1, 0.2, 1.0]
    )
    assert plan.layers == [0, 3]
    assert plan.neurons == [[0, 1, 2]] * 2 and plan.channels == list(range(8))
    assert plan.heads is None and plan.kv_heads is None
    assert plan.to_dict()["layers"] == [0, 3]


@pytest.mark.parametrize("arch", TINY_ARCHS + ("gpt2",))
def test_a_depth_only_plan_is_keep_layers(arch):
    teacher = _gpt2() if arch == "gpt2" else tiny_model(arch)
    by_plan = apply_plan(teacher, plan_for_shape(teacher, Shape(num_layers=2), layer_scores=[1, 0, 0, 1]))
    by_layers = keep_layers(teacher, [0, 3])
    assert by_plan.config.to_dict() == by_layers.config.to_dict()
    assert by_plan.state_dict().keys() == by_layers.state_dict().keys()
    for key, value in by_plan.state_dict().items():
        torch.testing.assert_close(value, by_layers.state_dict()[key], rtol=0, atol=0)
    counted = count_parameters(by_plan)
    assert planned_parameters(teacher, KeepPlan(layers=[0, 3])) == {
        **counted,
        "embedding": counted["total"] - counted["non_embedding"],
    }


@pytest.mark.parametrize(
    "shape,gqa,match",
    [
        (Shape(num_key_value_heads=3), "per_group", r"num_key_value_heads=3 > the teacher's 2"),
        (Shape(num_attention_heads=3, num_key_value_heads=2), "per_group", r"num_attention_heads=3 is not a multiple"),
        (Shape(num_attention_heads=6, num_key_value_heads=2), "per_group", r"3 per group, more than the teacher's 2"),
        (Shape(num_attention_heads=2, num_key_value_heads=2), "groups", r"gqa='groups'.*num_attention_heads=2 must be"),
        (Shape(num_attention_heads=1), "groups", r"keep at least 1"),
        (Shape(num_attention_heads=0), "per_group", r"keep at least 1"),
        (Shape(hidden_size=33), "per_group", r"hidden_size=33: keep between 1 and the teacher's 32"),
        (Shape(intermediate_size=0), "per_group", r"intermediate_size=0"),
        (Shape(num_layers=5), "per_group", r"num_layers=5: keep between 1 and the teacher's 4"),
    ],
)
def test_invalid_shapes_name_the_field_and_values(shape, gqa, match):
    with pytest.raises(PruningError, match=match):
        plan_for_shape(tiny_model("llama"), shape, gqa=gqa)


def test_invalid_scores_and_plans_are_refused():
    teacher = tiny_model("llama")
    with pytest.raises(PruningError, match=r"head_scores has shape \(4, 3\), expected \(4, 4\)"):
        plan_for_shape(teacher, Shape(num_attention_heads=2), head_scores=torch.rand(4, 3))
    with pytest.raises(PruningError, match=r"NaN"):
        plan_for_shape(teacher, Shape(hidden_size=8), channel_scores=torch.full((32,), float("nan")))
    # heads 0 and 1 are both in group 0, but group 1 is kept too
    with pytest.raises(PruningError, match=r"teacher layer 0: query heads \[0, 1\].*KV heads \[0, 1\]"):
        apply_plan(teacher, KeepPlan(layers=[0], heads=[[0, 1]], kv_heads=[[0, 1]]))
    with pytest.raises(PruningError, match=r"KeepPlan.neurons keeps \[2, 3\] units per layer"):
        planned_parameters(teacher, KeepPlan(layers=[0, 1], neurons=[[0, 1], [0, 1, 2]]))
    with pytest.raises(PruningError, match=r"KeepPlan.channels=\[3, 1\] must be strictly increasing"):
        apply_plan(teacher, KeepPlan(layers=[0], channels=[3, 1]))


def test_width_pruning_a_gpt2_names_the_module_and_points_to_depth():
    teacher = _gpt2()
    for attempt in (
        lambda: plan_for_shape(teacher, Shape(hidden_size=16)),
        lambda: apply_plan(teacher, KeepPlan(layers=[0, 1], channels=list(range(16)))),
        lambda: search_shape(teacher, 40_000, "width"),
    ):
        with pytest.raises(PruningError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\).*depth pruning"):
            attempt()


@pytest.mark.parametrize("arch", TINY_ARCHS + ("gpt2",))
def test_depth_search_keeps_the_most_layers_within_budget(arch):
    teacher = _gpt2() if arch == "gpt2" else tiny_model(arch, tie=False)
    sizes = [planned_parameters(teacher, KeepPlan(layers=list(range(k))))["total"] for k in range(1, 5)]
    target = (sizes[1] + sizes[2]) // 2
    shape = search_shape(teacher, target, "depth")
    assert shape == Shape(num_layers=2) == search_shape(teacher, target, "depth")
    assert search_shape(teacher, sizes[3], "depth") == Shape(num_layers=4)


@pytest.mark.parametrize("gqa", ["per_group", "groups"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_width_search_meets_the_budget_with_balanced_ratios(arch, gqa):
    teacher = tiny_model(arch, tie=False)
    full = count_parameters(teacher)["total"]
    target = int(full * 0.6)
    shape = search_shape(teacher, target, "width", gqa=gqa)
    assert shape == search_shape(teacher, target, "width", gqa=gqa)  # deterministic
    assert shape.num_layers is None and shape.hidden_size % 8 == 0 and shape.intermediate_size % 8 == 0
    student = apply_plan(teacher, plan_for_shape(teacher, shape, gqa=gqa, **_scores(teacher)))
    assert count_parameters(student)["total"] <= target
    ratios = [shape.hidden_size / 32, shape.intermediate_size / 64, shape.num_attention_heads / 4]
    assert min(ratios) >= 0.5  # balanced: no axis emptied to spare another


def test_width_search_refuses_unreachable_budgets():
    teacher = tiny_model("llama")
    with pytest.raises(PruningError, match=r"below the smallest width pruning reaches \([\d,]+\)"):
        search_shape(teacher, 100, "width")
    with pytest.raises(PruningError, match=r"exceeds the teacher's"):
        search_shape(teacher, 10**9, "width")


def test_width_search_is_fast_on_a_1_7b_config():
    import time

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=49152,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(cfg)
    start = time.perf_counter()
    shape = search_shape(teacher, 800_000_000, "width")
    assert time.perf_counter() - start < 1.0
    assert planned_parameters(teacher, plan_for_shape(teacher, shape))["total"] <= 800_000_000
    assert shape.hidden_size % shape.num_attention_heads == 0  # what LlamaConfig accepts


def test_kv_heads_alone_keep_all_their_query_heads_and_leave_the_teacher_as_it_was():
    teacher = tiny_model("mistral", heads=8, kv_heads=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plan = KeepPlan(layers=[0, 1, 2, 3], kv_heads=[[1]] * 4)
    student = apply_plan(teacher, plan)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (4, 1)
    q = teacher.model.layers[2].self_attn.q_proj.weight  # (H*d, hidden), d = 4: group 1 = heads 4..7 = rows 16..31
    torch.testing.assert_close(student.model.layers[2].self_attn.q_proj.weight, q[16:32], rtol=0, atol=0)
    assert planned_parameters(teacher, plan)["total"] == count_parameters(student)["total"]
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
