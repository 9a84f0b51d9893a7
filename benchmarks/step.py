"""Tokens/s and peak memory of ONE distillation step, for alambic and the baselines it must beat.

One step = teacher forward + student forward/backward + AdamW step, on the same random-weight models and
the same batch for every method:

  naive      full (B, T, V) logits of both models, then alambic's reference `distillation_loss`
  alambic    the trainer's path: final hidden states, counted positions, `chunked_distillation_loss`
  trl        TRL's chunked divergence (`trl.trainer.distillation_trainer._chunked_divergence_loss`), if installed
  liger      Liger-Kernel's `LigerFusedLinearJSDLoss`, if installed and on CUDA
  sft_floor  teacher forward + a plain SFT step of the student: the floor no distillation step can beat

Every method runs in its own subprocess, so one method's allocator state, compiled kernels or peak cannot
leak into another's figures. Peak memory is `torch.cuda.max_memory_allocated` on CUDA and the peak RSS
(`ru_maxrss`, high-water mark reset once the models are built) on CPU; "step" memory is that peak minus
what was held before the first step (models, optimizer states, batch).

    python benchmarks/step.py --scale cpu --pair all            # CPU, real vocabularies, small models
    python benchmarks/step.py --scale cpu --vocab-sweep         # naive vs alambic as V grows
    python benchmarks/step.py --scale full --pair all           # GPU, the real model sizes (see README)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_MARK = "@@BENCH_RESULT "
ALL_METHODS = ("naive", "alambic", "trl", "liger", "sft_floor", "alambic_cache", "sft")
# The methods a plain `--methods` default runs: the live-teacher comparison. alambic_cache (training from top-k rows
# computed before the timed steps, as from `alambic cache`) compares with sft (the student's plain CE step, no teacher).
DEFAULT_METHODS = ("naive", "alambic", "trl", "liger", "sft_floor")
CACHE_K = 64
SWEEP_VOCABS = (32000, 65536, 131072, 151936, 262144)
# Dense bf16 tensor-core peak (no sparsity), by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

# --------------------------------------------------------------------------------------------------
# model pairs: the real shapes, and the smaller ones that fit a CPU (the vocabulary is kept: the logits
# are what a distillation step's memory and time are about)

_SMOLLM2 = {
    "model_type": "llama",
    "vocab_size": 49152,
    "full": (
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=8192,
        ),  # SmolLM2-1.7B
        dict(
            hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560
        ),  # SmolLM2-360M
    ),
    "cpu": (
        dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024
        ),
        dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1, intermediate_size=512),
    ),
}
_QWEN = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "full": (
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
        ),  # Qwen2.5-1.5B
        dict(
            hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
        ),  # Qwen2.5-0.5B
    ),
    "cpu": (
        dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024
        ),
        dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=512),
    ),
}
PAIRS = {"smollm2": _SMOLLM2, "qwen": _QWEN}
# CI-sized: seconds per method; vocab 4096 unless --vocab says otherwise.
TINY = (
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64),
)
# batch, seq, dtype, device, alambic's chunk: at every scale the batch's 8192 / 2048 / 64 tokens are 8 chunks,
# so the chunked path's memory is measured at the same tokens-to-chunk ratio as at full scale.
SCALE_DEFAULTS = {
    "full": (8, 1024, "bfloat16", "cuda", 1024),
    "cpu": (4, 512, "float32", "cpu", 256),
    "tiny": (2, 32, "float32", "cpu", 8),
}


@dataclass
class Spec:
    """Everything one method's subprocess needs; sent to it as JSON."""

    method: str
    pair: str
    scale: str
    vocab: int
    batch: int
    seq: int
    dtype: str
    device: str
    steps: int
    warmup: int
    divergence: str
    temperature: float
    alpha: float
    jsd_beta: float
    skew: float
    chunk_size: int | str
    lr: float
    seed: int
    threads: int | None = None
    auto_elements: int | None = None


@dataclass
class Result:
    method: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    step_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_bytes: int = 0
    base_bytes: int = 0
    step_bytes: int = 0
    mfu: float | None = None
    loss: float | None = None
    teacher_params: int = 0
    student_params: int = 0
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------------
# the child: build the models, run one method's steps, print one result line


