"""One command that takes the GPU figures the project lacks, on one H100/H200, inside one device call.

    bash benchmarks/gpu_session.sh                                  # on the device: wheels, timm check, this
    python benchmarks/gpu_session.py [--out DIR] [--plan main|extra|all] [--budget S] [--only STEP ...]
    python benchmarks/gpu_session.py --rerun-failed runs/gpu_session/session.jsonl   # only what did not pass
    SMOKE=1 python benchmarks/gpu_session.py [--plan all]           # the same steps on a CPU, tiny sizes

The budget (constants below; docs/gpu.md has the table): a session has 15 minutes of device time; a
call is the machine's start (2-4 min) plus one command (at most 10 min). The main plan's steps get
``BUDGET_S`` = 600 - 240 - 30 = 330 s, so the first call ends within 10 minutes even with the slowest
start; a rerun of the failed steps (``--rerun-failed``, one flag) or the extra plan then gets
``RERUN_BUDGET_S`` = 240 s on the still-warm machine. Every step's timeout is inside its plan's budget
(their sum is, tests/benchmarks/test_gpu_session.py checks it), highest value first:

1. ``environment``: torch/CUDA/cuDNN/NCCL, GPU, library versions, CPUs; imports every third-party
   module the code imports and checks timm's version and the Swin internals the model uses
   (``env_report.py``); fails when a required module does not import or timm is unusable;
2. ``correctness``: ``benchmarks/gpu_checks.py`` (fp64 gradcheck of the fused ops, bf16 vs fp32,
   dropout rates, checkpointing + dropout gradients, control collectives beside an NCCL group);
3. ``cuda_paths`` (CPU only): ``benchmarks/cuda_rehearsal.py``, the multi-rank CUDA start-up with a
   faked one-GPU torch (DeepSpeed's accelerator choice, per-rank device binding, the ``cuda:gloo``
   group); on the GPU the two-rank steps run the real thing;
4. ``launcher``: ``deepspeed --num_gpus 1 launch/train.py``, Swin-B at 448 px, bf16, ZeRO-2, 30 steps
   on synthetic data with a schedule 30 steps can judge (:data:`LAUNCHER_30`; the loss must fall beyond
   its noise), an evaluation, a checkpoint, then a resume (``launcher_run.py``);
5. ``two_ranks_zero{2,3}``: two ranks on the one GPU through ``torchrun`` and the trainer, bf16, SyncBN
   on, with a ``cuda:gloo`` default group bound to the GPU on both ranks (``engine/distributed.py``):
   10 steps, an evaluation, a checkpoint, a resume;
6. ``throughput_swin_b_b32`` (``gpu_throughput.py``: images/s, peak memory, MFU in both FLOP
   conventions), ``h2d_copy``, ``loader`` (8 and 16 workers, pageable vs pinned), ``model_step_bf16``;
7. last, ``throughput_swin_b_b32_compiled`` with whatever the budget has left (at least
   ``COMPILE_MIN_S``); killed before its first step ends, it reports how long it compiled.

The extra plan (a second call): Swin-L and batch-16 throughput shapes, activation checkpointing,
``model_step_fp32``, two ranks at ZeRO-3 with the UPGrad balancing, and Swin-L compiled.

Each step is its own subprocess (own process group) under ``min(its timeout, budget left)``: a hang
or a crash costs that step only and is recorded as such. Results: ``session.jsonl`` (one JSON line
per step, written as each finishes), ``summary.md`` (a table of step, status, seconds and key
figures) and ``steps.log`` (the tail of every step's output), in ``--out`` (default ``$OUT`` when
set, else ``runs/gpu_session``). The first thing the script does is name the Python packages that
are missing (a bare GPU machine lacks DeepSpeed, Hydra, ...); steps that need one are skipped, and
benchmarks/README.md says how to bring them as wheels. With ``--smoke`` (or ``SMOKE=1``) the steps
run on the CPU at tiny sizes; those that cannot are recorded as "skipped (needs CUDA)". A rerun writes
the earlier records with the rerun steps replaced (marked ``"rerun": true``).
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
    timeout_scale: float = 1.0  # every step's timeout times this (smoke runs on a shared CPU)

    def result_path(self, step: str) -> Path:
        return self.work / f"{step}.json"


@dataclass(frozen=True)
class Step:
    name: str
    timeout_s: float | None  # None: whatever the budget has left (a compile step, last of its plan)
    args: Callable[[Context], list[str]]  # the script and its arguments (python runs it; --json is added)
    figures: Callable[[dict], dict]  # the key figures of its JSON result
    needs: list[str] = field(default_factory=lambda: list(MODEL))  # modules it imports
    cpu_skip: str | None = None  # why it cannot run on a CPU (then SMOKE records it skipped)
    passed: Callable[[dict], bool] = lambda result: True  # judged on the JSON, beside a zero exit status
    plan: str = "main"  # "main": the first call on the machine; "extra": a second call's figures
    gpu_skip: str | None = None  # why it does not run on a GPU (a CPU rehearsal of what the GPU runs)


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
        "mfu_3x_forward",
        "backward_over_forward",
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


# What 30 steps can show: the recipe's own schedule (160 warmup steps from 5e-7 at this batch) would still
# be warming up at step 30, and drop-path 0.3 on a random backbone moves each loss more than 30 such
# steps move the mean; so the launcher step trains the same model and path with a 5-step warmup, no
# drop-path and a 16-sample set seen ~15 times, and asks that the loss fall beyond its noise
# (launcher_run.judge_losses). The recipe's schedule is checked against the official code elsewhere.
LAUNCHER_30 = [
    "--steps",
    "30",
    "--eval-batches",
    "1",
    "optim.lr_scaling=none",
    "optim.warmup_epochs=0",
    "optim.warmup_steps=5",
    "model.drop_path_rate=0.0",
    "data.synthetic.num_train=16",
    "eval.visual_samples=1",
]


def _launcher(ctx: Context) -> list[str]:
    """Swin-B at 448 px, bf16, ZeRO-2 through ``deepspeed --num_gpus 1``: 30 steps (:data:`LAUNCHER_30`),
    an evaluation, a checkpoint, then a resume for a few more steps. The smoke run is the same
    configuration on a tiny Swin at 64 px."""
    common = [
        "benchmarks/launcher_run.py",
        "--launcher",
        "deepspeed",
        "--run-dir",
        str(ctx.work / "launcher_run"),
        "--config",
        "configs/pascal_swin_b.yaml",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        *LAUNCHER_30,
    ]
    if ctx.smoke:
        return [
            *common,
            "--resume-steps",
            "2",
            "model=tiny",
            "adapter=tiny",
            "model.img_size=[64,64]",
            "model.backbone_kwargs.window_size=2",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.synthetic.num_val=2",
        ]
    return [
        *common,
        "--resume-steps",
        "3",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=4",
        "data.synthetic.num_val=8",
    ]


def _two_ranks(stage: int, *overrides: str, name: str = ""):
    """Two ranks through the trainer at ZeRO-``stage``, bf16, SyncBN on (plus ``overrides``): 10 steps, an
    evaluation, a checkpoint, a resume. NCCL refuses two ranks on one GPU; a ``cuda:gloo`` default group
    runs them there and refuses CPU tensors in collectives exactly as NCCL does (the CPU smoke run uses gloo)."""

    def args(ctx: Context) -> list[str]:
        common = [
            "benchmarks/launcher_run.py",
            "--launcher",
            "torchrun",
            "--nproc",
            "2",
            "--run-dir",
            str(ctx.work / (name or f"two_ranks_zero{stage}")),
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=bf16",
            "model.sync_bn=true",
            *overrides,
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
        "loss_slope_bound",
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


def _compile_figures(r: dict) -> dict:
    """A finished compiled step's figures; an unfinished one's compile time so far (the session adds it)."""
    if r.get("unfinished"):
        return {"unfinished": r["unfinished"]}
    return _throughput_figures(r)


def _cuda_paths_figures(r: dict) -> dict:
    return {
        f"rank {x['rank']}": f"{x.get('accelerator')}, {x.get('device')}, bound {x.get('bound_device')}, "
        f"engine {x.get('deepspeed_engine_device')}, CPU tensor refused {x.get('cpu_tensor_refused')}"
        for x in r["ranks"]
    } | {"without the fix": r.get("without_fix")}


ENVIRONMENT = Step(
    "environment",
    20,
    lambda ctx: ["benchmarks/env_report.py"],
    lambda r: (
        {k: r.get(k) for k in ("gpu", "gpu_memory_gib", "torch", "cuda", "cudnn", "nccl", "cpus")}
        | {"deepspeed": r["versions"].get("deepspeed")}
        | {"timm": f"{r['timm_check']['version']} ({'usable' if r['timm_check']['passed'] else 'NOT usable'})"}
        | {"import failures": ", ".join(r["import_failures"]) or "none"}
        | {"optional missing": ", ".join(r["optional_missing"]) or "none"}
    ),
    needs=["torch"],
    passed=lambda r: r["passed"],
)

# The plan. One device call holds the machine's start (2-4 min) and the command (at most 10 min); this
# session has 15 minutes of device time in all. The main plan's command must leave the whole first call
# inside RUN_LIMIT_S with the slowest start, and a warm rerun of what failed must fit in what is left.
DEVICE_TIME_S = 900  # device time of a session, machine starts and idle time included
RUN_LIMIT_S = 600  # the first call: machine start + command, the longest a command may run
MACHINE_START_S = 240  # the slowest start seen
SETUP_S = 30  # gpu_session.sh's wheel install and timm check, the interpreter's start, the files' way back
BUDGET_S = RUN_LIMIT_S - MACHINE_START_S - SETUP_S  # 330 s for the main plan's steps
RERUN_BUDGET_S = DEVICE_TIME_S - RUN_LIMIT_S - SETUP_S - 30  # 240 s for a rerun (or the extra plan), warm
COMPILE_MIN_S = 25  # a compile step is started only with this much left; it then gets all that is left
SMOKE_TIMEOUT_SCALE = 5  # a smoke run's steps on a shared 2-core CPU start slower than on the GPU machine

STEPS = [
    # main plan, highest value first: what proves the GPU paths, then the figures the docs lack
    ENVIRONMENT,
    Step(
        "correctness",
        30,
        lambda ctx: ["benchmarks/gpu_checks.py", "--device", "cuda" if ctx.cuda else "cpu"],
        lambda r: {name: c["status"] for name, c in r["checks"].items()},
        passed=lambda r: r["passed"],
    ),
    Step(
        "cuda_paths",
        60,
        lambda ctx: ["benchmarks/cuda_rehearsal.py"],
        _cuda_paths_figures,
        needs=TRAINER,
        passed=lambda r: r["passed"],
        gpu_skip="the two_ranks steps run these paths on the GPU itself",
    ),
    Step("launcher", 80, _launcher, _run_figures, needs=TRAINER, passed=lambda r: r["passed"]),
    Step("two_ranks_zero2", 45, _two_ranks(2), _run_figures, needs=TRAINER, passed=lambda r: r["passed"]),
    Step(
        "throughput_swin_b_b32", 30, _throughput("configs/pascal_swin_b.yaml", 32), _throughput_figures, needs=TRAINER
    ),
    Step("two_ranks_zero3", 45, _two_ranks(3), _run_figures, needs=TRAINER, passed=lambda r: r["passed"]),
    Step("h2d_copy", 10, lambda ctx: ["benchmarks/h2d_copy.py"], _h2d_figures, needs=["torch"], cpu_skip="needs CUDA"),
    Step("loader", 30, _loader, _loader_figures, needs=["torch", "numpy", "PIL", "fsspec"]),
    Step("model_step_bf16", 15, _model_step("bf16", 16), _model_step_figures, needs=MODEL + CONFIG),
    Step(
        "throughput_swin_b_b32_compiled",
        None,
        _throughput("configs/pascal_swin_b.yaml", 32, compile=True),
        _compile_figures,
        needs=TRAINER,
        cpu_skip="needs CUDA: compiling even the tiny model takes minutes on 2 CPU cores",
    ),
    # extra plan (a second call, warm machine): more shapes
    Step(
        "throughput_swin_l_b8",
        30,
        _throughput("configs/pascal_swin_l.yaml", 8),
        _throughput_figures,
        needs=TRAINER,
        plan="extra",
    ),
    Step(
        "throughput_swin_b_b16",
        30,
        _throughput("configs/pascal_swin_b.yaml", 16),
        _throughput_figures,
        needs=TRAINER,
        plan="extra",
    ),
    Step(
        "throughput_swin_l_b16_gc",
        35,
        _throughput("configs/pascal_swin_l.yaml", 16, grad_checkpointing=True),
        _throughput_figures,
        needs=TRAINER,
        plan="extra",
    ),
    Step("model_step_fp32", 15, _model_step("fp32", 2), _model_step_figures, needs=MODEL + CONFIG, plan="extra"),
    Step(  # the Gramian weighting's extra backward passes under ZeRO-3's partitioned weights, on the GPU
        "two_ranks_zero3_upgrad",
        50,
        _two_ranks(3, "loss.balancing=upgrad", name="two_ranks_zero3_upgrad"),
        _run_figures,
        needs=TRAINER,
        passed=lambda r: r["passed"],
        plan="extra",
    ),
    Step(
        "throughput_swin_l_b8_compiled",
        None,
        _throughput("configs/pascal_swin_l.yaml", 8, compile=True),
        _compile_figures,
        needs=TRAINER,
        cpu_skip="needs CUDA: compiling even the tiny model takes minutes on 2 CPU cores",
        plan="extra",
    ),
]
PLANS = {"main": BUDGET_S, "extra": RERUN_BUDGET_S}


def plan_steps(plan: str, cuda: bool) -> list[Step]:
    """The steps of ``plan`` ("main", "extra" or "all") that run on this kind of machine."""
    return [s for s in STEPS if plan in (s.plan, "all") and not (cuda and s.gpu_skip)]


def failed_steps(records: list[dict]) -> list[str]:
    """Steps of an earlier session that did not pass and could have: a rerun runs these (a step that
    cannot run on that machine, e.g. a CPU-only rehearsal, is not failed)."""
    return [r["step"] for r in records if r["status"] != "passed" and not r["status"].startswith("skipped (needs")]


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
    else:  # what DeepSpeed would detect, said (benchmarks/cuda_rehearsal.py checks its own choice)
        env.setdefault("DS_ACCELERATOR", "cuda")
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc): torchrun starts its ranks in sessions of their own,
    so killing the step's process group alone leaves them running, orphaned."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_process(cmd: list[str], timeout_s: float, log_path: Path, env: dict[str, str]) -> int | None:
    """Run ``cmd`` in its own process group with output to ``log_path``; None when it timed out (then
    the group and every descendant, launcher children and their ranks included, are killed)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            tree = _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            return None


