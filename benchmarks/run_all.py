"""Run every CPU benchmark and write the tables to docs/performance.md.

    python benchmarks/run_all.py [--quick] [--out docs/performance.md]

Each benchmark is its own script (see benchmarks/README.md) that prints and saves JSON; this runner
calls them one after the other (so they do not compete for the cores), collects the JSON and renders
one Markdown page with the command, machine and date of every figure. ``--quick`` uses fewer repeats
and samples (for a smoke run; its figures are noisier).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import subprocess_env  # noqa: E402


def _run(name: str, args: list[str], out: Path) -> dict | list:
    cmd = [sys.executable, f"benchmarks/{name}.py", *args, "--json", str(out)]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env=subprocess_env())
    return json.loads(out.read_text())


def _machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _model_section(r: dict, cmd: str) -> str:
    gflop = r["gflop_per_step"]
    return f"""## Model step (forward + backward), CPU

`{cmd}`: {r["config"]}, batch {r["batch"]}, {r["size"]} px, {r["threads"]} threads, median of interleaved repeats
after warm-up. Outputs of our model and the per-task-loop reference agree to {r["max_abs_diff_vs_reference"]:.1e}.
GFLOP counts matmuls and convolutions of the forward and of the backward that runs (FlopCounterMode).
Why the targets are where they are: [performance-model.md](performance-model.md).

| what | step (s) | GFLOP |
|---|---|---|
| MTLoRA model (ours) | {r["mtlora_step_s"]:.3f} | {gflop["ours"]:.1f} |
| same math, per-task-loop reference (`benchmarks/reference_mtlora.py`) | {r["reference_step_s"]:.3f} | {gflop["reference"]:.1f} |
| speed-up of ours over the reference | **{r["speedup_vs_reference"]:.2f}x** (target 1.5x) | |
| MTLoRA backbone only | {r["mtlora_backbone_step_s"]:.3f} | {gflop["backbone"]:.1f} |
| plain frozen timm Swin of the same size | {r["plain_frozen_swin_step_s"]:.3f} | {gflop["plain"]:.1f} |
| adapter overhead on the frozen backbone | **{r["adapter_overhead_backbone"]:.2f}x** (target < 1.3x) | {r["adapter_flop_ratio_backbone"]:.2f}x |
"""


def _data_section(results: dict, cmd: str) -> str:
    rows = results["epochs"]
    lines = [
        "## Data pipeline, CPU",
        "",
        f"`{cmd}`: decoded and augmented samples per second "
        "(details and per-core figures in [performance-data.md](performance-data.md)).",
        "",
        "| source | workers | samples/s | samples per CPU-second |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['source']} | {row['workers']} | {row['samples_per_s']:.1f} | "
            f"{row.get('samples_per_cpu_s', float('nan'))} |"
        )
    return "\n".join(lines) + "\n"


def _checkpoint_section(r: dict, cmd: str) -> str:
    mib = 2**20
    return f"""## Checkpoints

`{cmd}`: {r["trainable_params"]:,} trainable / {r["frozen_params"]:,} frozen parameters, ZeRO-{r["zero_stage"]}, fp32.

| checkpoint | size (MiB) |
|---|---|
| ours (trainable state only) | {r["ours_bytes"] / mib:.1f} |
| expected: trainable x 12 bytes (fp32 master, 2 Adam moments) | {r["expected_bytes"] / mib:.1f} |
| DeepSpeed default (frozen backbone included) | {r["default_bytes"] / mib:.1f} |

