"""Forward+backward time of the MTLoRA model against the per-task-loop reference and a plain frozen
timm Swin of the same size (the adapter overhead).

    python benchmarks/model_step.py [--config configs/pascal_swin_t_r64.yaml] [--batch 2] [--size 224]
        [--repeats 5] [--threads 2] [--device cuda|cpu] [--precision fp32|bf16] [--json out.json] [key=value ...]

Both MTLoRA implementations run on the same weights, on ``--device`` (default: the GPU when there is
one), with parameters in ``--precision`` and buffers as the training engine keeps them. The script
first checks that they give the same outputs (eval mode; within the rounding of that precision, and
with TF32 off for fp32 on a GPU), then times training steps (dropout and drop-path on, as in training),
interleaved so that machine noise hits all variants alike, after warm-up steps that let the heap
reach its peak (``keep_freed_memory``, as training does on a CPU); on a GPU each timing waits for
the device before and after the step. It also counts each step's
matmul/conv FLOPs (forward plus the backward that runs), which bound how far apart the times can be.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.engine.host_memory import keep_freed_memory  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402

from common import DTYPES, cast_like_engine, default_device, emit, exact_fp32, randomize_lora, sync  # noqa: E402
from reference_mtlora import check_agreement, ref_model  # noqa: E402


def _time_steps(steps: dict, repeats: int, device: torch.device, warmup: int = 3) -> dict[str, list[float]]:
    """Time several step functions, interleaved so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _gflop(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e9


def _train_step(model, forward, images):
    def step():
        model.zero_grad(set_to_none=True)
        out = forward(images)
        sum(o.float().square().mean() for o in out.values()).backward()

    return step


def _plain_swin(cfg, size: int) -> torch.nn.Module:
    """A frozen timm Swin of the backbone's size, with one trainable tensor so that a backward runs."""
    plain = timm.create_model(
        cfg.model.backbone,
        num_classes=0,
        img_size=(size, size),
        drop_path_rate=cfg.model.drop_path_rate,
        **dict(cfg.model.backbone_kwargs),
    ).train()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.patch_embed.proj.weight.requires_grad_(True)  # something to backpropagate into, as a frozen backbone has
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_t_r64.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host_memory_kept = keep_freed_memory() if device.type == "cpu" else False
    if dtype == torch.float32:
        exact_fp32()

    cfg = load_config(
        args.config, [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null", *args.overrides]
    )
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    randomize_lora(model)
    model = cast_like_engine(model.to(device), dtype)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)

    model.eval()
    with torch.no_grad():
        max_diff = check_agreement(model(images), ref_model(model, images))

    model.train()
    plain = _plain_swin(cfg, args.size).to(device=device, dtype=dtype)

    def backbone_step():
        model.zero_grad(set_to_none=True)
        sum(f.float().square().mean() for f in model.backbone(images)).backward()

    steps = {
        "ours": _train_step(model, model, images),
        "reference": _train_step(model, lambda x: ref_model(model, x), images),
        "backbone": backbone_step,
        "plain": lambda: plain.forward_features(images).float().square().mean().backward(),
    }
    gflop = {name: _gflop(step) for name, step in steps.items()}
    times = _time_steps(steps, args.repeats, device)
    t_ours, t_ref, backbone_only, t_plain = (times[k] for k in ("ours", "reference", "backbone", "plain"))

    result = {
        "config": args.config,
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "max_abs_diff_vs_reference": max_diff,
        "mtlora_step_s": statistics.median(t_ours),
        "reference_step_s": statistics.median(t_ref),
        "speedup_vs_reference": statistics.median(t_ref) / statistics.median(t_ours),
        "mtlora_backbone_step_s": statistics.median(backbone_only),
        "plain_frozen_swin_step_s": statistics.median(t_plain),
        "adapter_overhead_backbone": statistics.median(backbone_only) / statistics.median(t_plain),
        "gflop_per_step": gflop,
        "repeat_times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "adapter_flop_ratio_backbone": gflop["backbone"] / gflop["plain"],
        "host_memory_kept": host_memory_kept,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
