"""Training throughput, peak memory and model FLOPs utilisation (MFU) of one accelerator.

    python benchmarks/gpu_throughput.py --config configs/pascal_swin_b.yaml [--batch 16] [--steps 20]
        [--precision bf16] [--grad-checkpointing] [--compile] [--json out.json]
    python benchmarks/gpu_throughput.py --config configs/quickstart.yaml --batch 2 --steps 2   # CPU smoke run

One process, DeepSpeed ZeRO-2 through the trainer's own ``initialize_engine``, random inputs and the
real multi-task loss. FLOPs are counted with ``torch.utils.flop_counter`` over one forward plus the
backward that actually runs (with a frozen backbone, autograd computes no weight gradients for it),
and MFU divides the achieved FLOP rate by the device's *measured* dense matmul rate in the same dtype.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, random_targets  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s of the device in ``dtype``."""
    n, repeats = (n, repeats) if device.type == "cuda" else (512, 3)  # CPUs: a smoke-run sized product
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_b.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model before DeepSpeed wraps it")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from mtlora_dist.engine.config import load_config
    from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype
    from mtlora_dist.engine.distributed import init_distributed
    from mtlora_dist.models import build_model
    from mtlora_dist.tasks.losses import MultiTaskLoss

    info = init_distributed()
    cfg = load_config(args.config, [f"model.img_size=[{args.size},{args.size}]", "model.pretrained=null",
                                    f"deepspeed.precision={args.precision}", "deepspeed.zero_stage=2",
                                    f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset).to(info.device)
    if args.compile:
        model = torch.compile(model)
    engine = initialize_engine(model, cfg.optim, cfg.deepspeed, args.batch, 1, 10_000)
    dtype = model_dtype(cfg.deepspeed)
    loss_fn = MultiTaskLoss(cfg.data.tasks)
    images = torch.randn(args.batch, 3, args.size, args.size, device=info.device, dtype=dtype)
    targets = random_targets(cfg.data.tasks, args.batch, args.size, info.device)

    def step() -> None:
        outputs = engine(images)
        total, _ = loss_fn({t: o.float() for t, o in outputs.items()}, targets)
        engine.backward(total)
        engine.step()

    step()  # warm-up: optimizer state, kernels, compilation
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    times = []
    for _ in range(args.steps):
        _sync(info.device)
        start = time.perf_counter()
        step()
        _sync(info.device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else float("nan")
    rate = matmul_rate(info.device, dtype)
    result = {
        "config": args.config, "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "batch": args.batch, "size": args.size, "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile,
        "step_s": step_s, "images_per_s": args.batch / step_s, "peak_memory_gib": peak,
        "model_tflop_per_step": flops_per_step / 1e12, "achieved_tflops": flops_per_step / step_s / 1e12,
        "measured_matmul_tflops": rate / 1e12, "mfu": flops_per_step / step_s / rate,
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