Ours is {r["ours_vs_expected"]:.3f}x the expected size; save {r["save_s"]:.2f} s, load {r["load_s"]:.2f} s (local disk).
"""


def _zero_section(rows: list, cmd: str) -> str:
    lines = [
        "## ZeRO stages, 2 CPU ranks (gloo)",
        "",
        f"`{cmd}`",
        "",
        "| ZeRO stage | rank | step (s) | peak RSS (MiB) | optimizer state (MiB) | 12 x trainable / ranks (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['rank']} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['ideal_bytes'] / 2**20:.1f} |"
        )
    lines += [
        "",
        "Stage 0 keeps the full Adam state (8 bytes x trainable) on every rank; stages 1-2 shard it "
        "together with the fp32 master copy (12 bytes x trainable / ranks); under stage 3 in fp32 the "
        "partitioned parameters are the master copy, so only the two moments count (8 bytes / ranks).",
        "",
        "Bucket sizes: with DeepSpeed's 5e8-element default, ZeRO-1/2 allocate 1907 MiB of gradient bucket",
        "buffers per rank for the step whatever the model; sized to the trainable set (the default since",
        "2026-12-06) they are 4.0 MiB (quickstart) and 7.7 MiB (Swin-T r64). Figures, rule and command:",
        "[gpu.md](gpu.md#buckets-and-gradient-dtypes).",
    ]
    return "\n".join(lines) + "\n"


def _gpu_section() -> str:
    return """## GPU figures still to be taken

No GPU has been lent to this project yet, so every H100/H200 figure is still to be taken. One prepared
command takes them in 8 minutes, highest value first, each step its own subprocess with its own timeout:
`bash benchmarks/gpu_session.sh` on the device machine, with the wheels of `benchmarks/build_wheels.sh`
carried in `.whl/`:

1. the environment (every third-party module the code imports, imported) and correctness on CUDA (fp64
   gradcheck of the fused ops, bf16 vs fp32, dropout rates, checkpointing + dropout gradients, control
   collectives beside an NCCL group);
2. 30 Swin-B steps at 448 px, bf16, ZeRO-2 through `deepspeed --num_gpus 1 launch/train.py`, with an
   evaluation, a checkpoint and a resume;
3. two ranks on the one GPU (a `cuda:gloo` default group, which refuses CPU tensors as NCCL does) through
   the trainer at ZeRO-2 and ZeRO-3, bf16, SyncBN on: 10 steps, an evaluation, a checkpoint, a resume;
4. Swin-B (batch 32) and Swin-L (batch 8) at 448 px, bf16, ZeRO-2, eager and compiled: images/s, peak
   memory, MFU and HFU against the device's nominal dense peak (and against the measured matmul rate);
5. the loader with 8 and 16 workers; more throughput shapes; our model step against the per-task loop;
   host-to-device copies.

It writes `session.jsonl`, `summary.md` and `steps.log`. Its CPU smoke mode (`SMOKE=1`) runs in CI, and
`bash benchmarks/device_twin.sh` runs that smoke mode in a copy of the lent machine's environment
([gpu.md](gpu.md#the-device-twin)). How to run it: [benchmarks/README.md](../benchmarks/README.md).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="docs/performance.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mtlora-bench-"))
    repeats = ["--repeats", "2" if args.quick else "7"]
    model_args = ["--config", "configs/pascal_swin_t_r64.yaml", "--batch", "2", "--size", "224", *repeats]
    data_args = ["--num-samples", "64" if args.quick else "256", "--repeats", "1" if args.quick else "3"]
    ckpt_args = ["--model", "benchmarks.model_factories:swin_t_r64"]
    zero_args = ["--config", "configs/pascal_swin_t_r64.yaml", "--size", "224", "--batch", "2", "--steps", "3"]
    sections = [
        _model_section(
            _run("model_step", model_args, tmp / "model.json"),
            "python benchmarks/model_step.py " + " ".join(model_args),
        ),
        _data_section(
            _run("data_throughput", data_args, tmp / "data.json"),
            "python benchmarks/data_throughput.py " + " ".join(data_args),
        ),
        _checkpoint_section(
            _run("checkpoint_size", ckpt_args, tmp / "ckpt.json"),
            "python benchmarks/checkpoint_size.py " + " ".join(ckpt_args),
        ),
        _zero_section(
            _run("zero_stages", zero_args, tmp / "zero.json"), "python benchmarks/zero_stages.py " + " ".join(zero_args)
        ),
        _gpu_section(),
    ]
    header = (
        f"# Performance\n\nGenerated by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}; machine: {_machine()}.\nWhat each figure means and what is "
        "still to be measured on GPUs: [benchmarks/README.md](../benchmarks/README.md). Details and analysis: "
        "[model step](performance-model.md), [data](performance-data.md), "
        "[checkpoints](performance-checkpoint.md), [export](performance-export.md).\n\n"
    )
    Path(REPO / args.out).write_text(header + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
