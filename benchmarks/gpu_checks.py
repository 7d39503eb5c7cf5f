"""Correctness on the accelerator, before any figure taken on it is believed.

    python benchmarks/gpu_checks.py [--device cuda|cpu] [--json out.json]

The unit tests run on the CPU; these are the checks whose answer can differ on a GPU (other kernels,
another dropout path, another process-group backend):

* ``fused_gradcheck``: fp64 ``gradcheck`` of the hand-written ops ``lora_linear`` and ``task_lora_linear``
  (every input layout, with and without a dropout mask of either kind), as tests/adapters/test_fused.py;
* ``bf16_forward``: a tiny model in bf16 (parameters cast as the engine casts them) and under bf16
  autocast against its fp32 forward (TF32 off), and against the per-task-loop reference in bf16;
* ``dropout_rates``: the dropped fraction of ``DropMask`` (positions and keep-mask draws) is within
  six standard deviations of p, and ``lora_dropout`` applies one mask to the input and its gradient;
* ``checkpointing_dropout``: activation checkpointing with LoRA dropout gives the gradients of the
  plain model (the recompute redraws the same positions), as tests/models/test_mtlora_swin.py;
* ``control_collectives``: a one-rank NCCL group (``cuda:gloo`` on a CPU machine: the same constraint)
  refuses a raw CPU-tensor collective, and ``mtlora_dist.comm``'s control collectives work beside it.

Each check reports passed or failed (with the error) on its own; the exit status is 0 when all passed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cast_like_engine, default_device, emit, exact_fp32, randomize_lora  # noqa: E402

TASKS = ["semseg", "normals"]
TINY_BACKBONE = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)


def tiny_model(device: torch.device, dropout: float = 0.0, grad_checkpointing: bool = False) -> torch.nn.Module:
    """A small MTLoRA Swin with two tasks and non-zero LoRA weights (seeded: equal weights every call)."""
    from mtlora_dist.adapters import AdapterConfig
    from mtlora_dist.models import ModelConfig, build_model
    from mtlora_dist.models.trainable import TrainableConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        img_size=[64, 64],
        backbone_kwargs=dict(TINY_BACKBONE),
        decoder_channels=[4, 4, 8, 8],
        head_hidden_channels=16,
        drop_path_rate=0.0,
        grad_checkpointing=grad_checkpointing,
    )
    model = build_model(
        cfg, AdapterConfig(shared_rank=2, task_rank=2, dropout=dropout), TrainableConfig(), TASKS, "pascal_context"
    )
    randomize_lora(model, std=0.05)
    return model.to(device)


# ------------------------------------------------------------------------------------------------ checks
def check_fused_gradcheck(device: torch.device) -> dict:
    from mtlora_dist.adapters.dropout import DropMask
    from mtlora_dist.adapters.fused import lora_linear, task_lora_linear

    d_in, d_out, rank, tasks, task_rank, n = 6, 5, 3, 3, 2, 7

    def f64(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)

    masks = {
        "none": lambda shape: None,
        "positions": lambda shape: DropMask(shape, 0.3, device, positions=True),
        "keep": lambda shape: DropMask(shape, 0.3, device, positions=False),
    }
    done = 0
    for kind, make in masks.items():
        torch.manual_seed(0)
        mask = make((2 * n, d_in))
        inputs = (f64(2, n, d_in), f64(d_out, d_in), f64(d_out), f64(rank, d_in), f64(d_out, rank), f64(1))
        assert torch.autograd.gradcheck(lambda *t, mask=mask: lora_linear(*t, mask=mask), inputs), (
            f"lora_linear, mask {kind}"
        )
        done += 1
        for task_input in (False, True):
            for shared_in_tasks in (False, True):
                for with_shared in (False, True):
                    mask = make((n, d_in))
                    x = f64(1 + tasks, n, d_in) if task_input else f64(n, d_in)
                    shared = (f64(rank, d_in), f64(d_out, rank), f64(1)) if with_shared else ()
                    inputs = (
                        x,
                        f64(d_out, d_in),
                        f64(d_out),
                        f64(tasks, task_rank, d_in),
                        f64(tasks, task_rank, d_out),
                        f64(tasks),
                    ) + shared

                    def run(x, w, b, ta, tbt, ts, *sh, mask=mask, task_input=task_input, sit=shared_in_tasks):
                        return task_lora_linear(
                            x,
                            w,
                            b,
                            tuple(sh) or None,
                            ta,
                            tbt,
                            ts,
                            task_input=task_input,
                            shared_in_tasks=sit,
                            mask=mask,
                        )

                    assert torch.autograd.gradcheck(run, inputs), (
                        f"task_lora_linear, mask {kind}, task_input {task_input}, shared {with_shared}, "
                        f"shared_in_tasks {shared_in_tasks}"
                    )
                    done += 1
    return {"gradchecks": done}


def check_bf16_forward(device: torch.device) -> dict:
    from reference_mtlora import TOLERANCE, max_difference, ref_model

    model = tiny_model(device).eval()
    images = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        fp32 = model(images)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = model(images)
        bf16_model = cast_like_engine(copy.deepcopy(model), torch.bfloat16)
        bf16 = bf16_model(images.bfloat16())
        bf16_ref = ref_model(bf16_model, images.bfloat16())
    tol = TOLERANCE[torch.bfloat16]
    diffs = {
        "bf16_vs_fp32": max_difference(bf16, fp32),
        "autocast_vs_fp32": max_difference(autocast, fp32),
        "bf16_vs_reference_bf16": max_difference(bf16, bf16_ref),
    }
    result = {name: diff for name, (diff, _) in diffs.items()}
    result["dtypes"] = sorted({str(o.dtype) for o in bf16.values()})
    assert result["dtypes"] == ["torch.bfloat16"], f"bf16 model returned {result['dtypes']}"
    for name, (diff, scale) in diffs.items():
        assert diff <= tol * scale, f"{name}: max difference {diff:.3e} > {tol} x {scale:.3g}"
    return result


def check_dropout_rates(device: torch.device) -> dict:
    from mtlora_dist.adapters.dropout import DropMask, lora_dropout

    shape, rates = (256, 4096), {}
    numel = shape[0] * shape[1]
    for p in (0.05, 0.1, 0.3):
        for positions in (True, False):
            dropped = 1.0 - DropMask(shape, p, device, positions=positions).dense().ne(0).float().mean().item()
            sigma = math.sqrt(p * (1 - p) / numel)
            rates[f"p={p} {'positions' if positions else 'keep-mask'}"] = round(dropped, 5)
            assert abs(dropped - p) < 6 * sigma, f"p={p}, positions={positions}: dropped {dropped:.5f}"
    x = torch.ones(shape, device=device, requires_grad=True)
    y = lora_dropout(x, 0.1)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach()), "lora_dropout's gradient mask differs from its forward mask"
    kept = y.detach()[y.detach() != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.9)), "kept elements are not scaled by 1/(1-p)"
    return {"dropped_fraction": rates}


def check_checkpointing_dropout(device: torch.device) -> dict:
    models = [tiny_model(device, dropout=0.1, grad_checkpointing=flag).train() for flag in (False, True)]
    images = torch.randn(2, 3, 64, 64, device=device)
    grads = []
    for model in models:
        for task in TASKS:
            model.decoders[task].head.fuse[1].eval()  # same BatchNorm statistics path in both
        torch.manual_seed(1)
        sum(o.square().mean() for o in model(images).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys(), "checkpointing changes which parameters get gradients"
    worst = 0.0
    for name in grads[0]:
        torch.testing.assert_close(
            grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        worst = max(worst, (grads[1][name] - grads[0][name]).abs().max().item())
    return {"parameters": len(grads[0]), "max_abs_grad_diff": worst}


def check_control_collectives(device: torch.device) -> dict:
    """A one-rank group whose default backend takes device tensors only, as DeepSpeed's NCCL group does."""
    import torch.distributed as dist

    from mtlora_dist.engine.distributed import free_port

    try:
        from mtlora_dist import comm
    except ImportError:
        return {"status": "comm module missing"}
    from mtlora_dist.engine.signals import TerminationFlag

    backend = "nccl" if device.type == "cuda" else "cuda:gloo"
    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        result: dict = {"backend": backend}
        try:
            dist.all_reduce(torch.ones(1))
            result["raw_cpu_all_reduce"] = "accepted"
        except RuntimeError as err:
            result["raw_cpu_all_reduce"] = f"refused: {str(err).strip().splitlines()[0]}"
        comm.init_control_group()
        checks = {
            "any_rank": comm.any_rank(True) is True,
            "sum_counts": comm.sum_counts({"a": 2}) == {"a": 2},
            "broadcast_object": comm.broadcast_object({"x": 1}) == {"x": 1},
            "all_gather_object": comm.all_gather_object(3) == [3],
            "should_stop": TerminationFlag().should_stop() is False,
        }
        comm.barrier()
        if device.type == "cuda":  # a device collective on the default (NCCL) group
            checks["device_all_reduce"] = comm.all_reduce(torch.ones(1, device=comm.comm_device())).item() == 1
        result.update(checks)
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"control collectives gave wrong answers: {failed}"
        return result
    finally:
        dist.destroy_process_group()


CHECKS: dict[str, Callable[[torch.device], dict]] = {
    "fused_gradcheck": check_fused_gradcheck,
    "bf16_forward": check_bf16_forward,
    "dropout_rates": check_dropout_rates,
    "checkpointing_dropout": check_checkpointing_dropout,
    "control_collectives": check_control_collectives,
}


def run_check(check: Callable[[torch.device], dict], device: torch.device) -> dict:
    """One check's outcome: passed with its details, failed with the error; never raises."""
    start = time.perf_counter()
    try:
        details = check(device)
        outcome = {"status": details.pop("status", "passed"), **details}
    except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}
        traceback.print_exc()
    outcome["seconds"] = round(time.perf_counter() - start, 2)
    print(f"{check.__name__}: {outcome['status']}", flush=True)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--only", nargs="+", choices=tuple(CHECKS), default=list(CHECKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    exact_fp32()
    checks = {name: run_check(CHECKS[name], device) for name in args.only}
    passed = all(c["status"] != "failed" for c in checks.values())
    emit({"device": str(device), "passed": passed, "checks": checks}, args.json)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    from mtlora_dist.process_exit import exit_before_teardown

    exit_before_teardown(main)  # its status, never a process group's teardown abort