def _skip_reason(step: Step, ctx: Context, time_left: float) -> str | None:
    if step.cpu_skip and not ctx.cuda:
        return f"skipped ({step.cpu_skip})"
    if step.gpu_skip and ctx.cuda:
        return f"skipped (CPU only: {step.gpu_skip})"
    lacking = missing(step.needs)
    if lacking:
        return f"skipped (missing: {', '.join(lacking)})"
    if time_left < (COMPILE_MIN_S if step.timeout_s is None else MIN_STEP_S):
        return "skipped (no budget left)"
    return None


def judge(step: Step, returncode: int | None, result: dict | None, seconds: float = 0.0) -> tuple[str, dict]:
    """Status and key figures from the exit status and the JSON the step wrote. A step killed at its
    timeout may have left a partial result (``unfinished``: what it was doing, ``started_s``: when);
    its figures then say how long that part ran."""
    if returncode is None:
        if result and result.get("unfinished"):
            return "timeout", {"unfinished": result["unfinished"], "ran_s": round(seconds - result["started_s"], 1)}
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
    limit = None if step.timeout_s is None else step.timeout_s * ctx.timeout_scale
    timeout = time_left if limit is None else min(limit, time_left)
    log_path = ctx.work / f"{step.name}.log"
    start = time.perf_counter()
    returncode = run_process(cmd, timeout, log_path, child_env(ctx))
    seconds = time.perf_counter() - start
    result = json.loads(out.read_text()) if out.is_file() else None
    status, figures = judge(step, returncode, result, seconds)
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


