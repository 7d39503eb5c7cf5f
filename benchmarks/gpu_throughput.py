"""Training throughput, peak memory and model FLOPs utilisation (MFU) of one accelerator.

    python benchmarks/gpu_throughput.py --config configs/pascal_swin_b.yaml [--batch 16] [--steps 20]
        [--precision bf16] [--grad-checkpointing] [--compile] [--json out.json]
    python benchmarks/gpu_throughput.py --config configs/quickstart.yaml --batch 2 --steps 2   # CPU smoke run

One process, DeepSpeed ZeRO-2 through the trainer's own ``initialize_engine``, random inputs and the
real multi-task loss. MFU divides the *model* FLOPs of a step by the step time and by the device's
*nominal* dense peak in the same dtype (``peak_flops.py``, by device name; the usual definition), HFU
does the same with the hardware FLOPs; both are also given against the *measured* dense matmul rate
(``mfu_vs_matmul``, ``hfu_vs_matmul``), which is ~0.8x the nominal peak on an H100/H200. Model FLOPs are counted with
``torch.utils.flop_counter`` over one forward plus the backward that actually runs (a frozen backbone
gets no weight gradients), on a plain copy of the same model and shapes: uncompiled (a compiled graph
can hide its matmuls from the counter) and without activation checkpointing (whose recompute is work
the hardware does, not work the model needs: counting it overstates Swin-B's MFU 1.38x). The FLOP
convention, stated: "model FLOPs" are the forward plus the backward that runs; with the backbone frozen
the backward computes input gradients through it but no weight gradients, so it is ~1.39x the forward
for Swin-B at 448 px (``backward_over_forward``), not the 2x that the usual "3 x forward" shortcut
assumes. Both are reported side by side: ``mfu`` (model FLOPs) and ``mfu_3x_forward`` (3 x forward),
which reads higher by 3 / 2.39 for Swin-B. With
``--grad-checkpointing`` the hardware FLOPs (recompute included) and the hardware FLOPs utilisation
are reported beside it. ``--compile`` is skipped with a message where ``torch.compile`` cannot work
(e.g. no C++ compiler for a CPU); the result then says so.
"""

from __future__ import annotations

import time

