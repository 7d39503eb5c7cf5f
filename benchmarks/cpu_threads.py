"""Training-step speed of the quickstart model with a busy neighbour on one core, beside the quiet figure.

    python benchmarks/cpu_threads.py [--seconds 6] [--repeats 3] [--json out.json]

Each row runs the quickstart's training step (tiny MTLoRA Swin, its batch and image size: forward,
multi-task loss, backward, AdamW) in a fresh process for ``--seconds`` and reports images/s, first on
the machine as it is ("quiet"), then with a neighbour: a second process spinning on CPU 0 (``--busy-neighbour``
alone measures only that row). The ratio busy/quiet is the cost of one busy core; issue 33 saw 71 -> 2.8
img/s with torch's defaults (OpenMP threads on every core, spinning at barriers).

Rows: ``torch default`` (threads = CPUs, libgomp's default wait policy), ``ours`` (what the trainer sets:
:func:`mtlora_dist.cpus.cpu_budget` for ``data.num_workers=0``, as the quickstart, and
``OMP_WAIT_POLICY=PASSIVE``), and ``1 thread`` (``OMP_NUM_THREADS=1``, the issue's workaround). Each
process sets its wait policy before importing torch, since libgomp reads it once when it loads. Quiet
and busy runs alternate, ``--repeats`` times, and the median is reported, so that other load on the
machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args: argparse.Namespace) -> None:
    if args.policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = args.policy
    import torch  # after the policy: libgomp reads it when torch loads it

    sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
    from mtlora_dist.config import load_config
    from mtlora_dist.models import build_model
    from mtlora_dist.tasks.losses import MultiTaskLoss

    from common import random_targets

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"), [])
    model = build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = MultiTaskLoss(cfg.data.tasks)
    batch, size = cfg.data.batch_size, cfg.model.img_size[0]
    images = torch.randn(batch, 3, size, size)
    targets = random_targets(cfg.data.tasks, batch, size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss_fn(model(images), targets)
        total.backward()
        optimizer.step()

    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"img_per_s": steps * batch / elapsed, "threads": torch.get_num_threads()}))


def _spinner() -> subprocess.Popen:
    """A process spinning on CPU 0 (the neighbour)."""
    code = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _run(policy: str, threads: int, seconds: float, busy: bool) -> float:
    neighbour = _spinner() if busy else None
    try:
        time.sleep(0.2 if busy else 0)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                "--policy",
                policy,
                "--threads",
                str(threads),
                "--seconds",
                str(seconds),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-neighbour", action="store_true", help="measure only the row with the neighbour")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="PASSIVE", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    sys.path.insert(0, REPO)
    from mtlora_dist.cpus import OPENMP_DEFAULTS, available_cpus, cpu_budget

    cpus = available_cpus()
    ours = cpu_budget(0, cpus=cpus, local_ranks=1, omp_threads=None)
    settings = {
        "torch default": ("default", cpus),
        "ours": (OPENMP_DEFAULTS["OMP_WAIT_POLICY"], ours.threads),
        "1 thread": ("default", 1),
    }
    conditions = [True] if args.busy_neighbour else [False, True]
    runs: dict[tuple[str, bool], list[float]] = {(name, busy): [] for name in settings for busy in conditions}
    for _ in range(args.repeats):
        for name, (policy, threads) in settings.items():
            for busy in conditions:
                runs[(name, busy)].append(_run(policy, threads, args.seconds, busy))
    rows = []
    for name, (policy, threads) in settings.items():
        row = {"setting": name, "threads": threads, "wait_policy": policy, "cpus": cpus}
        for busy in conditions:
            row["busy_img_per_s" if busy else "quiet_img_per_s"] = round(statistics.median(runs[(name, busy)]), 2)
        if not args.busy_neighbour:
            row["busy_over_quiet"] = round(row["busy_img_per_s"] / row["quiet_img_per_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