def _model_configs(spec: Spec):
    from transformers import AutoConfig

    pair = PAIRS[spec.pair]
    shapes = TINY if spec.scale == "tiny" else pair[spec.scale]
    common = dict(vocab_size=spec.vocab, tie_word_embeddings=True, max_position_embeddings=max(spec.seq, 2048))
    return [AutoConfig.for_model(pair["model_type"], **common, **shape) for shape in shapes]


def _matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all of them but the embedding lookup (a tied
    embedding is the output head's matmul, so it counts once)."""
    n = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return n if head is emb else n - emb.numel()


def _init_adamw_state(opt) -> None:
    """Create AdamW's moment buffers now, as its first step would, so they are held before the first timed
    (and the first measured) step instead of appearing inside it."""
    import torch

    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _divergence_beta(spec: Spec) -> float | None:
    """The generalised-JSD β that TRL and Liger (same convention as alambic) use for this divergence."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": spec.jsd_beta}.get(spec.divergence)


class Skip(Exception):
    """The method cannot run here; the message says why."""


def _backbone_hidden(model, input_ids, attention_mask):
    """The backbone's last hidden states minus the last position, as TRL's and Liger's recipes take them."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[
        :, :-1
    ]


def _make_step(spec: Spec, teacher, student, input_ids, attention_mask, labels):
    """A closure that runs teacher forward + student forward/backward and returns the loss (detached)."""
    import torch

    method, temp = spec.method, spec.temperature

    if method == "naive":
        from alambic.losses import distillation_loss

        def step():
            with torch.inference_mode():
                t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            s_logits = student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            v = s_logits.shape[-1]
            # (B, T, V) -> (B*(T-1), V): position t predicts token t+1
            parts = distillation_loss(
                s_logits[:, :-1].reshape(-1, v),
                t_logits[:, :-1].reshape(-1, v),
                labels[:, 1:].reshape(-1),
                divergence=spec.divergence,
                temperature=temp,
                alpha=spec.alpha,
                jsd_beta=spec.jsd_beta,
                skew=spec.skew,
            )
            parts.total.backward()
            return parts.total.detach()

        return step

    if method == "alambic":
        try:
            from alambic.losses.chunked import OutputHead, chunked_distillation_loss
        except ImportError as e:
            raise Skip(f"alambic.losses.chunked not importable ({e})") from e
        from alambic.modeling import counted_positions, final_hidden_states

        def step():
            mask, targets = counted_positions(labels)  # (B, T-1), (N,)
            with torch.inference_mode():
                t_hidden = final_hidden_states(teacher, teacher, input_ids, attention_mask)[:, :-1][mask]
            t_hidden = t_hidden.clone()  # inference tensors cannot be saved for backward
            s_hidden = final_hidden_states(student, student, input_ids, attention_mask)[:, :-1][mask]  # (N, H_s)
            parts = chunked_distillation_loss(
                s_hidden,
                OutputHead.of(student),
                t_hidden,
                OutputHead.of(teacher),
                targets,
                divergence=spec.divergence,
                temperature=temp,
                alpha=spec.alpha,
                jsd_beta=spec.jsd_beta,
                skew=spec.skew,
                chunk_size=spec.chunk_size,
            )
            parts.total.backward()
            return parts.total.detach()

        return step

    if method == "trl":
        beta = _divergence_beta(spec)
        if beta is None:
            raise Skip(
                f"TRL's chunked loss is the generalised JSD family only (forward_kl, reverse_kl, jsd), "
                f"not {spec.divergence}"
            )
        if spec.alpha != 1.0:
            raise Skip(f"TRL's chunked loss has no hard-label term (alpha = {spec.alpha}; it needs alpha = 1)")
        try:
            from trl.trainer.distillation_trainer import _chunked_divergence_loss
        except ImportError as e:
            raise Skip(f"{type(e).__name__}: {e}") from e
        s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        completion_mask = labels[:, 1:] != -100  # (B, T-1)

        def step():
            # As TRL's DistillationTrainer._compute_loss: backbones' last hidden states minus the last
            # position (teacher under no_grad), then the chunked divergence over the heads' weights.
            with torch.no_grad():
                t_hidden = _backbone_hidden(teacher, input_ids, attention_mask)
            s_hidden = _backbone_hidden(student, input_ids, attention_mask)
            loss, _entropy, _n = _chunked_divergence_loss(
                s_hidden,
                t_hidden,
                s_head.weight,
                t_head.weight,
                completion_mask,
                beta,
                student_lm_head_bias=s_head.bias,
                teacher_lm_head_bias=t_head.bias,
                temperature=temp,
            )
            loss = loss * temp**2  # TRL leaves out the T² factor; scale it in so the losses compare
            loss.backward()
            return loss.detach()

        return step

    if method == "liger":
        beta = _divergence_beta(spec)
        if beta is None:
            raise Skip(f"Liger's fused linear JSD covers forward_kl, reverse_kl and jsd only, not {spec.divergence}")
        if input_ids.device.type != "cuda":
            raise Skip("needs CUDA (Liger-Kernel is a Triton library)")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as e:
            raise Skip(f"{type(e).__name__}: {e}") from e
        # Liger has no T² factor either: put it in the soft weight, so total = α·T²·soft + (1 − α)·hard.
        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0 - spec.alpha,
            weight_soft_loss=spec.alpha * temp**2,
            beta=beta,
            temperature=temp,
            compiled=True,
        )
        s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        targets = labels[:, 1:].reshape(-1)

        def step():
            with torch.no_grad():
                t_hidden = _backbone_hidden(teacher, input_ids, attention_mask)
            s_hidden = _backbone_hidden(student, input_ids, attention_mask)
            loss = loss_fn(
                s_hidden.reshape(-1, s_hidden.shape[-1]),
                s_head.weight,
                t_hidden.reshape(-1, t_hidden.shape[-1]),
                t_head.weight,
                targets,
                s_head.bias,
                t_head.bias,
            )
            loss.backward()
            return loss.detach()

        return step

    if method == "alambic_cache":
        from alambic.config import LossConfig
        from alambic.losses.topk import teacher_topk
        from alambic.modeling import counted_positions, final_hidden_states, project
        from alambic.teachers.cached import cached_teacher_loss

        mask, targets = counted_positions(labels)
        with torch.inference_mode():  # what `alambic cache` writes: top-k log-probs, ids and tail per counted token
            t_hidden = final_hidden_states(teacher, teacher, input_ids, attention_mask)[:, :-1][mask]
            rows = [
                teacher_topk(project(teacher, t_hidden[i : i + 1024]), CACHE_K, temp)
                for i in range(0, len(t_hidden), 1024)
            ]
        ids, logprobs, tail = (torch.cat([r[j] for r in rows]).clone() for j in range(3))
        batch = {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_tail": tail}
        cfg = LossConfig(
            divergence=spec.divergence, temperature=temp, alpha=spec.alpha, jsd_beta=spec.jsd_beta, skew=spec.skew
        )

        def step():
            hidden = final_hidden_states(student, student, input_ids, attention_mask)[:, :-1][mask]
            parts = cached_teacher_loss(student, hidden, batch, targets, cfg, chunk_size=spec.chunk_size)
            parts.total.backward()
            return parts.total.detach()

        return step

    if method == "sft":

        def step():
            loss = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
            loss.backward()
            return loss.detach()

        return step

    if method == "sft_floor":

        def step():
            with torch.inference_mode():
                teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            loss = student(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
            loss.backward()
            return loss.detach()

        return step

    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Reset the RSS high-water mark (Linux >= 4.0) so model building's transients don't count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_method(spec: Spec) -> Result:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from alambic.utils import tune_allocator

        tune_allocator()  # as the `alambic` CLI does; the same for every method
    except ImportError:
        pass

    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.auto_elements:
        import alambic.losses.chunked

        alambic.losses.chunked.AUTO_CHUNK_ELEMENTS = spec.auto_elements
    device, dtype = torch.device(spec.device), getattr(torch, spec.dtype)
    cuda = device.type == "cuda"
    t_cfg, s_cfg = _model_configs(spec)
    torch.manual_seed(spec.seed)
    with device:
        teacher = AutoModelForCausalLM.from_config(t_cfg, dtype=dtype)
        student = AutoModelForCausalLM.from_config(s_cfg, dtype=dtype)
    teacher.eval().requires_grad_(False)
    student.train()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    input_ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()  # every position counts: the chunked paths get no head start from masking

    result = Result(method=spec.method, teacher_params=_matmul_params(teacher), student_params=_matmul_params(student))
    try:
        step = _make_step(spec, teacher, student, input_ids, attention_mask, labels)
    except Skip as e:
        result.status, result.reason = "skipped", str(e)
        return result
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr)
    _init_adamw_state(opt)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        result.base_bytes = torch.cuda.memory_allocated(device)
    else:
        result.base_bytes = _rss_bytes()
        _reset_peak_rss()

    times, losses = [], []
    for _ in range(spec.warmup + spec.steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)

    result.peak_bytes = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    result.step_bytes = max(result.peak_bytes - result.base_bytes, 0)
    result.step_times_s = times[spec.warmup :]
    result.step_s = statistics.median(result.step_times_s)
    result.tokens_per_s = spec.batch * spec.seq / result.step_s
    result.loss = float(losses[0])  # first step: same weights and batch for every method
    if not all(torch.isfinite(x) for x in losses):
        result.status, result.reason = "failed", f"non-finite loss: {[float(x) for x in losses]}"
    return result


def _child_main(spec_json: str) -> None:
    spec = Spec(**json.loads(spec_json))
    result = run_method(spec)
    print(RESULT_MARK + json.dumps(asdict(result)), flush=True)


# --------------------------------------------------------------------------------------------------
# the parent: one subprocess per method, then the tables


def run_in_subprocess(spec: Spec, timeout_s: float) -> Result:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(asdict(spec))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(spec.method, status="failed", reason=f"timed out after {timeout_s:.0f} s")
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = Result(**json.loads(line[len(RESULT_MARK) :]))
            result.wall_s = wall
            return result
    err = (proc.stderr or proc.stdout).strip().splitlines()
    tail = err[-1] if err else ""
    if proc.returncode in (-9, 137) or "out of memory" in (proc.stderr or "").lower():
        reason = f"out of memory (exit {proc.returncode}) {tail}".strip()
    else:
        reason = f"exit {proc.returncode}: {tail}"
    return Result(spec.method, status="failed", reason=reason, wall_s=wall)


def _mfu(result: Result, peak_flops: float | None) -> float | None:
    if peak_flops is None or result.status != "ok":
        return None
    # forward 2N FLOPs per token (teacher), forward + backward 6N (student); attention's own FLOPs not counted
    return (2 * result.teacher_params + 6 * result.student_params) * result.tokens_per_s / peak_flops


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    right = [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pair_table(results: list[Result], cuda: bool) -> str:
    naive = next((r for r in results if r.method == "naive" and r.status == "ok"), None)
    mem = "peak GiB" + ("" if cuda else " (RSS)")
    headers = [
        "method",
        "step s",
        "tokens/s",
        "×naive",
        mem,
        "×naive",
        "step Δ GiB",
        "×naive",
        "MFU",
        "loss (1st step)",
    ]
    rows, notes = [], []
    for r in results:
        if r.status != "ok":
            rows.append([r.method] + ["-"] * (len(headers) - 1))
            notes.append(f"{r.method}: {'not available' if r.status == 'skipped' else 'failed'}: {r.reason}")
            continue
        rows.append(
            [
                r.method,
                f"{r.step_s:.3f}",
                f"{r.tokens_per_s:,.0f}",
                _ratio(r.tokens_per_s, naive.tokens_per_s) if naive else "-",
                _gib(r.peak_bytes),
                _ratio(r.peak_bytes, naive.peak_bytes) if naive else "-",
                _gib(r.step_bytes),
                _ratio(r.step_bytes, naive.step_bytes) if naive else "-",
                f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a",
                f"{r.loss:.6g}" + (" (CE)" if r.method == "sft_floor" else ""),
            ]
        )
    return _md_table(headers, rows) + "".join(f"\n\n- {n}" for n in notes)


def sweep_table(rows_by_vocab: dict[int, dict[str, Result]]) -> str:
    headers = [
        "vocab",
        "naive tok/s",
        "naive peak GiB",
        "naive step Δ GiB",
        "alambic tok/s",
        "alambic peak GiB",
        "alambic step Δ GiB",
        "tok/s ×naive",
        "peak ×naive",
        "step Δ ×naive",
    ]
    rows, notes = [], []
    for vocab, res in rows_by_vocab.items():
        n, a = res.get("naive"), res.get("alambic")
        row = [f"{vocab:,}"]
        for r in (n, a):
            if r is not None and r.status == "ok":
                row += [f"{r.tokens_per_s:,.0f}", _gib(r.peak_bytes), _gib(r.step_bytes)]
            else:
                row += ["-", "-", "-"]
                if r is not None:
                    notes.append(f"V={vocab} {r.method}: {r.status}: {r.reason}")
        ok = n is not None and a is not None and n.status == a.status == "ok"
        row += (
            [
                _ratio(a.tokens_per_s, n.tokens_per_s),
                _ratio(a.peak_bytes, n.peak_bytes),
                _ratio(a.step_bytes, n.step_bytes),
            ]
            if ok
            else ["-", "-", "-"]
        )
        rows.append(row)
    return _md_table(headers, rows) + "".join(f"\n\n- {x}" for x in notes)


def machine_line(device: str, args_threads: int | None = None) -> str:
    import torch

    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = args_threads or torch.get_num_threads()
    return f"CPU {model}, {os.cpu_count()} cores, torch threads {threads}"


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "liger_kernel"):
        if importlib.util.find_spec(name) is not None:
            try:
                from importlib.metadata import version

                out[name] = version(name.replace("_", "-"))
            except Exception:  # a version we cannot read is just not printed
                pass
    return out


def header(args: argparse.Namespace) -> dict[str, Any]:
    meta = {
        "machine": machine_line(args.device, args.threads),
        "versions": versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "load_average_start": os.getloadavg(),
    }
    return meta


def print_header(meta: dict[str, Any], args: argparse.Namespace) -> None:
    vs = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    print(f"# {meta['machine']} | {vs} | {meta['date']}")
    print(f"# command: python {meta['command']}")
    print(
        f"# scale {args.scale}, batch {args.batch} × seq {args.seq} = {args.batch * args.seq} tokens/step, "
        f"{args.dtype}, {args.device}, alambic chunk {args.chunk_size}"
        f"{f' ({args.auto_elements} logits)' if args.auto_elements else ''}, divergence {args.divergence}, "
        f"T {args.temperature}, alpha {args.alpha}, "
        f"{args.warmup} warm-up + {args.steps} timed steps (median), AdamW; "
        f"load average at start {meta['load_average_start'][0]:.2f}"
    )


def _spec(args: argparse.Namespace, method: str, pair: str, vocab: int) -> Spec:
    return Spec(
        method=method,
        pair=pair,
        scale=args.scale,
        vocab=vocab,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        divergence=args.divergence,
        temperature=args.temperature,
        alpha=args.alpha,
        jsd_beta=args.jsd_beta,
        skew=args.skew,
        chunk_size=args.chunk_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        auto_elements=args.auto_elements,
    )


def _run(args: argparse.Namespace, method: str, pair: str, vocab: int, peak_flops: float | None) -> Result:
    label = f"{pair} V={vocab} {method}"
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    result = run_in_subprocess(_spec(args, method, pair, vocab), args.timeout)
    result.mfu = _mfu(result, peak_flops)
    what = f"{result.tokens_per_s:,.0f} tok/s" if result.status == "ok" else f"{result.status}: {result.reason}"
    print(f"  {label}: {what} ({result.wall_s:.0f} s wall)", file=sys.stderr, flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scale",
        choices=("full", "cpu", "tiny"),
        default="cpu",
        help="full: the real model sizes (GPU); cpu: 4 layers, hidden 128-256, real vocabularies; "
        "tiny: CI-sized, vocab 4096",
    )
    p.add_argument("--pair", choices=(*PAIRS, "all"), default="all")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(ALL_METHODS)} (default {', '.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--batch", type=int, help="sequences per step (default: 8 full, 4 cpu (1 for --vocab-sweep), 2 tiny)"
    )
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 1024 full, 512 cpu, 32 tiny)")
    p.add_argument("--vocab", type=int, help="override the pair's vocabulary size (tiny: 4096)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (default: bf16 full, fp32 cpu)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda for full, else cpu)")
    p.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels, compilation)")
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the soft loss (1: no hard CE term)")
    p.add_argument("--jsd-beta", type=float, default=0.5)
    p.add_argument("--skew", type=float, default=0.1)
    p.add_argument(
        "--chunk-size",
        type=lambda v: v if v == "auto" else int(v),
        help="alambic's token chunk, or 'auto' (rows sized to the vocabulary; default: 1024 full, 256 cpu, "
        "8 tiny: a batch is 8 chunks at every scale)",
    )
    p.add_argument(
        "--auto-elements",
        type=int,
        help="logits per chunk under --chunk-size auto (default alambic's "
        "AUTO_CHUNK_ELEMENTS, 2^26); a smaller budget shows at CPU scale "
        "what 2^26 does at full scale",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads per method (default: torch's, one per core)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: bf16 dense peak of known GPUs)")
    p.add_argument(
        "--vocab-sweep",
        action="store_true",
        help=f"instead of the method table: naive vs alambic for V in {', '.join(map(str, SWEEP_VOCABS))} "
        "(on --pair, qwen shapes when 'all')",
    )
    p.add_argument("--vocabs", help="comma-separated vocab sizes for --vocab-sweep")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per method subprocess")
    p.add_argument("--json", help="also write the results here as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    batch, seq, dtype, device, chunk = SCALE_DEFAULTS[args.scale]
    if args.vocab_sweep and args.scale == "cpu":
        # naive at V = 262144 and 4 × 512 tokens would want ~21 GiB: one 512-token sequence (8 chunks of 64) keeps
        # the sweep within a shared small machine's memory
        batch, chunk = 1, 64
    args.chunk_size = args.chunk_size or chunk
    args.batch = args.batch or batch
    args.seq = args.seq or seq
    args.dtype = args.dtype or dtype
    args.device = args.device or device
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    problems = [
        f"--methods: unknown {m!r} (choose from {', '.join(ALL_METHODS)})" for m in args.methods if m not in ALL_METHODS
    ]
    if args.steps < 1:
        problems.append(f"--steps must be >= 1, got {args.steps}")
    if args.seq < 2:
        problems.append(f"--seq must be >= 2 (one predicted token), got {args.seq}")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --scale cpu")
    cuda = args.device.startswith("cuda")
    peak_flops = args.peak_flops
    if peak_flops is None and cuda:
        name = torch.cuda.get_device_name(torch.device(args.device))
        peak_flops = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)

    meta = header(args)
    print_header(meta, args)
    out: dict[str, Any] = {"meta": meta, "settings": {k: v for k, v in vars(args).items() if k != "child"}}

    def default_vocab(pair: str) -> int:
        return args.vocab or (4096 if args.scale == "tiny" else PAIRS[pair]["vocab_size"])

    if args.vocab_sweep:
        pair = "qwen" if args.pair == "all" else args.pair
        vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else list(SWEEP_VOCABS)
        by_vocab: dict[int, dict[str, Result]] = {}
        for vocab in vocabs:
            by_vocab[vocab] = {m: _run(args, m, pair, vocab, peak_flops) for m in ("naive", "alambic")}
        print(f"\n## vocabulary sweep: {pair} shapes at scale {args.scale}\n")
        print(sweep_table(by_vocab))
        out["vocab_sweep"] = {
            "pair": pair,
            "rows": {str(v): {m: asdict(r) for m, r in res.items()} for v, res in by_vocab.items()},
        }
    else:
        out["pairs"] = {}
        for pair in PAIRS if args.pair == "all" else [args.pair]:
            vocab = default_vocab(pair)
            results = []
            for method in args.methods:
                if method == "liger" and not cuda:
                    results.append(
                        Result("liger", status="skipped", reason="needs CUDA (Liger-Kernel is a Triton library)")
                    )
                    continue
                results.append(_run(args, method, pair, vocab, peak_flops))
            r0 = next((r for r in results if r.status == "ok"), None)
            sizes = (
                f", teacher {r0.teacher_params / 1e6:.1f}M / student {r0.student_params / 1e6:.1f}M matmul params"
                if r0
                else ""
            )
            print(f"\n## {pair} (V = {vocab:,}{sizes})\n")
            print(pair_table(results, cuda))
            out["pairs"][pair] = {"vocab": vocab, "results": [asdict(r) for r in results]}

    meta["load_average_end"] = os.getloadavg()
    print(f"\n# load average at end {meta['load_average_end'][0]:.2f} (1 min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        main()
