"""Tokens/s and peak memory per rank of distillation in 1..N processes: DDP and FSDP, on the quickstart's models.

Each (engine, process count) is one launch of `torch.distributed.run` (what `torchrun` runs), gloo on CPU and nccl
on CUDA, every rank timing its own steps and measuring its own memory:

  ddp   alambic's own training path (`alambic.training.run.train`: the DistillationTrainer, the live teacher
        source, the chunked loss, checkpoints off, the final export after the timed steps); under the launcher the
        Trainer wraps the student in DistributedDataParallel. One process: the plain single-device run.
  fsdp  FSDP2 applied directly (`fully_shard` as accelerate's FSDP2 does: every decoder layer, the final norm and
        head, the root), the teacher sharded by alambic's `training.shard_teacher` (`--teacher replicated` keeps a
        whole copy per rank), and alambic's own loss (`DistillationTrainer.compute_loss`: the live teacher, the
        chunked loss reading the sharded heads) in a plain loop (AdamW, clipping at 1.0). The Trainer's and
        accelerate's FSDP do not engage on CPU (design.md, "Scale-out facts"), so this is what FSDP means here.

Models: the quickstart's teacher (SmolLM2-135M-Instruct, fp32) and student (its 15 layers chosen by importance,
`runs/quickstart/student`, with the quickstart's tokenized BBC News in `runs/quickstart/data`). Without that run
folder the student is the teacher pruned to every other layer (15 of 30) and the data are tokenized here; the
output says which. `--tiny` is the CI smoke size (random 2- and 4-layer models, random tokens).

Batch: `--batch` sequences of `--seq` tokens per process and step, so N processes train on N x batch sequences a
step (the per-process work is constant; tokens/s counts every rank's tokens). Step time: the median wall time
between consecutive optimizer steps after `--warmup` steps. Memory per rank: on CUDA the allocator's peak
(`torch.cuda.max_memory_allocated`, reset once the models are placed); on CPU the peak resident set (RSS
high-water mark reset once the models are loaded, sharded and freed memory trimmed), which includes Python and
torch; "held" is the RSS once the models are loaded (and sharded), before the first step. "state" counts the
tensors each rank holds for the step: its parameters (student and teacher, its shard under FSDP), the student's
gradients and AdamW's moments, so FSDP's saving shows without allocator noise.

    python benchmarks/scale.py                                        # CPU: 1 and 2 processes, ddp and fsdp
    python benchmarks/scale.py --device cuda --procs 1,2,8            # GPUs (one process per GPU)
    python benchmarks/scale.py --tiny --steps 2 --warmup 1            # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "runs" / "quickstart"
TEACHER = "smollm2-135m-instruct"
ENGINES = ("ddp", "fsdp")


# --------------------------------------------------------------------------------------------------
# the driver: one launch per (engine, process count), then the table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_process(args: argparse.Namespace, processes: int) -> int:
    """The CPU's cores shared out between the processes (so 1 and 2 processes use the same cores), unless given."""
    if args.threads:
        return args.threads
    return max(1, (os.cpu_count() or 1) // processes) if args.device == "cpu" else 1


def launch(args: argparse.Namespace, engine: str, processes: int) -> dict[str, Any]:
    """Run one configuration under torch.distributed.run; its ranks' records, or the failure's last lines."""
    threads = threads_per_process(args, processes)
    with tempfile.TemporaryDirectory(prefix="alambic-scale-") as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "--engine",
            engine,
            "--out",
            out,
            "--threads",
            str(threads),
            *worker_options(args),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            output = f"timed out after {args.timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"), key=_rank_of)]
    record = {
        "engine": engine,
        "processes": processes,
        "threads_per_process": threads,
        "launch_seconds": round(time.perf_counter() - start, 1),
    }
    if code != 0 or len(ranks) != processes:
        tail = output if isinstance(output, str) else output.decode(errors="replace")
        return {**record, "status": "failed", "exit": code, "output_tail": tail[-3000:]}
    return {**record, "status": "ok", **summarise(ranks, args)}


