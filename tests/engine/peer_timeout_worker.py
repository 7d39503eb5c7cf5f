"""One rank of a 2-rank gloo job whose rank 1 goes silent (alive, never reaching the collective) while
rank 0 waits in a collective on the default group; started by ``tests/engine/test_peer_timeout.py``.

    python peer_timeout_worker.py TIMEOUT_S   (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* in the environment)

Rank 0 runs as the trainer does (``init_distributed`` with the configured timeout, the collective inside
``comm.peer_loss_as_error``) and, like ``launch/train.py``, prints a ``PeerLostError`` and exits 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from mtlora_dist import comm  # noqa: E402
from mtlora_dist.engine.distributed import init_distributed  # noqa: E402


def main() -> None:
    info = init_distributed(timeout_s=float(sys.argv[1]))
    print(f"ready TORCH_NCCL_ASYNC_ERROR_HANDLING={os.environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING')}", flush=True)
    if info.rank == 1:
        time.sleep(600)  # stalled: the test ends this process
    try:
        with comm.peer_loss_as_error():
            comm.all_reduce(torch.ones(1))  # a device collective on the default group
    except comm.PeerLostError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
