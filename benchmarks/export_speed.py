"""Inference speed of the exported (folded) model against the trained model it comes from.

    python benchmarks/export_speed.py [--config configs/pascal_swin_t_r64.yaml] [--batch 1] [--size 448]
        [--repeats 7] [--threads 1] [--device cpu] [--write-doc docs/performance-export.md] [--json out.json]

Three forms of the same weights (adapters random and non-zero, as after training), in eval mode, no grad:
the trained model (every MTLoRA branch computed), the default export (``to_inference``: TA-LoRA merged,
BatchNorm folded), and the export with ``fold_task_proj`` (task attention projections as per-task
weights too). For scale it also times the plain timm Swin's ``forward_features`` (same backbone, no adapters,
no task streams, no heads). The script first checks that all three give the same outputs, then times forward passes
interleaved so that machine noise hits all of them alike, and reports medians of wall time and of the
process's CPU time. On a shared CPU machine use one torch thread and the CPU time: it does not count the
time other processes hold the cores (with several threads, OpenMP workers spin while they wait, and wall
time under contention can change several-fold between runs). On a GPU the wall time is the figure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.export import to_inference  # noqa: E402
from mtlora_dist.export.merge import output_difference  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402

VARIANTS = ("trained (unmerged)", "export (default)", "export + fold_task_proj")
REFERENCE = "reference: timm Swin features only"


def _randomize_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(
    forwards: dict[str, Callable[[torch.Tensor], Any]], images: torch.Tensor, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per forward function: wall and process CPU seconds of each call."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in forwards}
    with torch.no_grad():
        for model in forwards.values():  # warm-up
            model(images)
        for _ in range(repeats):
            for name, model in forwards.items():
                _sync(images.device)
                wall, cpu = time.perf_counter(), time.process_time()
                model(images)
                _sync(images.device)
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = load_config(args.config, [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null"])
    trained = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    _randomize_adapters(trained)
    trained.eval()
    default, folded = copy.deepcopy(trained), copy.deepcopy(trained)
    summaries = [to_inference(default), to_inference(folded, fold_task_proj=True)]
    models = {name: m.to(device) for name, m in zip(VARIANTS, (trained, default, folded))}
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    differences = {name: max(output_difference(trained, m, images).values()) for name, m in models.items()}
    if max(differences.values()) > 1e-4:
        raise SystemExit(f"outputs differ: {differences}")
    plain = (
        timm.create_model(
            cfg.model.backbone, num_classes=0, img_size=(args.size, args.size), **dict(cfg.model.backbone_kwargs)
        )
        .eval()
        .to(device)
    )
    times = _time({**models, REFERENCE: plain.forward_features}, images, args.repeats)
    clock = "wall" if device.type == "cuda" else args.clock
    median = {clock_: {n: statistics.median(t[clock_]) for n, t in times.items()} for clock_ in ("wall", "cpu")}
    return {
        "config": args.config,
        "tasks": list(cfg.data.tasks),
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "device": str(device),
        "repeats": args.repeats,
        "clock": clock,
        "median_wall_s": median["wall"],
        "median_cpu_s": median["cpu"],
        "speedup": {n: median[clock][VARIANTS[0]] / t for n, t in median[clock].items()},
        "max_relative_difference": differences,
        "merged_layers": summaries[0].ta_lora_merged,
        "layers_with_task_branches": len(summaries[0].adapters_left),
        "task_proj_folded": summaries[1].task_proj_folded,
    }


def report_markdown(result: dict, command: str, label: str) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {platform.system()}"
    if result["device"].startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    ms = {
        clock: {n: f"{t * 1000:,.0f} ms" for n, t in result[f"median_{clock}_s"].items()} for clock in ("wall", "cpu")
    }
    rows = [
        f"| {name} | {ms['wall'][name]} | {ms['cpu'][name]} | {result['speedup'][name]:.2f}x | "
        f"{result['max_relative_difference'][name]:.1e} |"
        for name in VARIANTS
    ]
    rows.append(f"| {REFERENCE} | {ms['wall'][REFERENCE]} | {ms['cpu'][REFERENCE]} | | |")
    return "\n".join(
        [
            f"## {label}: {datetime.date.today().isoformat()}",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine}; torch {torch.__version__}, {result['threads']} torch thread(s), {result['device']}",
            f"- Model: `{result['config']}` ({len(result['tasks'])} tasks), batch {result['batch']}, "
            f"{result['size']}x{result['size']}, fp32; {result['merged_layers']} layers merged, "
            f"{result['layers_with_task_branches']} keep task branches, {result['task_proj_folded']} task proj layers "
            f"folded by `fold_task_proj`",
            f"- Median of {result['repeats']} forward passes each, interleaved, after one warm-up; speed-up by "
            f"{result['clock']} time",
            "",
            "| model | forward, wall | forward, CPU | speed-up | max relative output difference |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_t_r64.yaml")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="speed-up by (CPU devices)")
    parser.add_argument("--label", default="", help="section title in --write-doc")
    parser.add_argument("--write-doc", default="", help="append the figures to this markdown file")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_doc:
        command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
        label = args.label or f"{Path(args.config).stem}, batch {args.batch}, {args.size} px, {args.device}"
        doc = Path(args.write_doc)
        if not doc.exists():
            doc.write_text(
                "# Export speed\n\nWritten by `benchmarks/export_speed.py`; newest last. "
                "What is folded and why: `docs/evaluation.md`.\n\n"
            )
        with doc.open("a") as fh:
            fh.write(report_markdown(result, command, label) + "\n")


if __name__ == "__main__":
    main()
