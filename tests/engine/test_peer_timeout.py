"""A silent peer ends the job within ``deepspeed.process_group_timeout_s``: the timeout reaches the
process group (gloo honours it as NCCL does), and the survivor stops with the named lost-peer message
and a non-zero status instead of waiting for DeepSpeed's default timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlora_dist.engine.distributed import enable_nccl_async_errors

from s3_server import free_port

WORKER = Path(__file__).with_name("peer_timeout_worker.py")
TIMEOUT_S = 4


def _rank(rank: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
    return subprocess.Popen([sys.executable, str(WORKER), str(TIMEOUT_S)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.integration
def test_a_silent_peer_ends_the_survivor_within_the_timeout():
    port = free_port()
    survivor, silent = _rank(0, port), _rank(1, port)
    try:
        ready = survivor.stdout.readline()  # the group exists: from here only the collective can wait
        start = time.monotonic()
        out, err = survivor.communicate(timeout=120)
        waited = time.monotonic() - start
    finally:
        silent.kill()
        silent.wait()
        survivor.kill()
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in ready
    assert survivor.returncode == 1, out + err
    assert TIMEOUT_S - 1 < waited < TIMEOUT_S + 20, f"the survivor waited {waited:.1f} s"
    assert "rank 0: a peer rank has stopped answering" in err, err
    assert f"{TIMEOUT_S} s, deepspeed.process_group_timeout_s" in err and "Traceback" not in err, err


def test_async_nccl_errors_are_on_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    enable_nccl_async_errors()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    enable_nccl_async_errors()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
