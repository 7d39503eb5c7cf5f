"""Forward+backward time of the MTLoRA model against the per-task-loop reference and a plain frozen
timm Swin of the same size (the adapter overhead).

    python benchmarks/model_step.py [--config configs/pascal_swin_t_r64.yaml] [--batch 2] [--size 224]
        [--repeats 5] [--threads 2] [--json out.json] [key=value ...]

Both MTLoRA implementations run on the same weights; the script first checks that they give the
same outputs (eval mode), then times training steps (dropout and drop-path on, as in training),
interleaved so that machine noise hits all variants alike, after warm-up steps that let the heap
reach its peak (``keep_freed_memory``, as training does on a CPU). It also counts each step's
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
from common import emit  # noqa: E402
from reference_mtlora import ref_model  # noqa: E402

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mtlora_dist.engine.config import load_config  # noqa: E402
from mtlora_dist.engine.host_memory import keep_freed_memory  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402


def _randomize_lora(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _time_steps(steps: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time several step functions, interleaved so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_t_r64.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host_memory_kept = keep_freed_memory()

    cfg = load_config(args.config, [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null", *args.overrides])
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    _randomize_lora(model)
    images = torch.randn(args.batch, 3, args.size, args.size)

    model.eval()
    with torch.no_grad():
        ours, ref = model(images), ref_model(model, images)
    max_diff = max((ours[t] - ref[t]).abs().max().item() for t in ours)
    scale = max(ref[t].abs().max().item() for t in ref)
    if max_diff > 1e-4 * max(scale, 1.0):
        raise SystemExit(f"outputs differ: max |ours - reference| = {max_diff:.3e}")

    model.train()
    plain = timm.create_model(cfg.model.backbone, num_classes=0, img_size=(args.size, args.size),
                              drop_path_rate=cfg.model.drop_path_rate, **dict(cfg.model.backbone_kwargs)).train()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.patch_embed.proj.weight.requires_grad_(True)  # something to backpropagate into, as a frozen backbone has

    def backbone_step():
        model.zero_grad(set_to_none=True)
        sum(f.square().mean() for f in model.backbone(images)).backward()

    steps = {
        "ours": _train_step(model, model, images),
        "reference": _train_step(model, lambda x: ref_model(model, x), images),
        "backbone": backbone_step,
        "plain": lambda: plain.forward_features(images).square().mean().backward(),
    }
    gflop = {name: _gflop(step) for name, step in steps.items()}
    times = _time_steps(steps, args.repeats)
    t_ours, t_ref, backbone_only, t_plain = (times[k] for k in ("ours", "reference", "backbone", "plain"))

    result = {
        "config": args.config, "batch": args.batch, "size": args.size, "threads": args.threads,
        "max_abs_diff_vs_reference": max_diff,
        "mtlora_step_s": statistics.median(t_ours), "reference_step_s": statistics.median(t_ref),
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