def _write(out: Path, records: list[dict], header: str) -> None:
    with open(out / "session.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    (out / "summary.md").write_text(summary_table(records, header))  # after every step: a kill keeps it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out())
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for all steps together ({BUDGET_S} for the main plan, {RERUN_BUDGET_S} for --plan extra "
        "and --rerun-failed; 1800 for --smoke on a CPU)",
    )
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE", "") not in ("", "0"))
    parser.add_argument("--plan", choices=("main", "extra", "all"), default="main")
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=None,
        help=f"multiply every step's timeout ({SMOKE_TIMEOUT_SCALE} for --smoke, else 1): a loaded CPU needs more",
    )
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None)
    parser.add_argument(
        "--rerun-failed",
        nargs="?",
        const="",
        default=None,
        metavar="SESSION_JSONL",
        help="rerun only the steps that did not pass in an earlier session.jsonl (default: the one in --out); "
        "the new session.jsonl and summary.md hold the earlier records with those steps replaced",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    earlier: list[dict] = []
    if args.rerun_failed is not None:
        path = Path(args.rerun_failed or out / "session.jsonl")
        if not path.is_file():
            print(
                f"--rerun-failed: no earlier session at {path}; give the session.jsonl that came back", file=sys.stderr
            )
            sys.exit(2)
        earlier = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        args.only = failed_steps(earlier)
        print(f"rerunning the steps that did not pass: {', '.join(args.only) or 'none'}", flush=True)
    if args.budget is None:
        args.budget = 1800.0 if args.smoke else PLANS["extra" if earlier or args.plan != "main" else "main"]
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
        timeout_scale=args.timeout_scale or (SMOKE_TIMEOUT_SCALE if args.smoke else 1.0),
    )
    steps = [s for s in STEPS if s.name in args.only] if args.only else plan_steps(args.plan, ctx.cuda)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "steps.log"
    logs.write_text("")
    records: list[dict] = list(earlier)
    for step in steps:
        record, tail = run_step(step, ctx, args.budget - (time.perf_counter() - start))
        if earlier:
            record["rerun"] = True
        records = [r for r in records if r["step"] != step.name] + [record]
        records.sort(key=lambda r: [s.name for s in STEPS].index(r["step"]))
        print(
            f"[{time.perf_counter() - start:6.1f} s] {step.name}: {record['status']} ({record['seconds']} s) "
            f"{json.dumps(record['figures'])}",
            flush=True,
        )
        with open(logs, "a") as fh:
            fh.write(
                f"===== {step.name}: {record['status']} ({record['seconds']} s)\n{record.get('command', '')}\n{tail}\n"
            )
        header = (
            f"# GPU session{' (smoke run on the CPU)' if args.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}"
            f"\n\n{len(steps)} steps ({'rerun of the failed ones' if earlier else f'plan {args.plan}'}) in "
            f"{time.perf_counter() - start:.0f} s of a {args.budget:.0f} s budget; "
            f"missing packages: {', '.join(lacking) or 'none'}. Full results: session.jsonl; output tails: "
            "steps.log."
        )
        _write(out, records, header)
    if not steps:
        _write(out, records, f"# GPU session, {time.strftime('%Y-%m-%d %H:%M')}\n\nnothing to run.")
    print(f"wrote {out / 'session.jsonl'}, {out / 'summary.md'}, {logs}")


if __name__ == "__main__":
    main()
