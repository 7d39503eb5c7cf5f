"""Third-party start-up noise, silenced once per process before the libraries that make it load.

What every rank of a 2-rank CPU run printed before (issue 19): DeepSpeed's "Setting accelerator to
CPU" warning at import (it guesses when ``DS_ACCELERATOR`` is unset), torch's FutureWarning that
``all_gather_into_tensor`` is deprecated (DeepSpeed's ZeRO calls it; nothing a user can act on), and
torch's DataLoader warning about more workers than CPUs once per loader (the loader logs its own
worker count on rank 0 instead).
"""

from __future__ import annotations

import os
import warnings

__all__ = ["quiet_third_party"]


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_third_party() -> None:
    """Call before ``import deepspeed``; idempotent."""
    if "DS_ACCELERATOR" not in os.environ and not _cuda_present():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would pick, said so it need not warn
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes", category=UserWarning)
