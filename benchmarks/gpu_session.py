"""One command that takes every GPU figure the project lacks, on one H100/H200, in about 8 minutes.

    python benchmarks/gpu_session.py [--out DIR] [--budget 480] [--only STEP ...] [--smoke]
    SMOKE=1 python benchmarks/gpu_session.py       # the same steps on a CPU, tiny sizes, ~2 minutes

Steps, in priority order (a later step only gets the time the earlier ones left; the first four are
the ones that prove the GPU paths, so they come first):

1. ``environment``: torch/CUDA/cuDNN/NCCL, GPU, library versions, CPUs; imports every third-party
   module the code imports (``env_report.py``) and fails when a required one does not import;
2. ``correctness``: ``benchmarks/gpu_checks.py`` (fp64 gradcheck of the fused ops, bf16 vs fp32,
   dropout rates, checkpointing + dropout gradients, control collectives beside an NCCL group);
3. ``launcher``: ``deepspeed --num_gpus 1 launch/train.py``, Swin-B at 448 px, bf16, ZeRO-2, 30 steps
   on synthetic data, an evaluation, a checkpoint, then a resume for 5 steps (``launcher_run.py``);
4. ``two_ranks_zero{2,3}``: two ranks on the one GPU through ``torchrun`` and the trainer, bf16, SyncBN
   on, with a ``cuda:gloo`` default group (it refuses CPU tensors as NCCL does): 10 steps, an
   evaluation, a checkpoint, a resume;
5. ``throughput_*``: ``benchmarks/gpu_throughput.py``, Swin-B and Swin-L at 448 px, bf16, ZeRO-2, eager
   and compiled (``model.compile``): images/s, peak memory, MFU and HFU against the nominal peak;
6. ``loader``: loader samples/s with 8 and 16 workers, pageable vs pinned batches;
7. more throughput shapes, ``model_step_*`` (our model against the per-task loop) and ``h2d_copy``.

Each step is its own subprocess (own process group) under ``min(its timeout, budget left)``: a hang
or a crash costs that step only and is recorded as such. Results: ``session.jsonl`` (one JSON line
per step, written as each finishes), ``summary.md`` (a table of step, status, seconds and key
figures) and ``steps.log`` (the tail of every step's output), in ``--out`` (default ``$OUT`` when
set, else ``runs/gpu_session``). The first thing the script does is name the Python packages that
are missing (a bare GPU machine lacks DeepSpeed, Hydra, ...); steps that need one are skipped, and
benchmarks/README.md says how to bring them as wheels. With ``--smoke`` (or ``SMOKE=1``) the steps
run on the CPU at tiny sizes; those that cannot are recorded as "skipped (needs CUDA)".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from env_report import WHEEL_HINT, missing  # noqa: E402

LOG_TAIL_CHARS = 6000
MIN_STEP_S = 10  # a step is not started with less time than this left
DEEPSPEED = [
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "cpuinfo",
    "msgpack",
    "ninja",
    "psutil",
    "einops",
    "packaging",
]
CONFIG = ["hydra", "omegaconf", "antlr4", "yaml"]
MODEL = ["torch", "timm", "numpy", "safetensors"]
TRAINER = MODEL + CONFIG + DEEPSPEED + ["PIL", "scipy", "matplotlib", "tqdm", "fsspec"]


@dataclass(frozen=True)
class Context:
    smoke: bool
    cuda: bool
    work: Path  # scratch files of the steps (not brought back)

    def result_path(self, step: str) -> Path:
        return self.work / f"{step}.json"


@dataclass(frozen=True)
class Step:
    name: str
    timeout_s: float
    args: Callable[[Context], list[str]]  # the script and its arguments (python runs it; --json is added)
    figures: Callable[[dict], dict]  # the key figures of its JSON result
    needs: list[str] = field(default_factory=lambda: list(MODEL))  # modules it imports
    cpu_skip: str | None = None  # why it cannot run on a CPU (then SMOKE records it skipped)
    passed: Callable[[dict], bool] = lambda result: True  # judged on the JSON, beside a zero exit status


# ------------------------------------------------------------------------------------------- the steps
def _throughput(config: str, batch: int, grad_checkpointing: bool = False, compile: bool = False):
    def args(ctx: Context) -> list[str]:
        if ctx.smoke:
            sized = ["--config", "configs/quickstart.yaml", "--batch", "2", "--size", "64", "--steps", "1"]
        else:
            sized = ["--config", config, "--batch", str(batch), "--size", "448", "--steps", "10"]
        flags = ["--grad-checkpointing"] * grad_checkpointing + ["--compile"] * compile
        return ["benchmarks/gpu_throughput.py", *sized, "--precision", "bf16", *flags]

    return args


def _throughput_figures(r: dict) -> dict:
    keys = (
        "images_per_s",
        "peak_memory_gib",
        "mfu",
        "hfu",
        "mfu_vs_matmul",
        "nominal_peak_tflops",
        "step_s",
        "measured_matmul_tflops",
        "first_step_s",
        "compile_skipped",
    )
    return {k: _round(r.get(k)) for k in keys if r.get(k) is not None}


SMOKE_SIZES = [
    "--config",
    "configs/quickstart.yaml",
    "--eval-batches",
    "1",
    "model.img_size=[64,64]",
    "model.backbone_kwargs.window_size=2",
    "data.batch_size=2",
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "eval.visual_samples=1",
]


def _launcher(ctx: Context) -> list[str]:
    """Swin-B at 448 px, bf16, ZeRO-2 through ``deepspeed --num_gpus 1``: 30 steps, an evaluation, a
    checkpoint, then a resume for 5 more steps."""
    common = [
        "benchmarks/launcher_run.py",
        "--launcher",
        "deepspeed",
        "--run-dir",
        str(ctx.work / "launcher_run"),
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
    ]
    if ctx.smoke:
        return [*common, *SMOKE_SIZES, "--steps", "2", "--resume-steps", "1"]
    return [
        *common,
        "--config",
        "configs/pascal_swin_b.yaml",
        "--steps",
        "30",
        "--resume-steps",
        "5",
        "--eval-batches",
        "2",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=4",
        "data.synthetic.num_train=64",
        "data.synthetic.num_val=16",
        "eval.visual_samples=2",
        "optim.lr_scaling=none",
    ]


def _two_ranks(stage: int):
    """Two ranks through the trainer at ZeRO-``stage``, bf16, SyncBN on: 10 steps, an evaluation, a
    checkpoint, a resume. NCCL refuses two ranks on one GPU; a ``cuda:gloo`` default group runs them
    there and refuses CPU tensors in collectives exactly as NCCL does (the CPU smoke run uses gloo)."""

    def args(ctx: Context) -> list[str]:
        common = [
            "benchmarks/launcher_run.py",
            "--launcher",
            "torchrun",
            "--nproc",
            "2",
            "--run-dir",
            str(ctx.work / f"two_ranks_zero{stage}"),
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=bf16",
            "model.sync_bn=true",
        ]
        if ctx.smoke:
            return [*common, *SMOKE_SIZES, "--steps", "2", "--resume-steps", "1"]
        return [
            *common,
            "--config",
            "configs/pascal_swin_t_r64.yaml",
            "--steps",
            "10",
            "--resume-steps",
            "3",
            "--eval-batches",
            "1",
            "deepspeed.dist_backend=cuda:gloo",
            "model.img_size=[224,224]",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.num_workers=2",
            "data.synthetic.num_train=32",
            "data.synthetic.num_val=8",
            "eval.visual_samples=1",
            "optim.lr_scaling=none",
        ]

    return args


def _run_figures(r: dict) -> dict:
    keys = (
        "steps",
        "loss_first5",
        "loss_last5",
        "loss_falling",
        "eval_steps",
        "checkpoint",
        "resumed",
        "samples_per_s",
    )
    return {k: _round(r.get(k)) for k in keys}


def _model_step_figures(result: dict) -> dict:
    keys = ("speedup_vs_reference", "adapter_overhead_backbone", "mtlora_step_s", "max_abs_diff_vs_reference")
    return {k: _round(result[k]) for k in keys}


def _model_step(precision: str, batch: int):
    def args(ctx: Context) -> list[str]:
        if ctx.smoke:
            return [
                "benchmarks/model_step.py",
                "--config",
                "configs/quickstart.yaml",
                "--size",
                "64",
                "--repeats",
                "1",
                "--precision",
                precision,
                "--device",
                "cpu",
                "model.backbone_kwargs.window_size=2",
            ]
        return [
            "benchmarks/model_step.py",
            "--config",
            "configs/pascal_swin_t_r64.yaml",
            "--batch",
            str(batch),
            "--size",
            "224",
            "--repeats",
            "10",
            "--precision",
            precision,
            "--device",
            "cuda",
        ]

    return args


def _loader(ctx: Context) -> list[str]:
    common = [
        "benchmarks/data_throughput.py",
        "--sources",
        "local",
        "--pin-memory",
        "off",
        "on",
        "--repeats",
        "1",
        "--work-dir",
        str(ctx.work / "data"),
    ]
    if ctx.smoke:
        return [*common, "--num-samples", "16", "--img-size", "96", "--workers", "0", "1"]
    # generating a 448 px synthetic sample takes ~0.3 s of one core: 128 of them, read 4 epochs per figure
    return [
        *common,
        "--num-samples",
        "128",
        "--epochs",
        "4",
        "--img-size",
        "448",
        "--workers",
        "8",
        "16",
        "--device",
        "cuda",
    ]


def _loader_figures(r: dict) -> dict:
    return {
        f"w{row['workers']}{' pinned' if row['pin_memory'] else ''} samples/s": row["samples_per_s"]
        for row in r.get("epochs", [])
    }


def _h2d_figures(r: dict) -> dict:
    return {
        "pageable GB/s": _round(r["pageable"]["gb_per_s"]),
        "pinned GB/s": _round(r["pinned"]["gb_per_s"]),
        "pinned speed-up": _round(r["pinned_speedup"]),
    }


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


STEPS = [
    Step(
        "environment",
        60,
        lambda ctx: ["benchmarks/env_report.py"],
        lambda r: (
            {k: r.get(k) for k in ("gpu", "gpu_memory_gib", "torch", "cuda", "cudnn", "nccl", "cpus")}
            | {"deepspeed": r["versions"].get("deepspeed")}
            | {"import failures": ", ".join(r["import_failures"]) or "none"}
            | {"optional missing": ", ".join(r["optional_missing"]) or "none"}
        ),
        needs=["torch"],
        passed=lambda r: r["passed"],
    ),
    Step(
        "correctness",
        150,
        lambda ctx: ["benchmarks/gpu_checks.py", "--device", "cuda" if ctx.cuda else "cpu"],
        lambda r: {name: c["status"] for name, c in r["checks"].items()},
        passed=lambda r: r["passed"],
    ),
    Step("launcher", 240, _launcher, _run_figures, needs=TRAINER, passed=lambda r: r["passed"]),
    *(
        Step(
            f"two_ranks_zero{stage}", 150, _two_ranks(stage), _run_figures, needs=TRAINER, passed=lambda r: r["passed"]
        )
        for stage in (2, 3)
    ),
    Step(
        "throughput_swin_b_b32", 90, _throughput("configs/pascal_swin_b.yaml", 32), _throughput_figures, needs=TRAINER
    ),
    Step(
        "throughput_swin_b_b32_compiled",
        300,
        _throughput("configs/pascal_swin_b.yaml", 32, compile=True),
        _throughput_figures,
        needs=TRAINER,
        cpu_skip="needs CUDA: compiling even the tiny model takes minutes on 2 CPU cores",
    ),
    Step("throughput_swin_l_b8", 100, _throughput("configs/pascal_swin_l.yaml", 8), _throughput_figures, needs=TRAINER),
    Step(
        "throughput_swin_l_b8_compiled",
        300,
        _throughput("configs/pascal_swin_l.yaml", 8, compile=True),
        _throughput_figures,
        needs=TRAINER,
        cpu_skip="needs CUDA: compiling even the tiny model takes minutes on 2 CPU cores",
    ),
    Step("loader", 120, _loader, _loader_figures, needs=["torch", "numpy", "PIL", "fsspec"]),
    Step(
        "throughput_swin_b_b16", 90, _throughput("configs/pascal_swin_b.yaml", 16), _throughput_figures, needs=TRAINER
    ),
    Step(
        "throughput_swin_l_b16_gc",
        110,
        _throughput("configs/pascal_swin_l.yaml", 16, grad_checkpointing=True),
        _throughput_figures,
        needs=TRAINER,
    ),
    *(
        Step(f"model_step_{precision}", 90, _model_step(precision, batch), _model_step_figures, needs=MODEL + CONFIG)
        for precision, batch in (("fp32", 2), ("bf16", 16))
    ),  # fmt: skip
    Step("h2d_copy", 60, lambda ctx: ["benchmarks/h2d_copy.py"], _h2d_figures, needs=["torch"], cpu_skip="needs CUDA"),
]


# ------------------------------------------------------------------------------------------- running
def child_env(ctx: Context) -> dict[str, str]:
    """Unbuffered, offline, wandb off; DeepSpeed on its CPU accelerator only where there is no GPU."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if not ctx.cuda:  # also a smoke run on a GPU machine stays on the CPU
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_process(cmd: list[str], timeout_s: float, log_path: Path, env: dict[str, str]) -> int | None:
    """Run ``cmd`` in its own process group with output to ``log_path``; None when it timed out (the
    whole group, launcher children included, is killed then)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _skip_reason(step: Step, ctx: Context, time_left: float) -> str | None:
    if step.cpu_skip and not ctx.cuda:
        return f"skipped ({step.cpu_skip})"
    lacking = missing(step.needs)
    if lacking:
        return f"skipped (missing: {', '.join(lacking)})"
    if time_left < MIN_STEP_S:
        return "skipped (no budget left)"
    return None


def judge(step: Step, returncode: int | None, result: dict | None) -> tuple[str, dict]:
    """Status and key figures from the exit status and the JSON the step wrote."""
    if returncode is None:
        return "timeout", {}
    if result is None:
        return f"crashed (exit {returncode})", {}
    try:
        figures, ok = step.figures(result), step.passed(result)
    except Exception as err:  # noqa: BLE001 - a result without the expected fields
        return f"failed (unexpected result: {type(err).__name__}: {err})", {}
    if returncode != 0 or not ok:
        return f"failed (exit {returncode})", figures
    return "passed", figures


def run_step(step: Step, ctx: Context, time_left: float) -> tuple[dict, str]:
    """One step's JSON line and the tail of its output."""
    record: dict = {"step": step.name, "status": None, "seconds": 0.0, "figures": {}}
    reason = _skip_reason(step, ctx, time_left)
    if reason:
        record["status"] = reason
        return record, ""
    out = ctx.result_path(step.name)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, *step.args(ctx), "--json", str(out)]
    timeout = min(step.timeout_s, time_left)
    log_path = ctx.work / f"{step.name}.log"
    start = time.perf_counter()
    returncode = run_process(cmd, timeout, log_path, child_env(ctx))
    seconds = time.perf_counter() - start
    result = json.loads(out.read_text()) if out.is_file() else None
    status, figures = judge(step, returncode, result)
    record.update(
        status=status,
        seconds=round(seconds, 1),
        timeout_s=round(timeout, 1),
        returncode=returncode,
        figures=figures,
        command=" ".join(cmd[1:]),
        result=result,
    )
    return record, log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def summary_table(records: list[dict], header: str) -> str:
    lines = [header, "", "| step | status | seconds | key figures |", "|---|---|---|---|"]
    for r in records:
        figures = "; ".join(f"{k}: {v}" for k, v in r["figures"].items())
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {figures.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def default_out() -> str:
    return os.environ.get("OUT") or str(REPO / "runs" / "gpu_session")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out())
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for all steps together (480; 1200 for --smoke on a CPU)"
    )
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE", "") not in ("", "0"))
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None)
    args = parser.parse_args()
    args.budget = args.budget or (1200.0 if args.smoke else 480.0)
    start = time.perf_counter()
    lacking = missing()
    if lacking:
        print(
            f"missing Python packages: {', '.join(lacking)}; the steps that need them are skipped.\n"
            f"To bring them: {WHEEL_HINT}",
            flush=True,
        )

    import torch

    ctx = Context(
        smoke=args.smoke,
        cuda=torch.cuda.is_available() and not args.smoke,
        work=Path(tempfile.mkdtemp(prefix="mtlora-gpu-session-")),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, logs = out / "session.jsonl", out / "steps.log"
    jsonl.write_text("")
    logs.write_text("")
    records: list[dict] = []
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        record, tail = run_step(step, ctx, args.budget - (time.perf_counter() - start))
        records.append(record)
        print(
            f"[{time.perf_counter() - start:6.1f} s] {step.name}: {record['status']} ({record['seconds']} s) "
            f"{json.dumps(record['figures'])}",
            flush=True,
        )
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        with open(logs, "a") as fh:
            fh.write(
                f"===== {step.name}: {record['status']} ({record['seconds']} s)\n{record.get('command', '')}\n{tail}\n"
            )
        header = (
            f"# GPU session{' (smoke run on the CPU)' if args.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}"
            f"\n\n{len(records)} steps in {time.perf_counter() - start:.0f} s of a {args.budget:.0f} s budget; "
            f"missing packages: {', '.join(lacking) or 'none'}. Full results: session.jsonl; output tails: "
            "steps.log."
        )
        (out / "summary.md").write_text(summary_table(records, header))  # after every step: a kill keeps it
    print(f"wrote {jsonl}, {out / 'summary.md'}, {logs}")


if __name__ == "__main__":
    main()