def _rank_of(path: Path) -> int:
    return int(path.stem.removeprefix("rank"))


def worker_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--teacher",
        args.teacher,
        "--run-dir",
        str(args.run_dir),
    ]
    return options + (["--tiny"] if args.tiny else []) + (["--bf16"] if args.bf16 else [])


def summarise(ranks: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's figures from its ranks' records: the slowest rank sets the pace of a synchronous step."""
    step = max(statistics.median(r["step_seconds"][args.warmup :]) for r in ranks)
    tokens = sum(r["tokens_per_step"] for r in ranks)
    first = ranks[0]
    return {
        "step_seconds": round(step, 4),
        "tokens_per_step": tokens,
        "tokens_per_second": round(tokens / step, 1),
        "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
        "memory_kind": first["memory_kind"],
        "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
        "held_bytes_per_rank": [r["held_bytes"] for r in ranks],
        "losses_rank0": first["losses"],
        "models": first["models"],
        "precision": first["precision"],
        "ranks": ranks,
    }


def gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per configuration, then FSDP against DDP at each process count."""
    lines = [
        "| engine | processes | threads / process | step s | tokens/s | speed-up vs 1 process | "
        "held GiB per rank | peak GiB per rank | state GiB per rank |",
        "|" + "---|" * 9,
    ]
    single = {r["engine"]: r["tokens_per_second"] for r in results if r["status"] == "ok" and r["processes"] == 1}
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"| {r['engine']} | {r['processes']} | {r['threads_per_process']} | failed "
                f"(exit {r['exit']}) | | | | | |"
            )
            continue
        base = single.get(r["engine"])
        lines.append(
            f"| {r['engine']} | {r['processes']} | {r['threads_per_process']} | {r['step_seconds']:.3f} | "
            f"{r['tokens_per_second']:,.0f} | "
            + (f"{r['tokens_per_second'] / base:.2f}×" if base else "–")
            + " | "
            + ", ".join(gib(b) for b in r["held_bytes_per_rank"])
            + " | "
            + ", ".join(gib(b) for b in r["peak_bytes_per_rank"])
            + " | "
            + ", ".join(gib(b) for b in r["state_bytes_per_rank"])
            + " |"
        )
    savings = fsdp_savings(results)
    if savings:
        lines += [
            "",
            "| processes | FSDP ÷ DDP peak per rank (max over ranks) | FSDP ÷ DDP state per rank |",
            "|---|---|---|",
        ]
        lines += [f"| {n} | {s['peak_ratio']:.2f} | {s['state_ratio']:.2f} |" for n, s in savings.items()]
    return "\n".join(lines)