PROCESS_T0 = time.time()  # before the heavy imports: a partial result says how far into the run it was written

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DTYPES, cast_like_engine, emit, random_targets, sync  # noqa: E402
from peak_flops import nominal_peak, utilisation  # noqa: E402


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s of the device in ``dtype``."""
    n, repeats = (n, repeats) if device.type == "cuda" else (512, 3)  # CPUs: a smoke-run sized product
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _build(cfg, grad_checkpointing: bool) -> torch.nn.Module:
    from mtlora_dist.models import build_model

    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg.model, grad_checkpointing=grad_checkpointing)
    return build_model(model_cfg, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


def step_flops(cfg, batch: int, size: int, device: torch.device, dtype: torch.dtype, grad_checkpointing: bool) -> int:
    """FLOPs of one training forward and backward (:func:`forward_and_step_flops`)."""
    return forward_and_step_flops(cfg, batch, size, device, dtype, grad_checkpointing)[1]


def forward_and_step_flops(
    cfg, batch: int, size: int, device: torch.device, dtype: torch.dtype, grad_checkpointing: bool
) -> tuple[int, int]:
    """FLOPs of one training forward and backward of a plain eager copy of the model (no DeepSpeed,
    no compile); with ``grad_checkpointing`` the backward's recompute is counted too. Every counted
    op (matmul, convolution, attention) is linear in the batch, so a batch of one, times the batch,
    gives the count without the memory of a whole un-checkpointed batch. Returns (forward, forward +
    backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtlora_dist.tasks.losses import MultiTaskLoss

    model = cast_like_engine(_build(cfg, grad_checkpointing).to(device), dtype).train()
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    targets = random_targets(cfg.data.tasks, batch, size, device)
    loss_fn = MultiTaskLoss(cfg.data.tasks)
    with FlopCounterMode(display=False) as counter:
        outputs = model(images)
        total, _ = loss_fn({t: o.float() for t, o in outputs.items()}, targets)
        forward = counter.get_total_flops()
        total.backward()
    del model, outputs, total
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return forward, counter.get_total_flops()


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (a tiny probe fails), or None when it can."""
    try:
        probe = torch.compile(lambda x: (x * 2).sum())
        probe(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means: measure without compile
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pascal_swin_b.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model before DeepSpeed wraps it")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mtlora_dist.config import load_config
    from mtlora_dist.data.config import BatchGeometry
    from mtlora_dist.engine.deepspeed_setup import initialize_engine, model_dtype
    from mtlora_dist.engine.distributed import init_distributed
    from mtlora_dist.models.compile import compile_model
    from mtlora_dist.tasks.losses import MultiTaskLoss

    info = init_distributed()
    cfg = load_config(
        args.config,
        [
            f"model.img_size=[{args.size},{args.size}]",
            "model.pretrained=null",
            f"deepspeed.precision={args.precision}",
            "deepspeed.zero_stage=2",
        ],
    )
    dtype = model_dtype(cfg.deepspeed)
    forward_flops, model_flops = (
        args.batch * n for n in forward_and_step_flops(cfg, 1, args.size, info.device, dtype, grad_checkpointing=False)
    )
    hardware_flops = (
        args.batch * step_flops(cfg, 1, args.size, info.device, dtype, grad_checkpointing=True)
        if args.grad_checkpointing
        else model_flops
    )
    convention_flops = 3 * forward_flops  # the common "backward = 2x forward" shortcut
    images = torch.randn(args.batch, 3, args.size, args.size, device=info.device, dtype=dtype)
    targets = random_targets(cfg.data.tasks, args.batch, args.size, info.device)

    compile_skipped = compile_unavailable(info.device) if args.compile else None
    if compile_skipped:
        print(f"torch.compile does not work on this machine ({compile_skipped}); measuring without it", flush=True)
    model = _build(cfg, args.grad_checkpointing).to(info.device)
    if args.compile and not compile_skipped:
        model = compile_model(model, "model")  # what model.compile=model gives a training run
    engine = initialize_engine(
        model, cfg.optim, cfg.deepspeed, BatchGeometry(args.batch, cfg.deepspeed.gradient_accumulation_steps), 10_000
    )
    loss_fn = MultiTaskLoss(cfg.data.tasks)

    def step() -> None:
        outputs = engine(images)
        total, _ = loss_fn({t: o.float() for t, o in outputs.items()}, targets)
        engine.backward(total)
        engine.step()

    if args.compile and not compile_skipped:  # killed while compiling, the session still learns for how long
        emit({"unfinished": "the first (compiling) step", "started_s": time.time() - PROCESS_T0}, args.json)
    compile_start = time.perf_counter()
    step()  # warm-up: optimizer state, kernels, compilation
    sync(info.device)
    first_step_s = time.perf_counter() - compile_start
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    times = []
    for _ in range(args.steps):
        sync(info.device)
        start = time.perf_counter()
        step()
        sync(info.device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
    rate = matmul_rate(info.device, dtype)
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    peak_rate = nominal_peak(device_name, dtype)
    result = {
        "config": args.config,
        "device": device_name,
        "batch": args.batch,
        "size": args.size,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "compile": args.compile and not compile_skipped,
        "compile_skipped": compile_skipped,
        "first_step_s": first_step_s,
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "peak_memory_gib": peak,
        "model_tflop_per_step": model_flops / 1e12,
        "achieved_tflops": model_flops / step_s / 1e12,
        "nominal_peak_tflops": peak_rate / 1e12 if peak_rate else None,
        "measured_matmul_tflops": rate / 1e12,
        "forward_tflop_per_step": forward_flops / 1e12,
        **utilisation(forward_flops, model_flops, step_s, peak_rate),
        "mfu_vs_matmul": model_flops / step_s / rate,
        "mfu_3x_forward_vs_matmul": convention_flops / step_s / rate,
        "hardware_tflop_per_step": hardware_flops / 1e12,
        "hfu": hardware_flops / step_s / peak_rate if peak_rate else None,
        "hfu_vs_matmul": hardware_flops / step_s / rate,
        "flops_counted_on": "eager copy of the model, batch of one times the batch, same image size and dtype; "
        "model FLOPs without recompute, hardware FLOPs with it",
        "flop_convention": "mfu: model FLOPs = forward + the backward that runs (the frozen backbone computes "
        "no weight gradients, so backward is backward_over_forward x forward, not 2x); mfu_3x_forward: "
        "3 x forward FLOPs, the usual convention, for comparison with figures quoted that way",
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(result, args.json)


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
