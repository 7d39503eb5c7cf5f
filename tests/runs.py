"""What the tests that run ``launch/`` scripts share: the tiny quickstart overrides and the launchers."""

from __future__ import annotations

import sys

from s3_server import free_port

# The quickstart's tiny model at 64 px, small batches, no workers, a log line every step, no bar, and
# evaluation only at the end; a test adds its steps, data and what it is about.
TINY_RUN = [
    "model.img_size=[64,64]",
    "model.backbone_kwargs.window_size=2",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "logging.log_every=1",
    "logging.progress_bar=false",
    "eval.every=0",
]


def deepspeed_launcher(ranks: int = 2) -> list[str]:
    """What ``deepspeed --num_accelerators N`` runs, on a free port (CPU ranks on this machine)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(ranks),
            "--master_port", str(free_port())]  # fmt: skip


def torchrun_launcher(ranks: int = 2) -> list[str]:
    """What ``torchrun --nproc_per_node N`` runs, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port())]  # fmt: skip