def fsdp_savings(results: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per process count: FSDP's per-rank peak and state over DDP's (the heaviest rank of each)."""
    ok = {(r["engine"], r["processes"]): r for r in results if r["status"] == "ok"}
    out = {}
    for (engine, n), fsdp in ok.items():
        ddp = ok.get(("ddp", n))
        if engine == "fsdp" and ddp:
            out[n] = {
                "peak_ratio": max(fsdp["peak_bytes_per_rank"]) / max(ddp["peak_bytes_per_rank"]),
                "state_ratio": max(fsdp["state_bytes_per_rank"]) / max(ddp["state_bytes_per_rank"]),
            }
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def driver(args: argparse.Namespace) -> int:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average_before": load_average(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(
        f"# {meta['date']} {meta['machine']['cpu']} ({meta['machine']['cores']} cores"
        + (f", {meta['machine']['gpus']} x {meta['machine']['gpu']}" if meta["machine"]["gpu"] else "")
        + f"), torch {meta['machine']['torch']}; load average {meta['load_average_before']}",
        flush=True,
    )
    results = []
    for engine in args.engines:
        for n in args.procs:
            print(f"# {engine}, {n} process{'es' if n > 1 else ''} ...", flush=True)
            result = launch(args, engine, n)
            results.append(result)
            if result["status"] != "ok":
                print(result["output_tail"], file=sys.stderr)
    meta["load_average_after"] = load_average()
    ok = next((r for r in results if r["status"] == "ok"), None)
    if ok:
        print(f"# models: {ok['models']}; {ok['precision']}; batch {args.batch} x {args.seq} tokens per process")
    print(table(results))
    print(f"# load average after: {meta['load_average_after']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({**meta, "results": results, "fsdp_savings": fsdp_savings(results)}, indent=1)
        )
    return 0 if all(r["status"] == "ok" for r in results) else 1


# --------------------------------------------------------------------------------------------------
# a rank: load, (shard,) time the steps, measure memory, write rankN.json


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc), so that the RSS high-water mark measured from here counts
    what the steps hold, not the blocks the loading and sharding freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets the RSS high-water mark (Linux >= 4.0)
            f.write("5")
    except OSError:
        pass


def memory_now(device) -> tuple[int, int, str]:
    """(bytes held now, peak since the last reset, what was measured)."""
    import resource

    import torch

    if device.type == "cuda":
        return (
            torch.cuda.memory_allocated(device),
            torch.cuda.max_memory_allocated(device),
            "cuda max_memory_allocated",
        )
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def state_bytes(student, teacher, optimizer) -> int:
    """Bytes of the tensors a rank holds for a step: parameters (its shard of a DTensor; a tied weight once), one
    gradient per trainable parameter, and the optimizer's state."""
    import torch

    seen: set[int] = set()

    def size(t) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    total = 0
    for model in (student, teacher):
        for p in model.parameters():
            total += size(p)
            if model is student and p.requires_grad:  # its gradient, freed by zero_grad before we look
                local = p.to_local() if hasattr(p, "to_local") else p
                total += local.numel() * local.element_size()
    for state in optimizer.state.values():
        total += sum(size(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def load_models(args: argparse.Namespace, device):
    """Teacher, student, tokenizer, the training sequences and a line saying where each came from."""
    import torch

    from alambic.config import FromTeacherConfig, ModelConfig
    from alambic.models import load_model, load_tokenizer
    from alambic.students.build import build_from_teacher

    tokenizer = load_tokenizer(ModelConfig(model=TEACHER))
    needed = (args.warmup + args.steps) * args.batch * int(os.environ.get("WORLD_SIZE", "1"))
    if args.tiny:  # random weights and tokens: the CI smoke size
        from transformers import AutoConfig, AutoModelForCausalLM

        # a 512-token vocabulary (the real tokenizer's first ids): the real 49,152 would make the loss the whole step
        config = AutoConfig.for_model(
            "llama",
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(config)
        student, _ = build_from_teacher(teacher, FromTeacherConfig(layers="every_other"), None)
        rows = torch.randint(0, 512, (needed, args.seq), generator=torch.Generator().manual_seed(0))
        sequences = [{"input_ids": r.tolist(), "attention_mask": [1] * args.seq, "labels": r.tolist()} for r in rows]
        described = "random tiny llama teacher (4 layers) and student (2 of them), random tokens"
        return teacher.to(device), student.to(device), tokenizer, sequences, described
    teacher = load_model(ModelConfig(model=TEACHER, dtype="float32", device=str(device)))
    if (args.run_dir / "student" / "config.json").is_file():
        student = load_model(ModelConfig(model=str(args.run_dir / "student"), dtype="float32", device=str(device)))
        described = f"the quickstart's pruned student ({args.run_dir / 'student'})"
    else:
        student, _ = build_from_teacher(teacher, FromTeacherConfig(layers="every_other"), None)
        student = student.to(device)
        described = "the teacher pruned to every other layer (no quickstart run folder)"
    described = f"teacher {TEACHER} (30 layers), student {described}, {student.config.num_hidden_layers} layers"
    sequences = training_sequences(args, tokenizer, needed)
    return teacher, student, tokenizer, sequences, described


def training_sequences(args: argparse.Namespace, tokenizer, needed: int) -> list[dict[str, list[int]]]:
    """The quickstart's tokenized BBC News (its run folder's, else tokenized here), `needed` sequences of --seq."""
    from alambic.data import load_prepared

    if (args.run_dir / "data" / "split.json").is_file():
        train = load_prepared(args.run_dir / "data").train
    else:
        from importlib import resources

        import yaml

        from alambic.config import DataConfig
        from alambic.data.prepare import prepare_datasets

        quickstart = yaml.safe_load(resources.files("alambic").joinpath("configs/quickstart.yaml").read_text())
        train = prepare_datasets(DataConfig(**quickstart["data"]), tokenizer).train
    if len(train) < needed or len(train[0]["input_ids"]) < args.seq:
        raise SystemExit(
            f"the data have {len(train)} sequences of {len(train[0]['input_ids'])} tokens; {needed} of "
            f"{args.seq} are needed (fewer --steps, --batch or --seq)"
        )
    return [{k: v[: args.seq] for k, v in row.items()} for row in train.select(range(needed))]


def run_ddp(args, teacher, student, tokenizer, sequences, out: Path) -> dict[str, Any]:
    """The product's own path: alambic.training.run.train, timed by a callback at every optimizer step."""
    import datasets
    from transformers import TrainerCallback

    from alambic.config import TrainingConfig
    from alambic.data import PreparedData
    from alambic.training.run import train

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.state = [], None

        def on_train_begin(self, a, state, control, **kwargs):
            self.ends.append(_clock(a.device))

        def on_step_end(self, a, state, control, model=None, optimizer=None, **kwargs):
            self.ends.append(_clock(a.device))
            if self.state is None:
                core = getattr(model, "module", model)
                self.state = state_bytes(core, teacher, optimizer)

    data = PreparedData(
        train=datasets.Dataset.from_list(sequences), validation=datasets.Dataset.from_list(sequences[:0])
    )
    training = TrainingConfig(
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=10**6,
        bf16=args.bf16,
        seed=0,
        trainer_args={"data_seed": 0},
    )
    clock = StepClock()
    summary = train(
        student,
        tokenizer,
        data,
        teacher=teacher,
        loss=_loss_config(),
        training=training,
        output_dir=out / "ddp_run",
        resume=False,
        callbacks=[clock],
    )
    losses = [r["loss"] for r in summary["log_history"] if "loss" in r]
    return {
        "step_seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
        "losses": losses,
        "state_bytes": clock.state,
        "precision": summary.get("precision"),
        "alambic_scale": summary.get("scale"),
    }


def shard_student(student) -> None:
    """accelerate's FSDP2 layout: each decoder layer a unit, the final norm and the head (with the input embeddings
    when tied) one unit kept whole after its forward, the root the rest."""
    from torch.distributed.fsdp import fully_shard

    for layer in student.model.layers:
        fully_shard(layer)
    tied = student.get_input_embeddings().weight is student.get_output_embeddings().weight
    fully_shard(
        [student.model.norm, *([student.model.embed_tokens] if tied else []), student.lm_head],
        reshard_after_forward=False,
    )
    fully_shard(student)


def run_fsdp(args, teacher, student, sequences, device, out: Path) -> dict[str, Any]:
    """FSDP2 by hand around alambic's own loss: the student sharded as accelerate shards it, the teacher sharded by
    `training.shard_teacher` (or a whole copy per rank), `DistillationTrainer.compute_loss` (the live teacher
    source, the chunked loss reading the heads through `alambic.sharding.through_heads`), then AdamW and clipping
    at 1.0 as the Trainer's step does."""
    import torch
    import torch.distributed as dist
    from transformers import TrainingArguments

    from alambic.sharding import is_sharded
    from alambic.training.trainer import DistillationTrainer

    if not dist.is_initialized():  # one process: FSDP still needs its (1-rank) group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    shard_student(student)
    training_args = TrainingArguments(
        str(out / f"fsdp_args{rank}"),
        use_cpu=device.type == "cpu",
        report_to=[],
        per_device_train_batch_size=args.batch,
        bf16=args.bf16,
    )
    trainer = DistillationTrainer(
        model=student.train(),
        args=training_args,
        teacher=teacher,
        loss_config=_loss_config(),
        shard_teacher=args.teacher == "sharded",
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    reset_peak_memory(device)
    held = memory_now(device)[0]
    ends, losses, state = [_clock(device)], [], None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for step in range(args.warmup + args.steps):
        start = (step * world + rank) * args.batch  # contiguous blocks: rank r takes the r-th of each step's batch
        rows = sequences[start : start + args.batch]
        batch = {
            k: torch.tensor([r[k] for r in rows], device=device) for k in ("input_ids", "attention_mask", "labels")
        }
        count = (batch["labels"][:, 1:] != -100).sum()
        dist.all_reduce(count)  # the global count of counted tokens divides the loss, as the Trainer gathers it
        with autocast:
            # scaled by the world size (FSDP averages the gradients over the ranks): the global batch's mean
            loss = trainer.compute_loss(student, batch, num_items_in_batch=count)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)  # each rank's share of the global mean, times the world size: the mean is the sum / N
        losses.append(round(float(total) / world, 6))
        ends.append(_clock(device))
        if state is None:
            state = state_bytes(student, teacher, optimizer)
    return {
        "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
        "losses": losses,
        "state_bytes": state,
        "precision": "bf16" if args.bf16 else "fp32",
        "held_bytes": held,
        "teacher_sharded": is_sharded(trainer.source.teacher_core),
    }


def _loss_config():
    from alambic.config import LossConfig

    # the quickstart's loss: forward KL at T = 1, no hard-label term, the chunked implementation
    return LossConfig(divergence="forward_kl", temperature=1.0, alpha=1.0, implementation="chunked")


def _clock(device) -> float:
    import torch

    if getattr(device, "type", device) == "cuda" or str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    import torch

    from alambic import distributed
    from alambic.utils import tune_allocator

    tune_allocator()  # as the alambic CLI does
    torch.set_num_threads(args.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if args.engine == "ddp":
        distributed.init()  # accelerate's state (gloo on CPU, nccl on GPU), which the Trainer then uses
    teacher, student, tokenizer, sequences, described = load_models(args, device)
    out = Path(args.out)
    if args.engine == "ddp":
        reset_peak_memory(device)
        held = memory_now(device)[0]
        record = {
            **run_ddp(args, teacher, student, tokenizer, sequences, out / f"rank{distributed.rank()}"),
            "held_bytes": held,
        }
    else:
        record = run_fsdp(args, teacher, student, sequences, device, out)
    _, peak, kind = memory_now(device)
    rank = int(os.environ.get("RANK", "0"))
    record.update(
        rank=rank,
        peak_bytes=peak,
        memory_kind=kind,
        models=described,
        threads=torch.get_num_threads(),
        tokens_per_step=args.batch * args.seq,
    )
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2,8 (one per GPU on CUDA)")
    p.add_argument("--engines", default="ddp,fsdp", help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch", type=int, default=4, help="sequences per process and step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (at most the data's 256)")
    p.add_argument(
        "--teacher",
        choices=("sharded", "replicated"),
        default="sharded",
        help="fsdp: shard the teacher like the student, or keep a whole copy on every rank",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / processes)")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR, help="the quickstart run folder (student and data)")
    p.add_argument("--tiny", action="store_true", help="random tiny models and tokens: the CI smoke size")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one launch")
    p.add_argument("--json", help="write every figure (per rank, per step) to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        args.procs = [int(n) for n in str(args.procs).split(",")]
        args.engines = [e for e in str(args.engines).split(",") if e]
        unknown = [e for e in args.engines if e not in ENGINES]
        if unknown:
            p.error(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
