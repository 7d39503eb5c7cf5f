"""Compiled (``model.compile``) against eager training steps: time per step and time to compile.

    python benchmarks/compile_speed.py [--config configs/quickstart.yaml] [--batch 8] [--size 96]
        [--mode model|blocks] [--backend inductor] [--repeats 10] [--threads 2] [--device cpu|cuda]
        [--profile] [--json out.json] [key=value ...]
    python benchmarks/compile_speed.py --dropout-only

``--dropout-only`` times one LoRA dropout draw and application on a (6272, 384) input (Swin-T's
stage-0 tokens at 224 px, batch 2) instead: the eager positions sampler, the hashed sampler that
compiled code uses, run eagerly and compiled by inductor, and ``nn.functional.dropout``.

Two copies of the model with the same weights, one compiled by
:func:`mtlora_dist.models.compile.compile_model` as a training run compiles it, each with its own
AdamW over the trainable parameters. A step is forward, a loss over every task, backward and the
optimizer step, in train mode (LoRA dropout and drop-path as configured). The first compiled step is
timed on its own (``compile_s``: tracing and code generation); then both variants warm up and are
timed interleaved, so that machine noise hits both alike, and ``speedup`` is the median of the
per-pair ratios eager/compiled. ``graphs_after_first_step`` and ``graphs_at_end`` count the graphs
dynamo made: equal means nothing recompiled. ``--profile`` adds the operators with the most self time
in one step of each variant, the place to look when compiled is not faster.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mtlora_dist.config import load_config  # noqa: E402
from mtlora_dist.engine.host_memory import keep_freed_memory  # noqa: E402
from mtlora_dist.models import build_model  # noqa: E402
from mtlora_dist.models.compile import compile_model  # noqa: E402

from common import default_device, emit, randomize_lora, sync  # noqa: E402


def _train_step(model: torch.nn.Module, images: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(o.float().square().mean() for o in model(images).values()).backward()
        optimizer.step()

    return step


def _timed(step, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _top_ops(step, rows: int = 12) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _dropout_draws(repeats: int) -> dict:
    from mtlora_dist.adapters.dropout import DropMask, hashed_masks

    x = torch.randn(6272, 384)

    def hashed_eager() -> torch.Tensor:
        with hashed_masks():
            return DropMask(x.shape, 0.05).apply(x)

    compiled = torch.compile(lambda t: DropMask(t.shape, 0.05).apply(t), fullgraph=True)
    draws = {
        "positions": lambda: DropMask(x.shape, 0.05).apply(x),
        "hashed_eager": hashed_eager,
        "hashed_inductor": lambda: compiled(x),
        "nn_dropout": lambda: torch.nn.functional.dropout(x, 0.05),
    }
    for _ in range(3):
        for draw in draws.values():
            draw()
    times: dict[str, list[float]] = {name: [] for name in draws}
    for _ in range(repeats):
        for name, draw in draws.items():
            times[name].append(_timed(draw, torch.device("cpu")))
    return {f"{name}_ms": statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--mode", default="model", choices=("model", "blocks"))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each")
    parser.add_argument("--dropout-only", action="store_true", help="time the dropout samplers instead (CPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    host_memory_kept = keep_freed_memory() if device.type == "cpu" else False
    machine = {
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.dropout_only:
        emit({**_dropout_draws(max(args.repeats, 15)), "threads": args.threads, **machine}, args.json)
        return

    cfg = load_config(
        args.config, [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null", *args.overrides]
    )
    eager = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)
    randomize_lora(eager)
    eager = eager.to(device).train()
    compiled = compile_model(copy.deepcopy(eager), args.mode, backend=args.backend)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    steps = {"eager": _train_step(eager, images), "compiled": _train_step(compiled, images)}

    compile_s = _timed(steps["compiled"], device)
    graphs_after_first = _graphs()
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]

    result = {
        "config": args.config,
        "overrides": args.overrides,
        "batch": args.batch,
        "size": args.size,
        "mode": args.mode,
        "backend": args.backend,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "adapter_dropout": cfg.adapter.dropout,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "compile_s": compile_s,
        "eager_step_s": statistics.median(times["eager"]),
        "compiled_step_s": statistics.median(times["compiled"]),
        "speedup": statistics.median(ratios),
        "graphs_after_first_step": graphs_after_first,
        "graphs_at_end": _graphs(),
        "repeat_times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "host_memory_kept": host_memory_kept,
        **machine,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.profile:
        for name, step in steps.items():
            print(f"--- {name}: operators by self time, one step", flush=True)
            print(_top_ops(step), flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
