"""The accelerate config files of examples/scale/accelerate/ read as `accelerate launch` reads them: a key it does not
know, a value its plugins refuse, or a precision set behind alambic's training.bf16 fails here, not on a GPU cluster.
(The run config beside them, examples/scale/quickstart.yaml, is one of the shipped examples tests/test_pipeline.py
runs.)"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

SCALE = Path(__file__).parents[1] / "examples" / "scale"
CONFIGS = sorted((SCALE / "accelerate").glob("*.yaml"))
NAMES = {
    "ddp": DistributedType.MULTI_GPU,
    "two_node_ddp": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "zero3": DistributedType.DEEPSPEED,
}


def _launch_args(path: Path):
    """The arguments `accelerate launch --config_file path -m alambic run ...` ends up with, the file's values
    merged in as the launcher merges them."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "alambic", "run", str(SCALE / "quickstart.yaml")]
    )
    args, defaults, precision_from_file = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_file else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


def _environment(path: Path) -> dict[str, str]:
    """The environment the launcher gives each process (what accelerate's plugins read)."""
    args = _launch_args(path)
    if args.use_deepspeed:
        pytest.importorskip("deepspeed")
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_the_four_engines_are_shipped():
    assert {p.stem: load_config_from_file(str(p)).distributed_type for p in CONFIGS} == NAMES


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_key_is_one_accelerate_knows(path):
    config = load_config_from_file(str(path))  # an unknown top-level key raises here
    assert isinstance(config, ClusterConfig)
    # Nested keys become launcher arguments (fsdp_config's with an fsdp_ prefix); one it does not know would be
    # set on the namespace and then silently never read.
    known = set(vars(launch_command_parser().parse_args(["x.py"])))
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert not [k for k in nested if k not in known], f"{path.name}: keys accelerate launch does not know"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_precision_is_left_to_alambic(path):
    """A launcher precision would turn autocast on where training.bf16 is false (the Trainer reads
    ACCELERATE_MIXED_PRECISION), and train_summary.json would record fp32 for a bf16 run."""
    assert _environment(path)["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_is_fsdp2_one_unit_per_decoder_layer_sharded_checkpoints():
    with mock.patch.dict(os.environ, _environment(SCALE / "accelerate" / "fsdp.yaml"), clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None  # from each model's _no_split_modules: any architecture
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.cpu_ram_efficient_loading is False


def test_zero3_partitions_and_takes_batch_accumulation_and_clipping_from_alambic():
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    with mock.patch.dict(os.environ, _environment(SCALE / "accelerate" / "zero3.yaml"), clear=True):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 3 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # 'auto': filled from TrainingArguments, so the run config is the one place they are set
    assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_two_node_ddp_places_two_machines_of_eight_at_the_main_address():
    args = _launch_args(SCALE / "accelerate" / "two_node_ddp.yaml")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 0)
    prepare_multi_gpu_env(args)
    assert args.nnodes == "2" and args.nproc_per_node == "8" and args.rdzv_endpoint == "10.0.0.1:29500"
    # the other machine: the same file, --machine_rank 1 on its command line
    other = launch_command_parser().parse_args(
        [
            "--config_file",
            str(SCALE / "accelerate" / "two_node_ddp.yaml"),
            "--machine_rank",
            "1",
            "-m",
            "alambic",
            "run",
            "x.yaml",
        ]
    )
    _validate_launch_command(other)
    assert other.machine_rank == 1


def test_the_readme_names_only_files_that_exist_and_every_config_it_ships():
    text = (SCALE / "README.md").read_text()
    named = set(re.findall(r"examples/scale/[\w/.-]+\.yaml", text))
    assert named and not [n for n in named if not (SCALE.parents[1] / n).is_file()]
    assert {f"examples/scale/accelerate/{p.name}" for p in CONFIGS} <= named
